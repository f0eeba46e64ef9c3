#!/usr/bin/env python3
"""`cohort simulate` in one process and with --workers N: wall time, seconds a round, peak
resident memory of the whole process tree (driver + worker processes, from /proc), and
whether every run wrote the same final model (content-addressed weights).

    python3 benches/sim_workers.py --workers 0,2,3 -- --dataset /usr/share/datasets/fashion-mnist \
        --participants 10000 --rounds 2 --epochs 1 --batch-size 32 --lr 0.05 --custodians 5
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_flower import ROOT, timed_peak  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", default="0,2")
    p.add_argument("--cohort", default=os.path.join(ROOT, "target/release/cohort"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then `cohort simulate` flags")
    a = p.parse_args()
    rest = [x for x in a.rest if x != "--"]
    tmp = tempfile.mkdtemp()
    rows = []
    for w in a.workers.split(","):
        report = os.path.join(tmp, f"r{w}.json")
        t, mb = timed_peak([a.cohort, "simulate", "--quiet", "--no-baseline", "--workers", w,
                            "--out", os.path.join(tmp, f"o{w}"), "--report", report] + rest)
        r = json.load(open(report))
        rows.append((w, t, [x["seconds"] for x in r["rounds"]], mb,
                     r["model_path"].rsplit("/", 1)[1][:16], r["federated_accuracy"]))
    print(f"{'workers':>8}{'wall s':>9}  {'s a round':<18}{'peak MB':>9}  model")
    for w, t, per, mb, model, acc in rows:
        print(f"{w:>8}{t:>9.1f}  {', '.join(f'{s:.2f}' for s in per):<18}{mb:>9.0f}  "
              f"{model}… acc {acc:.4f}")
    same = len({r[4] for r in rows}) == 1
    print("same final model in every run:", same)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

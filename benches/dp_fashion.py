"""Accuracy against ε on Fashion-MNIST: cohort's central and distributed differential privacy.

Usage: python3 benches/dp_fashion.py [--rounds R] [--out DIR]
(needs target/release/cohort and Debian's dataset-fashion-mnist.)

Task: the CNN of `ModelSpec::Cnn` on Fashion-MNIST's training set split iid over 1,000
participants (60 images each), 100 of them drawn uniformly a round (accounted as Poisson
sampling at q = 0.1; a fixed round size lets distributed noise be sized for all 100), one
five local epochs of SGD (batch 32, learning rate 0.05), each update
clipped to L2 norm 1, FedAvg, R rounds (50 by default); federated evaluation on each
participant's share of the test set (a fifth of them each round). For each ε in {1, 3, 8} (δ = 1e-5) the noise
multiplier comes from cohort's RDP accountant (`--target-epsilon`). Distributed DP runs in
the virtual engine with secure aggregation's exact integer emulation (the same noised sums
as encryption, which the test suite checks bit for bit), central DP in plaintext rounds.

Writes DIR/dp_fashion_mnist.json and DIR/dp_fashion_mnist.svg.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from compare_dp import EPSILONS, svg  # noqa: E402

COHORT = os.path.join(ROOT, "target", "release", "cohort")
DATA = "/usr/share/datasets/fashion-mnist"


def run(tmp, rounds, extra):
    report = os.path.join(tmp, "report.json")
    cmd = [COHORT, "simulate", "--quiet", "--no-baseline", "--dataset", DATA,
           "--participants", "1000", "--clients-per-round", "100",
           "--rounds", str(rounds), "--epochs", "5", "--batch-size", "32", "--lr", "0.05",
           "--clip-norm", "1", "--evaluate-fraction", "0.2", "--engine", "virtual",
           "--report", report, "--out", os.path.join(tmp, "run")] + extra
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"cohort failed:\n{r.stderr[-4000:]}")
    with open(report) as f:
        out = json.load(f)
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    series = {"cohort central": {}, "cohort distributed": {}}
    detail = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(tmp, a.rounds, ["--plaintext"])
        print(f"no DP: {plain['federated_accuracy']:.4f} ({plain['wall_seconds']:.0f} s)",
              flush=True)
        for e in EPSILONS:
            for mech, extra in [("central", ["--plaintext"]),
                                ("distributed", ["--secure", "emulated"])]:
                r = run(tmp, a.rounds, extra + ["--dp", mech, "--target-epsilon", str(e)])
                series[f"cohort {mech}"][str(e)] = r["federated_accuracy"]
                detail.append({"epsilon_target": e, "mechanism": mech,
                               "noise_multiplier": r["privacy"]["noise_multiplier"],
                               "epsilon": r["privacy"]["epsilon"],
                               "accuracy": r["federated_accuracy"],
                               "wall_seconds": r["wall_seconds"]})
                print(f"ε {e} {mech}: {r['federated_accuracy']:.4f} "
                      f"(z {r['privacy']['noise_multiplier']:.3f}, ε spent "
                      f"{r['privacy']['epsilon']:.3f}, {r['wall_seconds']:.0f} s)", flush=True)
    result = {"task": __doc__.split("Task: ")[1].split("\n\n")[0].replace("\n", " "),
              "rounds": a.rounds, "no_dp": plain["federated_accuracy"], "runs": detail,
              "mean": series}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "dp_fashion_mnist.json"), "w") as f:
        json.dump(result, f, indent=1)
    lo = min([plain["federated_accuracy"]] + [v for s in series.values() for v in s.values()])
    svg(series, {"cohort, no DP": plain["federated_accuracy"]},
        os.path.join(a.out, "dp_fashion_mnist.svg"), y0=max(0.0, round(lo - 0.1, 1)), y1=1.0)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""cohort vs Flower 1.42 on the same federated task, whole-process wall time, one run.

Usage: python3 benches/compare_flower.py [--flower-python PATH] [--repeats N]
                                         [--task breast-cancer|fashion-mnist|fashion-mnist-1000]
                                         [--rounds R]
(benches/compare_flower.sh makes the Flower virtual environment and calls this.)

Task fashion-mnist: the CNN of `ModelSpec::Cnn` (52,138 parameters) on Debian's
dataset-fashion-mnist, 10 participants with a Dirichlet(0.5) label split, 3 rounds of one
local epoch (SGD, lr 0.05, batch 32), FedAvg, federated evaluation on each participant's tenth
of the test set. cohort runs with secure aggregation (its default) and writes its shares with
--export-partition; Flower + PyTorch (benches/flower_fashion.py) trains on exactly those
shares, plain and with SecAgg+. Whole-process wall time and final accuracy, one run each.

Task fashion-mnist-1000: the same CNN and hyper-parameters, 1,000 participants (iid shares of
the training set), 100 trained a round, every participant evaluating each round's model on
its tenth of the test set, 3 rounds. cohort in its virtual-participant engine with secure
aggregation (full encryption, and emulated), Flower + PyTorch plain (SecAgg+ among 1,000
clients is left out: its per-round key agreement is quadratic). Whole-process wall time and
the peak memory of the whole process tree (Ray's workers included), sampled from /proc.

Task breast-cancer (both sides): logistic regression on the bundled breast-cancer table; 5 participants,
client k holding rows i with i % 5 == k; 20% held out per client; per-client standardisation;
20 full-batch gradient steps of learning rate 0.1 per round; 3 rounds of FedAvg with
federated evaluation. cohort runs its coordinator and 5 participants over loopback gRPC;
Flower runs its simulation engine (Ray). The same machine, the same run, one after the other.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def timed(cmd, env=None):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return dt


def tree_rss_kb(root):
    """Resident memory of `root` and all its descendants, in kB (from /proc)."""
    children, rss = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/status") as f:
                kb = next((int(l.split()[1]) for l in f if l.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(pid))
        rss[int(pid)] = kb
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def timed_peak(cmd, env=None):
    """Wall seconds and peak resident memory (MB) of the whole process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kb(proc.pid))
        time.sleep(0.2)
    dt = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return dt, peak / 1024


def scale(a, cohort):
    tmp = tempfile.mkdtemp()
    shares = os.path.join(tmp, "shares.json")
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore", PYTHONPATH=HERE)
    common = ["simulate", "--dataset", a.data, "--participants", "1000", "--fraction", "0.1",
              "--rounds", str(a.rounds), "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
              "--no-baseline", "--quiet", "--engine", "virtual"]
    rows = []
    for i in range(a.repeats):
        for mode in ("full", "emulated"):
            report = os.path.join(tmp, "cohort.json")
            t, mb = timed_peak([cohort] + common + [
                "--secure", mode, "--export-partition", shares,
                "--out", os.path.join(tmp, f"c{i}{mode}"), "--report", report])
            rows.append((f"cohort (secure, {mode})", t, mb,
                         json.load(open(report))["federated_accuracy"]))
        out = os.path.join(tmp, "flower.json")
        t, mb = timed_peak([a.flower_python, os.path.join(HERE, "flower_fashion.py"), shares, out,
                            "--rounds", str(a.rounds), "--fraction", "0.1"], env=env)
        rows.append(("Flower+PyTorch", t, mb, json.load(open(out))["federated_accuracy"]))
    print(f"{'system':<28}{'wall s':>10}{'peak MB':>10}{'accuracy':>10}")
    for name, t, mb, acc in rows:
        print(f"{name:<28}{t:>10.1f}{mb:>10.0f}{acc:>10.4f}")
    med = lambda n, k: statistics.median(r[k] for r in rows if r[0] == n)
    for mode in ("full", "emulated"):
        c = f"cohort (secure, {mode})"
        print(f"Flower / cohort {mode}: {med('Flower+PyTorch', 1) / med(c, 1):.2f}x wall time, "
              f"{med('Flower+PyTorch', 2) / med(c, 2):.2f}x peak memory")


def fashion(a, cohort):
    tmp = tempfile.mkdtemp()
    shares = os.path.join(tmp, "shares.json")
    rows = []
    # Ray's workers import flower_fashion.py's helper module (benches/torch_cnn.py) too.
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore", PYTHONPATH=HERE)
    for i in range(a.repeats):
        t = timed([cohort, "simulate", "--dataset", a.data, "--participants", "10",
                   "--partition", "dirichlet:0.5", "--rounds", str(a.rounds), "--epochs", "1",
                   "--batch-size", "32", "--lr", "0.05", "--no-baseline", "--quiet",
                   "--export-partition", shares, "--out", os.path.join(tmp, f"c{i}"),
                   "--report", os.path.join(tmp, "cohort.json")])
        acc = json.load(open(os.path.join(tmp, "cohort.json")))["federated_accuracy"]
        rows.append(("cohort (secure agg.)", t, acc))
        for flag, name in (([], "Flower+PyTorch"), (["--secagg"], "Flower+PyTorch SecAgg+")):
            out = os.path.join(tmp, "flower.json")
            t = timed([a.flower_python, os.path.join(HERE, "flower_fashion.py"), shares, out,
                       "--rounds", str(a.rounds)] + flag, env=env)
            rows.append((name, t, json.load(open(out))["federated_accuracy"]))
    print(f"{'system':<26}{'wall s':>10}{'accuracy':>10}")
    for name, t, acc in rows:
        print(f"{name:<26}{t:>10.1f}{acc:>10.4f}")
    med = lambda n: statistics.median(t for m, t, _ in rows if m == n)
    c = med("cohort (secure agg.)")
    print(f"ratio Flower / cohort: {med('Flower+PyTorch') / c:.2f}x plain, "
          f"{med('Flower+PyTorch SecAgg+') / c:.2f}x with SecAgg+")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flower-python", default=os.path.join(ROOT, "target", "flower-venv", "bin", "python"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--task", default="breast-cancer",
                    choices=["breast-cancer", "fashion-mnist", "fashion-mnist-1000"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    a = ap.parse_args()
    cohort = os.path.join(ROOT, "target", "release", "cohort")
    if a.task == "fashion-mnist":
        return fashion(a, cohort)
    if a.task == "fashion-mnist-1000":
        return scale(a, cohort)
    tmp = tempfile.mkdtemp()
    c_times, f_times = [], []
    for i in range(a.repeats):
        c_times.append(timed([cohort, "simulate", "--participants", "5", "--rounds", "3",
                              "--epochs", "20", "--batch-size", "100000", "--lr", "0.1",
                              "--partition", "roundrobin", "--no-baseline", "--quiet",
                              "--out", os.path.join(tmp, f"c{i}"),
                              "--report", os.path.join(tmp, "cohort.json")]))
        env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore")
        f_times.append(timed([a.flower_python, os.path.join(HERE, "flower_app.py"),
                              os.path.join(tmp, "flower.json")], env=env))
    c_acc = json.load(open(os.path.join(tmp, "cohort.json")))["federated_accuracy"]
    f_acc = json.load(open(os.path.join(tmp, "flower.json")))["federated_accuracy"]
    c_med, f_med = statistics.median(c_times), statistics.median(f_times)
    print(f"{'system':<22}{'wall s (median)':>16}{'runs':>28}{'accuracy':>10}")
    print(f"{'cohort simulate':<22}{c_med:>16.3f}{' '.join(f'{t:.3f}' for t in c_times):>28}{c_acc:>10.4f}")
    print(f"{'Flower 1.42 (Ray)':<22}{f_med:>16.3f}{' '.join(f'{t:.3f}' for t in f_times):>28}{f_acc:>10.4f}")
    print(f"ratio Flower / cohort: {f_med / c_med:.1f}x")


if __name__ == "__main__":
    main()

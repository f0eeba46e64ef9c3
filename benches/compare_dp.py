"""Accuracy against ε: cohort's central and distributed differential privacy and Flower 1.42's
central-DP wrapper on one task, in one run, with a plot.

Usage: python3 benches/compare_dp.py [--flower-python PATH] [--seeds N] [--out DIR]
(benches/compare_dp.sh makes Flower's virtual environment and calls this.)

Task: logistic regression on the bundled breast-cancer table split iid over 100
participants (4 to 5 training rows each, 20% held out, each site standardising its own rows),
20 rounds of FedAvg with every participant every round, 2 local epochs of SGD (batch 16,
learning rate 0.1), each update clipped to L2 norm 0.5. For each ε in {1, 3, 8} (δ = 1e-5)
cohort calibrates the noise multiplier with its RDP accountant (`--target-epsilon`), runs
`--dp central` and `--dp distributed` (discrete Gaussian noise inside secure aggregation),
and Flower runs the same shares (`--export-partition`) with
`DifferentialPrivacyServerSideFixedClipping` at that noise multiplier (Flower has no
accountant). Without DP: both frameworks, the same clipping. Each point is the mean of the
seeds' final held-out accuracies.

Writes DIR/dp_breast_cancer.json and DIR/dp_breast_cancer.svg.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COHORT = os.path.join(ROOT, "target", "release", "cohort")
EPSILONS = [1.0, 3.0, 8.0]
CLIENTS, ROUNDS, CLIP, DELTA = 100, 20, 0.5, 1e-5


def run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def cohort(tmp, seed, extra):
    report = os.path.join(tmp, "report.json")
    shares = os.path.join(tmp, f"shares-{seed}.json")
    run([COHORT, "simulate", "--quiet", "--no-baseline", "--participants", str(CLIENTS),
         "--rounds", str(ROUNDS), "--clip-norm", str(CLIP), "--seed", str(seed),
         "--preprocess", "site", "--export-partition", shares, "--report", report,
         "--out", os.path.join(tmp, "run")] + extra)
    with open(report) as f:
        r = json.load(f)
    return r, shares


def flower(python, tmp, shares, z, seed):
    out = os.path.join(tmp, "flower.json")
    run([python, os.path.join(HERE, "flower_dp.py"), shares, str(ROUNDS), str(z), str(CLIP),
         str(seed), out])
    with open(out) as f:
        return json.load(f)["federated_accuracy"]


PALETTE = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"]


def svg(series, baselines, path, y0=0.5, y1=1.0):
    """Accuracy (y) against ε (x, log scale), one line per series ({name: {ε: accuracy}});
    the non-private accuracies ({name: accuracy}) as dashed lines."""
    import math
    w, h, left, bottom, top, right = 640, 400, 60, 50, 20, 170
    xs = [math.log(e) for e in EPSILONS]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - bottom - top)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{left}" y1="{h-bottom}" x2="{w-right}" y2="{h-bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h-bottom}" stroke="black"/>',
           f'<text x="{(left + w - right) / 2}" y="{h - 12}" text-anchor="middle">'
           f'ε (δ = 1e-5, log scale)</text>',
           f'<text x="14" y="{(top + h - bottom) / 2}" transform="rotate(-90 14 '
           f'{(top + h - bottom) / 2})" text-anchor="middle">held-out accuracy</text>']
    for e, x in zip(EPSILONS, xs):
        out.append(f'<text x="{px(x)}" y="{h-bottom+18}" text-anchor="middle">{e:g}</text>')
    for k in range(6):
        y = y0 + k * (y1 - y0) / 5
        out.append(f'<text x="{left-8}" y="{py(y)+4}" text-anchor="end">{y:.2f}</text>')
        out.append(f'<line x1="{left}" y1="{py(y)}" x2="{w-right}" y2="{py(y)}" '
                   f'stroke="#ddd"/>')
    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        ys = [points[str(e)] for e in EPSILONS]
        pts = " ".join(f"{px(x)},{py(y)}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="3.5" fill="{colour}"/>')
        ly = top + 16 + 20 * i
        out.append(f'<line x1="{w-right+10}" y1="{ly}" x2="{w-right+30}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{w-right+36}" y="{ly+4}">{name}</text>')
    for i, (name, y) in enumerate(baselines.items()):
        colour = ["#555", "#d62728"][i % 2]
        out.append(f'<line x1="{left}" y1="{py(y)}" x2="{w-right}" y2="{py(y)}" '
                   f'stroke="{colour}" stroke-dasharray="5,4"/>')
        ly = top + 16 + 20 * (len(series) + i)
        out.append(f'<line x1="{w-right+10}" y1="{ly}" x2="{w-right+30}" y2="{ly}" '
                   f'stroke="{colour}" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{w-right+36}" y="{ly+4}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--flower-python", default=os.path.join(ROOT, "target", "flower-venv",
                                                            "bin", "python"))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    runs = {k: {str(e): [] for e in EPSILONS} for k in
            ["cohort central", "cohort distributed", "Flower central"]}
    plain = {"cohort, no DP": [], "Flower, no DP": []}
    multipliers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, a.seeds + 1):
            r, shares = cohort(tmp, seed, [])
            plain["cohort, no DP"].append(r["federated_accuracy"])
            plain["Flower, no DP"].append(flower(a.flower_python, tmp, shares, 0.0, seed))
            for e in EPSILONS:
                for mech in ["central", "distributed"]:
                    r, shares = cohort(tmp, seed, ["--dp", mech, "--target-epsilon", str(e),
                                                   "--delta", str(DELTA)])
                    runs[f"cohort {mech}"][str(e)].append(r["federated_accuracy"])
                    multipliers[str(e)] = r["privacy"]["noise_multiplier"]
                    spent = r["privacy"]["epsilon"]
                    assert spent <= e, f"cohort spent ε {spent} > {e}"
                runs["Flower central"][str(e)].append(
                    flower(a.flower_python, tmp, shares, multipliers[str(e)], seed))
                print(f"seed {seed} ε {e}: "
                      + ", ".join(f"{k} {v[str(e)][-1]:.4f}" for k, v in runs.items()),
                      flush=True)
    points = {k: {e: statistics.mean(v) for e, v in s.items()} for k, s in runs.items()}
    points.update({k: statistics.mean(v) for k, v in plain.items()})
    result = {"task": __doc__.split("Task: ")[1].split("\n\n")[0].replace("\n", " "),
              "clients": CLIENTS, "rounds": ROUNDS, "clip_norm": CLIP, "delta": DELTA,
              "seeds": a.seeds, "noise_multipliers": multipliers, "runs": runs,
              "no_dp": plain, "mean": points}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "dp_breast_cancer.json"), "w") as f:
        json.dump(result, f, indent=1)
    svg({k: points[k] for k in runs}, {k: points[k] for k in plain},
        os.path.join(a.out, "dp_breast_cancer.svg"))
    print(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()

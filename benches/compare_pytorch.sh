#!/usr/bin/env bash
# cohort's local training vs PyTorch (CPU) on the same network, data and hyper-parameters,
# back to back in one run, for each thread count: ms per image and the ratio cohort / PyTorch.
#
#   benches/compare_pytorch.sh [--model cnn|mlp] [--threads "1 2"] [other train_speed flags]
#
# cnn: Fashion-MNIST (apt-get install dataset-fashion-mnist), one epoch, SGD lr 0.05, batch 32.
# mlp: the bundled breast-cancer table, 30-64-64-2, 200 epochs, SGD lr 0.05, batch 32.
# Installs PyTorch from PyPI into target/flower-venv on first use (the CUDA build, ~5 GB; it
# runs on the CPU here), the same environment compare_flower.sh uses.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOWER_VENV:-target/flower-venv}"
model=cnn
threads="1 2"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
if [ "$model" = mlp ] && [[ " ${extra[*]-} " != *" --epochs "* ]]; then
  extra+=(--epochs 200)
fi
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch numpy || { echo "could not install torch from PyPI" >&2; exit 1; }
fi
cargo build --release --bench train_speed
bench=$(ls -t target/release/deps/train_speed-* | grep -v '\.d$' | head -1)
printf '%-16s %7s %10s %12s %10s %9s\n' system threads images ms/image test_acc ratio
for t in $threads; do
  c=$("$bench" --model "$model" --threads "$t" "${extra[@]}")
  p=$(OMP_NUM_THREADS="$t" "$venv/bin/python" benches/train_pytorch.py --model "$model" --threads "$t" "${extra[@]}")
  python3 - "$c" "$p" <<'PY'
import json, sys
c, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for r in (c, p):
    print(f"{r['system']:<16} {r['threads']:>7} {r['images']:>10} {r['ms_per_image']:>12.4f} {r['test_accuracy']:>10.4f}", end="")
    print(f" {c['ms_per_image'] / p['ms_per_image']:>8.2f}x" if r is c else "")
PY
done

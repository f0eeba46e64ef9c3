#!/usr/bin/env bash
# cohort vs Flower 1.42's simulation on the same task (see compare_flower.py).
# Installs Flower and PyTorch into target/flower-venv (from PyPI; PyTorch's wheel is the CUDA
# build, about 5 GB, and runs on the CPU here) on first use.
#   benches/compare_flower.sh [--repeats N]                        # breast cancer, logistic
#   benches/compare_flower.sh --task fashion-mnist --repeats 1     # Fashion-MNIST CNN
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOWER_VENV:-target/flower-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import flwr, torch' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "flwr[simulation]==1.42.*" numpy torch \
    || { echo "could not install flwr[simulation] and torch from PyPI" >&2; exit 1; }
fi
cargo build --release --workspace
python3 benches/compare_flower.py --flower-python "$venv/bin/python" "$@"

#!/usr/bin/env bash
# Accuracy against ε: cohort's central and distributed DP and Flower 1.42's central-DP wrapper
# on the same task (see compare_dp.py). Installs Flower into target/flower-venv on first use.
#   benches/compare_dp.sh [--seeds N]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${FLOWER_VENV:-target/flower-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import flwr' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "flwr[simulation]==1.42.*" numpy \
    || { echo "could not install flwr[simulation] from PyPI" >&2; exit 1; }
fi
cargo build --release --workspace
python3 benches/compare_dp.py --flower-python "$venv/bin/python" "$@"

#!/usr/bin/env bash
# cohort's threshold GLWE vs TenSEAL CKKS (see compare_tenseal.py). Installs tenseal into
# target/tenseal-venv (from PyPI) on first use. Both sides run pinned to CPU 0.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TENSEAL_VENV:-target/tenseal-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import tenseal' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q tenseal numpy || { echo "could not install tenseal from PyPI" >&2; exit 1; }
fi
cargo build --release --workspace --examples
taskset -c 0 "$venv/bin/python" benches/compare_tenseal.py "$@"

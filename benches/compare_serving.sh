#!/usr/bin/env bash
# cohort's Inference service vs the common Python way of serving the same model: grpcio with
# ONNX Runtime (benches/serve_peer.py), both driven by the same Rust load generator
# (benches/serve_load.rs) in one run. Installs the peer into target/serve-peer-venv (about
# 80 MB, from PyPI) on first use. Needs Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SERVE_PEER_VENV:-target/serve-peer-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import onnxruntime, grpc_tools, safetensors, onnx' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q onnx onnxruntime grpcio grpcio-tools safetensors numpy \
    || { echo "could not install the peer (onnxruntime, grpcio) from PyPI" >&2; exit 1; }
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
cargo bench --bench serve_load -- --devices cpu --precisions f32 \
  --peer-python "$venv/bin/python" "$@"

"""cohort's threshold GLWE vs TenSEAL CKKS (N = 8192), one core, same run.

Usage: benches/compare_tenseal.sh  (makes a venv with tenseal, builds the example, runs this)

Both encrypt the same 2^20-element vector of floats in [-1, 1) and add two encrypted
vectors. Figures are per element, best of 3 repetitions; both run pinned to CPU 0.
CKKS: N = 8192, coefficient moduli [60, 40, 40, 60], scale 2^40, 4096 slots per ciphertext.
cohort: k = 1, N = 2048, q = 2^64, T-uniform(17), bodies only (seeded masks).
"""
import json
import os
import subprocess
import sys
import time

import tenseal as ts

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N = 1 << 20


def tenseal_figures():
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    values = [((i * 7919) % 2000) / 1000.0 - 1.0 for i in range(N)]
    slots = 4096
    chunks = [values[i:i + slots] for i in range(0, N, slots)]
    enc = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        cts = [ts.ckks_vector(ctx, c) for c in chunks]
        enc = min(enc, time.perf_counter() - t)
    add = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        sums = [a + b for a, b in zip(cts, cts)]
        add = min(add, time.perf_counter() - t)
    size = sum(len(c.serialize()) for c in cts)
    return {"encrypt_ns_per_element": enc * 1e9 / N, "add_ns_per_element": add * 1e9 / N,
            "bytes_per_element": size / N}


def main():
    exe = os.path.join(ROOT, "target", "release", "examples", "he_throughput")
    c = json.loads(subprocess.run([exe, str(N)], check=True, capture_output=True, text=True).stdout)
    t = tenseal_figures()
    print(f"{'per element (2^20 elements, one core)':<40}{'cohort GLWE':>14}{'TenSEAL CKKS':>14}{'ratio':>9}")
    for key, label in [("encrypt_ns_per_element", "encrypt, ns"), ("add_ns_per_element", "add, ns"),
                       ("bytes_per_element", "bytes on the wire")]:
        print(f"{label:<40}{c[key]:>14.3f}{t[key]:>14.3f}{t[key] / c[key]:>8.1f}x")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs a command and samples the resident memory of its whole process tree every
`--every` seconds (from /proc); prints the samples, the peak and the wall time.

    python3 benches/rss_trace.py --every 1 -- target/release/cohort simulate ...
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_flower import tree_rss_kb  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = [x for x in a.cmd if x != "--"] if a.cmd and a.cmd[0] == "--" else a.cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    samples = []
    while proc.poll() is None:
        samples.append((time.perf_counter() - t0, tree_rss_kb(proc.pid) / 1024))
        time.sleep(a.every)
    wall = time.perf_counter() - t0
    for t, mb in samples:
        print(f"{t:8.1f} s {mb:9.1f} MB")
    print(f"peak {max(mb for _, mb in samples):.1f} MB, wall {wall:.1f} s, exit {proc.returncode}")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What `start`'s half-removed-install check (pyshim.install_gaps) costs.

    python3 bench/install_check.py [--runs 50] [--platform host|containerd2|debian13]

Each run is a fresh interpreter started as the launcher starts one for `start`
(`python -I -S`, the install's site-packages put on the path by hand, pyshim
imported), which then times its first install_gaps() call, the one a `start`
makes. Prints the median and the 90th percentile in ms. Needs no containerd.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig

import on_platform

PROBE = """
import sys, time
sys.path += sys.argv[1:]
import pyshim
t = time.perf_counter()
gaps = pyshim.install_gaps()
print((time.perf_counter() - t) * 1e3, len(gaps))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="fresh interpreters (default 50)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    site = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})  # this venv's
    times = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, *site], cwd="/", check=True,
                             capture_output=True, text=True).stdout.split()
        if out[1] != "0":
            raise SystemExit(f"this install has gaps: {out}")
        times.append(float(out[0]))
    times.sort()
    print(on_platform.caption())
    print("| runs | install_gaps() median ms | p90 ms |")
    print("|---|---|---|")
    print(f"| {len(times)} | {statistics.median(times):.3f} | {times[int(len(times) * 0.9) - 1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

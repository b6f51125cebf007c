#!/usr/bin/env python3
"""Runs idle containers through pyshim and through containerd-shim-runc-v2 under
one private containerd, and prints each shim's memory side by side.

    python3 bench/shim_memory.py [-n N] [--json FILE]

For each runtime, N detached busybox containers (`sleep`) are started with
`ctr run -d --rootfs`; then every long-lived shim process of that runtime is
read from /proc/PID/smaps_rollup (RSS, PSS, USS = private clean + dirty) and
/proc/PID/status (threads). PSS is the fair share: pages shared between shims
(the interpreter, libraries) are divided among them, so sum(PSS)/N is the
memory one more container costs. pyshim's warm template (the process its shims
are forked from) is counted in pyshim's sum.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import harness


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures of /proc/PID/smaps_rollup, plus uss and threads."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":").lower()] = int(parts[1])
    out["uss"] = out.get("private_clean", 0) + out.get("private_dirty", 0)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def long_lived_shims(daemon: harness.Containerd, runtime: str) -> list[int]:
    """Shim server processes (not the short start/delete runs) of `runtime`."""
    pids = []
    for pid in harness.shim_pids(daemon, runtime):
        argv = harness.cmdline(pid)
        if argv and argv[-1] not in ("start", "delete"):
            pids.append(pid)
    return pids


def templates(shims: list[int]) -> list[int]:
    """The warm template processes these shims were forked from (their parents)."""
    out = set()
    for pid in shims:
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        argv = harness.cmdline(ppid)
        if len(argv) >= 3 and argv[2] == "template" and "pyshim" in argv[1]:
            out.add(ppid)
    return sorted(out)


def measure(daemon: harness.Containerd, rootfs: str, runtime: str, n: int) -> dict:
    ids = []
    latencies = []
    for _ in range(n):
        cid = harness.new_id("mem")
        t0 = time.monotonic()
        r = daemon.ctr("run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid, "/bin/sleep", "100000")
        latencies.append(time.monotonic() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{runtime}: ctr run failed: {r.stderr.strip()}")
        ids.append(cid)
    time.sleep(1.0)  # let start-up garbage settle as it would on a node
    pids = long_lived_shims(daemon, runtime)
    figures = [smaps_rollup(p) for p in pids]
    # The template is part of what pyshim costs: its PSS counts in the sum.
    extra = [smaps_rollup(p) for p in templates(pids)]
    daemon.remove_all()
    pss = sum(f["pss"] for f in figures + extra)
    return {
        "runtime": runtime,
        "containers": n,
        "shims": len(pids),
        "template_pss_kb": sum(f["pss"] for f in extra),
        "pss_per_container_kb": round(pss / n),
        "rss_per_shim_kb": round(statistics.mean(f["rss"] for f in figures)),
        "uss_per_shim_kb": round(statistics.mean(f["uss"] for f in figures)),
        "threads_per_shim": round(statistics.mean(f["threads"] for f in figures), 1),
        "ctr_run_d_median_ms": round(statistics.median(latencies) * 1000, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="containers per runtime (default 5)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (it runs containerd and runc)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pysh-bench-") as tmp:
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        with harness.Containerd(log_level="info") as daemon:
            for runtime in (harness.PYSHIM, harness.RUNC):
                rows.append(measure(daemon, rootfs, runtime, args.n))
    cols = ["runtime", "containers", "shims", "template_pss_kb", "pss_per_container_kb", "rss_per_shim_kb",
            "uss_per_shim_kb", "threads_per_shim", "ctr_run_d_median_ms"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The soak row of the failure matrix, with its figures: N create/start/exec/kill/delete
cycles on one grouped shim, for containerd-shim-runc-v2 and for pyshim under one
private containerd.

    python3 bench/soak.py [--cycles 1000] [--out FILE] [--platform host|containerd2|debian13]

The scenario is tests/harness/soak_cycles.py's, the one test_faults.py's
test_grouped_shim_cycles_do_not_leak asserts on (an anchor container keeps the group's
shim alive; 10 warm-up cycles; then each cycle runs a container, execs `exit 4` in it,
kills it with SIGKILL and deletes it). The shim's RSS, USS and PSS
(/proc/PID/smaps_rollup), open fds and threads are read after the warm-up, after 10%
of the cycles and at the end. Prints one markdown table per shim and writes the
figures as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness installed

import harness
from harness import soak_cycles

HERE = os.path.dirname(os.path.abspath(__file__))

SHORT = {harness.RUNC: "runc-v2 (Go)", harness.PYSHIM: "pyshim"}


def table(r: dict) -> str:
    s = r["samples"]
    tenth = str(max(1, r["cycles"] // 10))
    cols = [("start", "start"), (tenth, f"after {tenth} cycles"), ("end", "end")]
    title = f"### {SHORT[r['runtime']]} (`{r['runtime']}`): {r['cycles']} cycles in {r['seconds']:.0f} s"
    lines = [title,
             "",
             "| | " + " | ".join(title for _, title in cols) + " | growth (end - start) |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for key, name in (("rss_kb", "RSS kB"), ("uss_kb", "USS kB"), ("pss_kb", "PSS kB"),
                      ("fds", "open fds"), ("threads", "threads")):
        vals = [s[k][key] for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(str(v) for v in vals)
                     + f" | {s['end'][key] - s['start'][key]:+d} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=1000, help="measured cycles per shim (default 1000)")
    ap.add_argument("--out", help="JSON file to write (default bench/out/PLATFORM/soak.json)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if os.geteuid() != 0:
        raise SystemExit("needs root (it runs containerd and runc)")
    if args.cycles < 1:
        raise SystemExit("--cycles must be at least 1")
    tenth = max(1, args.cycles // 10)
    args.out = args.out or os.path.join(on_platform.out_dir(), "soak.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="pysh-soak-") as tmp:
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        with harness.Containerd(log_level="info") as daemon:
            for runtime in (harness.RUNC, harness.PYSHIM):
                def progress(i: int, runtime: str = runtime) -> None:
                    if i % tenth == 0:
                        print(f"{SHORT[runtime]}: {i}/{args.cycles}", file=sys.stderr, flush=True)

                r = soak_cycles.run(daemon, runtime, rootfs, args.cycles, marks=(tenth,),
                                    progress=progress)
                r.update(runtime=runtime, cycles=args.cycles, seconds=round(r["seconds"], 1))
                del r["shim"]
                results.append(r)
                print(on_platform.caption() + "\n\n" + table(r) + "\n", flush=True)
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    doc = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit, "measured_on": on_platform.info(),
           "command": f"python3 bench/soak.py --cycles {args.cycles} --platform {args.platform}",
           "warmup_cycles": soak_cycles.WARMUP, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

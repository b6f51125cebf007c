"""How often `ctr task exec ... /bin/echo fine` loses the exec's output, per shim.

Under load, ctr 1.6 sometimes prints nothing (exit 0, empty stdout): its stdout
fifo is opened by a goroutine, and when that goroutine has not run again by the
time ctr deletes the process, ctr closes the fifo unread (README: Status, the
Exec row). This script counts those losses for the Go shim and for pyshim under
one private containerd, optionally with busy loops that it starts and kills.

    python3 bench/exec_output_race.py [-n RUNS] [--busy LOOPS] [--platform host|containerd2|debian13]

Prints one row per shim: runs, lost outputs, other failures, seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness installed

import harness


def measure(d: harness.Containerd, rootfs: str, runtime: str, runs: int) -> tuple[int, list, float]:
    """(lost outputs, other unexpected results, seconds) for `runs` execs."""
    cid = harness.new_id("race")
    d.ctr("run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid, "/bin/sleep", "100000", check=True)
    harness.wait_for(lambda: d.tasks().get(cid) == "RUNNING", 10)
    lost, other = 0, []
    start = time.monotonic()
    try:
        for i in range(runs):
            r = d.ctr("task", "exec", "--exec-id", f"e{i}", cid, "/bin/echo", "fine", timeout=60)
            got = (r.returncode, r.stdout, r.stderr)
            if got == (0, "", ""):
                lost += 1
            elif got != (0, "fine\n", ""):
                other.append(got)
    finally:
        seconds = time.monotonic() - start
        d.ctr("task", "kill", "-s", "KILL", cid)
        harness.wait_for(lambda: d.tasks().get(cid) in ("STOPPED", None), 10)
        d.ctr("task", "rm", cid)
        d.ctr("container", "rm", cid)
    return lost, other, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--runs", type=int, default=200, help="execs per shim (default 200)")
    ap.add_argument("--busy", type=int, default=3, help="busy loops to run meanwhile (default 3)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    base = tempfile.mkdtemp(prefix="pysh-race-")
    d = harness.Containerd()
    busy: list[subprocess.Popen] = []
    try:
        rootfs = harness.make_busybox_rootfs(os.path.join(base, "rootfs"))
        d.start()
        busy = [subprocess.Popen(["/bin/sh", "-c", "while :; do :; done"]) for _ in range(args.busy)]
        print(f"{args.busy} busy loops on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(on_platform.caption())
        print("| shim | runs | output lost | other failures | seconds |")
        print("|---|---|---|---|---|")
        for runtime in (harness.RUNC, harness.PYSHIM):
            lost, other, seconds = measure(d, rootfs, runtime, args.runs)
            print(f"| {runtime} | {args.runs} | {lost} | {len(other)} {other[:3]} | {seconds:.1f} |", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
        d.remove_all()
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

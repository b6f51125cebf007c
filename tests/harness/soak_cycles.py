"""The soak row of the failure matrix: create/start/exec/kill/delete cycles on one
grouped shim, sampling the shim's memory and fds. Shared by
tests/test_faults.py::test_grouped_shim_cycles_do_not_leak (which asserts) and
bench/soak.py (which prints the figures); it depends on harness only.

Every cycle checks what ctr answers and raises SoakError at the first surprise.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable

import harness
from harness import Containerd, new_id, shim_pids, wait_for

GROUP_ANNOTATION = "io.containerd.runc.v2.group"
WARMUP = 10
CTR_TIMEOUT = 30.0


class SoakError(AssertionError):
    """A cycle did not go as containerd-shim-runc-v2 would make it go."""


def probe(pid: int) -> dict[str, int]:
    """kB of RSS, PSS and USS (/proc/PID/smaps_rollup), open fds and threads."""
    m = harness.smaps_rollup(pid)
    if m is None:
        raise SoakError(f"shim {pid} is gone")
    return {"rss_kb": m["rss"], "pss_kb": m["pss"], "uss_kb": m["uss"],
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": m["threads"]}


def _stuck_processes() -> str:
    """Where each shim, runc and ctr process of this node waits (wchan and the
    kernel stack), for the error of a ctr that timed out: the one clue a hang
    leaves when no log has a line for it."""
    lines = []
    for pid in sorted(harness._pids(), reverse=True):
        cmd = " ".join(harness.cmdline(pid))
        if not any(w in cmd for w in ("containerd-shim", "runc", "ctr ")):
            continue
        wchan = harness._read(f"/proc/{pid}/wchan")
        if wchan is None:
            continue  # gone meanwhile
        stack = harness._read(f"/proc/{pid}/stack")
        frames = " < ".join(ln.split()[-1] for ln in stack.decode().splitlines()[:6]) if stack else "?"
        lines.append(f"  {pid} [{wchan.decode(errors='replace')}] {frames}: {cmd[:200]}")
    return "\n".join(lines[:40]) or "  (none)"


def _ctr(d: Containerd, *args: str) -> tuple[int, str, str]:
    try:
        res = d.ctr(*args, timeout=CTR_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SoakError(f"ctr {' '.join(args)} took over {CTR_TIMEOUT:.0f} s; "
                        f"processes then:\n{_stuck_processes()}") from None
    return res.returncode, res.stdout, res.stderr


def _ok(d: Containerd, *args: str) -> None:
    code, _, err = _ctr(d, *args)
    if code != 0:
        raise SoakError(f"ctr {' '.join(args)} -> {code}: {err}")


def _wait_status(d: Containerd, cid: str, status: str) -> None:
    wait_for(lambda: d.tasks().get(cid) == status, 10,
             message=f"task {cid} never {status}: {d.tasks().get(cid)}")


def _run_d(d: Containerd, runtime: str, rootfs: str, cid: str, group: str, *argv: str) -> None:
    _ok(d, "run", "-d", "--runtime", runtime, "--annotation", f"{GROUP_ANNOTATION}={group}",
        "--rootfs", rootfs, cid, *argv)
    _wait_status(d, cid, "RUNNING")


def cycle(d: Containerd, runtime: str, rootfs: str, group: str, i: int) -> None:
    """One container of the group: run -d, exec `exit 4`, kill -9, task rm, rm."""
    cid = new_id("cyc")
    _run_d(d, runtime, rootfs, cid, group, "/bin/sleep", "1000")
    step = _ctr(d, "task", "exec", "--exec-id", f"x{i}", cid, "/bin/sh", "-c", "exit 4")
    if step != (4, "", ""):
        raise SoakError(f"cycle {i}: exec answered {step}")
    _ok(d, "task", "kill", "-s", "KILL", cid)
    _wait_status(d, cid, "STOPPED")
    code, out, err = _ctr(d, "task", "rm", cid)
    err = re.sub(r'time="[^"]*" ', "", err)
    want = f'level=warning msg="task {cid} exit with non-zero exit code 137"\n'
    if (code, out, err) != (0, "", want):
        raise SoakError(f"cycle {i}: task rm answered {(code, out, err)}")
    _ok(d, "containers", "rm", cid)


def run(d: Containerd, runtime: str, rootfs: str, cycles: int,
        marks: tuple[int, ...] = (), progress: Callable[[int], None] | None = None) -> dict:
    """An anchor container keeps one grouped shim alive; WARMUP cycles, then the
    shim is probed, ``cycles`` cycles run (probing again after each count in
    ``marks``), fds get up to 5 s to fall back, and the shim is probed at the end.
    The anchor is then removed and the shim must exit.

    Returns {"shim": pid, "seconds": wall time of the measured cycles,
    "samples": {"start": probe, "<mark>": probe, ..., "end": probe}}.
    """
    group, anchor = new_id("grp"), new_id("anchor")
    _run_d(d, runtime, rootfs, anchor, group, "/bin/sleep", "100000")
    shim = harness.live_shim(d, runtime, anchor)
    for i in range(WARMUP):
        cycle(d, runtime, rootfs, group, i)
    if shim_pids(d, runtime) != [shim]:
        raise SoakError(f"the group must keep one shim: {shim_pids(d, runtime)}")
    samples = {"start": probe(shim)}
    t0 = time.monotonic()
    for i in range(cycles):
        cycle(d, runtime, rootfs, group, WARMUP + i)
        if i + 1 in marks:
            samples[str(i + 1)] = probe(shim)
        if progress:
            progress(i + 1)
    took = time.monotonic() - t0
    others = [p for p in shim_pids(d, runtime) if p != shim]
    if others:
        raise SoakError(f"a second shim appeared: {others}")
    try:
        wait_for(lambda: len(os.listdir(f"/proc/{shim}/fd")) <= samples["start"]["fds"], 5)
    except TimeoutError:
        pass  # the end sample shows it
    samples["end"] = probe(shim)
    _ok(d, "task", "kill", "-s", "KILL", anchor)
    _wait_status(d, anchor, "STOPPED")
    _ok(d, "task", "rm", anchor)
    _ok(d, "containers", "rm", anchor)
    wait_for(lambda: not shim_pids(d, runtime), 10, message="the grouped shim did not exit")
    return {"shim": shim, "seconds": took, "samples": samples}

#!/usr/bin/env python3
"""Where the time of one `ctr run -d` goes, for pyshim and the Go shim.

    python3 bench/start_breakdown.py [--runs 20] [--dump] [--platform host|containerd2|debian13]

Runs `ctr run -d --rootfs <busybox> ... /bin/sleep` under one private containerd
(tests/harness/), alternating the two runtimes, and records kernel trace events
(a private tracefs instance: exec, fork, exit, accept4, connect, clock "mono") for
every run. Each run gives these moments, in ms after ctr was launched:

  start exec     containerd execs the shim binary with `start`
  py exec        (pyshim) the native launcher execs Python: a cold start only
                 (no warm template); a warm one is the launcher and the template
  shim forked    the long-lived shim exists (pyshim: forked by the template;
                 Go: `start` execs the shim daemon); missing when pyshim's start
                 was handed the template's spare shim, made before the run
  start exit     `start` exits: containerd has the address
  accept         the long-lived shim accepts containerd's connection
  runc create    the shim execs `runc create` ... and it exits
  runc start     the shim execs `runc start` ... and it exits
  ctr exit       ctr returns

and prints the median of each moment and of each step between them. A run
without tracing is timed beside each traced one (the "untraced" medians on the
first line), so the tracing's own cost shows. Needs root and tracefs at
/sys/kernel/tracing; other processes on the machine are left out by ancestry.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness installed

import harness

TRACEFS = "/sys/kernel/tracing"
EVENTS = ("sched/sched_process_exec", "sched/sched_process_fork", "sched/sched_process_exit",
          "syscalls/sys_exit_accept4", "syscalls/sys_enter_connect")
LINE = re.compile(r"^\s*(.*?)-(\d+)\s+\(\s*(\S+)\)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+)(: | -> |\()(.*)$")
SHORT = {harness.PYSHIM: "pyshim", harness.RUNC: "runc-v2 (Go)"}


class Trace:
    """A private tracefs instance with our events, on CLOCK_MONOTONIC."""

    def __init__(self) -> None:
        if not os.path.isdir(os.path.join(TRACEFS, "instances")):
            # A fresh machine may have tracefs unmounted: mount it (left mounted,
            # as the kernel's own mount point expects).
            r = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"tracefs is not mounted at {TRACEFS} and cannot be: {r.stderr.strip()}")
        self.dir = os.path.join(TRACEFS, "instances", f"pyshim-breakdown-{os.getpid()}")
        os.mkdir(self.dir)
        self._write("buffer_size_kb", "16384")
        self._write("trace_clock", "mono")
        self._write("options/record-tgid", "1")
        for ev in EVENTS:
            self._write(f"events/{ev}/enable", "1")

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(value)

    def clear(self) -> None:
        self._write("trace", "")

    def events(self) -> list[tuple[float, int, int, str, dict[str, str]]]:
        """(time s, pid, tgid, event, fields) in time order."""
        out = []
        with open(os.path.join(self.dir, "trace")) as f:
            for line in f:
                m = LINE.match(line)
                if not m:
                    continue
                _, pid, tgid, ts, name, sep, rest = m.groups()
                if sep == " -> ":  # a syscall's exit: sys_accept4 -> 0x5
                    fields = {"ret": rest.strip()}
                else:
                    fields = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
                out.append((float(ts), int(pid), int(tgid) if tgid.isdigit() else -1, name, fields))
        return sorted(out, key=lambda e: e[0])  # stable: same-time events keep their order

    def close(self) -> None:
        for ev in EVENTS:
            self._write(f"events/{ev}/enable", "0")
        os.rmdir(self.dir)


def moments(events, t0: float, t_end: float, runtime: str, containerd: int,
            template: int | None, spares: frozenset[int] = frozenset()) -> dict[str, float]:
    """The named moments of one run, in ms after t0 (missing ones left out).
    `spares`: pyshim's spare shims alive before the run; the shim is the
    first of them, or of the template's children forked during the run, to
    accept a connection.

    Only containerd, pyshim's template and their descendants count: other containerds on the machine run runc and shims too."""
    shim_name = "containerd-shim-pyshim-v1" if runtime == harness.PYSHIM else "containerd-shim-runc-v2"
    out: dict[str, float] = {"ctr exit": (t_end - t0) * 1e3}

    def ms(t: float) -> float:
        return round((t - t0) * 1e3, 2)

    ours = {containerd, template} | set(spares)
    start_pid = shim_pid = None
    forked: dict[int, float] = {}  # pyshim: the template's children forked during the run
    runc: list[int] = []
    for t, pid, tgid, name, f in events:
        if pid not in ours and tgid not in ours:
            continue
        if name == "sched_process_fork":
            ours.add(int(f["child_pid"]))
            if runtime == harness.PYSHIM and template is not None and tgid == template \
                    and start_pid is not None and shim_pid is None and t >= t0:
                forked[int(f["child_pid"])] = t
            continue
        if t < t0:
            continue
        if name == "sched_process_exec":
            fn = f.get("filename", "")
            p = int(f["pid"])
            if start_pid is None and fn.endswith(shim_name):
                start_pid = p
                out["start exec"] = ms(t)
            elif p == start_pid and runtime == harness.PYSHIM and "py exec" not in out:
                out["py exec"] = ms(t)
            elif runtime == harness.RUNC and fn.endswith(shim_name) and shim_pid is None:
                shim_pid = p
                out["shim forked"] = ms(t)
            elif fn.endswith("/runc") and shim_pid is not None and len(runc) < 2:
                runc.append(p)
                out["runc create exec" if len(runc) == 1 else "runc start exec"] = ms(t)
            elif fn == "/bin/sleep" and "sleep exec" not in out:
                out["sleep exec"] = ms(t)
        elif name == "sched_process_exit":
            p = int(f.get("pid", -1))
            if p == start_pid and "start exit" not in out:
                out["start exit"] = ms(t)
            elif runc and p == runc[0] and "runc create exit" not in out:
                out["runc create exit"] = ms(t)
            elif len(runc) > 1 and p == runc[1] and "runc start exit" not in out:
                out["runc start exit"] = ms(t)
        elif name == "sys_accept4" and runtime == harness.PYSHIM and shim_pid is None \
                and (tgid in forked or tgid in spares) and int(f.get("ret", "-1"), 0) < 1 << 32:
            shim_pid = tgid
            out["accept"] = ms(t)
            if tgid in forked:
                out["shim forked"] = ms(forked[tgid])
        elif name == "sys_accept4" and shim_pid is not None and tgid == shim_pid \
                and "accept" not in out and int(f.get("ret", "-1"), 0) < 1 << 32:
            out["accept"] = ms(t)
        elif name == "sys_connect" and shim_pid is not None and tgid == shim_pid \
                and "accept" in out and "events connect" not in out:
            out["events connect"] = ms(t)
    return out


ORDER = ["start exec", "py exec", "shim forked", "start exit", "accept", "runc create exec",
         "runc create exit", "events connect", "runc start exec", "sleep exec", "runc start exit",
         "ctr exit"]
STEPS = [("ctr launched -> start exec", None, "start exec"),
         ("start exec -> start exit (address)", "start exec", "start exit"),
         ("  of which launcher -> Python exec (cold only)", "start exec", "py exec"),
         ("  of which start exec -> shim exists", "start exec", "shim forked"),
         ("start exit -> accept", "start exit", "accept"),
         ("accept -> runc create exec", "accept", "runc create exec"),
         ("runc create", "runc create exec", "runc create exit"),
         ("runc create exit -> runc start exec", "runc create exit", "runc start exec"),
         ("runc start", "runc start exec", "runc start exit"),
         ("runc start exit -> ctr exit", "runc start exit", "ctr exit"),
         ("total (ctr run -d)", None, "ctr exit")]


def spares_of(template: int | None) -> frozenset[int]:
    """pyshim's spare shims: the template's children titled `... spare-shim`."""
    return frozenset(harness.spare_shims_of(template)) if template is not None else frozenset()


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def run_once(daemon: harness.Containerd, rootfs: str, runtime: str) -> tuple[float, float]:
    cid = harness.new_id("b")
    args = [harness.CTR, "--address", daemon.address, "-n", daemon.namespace, "run", "-d",
            "--null-io", "--runtime", runtime, "--rootfs", rootfs, cid, "/bin/sleep", "100000"]
    t0 = time.monotonic()
    r = subprocess.run(args, check=False, env=daemon.env, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    t1 = time.monotonic()
    if r.returncode != 0:
        raise SystemExit(f"{runtime}: ctr run -d failed: {r.stderr.strip()}")
    return t0, t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--dump", action="store_true", help="print every run's moments")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if os.geteuid() != 0:
        raise SystemExit("needs root (containerd, runc, tracefs)")
    rows: dict[str, list[dict[str, float]]] = {r: [] for r in (harness.PYSHIM, harness.RUNC)}
    plain: dict[str, list[float]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory(prefix="pysh-brk-") as tmp:
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        with harness.Containerd(log_level="warn") as daemon:
            trace = Trace()
            try:
                for runtime in rows:  # warm: pyshim's template, both binaries' pages
                    run_once(daemon, rootfs, runtime)
                shims = harness.shim_pids(daemon, harness.PYSHIM)
                template = ppid(shims[0]) if shims else None  # the shims' parent
                for i in range(args.runs):
                    for runtime, runs in rows.items():
                        t0, t1 = run_once(daemon, rootfs, runtime)
                        plain[runtime].append((t1 - t0) * 1e3)
                        spares = spares_of(template)
                        trace.clear()
                        t0, t1 = run_once(daemon, rootfs, runtime)
                        m = moments(trace.events(), t0, t1, runtime, daemon.pid, template, spares)
                        runs.append(m)
                        if args.dump:
                            print(SHORT[runtime], i, {k: m[k] for k in ORDER if k in m})
                    if i % 5 == 4:
                        daemon.remove_all()
            finally:
                trace.close()
                daemon.remove_all()

    def med(runtime: str, a: str | None, b: str) -> str:
        vals = [m[b] - (m[a] if a else 0.0) for m in rows[runtime] if b in m and (a is None or a in m)]
        return f"{statistics.median(vals):.1f}" if vals else "-"

    names = list(rows)
    print(on_platform.caption())
    print(f"Medians of {args.runs} runs, ms. "
          f"Untraced `ctr run -d`: " + ", ".join(f"{SHORT[r]} {statistics.median(plain[r]):.0f}"
                                                 for r in names))
    print()
    print("| step | " + " | ".join(SHORT[r] for r in names) + " |")
    print("|---|" + "---|" * len(names))
    for label, a, b in STEPS:
        print(f"| {label} | " + " | ".join(med(r, a, b) for r in names) + " |")
    print()
    print(on_platform.caption())
    print("| moment (ms after ctr launched) | " + " | ".join(SHORT[r] for r in names) + " |")
    print("|---|" + "---|" * len(names))
    for k in ORDER:
        print(f"| {k} | " + " | ".join(med(r, None, k) for r in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

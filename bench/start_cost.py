#!/usr/bin/env python3
"""What a container start costs with pyshim against the Go shim, on one containerd.

    python3 bench/start_cost.py [--runs 30] [--concurrent 50] [--rounds 3] [--cpu-runs 20]
                                [--platform host|containerd2|debian13]

Three figures, the two runtimes alternating run by run under one private containerd
(tests/harness.py), after one warm-up start each (pyshim's template, both binaries' pages):

  ctr run -d    median wall time of `ctr run -d --null-io --rootfs <busybox> ID /bin/sleep`
                over --runs runs each
  concurrent    median over --rounds of the wall time until --concurrent such `ctr run -d`,
                launched at once, have all returned
  start CPU     median CPU time of one `start`, from the kernel's sched_stat_runtime events
                (a private tracefs instance): every thread of the `start` process (pyshim's
                native launcher and any Python it execs; the Go shim's `start` with all its
                threads) and of anything it forks except the long-lived shim, plus, for
                pyshim, the CPU during that `ctr run` of the warm template, of its start
                helper (which does the start's work) and of any process the template
                forks for a start's work when the helper cannot take it (it exits; the
                shim does not).
                The long-lived shim each start leaves is not counted, for either runtime.

Beside them, from the same traces: the CPU of that long-lived shim during the run and of
what it ran (runc create/start, runc init), which is where the rest of `ctr run -d` goes.

Each figure is printed with the ratio pyshim / Go shim. Needs root and tracefs at
/sys/kernel/tracing (mount -t tracefs nodev /sys/kernel/tracing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness installed

import harness  # noqa: E402
import start_breakdown  # noqa: E402
from bench import concurrent  # noqa: E402

RUNTIMES = (harness.PYSHIM, harness.RUNC)
SHORT = start_breakdown.SHORT


class CpuTrace(start_breakdown.Trace):
    """start_breakdown's tracefs instance with the scheduler's runtime accounting too."""

    def __init__(self) -> None:
        start_breakdown.EVENTS += ("sched/sched_stat_runtime",)
        super().__init__()


def cpu_ms(events, t0: float, runtime: str, containerd: int, template: int | None,
           helpers: frozenset[int] = frozenset(),
           spares: frozenset[int] = frozenset()) -> dict[str, float] | None:
    """CPU ms of one traced run: "start" (see the module docstring), "shim" (the
    long-lived shim it left, during the run) and "runc" (everything the shim ran:
    runc create/start, runc init, the container's first moments); None if the
    trace holds no `start` of `runtime`. `spares`: pyshim's spare shims alive
    before the run (the one the start used is that run's shim; the spare the
    template makes during the run is counted with the shim too: each start
    costs one spare's set-up)."""
    shim_name = harness.shim_binary(runtime)
    ours = {containerd} | ({template} if template else set()) | set(spares)
    start = None
    counted: set[int] = set()  # tgids whose CPU is start's
    daemon: set[int] = set(spares)  # the long-lived shim: not start's
    below: set[int] = set()  # what the shim forked
    cpu_ns = {"start": 0, "template": 0, "shim": 0, "runc": 0}
    # The template may fork two processes for a warm start: the one that does the
    # start's work and exits, then the shim or the next spare shim (which lives on).
    forked: dict[int, int] = {}  # the template's children: their CPU ns
    exited: set[int] = set()
    for t, pid, tgid, name, f in events:
        if name == "sched_process_exit" and int(f.get("pid", -1)) in forked:
            exited.add(int(f["pid"]))
            continue
        if name == "sched_process_fork":
            child = int(f["child_pid"])
            if pid in ours or tgid in ours:
                ours.add(child)
            if tgid in daemon or tgid in below or tgid in forked:
                below.add(child)
            elif tgid in counted:
                counted.add(child)  # start's own helpers; the daemon is taken out at its exec
            elif template is not None and tgid == template and start is not None:
                forked[child] = 0  # start's worker or the shim (see above)
            continue
        if t < t0 or not (pid in ours or tgid in ours or tgid in helpers):
            continue
        if name == "sched_process_exec":
            p = int(f["pid"])
            if start is None and f.get("filename", "").endswith(shim_name):
                start = p
                counted.add(p)
            elif p != start and p in counted:
                counted.discard(p)  # start's child became the long-lived shim (the Go shim)
                daemon.add(p)
        elif name == "sched_stat_runtime" and int(f.get("pid", -1)) == pid:
            if tgid in forked:
                forked[tgid] += int(f["runtime"])
            elif tgid in daemon:
                cpu_ns["shim"] += int(f["runtime"])
            elif tgid in below:
                cpu_ns["runc"] += int(f["runtime"])
            elif tgid in counted:
                cpu_ns["start"] += int(f["runtime"])
            elif template is not None and tgid == template or tgid in helpers:
                cpu_ns["template"] += int(f["runtime"])
    if start is None:
        return None
    for child, ns in forked.items():
        cpu_ns["start" if child in exited else "shim"] += ns
    return {"start": (cpu_ns["start"] + cpu_ns["template"]) / 1e6, "shim": cpu_ns["shim"] / 1e6,
            "runc": cpu_ns["runc"] / 1e6}


def helpers_of(template: int | None) -> frozenset[int]:
    """pyshim's start helper: the template's child titled `... start-helper`."""
    return frozenset(harness.start_helpers_of(template)) if template is not None else frozenset()


def run_d(daemon: harness.Containerd, rootfs: str, runtime: str) -> tuple[float, float]:
    """(monotonic launch time, seconds) of one `ctr run -d`."""
    t0, _ = start_breakdown.run_once(daemon, rootfs, runtime)
    return t0, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-runs", type=int, default=20)
    ap.add_argument("--dump", action="store_true", help="print every measurement")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if os.geteuid() != 0:
        raise SystemExit("needs root (containerd, runc, tracefs)")
    wall: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    conc: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    cpu: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    shim_cpu: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    runc_cpu: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    with tempfile.TemporaryDirectory(prefix="pysh-cost-") as tmp:
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        with harness.Containerd(log_level="warn") as daemon:
            try:
                for runtime in RUNTIMES:
                    run_d(daemon, rootfs, runtime)
                shims = harness.shim_pids(daemon, harness.PYSHIM)
                template = start_breakdown.ppid(shims[0]) if shims else None
                if template is None or not harness.is_template_argv(harness.cmdline(template)):
                    raise SystemExit("pyshim's shim has no warm template for a parent: "
                                     "these figures would not be of the warm start")
                for i in range(args.runs):
                    for runtime in RUNTIMES:
                        wall[runtime].append(run_d(daemon, rootfs, runtime)[1] * 1e3)
                    if i % 10 == 9:
                        daemon.remove_all()
                daemon.remove_all()
                for _ in range(args.rounds):
                    for runtime in RUNTIMES:
                        conc[runtime].append(concurrent(daemon, rootfs, runtime, args.concurrent))
                trace = CpuTrace()
                try:
                    for i in range(args.cpu_runs):
                        for runtime in RUNTIMES:
                            spares = start_breakdown.spares_of(template)
                            trace.clear()
                            t0, _ = run_d(daemon, rootfs, runtime)
                            ms = cpu_ms(trace.events(), t0, runtime, daemon.pid, template,
                                        helpers_of(template), spares)
                            if ms is not None:
                                cpu[runtime].append(ms["start"])
                                shim_cpu[runtime].append(ms["shim"])
                                runc_cpu[runtime].append(ms["runc"])
                        if i % 10 == 9:
                            daemon.remove_all()
                finally:
                    trace.close()
            finally:
                daemon.remove_all()

    def med(xs: list[float], fmt: str) -> str:
        return format(statistics.median(xs), fmt) if xs else "-"

    def ratio(d: dict[str, list[float]]) -> str:
        a, b = d[harness.PYSHIM], d[harness.RUNC]
        return f"{statistics.median(a) / statistics.median(b):.2f}" if a and b else "-"

    if args.dump:
        for name, d in (("ctr run -d ms", wall), ("concurrent s", conc), ("start CPU ms", cpu),
                        ("shim CPU ms", shim_cpu), ("runc CPU ms", runc_cpu)):
            for runtime in RUNTIMES:
                print(name, SHORT[runtime], " ".join(f"{x:.1f}" for x in d[runtime]))
    print(on_platform.caption())
    print(f"| figure (median) | {SHORT[harness.PYSHIM]} | {SHORT[harness.RUNC]} | pyshim / Go |")
    print("|---|---|---|---|")
    print(f"| `ctr run -d`, ms ({args.runs} runs each) | {med(wall[harness.PYSHIM], '.1f')} | "
          f"{med(wall[harness.RUNC], '.1f')} | {ratio(wall)} |")
    print(f"| {args.concurrent} concurrent `ctr run -d`, s ({args.rounds} rounds) | "
          f"{med(conc[harness.PYSHIM], '.2f')} | {med(conc[harness.RUNC], '.2f')} | {ratio(conc)} |")
    print(f"| CPU of one `start`, ms ({len(cpu[harness.PYSHIM])}/{len(cpu[harness.RUNC])} runs) | "
          f"{med(cpu[harness.PYSHIM], '.2f')} | {med(cpu[harness.RUNC], '.2f')} | {ratio(cpu)} |")
    print(f"| (beside) CPU of the shim during that `ctr run -d`, ms | {med(shim_cpu[harness.PYSHIM], '.2f')} | "
          f"{med(shim_cpu[harness.RUNC], '.2f')} | {ratio(shim_cpu)} |")
    print(f"| (beside) CPU of what the shim ran (runc, runc init), ms | {med(runc_cpu[harness.PYSHIM], '.2f')} | "
          f"{med(runc_cpu[harness.RUNC], '.2f')} | {ratio(runc_cpu)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

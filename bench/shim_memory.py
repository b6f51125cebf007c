#!/usr/bin/env python3
"""Runs idle containers through pyshim and through containerd-shim-runc-v2 under
one private containerd, and prints each shim's memory side by side.

    python3 bench/shim_memory.py [-n N] [--host-ksm] [--json FILE]
                                 [--platform host|containerd2|debian13]

For each runtime, N detached busybox containers (`sleep`) are started with
`ctr run -d --rootfs`; then every long-lived shim process of that runtime is
read from /proc/PID/smaps_rollup (RSS, PSS, USS = private clean + dirty) and
/proc/PID/status (threads). PSS is the fair share: pages shared between shims
(the interpreter, libraries) are divided among them, so sum(PSS)/N is the
memory one more container costs. pyshim's warm template (the process its shims
are forked from) is counted in pyshim's sum.

--host-ksm runs the host's ksmd (/sys/kernel/mm/ksm/run = 1) for the run, at the
host's own scan settings, and puts the previous value back afterwards, also when the
run fails. pyshim itself never writes these settings; with ksmd on, its shims offer
their memory for merging (`ksm = "auto"`). The figures are then taken once ksmd has
made two more full scans after the last container started (it merges a page on the
second scan that finds it unchanged), or after BENCH_KSM_WAIT_SECONDS (default 300).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness installed

import harness

from bench import long_lived_shims, smaps_rollup, templates_of


KSM = "/sys/kernel/mm/ksm"


def ksm_read(name: str) -> str:
    with open(os.path.join(KSM, name)) as f:
        return f.read().strip()


@contextlib.contextmanager
def host_ksm_on() -> Iterator[None]:
    """The host's ksmd running for the block; its previous `run` value put back after."""
    before = ksm_read("run")
    with open(os.path.join(KSM, "run"), "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(os.path.join(KSM, "run"), "w") as f:
            f.write(before)


def ksm_settle() -> dict:
    """Waits until ksmd has merged what it will: at least two full scans, and then
    until a full scan adds less than 2% to the pages it shares. Returns how it went."""
    deadline = time.monotonic() + float(os.environ.get("BENCH_KSM_WAIT_SECONDS", "300"))
    t0 = time.monotonic()
    first = scans = int(ksm_read("full_scans"))
    sharing = int(ksm_read("pages_sharing"))

    def next_scan(after: int) -> int:
        n = int(ksm_read("full_scans"))
        return n if n > after else 0

    while time.monotonic() < deadline:
        scans = harness.wait_for(lambda: next_scan(scans), max(deadline - time.monotonic(), 0.1),
                                 interval=0.5, message="ksmd made no full scan")
        now = int(ksm_read("pages_sharing"))
        grown, sharing = now - sharing, now
        if scans - first >= 2 and grown <= 0.02 * now:
            break
    return {"ksm_full_scans": scans - first, "ksm_pages_sharing": sharing,
            "ksm_settle_s": round(time.monotonic() - t0, 1)}


def measure(daemon: harness.Containerd, rootfs: str, runtime: str, n: int, ksm: bool = False) -> dict:
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
    # Pacing, not a wait: let start-up garbage settle as it would on a node; with host
    # KSM on, give ksmd time to scan (BENCH_SETTLE_SECONDS, default 1).
    time.sleep(float(os.environ.get("BENCH_SETTLE_SECONDS", "1")))
    settled = ksm_settle() if ksm else {}
    pids = long_lived_shims(daemon, runtime)
    figures = [f for f in map(smaps_rollup, pids) if f]
    # The template is part of what pyshim costs: its PSS counts in the sum.
    extra = [f for f in map(smaps_rollup, templates_of(pids)) if f]
    daemon.remove_all()
    pss = sum(f["pss"] for f in figures + extra)
    return {
        "runtime": runtime,
        "host_ksm": ksm,
        "containers": n,
        "shims": len(pids),
        "template_pss_kb": sum(f["pss"] for f in extra),
        "pss_per_container_kb": round(pss / n),
        "rss_per_shim_kb": round(statistics.mean(f["rss"] for f in figures)),
        "uss_per_shim_kb": round(statistics.mean(f["uss"] for f in figures)),
        "threads_per_shim": round(statistics.mean(f["threads"] for f in figures), 1),
        "ctr_run_d_median_ms": round(statistics.median(latencies) * 1000, 1),
        **settled,
    }


def verdict(rows: list[dict]) -> list[str]:
    """The result in words: pyshim's PSS per container against the Go shim's, on this
    platform's containerd and Python, and what PSS is."""
    by = {r["runtime"]: r for r in rows}
    ours, go = by[harness.PYSHIM]["pss_per_container_kb"], by[harness.RUNC]["pss_per_container_kb"]
    version = ".".join(map(str, harness.containerd_version()))
    return [
        (f"pyshim: {ours / 1024:.2f} MB per container, {ours / go:.2f}x the Go shim's "
        f"({go / 1024:.2f} MB) on containerd {version} (platform {harness.PLATFORM}, "
        f"Python {sys.version.split()[0]}, N={by[harness.PYSHIM]['containers']})"),
        ("PSS: each process's private memory plus its share of every page it shares (a page "
        "shared by 10 shims counts 1/10 to each), so the sum over shims (pyshim's template "
        "included) divided by N is what one container's shim costs."),
    ]


def write_plot(rows: list[dict], path: str) -> None:
    """A bar per shim: PSS per container, pyshim's split into its shims and its template."""
    w, h, left, top, bar = 520, 260, 70, 30, 120
    top_kb = max(r["pss_per_container_kb"] for r in rows) * 1.15 or 1

    def y(kb: float) -> float:
        return top + (h - top - 40) * (1 - kb / top_kb)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           'font-size="12">'),
           (f'<text x="{left}" y="18">PSS per container, N={rows[0]["containers"]}, '
           f'containerd {".".join(map(str, harness.containerd_version()))}</text>'),
           f'<line x1="{left}" y1="{y(0)}" x2="{w - 20}" y2="{y(0)}" stroke="black"/>']
    for i, r in enumerate(rows):
        x = left + 40 + i * (bar + 80)
        total = r["pss_per_container_kb"]
        template = r["template_pss_kb"] / r["containers"]
        name = "pyshim" if r["runtime"] == harness.PYSHIM else "Go shim"
        out.append(f'<rect x="{x}" y="{y(total - template)}" width="{bar}" '
                   f'height="{y(0) - y(total - template)}" fill="#4477aa"/>')
        if template:
            out.append(f'<rect x="{x}" y="{y(total)}" width="{bar}" height="{y(total - template) - y(total)}" '
                       'fill="#88bbee"><title>template share</title></rect>')
        out.append(f'<text x="{x}" y="{y(total) - 5}">{total / 1024:.2f} MB</text>')
        out.append(f'<text x="{x}" y="{y(0) + 16}">{name}</text>')
    out.append(f'<text x="{left}" y="{h - 6}">light: the warm template\'s share</text></svg>')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5, help="containers per runtime (default 5)")
    ap.add_argument("--host-ksm", action="store_true",
                    help="run the host's ksmd for the run (its previous setting is put back)")
    ap.add_argument("--json", help="write the results to this file "
                                   "(default bench/out/PLATFORM/shim_memory.json)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if os.geteuid() != 0:
        raise SystemExit("needs root (it runs containerd and runc)")
    rows = []
    with contextlib.ExitStack() as stack:
        if args.host_ksm:
            stack.enter_context(host_ksm_on())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pysh-bench-"))
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        daemon = stack.enter_context(harness.Containerd(log_level="info"))
        for runtime in (harness.PYSHIM, harness.RUNC):
            rows.append(measure(daemon, rootfs, runtime, args.n, args.host_ksm))
    cols = ["runtime", "host_ksm", "containers", "shims", "template_pss_kb", "pss_per_container_kb", "rss_per_shim_kb",
            "uss_per_shim_kb", "threads_per_shim", "ctr_run_d_median_ms"]
    print(on_platform.caption())
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    path = args.json or os.path.join(on_platform.out_dir(), "shim_memory.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows, "measured_on": on_platform.info()}, f, indent=2)
    plot = os.path.join(on_platform.out_dir(), "shim_memory.svg")
    write_plot(rows, plot)
    print()
    print("\n".join(verdict(rows)))
    print(f"wrote {os.path.relpath(path)}; plot: {os.path.relpath(plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""pyshim beside containerd-shim-runc-v2, in one run under one private containerd.

    python3 bench/bench.py [--sizes 1,10,50] [--latency-runs 20] [--concurrent 50]
                           [--out DIR] [--platform host|containerd2|debian13]

Measures, for both runtimes:
  * memory at each N (one shim per container): per-process RSS, USS and PSS of the
    shims (/proc/PID/smaps_rollup), sum(PSS)/N with pyshim's warm template counted
    in, threads per shim, and the drop of MemAvailable per container;
  * grouped mode (every container in one group, one shim for all): what each extra
    container adds to the shim's PSS;
  * latency: `ctr run -d` (median and p90 of --latency-runs starts), `ctr task exec`
    (median and p90), and the wall time of --concurrent starts launched at once.
Prints markdown tables, each headed by the platform, containerd and Python versions,
and writes results.json and memory.svg (PSS per container against N) into --out
(default bench/out/PLATFORM/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness installed

import harness
from harness import smaps_rollup

RUNTIMES = (harness.PYSHIM, harness.RUNC)
SHORT = {harness.PYSHIM: "pyshim", harness.RUNC: "runc-v2 (Go)"}


# ------------------------------------------------------------------------ /proc readers


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def long_lived_shims(daemon: harness.Containerd, runtime: str) -> list[int]:
    return [p for p in harness.shim_pids(daemon, runtime)
            if harness.cmdline(p)[-1:] not in (["start"], ["delete"])]


def templates_of(shims: list[int]) -> list[int]:
    """pyshim's warm template processes these shims were forked from, the
    start helper of each (its child titled `... start-helper`) and its spare
    shim (`... spare-shim`): all are part of what pyshim costs."""
    out = set()
    for pid in shims:
        parent = ppid(pid)
        argv = harness.cmdline(parent)
        # python [-IS] .../containerd-shim-pyshim-v1 template
        if "template" in argv[2:4] and any("pyshim" in a for a in argv[1:3]):
            out.add(parent)
    for template in list(out):
        out.update(harness.start_helpers_of(template))
        out.update(harness.spare_shims_of(template))
    return sorted(out)


# ------------------------------------------------------------------------ measurements


def ctr_run_d(daemon: harness.Containerd, rootfs: str, runtime: str, cid: str,
              annotations: dict[str, str] | None = None) -> float:
    """Seconds `ctr run -d` took; raises if it failed."""
    args = ["run", "-d", "--null-io", "--runtime", runtime]
    for k, v in (annotations or {}).items():
        args += ["--annotation", f"{k}={v}"]
    t0 = time.monotonic()
    r = daemon.ctr(*args, "--rootfs", rootfs, cid, "/bin/sleep", "100000", timeout=120)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{runtime}: ctr run -d {cid} failed: {r.stderr.strip()}")
    return took


def memory_at(daemon: harness.Containerd, rootfs: str, runtime: str, n: int,
              grouped: bool) -> dict:
    """Starts n idle containers (one group if `grouped`) and reads the shims' memory."""
    group = {"io.containerd.runc.v2.group": harness.new_id("grp")} if grouped else None
    before = mem_available_kb()
    for _ in range(n):
        ctr_run_d(daemon, rootfs, runtime, harness.new_id("m"), group)
    time.sleep(1.5)  # pacing, not a wait: let start-up settle as it would on a node
    after = mem_available_kb()
    shims = long_lived_shims(daemon, runtime)
    tmpl = templates_of(shims)
    figs = [f for f in map(smaps_rollup, shims) if f]
    tfigs = [f for f in map(smaps_rollup, tmpl) if f]
    daemon.remove_all()
    pss = sum(f["pss"] for f in figs + tfigs)
    return {
        "runtime": runtime, "mode": "grouped" if grouped else "one shim per container",
        "n": n, "shims": len(figs), "templates": len(tfigs),
        "pss_sum_kb": pss,
        "pss_per_container_kb": round(pss / n),
        "shim_pss_kb": round(statistics.mean(f["pss"] for f in figs)),
        "template_pss_kb": sum(f["pss"] for f in tfigs),
        "rss_per_shim_kb": round(statistics.mean(f["rss"] for f in figs)),
        "uss_per_shim_kb": round(statistics.mean(f["uss"] for f in figs)),
        "threads_per_shim": round(statistics.mean(f["threads"] for f in figs), 1),
        "memavailable_drop_per_container_kb": round((before - after) / n),
    }


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def latency(daemon: harness.Containerd, rootfs: str, runtime: str, runs: int) -> dict:
    """`ctr run -d` and `ctr task exec` latency, in ms."""
    starts = [ctr_run_d(daemon, rootfs, runtime, harness.new_id("l")) for _ in range(runs)]
    target = harness.new_id("x")
    ctr_run_d(daemon, rootfs, runtime, target)
    execs = []
    for i in range(runs):
        t0 = time.monotonic()
        r = daemon.ctr("task", "exec", "--exec-id", f"e{i}", target, "/bin/true", timeout=60)
        execs.append(time.monotonic() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{runtime}: exec failed: {r.stderr.strip()}")
    daemon.remove_all()
    ms = 1000.0
    return {
        "runtime": runtime,
        "run_d_median_ms": round(statistics.median(starts) * ms, 1),
        "run_d_p90_ms": round(pct(starts, 0.9) * ms, 1),
        "exec_median_ms": round(statistics.median(execs) * ms, 1),
        "exec_p90_ms": round(pct(execs, 0.9) * ms, 1),
    }


def concurrent(daemon: harness.Containerd, rootfs: str, runtime: str, n: int) -> float:
    """Seconds until n `ctr run -d` launched at once have all returned."""
    procs = []
    t0 = time.monotonic()
    for _ in range(n):
        argv = [harness.CTR, "--address", daemon.address, "-n", daemon.namespace, "run", "-d",
                "--null-io", "--runtime", runtime, "--rootfs", rootfs, harness.new_id("c"),
                "/bin/sleep", "100000"]
        procs.append(subprocess.Popen(argv, env=daemon.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode:
            errors.append(err.decode(errors="replace").strip())
    took = time.monotonic() - t0
    daemon.remove_all()
    if errors:
        raise SystemExit(f"{runtime}: {len(errors)} of {n} concurrent starts failed: {errors[0]}")
    return took


# ------------------------------------------------------------------------------ output


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) for _, k in cols) + " |")
    return "\n".join(lines)


def svg_plot(series: dict[str, list[tuple[int, float]]], path: str) -> None:
    """A line chart of PSS per container (MB) against N, written by hand as SVG."""
    w, h, left, right, top, bottom = 640, 400, 70, 190, 30, 50
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ymax = max(y for pts in series.values() for _, y in pts) * 1.15 or 1

    def px(x: int) -> float:
        i = xs.index(x)
        return left + (w - left - right) * (i / max(1, len(xs) - 1))

    def py(y: float) -> float:
        return top + (h - top - bottom) * (1 - y / ymax)

    def color(name: str) -> str:  # one colour per runtime; grouped mode is dashed
        return "#d62728" if name.startswith("pyshim") else "#1f77b4"

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            'font-family="sans-serif" font-size="12">'),
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">Shim memory per container (sum of PSS / N)</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for i in range(6):
        y = ymax * i / 5
        out.append(f'<text x="{left - 8}" y="{py(y) + 4:.0f}" text-anchor="end">{y:.1f}</text>')
        out.append(f'<line x1="{left}" y1="{py(y):.0f}" x2="{w - right}" y2="{py(y):.0f}" '
                   'stroke="#ddd"/>')
    for x in xs:
        out.append(f'<text x="{px(x):.0f}" y="{h - bottom + 18}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 12}" text-anchor="middle">'
               'containers (N)</text>')
    out.append(f'<text x="16" y="{(top + h - bottom) / 2:.0f}" transform="rotate(-90 16 '
               f'{(top + h - bottom) / 2:.0f})" text-anchor="middle">MB per container</text>')
    for k, (name, pts) in enumerate(series.items()):
        c = color(name)
        dash = ' stroke-dasharray="6 4"' if "grouped" in name else ""
        d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
        ly = top + 20 + 20 * k
        out.append(f'<line x1="{w - right + 10}" y1="{ly}" x2="{w - right + 30}" y2="{ly}" '
                   f'stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{w - right + 36}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,10,50", help="N values (default 1,10,50)")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=50)
    ap.add_argument("--out", help="output directory (default bench/out/PLATFORM)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if os.geteuid() != 0:
        raise SystemExit("needs root (it runs containerd and runc)")
    sizes = [int(s) for s in args.sizes.split(",")]
    args.out = args.out or on_platform.out_dir()
    os.makedirs(args.out, exist_ok=True)
    mem_rows: list[dict] = []
    lat_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pysh-bench-") as tmp:
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        with harness.Containerd(log_level="warn") as daemon:
            # The first pyshim start also launches the warm template: timed apart.
            first = ctr_run_d(daemon, rootfs, harness.PYSHIM, harness.new_id("first"))
            daemon.remove_all()
            for runtime in RUNTIMES:
                for n in sizes:
                    mem_rows.append(memory_at(daemon, rootfs, runtime, n, grouped=False))
                for n in sizes:
                    mem_rows.append(memory_at(daemon, rootfs, runtime, n, grouped=True))
                row = latency(daemon, rootfs, runtime, args.latency_runs)
                row["concurrent_n"] = args.concurrent
                row["concurrent_s"] = round(concurrent(daemon, rootfs, runtime, args.concurrent), 2)
                lat_rows.append(row)
    for r in mem_rows:
        r["name"] = SHORT[r["runtime"]]
        r["pss_per_container_mb"] = round(r["pss_per_container_kb"] / 1024, 2)
    for r in lat_rows:
        r["name"] = SHORT[r["runtime"]]

    # Grouped mode: what one more container adds to its group's shim.
    grouped = {}
    for runtime in RUNTIMES:
        g = {r["n"]: r for r in mem_rows if r["runtime"] == runtime and r["mode"] == "grouped"}
        if len(g) >= 2:
            lo, hi = min(g), max(g)
            grouped[runtime] = round((g[hi]["pss_sum_kb"] - g[lo]["pss_sum_kb"]) / (hi - lo))
    caption = on_platform.caption()
    print(caption)
    print(table([r for r in mem_rows if r["mode"] != "grouped"], [
        ("shim", "name"), ("N", "n"), ("shims", "shims"), ("PSS/container MB", "pss_per_container_mb"),
        ("template PSS kB", "template_pss_kb"), ("PSS/shim kB", "shim_pss_kb"),
        ("RSS/shim kB", "rss_per_shim_kb"), ("USS/shim kB", "uss_per_shim_kb"),
        ("threads/shim", "threads_per_shim"),
        ("MemAvailable drop/container kB", "memavailable_drop_per_container_kb")]))
    print()
    print(caption)
    print(table([r for r in mem_rows if r["mode"] == "grouped"], [
        ("shim (grouped)", "name"), ("N", "n"), ("shims", "shims"),
        ("PSS/container MB", "pss_per_container_mb"), ("sum PSS kB", "pss_sum_kb")]))
    for runtime, kb in grouped.items():
        print(f"- grouped, {SHORT[runtime]}: each extra container adds {kb} kB of PSS")
    print()
    print(caption)
    print(table(lat_rows, [
        ("shim", "name"), ("run -d median ms", "run_d_median_ms"), ("run -d p90 ms", "run_d_p90_ms"),
        ("exec median ms", "exec_median_ms"), ("exec p90 ms", "exec_p90_ms"),
        (f"{args.concurrent} concurrent starts s", "concurrent_s")]))
    print(f"\nfirst pyshim start (launches the warm template): {first * 1000:.0f} ms")

    result = {"memory": mem_rows, "latency": lat_rows, "grouped_extra_container_kb": grouped,
              "first_pyshim_start_ms": round(first * 1000, 1), "sizes": sizes,
              "measured_on": on_platform.info(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in mem_rows:
        label = r["name"] + (" grouped" if r["mode"] == "grouped" else "")
        series.setdefault(label, []).append((r["n"], r["pss_per_container_mb"]))
    svg_plot(series, os.path.join(args.out, "memory.svg"))
    out = os.path.relpath(args.out)
    print(f"wrote {out}/results.json and {out}/memory.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())

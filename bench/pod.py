#!/usr/bin/env python3
"""Memory per Kubernetes pod and per container through containerd's CRI plugin:
the pyshim runtime handler beside runc's (containerd-shim-runc-v2), one private
containerd, no cluster.

    python3 bench/pod.py [--pods 5] [--containers 3] [--json FILE]
                         [--platform host|containerd2|debian13]

For each handler, --pods host-network pods are run through the CRI API (harness.cri),
each with --containers idle busybox containers (`sleep`) besides its sandbox. CRI groups
a pod's containers into one shim (io.kubernetes.cri.sandbox-id), so there is one shim
per pod for both handlers. Then the PSS of every long-lived shim of the daemon (and of
pyshim's warm template, which its shims are forked from) is summed from
/proc/PID/smaps_rollup and divided by the pods and by the containers (the sandboxes not
counted as containers). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import on_platform

on_platform.ensure()  # re-runs this in the platform's venv, which has harness and grpc

import harness
from harness import cri

from bench import long_lived_shims, mem_available_kb, smaps_rollup, table, templates_of

HANDLERS = {"pyshim": harness.PYSHIM, "runc": harness.RUNC}


def run_pods(client: cri.CriClient, daemon: harness.Containerd, handler: str,
             pods: int, containers: int) -> list[str]:
    """Starts the pods and their containers; returns the pod ids."""
    out = []
    for p in range(pods):
        cfg = cri.pod_config(f"bench-{handler}-{p}", harness.new_id("uid"),
                             os.path.join(daemon.dir, "pods"))
        pod = client.run_pod(cfg, handler)
        for c in range(containers):
            config = cri.container_config(f"c{c}", harness.BUSYBOX_REF, ["/bin/sleep", "100000"])
            client.start_container(client.create_container(pod, cfg, config))
        out.append(pod)
    return out


def measure(client: cri.CriClient, daemon: harness.Containerd, handler: str,
            pods: int, containers: int) -> dict:
    runtime = HANDLERS[handler]
    before = mem_available_kb()
    t0 = time.monotonic()
    ids = run_pods(client, daemon, handler, pods, containers)
    took = time.monotonic() - t0
    time.sleep(1.5)  # pacing, not a wait: let start-up settle as it would on a node
    after = mem_available_kb()
    shims = long_lived_shims(daemon, runtime)
    figs = [f for f in map(smaps_rollup, shims) if f]
    tfigs = [f for f in map(smaps_rollup, templates_of(shims)) if f]
    for pod in ids:
        client.stop_pod(pod)
        client.remove_pod(pod)
    harness.wait_for(lambda: not long_lived_shims(daemon, runtime), 30,
                     message=f"{handler}: shims left after removing the pods")
    pss = sum(f["pss"] for f in figs + tfigs)
    n = pods * containers
    return {
        "handler": handler, "runtime": runtime, "pods": pods, "containers": n,
        "shims": len(figs), "templates": len(tfigs),
        "pss_sum_kb": pss,
        "template_pss_kb": sum(f["pss"] for f in tfigs),
        "pss_per_shim_kb": round(statistics.mean(f["pss"] for f in figs)) if figs else 0,
        "pss_per_pod_kb": round(pss / pods),
        "pss_per_container_kb": round(pss / n),
        "threads_per_shim": round(statistics.mean(f["threads"] for f in figs), 1) if figs else 0,
        "memavailable_drop_per_pod_kb": round((before - after) / pods),
        "run_pods_s": round(took, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=5)
    ap.add_argument("--containers", type=int, default=3, help="containers per pod")
    ap.add_argument("--json", help="write the rows to this file (default bench/out/PLATFORM/pod.json)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if os.geteuid() != 0:
        raise SystemExit("needs root (it runs containerd and runc)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pysh-bench-pod-") as tmp:
        daemon = harness.Containerd(log_level="warn", cri={"runc": harness.RUNC, "pyshim": harness.PYSHIM})
        with daemon:
            for tar, build in (("pause.tar", harness.build_sandbox_image),
                               ("busybox.tar", harness.build_busybox_image)):
                build(os.path.join(tmp, tar))
                daemon.import_image(os.path.join(tmp, tar), namespace=harness.CRI_NAMESPACE)
            with cri.CriClient(daemon.address) as client:
                # A first pyshim pod launches the warm template: not part of the figures.
                measure(client, daemon, "pyshim", 1, 1)
                for handler in HANDLERS:
                    rows.append(measure(client, daemon, handler, args.pods, args.containers))
    for r in rows:
        r["pss_per_pod_mb"] = round(r["pss_per_pod_kb"] / 1024, 2)
        r["pss_per_container_mb"] = round(r["pss_per_container_kb"] / 1024, 2)
    print(on_platform.caption())
    print(table(rows, [
        ("handler", "handler"), ("pods", "pods"), ("containers", "containers"),
        ("shims", "shims"), ("sum PSS kB", "pss_sum_kb"), ("template PSS kB", "template_pss_kb"),
        ("PSS/shim kB", "pss_per_shim_kb"), ("PSS/pod MB", "pss_per_pod_mb"),
        ("PSS/container MB", "pss_per_container_mb"), ("threads/shim", "threads_per_shim"),
        ("MemAvailable drop/pod kB", "memavailable_drop_per_pod_kb"),
        ("run pods s", "run_pods_s")]))
    path = args.json or os.path.join(on_platform.out_dir(), "pod.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "measured_on": on_platform.info()}, f, indent=2)
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an operator runs by hand on a node, checked as they would run it.

- `containerd-shim-pyshim-v1 memory [-json]`: every pyshim process with its figures,
  checked against /proc/PID/smaps_rollup read right after, and the containers each shim
  serves (a group of two, a single one).
"""

from __future__ import annotations

import json
import os
import subprocess

import harness
from harness import PYSHIM, RUNC, Containerd, ctr, new_id, wait_status

import pyshim

GROUP_ANNOTATION = "io.containerd.runc.v2.group"
# PSS and RSS move a little between the report's read and ours (a page faulted in,
# a shim's periodic malloc_trim): this much is the same figure.
SLACK_KB = 256


def run_sleeper(d: Containerd, runtime: str, rootfs: str, cid: str, *flags: str) -> None:
    assert ctr(d, "run", "-d", "--runtime", runtime, *flags, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000") == (0, "", "")
    wait_status(d, cid, "RUNNING")


def report(*args: str) -> subprocess.CompletedProcess:
    """The installed binary, from a clean environment, as an operator runs it."""
    return subprocess.run([harness.shim_binary_path(PYSHIM), "memory", *args], check=False,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_memory_report_lists_every_pyshim_process_with_its_figures(containerd: Containerd,
                                                                    rootfs: str) -> None:
    d = containerd
    group = new_id("grp")
    a, b, single, go = new_id(), new_id(), new_id(), new_id()
    for cid in (a, b):
        run_sleeper(d, PYSHIM, rootfs, cid, "--annotation", f"{GROUP_ANNOTATION}={group}")
    run_sleeper(d, PYSHIM, rootfs, single)
    run_sleeper(d, RUNC, rootfs, go)  # the Go shim is not pyshim's: never listed

    pids = [p for p in harness.shim_pids(d, PYSHIM)] + [
        p for p in harness._pids() if harness.is_template_argv(harness.cmdline(p))]
    res = report("-json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    # Other daemons on this node (other test runs) have shims of this namespace too.
    ours = [p for p in data["processes"] if p["bundle"].startswith(d.state + "/")]
    by_id = {p["id"]: p for p in ours if p["kind"] == "shim"}
    assert set(by_id) == {a, single}, ours  # the group's shim carries its first container's id
    assert sorted(by_id[a]["containers"]) == sorted([a, b]) and by_id[single]["containers"] == [single]
    for cid, p in by_id.items():
        assert p["bundle"] == os.path.join(d.state, harness.TASK_PLUGIN_DIR, d.namespace, cid), p
        assert p["pid"] in harness.shim_pids(d, PYSHIM)
    go_pids = set(harness.shim_pids(d, RUNC))
    assert not go_pids & {p["pid"] for p in data["processes"]}
    # The warm template that forked our shims is a pyshim process too. (Other tests on
    # this node start and stop templates of their own while this runs: only ours is
    # compared below.)
    with open(f"/proc/{by_id[a]['pid']}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    templates = [p for p in data["processes"] if p["kind"] == "template" and p["pid"] == parent]
    assert templates, ("the template that forked our shims is not listed", parent, data["processes"])

    # The figures, against smaps_rollup read just before and just after: taken in this
    # process, because the report's own interpreter shares pages with the template while
    # it runs (PSS and USS move whenever a process sharing the pages comes or goes).
    before = {p: harness.smaps_rollup(p) for p in pids}
    figures = {p["pid"]: p for p in pyshim.memory_processes()}
    after = {p: harness.smaps_rollup(p) for p in pids}
    for p in ours + templates:
        assert p["pid"] in figures, p
        p = figures[p["pid"]]
        around = [m for m in (before.get(p["pid"]), after.get(p["pid"])) if m]
        assert around, p
        for key, name in (("rss_kb", "rss"), ("pss_kb", "pss"), ("uss_kb", "uss")):
            low, high = min(m[name] for m in around), max(m[name] for m in around)
            assert low - SLACK_KB <= p[key] <= high + SLACK_KB, (key, p, around)

    total = data["total"]
    assert total["processes"] == len(data["processes"])
    assert total["pss_kb"] == sum(p["pss_kb"] for p in data["processes"])
    assert total["containers"] == sum(len(p["containers"]) for p in data["processes"]) >= 3
    assert total["pss_kb_per_container"] == round(total["pss_kb"] / total["containers"])

    table = report()
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["PID", "KIND", "NAMESPACE", "ID", "CONTAINERS", "RSS", "PSS", "USS",
                                "KSM", "PAGES"], lines[0]
    row = next(line.split() for line in lines if line.split()[:1] == [str(by_id[a]["pid"])])
    assert row[1:5] == ["shim", d.namespace, a, "2"], row
    assert any(line.startswith("total: ") and "PSS per container" in line for line in lines), lines
    assert any(line.startswith("PSS counts each shared page once") for line in lines), lines

    assert report("-bogus").returncode == 2


def test_memory_report_with_no_pyshim_running_says_so() -> None:
    """Outside any containerd: valid output either way, never a traceback."""
    res = report("-json")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    data = json.loads(res.stdout)
    assert data["total"]["processes"] == len(data["processes"])

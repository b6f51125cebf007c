"""Parity: Pause/Resume, Update, Stats and OOM events, pyshim against the Go runc shim.

Same pattern as test_e2e.py: every scenario runs once per runtime through a real
containerd, asserts concrete values itself, and pyshim's normalized outcome must equal
the Go shim's (``same_as_runc``). ctr 1.6 has no ``task update``, so Update (and the raw
Stats answer) is driven through pyshim's own TtrpcClient on the shim's socket, for both
shims alike. The pure parts (metrics parsers, the OOM counter, the refusal table) have
unit tests at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import tempfile
import warnings

import harness
import pytest
from harness import (
    LOGGER,
    PYSHIM,
    RUNC,
    RUNTIMES,
    Containerd,
    bundle_of,
    compare_with_runc,
    ctr,
    events,
    exit_warning,
    grpc_module,
    kill_and_remove,
    logger_record,
    new_id,
    norm,
    ok,
    pb_fields,
    pb_message,
    remove,
    run_sleeper,
    run_sleeper_id,
    same_as_runc,
    task_call,
    tasks_call,
    task_row,
    wait_for,
    wait_status,
    write_logger,
)

import pyshim
import pyshim_pb2 as pb


def unknown() -> str:
    """What ctr appends to a shim's error of code Unknown (BEHAVIOURS)."""
    return harness.behaviour().ctr_unknown_suffix


MEMORY_CG = os.path.join(harness.CGROUP_ROOT, "memory")
CPU_CG = os.path.join(harness.CGROUP_ROOT, "cpu")


# ---------------------------------------------------------------------------- helpers


def cgroup_file(d: Containerd, controller: str, cid: str, name: str) -> str:
    with open(os.path.join(harness.CGROUP_ROOT, controller, d.namespace, cid, name)) as f:
        return f.read().strip()


# ------------------------------------------------------------------- Pause / Resume


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pause_resume(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """pause -> PAUSED (and frozen), refusals while paused, resume -> RUNNING,
    refusal of a second resume, events /tasks/paused and /tasks/resumed."""
    def scenario(r: str) -> dict:
        with events(daemon, r) as topics:
            cid, pid = run_sleeper(daemon, r, rootfs)
            res = {"pause": ctr(daemon, "task", "pause", cid)}
            assert res["pause"] == (0, "", "")
            assert task_row(daemon, cid) == (pid, "PAUSED")
            assert cgroup_file(daemon, "freezer", cid, "freezer.state") == "FROZEN"
            res["pause again"] = norm(ctr(daemon, "task", "pause", cid), cid)
            assert res["pause again"] == (1, "", f"ctr: cannot pause a paused container{unknown()}\n")
            res["exec paused"] = norm(ctr(daemon, "task", "exec", "--exec-id", "e1", cid, "/bin/true"), cid)
            assert res["exec paused"] == (1, "", f"ctr: cannot exec in a paused state{unknown()}\n")
            res["resume"] = ctr(daemon, "task", "resume", cid)
            assert res["resume"] == (0, "", "")
            assert task_row(daemon, cid) == (pid, "RUNNING")
            assert cgroup_file(daemon, "freezer", cid, "freezer.state") == "THAWED"
            res["resume again"] = norm(ctr(daemon, "task", "resume", cid), cid)
            assert res["resume again"] == (1, "", f"ctr: cannot resume a running process{unknown()}\n")
            res["exec"] = norm(ctr(daemon, "task", "exec", "--exec-id", "e2", cid, "/bin/echo", "hi"), cid)
            assert res["exec"] == (0, "hi\n", "")
            res.update(kill_and_remove(daemon, cid))
            res["events"] = topics(cid, "/tasks/delete")
        assert res["events"] == ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed",
                                 "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                                 "/tasks/exit", "/tasks/delete"], res["events"]
        return res

    same_as_runc("pause-resume", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_kill_paused(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """A paused task is killed by SIGKILL (runc thaws it), exits 137, STOPPED;
    pause/resume of the stopped task are refused as the Go shim words it."""
    def scenario(r: str) -> dict:
        with events(daemon, r) as topics:
            cid, pid = run_sleeper(daemon, r, rootfs)
            assert ctr(daemon, "task", "pause", cid) == (0, "", "")
            assert task_row(daemon, cid) == (pid, "PAUSED")
            res = {"kill": ctr(daemon, "task", "kill", "-s", "KILL", cid)}
            assert res["kill"] == (0, "", "")
            assert wait_status(daemon, cid, "STOPPED") == pid
            res["pause stopped"] = norm(ctr(daemon, "task", "pause", cid), cid)
            assert res["pause stopped"] == (1, "", f"ctr: cannot pause a stopped container{unknown()}\n")
            res["resume stopped"] = norm(ctr(daemon, "task", "resume", cid), cid)
            assert res["resume stopped"] == (1, "", f"ctr: cannot resume a stopped container{unknown()}\n")
            res.update(remove(daemon, cid))
            assert res["task rm"] == (0, "", exit_warning(137))
            res["events"] = topics(cid, "/tasks/delete")
        assert res["events"] == ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/exit",
                                 "/tasks/delete"], res["events"]
        return res

    same_as_runc("kill-paused", runtime, scenario)


# ---------------------------------------------------------------------------- Update


def update_request(cid: str, resources: dict | bytes) -> pb.UpdateTaskRequest:
    req = pb.UpdateTaskRequest(id=cid)
    req.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    req.resources.value = resources if isinstance(resources, bytes) else json.dumps(resources).encode()
    return req


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_update(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """Update through the shim socket changes the cgroup (memory limit, cpu shares),
    also while paused; a stopped task's Update is refused."""
    def scenario(r: str) -> dict:
        cid, _ = run_sleeper(daemon, r, rootfs, "--memory-limit", "50000000")
        res = {"limit before": cgroup_file(daemon, "memory", cid, "memory.limit_in_bytes")}
        assert res["limit before"] == str(50000000 // 4096 * 4096)
        res["update"] = task_call(daemon, cid, "Update", update_request(
            cid, {"memory": {"limit": 104857600}, "cpu": {"shares": 512}}))
        assert res["update"] == b""
        res["limit"] = cgroup_file(daemon, "memory", cid, "memory.limit_in_bytes")
        res["shares"] = cgroup_file(daemon, "cpu", cid, "cpu.shares")
        assert (res["limit"], res["shares"]) == ("104857600", "512")
        assert ctr(daemon, "task", "pause", cid) == (0, "", "")
        res["update paused"] = task_call(daemon, cid, "Update", update_request(
            cid, {"cpu": {"shares": 256}}))
        assert res["update paused"] == b""
        assert cgroup_file(daemon, "cpu", cid, "cpu.shares") == "256"
        assert ctr(daemon, "task", "resume", cid) == (0, "", "")
        res["update unknown"] = task_call(daemon, cid, "Update", update_request("nope", {}))
        assert res["update unknown"][0] == pyshim.NOT_FOUND
        res["update unknown"] = res["update unknown"][0]
        assert ctr(daemon, "task", "kill", "-s", "KILL", cid) == (0, "", "")
        wait_status(daemon, cid, "STOPPED")
        res["update stopped"] = task_call(daemon, cid, "Update", update_request(cid, {"cpu": {"shares": 128}}))
        assert res["update stopped"] == (pyshim.UNKNOWN, "cannot update a stopped container")
        res.update(remove(daemon, cid))
        return res

    same_as_runc("update", runtime, scenario)


# ----------------------------------------------------------------------------- Stats


def metric_rows(out: str) -> list[str]:
    """The METRIC column of ``ctr task metrics`` (values differ between runs)."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("METRIC"))
    return [ln.split()[0] for ln in lines[start + 1:] if ln.strip()]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stats(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """``ctr task metrics`` prints the same rows; the raw Stats answer is a v1 Metrics
    with pids, cpu and memory figures of the container's own cgroup."""
    def scenario(r: str) -> dict:
        cid, _ = run_sleeper(daemon, r, rootfs, "--memory-limit", "50000000")
        out = ok(daemon, "task", "metrics", cid)
        res = {"rows": metric_rows(out)}
        assert res["rows"] == ["memory.usage_in_bytes", "memory.limit_in_bytes", "memory.stat.cache",
                               "cpuacct.usage", "cpuacct.usage_percpu", "pids.current", "pids.limit"]
        assert cid in out
        raw = task_call(daemon, cid, "Stats", pb.StatsRequest(id=cid))
        resp = pb.StatsResponse.FromString(raw)
        res["type_url"] = resp.stats.type_url
        assert res["type_url"] == pyshim.URL_CGROUPS_V1_METRICS
        m = pb.CgroupsV1Metrics.FromString(resp.stats.value)
        assert m.pids.current == 1
        assert m.memory.usage.limit == 50000000 // 4096 * 4096
        assert 0 < m.memory.usage.usage <= m.memory.usage.max
        assert m.cpu.usage.total > 0 and len(m.cpu.usage.per_cpu) == os.cpu_count()
        assert m.memory.hierarchical_memory_limit == 50000000 // 4096 * 4096
        res["fields"] = sorted(f.name for f, _ in m.ListFields())
        res["memory entries"] = sorted(f.name for f, _ in m.memory.ListFields()
                                       if f.message_type is not None)
        res["stats unknown"] = task_call(daemon, cid, "Stats", pb.StatsRequest(id="nope"))[0]
        assert res["stats unknown"] == pyshim.NOT_FOUND
        res.update(kill_and_remove(daemon, cid))
        return res

    same_as_runc("stats", runtime, scenario)


# ------------------------------------------------------------------------------- OOM

OOM_PROGRAM = ["/bin/sh", "-c", "x=a; while :; do x=$x$x; done"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_oom_event(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """A task over its memory limit is OOM-killed: /tasks/oom comes before /tasks/exit
    (137), once; a task that stays under its limit gets no /tasks/oom."""
    def scenario(r: str) -> dict:
        with events(daemon, r) as topics:
            cid = new_id()
            res = {"run": ctr(daemon, "run", "--rm", "--runtime", r, "--memory-limit", "20000000",
                              "--rootfs", rootfs, cid, *OOM_PROGRAM)}
            assert res["run"] == (137, "", "")
            res["events"] = topics(cid, "/tasks/delete")
            quiet = new_id()
            res["quiet run"] = ctr(daemon, "run", "--rm", "--runtime", r, "--memory-limit", "20000000",
                                   "--rootfs", rootfs, quiet, "/bin/true")
            assert res["quiet run"] == (0, "", "")
            res["quiet events"] = topics(quiet, "/tasks/delete")
        assert res["events"] == ["/tasks/create", "/tasks/start", "/tasks/oom", "/tasks/exit",
                                 "/tasks/delete"], res["events"]
        assert "/tasks/oom" not in res["quiet events"]
        return res

    same_as_runc("oom", runtime, scenario)


# ------------------------------------------------------------------------ unit tests


def _write(root: str, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


V1_FILES = {
    "pids/pids.current": "3\n",
    "pids/pids.max": "max\n",
    "cpuacct/cpuacct.usage": "123456789\n",
    "cpuacct/cpuacct.stat": "user 250\nsystem 50\n",
    "cpuacct/cpuacct.usage_percpu": "100 200 300 \n",
    "cpu/cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 3000\n",
    "memory/memory.stat": "cache 4096\nrss 8192\nswap 0\npgfault 7\npgmajfault 1\n"
                          "hierarchical_memory_limit 20000768\nhierarchical_memsw_limit 40000000\n"
                          "total_cache 4096\ntotal_pgfault 9\n",
    "memory/memory.usage_in_bytes": "12288\n",
    "memory/memory.limit_in_bytes": "20000768\n",
    "memory/memory.max_usage_in_bytes": "65536\n",
    "memory/memory.failcnt": "5\n",
    "memory/memory.memsw.usage_in_bytes": "12288\n",
    "memory/memory.memsw.limit_in_bytes": "40000000\n",
    "memory/memory.memsw.max_usage_in_bytes": "70000\n",
    "memory/memory.memsw.failcnt": "0\n",
    "memory/memory.kmem.usage_in_bytes": "1000\n",
    "memory/memory.kmem.limit_in_bytes": "9223372036854771712\n",
    "memory/memory.kmem.max_usage_in_bytes": "2000\n",
    "memory/memory.kmem.failcnt": "0\n",
    "memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
    "blkio/blkio.io_service_bytes_recursive": "",
    "blkio/blkio.throttle.io_service_bytes_recursive": "8:0 Read 4096\n8:0 Write 8192\nTotal 12288\n",
    "blkio/blkio.throttle.io_serviced_recursive": "8:0 Read 1\n8:0 Write 2\nTotal 3\n",
}


def test_v1_metrics_from_files(tmp_path) -> None:
    root = str(tmp_path)
    _write(root, V1_FILES)
    dirs = {c: os.path.join(root, c) for c in ("pids", "cpuacct", "cpu", "memory", "blkio", "hugetlb")}
    m = pyshim.v1_metrics(dirs, devices={(8, 0): "/dev/sda"})
    assert (m.pids.current, m.pids.limit) == (3, 0)  # "max" is no limit
    u = m.cpu.usage
    assert (u.total, u.user, u.kernel, list(u.per_cpu)) == (123456789, 2_500_000_000, 500_000_000,
                                                             [100, 200, 300])
    t = m.cpu.throttling
    assert (t.periods, t.throttled_periods, t.throttled_time) == (10, 2, 3000)
    mem = m.memory
    assert (mem.cache, mem.rss, mem.pg_fault, mem.pg_maj_fault, mem.total_pg_fault) == (4096, 8192, 7, 1, 9)
    assert (mem.hierarchical_memory_limit, mem.hierarchical_swap_limit) == (20000768, 40000000)
    assert (mem.usage.usage, mem.usage.limit, mem.usage.max, mem.usage.failcnt) == (12288, 20000768, 65536, 5)
    assert (mem.swap.limit, mem.swap.max) == (40000000, 70000)
    assert (mem.kernel.usage, mem.kernel.max) == (1000, 2000)
    assert not mem.HasField("kernel_tcp")  # no such files: skipped, as IgnoreNotExist
    assert m.memory_oom_control.oom_kill == 4
    # The CFQ file is empty, so the throttle files stand in.
    assert [(e.op, e.device, e.major, e.minor, e.value) for e in m.blkio.io_service_bytes_recursive] == [
        ("Read", "/dev/sda", 8, 0, 4096), ("Write", "/dev/sda", 8, 0, 8192)]
    assert [e.value for e in m.blkio.io_serviced_recursive] == [1, 2]
    assert not m.hugetlb  # no hugetlb dir


def test_v1_metrics_skip_missing_controllers(tmp_path) -> None:
    m = pyshim.v1_metrics({"memory": str(tmp_path / "gone")})
    assert m.ListFields() == []


V2_FILES = {
    "pids.current": "2\n",
    "pids.max": "100\n",
    "cpu.stat": "usage_usec 500\nuser_usec 300\nsystem_usec 200\nnr_periods 4\nnr_throttled 1\n"
                "throttled_usec 9\n",
    "memory.current": "65536\n",
    "memory.max": "max\n",
    "memory.swap.current": "0\n",
    "memory.swap.max": "1048576\n",
    "memory.stat": "anon 4096\nfile 8192\nslab 100\npgfault 11\nthp_fault_alloc 1\nunknown_key 5\n",
    "memory.events": "low 0\nhigh 1\nmax 2\noom 3\noom_kill 3\n",
    "io.stat": "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
    "hugetlb.2MB.current": "0\n",
    "hugetlb.2MB.max": "max\n",
}


def test_v2_metrics_from_files(tmp_path) -> None:
    _write(str(tmp_path), V2_FILES)
    m = pyshim.v2_metrics(str(tmp_path))
    assert (m.pids.current, m.pids.limit) == (2, 100)
    c = m.cpu
    assert (c.usage_usec, c.user_usec, c.system_usec, c.nr_periods, c.nr_throttled, c.throttled_usec) == (
        500, 300, 200, 4, 1, 9)
    mem = m.memory
    assert (mem.anon, mem.file, mem.slab, mem.pgfault, mem.thp_fault_alloc) == (4096, 8192, 100, 11, 1)
    assert (mem.usage, mem.usage_limit, mem.swap_usage, mem.swap_limit) == (65536, 2**64 - 1, 0, 1048576)
    e = m.memory_events
    assert (e.low, e.high, e.max, e.oom, e.oom_kill) == (0, 1, 2, 3, 3)
    assert [(i.major, i.minor, i.rbytes, i.wbytes, i.rios, i.wios) for i in m.io.usage] == [(8, 0, 10, 20, 1, 2)]
    assert [(h.pagesize, h.current, h.max) for h in m.hugetlb] == [("2MB", 0, 2**64 - 1)]
    with pytest.raises(pyshim.NotFound):
        pyshim.v2_metrics(str(tmp_path / "gone"))


def test_cgroup_paths_of_this_process(tmp_path) -> None:
    """v1 controllers map to their hierarchy dir under the root (joined or not), v2
    to root/unified on a hybrid layout, or to root itself on a pure v2 one."""
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        entries = [ln.split(":", 2) for ln in f.read().splitlines()]
    root = str(tmp_path)
    v1, v2 = pyshim.cgroup_paths(os.getpid(), root)
    for _, controllers, path in entries:
        if controllers:
            for name in controllers.split(","):
                if not name.startswith("name="):
                    assert v1[name] == os.path.join(root, name, path.lstrip("/"))
        else:
            assert v2 == os.path.join(root, "unified", path.lstrip("/"))
    _write(root, {"cgroup.controllers": ""})
    _, v2 = pyshim.cgroup_paths(os.getpid(), root)
    if v2:
        assert not v2.startswith(os.path.join(root, "unified"))
    with pytest.raises(pyshim.NotFound):
        pyshim.cgroup_paths(2**22 + 1, root)


def test_oom_watcher_v2_counts_only_new_oom_kills(tmp_path) -> None:
    """cgroup v2: a change of memory.events is an OOM only if oom_kill grew."""
    fired: list[str] = []
    w = pyshim.OomWatcher(None, fired.append)
    path = tmp_path / "memory.events"
    path.write_text("oom 1\noom_kill 1\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        w.watches["c1"] = [fd, str(tmp_path), True, 1]
        w.fds[fd] = "c1"
        w._fire(fd)
        assert fired == []  # the kill seen when the watch began
        path.write_text("oom 2\noom_kill 2\nlow 0\n")  # read through the same fd
        w._fire(fd)
        w._fire(fd)
        assert fired == ["c1"]
        w._fire(fd + 1000)  # an fd nobody watches
        assert fired == ["c1"]
    finally:
        os.close(fd)


def test_oom_watcher_v1_eventfd(tmp_path) -> None:
    """cgroup v1: a signalled eventfd is an OOM while the cgroup exists, and nothing
    once it is gone (the kernel signals its removal too); check() drains it."""
    fired: list[str] = []
    w = pyshim.OomWatcher(None, fired.append)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        _write(str(tmp_path), {"memory.oom_control": "oom_kill 0\n"})
        w.watches["c1"] = [efd, str(tmp_path), False, 0]
        w.fds[efd] = "c1"
        w.check("c1")
        assert fired == []  # not signalled
        os.eventfd_write(efd, 1)
        w.check("c1")
        w.check("c1")
        assert fired == ["c1"]
        os.unlink(tmp_path / "memory.oom_control")
        os.eventfd_write(efd, 1)
        w._fire(efd)
        assert fired == ["c1"]
    finally:
        os.close(efd)


def test_pause_resume_update_transitions() -> None:
    """The TRANSITIONS table and the Go shim's refusals for pause/resume/update/start."""
    T = pyshim.TRANSITIONS
    assert T[pyshim.RUNNING, "pause"] == pyshim.PAUSED
    assert T[pyshim.PAUSED, "resume"] == pyshim.RUNNING
    assert T[pyshim.PAUSED, "exit"] == pyshim.STOPPED
    for state in (pyshim.CREATED, pyshim.RUNNING, pyshim.PAUSED):
        assert T[state, "update"] == state
    loop = asyncio.new_event_loop()
    try:
        c = pyshim.Container("c", "/nonexistent", None)
        p = pyshim.Process("c", c, None, loop)
        for state, event, words in [
            (pyshim.CREATED, "pause", "cannot pause task in created state"),
            (pyshim.RUNNING, "resume", "cannot resume a running process"),
            (pyshim.PAUSED, "pause", "cannot pause a paused container"),
            (pyshim.STOPPED, "resume", "cannot resume a stopped container"),
            (pyshim.STOPPED, "update", "cannot update a stopped container"),
            (pyshim.STOPPED, "start", "cannot start a stopped process"),
        ]:
            p.state = state
            with pytest.raises(pyshim.ShimError) as e:
                p.check(event)
            assert (e.value.code, str(e.value)) == (pyshim.UNKNOWN, words)
        p.state = pyshim.STOPPED
        with pytest.raises(pyshim.FailedPrecondition):
            p.check("exit")  # a second exit: no Go shim words, an internal precondition
    finally:
        loop.close()


# ------------------------------------------------------------------------- terminals


def _under_pty(d, *ctr_args: str, timeout: float = 60) -> tuple[int, str]:
    """Runs ctr inside a pseudo-terminal (script(1)), as a person at a terminal
    would; returns (exit code, what the terminal showed, CRs dropped)."""
    import shlex

    cmd = " ".join(shlex.quote(a) for a in [harness.CTR, "--address", d.address, "-n", d.namespace,
                                            *ctr_args])
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"],
                       capture_output=True, text=True, timeout=timeout, env=d.env,
                       stdin=subprocess.DEVNULL, check=False)
    # A NUL echoed by the terminal shows as "^@" (both shims): not the program's output.
    return r.returncode, r.stdout.replace("\r", "").replace("\x00", "").replace("^@", "")


def _program_lines(out: str) -> list[str]:
    """The program's own lines: not ctr's log lines about resizing, whose
    timing (before or after the exit) varies from run to run."""
    return [ln for ln in out.splitlines() if ln.strip() and "resize pty" not in ln]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_with_a_terminal(daemon, rootfs: str, runtime: str) -> None:
    """`ctr run -t`: the process has a tty, its output reaches the terminal, and ctr
    exits with its code."""
    cid = new_id()
    code, out = _under_pty(daemon, "run", "-t", "--rm", "--runtime", runtime, "--rootfs", rootfs,
                           cid, "/bin/sh", "-c", "tty; echo on-tty; exit 5")
    lines = _program_lines(out)
    assert code == 5, out
    assert lines == ["/dev/pts/0", "on-tty"], out
    compare_with_runc("run_tty", runtime, (code, lines))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exec_with_a_terminal(daemon, rootfs: str, runtime: str) -> None:
    cid = new_id()
    assert ctr(daemon, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000")[0] == 0
    code, out = _under_pty(daemon, "task", "exec", "-t", "--exec-id", "t1", cid,
                           "/bin/sh", "-c", "tty; echo in-exec-tty; exit 3")
    lines = _program_lines(out)
    assert code == 3, out
    assert lines == ["/dev/pts/0", "in-exec-tty"], out
    assert ctr(daemon, "task", "kill", "-s", "KILL", cid)[0] == 0
    wait_for(lambda: daemon.tasks()[cid] == "STOPPED", 10)
    assert ctr(daemon, "task", "rm", cid)[0] == 0
    assert ctr(daemon, "container", "rm", cid)[0] == 0
    compare_with_runc("exec_tty", runtime, (code, lines))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_megabyte_through_a_terminal_loses_no_byte(daemon, rootfs: str, runtime: str) -> None:
    cid = new_id()
    code, out = _under_pty(daemon, "run", "-t", "--rm", "--runtime", runtime, "--rootfs", rootfs, cid,
                           "/bin/sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x; exit 0")
    assert code == 0
    got = out.count("x")
    if runtime == RUNC and got != 1_000_000:
        # The Go shim sometimes loses the end of a tty's output under load (950,272 and
        # 991,221 of 1,000,000 bytes seen on 1.6.20; also on 2.1.9): recorded, not
        # asserted. Between the shim and this count sit ctr and script(1): under a load
        # of 20 on two cores the count came short through pyshim too, with every byte
        # copied by the shim; test_faults' test_delete_waits_for_a_slow_terminal_reader
        # holds the shim itself to the whole output.
        warnings.warn(f"the Go shim delivered {got} of 1000000 bytes through a tty", stacklevel=1)
        return
    if got != 1_000_000:
        # ctr and script(1) sit between the shim and this count. pyshim logs (debug)
        # what each of its copies moved: with every byte through to ctr's fifo, the
        # loss is downstream of the shim (seen once in a CI run, 978,688 counted).
        copied = _shim_copied(daemon, cid)
        # (the terminal adds a byte or two of its own to the megabyte)
        assert copied >= 1_000_000, f"counted {got}, pyshim copied {copied} to the fifo"
        warnings.warn(f"ctr delivered {got} of the 1000000 bytes pyshim copied", stacklevel=1)
        return
    compare_with_runc("tty_megabyte", runtime, (code, got))


def _shim_copied(d: Containerd, cid: str) -> int:
    """The most bytes one of pyshim's copies moved for task ``cid`` (its shim's
    "copy closed" debug lines; the shim found by its "task created" line)."""
    text = d.log_text()
    shim = re.search(rf'msg="task created" pid=(\d+) id={re.escape(cid)} ', text)
    if shim is None:
        return -1
    moved = re.findall(rf'msg="copy closed" pid={shim[1]} bytes=(\d+)', text)
    return max(map(int, moved), default=0)


# A terminal with a logging binary. ctr 1.6 drops --log-uri when -t is given (its tty
# io wins), so these requests go to containerd's own Tasks API over gRPC, as a client
# such as nerdctl sends them: terminal set, stdout and stderr naming the logger.


def _exit_status(d: Containerd, cid: str, exec_id: str = "") -> int:
    """Tasks.Wait: blocks until the process has exited; its exit status."""
    return dict(pb_fields(tasks_call(d, "Wait", pb_message((1, cid), (2, exec_id))))).get(1, 0)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_with_a_terminal_and_a_logging_binary(daemon, rootfs: str, runtime: str, tmp_path) -> None:
    """Create with a terminal and a `binary://` stdout: the terminal's output (CRs and
    the echo of the input included) reaches the logger's fd 3, its fd 4 carries
    nothing, stdin comes from the stdin fifo, and the exit status is the program's.
    pyshim's logger sees EOF when the container exits; the Go shim's only once the
    stderr pipe's write end it dropped is closed (by its garbage collector, or when
    the shim exits): recorded, not compared."""
    logger = write_logger(tmp_path, "logger", LOGGER)

    def scenario(r: str) -> dict:
        cid, out = new_id(), tempfile.mkdtemp(dir=tmp_path)
        stdin = out + ".stdin"
        os.mkfifo(stdin)
        uri = f"binary://{logger}?dir={out}"
        # `-ec`, not `-c`: ctr container create takes a `-c` after the id for its --config.
        ok(daemon, "container", "create", "-t", "--runtime", r, "--rootfs", rootfs, cid,
           "/bin/sh", "-ec", "tty; read line; echo got $line; echo to-stderr >&2; exit 3")
        tasks_call(daemon, "Create", pb_message((1, cid), (4, stdin), (5, uri), (6, uri), (7, True)))
        tasks_call(daemon, "Start", pb_message((1, cid)))
        stdout, done = os.path.join(out, "stdout"), os.path.join(out, "done")
        wait_for(lambda: _read_bytes(stdout) == b"/dev/pts/0\r\n", 10,
                 message=f"{r}: the logger never got the tty's first line: {_read_bytes(stdout)!r}")
        fd = os.open(stdin, os.O_WRONLY | os.O_NONBLOCK)  # the shim holds a read end
        try:
            os.write(fd, b"hello\n")
        finally:
            os.close(fd)
        status = _exit_status(daemon, cid)
        if r == PYSHIM:
            wait_for(lambda: os.path.exists(done), 10, message="the logger got no EOF at the exit")
        rm = remove(daemon, cid)
        wait_for(lambda: os.path.exists(done), 20, message=f"{r}: the logger never finished")
        rec = logger_record(out, (bundle_of(daemon, cid), "<BUNDLE>"), (cid, "<ID>"), (out, "<DIR>"))
        rec["stdout"] = _read_bytes(stdout)
        assert status == 3, status
        assert rm["task rm"] == (0, "", exit_warning(3)), rm
        assert rec["stdout"] == b"/dev/pts/0\r\nhello\r\ngot hello\r\nto-stderr\r\n", rec["stdout"]
        assert rec["stderr"] == "" and rec["done"] == "done\n"
        assert rec["args"] == "2 dir <DIR>\n"
        assert rec["env"] == "CONTAINER_ID=<ID>\nCONTAINER_NAMESPACE=pyshim-test\nPWD=<BUNDLE>\n", rec["env"]
        assert rec["fds"].splitlines()[3:] == ["3 p r-x", "4 p r-x", "5 p -wx"], rec["fds"]
        assert cid not in daemon.containers()
        return {"status": status, "rm": rm, "logger": rec}

    same_as_runc("tty-log-uri-binary", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exec_with_a_terminal_and_a_logging_binary(daemon, rootfs: str, runtime: str, tmp_path) -> None:
    """Exec with a terminal and a `binary://` stdout: the exec's own logger, named
    after the exec id, gets the exec's terminal output."""
    logger = write_logger(tmp_path, "logger", LOGGER)

    def scenario(r: str) -> dict:
        cid, out = run_sleeper(daemon, r, rootfs)[0], tempfile.mkdtemp(dir=tmp_path)
        uri = f"binary://{logger}?dir={out}"
        spec = json.loads(ok(daemon, "container", "info", cid))["Spec"]["process"]
        spec.update(terminal=True, args=["/bin/sh", "-c", "tty; echo exec-out; echo exec-err >&2; exit 5"])
        any_spec = pb_message((1, "types.containerd.io/opencontainers/runtime-spec/1/Process"), (2, json.dumps(spec)))
        tasks_call(daemon, "Exec", pb_message((1, cid), (3, uri), (4, uri), (5, True), (6, any_spec), (7, "tx")))
        tasks_call(daemon, "Start", pb_message((1, cid), (2, "tx")))
        status = _exit_status(daemon, cid, "tx")
        done = os.path.join(out, "done")
        if r == PYSHIM:
            wait_for(lambda: os.path.exists(done), 10, message="the exec's logger got no EOF at its exit")
        tasks_call(daemon, "DeleteProcess", pb_message((1, cid), (2, "tx")))
        res = kill_and_remove(daemon, cid)
        wait_for(lambda: os.path.exists(done), 20, message=f"{r}: the exec's logger never finished")
        rec = logger_record(out, (bundle_of(daemon, cid), "<BUNDLE>"), (cid, "<ID>"), (out, "<DIR>"))
        rec["stdout"] = _read_bytes(os.path.join(out, "stdout"))
        assert status == 5, status
        assert rec["stdout"] == b"/dev/pts/0\r\nexec-out\r\nexec-err\r\n", rec["stdout"]
        assert rec["stderr"] == "" and rec["done"] == "done\n"
        assert rec["env"] == "CONTAINER_ID=tx\nCONTAINER_NAMESPACE=pyshim-test\nPWD=<BUNDLE>\n", rec["env"]
        assert rec["fds"].splitlines()[3:] == ["3 p r-x", "4 p r-x", "5 p -wx"], rec["fds"]
        return {"status": status, "rm": res, "logger": rec}

    same_as_runc("exec-tty-log-uri-binary", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_terminal_with_a_logging_binary_that_cannot_start(daemon, rootfs: str, runtime: str,
                                                          tmp_path) -> None:
    """A missing logging binary with a terminal: Create fails with the binary's path
    and why, and no task is left. (The Go shim starts this logger after runc create,
    pyshim before it, as without a terminal; containerd cleans up either way.)"""
    grpc = grpc_module()
    path = os.path.join(str(tmp_path), "missing")

    def scenario(r: str) -> tuple:
        cid = new_id()
        ok(daemon, "container", "create", "-t", "--runtime", r, "--rootfs", rootfs, cid, "/bin/true")
        uri = f"binary://{path}?dir=/nonexistent"
        with pytest.raises(grpc.RpcError) as err:
            tasks_call(daemon, "Create", pb_message((1, cid), (5, uri), (6, uri), (7, True)))
        details = err.value.details()
        assert path in details and "no such file or directory" in details, details
        assert cid not in daemon.tasks()
        ok(daemon, "container", "rm", cid)
        return err.value.code().name, path in details

    same_as_runc("tty-log-uri-binary-missing", runtime, scenario)


# ------------------------------------------------------------------ grouped containers

GROUP_ANNOTATION = "io.containerd.runc.v2.group"


def serving_shims(d: Containerd, runtime: str) -> list[int]:
    """The long-lived shims of ``runtime`` (not a `start`/`delete` invocation)."""
    return [p for p in harness.shim_pids(d, runtime) if harness.cmdline(p)[-1:] not in (["start"], ["delete"])]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_grouped_containers_share_one_shim(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """`ctr run -d --annotation io.containerd.runc.v2.group=G` three times: one shim
    serves all three (one socket in every bundle's `address`); deleting one leaves the
    others running, with exec and kill working; the shim exits after the last delete."""
    def scenario(r: str) -> dict:
        group = new_id("grp")
        names = {new_id(): n for n in "ABC"}
        a, b, c = names
        flags = ("--annotation", f"{GROUP_ANNOTATION}={group}")
        for cid in names:
            run_sleeper_id(daemon, r, rootfs, cid, *flags)
        shims = wait_for(lambda: (s := serving_shims(daemon, r)) and len(s) == 1 and s, 10,
                         message=f"not one shim for the group: {serving_shims(daemon, r)}")
        argv = harness.cmdline(shims[0])
        addresses = set()
        for cid in names:
            addresses.add(harness.bundle_address(bundle_of(daemon, cid)))
        res: dict = {"shim -id": names.get(argv[argv.index("-id") + 1]), "sockets": len(addresses)}
        res["rm B"] = kill_and_remove(daemon, b)
        res["after rm B"] = {names[k]: v for k, v in daemon.tasks().items() if k in names}
        res["exec A"] = ctr(daemon, "task", "exec", "--exec-id", "e1", a, "/bin/sh", "-c", "echo in-a; exit 7")
        res["exec C"] = ctr(daemon, "task", "exec", "--exec-id", "e1", c, "/bin/sh", "-c", "echo in-c >&2")
        res["ps C"] = len(ok(daemon, "task", "ps", c).splitlines()) - 1
        res["rm C"] = kill_and_remove(daemon, c)
        res["shims with A only"] = serving_shims(daemon, r) == shims
        res["rm A"] = kill_and_remove(daemon, a)
        wait_for(lambda: not harness.shim_pids(daemon, r), 10,
                 message="the group's shim did not exit after its last container")
        assert res["shim -id"] == "A" and res["sockets"] == 1, res
        assert res["after rm B"] == {"A": "RUNNING", "C": "RUNNING"}, res
        assert res["exec A"] == (7, "in-a\n", "") and res["exec C"] == (0, "", "in-c\n"), res
        assert res["ps C"] == 1 and res["shims with A only"], res
        return res

    same_as_runc("grouped", runtime, scenario)

"""End-to-end: pyshim against the Go runc shim, through a real containerd and ``ctr``.

Every scenario that should behave alike runs once per runtime. The RUNC case runs first
and its (normalized) outcome is remembered; the PYSHIM case asserts the same concrete
values and then that its outcome equals the Go shim's, so neither can pass vacuously.
Ids, pids and timestamps are normalized away before comparing.

Every test also checks that it left no shim process of its daemon and no zombie (or
live ``ctr``) child of the test process behind (scenario 8): see conftest's
``daemon``/``fresh``. The helpers (``ctr``, ``same_as_runc``, ``EventLog``...) are
harness's (harness.scenario), shared with the other comparison tests.

Sections carry the scenario numbers of the "pyshim core" issue; bad input (4) and the
shim's log (9) come last so that a ``-x`` run exercises the main paths first.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import harness
import pytest
from harness import (
    CTR,
    CTR_TIMEOUT,
    LOGGER,
    PYSHIM,
    RUNC,
    RUNTIMES,
    Containerd,
    EventLog,
    Step,
    bundle_of,
    compare_with_runc,
    ctr,
    ctr_bg,
    exec_info,
    exit_warning,
    exited_while_down,
    finish,
    logger_record,
    new_id,
    norm,
    ok,
    remove,
    same_as_runc,
    shim_pids,
    task_ps,
    task_row,
    wait_for,
    wait_status,
    write_logger,
)

from pyshim import STACK_DUMPS_KEPT

# ---------------------------------------------------------------------------- helpers


def runc_error(stderr: str) -> bool:
    return "no such file or directory" in stderr or "executable file not found" in stderr


# ---------------------------------------------------------------- 1. output and exit codes

OUTPUT_CASES = [
    pytest.param(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], (3, "out\n", "err\n"),
                 id="exit3"),
    pytest.param(["/bin/sh", "-c", "echo hello; echo world >&2"], (0, "hello\n", "world\n"),
                 id="exit0"),
    pytest.param(["/bin/sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; exit 1"],
                 (1, "x" * 300000, ""), id="bulk"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("argv", "expected"), OUTPUT_CASES)
def test_output_and_exit_code(daemon: Containerd, rootfs: str, runtime: str,
                              argv: list[str], expected: Step) -> None:
    def scenario(r: str) -> Step:
        cid = new_id()
        step = ctr(daemon, "run", "--rm", "--runtime", r, "--rootfs", rootfs, cid, *argv)
        assert step == expected, f"{r}: {step[0]} {step[2]!r}"
        assert cid not in daemon.containers()
        return step

    same_as_runc(f"output-{argv}", runtime, scenario)


# ---------------------------------------------------------------------------- 2. stdin

STDIN_CASES = [
    pytest.param("hello\nworld\n", id="small"),
    pytest.param("".join(f"line {i:07d}\n" for i in range(80000)), id="1MB"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("data", STDIN_CASES)
def test_stdin(daemon: Containerd, rootfs: str, runtime: str, data: str) -> None:
    # ctr race: if its stdin hits EOF before the task exists, ctr never sends CloseIO
    # and cat never ends (with either shim). So write only once the task is RUNNING.
    def scenario(r: str) -> Step:
        cid = new_id()
        with ctr_bg(daemon, "run", "--rm", "--runtime", r, "--rootfs", rootfs, cid,
                    "/bin/cat", stdin=subprocess.PIPE) as proc:
            wait_status(daemon, cid, "RUNNING")
            step = finish(proc, data)
        assert step == (0, data, ""), f"{r}: {step[0]} {step[2]!r} {len(step[1])} bytes"
        return step

    same_as_runc(f"stdin-{len(data)}", runtime, scenario)


# ------------------------------------------------------------- 3. detach, exec, ps, kill


def detach_exec_kill(d: Containerd, runtime: str, image_args: list[str],
                     while_running: Callable[[str], None] | None = None) -> dict[str, Any]:
    """run -d; task ls/ps; exec with exit 7; ps during a running exec; exec killed by
    SIGTERM (143); init killed by SIGKILL (137); task rm; container rm.

    ``image_args`` is ["--rootfs", DIR] or [IMAGE REF]; the container id follows it.
    ``while_running(cid)`` is called once the task is RUNNING.
    """
    cid = new_id()
    res: dict[str, Any] = {}
    args = image_args[:-1] if image_args[0] == "--rootfs" else []
    target = image_args[-1]
    res["run -d"] = ctr(d, "run", "-d", "--runtime", runtime, *args, target, cid,
                        "/bin/sleep", "1000")
    assert res["run -d"] == (0, "", "")
    pid = wait_status(d, cid, "RUNNING")
    assert harness.cmdline(pid) == ["/bin/sleep", "1000"], "task ls shows the init's host pid"
    assert task_ps(d, cid) == [(pid, "-")]
    res["ps"] = [("<INIT>", "-")]
    if while_running is not None:
        while_running(cid)

    res["exec"] = norm(ctr(d, "task", "exec", "--exec-id", "x1", cid,
                           "/bin/sh", "-c", "echo hi; exit 7"), cid)
    assert res["exec"] == (7, "hi\n", "")

    with ctr_bg(d, "task", "exec", "--exec-id", "long", cid, "/bin/sleep", "1001") as proc:
        # runc puts the exec in the cgroup before `runc exec` returns and the shim
        # learns its pid: until then ps lists it without its exec id (both shims).
        rows = wait_for(lambda: len(rows := task_ps(d, cid)) == 2
                        and any(exec_info("long") in i for _, i in rows) and rows, 10,
                        message="the exec never showed in task ps with its exec id")
        exec_pid = next(p for p, _ in rows if p != pid)
        assert harness.cmdline(exec_pid) == ["/bin/sleep", "1001"]
        info = dict(rows)
        assert info[pid] == "-"
        assert exec_info("long") in info[exec_pid], rows
        res["ps with exec"] = sorted(("<INIT>" if p == pid else "<EXEC>", i) for p, i in rows)
        res["kill exec TERM"] = ctr(d, "task", "kill", "-s", "TERM", "--exec-id", "long", cid)
        assert res["kill exec TERM"] == (0, "", "")
        res["exec TERM status"] = finish(proc)
        assert res["exec TERM status"] == (143, "", "")  # 128 + SIGTERM
    assert task_ps(d, cid) == [(pid, "-")]

    res["kill"] = ctr(d, "task", "kill", "-s", "KILL", cid)
    assert res["kill"] == (0, "", "")
    assert wait_status(d, cid, "STOPPED") == pid
    res.update(remove(d, cid))
    assert res["task rm"] == (0, "", exit_warning(137))  # 128 + SIGKILL
    assert res["container rm"] == (0, "", "")
    assert task_row(d, cid) is None and cid not in d.containers()
    return res


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_detach_exec_kill(daemon: Containerd, rootfs: str, runtime: str) -> None:
    same_as_runc("detach", runtime,
                 lambda r: detach_exec_kill(daemon, r, ["--rootfs", rootfs]))


SIGNAL_CASES = [
    # The init of a pid namespace ignores signals it has no handler for: SIGTERM needs a
    # trap (so 143 is the shell's exit code there), SIGKILL is a true signal death.
    pytest.param("KILL", ["/bin/sleep", "1000"], 137, id="KILL"),
    pytest.param("TERM", ["/bin/sh", "-c", 'trap "exit 143" TERM; while :; do sleep 0.1; done'],
                 143, id="TERM-trapped"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("signal", "argv", "status"), SIGNAL_CASES)
def test_attached_run_reports_signal_exit(daemon: Containerd, rootfs: str, runtime: str,
                                          signal: str, argv: list[str], status: int) -> None:
    def scenario(r: str) -> dict[str, Step]:
        cid = new_id()
        with ctr_bg(daemon, "run", "--rm", "--runtime", r, "--rootfs", rootfs, cid,
                    *argv) as proc:
            wait_status(daemon, cid, "RUNNING")
            kill = ctr(daemon, "task", "kill", "-s", signal, cid)
            assert kill == (0, "", "")
            step = finish(proc)
        assert step == (status, "", ""), f"{r}: {step}"
        assert cid not in daemon.containers()
        return {"kill": kill, "run": step}

    same_as_runc(f"signal-{signal}", runtime, scenario)


# ------------------------------------------------------------------ 5. an imported image


def _task_mounts(d: Containerd) -> list[str]:
    return harness.mounts_under(os.path.join(d.state, harness.TASK_PLUGIN_DIR))


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("argv", "expected"), [
    pytest.param(["/bin/echo", "hi"], (0, "hi\n", ""), id="echo"),
    # No path: found through the image config's PATH; the rootfs is the overlay.
    pytest.param(["sh", "-c", 'grep -c " / overlay " /proc/mounts; echo err >&2; exit 3'],
                 (3, "1\n", "err\n"), id="exit3"),
])
def test_image_output_and_exit_code(daemon: Containerd, busybox_image: str, runtime: str,
                                    argv: list[str], expected: Step) -> None:
    def scenario(r: str) -> Step:
        cid = new_id()
        step = ctr(daemon, "run", "--rm", "--runtime", r, busybox_image, cid, *argv)
        assert step == expected, f"{r}: {step}"
        assert _task_mounts(daemon) == [], "the shim left its rootfs mounted"
        return step

    same_as_runc(f"image-output-{argv}", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_image_detach_exec_kill(daemon: Containerd, busybox_image: str, runtime: str) -> None:
    def mounted(cid: str) -> None:
        rootfs = os.path.join(bundle_of(daemon, cid), "rootfs")
        assert harness.mounts_under(rootfs) == [rootfs], "the image rootfs is not mounted"

    def scenario(r: str) -> dict[str, Any]:
        assert _task_mounts(daemon) == []
        res = detach_exec_kill(daemon, r, [busybox_image], mounted)
        assert _task_mounts(daemon) == [], "the shim left its rootfs mounted after rm"
        return res

    same_as_runc("image-detach", runtime, scenario)


# -------------------------------------------------------- 6. containerd kill -9 and restart


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_restart_keeps_running_task(fresh: Containerd, rootfs: str, runtime: str) -> None:
    d, cid = fresh, new_id()
    ok(d, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
    pid = wait_status(d, cid, "RUNNING")
    shims = shim_pids(d, runtime)
    assert len(shims) == 1

    d.kill9()
    assert shim_pids(d, runtime) == shims, "the shim must outlive its daemon"
    d.restart()
    assert task_row(d, cid) == (pid, "RUNNING")
    assert shim_pids(d, runtime) == shims, "containerd reconnected to the same shim"

    res = {"exec": ctr(d, "task", "exec", "--exec-id", "after", cid,
                       "/bin/sh", "-c", "echo hi; exit 6")}
    assert res["exec"] == (6, "hi\n", "")
    assert task_ps(d, cid) == [(pid, "-")]
    res["kill"] = ctr(d, "task", "kill", "-s", "KILL", cid)
    assert res["kill"] == (0, "", "")
    assert wait_status(d, cid, "STOPPED") == pid
    res.update(remove(d, cid))
    assert res["task rm"] == (0, "", exit_warning(137))
    assert res["container rm"] == (0, "", "")
    wait_for(lambda: not shim_pids(d), 10, message="the shim did not exit after delete")
    assert d.tasks() == {} and d.containers() == []
    compare_with_runc("restart-running", runtime, res)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exit_while_containerd_down(fresh: Containerd, rootfs: str, runtime: str) -> None:
    # The shim queues the TaskExit while nobody listens; what containerd then makes of
    # the exited task depends on its version (exited_while_down), alike for both shims.
    d, cid = fresh, new_id()
    ok(d, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid,
       "/bin/sh", "-c", "sleep 2; exit 5")
    pid = wait_status(d, cid, "RUNNING")
    d.kill9()
    # Reaped: the shim has the exit and queues it, as no one listens.
    wait_for(lambda: harness.reaped(pid), 10, message="the task was not reaped")
    d.restart()
    res = exited_while_down(d, cid, pid, 5)
    wait_for(lambda: not shim_pids(d), 10, message="the shim did not exit after delete")
    compare_with_runc("exit-while-down", runtime, res)


# ---------------------------------------------------------------------------- 7. events


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_events_order(daemon: Containerd, rootfs: str, runtime: str) -> None:
    d, cid = daemon, new_id()
    with EventLog(d) as log:
        ok(d, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
        pid = wait_status(d, cid, "RUNNING")
        assert ctr(d, "task", "exec", "--exec-id", "quick", cid, "/bin/sh", "-c", "exit 2") \
            == (2, "", "")
        with ctr_bg(d, "task", "exec", "--exec-id", "long", cid, "/bin/sleep", "1000") as proc:
            rows = wait_for(lambda: len(rows := task_ps(d, cid)) == 2
                            and any(exec_info("long") in i for _, i in rows) and rows, 10)
            long_pid = next(p for p, i in rows if exec_info("long") in i)
            # Killing the init kills the exec too (same pid namespace): both exits come
            # at once (the kernel lets the exec die first), and the exec's TaskExit must
            # still be published before the init's.
            ok(d, "task", "kill", "-s", "KILL", cid)
            assert finish(proc) == (137, "", "")
        wait_status(d, cid, "STOPPED")
        ok(d, "task", "rm", cid)
        ok(d, "containers", "rm", cid)
        delivered = harness.wait_task_delete(
            lambda: any(t == "/tasks/delete" for t, _ in log.of(cid)), runtime, 10,
            message=f"no /tasks/delete for {cid}: {log.of(cid)}")
        events = log.of(cid)

    def index(topic: str, **match: object) -> int:
        hits = [i for i, (t, p) in enumerate(events)
                if t == topic and all(p.get(k) == v for k, v in match.items())]
        assert len(hits) == 1, f"{topic} {match}: {hits} in {events}"
        return hits[0]

    create, start = index("/tasks/create", pid=pid), index("/tasks/start", pid=pid)
    init_exit = index("/tasks/exit", id=cid, exit_status=137)
    if delivered:
        assert create < start < init_exit < index("/tasks/delete", exit_status=137)
    else:   # the Go shim lost it (a warning): its record is what it publishes otherwise
        events.append(("/tasks/delete", {}))
        assert create < start < init_exit
    for eid, status in (("quick", 2), ("long", 137)):
        added = index("/tasks/exec-added", exec_id=eid)
        started = index("/tasks/exec-started", exec_id=eid)
        exited = index("/tasks/exit", id=eid, exit_status=status)
        assert start < added < started < exited < init_exit, (eid, events)
        # exec-started and the exec's exit name the exec's own host pid.
        exec_pid = events[started][1].get("pid")
        assert exec_pid and exec_pid != pid and events[exited][1].get("pid") == exec_pid
        assert events[added][1] == {"container_id": cid, "exec_id": eid}, events[added]
        if eid == "long":
            assert exec_pid == long_pid, (exec_pid, rows)
    topics = [t for t, _ in events]
    assert topics == ["/tasks/create", "/tasks/start",
                      "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit",
                      "/tasks/exit", "/tasks/delete"], topics
    compare_with_runc("events", runtime, topics)


# ------------------------------------------------ 10. long exec, attach, kill --all


@contextmanager
def _stack_limit(nbytes: int) -> Iterator[None]:
    """Children started meanwhile get this soft RLIMIT_STACK: the kernel caps argv plus
    environment at a quarter of it (at most 6 MiB), 2 MiB under the usual 8 MiB."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = nbytes if hard == resource.RLIM_INFINITY else min(nbytes, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


# Each argument stays below MAX_ARG_STRLEN (128 KiB); the container's own execve has the
# usual 2 MiB for argv + envp, so the "over 4 MiB" case can only end in an error. ttrpc
# caps a frame at 4 MiB: the Go shim's ttrpc server discards a longer request and answers
# RESOURCE_EXHAUSTED naming its length, which ctr prints; pyshim must do the same and
# keep the connection (the exec after it works).
LONG_EXEC_CASES = [
    pytest.param([f"a{i:05d}" for i in range(20000)], id="20000-args-140kB"),
    pytest.param([f"{i:06d}" + "x" * 99994 for i in range(12)], id="12-args-1.2MB"),
    pytest.param([f"{i:06d}" + "x" * 99994 for i in range(45)], id="45-args-4.5MB"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("args", LONG_EXEC_CASES)
def test_exec_with_a_long_argument_list(daemon: Containerd, rootfs: str, runtime: str,
                                        args: list[str]) -> None:
    import hashlib

    spec_size = sum(len(a) + 3 for a in args)  # JSON: quotes and a comma each
    digest = hashlib.md5((" ".join(args) + "\n").encode()).hexdigest()

    def scenario(r: str) -> dict[str, Any]:
        d, cid = daemon, new_id()
        ok(d, "run", "-d", "--runtime", r, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
        pid = wait_status(d, cid, "RUNNING")
        script = 'echo $#; echo "$*" | md5sum; exit 3'
        with _stack_limit(64 << 20):
            step = ctr(d, "task", "exec", "--exec-id", "big", cid, "/bin/sh", "-c", script,
                       "sh", *args)
        res: dict[str, Any] = {}
        if spec_size < 4 << 20:
            assert step == (3, f"{len(args)}\n{digest}  -\n", ""), (step[0], step[2])
            res["exec"] = step
        else:
            m = re.fullmatch(harness.behaviour().oversized_request, step[2])
            assert step[0] == 1 and step[1] == "" and m, step
            assert int(m.group(1)) > spec_size
            res["exec"] = (step[0], step[1], step[2].replace(m.group(1), "<N>"))
        # The task is unharmed and the shim still serves the same connection.
        assert task_ps(d, cid) == [(pid, "-")]
        res["exec after"] = ctr(d, "task", "exec", "--exec-id", "big", cid,
                                "/bin/sh", "-c", "echo still; exit 4")
        assert res["exec after"] == (4, "still\n", "")
        ok(d, "task", "kill", "-s", "KILL", cid)
        wait_status(d, cid, "STOPPED")
        res.update(remove(d, cid))
        return res

    same_as_runc(f"long-exec-{len(args)}", runtime, scenario)


class _Lines:
    """Lines of a pipe, read by a thread; ``wait(n)`` until at least n have come."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line)

    def wait(self, n: int, timeout: float = 10) -> None:
        wait_for(lambda: len(self.lines) >= n, timeout,
                 message=f"only {len(self.lines)} lines of {n}: {self.lines}")

    def join(self) -> list[str]:
        self._thread.join(5)
        return list(self.lines)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_attach_detach_attach_loses_no_output(daemon: Containerd, rootfs: str,
                                              runtime: str) -> None:
    # ctr 1.6's `task attach` reopens the fifos ctr run -d created. Killing ctr is how a
    # client detaches (it forwards SIGTERM/SIGINT to the task). What is written while
    # nobody reads waits in the fifo, which the shim keeps open: the next attach gets it.
    # The first second of silence lets `ctr run -d` exit before the first line.
    loop = 'sleep 1; i=0; while :; do echo "line $i"; i=$((i+1)); sleep 0.2; done'

    def attach(d: Containerd, cid: str, n: int) -> list[str]:
        argv = [CTR, "--address", d.address, "-n", d.namespace, "task", "attach", cid]
        proc = subprocess.Popen(argv, env=d.env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            lines = _Lines(proc.stdout)
            lines.wait(n)
        finally:
            proc.kill()  # detach: SIGKILL is not forwarded to the task
            proc.communicate(timeout=CTR_TIMEOUT)
        return lines.join()

    def scenario(r: str) -> dict[str, Any]:
        d, cid = daemon, new_id()
        res: dict[str, Any] = {"run -d": ctr(d, "run", "-d", "--runtime", r, "--rootfs",
                                             rootfs, cid, "/bin/sh", "-c", loop)}
        assert res["run -d"] == (0, "", "")
        pid = wait_status(d, cid, "RUNNING")
        first = attach(d, cid, 3)
        # A required gap, not a wait: about 5 lines are written while no client is
        # attached (one each 0.2 s), and the second client must get them all.
        time.sleep(1.0)
        second = attach(d, cid, 8)
        got = first + second
        want = [f"line {i}\n" for i in range(len(got))]
        assert got == want, f"{r}: {got}"
        assert len(second) >= 8 and second[0] == f"line {len(first)}\n"
        assert task_row(d, cid) == (pid, "RUNNING"), "the task survives its clients"
        res["attached twice"] = "contiguous from line 0"
        res["kill"] = ctr(d, "task", "kill", "-s", "KILL", cid)
        assert wait_status(d, cid, "STOPPED") == pid
        res.update(remove(d, cid))
        assert res["task rm"] == (0, "", exit_warning(137))
        return res

    same_as_runc("attach", runtime, scenario)


KILL_ALL_CASES = [
    # The default signal is SIGTERM: an init with no handler for it would ignore it (pid
    # namespace init), so it traps TERM; the execs are ordinary processes and die of it.
    pytest.param([], 143, id="default-TERM"),
    pytest.param(["-s", "KILL"], 137, id="KILL"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("flags", "status"), KILL_ALL_CASES)
def test_kill_all_signals_every_process(daemon: Containerd, rootfs: str, runtime: str,
                                        flags: list[str], status: int) -> None:
    # The init leaves a second after its TERM: runc signals the processes one by one, and
    # an init that exits at once tears its pid namespace down, SIGKILLing (137) any exec
    # runc had not reached yet (seen under a load of 14 on two cores, for both shims).
    init = 'trap "sleep 1; exit 143" TERM; /bin/sleep 1000 & while :; do sleep 0.1; done'
    execs = ("e1", "e2")

    def scenario(r: str) -> dict[str, Any]:
        d, cid = daemon, new_id()
        with EventLog(d) as log:
            ok(d, "run", "-d", "--runtime", r, "--rootfs", rootfs, cid, "/bin/sh", "-c", init)
            pid = wait_status(d, cid, "RUNNING")
            with ctr_bg(d, "task", "exec", "--exec-id", execs[0], cid, "/bin/sleep", "1001") \
                    as p1, ctr_bg(d, "task", "exec", "--exec-id", execs[1], cid,
                                  "/bin/sh", "-c", "sleep 1002; echo never") as p2:
                wait_for(lambda: sum(exec_info(e) in i for _, i in task_ps(d, cid)
                                     for e in execs) == 2, 10,
                         message="the execs never showed in task ps")
                res: dict[str, Any] = {"kill --all": ctr(d, "task", "kill", "--all",
                                                         *flags, cid)}
                assert res["kill --all"] == (0, "", "")
                res["execs"] = [finish(p1), finish(p2)]
            assert res["execs"] == [(status, "", ""), (status, "", "")], res["execs"]
            assert wait_status(d, cid, "STOPPED") == pid
            res.update(remove(d, cid))
            assert res["task rm"] == (0, "", exit_warning(status))
            harness.wait_task_delete(lambda: any(t == "/tasks/delete" for t, _ in log.of(cid)),
                                     r, 10, message=f"no /tasks/delete for {cid}")
            events = log.of(cid)
        exits = [(p.get("id"), p.get("exit_status")) for t, p in events if t == "/tasks/exit"]
        # Every exec's exit is published, and before the init's.
        assert sorted(exits[:2]) == [(e, status) for e in execs], exits
        assert exits[2:] == [(cid, status)], exits
        res["exit events"] = sorted(exits[:2]) + exits[2:]
        res["exit events"] = [(e if e != cid else "<ID>", s) for e, s in res["exit events"]]
        return res

    same_as_runc(f"kill-all-{flags}", runtime, scenario)


# ---------------------------------------------------------------------------- 4. bad input


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_missing_command(daemon: Containerd, rootfs: str, runtime: str) -> None:
    def scenario(r: str) -> Step:
        cid = new_id()
        step = norm(ctr(daemon, "run", "--rm", "--runtime", r, "--rootfs", rootfs, cid,
                        "/bin/nope"), cid)
        assert step[0] == 1 and step[1] == "", step
        assert runc_error(step[2]), step[2]
        assert 'exec: "/bin/nope"' in step[2]
        # The Go shim copies stdio only once runc create succeeded: runc's own stderr
        # (its error, again) must not reach the container's stderr.
        assert step[2].startswith("ctr: failed to create shim task: OCI runtime create "
                                  "failed: "), \
            f"{r}: runc's stderr leaked into the task's:\n{step[2]}"
        assert cid not in daemon.containers()
        return step

    same_as_runc("missing-command", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exec_missing_binary(daemon: Containerd, rootfs: str, runtime: str) -> None:
    def scenario(r: str) -> dict[str, Step]:
        cid = new_id()
        ok(daemon, "run", "-d", "--runtime", r, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
        pid = wait_status(daemon, cid, "RUNNING")
        res = {"exec": norm(ctr(daemon, "task", "exec", "--exec-id", "bad", cid, "/bin/nope"),
                            cid)}
        code, out, err = res["exec"]
        assert code == 1 and out == "", res
        assert runc_error(err) and 'exec: "/bin/nope"' in err, err
        # As for create: runc's own stderr must not reach the exec's stderr.
        assert err.startswith("ctr: OCI runtime exec failed: "), \
            f"{r}: runc's stderr leaked into the exec's:\n{err}"
        # The task is unharmed and a good exec still works.
        assert task_row(daemon, cid) == (pid, "RUNNING")
        assert task_ps(daemon, cid) == [(pid, "-")]
        code, out, err = ctr(daemon, "task", "exec", "--exec-id", "good", cid, "/bin/echo", "fine")
        assert (code, err) == (0, ""), (code, out, err)
        # ctr 1.6 itself can drop all of an exec's output under load: its fifo reader is
        # opened by a goroutine, and when that goroutine has not run by the time ctr
        # deletes the process, ctr closes the fifo unread. It hit the Go shim (which opens
        # the fifo only after runc exec) in 30 of 1,100 stressed runs and pyshim in 2
        # (bench/exec_output_race.py, README: Status). Recorded, not failed on, for both.
        assert out in ("fine\n", ""), out
        if not out:
            warnings.warn(f"{r}: ctr task exec lost the exec's output (ctr's fifo race)", stacklevel=1)
        res["exec after"] = (code, err)
        ok(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        res.update(remove(daemon, cid))
        assert res["task rm"] == (0, "", exit_warning(137))
        return res

    same_as_runc("exec-missing-binary", runtime, scenario)


def _grpc_status(stderr: str) -> str:
    """The gRPC status ctr appends to an error (": not found"), the shim's own wording
    before it aside: pyshim says "process nope does not exist in container ID", the
    Go shim "process does not exist nope"."""
    return stderr.rstrip("\n").rsplit(": ", 1)[-1]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_bad_requests_on_running_task(daemon: Containerd, rootfs: str, runtime: str) -> None:
    def scenario(r: str) -> dict[str, Any]:
        cid = new_id()
        ok(daemon, "run", "-d", "--runtime", r, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
        pid = wait_status(daemon, cid, "RUNNING")
        res: dict[str, Any] = {}
        code, out, err = ctr(daemon, "task", "kill", "--exec-id", "nope", cid)
        assert (code, out) == (1, "") and "nope" in err, err
        res["kill unknown exec"] = (code, out, _grpc_status(err))
        assert res["kill unknown exec"][2] == "not found"
        res["start twice"] = norm(ctr(daemon, "task", "start", cid), cid)
        assert res["start twice"] == (1, "", "ctr: task <ID>: already exists\n")
        res["delete running"] = norm(ctr(daemon, "task", "rm", cid), cid)
        assert res["delete running"][0] == 1, res["delete running"]
        with ctr_bg(daemon, "task", "exec", "--exec-id", "dup", cid, "/bin/sleep", "1000") as bg:
            wait_for(lambda: len(task_ps(daemon, cid)) == 2, 10)
            code, out, err = ctr(daemon, "task", "exec", "--exec-id", "dup", cid, "/bin/true")
            assert (code, out) == (1, "") and "dup" in err, err
            res["exec id in use"] = (code, out, _grpc_status(err))
            assert res["exec id in use"][2] == "already exists"
            ok(daemon, "task", "kill", "-s", "KILL", "--exec-id", "dup", cid)
            res["dup exec status"] = finish(bg)
            assert res["dup exec status"] == (137, "", "")
        res["exec after errors"] = ctr(daemon, "task", "exec", "--exec-id", "dup", cid,
                                       "/bin/true")
        assert res["exec after errors"] == (0, "", "")
        assert task_row(daemon, cid) == (pid, "RUNNING")
        ok(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        res["start stopped"] = (ctr(daemon, "task", "start", cid)[0],)
        assert res["start stopped"] == (1,)
        res.update(remove(daemon, cid))
        assert res["task rm"] == (0, "", exit_warning(137))
        return res

    same_as_runc("bad-requests", runtime, scenario)


# ------------------------------------------------------------------ 9. the shim's log


_LOGRUS = re.compile(r'^time="[^"]+" level=[a-z]+ msg=')


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_shim_log_is_logrus(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """Everything a shim writes to its log fifo lands, line by line, in containerd's log:
    it must be logrus text, never a raw Python traceback."""
    start = len(daemon.log_text())
    cid = new_id()
    assert ctr(daemon, "run", "--rm", "--runtime", runtime, "--rootfs", rootfs, cid,
               "/bin/sh", "-c", "echo out; exit 2") == (2, "out\n", "")
    wait_for(lambda: not shim_pids(daemon), 10, message="the shim did not exit")
    # containerd copies the shim's log asynchronously.
    new = wait_for(lambda: (lines := daemon.log_text()[start:].splitlines())
                   and any(cid in line for line in lines) and lines, 10,
                   message="no log line names the container")
    bad = [line for line in new if line and not _LOGRUS.match(line)]
    assert bad == [], f"{runtime}: non-logrus lines in containerd's log:\n" + "\n".join(bad)


# ---------------------------------------------------------------- keep-alive and dumps


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_vanished_reader_blocks_output_not_the_shim(daemon: Containerd, rootfs: str,
                                                    runtime: str) -> None:
    """`ctr run -d` leaves nobody reading the stdout fifo. A container writing far more
    than a fifo holds must block (its output is kept, not dropped), while the shim
    neither dies of SIGPIPE nor stops serving."""
    cid = new_id()
    script = ("i=0; while [ $i -lt 100000 ]; do echo line $i; i=$((i+1)); done; "
              "touch /tmp/finished; sleep 1000")
    assert ctr(daemon, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid,
               "/bin/sh", "-c", script)[0] == 0
    shims = [p for p in shim_pids(daemon, runtime) if harness.cmdline(p)[-1] not in ("start", "delete")]
    # A required gap, not a wait: unblocked, the writer would be done with its 100,000
    # lines well within it; it must still be blocked after.
    time.sleep(1.0)
    # The writer is blocked on a full pipe: it has not finished, and the shim answers.
    step = ctr(daemon, "task", "exec", "--exec-id", "probe", cid, "/bin/sh", "-c",
               "test -e /tmp/finished && exit 9; exit 5")
    assert step[0] == 5, step
    assert daemon.tasks()[cid] == "RUNNING"
    assert all(harness.cmdline(p) for p in shims), "a shim died"
    outcome = (step[0], daemon.tasks()[cid])
    assert ctr(daemon, "task", "kill", "-s", "KILL", cid)[0] == 0
    wait_for(lambda: daemon.tasks()[cid] == "STOPPED", 10)
    assert ctr(daemon, "task", "rm", cid)[0] == 0
    assert ctr(daemon, "container", "rm", cid)[0] == 0
    compare_with_runc("vanished_reader", runtime, outcome)


def test_usr1_dumps_stacks_and_the_shim_keeps_serving(daemon: Containerd, rootfs: str) -> None:
    """`kill -USR1 <shim>` with an exec running: one log line carrying the shim's pid,
    namespace and task ids, holding every thread's whole stack and every asyncio task's
    whole await chain down to what it waits for (here the exec's Wait); the same text,
    unescaped, in the file the line names (in the bundle); the shim keeps serving."""
    cid = new_id()
    assert ctr(daemon, "run", "-d", "--runtime", PYSHIM, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000")[0] == 0
    shim = next(p for p in shim_pids(daemon, PYSHIM)
                if cid in harness.cmdline(p) and harness.cmdline(p)[-1] not in ("start", "delete"))
    bundle = os.path.join(daemon.state, harness.TASK_PLUGIN_DIR, daemon.namespace, cid)
    with ctr_bg(daemon, "task", "exec", "--exec-id", "long", cid, "/bin/sleep", "1001") as proc:
        wait_for(lambda: "long" in ok(daemon, "task", "ps", cid), 10, message="the exec never ran")
        texts = []
        for _ in range(STACK_DUMPS_KEPT + 1):  # one more than a shim keeps
            start = len(daemon.log_text())
            os.kill(shim, signal.SIGUSR1)

            def dumped(start: int = start) -> str | None:
                text = daemon.log_text()[start:]
                return text if "=== END stack dump ===" in text else None

            texts.append(wait_for(dumped, 10, message="no stack dump in the log"))
        proc.kill()
    line = next(ln for ln in texts[-1].splitlines() if "BEGIN stack dump" in ln)
    assert _LOGRUS.match(line), line
    assert re.search(rf'msg="=== BEGIN stack dump ===.*=== END stack dump ===" pid={shim} ', line), line
    assert f" tasks={cid} " in line and f" namespace={daemon.namespace} " in line, line
    path = re.search(r" file=(\S+)", line)[1]
    assert os.path.dirname(path) == bundle, path
    with open(path) as f:
        dump = f.read()
    # The file holds the log line's text unescaped.
    msg = json.loads('"' + re.search(r'msg="((?:[^"\\]|\\.)*)"', line)[1] + '"', strict=False)
    assert msg == "=== BEGIN stack dump ===\n" + dump + "=== END stack dump ===", (msg[:300], dump[:300])
    assert "thread MainThread (ident" in dump and ", dumping):" in dump and "in serve" in dump, dump
    # The Wait of the running exec: the request's whole chain down to the handler's task,
    # and that task's chain down to the future it awaits (the exec's exit).
    chains = dict(re.findall(r"task (\S+) \((?:\S+), pending\):\n((?:  .*\n)+)", dump))
    handler = next(name for name, chain in chains.items()
                   if "in TaskService.wait" in chain and "waiting for <Future pending" in chain)
    assert any("in ServerConnection._dispatch" in chain and "in ServerConnection._call" in chain
               and f"waiting for task {handler} (TaskService.wait)" in chain
               for chain in chains.values()), dump
    assert "Publisher._run" in dump  # every task is listed
    kept = [n for n in os.listdir(bundle) if n.startswith(f"stacks-{shim}-")]
    assert len(kept) == STACK_DUMPS_KEPT and os.path.basename(path) in kept, kept
    assert ctr(daemon, "task", "exec", "--exec-id", "after", cid, "/bin/sh", "-c", "exit 6")[0] == 6
    assert ctr(daemon, "task", "kill", "-s", "KILL", cid)[0] == 0
    wait_for(lambda: daemon.tasks()[cid] == "STOPPED", 10)
    assert ctr(daemon, "task", "rm", cid)[0] == 0
    assert ctr(daemon, "container", "rm", cid)[0] == 0


# ---------------------------------------------------------------------- stdio URIs


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_log_uri_file(daemon: Containerd, rootfs: str, runtime: str, tmp_path) -> None:
    """`--log-uri file:///path`: stdout and stderr are appended to the file, whose
    directory is created; ctr still gets the exit code."""
    path = tmp_path / "logs" / "out.log"
    cid = new_id()
    for _ in range(2):  # appended, not truncated
        code = ctr(daemon, "run", "--rm", "--runtime", runtime, "--log-uri", f"file://{path}",
                   "--rootfs", rootfs, cid, "/bin/sh", "-c", "echo to-file; echo err-to-file >&2; exit 4")
        assert code[0] == 4, code
    want = ["err-to-file", "err-to-file", "to-file", "to-file"]
    if runtime == RUNC:
        # The Go shim (containerd 1.6.20) sometimes loses lines with file:// here (seen
        # in a CI run: fewer than 4 lines after 10 s): recorded, not asserted. pyshim
        # copies everything before Delete returns, so its file is checked at once.
        try:
            wait_for(lambda: sorted(path.read_text().splitlines()) == want, 10)
        except TimeoutError:
            warnings.warn(f"the Go shim's file:// log has {path.read_text().splitlines()}",
                          stacklevel=1)
        return
    lines = sorted(path.read_text().splitlines())
    assert lines == want, lines


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_log_uri_binary(daemon: Containerd, rootfs: str, runtime: str, tmp_path) -> None:
    """`ctr run --log-uri binary:///logger?dir=D`: the logger gets the container's
    stdout and stderr on fds 3 and 4, signals ready on fd 5, sees only CONTAINER_ID and
    CONTAINER_NAMESPACE, runs in the bundle, and has written everything and exited when
    `ctr run --rm` returns (Delete waits for it)."""
    logger = write_logger(tmp_path, "logger", LOGGER)

    def scenario(r: str) -> dict:
        cid, out = new_id(), tempfile.mkdtemp(dir=tmp_path)
        step = ctr(daemon, "run", "--rm", "--runtime", r, "--log-uri", f"binary://{logger}?dir={out}",
                   "--rootfs", rootfs, cid, "/bin/sh", "-c",
                   "echo out1; echo err1 >&2; seq 1 20000; echo err2 >&2; exit 3")
        assert step == (3, "", ""), step
        rec = logger_record(out, (bundle_of(daemon, cid), "<BUNDLE>"), (cid, "<ID>"), (out, "<DIR>"))
        want_out = "out1\n" + "".join(f"{i}\n" for i in range(1, 20001))
        assert rec.pop("stdout") == want_out and rec.pop("stderr") == "err1\nerr2\n"
        assert rec["done"] == "done\n"
        assert rec["args"] == "2 dir <DIR>\n"
        assert rec["env"] == ("CONTAINER_ID=<ID>\nCONTAINER_NAMESPACE=pyshim-test\n"
                              "PWD=<BUNDLE>\n"), rec["env"]
        assert rec["cwd"] == "<BUNDLE>\n"
        assert rec["fds"].splitlines()[3:] == ["3 p r-x", "4 p r-x", "5 p -wx"], rec["fds"]
        assert cid not in daemon.containers()
        return rec

    same_as_runc("log-uri-binary", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_log_uri_binary_for_an_exec(daemon: Containerd, rootfs: str, runtime: str,
                                    tmp_path) -> None:
    """`ctr task exec --log-uri binary://...`: the exec's own logger, named after the
    exec id, gets the exec's output; the init's logger gets the init's, and sees EOF
    when the container dies (pyshim) or only at Delete (the Go shim)."""
    logger = write_logger(tmp_path, "logger", LOGGER)

    def scenario(r: str) -> dict:
        cid, init_out, exec_out = new_id(), tempfile.mkdtemp(dir=tmp_path), tempfile.mkdtemp(dir=tmp_path)
        ok(daemon, "run", "-d", "--runtime", r, "--log-uri", f"binary://{logger}?dir={init_out}",
           "--rootfs", rootfs, cid, "/bin/sh", "-c", "echo init-out; exec /bin/sleep 1000")
        wait_status(daemon, cid, "RUNNING")
        step = ctr(daemon, "task", "exec", "--exec-id", "lx", "--log-uri",
                   f"binary://{logger}?dir={exec_out}", cid, "/bin/sh", "-c",
                   "echo exec-out; echo exec-err >&2; exit 5")
        wait_for(lambda: os.path.exists(os.path.join(exec_out, "done")), 10,
                 message="the exec's logger never finished")
        with open(os.path.join(exec_out, "pid")) as f:
            pid = int(f.read())
        # It exited at EOF while the container runs on: reaped, no zombie.
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10,
                 message=f"the exec's logger {pid} was not reaped")
        ok(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        done = os.path.join(init_out, "done")
        if r == PYSHIM:
            # pyshim keeps no write end of the output pipes after runc create: the
            # init's logger sees EOF once the container is gone, before Delete.
            wait_for(lambda: os.path.exists(done), 10, message="the init's logger got no EOF")
        else:
            # Recorded difference: the Go shim holds the write ends until Delete, so
            # its logger is still waiting for EOF here (a required gap, not a wait: it
            # would have seen EOF within it).
            time.sleep(0.5)
            assert not os.path.exists(done)
        rm = remove(daemon, cid)
        assert rm["task rm"] == (0, "", exit_warning(137)), rm
        subs = ((bundle_of(daemon, cid), "<BUNDLE>"), (cid, "<ID>"))
        rec = {"exec": step,
               "init": logger_record(init_out, *subs, (init_out, "<DIR>")),
               "exec logger": logger_record(exec_out, *subs, (exec_out, "<DIR>"))}
        assert rec["init"]["stdout"] == "init-out\n" and rec["init"]["done"] == "done\n"
        assert rec["exec logger"]["stdout"] == "exec-out\n"
        assert rec["exec logger"]["stderr"] == "exec-err\n"
        assert rec["exec logger"]["env"].startswith("CONTAINER_ID=lx\n"), rec["exec logger"]["env"]
        assert rec["exec"] == (5, "", ""), rec["exec"]
        return rec

    same_as_runc("log-uri-binary-exec", runtime, scenario)


BAD_LOGGERS = [
    pytest.param("missing", None, 0o755, id="missing"),
    pytest.param("not-executable", LOGGER, 0o644, id="not-executable"),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("name", "text", "mode"), BAD_LOGGERS)
def test_log_uri_binary_that_cannot_start(daemon: Containerd, rootfs: str, runtime: str,
                                          tmp_path, name: str, text: str | None,
                                          mode: int) -> None:
    """A logging binary that does not exist or is not executable: the task is not
    created, ctr says why, and no shim or process is left."""
    path = os.path.join(str(tmp_path), name)
    if text is not None:
        write_logger(tmp_path, name, text, mode)
    why = "no such file or directory" if text is None else "permission denied"

    def scenario(r: str) -> tuple:
        cid = new_id()
        code, _, err = ctr(daemon, "run", "--rm", "--runtime", r, "--log-uri",
                           f"binary://{path}?dir=/nonexistent", "--rootfs", rootfs, cid, "/bin/true")
        assert code == 1 and path in err and why in err.lower(), (code, err)
        assert cid not in daemon.tasks()
        return code, path in err, why in err.lower()

    same_as_runc(f"log-uri-binary-{name}", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_log_uri_binary_that_dies_at_once(daemon: Containerd, rootfs: str, runtime: str,
                                          tmp_path) -> None:
    """A logger that exits without a word: its closed fd 5 counts as ready (EOF), so the
    task is created; its output has no reader, so the writes fail (EPIPE: the container's
    PID 1 does not die of SIGPIPE) and the exit code still reaches ctr."""
    logger = write_logger(tmp_path, "logger", "#!/bin/sh\nexit 1\n")

    def scenario(r: str) -> Step:
        cid = new_id()
        step = ctr(daemon, "run", "--rm", "--runtime", r, "--log-uri", f"binary://{logger}",
                   "--rootfs", rootfs, cid, "/bin/sh", "-c", "sleep 0.2; echo lost; exit 3")
        assert step == (3, "", ""), step
        assert cid not in daemon.containers()
        return step

    same_as_runc("log-uri-binary-dies", runtime, scenario)


def test_log_uri_binary_that_never_gets_ready(daemon: Containerd, rootfs: str, tmp_path) -> None:
    """pyshim only (the Go shim's Create waits as long as fd 5 stays open): a logger
    that never signals ready fails Create after pyshim's limit with a clear error, is
    killed and reaped, and the shim does not hang."""
    pidfile = os.path.join(str(tmp_path), "pid")
    logger = write_logger(tmp_path, "logger", f"#!/bin/sh\necho $$ > {pidfile}\nexec /bin/sleep 1000\n")
    cid = new_id()
    code, _, err = ctr(daemon, "run", "--rm", "--runtime", PYSHIM, "--log-uri", f"binary://{logger}",
                       "--rootfs", rootfs, cid, "/bin/true")
    assert code == 1 and "did not signal ready" in err and logger in err, err
    with open(pidfile) as f:
        pid = int(f.read())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, message="the logger was not killed and reaped")
    assert cid not in daemon.tasks()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_shim_oom_score_is_containerds_plus_one(daemon: Containerd, rootfs: str,
                                                runtime: str) -> None:
    """The shim is a little more killable than containerd, as the Go shim sets it."""
    cid = new_id()
    assert ctr(daemon, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000")[0] == 0
    shim = next(p for p in shim_pids(daemon, runtime)
                if cid in harness.cmdline(p) and harness.cmdline(p)[-1] not in ("start", "delete"))
    with open(f"/proc/{daemon.pid}/oom_score_adj") as f:
        base = int(f.read())
    with open(f"/proc/{shim}/oom_score_adj") as f:
        score = int(f.read())
    assert score == min(base + 1, 1000)
    assert ctr(daemon, "task", "kill", "-s", "KILL", cid)[0] == 0
    wait_for(lambda: daemon.tasks()[cid] == "STOPPED", 10)
    assert ctr(daemon, "task", "rm", cid)[0] == 0
    assert ctr(daemon, "container", "rm", cid)[0] == 0
    compare_with_runc("oom_score", runtime, score - base)

"""Exits and exec starts where pyshim once differed from the Go shim (issue 13).

Each scenario runs once per runtime through a real containerd and pyshim's outcome
must equal the Go shim's (``same_as_runc``):

* an orphan's exit is reaped and dropped, never kept for a later process that the
  kernel gives the same pid (bug 1);
* when the init of a container without its own pid namespace exits, the rest of the
  container's cgroup is killed (bug 2);
* an exec's terminal is the ExecProcessRequest's ``terminal`` field, whatever the
  process spec says (bug 3);
* a ``runc exec`` that fails at Start leaves the exec ``created`` (bug 4).

Containers without a pid namespace are made with ``ctr run --config`` from the spec
``ctr oci spec`` prints, less its pid namespace.
"""

from __future__ import annotations

import os
import stat
import threading

import harness
import pytest
from harness import (
    RUNTIMES,
    Containerd,
    ctr,
    exec_request,
    exec_state,
    new_id,
    ok,
    run_without_pidns,
    same_as_runc,
    stop_and_remove,
    task_call,
    wait_for,
    wait_status,
)

import pyshim
import pyshim_pb2 as pb


def children_named(parent: int, argv: list[str]) -> list[int]:
    """Live processes with this parent and command line."""
    found = []
    for pid in harness._pids():
        st = harness._stat(pid)
        if st is not None and st[1] == parent and st[0] not in "ZX" and harness.cmdline(pid) == argv:
            found.append(pid)
    return found


def alive_named(argv: list[str]) -> list[int]:
    return [p for p in harness._pids()
            if harness.cmdline(p) == argv and (s := harness._stat(p)) is not None and s[0] not in "ZX"]


# ----------------------------------------------------- bug 1: an orphan's exit is dropped

ORPHANS = 300
EXECS = 12


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_orphan_exit_is_not_inherited_by_a_reused_pid(daemon: Containerd, rootfs: str,
                                                      runtime: str, tmp_path) -> None:
    """Orphans of a container in the host's pid namespace reparent to the shim, which
    reaps them. Once they are gone, the kernel's pid allocator is set just below their
    pids (ns_last_pid), so the execs that follow get pids the orphans had: every exec
    must still report its own exit status, 3."""
    def scenario(r: str) -> dict:
        cid = new_id("orphan")
        marker = str(100000 + os.getpid() % 1000)
        orphan = ["sleep", "2"]
        # `(sleep 2 &)`: the subshell exits at once, its sleep is orphaned to the shim.
        script = (f"i=0; while [ $i -lt {ORPHANS} ]; do (sleep 2 &); i=$((i+1)); done; "
                  f"exec sleep {marker}")
        run_without_pidns(daemon, r, rootfs, tmp_path, cid, script)
        shim = harness.live_shim(daemon, r, cid)
        pids = wait_for(lambda: (p := children_named(shim, orphan)) and len(p) >= ORPHANS // 2 and p,
                        15, message="the orphans never showed under the shim")
        wait_for(lambda: not children_named(shim, orphan) and not alive_named(orphan), 15,
                 message="the orphans never exited")
        statuses = []
        for i in range(EXECS):
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(min(pids) - 1 + i * 20))
            code, _out, _err = ctr(daemon, "task", "exec", "--exec-id", f"e{i}", cid,
                                 "/bin/sh", "-c", "sleep 0.2; exit 3")
            statuses.append(code)
        assert statuses == [3] * EXECS, statuses
        stop_and_remove(daemon, cid)
        return {"exec statuses": statuses}

    same_as_runc("orphan-exit-pid-reuse", runtime, scenario)


# ------------------------------ bug 2: the init's exit kills the rest of the container

@pytest.mark.parametrize("runtime", RUNTIMES)
def test_init_exit_kills_the_container_without_a_pid_namespace(daemon: Containerd, rootfs: str,
                                                               runtime: str, tmp_path) -> None:
    def scenario(r: str) -> dict:
        cid = new_id("nopidns")
        marker = str(200000 + os.getpid() % 1000)
        child = ["/bin/sleep", marker]
        run_without_pidns(daemon, r, rootfs, tmp_path, cid,
                          f"/bin/sleep {marker} & /bin/sleep 100000")
        wait_for(lambda: alive_named(child), 10, message="the background sleep never started")
        res = {"kill": ctr(daemon, "task", "kill", "-s", "KILL", cid)}
        assert res["kill"] == (0, "", "")
        wait_status(daemon, cid, "STOPPED")
        wait_for(lambda: not alive_named(child), 10,
                 message=f"{r}: the init's child outlived the init: {alive_named(child)}")
        res["child left"] = alive_named(child)
        ok(daemon, "task", "rm", cid)
        ok(daemon, "containers", "rm", cid)
        return res

    same_as_runc("init-exit-kills-all", runtime, scenario)


# ----------------------------------- bugs 3 and 4: an exec started through the task API





@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exec_terminal_comes_from_the_request(daemon: Containerd, rootfs: str, runtime: str,
                                              tmp_path) -> None:
    def scenario(r: str) -> dict:
        cid = new_id("exectty")
        assert ctr(daemon, "run", "-d", "--runtime", r, "--rootfs", rootfs, cid,
                   "/bin/sleep", "1000") == (0, "", "")
        wait_status(daemon, cid, "RUNNING")
        fifo = os.path.join(str(tmp_path), f"{cid}.out")
        os.mkfifo(fifo)
        got: list[bytes] = []

        def read() -> None:
            with open(fifo, "rb") as f:
                got.append(f.read())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        res = {"exec": task_call(daemon, cid, "Exec",
                                 exec_request(daemon, cid, "tty", ["/bin/sh", "-c", "tty"], True, fifo))}
        assert res["exec"] == b""
        res["start"] = task_call(daemon, cid, "Start", pb.StartRequest(id=cid, exec_id="tty"))
        assert isinstance(res["start"], bytes), res["start"]
        res["start"] = "ok"
        wait_for(lambda: exec_state(daemon, cid, "tty") == 3, 10, message="the exec never stopped")
        reader.join(10)
        assert got and got[0].startswith(b"/dev/pts/"), got
        res["output"] = got[0].split(b"/dev/pts/")[0] + b"/dev/pts/"
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid, exec_id="tty"))
        stop_and_remove(daemon, cid)
        return res

    same_as_runc("exec-terminal-from-request", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_failed_exec_start_leaves_the_exec_created(daemon: Containerd, rootfs: str,
                                                   runtime: str) -> None:
    def scenario(r: str) -> dict:
        cid = new_id("execfail")
        assert ctr(daemon, "run", "-d", "--runtime", r, "--rootfs", rootfs, cid,
                   "/bin/sleep", "1000") == (0, "", "")
        wait_status(daemon, cid, "RUNNING")
        assert task_call(daemon, cid, "Exec",
                         exec_request(daemon, cid, "bad", ["/bin/nope"], False)) == b""
        start = task_call(daemon, cid, "Start", pb.StartRequest(id=cid, exec_id="bad"))
        assert isinstance(start, tuple) and start[0] == pyshim.UNKNOWN, start
        assert "OCI runtime exec failed" in start[1] and "/bin/nope" in start[1], start
        res = {"start code": start[0], "state": exec_state(daemon, cid, "bad")}
        assert res["state"] == 1, res  # CREATED
        res["delete"] = task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid, exec_id="bad"))
        res["delete"] = res["delete"] if isinstance(res["delete"], tuple) else "ok"
        stop_and_remove(daemon, cid)
        return res

    same_as_runc("failed-exec-start", runtime, scenario)

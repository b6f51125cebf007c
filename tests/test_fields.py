"""Task API fields and states that pyshim once answered differently from the Go shim
(the field-by-field survey of issue 13: docs/go-shim-parity.md).

Each scenario runs once per runtime through a real containerd, calling the shim's task
service as containerd does (``task_call``) where ctr has no command for the field, and
pyshim's outcome must equal the Go shim's (``same_as_runc``).
"""

from __future__ import annotations

import os
import select
import stat
import threading
from collections.abc import Iterator

import harness
import pytest
from harness import (
    RUNTIMES,
    Containerd,
    bundle_of,
    ctr,
    exec_request,
    exec_state,
    new_id,
    ok,
    pb_message,
    require_e2e,
    run_sleeper_id,
    run_without_pidns,
    same_as_runc,
    stop_and_remove,
    task_call,
    tasks_call,
    wait_for,
    wait_status,
)

import pyshim_pb2 as pb


def answer(raw: bytes | tuple[int, str]) -> str | tuple[int, str]:
    """A task_call's outcome: "ok", or the (code, message) of a refusal."""
    return "ok" if isinstance(raw, bytes) else raw


def run_sleeper(d: Containerd, runtime: str, rootfs: str, cid: str) -> int:
    assert ctr(d, "run", "-d", "--runtime", runtime, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000") == (0, "", "")
    return wait_status(d, cid, "RUNNING")


def start_exec(d: Containerd, cid: str, eid: str, args: list[str], **fields: str) -> None:
    req = exec_request(d, cid, eid, args, False)
    for name, value in fields.items():
        setattr(req, name, value)
    assert task_call(d, cid, "Exec", req) == b""
    assert answer(task_call(d, cid, "Start", pb.StartRequest(id=cid, exec_id=eid))) == "ok"


def state(d: Containerd, cid: str, eid: str = "") -> pb.StateResponse:
    raw = task_call(d, cid, "State", pb.StateRequest(id=cid, exec_id=eid))
    assert isinstance(raw, bytes), raw
    return pb.StateResponse.FromString(raw)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_illegal_start_and_delete_are_the_go_shims_refusals(daemon: Containerd, rootfs: str,
                                                            runtime: str) -> None:
    """Start or Delete in a state that forbids it: code Unknown and the words of the Go
    shim's init_state.go / exec_state.go, for the init and for an exec."""
    def scenario(r: str) -> dict:
        cid = new_id("refuse")
        run_sleeper(daemon, r, rootfs, cid)
        init = pb.StartRequest(id=cid)
        res = {"start running": answer(task_call(daemon, cid, "Start", init)),
               "delete running": answer(task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid)))}
        ok(daemon, "task", "pause", cid)
        res["start paused"] = answer(task_call(daemon, cid, "Start", init))
        res["delete paused"] = answer(task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid)))
        ok(daemon, "task", "resume", cid)
        start_exec(daemon, cid, "x", ["/bin/sleep", "1000"])
        # Not a second Start of the exec: the Go shims 1.7.24 and 2.1.9 then count
        # it twice and never publish the init's exit (docs/go-shim-parity.md).
        res["exec delete running"] = answer(task_call(daemon, cid, "Delete",
                                                      pb.DeleteRequest(id=cid, exec_id="x")))
        assert answer(task_call(daemon, cid, "Kill", pb.KillRequest(id=cid, exec_id="x", signal=9))) == "ok"
        wait_for(lambda: exec_state(daemon, cid, "x") == 3, 10, message="the exec never stopped")
        assert res["start running"] == (2, "cannot start a running process"), res
        stop_and_remove(daemon, cid)
        return res

    same_as_runc("illegal-start-delete", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_state_of_an_exec_in_a_paused_container(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """An exec of a paused container reads PAUSED (its own state again after Resume);
    StateResponse.exec_id stays empty; the bundle's options.json is the shim's alone (0600)."""
    def scenario(r: str) -> dict:
        cid = new_id("pstate")
        run_sleeper(daemon, r, rootfs, cid)
        start_exec(daemon, cid, "x", ["/bin/sleep", "1000"])
        start_exec(daemon, cid, "gone", ["/bin/true"])
        wait_for(lambda: exec_state(daemon, cid, "gone") == 3, 10, message="/bin/true never stopped")
        ok(daemon, "task", "pause", cid)
        s = state(daemon, cid, "x")
        res = {"paused": (state(daemon, cid).status, s.status, exec_state(daemon, cid, "gone")),
               "fields": (s.id, s.exec_id, s.pid > 0, s.bundle == bundle_of(daemon, cid)),
               # not exited: Go's zero time (0001-01-01), never an unset field
               "exited_at": (s.HasField("exited_at"), s.exited_at.seconds)}
        ok(daemon, "task", "resume", cid)
        res["resumed"] = (state(daemon, cid).status, exec_state(daemon, cid, "x"),
                          exec_state(daemon, cid, "gone"))
        res["options.json mode"] = oct(stat.S_IMODE(os.stat(os.path.join(bundle_of(daemon, cid),
                                                                          "options.json")).st_mode))
        assert res["paused"] == (4, 4, 4) and res["resumed"] == (2, 2, 3), res
        stop_and_remove(daemon, cid)
        return res

    same_as_runc("exec-state-paused", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_resize_and_close_io(daemon: Containerd, rootfs: str, runtime: str, tmp_path) -> None:
    """ResizePty of a stopped init (without a terminal) is accepted, of a stopped exec
    refused; CloseIO closes stdin whatever its `stdin` field says."""
    def scenario(r: str) -> dict:
        cid = new_id("rsz")
        run_sleeper(daemon, r, rootfs, cid)
        fifo, out = (os.path.join(str(tmp_path), f"{cid}.{n}") for n in ("in", "out"))
        os.mkfifo(fifo)
        os.mkfifo(out)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(open(out, "rb").read()), daemon=True)
        reader.start()
        keep = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer until the shim has its own
        try:
            # The Go shim needs stdout and stderr beside stdin ("opening file \"\"" otherwise).
            start_exec(daemon, cid, "cat", ["/bin/cat"], stdin=fifo, stdout=out, stderr=out)
            os.write(keep, b"hello\n")
        finally:
            os.close(keep)
        assert exec_state(daemon, cid, "cat") == 2
        res = {"close io": answer(task_call(daemon, cid, "CloseIO",
                                            pb.CloseIORequest(id=cid, exec_id="cat", stdin=False)))}
        wait_for(lambda: exec_state(daemon, cid, "cat") == 3, 10,
                 message=f"{r}: cat never saw EOF after CloseIO(stdin=false)")
        reader.join(10)
        res["cat's output"] = got
        size = {"width": 80, "height": 24}
        res["resize stopped exec"] = answer(task_call(daemon, cid, "ResizePty",
                                                      pb.ResizePtyRequest(id=cid, exec_id="cat", **size)))
        ok(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        res["resize stopped init"] = answer(task_call(daemon, cid, "ResizePty",
                                                      pb.ResizePtyRequest(id=cid, **size)))
        assert res["resize stopped init"] == "ok", res
        task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid, exec_id="cat"))
        ok(daemon, "task", "rm", cid)
        ok(daemon, "containers", "rm", cid)
        return res

    same_as_runc("resize-close-io", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_wait_returns_after_a_failed_exec_start(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """Once runc exec has failed, Wait on the exec returns at once (status 0, Go's zero
    time) though the exec stays created; its Delete answers the same."""
    def scenario(r: str) -> dict:
        cid = new_id("waitfail")
        run_sleeper(daemon, r, rootfs, cid)
        assert task_call(daemon, cid, "Exec", exec_request(daemon, cid, "bad", ["/bin/nope"], False)) == b""
        start = task_call(daemon, cid, "Start", pb.StartRequest(id=cid, exec_id="bad"))
        assert isinstance(start, tuple), start
        raw = task_call(daemon, cid, "Wait", pb.WaitRequest(id=cid, exec_id="bad"))
        assert isinstance(raw, bytes), f"{r}: Wait did not return: {raw}"
        w = pb.WaitResponse.FromString(raw)
        res = {"wait": (w.exit_status, w.HasField("exited_at"), w.exited_at.seconds),
               "state": exec_state(daemon, cid, "bad")}
        raw = task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid, exec_id="bad"))
        assert isinstance(raw, bytes), raw
        gone = pb.DeleteResponse.FromString(raw)
        res["delete"] = (gone.pid, gone.exit_status, gone.HasField("exited_at"), gone.exited_at.seconds)
        stop_and_remove(daemon, cid)
        return res

    same_as_runc("wait-failed-exec", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exec_in_a_created_container(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """A task created and not started takes an exec, and its Start runs runc exec."""
    def scenario(r: str) -> dict:
        cid = new_id("crexec")
        ok(daemon, "container", "create", "--runtime", r, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
        tasks_call(daemon, "Create", pb_message((1, cid)))
        assert state(daemon, cid).status == 1
        res = {"exec": answer(task_call(daemon, cid, "Exec",
                                        exec_request(daemon, cid, "x", ["/bin/sh", "-c", "exit 7"], False)))}
        res["start"] = answer(task_call(daemon, cid, "Start", pb.StartRequest(id=cid, exec_id="x")))
        if res["start"] == "ok":
            wait_for(lambda: exec_state(daemon, cid, "x") == 3, 10, message=f"{r}: the exec never stopped")
            res["exit"] = state(daemon, cid, "x").exit_status
        else:
            res["start"] = res["start"][0]  # runc's words include a pid
        res["init"] = state(daemon, cid).status
        task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid, exec_id="x"))
        ctr(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        ok(daemon, "task", "rm", cid)
        ok(daemon, "containers", "rm", cid)
        return res

    same_as_runc("exec-in-created", runtime, scenario)


@pytest.fixture(scope="module")
def slow_pause_daemon(tmp_path_factory) -> Iterator[Containerd]:
    """A private containerd whose PATH finds a `runc` that takes a second longer over
    `pause` (both shims look runc up on containerd's PATH)."""
    require_e2e()
    bin_dir = str(tmp_path_factory.mktemp("slowrunc"))
    with open(os.path.join(bin_dir, "runc"), "w") as f:
        f.write(f'#!/bin/sh\nfor a; do [ "$a" = pause ] && sleep 1; done\nexec {harness.RUNC_BINARY} "$@"\n')
    os.chmod(os.path.join(bin_dir, "runc"), 0o755)
    d = Containerd(extra_path=[bin_dir])
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_state_reads_pausing_while_runc_pauses(slow_pause_daemon: Containerd, rootfs: str,
                                               runtime: str) -> None:
    """While `runc pause` runs, State says PAUSING (5) for the init, PAUSED (4) for an exec."""
    d = slow_pause_daemon

    def scenario(r: str) -> dict:
        cid = new_id("pausing")
        run_sleeper(d, r, rootfs, cid)
        start_exec(d, cid, "x", ["/bin/sleep", "1000"])
        pausing = threading.Thread(target=ok, args=(d, "task", "pause", cid))
        pausing.start()
        init = wait_for(lambda: (s := state(d, cid).status) != 2 and s, 10, interval=0.02,
                        message=f"{r}: the task never left RUNNING")
        seen = (init, exec_state(d, cid, "x"))  # runc pause sleeps a second before it starts
        pausing.join(10)
        res = {"while pausing": seen, "after": (state(d, cid).status, exec_state(d, cid, "x"))}
        ok(d, "task", "resume", cid)
        # The init reads PAUSING, its exec PAUSED (observed on every line's Go shim).
        assert res == {"while pausing": (5, 4), "after": (4, 4)}, res
        stop_and_remove(d, cid)
        return res

    same_as_runc("pausing", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exec_refusals_at_exec_time(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """Exec of a stopped task: code Unknown, the Go shim's words; an exec whose process
    spec is no JSON is refused at Exec (code Unknown; the parser's words differ)."""
    def scenario(r: str) -> dict:
        cid = new_id("exref")
        run_sleeper(daemon, r, rootfs, cid)
        bad = exec_request(daemon, cid, "bad", ["/bin/true"], False)
        bad.spec.value = b'{"args": ["/bin/true"'
        res = {"no json": answer(task_call(daemon, cid, "Exec", bad))}
        res["no json"] = res["no json"] if res["no json"] == "ok" else res["no json"][0]
        ok(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        res["stopped"] = answer(task_call(daemon, cid, "Exec",
                                          exec_request(daemon, cid, "late", ["/bin/true"], False)))
        assert res == {"no json": 2, "stopped": (2, "cannot exec in a stopped state")}, res
        ok(daemon, "task", "rm", cid)
        ok(daemon, "containers", "rm", cid)
        return res

    same_as_runc("exec-refusals", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_io_uid_and_gid_own_the_exec_pipes_too(daemon: Containerd, rootfs: str, runtime: str,
                                               tmp_path) -> None:
    """Runtime options IoUid/IoGid (containerd.runc.v1.Options through Tasks.Create): the
    pipes of the init and of every exec are theirs; /dev/null is nobody's business."""
    def scenario(r: str) -> dict:
        cid = new_id("iouid")
        ok(daemon, "container", "create", "--runtime", r, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
        opts = pb.RuncOptions(io_uid=1234, io_gid=2345).SerializeToString()
        any_opts = pb_message((1, "containerd.runc.v1.Options"), (2, opts))
        null_before = os.stat("/dev/null")
        tasks_call(daemon, "Create", pb_message((1, cid), (9, any_opts)))
        tasks_call(daemon, "Start", pb_message((1, cid)))
        wait_status(daemon, cid, "RUNNING")
        out = os.path.join(str(tmp_path), f"{cid}.out")
        os.mkfifo(out)
        # Held open read-write: the shim's opens never wait for a reader, and no
        # open-and-close of the shim's (the Go shim 2.x opens the fifo more than
        # once) ends the reading early; once seen, a blocking reader thread hung
        # the Go shim's Start.
        fifo = os.open(out, os.O_RDWR | os.O_NONBLOCK)
        try:
            start_exec(daemon, cid, "own", ["/bin/stat", "-L", "-c", "%u:%g", "/proc/self/fd/1"],
                       stdout=out, stderr=out)
            wait_for(lambda: exec_state(daemon, cid, "own") == 3, 10, message=f"{r}: stat never exited")
            data = b""
            while not data.endswith(b"\n") and select.select([fifo], [], [], 10)[0]:
                data += os.read(fifo, 4096)
        finally:
            os.close(fifo)
        got = [data]
        null_after = os.stat("/dev/null")
        res = {"exec stdout owner": got, "/dev/null kept":
               (null_after.st_uid, null_after.st_gid) == (null_before.st_uid, null_before.st_gid)}
        # runc hands the uid of a stdio pipe to the process's user (root here) and keeps
        # its gid: the gid shows the shim's chown.
        assert res == {"exec stdout owner": [b"0:2345\n"], "/dev/null kept": True}, res
        task_call(daemon, cid, "Delete", pb.DeleteRequest(id=cid, exec_id="own"))
        stop_and_remove(daemon, cid)
        return res

    same_as_runc("io-uid-gid", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_stats_of_a_task_that_has_exited(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """Stats (`ctr task metrics`) of a task whose init has exited, before Delete: the
    cgroup it was in still answers."""
    def scenario(r: str) -> dict:
        cid = new_id("stopstat")
        run_sleeper(daemon, r, rootfs, cid)
        ok(daemon, "task", "kill", "-s", "KILL", cid)
        wait_status(daemon, cid, "STOPPED")
        code, out, err = ctr(daemon, "task", "metrics", cid)
        res = {"metrics": (code, out.split()[:2], err)}
        assert res["metrics"] == (0, ["ID", "TIMESTAMP"], ""), res
        ok(daemon, "task", "rm", cid)
        ok(daemon, "containers", "rm", cid)
        return res

    same_as_runc("stats-after-exit", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_deleting_the_groups_first_container(daemon: Containerd, rootfs: str, runtime: str,
                                             tmp_path) -> None:
    """A group of A (the shim's own id) and B (no pid namespace of its own): deleting A
    ends in a Shutdown naming A, and B runs on, with the Go shims 1.6.20, 1.7.24 and
    2.1.9 alike (a newer 2.x source kills and force-deletes B there first:
    docs/go-shim-parity.md)."""
    def scenario(r: str) -> dict:
        group = new_id("sgrp")
        a, b = new_id("first"), new_id("nopid")
        run_sleeper_id(daemon, r, rootfs, a, "--annotation", f"io.containerd.runc.v2.group={group}")
        marker = str(300000 + os.getpid() % 1000)
        b_pid = run_without_pidns(daemon, r, rootfs, tmp_path, b, f"exec /bin/sleep {marker}",
                                  annotations={"io.containerd.runc.v2.group": group})
        assert harness.bundle_address(bundle_of(daemon, b)) == harness.bundle_address(bundle_of(daemon, a))
        ok(daemon, "task", "kill", "-s", "KILL", a)
        wait_status(daemon, a, "STOPPED")
        ok(daemon, "task", "rm", a)  # Delete, then Shutdown(A), before ctr returns
        res = {"B alive after rm A": harness._alive(b_pid), "B's task": daemon.tasks().get(b)}
        assert res == {"B alive after rm A": True, "B's task": "RUNNING"}, res
        stop_and_remove(daemon, b)
        ok(daemon, "containers", "rm", a)
        return res

    same_as_runc("group-shutdown", runtime, scenario)

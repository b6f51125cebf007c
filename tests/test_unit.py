"""Unit and component tests of pyshim that need no containerd.

Sections: frame codec, C core, reaper (in child interpreters, so that the subreaper
and the SIGCHLD handler never touch the pytest process), process state machines and
the task service's ordering, runtime option decoding, CLI pieces, event publisher,
and the installed binary. The ttrpc server is tested in test_ttrpc.py.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import inspect
import itertools
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from unittest import mock

import pytest
import uvloop
from google.protobuf import any_pb2, empty_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pyshim
import pyshim_pb2 as pb

BINARY = "containerd-shim-pyshim-v1"


def _run(argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kw)


# =============================================================================
# Frame codec
# =============================================================================


def test_encode_frame_wire_format() -> None:
    assert pyshim.encode_frame(1, 1, b"abc") == b"\x00\x00\x00\x03\x00\x00\x00\x01\x01\x00abc"
    assert pyshim.encode_frame(0x01020304, 2, b"", 0x05) == b"\x00\x00\x00\x00\x01\x02\x03\x04\x02\x05"
    assert pyshim.HEADER.size == 10


def test_roundtrip_one_frame() -> None:
    dec = pyshim.FrameDecoder()
    assert dec.feed(pyshim.encode_frame(7, 1, b"payload", 3)) == [(7, 1, 3, b"payload")]
    assert dec.feed(b"") == []
    assert dec.feed(pyshim.encode_frame(9, 2, b"")) == [(9, 2, 0, b"")]


FRAMES = [(1, 1, 0, b"first"), (3, 1, 1, b""), (5, 3, 0, bytes(range(256))), (7, 2, 0, b"x" * 1000)]
WIRE = b"".join(pyshim.encode_frame(sid, t, p, f) for sid, t, f, p in FRAMES)


def test_several_frames_in_one_chunk() -> None:
    assert pyshim.FrameDecoder().feed(WIRE) == FRAMES


def test_split_at_every_byte_boundary() -> None:
    for cut in range(len(WIRE) + 1):
        dec = pyshim.FrameDecoder()
        out = dec.feed(WIRE[:cut]) + dec.feed(WIRE[cut:])
        assert out == FRAMES, f"split at {cut}"


def test_split_at_every_pair_of_boundaries_of_a_small_stream() -> None:
    wire = pyshim.encode_frame(1, 1, b"ab") + pyshim.encode_frame(3, 1, b"cde")
    want = [(1, 1, 0, b"ab"), (3, 1, 0, b"cde")]
    for a, b in itertools.combinations_with_replacement(range(len(wire) + 1), 2):
        dec = pyshim.FrameDecoder()
        assert dec.feed(wire[:a]) + dec.feed(wire[a:b]) + dec.feed(wire[b:]) == want, (a, b)


def test_byte_by_byte() -> None:
    dec = pyshim.FrameDecoder()
    out = []
    for i in range(len(WIRE)):
        out += dec.feed(WIRE[i:i + 1])
    assert out == FRAMES


def test_frame_of_exactly_max_size_is_decoded() -> None:
    body = b"\x01" * pyshim.MAX_MESSAGE
    out = pyshim.FrameDecoder().feed(pyshim.encode_frame(1, 1, body))
    assert len(out) == 1 and out[0][3] == body


def _discard(dec: pyshim.FrameDecoder, length: int, chunk: int) -> list:
    """Feeds `length` zero bytes in `chunk`-sized pieces, checking memory stays bounded."""
    block = memoryview(bytes(chunk))
    out = []
    while length:
        n = min(length, chunk)
        out += dec.feed(block[:n])
        length -= n
        assert len(dec._buf) <= pyshim.HEADER.size, "the discarded body is being buffered"
    return out


def test_oversized_frame_is_discarded_and_reported_once() -> None:
    dec = pyshim.FrameDecoder()
    big = pyshim.MAX_MESSAGE + 1
    out = dec.feed(pyshim.HEADER.pack(big, 5, 1, 0) + b"\0" * 100)
    assert out == []
    assert dec.oversized_length == big
    out += _discard(dec, big - 100, 1 << 16)
    assert out == [(5, 1, 0, None)]
    assert dec.oversized_length == 0
    assert dec.feed(pyshim.encode_frame(7, 1, b"next")) == [(7, 1, 0, b"next")]


def test_oversized_frame_followed_by_frame_in_the_same_chunk() -> None:
    big = pyshim.MAX_MESSAGE + 10
    wire = pyshim.HEADER.pack(big, 1, 1, 0) + bytes(big) + pyshim.encode_frame(3, 1, b"ok")
    assert pyshim.FrameDecoder().feed(wire) == [(1, 1, 0, None), (3, 1, 0, b"ok")]


def test_header_announcing_4_gib_is_discarded_with_bounded_memory() -> None:
    dec = pyshim.FrameDecoder()
    length = 0xFFFFFFFF
    assert dec.feed(pyshim.HEADER.pack(length, 11, 1, 0)) == []
    assert dec.oversized_length == length
    out = _discard(dec, length, 16 << 20)
    assert out == [(11, 1, 0, None)]
    assert dec.feed(pyshim.encode_frame(13, 1, b"still here")) == [(13, 1, 0, b"still here")]


_frame_st = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255),
    st.one_of(st.binary(max_size=48), st.binary(min_size=49, max_size=200)),
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(_frame_st, max_size=8), data=st.data())
def test_property_random_chunkings_decode_the_same(frames: list, data: st.DataObject) -> None:
    limit = 48  # MAX_MESSAGE made small, so oversized frames are cheap to generate
    wire = b"".join(pyshim.encode_frame(sid, t, p, f) for sid, t, f, p in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts"))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)])]
    with mock.patch.object(pyshim, "MAX_MESSAGE", limit):
        dec = pyshim.FrameDecoder()
        out = []
        for c in chunks:
            out += dec.feed(c)
            assert len(dec._buf) < pyshim.HEADER.size + limit
    assert out == [(sid, t, f, p if len(p) <= limit else None) for sid, t, f, p in frames]


# =============================================================================
# C core
# =============================================================================


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="pysh-", dir="/tmp")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def _accept_and_talk(lfd: int, name: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    lsock = socket.socket(fileno=lfd)
    try:
        cfd = pyshim.unix_connect(name)
        client = socket.socket(fileno=cfd)
        server, _ = lsock.accept()
        with client, server:
            client.sendall(b"ping")
            assert server.recv(4) == b"ping"
            return pyshim.peer_cred(server.fileno()), pyshim.peer_cred(client.fileno())
    finally:
        lsock.close()


def test_unix_listen_and_connect_on_a_path(sockdir: str) -> None:
    path = os.path.join(sockdir, "s.sock")
    lfd = pyshim.unix_listen(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert not os.get_inheritable(lfd)  # close-on-exec
    me = (os.getpid(), os.getuid(), os.getgid())
    assert _accept_and_talk(lfd, path) == (me, me)


def test_unix_listen_and_connect_on_an_abstract_name(sockdir: str) -> None:
    name = f"@pyshim-test-{os.getpid()}-abstract"
    lfd = pyshim.unix_listen(name)
    assert socket.socket(fileno=os.dup(lfd)).getsockname() == b"\0" + name[1:].encode()
    assert not os.path.exists(name)
    me = (os.getpid(), os.getuid(), os.getgid())
    assert _accept_and_talk(lfd, name) == (me, me)


def test_unix_connect_nonblocking(sockdir: str) -> None:
    path = os.path.join(sockdir, "nb.sock")
    lfd = pyshim.unix_listen(path)
    fd = pyshim.unix_connect(path, nonblock=True)
    try:
        assert not os.get_blocking(fd)
    finally:
        os.close(fd)
        os.close(lfd)


def test_unix_connect_errors(sockdir: str) -> None:
    with pytest.raises(FileNotFoundError):
        pyshim.unix_connect(os.path.join(sockdir, "absent"))
    with pytest.raises(OSError) as ei:
        pyshim.unix_connect("")
    assert ei.value.errno == errno.EINVAL
    path = os.path.join(sockdir, "taken")
    lfd = pyshim.unix_listen(path)
    try:
        with pytest.raises(OSError) as ei:
            pyshim.unix_listen(path)
        assert ei.value.errno == errno.EADDRINUSE
    finally:
        os.close(lfd)


def test_path_length_limits(sockdir: str) -> None:
    longest = os.path.join(sockdir, "x" * (107 - len(sockdir) - 1))
    assert len(longest) == 107  # sun_path is 108 bytes with the NUL
    os.close(pyshim.unix_listen(longest))
    for fn in (pyshim.unix_listen, pyshim.unix_connect):
        with pytest.raises(OSError) as ei:
            fn(longest + "y")
        assert ei.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as ei:
            fn("/tmp/" + "z" * 300)
        assert ei.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as ei:
            fn("@" + "a" * 108)  # abstract: 108 bytes of name + its leading NUL
        assert ei.value.errno == errno.ENAMETOOLONG


def test_send_fd_and_recv_fd_pass_a_pipe() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    with a, b:
        assert pyshim.send_fd(a.fileno(), w, b"hello") == 5
        data, fd = pyshim.recv_fd(b.fileno())
        try:
            assert data == b"hello"
            assert fd >= 0 and fd != w
            assert not os.get_inheritable(fd)  # received close-on-exec
            os.close(w)
            os.write(fd, b"through the passed fd")
        finally:
            os.close(fd)
        assert os.read(r, 100) == b"through the passed fd"
        assert os.read(r, 100) == b""  # the passed fd was the last write end
        os.close(r)
        # Without a payload one zero byte carries the fd.
        r2, w2 = os.pipe()
        assert pyshim.send_fd(a.fileno(), r2) == 1
        data, fd = pyshim.recv_fd(b.fileno())
        assert data == b"\0" and fd >= 0
        os.write(w2, b"x")
        assert os.read(fd, 1) == b"x"
        for x in (fd, r2, w2):
            os.close(x)
        # A message without an fd, then EOF.
        a.sendall(b"plain")
        assert pyshim.recv_fd(b.fileno()) == (b"plain", -1)
        a.shutdown(socket.SHUT_WR)
        assert pyshim.recv_fd(b.fileno()) == (b"", -1)


def test_send_fd_errors_become_oserror() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(OSError) as ei:
            pyshim.send_fd(a.fileno(), 9999)
        assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        pyshim.peer_cred(9999)
    assert ei.value.errno == errno.EBADF


def test_malloc_trim_runs() -> None:
    assert pyshim.malloc_trim() is None
    assert pyshim._lib.reaper_malloc_trim(0) in (0, 1)


# =============================================================================
# Reaper, in a child interpreter (subreaper and SIGCHLD handler are per process)
# =============================================================================

REAPER_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys, time
    sys.path.insert(0, {repo!r})
    import uvloop
    import pyshim

    mode = sys.argv[1]
    pyshim.set_subreaper()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    exits = []
    reaper = pyshim.Reaper(loop, lambda pid, code: exits.append((pid, code)))
    null = os.open(os.devnull, os.O_RDWR)
    std = (null, null, null)

    def until(pred, timeout=10.0):
        async def poll():
            end = time.monotonic() + timeout
            while not pred():
                if time.monotonic() > end:
                    raise TimeoutError("gave up waiting: " + repr(exits))
                await asyncio.sleep(0.01)
        loop.run_until_complete(poll())

    out = {{}}
    if mode == "codes":
        pids, futs = [], []
        for cmd in ("exit 7", "exit 0", "kill -TERM $$", "kill -KILL $$"):
            pid = pyshim.spawn(["/bin/sh", "-c", cmd], std)
            pids.append(pid)
            futs.append(reaper.watch(pid))
        unwatched = pyshim.spawn(["/bin/sh", "-c", "exit 3"], std)
        out["codes"] = loop.run_until_complete(asyncio.wait_for(asyncio.gather(*futs), 10))
        until(lambda: exits)
        out["exits"] = exits
        out["unwatched"] = unwatched
    elif mode == "orphan":
        pidfile = sys.argv[2]
        parent = pyshim.spawn(["/bin/sh", "-c", "(sleep 1; exit 5) & echo $! > " + pidfile], std)
        out["parent_code"] = loop.run_until_complete(asyncio.wait_for(reaper.watch(parent), 10))
        orphan = int(open(pidfile).read())
        out["orphan"] = orphan
        out["alive_after_parent"] = os.path.exists(f"/proc/{{orphan}}")
        out["orphan_ppid"] = int(open(f"/proc/{{orphan}}/stat").read().rsplit(")", 1)[1].split()[1])
        out["me"] = os.getpid()
        until(lambda: exits)
        out["exits"] = exits
    elif mode == "many":
        n = int(sys.argv[2])
        r, w = os.pipe()
        pids, futs = [], {{}}
        for i in range(n):
            pid = pyshim.spawn(["/bin/sh", "-c", f"read x; exit {{i % 100}}"], (r, null, null))
            pids.append(pid)
            if i % 2 == 0:
                futs[pid] = reaper.watch(pid)
        os.close(r)
        os.close(w)  # every child reads EOF and exits, all at once
        # Let them all become zombies before the loop runs: one reap() call
        # must then collect more than BATCH of them.
        end = time.monotonic() + 20
        def state(pid):
            try:
                return open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                return "gone"
        while any(state(p) != "Z" for p in pids):
            assert time.monotonic() < end, "children did not exit"
            time.sleep(0.01)
        want_unwatched = n - len(futs)
        until(lambda: len(exits) == want_unwatched and all(f.done() for f in futs.values()))
        got = dict(exits)
        got.update({{pid: f.result() for pid, f in futs.items()}})
        out["ok"] = got == {{pid: i % 100 for i, pid in enumerate(pids)}}
        out["count"] = len(got)
        out["batch"] = reaper.BATCH
    print(json.dumps(out))
""").format(repo=REPO)


def _reaper_child(*args: str) -> dict:
    res = _run([sys.executable, "-c", REAPER_SCRIPT, *args], timeout=45)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_reaper_delivers_exit_codes_and_signal_deaths() -> None:
    out = _reaper_child("codes")
    assert out["codes"] == [7, 0, 128 + 15, 128 + 9]
    assert out["exits"] == [[out["unwatched"], 3]]  # not watched: goes to on_exit


def test_reaper_reaps_a_real_orphan_as_subreaper(tmp_path) -> None:
    out = _reaper_child("orphan", str(tmp_path / "orphan.pid"))
    assert out["parent_code"] == 0
    assert out["alive_after_parent"], "the grandchild did not outlive its parent"
    assert out["orphan_ppid"] == out["me"], "the orphan was not re-parented to the subreaper"
    assert out["exits"] == [[out["orphan"], 5]]


def test_reaper_reaps_more_than_a_batch_at_once() -> None:
    out = _reaper_child("many", "150")
    assert out["count"] == 150
    assert out["batch"] < 150
    assert out["ok"]


# =============================================================================
# Processes: state machine, and the task service's ordering rules
# =============================================================================

C, R, P, S, D = pyshim.CREATED, pyshim.RUNNING, pyshim.PAUSED, pyshim.STOPPED, pyshim.DELETED
EVENTS = ("start", "exit", "delete", "pause", "resume", "update")
LEGAL = {
    (C, "start"): R, (C, "exit"): S, (C, "delete"): D,
    (R, "exit"): S, (R, "pause"): P,
    (P, "resume"): R, (P, "exit"): S,
    (S, "delete"): D,
    # Update leaves the state as it is.
    (C, "update"): C, (R, "update"): R, (P, "update"): P,
}
# Illegal pause/resume/update calls answer as the Go shim does: code Unknown, its words.
GO_REFUSALS = {
    (C, "pause"): "cannot pause task in created state",
    (C, "resume"): "cannot resume task in created state",
    (R, "resume"): "cannot resume a running process",
    (P, "pause"): "cannot pause a paused container",
    (S, "pause"): "cannot pause a stopped container",
    (S, "resume"): "cannot resume a stopped container",
    (S, "update"): "cannot update a stopped container",
}


@pytest.fixture
def loop():
    lp = uvloop.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()


def _container(loop, cid: str = "c1", bundle: str = "/nonexistent/bundle") -> pyshim.Container:
    c = pyshim.Container(cid, bundle, pyshim.Runc("/bin/false", "/run/pyshim-test", bundle))
    c.init = pyshim.Process(cid, c, pyshim.Stdio(loop, "", "", ""), loop)
    return c


def test_transition_table_is_exactly_the_legal_set() -> None:
    assert pyshim.TRANSITIONS == LEGAL


@pytest.mark.parametrize(("state", "event"), list(itertools.product((C, R, P, S, D), EVENTS)))
def test_every_transition(loop, state: str, event: str) -> None:
    p = _container(loop).init
    p.state = state
    if (state, event) in LEGAL:
        assert p.check(event) == LEGAL[state, event]
        p.transition(event)
        assert p.state == LEGAL[state, event]
    elif (state, event) in GO_REFUSALS:
        with pytest.raises(pyshim.ShimError) as ei:
            p.transition(event)
        assert p.state == state
        assert (ei.value.code, str(ei.value)) == (pyshim.UNKNOWN, GO_REFUSALS[state, event])
    else:
        with pytest.raises(pyshim.FailedPrecondition) as ei:
            p.transition(event)
        assert p.state == state  # an illegal call changes nothing
        assert event in str(ei.value) and state in str(ei.value)
        assert ei.value.code == pyshim.FAILED_PRECONDITION


def test_clear_messages_for_common_mistakes(loop) -> None:
    p = _container(loop).init
    p.transition("start")
    with pytest.raises(pyshim.FailedPrecondition, match="cannot start a running process"):
        p.transition("start")
    with pytest.raises(pyshim.FailedPrecondition, match="cannot delete a running process"):
        p.transition("delete")


def test_wait_resolves_once_with_the_exit_status(loop) -> None:
    p = _container(loop).init
    p.transition("start")
    assert not p.wait.done()
    p.set_exited(42, 1234)
    assert (p.wait.result(), p.exit_status, p.exited_at, p.state) == (42, 42, 1234, S)
    with pytest.raises(pyshim.FailedPrecondition):
        p.set_exited(7, 5678)  # a second exit is refused...
    assert (p.wait.result(), p.exit_status, p.exited_at) == (42, 42, 1234)  # ...and changes nothing


class FakeRunner:
    """Stands in for Runner: records runc calls, optionally acts during one."""

    def __init__(self, during=None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.during = during

    async def runc(self, rc, *args: str, what: str, stdio=None, input=None) -> bytes:
        self.calls.append(args)
        await asyncio.sleep(0)
        if self.during is not None:
            self.during(args)
        await asyncio.sleep(0)
        return b""


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bytes]] = []

    def publish(self, topic: str, type_url: str, value: bytes) -> None:
        self.events.append((topic, type_url, value))

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.events]


def _service(loop, runner=None) -> tuple[pyshim.TaskService, FakePublisher, pyshim.Container]:
    pub = FakePublisher()
    svc = pyshim.TaskService(loop, runner or FakeRunner(), pub, "ns1", lambda: None)
    c = _container(loop)
    c.init.pid = 4242
    svc.containers[c.id] = c
    svc.pids[c.init.pid] = c.init
    return svc, pub, c


def test_service_second_start_is_refused_without_running_runc(loop) -> None:
    runner = FakeRunner()
    svc, pub, c = _service(loop, runner)
    loop.run_until_complete(svc.start(pb.StartRequest(id="c1"), {}))
    assert runner.calls == [("start", "c1")]
    assert c.init.state == R and pub.topics() == ["/tasks/start"]
    with pytest.raises(pyshim.FailedPrecondition, match="cannot start a running process"):
        loop.run_until_complete(svc.start(pb.StartRequest(id="c1"), {}))
    assert runner.calls == [("start", "c1")]


def test_service_delete_of_a_running_process_is_refused(loop) -> None:
    runner = FakeRunner()
    svc, pub, c = _service(loop, runner)
    c.init.state = R
    with pytest.raises(pyshim.FailedPrecondition, match="running"):
        loop.run_until_complete(svc.delete(pb.DeleteRequest(id="c1"), {}))
    assert runner.calls == [] and "c1" in svc.containers and pub.events == []


def test_service_unknown_container_is_not_found(loop) -> None:
    svc, _, _ = _service(loop)
    with pytest.raises(pyshim.NotFound):
        loop.run_until_complete(svc.state(pb.StateRequest(id="nope"), {}))
    with pytest.raises(pyshim.NotFound):
        loop.run_until_complete(svc.state(pb.StateRequest(id="c1", exec_id="nope"), {}))


def test_exit_during_start_is_published_after_task_start(loop) -> None:
    holder: dict = {}

    def exit_now(args: tuple[str, ...]) -> None:
        if args[0] == "start":
            holder["svc"].on_exit(4242, 3)  # the reaper saw the exit while runc start ran

    svc, pub, c = _service(loop, FakeRunner(exit_now))
    holder["svc"] = svc
    loop.run_until_complete(svc.start(pb.StartRequest(id="c1"), {}))
    assert pub.topics() == ["/tasks/start", "/tasks/exit"]
    ev = pb.TaskExit()
    ev.ParseFromString(pub.events[1][2])
    assert (ev.container_id, ev.pid, ev.exit_status) == ("c1", 4242, 3)
    assert pub.events[1][1] == "containerd.events.TaskExit"
    assert c.init.wait.result() == 3
    resp = loop.run_until_complete(svc.wait(pb.WaitRequest(id="c1"), {}))
    assert resp.exit_status == 3


def test_exec_exit_is_published_before_the_init_exit(loop) -> None:
    svc, pub, c = _service(loop)
    c.init.state = R
    e = pyshim.Process("e1", c, pyshim.Stdio(loop, "", "", ""), loop)
    e.pid, e.state = 5151, R
    c.execs["e1"] = e
    c.running_execs = 1
    svc.pids[e.pid] = e
    svc.on_exit(4242, 137)  # the init dies first...
    assert pub.events == []  # ...but its exit is held
    svc.on_exit(5151, 1)
    assert pub.topics() == ["/tasks/exit", "/tasks/exit"]
    first, second = pb.TaskExit(), pb.TaskExit()
    first.ParseFromString(pub.events[0][2])
    second.ParseFromString(pub.events[1][2])
    assert (first.id, first.exit_status) == ("e1", 1)
    assert (second.id, second.exit_status) == ("c1", 137)
    assert (c.init.wait.result(), e.wait.result()) == (137, 1)


def test_exit_of_an_unknown_pid_is_stashed(loop) -> None:
    svc, pub, _ = _service(loop)
    svc.on_exit(999999, 9, 77)
    assert svc.stash == {999999: (9, 77)} and pub.events == []


# =============================================================================
# Runtime options
# =============================================================================


def _any(url: str, msg) -> any_pb2.Any:
    return any_pb2.Any(type_url=url, value=msg.SerializeToString())


@pytest.mark.parametrize("prefix", ["", "type.googleapis.com/"])
def test_decode_runc_v1_options(prefix: str) -> None:
    src = pb.RuncOptions(no_pivot_root=True, no_new_keyring=True, shim_cgroup="/shim", io_uid=1000,
                         io_gid=1001, binary_name="/usr/local/bin/crun", root="/run/alt",
                         systemd_cgroup=True, criu_image_path="/img", criu_work_path="/work")
    opts = pyshim.decode_options(_any(prefix + "containerd.runc.v1.Options", src))
    assert opts == src


@pytest.mark.parametrize("prefix", ["", "type.googleapis.com/"])
def test_decode_linux_runc_create_options(prefix: str) -> None:
    src = pb.LinuxCreateOptions(no_pivot_root=True, no_new_keyring=True, io_uid=2000, io_gid=2001,
                                shim_cgroup="/shim2", cgroups_mode="systemd", criu_image_path="/i",
                                criu_work_path="/w")
    opts = pyshim.decode_options(_any(prefix + "containerd.linux.runc.CreateOptions", src))
    assert opts.no_pivot_root and opts.no_new_keyring
    assert (opts.io_uid, opts.io_gid, opts.shim_cgroup) == (2000, 2001, "/shim2")
    assert opts.systemd_cgroup
    assert (opts.criu_image_path, opts.criu_work_path) == ("/i", "/w")
    assert opts.binary_name == "" and opts.root == ""  # not in CreateOptions: defaults


def test_decode_linux_create_options_cgroupfs_mode() -> None:
    src = pb.LinuxCreateOptions(cgroups_mode="cgroupfs")
    assert not pyshim.decode_options(_any("containerd.linux.runc.CreateOptions", src)).systemd_cgroup


def test_decode_unknown_type_url_is_invalid_argument() -> None:
    with pytest.raises(pyshim.InvalidArgument, match="example.Other"):
        pyshim.decode_options(any_pb2.Any(type_url="type.googleapis.com/example.Other", value=b"\x08\x01"))


@pytest.mark.parametrize("url", ["containerd.runc.v1.Options", "containerd.linux.runc.CreateOptions"])
def test_decode_corrupt_options_is_invalid_argument(url: str) -> None:
    """Found by bench/fuzz_ttrpc.py: a value that does not parse was answered INTERNAL."""
    with pytest.raises(pyshim.InvalidArgument, match="runtime options"):
        pyshim.decode_options(any_pb2.Any(type_url=url, value=b"\x0a\xff\xff\xff\x0f"))


def test_decode_empty_gives_defaults() -> None:
    assert pyshim.decode_options(None) == pb.RuncOptions()
    assert pyshim.decode_options(any_pb2.Any()) == pb.RuncOptions()


# =============================================================================
# CLI pieces
# =============================================================================


def test_flags_go_style() -> None:
    f = pyshim.Flags(["-namespace", "ns1", "-address", "/run/c.sock", "-publish-binary", "/bin/ctr",
                      "-id", "c1", "-bundle", "/b", "-socket", "unix:///s", "-debug", "start"])
    assert (f.namespace, f.address, f.publish_binary, f.id, f.bundle, f.socket) == (
        "ns1", "/run/c.sock", "/bin/ctr", "c1", "/b", "unix:///s")
    assert f.debug and not f.version and f.action == "start"


def test_flags_double_dash_and_equals() -> None:
    f = pyshim.Flags(["--namespace=ns2", "-id=x", "--debug=false", "delete"])
    assert (f.namespace, f.id, f.debug, f.action) == ("ns2", "x", False, "delete")


def test_flags_version_and_no_action() -> None:
    f = pyshim.Flags(["-v"])
    assert f.version and f.action == ""
    f = pyshim.Flags(["-namespace", "n", "-id", "i"])
    assert f.action == "" and not f.version and not f.debug


def test_flags_stop_at_the_action() -> None:
    f = pyshim.Flags(["-namespace", "n", "start", "-debug"])
    assert f.action == "start" and not f.debug


def test_flags_value_may_look_like_a_flag() -> None:
    assert pyshim.Flags(["-id", "-weird", "start"]).id == "-weird"


def test_flags_errors() -> None:
    with pytest.raises(SystemExit, match="flag provided but not defined: -bogus"):
        pyshim.Flags(["-bogus", "start"])
    with pytest.raises(SystemExit, match="flag needs an argument: -namespace"):
        pyshim.Flags(["-namespace"])


@pytest.mark.parametrize(("address", "ns", "group"), [
    ("/run/containerd/containerd.sock", "default", "c1"),
    ("/tmp/pysh/containerd.sock", "k8s.io", "sandbox-abc"),
])
def test_socket_path_is_sha256_of_address_namespace_group(address: str, ns: str, group: str) -> None:
    want = "/run/containerd/s/" + hashlib.sha256(f"{address}/{ns}/{group}".encode()).hexdigest()
    assert pyshim.socket_path(address, ns, group) == want
    assert len(want) <= 106


def _bundle(tmp_path, annotations: dict | None) -> str:
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}}
    if annotations is not None:
        spec["annotations"] = annotations
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return str(tmp_path)


def test_group_id_precedence(tmp_path) -> None:
    both = {"io.containerd.runc.v2.group": "g-runc", "io.kubernetes.cri.sandbox-id": "sb"}
    assert pyshim.group_id(_bundle(tmp_path, both), "cid") == "g-runc"
    assert pyshim.group_id(_bundle(tmp_path, {"io.kubernetes.cri.sandbox-id": "sb"}), "cid") == "sb"
    assert pyshim.group_id(_bundle(tmp_path, {"other": "x"}), "cid") == "cid"
    assert pyshim.group_id(_bundle(tmp_path, None), "cid") == "cid"
    assert pyshim.group_id(str(tmp_path / "no-such-bundle"), "cid") == "cid"


def test_parse_mount_options() -> None:
    lib = pyshim._lib
    flags, prop, data = pyshim.parse_mount_options(
        ["ro", "nosuid", "nodev", "rbind", "rprivate", "size=10m", "mode=755"])
    assert flags == lib.MS_RDONLY | lib.MS_NOSUID | lib.MS_NODEV | lib.MS_BIND | lib.MS_REC
    assert prop == lib.MS_PRIVATE | lib.MS_REC
    assert data == "size=10m,mode=755"
    flags, prop, data = pyshim.parse_mount_options(["ro", "rw", "noexec", "exec", "defaults"])
    assert (flags, prop, data) == (0, 0, "")  # later options clear earlier ones
    assert pyshim.parse_mount_options([]) == (0, 0, "")
    assert pyshim.parse_mount_options(["shared"])[1] == lib.MS_SHARED


@pytest.mark.parametrize("bad", ["../x", "", ".x", "-x", "_x", "a/b", "a b", "x" * 77, "é", "a\0b"])
def test_valid_id_rejects(bad: str) -> None:
    with pytest.raises(pyshim.InvalidArgument):
        pyshim._valid_id("exec id", bad)


@pytest.mark.parametrize("good", ["a", "exec-1.2_x", "A" * 76, "0abc"])
def test_valid_id_accepts(good: str) -> None:
    assert pyshim._valid_id("exec id", good) == good


# =============================================================================
# Events
# =============================================================================

SAMPLE_EVENTS = [
    ("/tasks/create", pb.TaskCreate(container_id="c1", bundle="/b", pid=10)),
    ("/tasks/start", pb.TaskStart(container_id="c1", pid=10)),
    ("/tasks/exec-added", pb.TaskExecAdded(container_id="c1", exec_id="e1")),
    ("/tasks/exec-started", pb.TaskExecStarted(container_id="c1", exec_id="e1", pid=11)),
    ("/tasks/exit", pb.TaskExit(container_id="c1", id="e1", pid=11, exit_status=1)),
    ("/tasks/exit", pb.TaskExit(container_id="c1", id="c1", pid=10, exit_status=137)),
    ("/tasks/delete", pb.TaskDelete(container_id="c1", pid=10, exit_status=137)),
]


def _publish_all(pub: pyshim.Publisher, events) -> None:
    for topic, msg in events:
        assert pub.publish(topic, "containerd.events." + type(msg).__name__, msg.SerializeToString()) is None


class FakeContainerd:
    """containerd's events service, Forward only, on a unix socket that may come and go."""

    def __init__(self, loop, path: str) -> None:
        self.loop = loop
        self.path = path
        self.got: list[tuple[pb.ForwardRequest, dict]] = []
        self.gate: asyncio.Event | None = None
        self.server: pyshim.TtrpcServer | None = None

    async def up(self) -> None:
        async def forward(req: pb.ForwardRequest, meta: dict) -> empty_pb2.Empty:
            if self.gate is not None:
                await self.gate.wait()
            self.got.append((req, meta))
            return empty_pb2.Empty()

        if os.path.exists(self.path):
            os.unlink(self.path)
        self.server = pyshim.TtrpcServer(self.loop, {
            (pyshim.EVENTS_SERVICE, "Forward"): (pb.ForwardRequest, forward)})
        await self.server.serve_fd(pyshim.unix_listen(self.path))

    async def down(self) -> None:
        await self.server.shutdown(0.5)


def _check_delivered(got: list, events: list, ns: str) -> None:
    assert [req.envelope.topic for req, _ in got] == [t for t, _ in events]
    stamps = []
    for (req, meta), (_, msg) in zip(got, events):
        env = req.envelope
        assert env.namespace == ns
        assert meta.get("containerd-namespace-ttrpc") == ns
        assert env.event.type_url == "containerd.events." + type(msg).__name__
        decoded = type(msg)()
        decoded.ParseFromString(env.event.value)
        assert decoded == msg
        stamps.append(env.timestamp.ToNanoseconds())
    assert all(stamps) and stamps == sorted(stamps)


def test_publisher_queues_while_containerd_is_down_then_delivers_in_order(sockdir: str) -> None:
    path = os.path.join(sockdir, "containerd.sock.ttrpc")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fake = FakeContainerd(loop, path)
        pub = pyshim.Publisher(loop, None, "ns1", "unix://" + path, "", "")
        assert not inspect.iscoroutinefunction(pub.publish)
        pub.start()
        _publish_all(pub, SAMPLE_EVENTS[:3])
        assert not await pub.flush(0.3)  # containerd is down: nothing can be delivered
        _publish_all(pub, SAMPLE_EVENTS[3:])
        await fake.up()
        assert await pub.flush(15)
        _check_delivered(fake.got, SAMPLE_EVENTS, "ns1")
        assert not pub.queue
        await fake.down()
        pub.task.cancel()

    uvloop.run(main())


def test_publisher_never_waits_for_a_slow_containerd_and_reconnects(sockdir: str) -> None:
    path = os.path.join(sockdir, "containerd.sock.ttrpc")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fake = FakeContainerd(loop, path)
        await fake.up()
        fake.gate = asyncio.Event()  # containerd accepts, then sits on the first event
        pub = pyshim.Publisher(loop, None, "ns2", path, "", "")
        pub.start()
        _publish_all(pub, SAMPLE_EVENTS[:1])
        await asyncio.sleep(0.1)
        _publish_all(pub, SAMPLE_EVENTS[1:4])  # returns at once though delivery is stuck
        assert len(pub.queue) == 4 and fake.got == []
        fake.gate.set()
        fake.gate = None
        assert await pub.flush(10)
        # containerd goes away (connections closed) and comes back
        await fake.down()
        _publish_all(pub, SAMPLE_EVENTS[4:])
        assert not await pub.flush(0.3)
        await fake.up()
        assert await pub.flush(15)
        _check_delivered(fake.got, SAMPLE_EVENTS, "ns2")
        await fake.down()
        pub.task.cancel()

    uvloop.run(main())


def test_publisher_queue_is_bounded_dropping_the_oldest() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pub = pyshim.Publisher(loop, None, "ns", "/nonexistent.sock", "", "")
        for i in range(pyshim.EVENT_QUEUE_MAX + 3):
            pub.publish(f"/t/{i}", "containerd.events.TaskOOM", b"")
        assert len(pub.queue) == pyshim.EVENT_QUEUE_MAX
        assert pub.queue[0][0] == "/t/3"

    uvloop.run(main())


PUBLISH_BINARY = textwrap.dedent("""\
    #!{python}
    import json, sys
    data = sys.stdin.buffer.read()
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"argv": sys.argv, "stdin": data.hex()}}) + "\\n")
""")

PUBLISHER_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    sys.path.insert(0, {repo!r})
    import uvloop
    import pyshim, pyshim_pb2 as pb

    async def main():
        loop = asyncio.get_running_loop()
        reaper = pyshim.Reaper(loop, lambda pid, code: None)
        runner = pyshim.Runner(loop, reaper)
        pub = pyshim.Publisher(loop, runner, "ns-bin", "", sys.argv[1], "/run/containerd/containerd.sock")
        pub.start()
        pub.publish("/tasks/start", "containerd.events.TaskStart",
                    pb.TaskStart(container_id="c9", pid=99).SerializeToString())
        pub.publish("/tasks/exit", "containerd.events.TaskExit",
                    pb.TaskExit(container_id="c9", id="c9", pid=99, exit_status=2).SerializeToString())
        print(json.dumps(await pub.flush(20)))

    uvloop.run(main())
""").format(repo=REPO)


def test_publisher_falls_back_to_the_publish_binary(tmp_path) -> None:
    log = tmp_path / "calls.jsonl"
    binary = tmp_path / "fake-containerd"
    binary.write_text(PUBLISH_BINARY.format(python=sys.executable, log=str(log)))
    binary.chmod(0o755)
    res = _run([sys.executable, "-c", PUBLISHER_SCRIPT, str(binary)], timeout=45)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) is True
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["argv"][1:] for c in calls] == [
        ["--address", "/run/containerd/containerd.sock", "publish", "--topic", t, "--namespace", "ns-bin"]
        for t in ("/tasks/start", "/tasks/exit")]
    start, exit_ = (any_pb2.Any.FromString(bytes.fromhex(c["stdin"])) for c in calls)
    assert start.type_url == "containerd.events.TaskStart"
    assert pb.TaskStart.FromString(start.value) == pb.TaskStart(container_id="c9", pid=99)
    assert exit_.type_url == "containerd.events.TaskExit"
    assert pb.TaskExit.FromString(exit_.value).exit_status == 2


# =============================================================================
# The binary
# =============================================================================


def _binary() -> str:
    import shutil

    path = shutil.which(BINARY)
    assert path, f"{BINARY} is not on PATH: run `pip install .`"
    return path


def _shim(how: str) -> list[str]:
    """The installed entry point, or the working tree's pyshim.py run as a script."""
    return [_binary()] if how == "installed" else [sys.executable, os.path.join(REPO, "pyshim.py")]


HOW = ["installed", "source"]


@pytest.mark.parametrize("how", HOW)
def test_version_flag(how: str) -> None:
    res = _run([*_shim(how), "-v"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("containerd-shim-pyshim-v1:")
    assert f"Version:  {pyshim.VERSION}" in res.stdout


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("action", ["start", "delete"])
def test_action_without_namespace_fails_clearly(tmp_path, how: str, action: str) -> None:
    res = _run([*_shim(how), "-id", "c1", "-address", "/run/containerd/containerd.sock", action],
               cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert "namespace cannot be empty" in res.stderr
    assert res.stdout == ""
    assert os.listdir(tmp_path) == []  # no address file, nothing else


@pytest.mark.parametrize("how", HOW)
def test_unknown_flag_fails_clearly(tmp_path, how: str) -> None:
    res = _run([*_shim(how), "-bogus", "start"], cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert "flag provided but not defined: -bogus" in res.stderr


def test_atomic_write_never_writes_through_a_planted_symlink(tmp_path) -> None:
    """Bundle files (address, options.json) replace a symlink planted in the bundle,
    at their name or at their temp name, instead of writing to where it points."""
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    bundle.mkdir()
    outside.write_bytes(b"precious")
    (bundle / "address").symlink_to(outside)
    (bundle / f".address.{os.getpid()}.tmp").symlink_to(outside)
    pyshim._atomic_write(str(bundle), "address", b"unix:///run/containerd/s/x")
    assert outside.read_bytes() == b"precious"
    assert not (bundle / "address").is_symlink()
    assert (bundle / "address").read_bytes() == b"unix:///run/containerd/s/x"
    assert sorted(p.name for p in bundle.iterdir()) == ["address"]
    assert os.stat(bundle / "address").st_mode & 0o777 == 0o644


@pytest.mark.parametrize("uri,error", [
    ("tcp://host:1", pyshim.InvalidArgument),
    ("file://relative/path", pyshim.InvalidArgument),
    ("binary:///usr/bin/logger", pyshim.Unimplemented),
])
def test_stdio_uris_are_validated(uri: str, error: type) -> None:
    with pytest.raises(error):
        pyshim._open_output(uri)


def test_stdio_file_uri_appends_to_an_absolute_path(tmp_path) -> None:
    target = tmp_path / "logs" / "out.log"
    fd, keep = pyshim._open_output(f"file://{target}?maxsize=1")
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert keep == -1 and target.read_bytes() == b"x"


def _bundle_with_config(tmp_path) -> str:
    (tmp_path / "config.json").write_text('{"linux": {"namespaces": [{"type": "pid"}]}}')
    return str(tmp_path)


def _writes_pid(text: str):
    """A FakeRunner action: runc create/exec writes `text` as the pid file."""
    def during(args: tuple[str, ...]) -> None:
        if "--pid-file" in args:
            with open(args[args.index("--pid-file") + 1], "w") as f:
                f.write(text)
    return during


@pytest.mark.parametrize("text", ["", "0", "-1", "abc"])
def test_service_create_refuses_a_pid_file_without_a_pid(loop, tmp_path, text: str) -> None:
    """Found by bench/fuzz_ttrpc.py: an empty pid file made a task of pid 0, and a
    kill(2) of pid 0 signals the caller's own process group."""
    svc = pyshim.TaskService(loop, FakeRunner(_writes_pid(text)), FakePublisher(), "ns1", lambda: None)
    req = pb.CreateTaskRequest(id="c9", bundle=_bundle_with_config(tmp_path))
    with pytest.raises(pyshim.RuntimeFailure, match="container pid"):
        loop.run_until_complete(svc.create(req, {}))
    assert svc.containers == {} and svc.pids == {} and svc.creating == set()
    # With a pid, the same Create works.
    svc.runner.during = _writes_pid("4242\n")
    assert loop.run_until_complete(svc.create(req, {})).pid == 4242


def test_service_second_create_of_an_id_in_flight_is_already_exists(loop, tmp_path) -> None:
    """Found by bench/fuzz_ttrpc.py: two Creates of one id both ran, and the loser's
    cleanup would unmount the winner's rootfs."""
    svc = pyshim.TaskService(loop, FakeRunner(_writes_pid("4242")), FakePublisher(), "ns1", lambda: None)
    req = pb.CreateTaskRequest(id="c9", bundle=_bundle_with_config(tmp_path))

    async def both():
        return await asyncio.gather(svc.create(req, {}), svc.create(req, {}), return_exceptions=True)

    first, second = loop.run_until_complete(both())
    assert first.pid == 4242
    assert isinstance(second, pyshim.AlreadyExists), second
    assert svc.runner.calls[0][0] == "create" and len(svc.runner.calls) == 1
    assert list(svc.containers) == ["c9"] and svc.creating == set()

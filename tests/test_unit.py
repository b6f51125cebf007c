"""Unit and component tests of pyshim that need no containerd.

Sections: frame codec, C core, reaper (in child interpreters, so that the subreaper
and the SIGCHLD handler never touch the pytest process), process state machines and
the task service's ordering, runtime option decoding, CLI pieces, event publisher,
and the installed binary. The ttrpc server is tested in test_ttrpc.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import itertools
import json
import os
import platform
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Iterator
from unittest import mock

import harness
import pytest
import uvloop
from google.protobuf import any_pb2, empty_pb2
from harness import require
from hypothesis import given, settings
from hypothesis import strategies as st

import pyshim
import pyshim_pb2 as pb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.unit  # needs no containerd: the fast tier (-m unit)

BINARY = "containerd-shim-pyshim-v1"


async def _until(predicate, timeout: float = 10.0) -> None:
    """harness.wait_for for a test on the event loop: poll ``predicate`` each loop turn
    (and 5 ms) until truthy; TimeoutError after ``timeout`` seconds."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


def _run(argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """A child process; a `python -c` child run with cwd=REPO imports this tree's pyshim.py
    (`-c` puts the working directory first on its path), as this process does under
    `python -m pytest` from the tree's top."""
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
    assert out == [(5, 1, 0, big)]  # the announced length, for the error message
    assert dec.oversized_length == 0
    assert dec.feed(pyshim.encode_frame(7, 1, b"next")) == [(7, 1, 0, b"next")]


def test_oversized_frame_followed_by_frame_in_the_same_chunk() -> None:
    big = pyshim.MAX_MESSAGE + 10
    wire = pyshim.HEADER.pack(big, 1, 1, 0) + bytes(big) + pyshim.encode_frame(3, 1, b"ok")
    assert pyshim.FrameDecoder().feed(wire) == [(1, 1, 0, big), (3, 1, 0, b"ok")]


def test_header_announcing_4_gib_is_discarded_with_bounded_memory() -> None:
    dec = pyshim.FrameDecoder()
    length = 0xFFFFFFFF
    assert dec.feed(pyshim.HEADER.pack(length, 11, 1, 0)) == []
    assert dec.oversized_length == length
    out = _discard(dec, length, 16 << 20)
    assert out == [(11, 1, 0, length)]
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
    assert out == [(sid, t, f, p if len(p) <= limit else len(p)) for sid, t, f, p in frames]


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


def test_recv_fd_refuses_a_packet_longer_than_its_buffer() -> None:
    """On a packet socket the part past the buffer would be lost: the whole
    message is refused (EMSGSIZE) and the fd it carried closed, not a
    truncated request taken. A byte stream is only read in parts."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        before = len(os.listdir("/proc/self/fd"))
        pyshim.send_fd(a.fileno(), r, b"x" * 300)
        with pytest.raises(OSError) as ei:
            pyshim.recv_fd(b.fileno(), 256)
        assert ei.value.errno == errno.EMSGSIZE
        assert len(os.listdir("/proc/self/fd")) == before  # the passed copy of r is closed
        pyshim.send_fd(a.fileno(), r, b"y" * 256)  # exactly the buffer: taken
        data, fd = pyshim.recv_fd(b.fileno(), 256)
        assert data == b"y" * 256 and fd >= 0
        os.close(fd)
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with c, d:
        c.sendall(b"z" * 300)
        assert pyshim.recv_fd(d.fileno(), 256)[0] == b"z" * 256
        assert pyshim.recv_fd(d.fileno(), 256)[0] == b"z" * 44
    os.close(r), os.close(w)


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


_BARE_FORK = """
import os, sys
import pyshim
ran = []
os.register_at_fork(after_in_child=lambda: ran.append("child"), after_in_parent=lambda: ran.append("parent"))
pid = pyshim._check(pyshim._lib.reaper_fork())
if pid == 0:
    os._exit(10 + len(ran))
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), ran)
"""


def test_bare_fork_runs_no_python_at_fork_callbacks() -> None:
    # The template forks with reaper_fork: what os.register_at_fork callbacks
    # would do in the child is exactly the memory it avoids.
    res = _run([sys.executable, "-c", _BARE_FORK], cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split(None, 1) == ["10", "[]\n"]


# =============================================================================
# Reaper, in a child interpreter (subreaper and SIGCHLD handler are per process)
# =============================================================================

REAPER_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, signal, sys, time
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
    elif mode == "signals":
        seen = []
        reaper.catch(signal.SIGUSR1, lambda: seen.append("usr1"))
        reaper.catch(signal.SIGTERM, lambda: seen.append("term"))
        os.kill(os.getpid(), signal.SIGUSR1)
        until(lambda: seen)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill us, were it not caught
        pid = pyshim.spawn(["/bin/sh", "-c", "exit 4"], std)
        until(lambda: len(seen) == 2 and exits)
        out["seen"] = seen
        out["exits"] = exits == [(pid, 4)]
        try:
            reaper.catch(signal.SIGCHLD, lambda: None)
        except OSError as e:
            out["sigchld"] = e.errno
    print(json.dumps(out))
""").format(repo=REPO)


def _reaper_child(*args: str) -> dict:
    res = _run([sys.executable, "-c", REAPER_SCRIPT, *args], timeout=45, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_reaper_catches_signals_on_its_pipe() -> None:
    out = _reaper_child("signals")
    assert out["seen"] == ["usr1", "term"]
    assert out["exits"] is True  # exits still flow while signals are caught
    assert out["sigchld"] == errno.EINVAL  # SIGCHLD is the reaper's own


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
EVENTS = ("start", "exit", "delete", "pause", "resume", "update", "checkpoint")
LEGAL = {
    (C, "start"): R, (C, "exit"): S, (C, "delete"): D,
    (R, "exit"): S, (R, "pause"): P,
    (P, "resume"): R, (P, "exit"): S,
    (S, "delete"): D,
    # Update leaves the state as it is.
    (C, "update"): C, (R, "update"): R, (P, "update"): P,
    # So does Checkpoint (its `exit` comes later, as an ordinary exit).
    (R, "checkpoint"): R, (P, "checkpoint"): P,
}
# Illegal start/delete/pause/resume/update/checkpoint calls answer as the Go shim does
# (init_state.go, exec_state.go): code Unknown, its words.
GO_REFUSALS = {
    (R, "start"): "cannot start a running process",
    (P, "start"): "cannot start a paused process",
    (S, "start"): "cannot start a stopped process",
    (R, "delete"): "cannot delete a running process",
    (P, "delete"): "cannot delete a paused process",
    (C, "pause"): "cannot pause task in created state",
    (C, "resume"): "cannot resume task in created state",
    (R, "resume"): "cannot resume a running process",
    (P, "pause"): "cannot pause a paused container",
    (S, "pause"): "cannot pause a stopped container",
    (S, "resume"): "cannot resume a stopped container",
    (S, "update"): "cannot update a stopped container",
    (C, "checkpoint"): "cannot checkpoint a task in created state",
    (S, "checkpoint"): "cannot checkpoint a stopped container",
}


@pytest.fixture
def loop():
    lp = uvloop.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    asyncio.set_event_loop(None)
    lp.close()


def _container(loop, cid: str = "c1", bundle: str = "/nonexistent/bundle", runner=None) -> pyshim.Container:
    c = pyshim.Container(cid, bundle, pyshim.Runc(runner, "/bin/false", "/run/pyshim-test", bundle))
    c.init = pyshim.InitProcess(cid, c, pyshim.Stdio(loop, "", "", ""), loop)
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
    with pytest.raises(pyshim.ShimError, match="^cannot start a running process$") as ei:
        p.transition("start")
    assert ei.value.code == pyshim.UNKNOWN
    with pytest.raises(pyshim.ShimError, match="^cannot delete a running process$") as ei:
        p.transition("delete")
    assert ei.value.code == pyshim.UNKNOWN


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
    """Stands in for Runner: records the runc commands it is asked to run (the
    argv after runc's global flags), optionally acts during one, and exits
    with `code`."""

    GLOBAL = ("--root", "--log", "--log-format", "--criu")
    reaper = None  # only a logging binary would need one

    def __init__(self, during=None, code: int = 0) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.argvs: list[list[str]] = []
        self.during = during
        self.code = code

    @classmethod
    def command(cls, argv: list[str]) -> tuple[str, ...]:
        i = 1
        while i < len(argv) and (argv[i] in cls.GLOBAL or argv[i] == "--systemd-cgroup"):
            i += 1 if argv[i] == "--systemd-cgroup" else 2
        return tuple(argv[i:])

    async def run(self, argv: list[str], stdio=None, input=None, capture: bool = False) -> tuple[int, bytes]:
        args = self.command(argv)
        self.argvs.append(argv)
        self.calls.append(args)
        await asyncio.sleep(0)  # a loop turn, not a wait: a real runc call yields here
        if self.during is not None:
            self.during(args)
        await asyncio.sleep(0)  # and again before it returns
        return self.code, b""


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bytes]] = []

    def publish(self, topic: str, type_url: str, value: bytes) -> None:
        self.events.append((topic, type_url, value))

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.events]


def _service(loop, runner=None) -> tuple[pyshim.TaskService, FakePublisher, pyshim.Container]:
    pub = FakePublisher()
    runner = runner or FakeRunner()
    svc = pyshim.TaskService(loop, runner, pub, "ns1", lambda: None)
    c = _container(loop, runner=runner)
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
    with pytest.raises(pyshim.ShimError, match="cannot start a running process"):
        loop.run_until_complete(svc.start(pb.StartRequest(id="c1"), {}))
    assert runner.calls == [("start", "c1")]


def test_service_delete_of_a_running_process_is_refused(loop) -> None:
    runner = FakeRunner()
    svc, pub, c = _service(loop, runner)
    c.init.state = R
    with pytest.raises(pyshim.ShimError, match="^cannot delete a running process$"):
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
    e = pyshim.ExecProcess("e1", c, pyshim.Stdio(loop, "", "", ""), loop, b"{}")
    e.pid, e.state = 5151, R
    c.execs["e1"] = e
    c.live_execs = 1
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


def test_exit_of_an_unknown_pid_is_dropped(loop) -> None:
    """Issue 13 bug 1: an exit nobody subscribed to is not kept for a later
    process that gets the same pid."""
    svc, pub, c = _service(loop)
    svc.on_exit(999999, 0, 77)  # an orphan, reaped with no Start in flight
    assert pub.events == [] and all(not s.exits for s in svc.exits.subscriptions)
    e = pyshim.ExecProcess("e1", c, pyshim.Stdio(loop, "", "", ""), loop, b"{}")
    e.pid = 999999  # the kernel gives the pid to a new exec
    sub = svc.exits.subscribe(e)
    svc.exits.claim(sub, e)
    svc.exits.end(sub)
    assert not e.wait.done() and pub.events == []


def _exit_events(pub: FakePublisher) -> list[tuple[str, int]]:
    out = []
    for topic, _, value in pub.events:
        if topic == "/tasks/exit":
            ev = pb.TaskExit.FromString(value)
            out.append((ev.id, ev.exit_status))
    return out


def _exec(loop, c: pyshim.Container, eid: str, spec: bytes = b"{}") -> pyshim.ExecProcess:
    e = pyshim.ExecProcess(eid, c, pyshim.Stdio(loop, "", "", ""), loop, spec)
    c.execs[eid] = e
    return e


def test_router_exit_seen_during_a_start_is_claimed_by_its_pid(loop) -> None:
    """An exit of a pid nobody knows yet, seen while a Start is in flight, is the
    started process's once it reads that pid, and is published after its start
    event; the other unknown exits of that window are dropped with it."""
    svc, pub, c = _service(loop)
    c.init.state = R
    e = _exec(loop, c, "e1")
    sub = svc.exits.subscribe(e)
    svc.on_exit(5151, 3, 10)  # the exec's own pid, before runc exec returned
    svc.on_exit(6161, 0, 11)  # an orphan
    e.pid, e.state = 5151, R
    svc.exits.exec_started(c)
    svc.exits.claim(sub, e)
    pub.publish("/tasks/exec-started", "x", b"")
    assert _exit_events(pub) == []
    svc.exits.end(sub)
    assert pub.topics() == ["/tasks/exec-started", "/tasks/exit"]
    assert _exit_events(pub) == [("e1", 3)] and e.wait.result() == 3
    assert svc.exits.subscriptions == [] and 6161 not in svc.pids


def test_router_exit_before_a_subscription_is_not_claimed(loop) -> None:
    svc, pub, c = _service(loop)
    c.init.state = R
    svc.on_exit(5151, 0, 10)  # reaped before the Start subscribed: someone else's
    e = _exec(loop, c, "e1")
    sub = svc.exits.subscribe(e)
    e.pid = 5151
    svc.exits.claim(sub, e)
    svc.exits.end(sub)
    assert pub.events == [] and svc.pids[5151] is e and not e.wait.done()


def test_router_init_exit_waits_for_a_starting_exec(loop) -> None:
    """Counted from the start of an exec's Start: the init's exit is held until
    that exec has exited, or has failed to start."""
    for fails in (False, True):
        svc, pub, c = _service(loop)
        c.init.state = R
        e = _exec(loop, c, "e1")
        svc.exits.exec_started(c)
        svc.on_exit(4242, 137, 10)
        assert _exit_events(pub) == []
        if fails:
            svc.exits.exec_ended(c)  # runc exec failed
            assert _exit_events(pub) == [("c1", 137)]
        else:
            e.pid, e.state = 5151, R
            svc.pids[5151] = e
            svc.on_exit(5151, 1, 11)
            assert _exit_events(pub) == [("e1", 1), ("c1", 137)]


def test_init_exit_without_a_pid_namespace_kills_the_cgroup(loop) -> None:
    """Issue 13 bug 2: with no pid namespace of its own, nothing else kills what
    is left in the container once its init has exited, even with no exec."""
    runner = FakeRunner()
    svc, pub, c = _service(loop, runner)
    c.init.state = R
    c.shares_pidns = True
    svc.on_exit(4242, 0, 10)
    loop.run_until_complete(_until(lambda: runner.calls and _exit_events(pub)))
    assert runner.calls == [("kill", "--all", "c1", str(pyshim.SIGKILL))]
    assert _exit_events(pub) == [("c1", 0)]


def test_init_exit_in_its_own_pid_namespace_runs_no_runc(loop) -> None:
    runner = FakeRunner()
    svc, pub, c = _service(loop, runner)
    c.init.state = R
    svc.on_exit(4242, 0, 10)
    assert runner.calls == [] and _exit_events(pub) == [("c1", 0)]


def test_exec_start_takes_its_terminal_from_the_request(loop, tmp_path) -> None:
    """Issue 13 bug 3: the spec written for runc exec says terminal as the
    ExecProcessRequest did, whatever the client's process spec said."""
    written: list[dict] = []

    def during(args: tuple[str, ...]) -> None:
        if args[0] == "exec":
            with open(args[args.index("--process") + 1]) as f:
                written.append(json.load(f))
            with open(args[args.index("--pid-file") + 1], "w") as f:
                f.write("5151")

    svc, pub, c = _service(loop, FakeRunner(during))
    c.bundle = str(tmp_path)
    c.init.state = R
    e = _exec(loop, c, "e1", json.dumps({"args": ["/bin/true"], "terminal": True}).encode())
    loop.run_until_complete(svc.start(pb.StartRequest(id="c1", exec_id="e1"), {}))
    assert written == [{"args": ["/bin/true"], "terminal": False}]
    assert e.state == R and svc.pids[5151] is e and pub.topics() == ["/tasks/exec-started"]


def test_failed_exec_start_leaves_the_exec_created(loop, tmp_path) -> None:
    """Issue 13 bug 4: runc exec fails -> the error, the exec still created, no
    exit published, a held init exit is released, and Wait returns status 0 (the Go
    shim closes the exec's wait channel when runc exec fails)."""
    svc, pub, c = _service(loop, FakeRunner(code=1))
    c.bundle = str(tmp_path)
    c.init.state = R
    e = _exec(loop, c, "e1")
    with pytest.raises(pyshim.RuntimeFailure, match="OCI runtime exec failed: exit status 1"):
        loop.run_until_complete(svc.start(pb.StartRequest(id="c1", exec_id="e1"), {}))
    assert e.state == C and pub.events == [] and c.live_execs == 0
    assert e.wait.done() and e.wait.result() == 0
    loop.run_until_complete(svc.delete(pb.DeleteRequest(id="c1", exec_id="e1"), {}))
    assert "e1" not in c.execs


def test_runc_commands_own_their_argv(loop) -> None:
    runner = FakeRunner()
    rc = pyshim.Runc(runner, "/usr/sbin/runc", "/run/r/ns", "/b", systemd=True, no_pivot=True,
                     no_new_keyring=True, criu="/c")

    async def all_commands() -> None:
        await rc.create("c1", "/b/init.pid", (0, 1, 2), "/tmp/console.sock")
        await rc.start("c1")
        await rc.exec("c1", "/b/p.json", "/b/e.pid", (0, 1, 2))
        await rc.kill("c1", 15)
        await rc.kill("c1", 9, all=True)
        await rc.delete("c1")
        await rc.pause("c1")
        await rc.resume("c1")
        await rc.update("c1", b"{}")
        await rc.restore("c1", "/img", "", "/w", "/b/init.pid", (0, 1, 2))

    loop.run_until_complete(all_commands())
    assert runner.argvs[0][:9] == ["/usr/sbin/runc", "--root", "/run/r/ns", "--log", "/b/log.json",
                                   "--log-format", "json", "--criu", "/c"]
    assert runner.argvs[0][9] == "--systemd-cgroup"
    assert runner.calls == [
        ("create", "--bundle", "/b", "--pid-file", "/b/init.pid", "--no-pivot", "--no-new-keyring",
         "--console-socket", "/tmp/console.sock", "c1"),
        ("start", "c1"),
        ("exec", "--process", "/b/p.json", "--detach", "--pid-file", "/b/e.pid", "c1"),
        ("kill", "c1", "15"),
        ("kill", "--all", "c1", "9"),
        ("delete", "c1"),
        ("pause", "c1"),
        ("resume", "c1"),
        ("update", "--resources", "-", "c1"),
        ("restore", "--image-path", "/img", "--work-path", "/w", "--detach", "--pid-file", "/b/init.pid",
         "--no-pivot", "--no-subreaper", "--bundle", "/b", "c1"),
    ]


@pytest.mark.parametrize(("command", "message", "kind"), [
    ("kill", "container not running", pyshim.NotFound),
    ("kill", "no such process", pyshim.NotFound),
    ("kill", "permission denied", pyshim.RuntimeFailure),
    ("delete", 'container "x" does not exist', pyshim.NotFound),
    ("start", "container does not exist", pyshim.RuntimeFailure),
    ("exec", "no such process", pyshim.RuntimeFailure),
])
def test_runc_errors_are_mapped_in_one_place(command: str, message: str, kind: type) -> None:
    e = pyshim.runc_failure(command, "OCI runtime x failed", message)
    assert type(e) is kind and message in str(e)


def test_runc_failure_carries_runc_own_message_from_its_log(loop, tmp_path) -> None:
    (tmp_path / "log.json").write_text('{"level":"info","msg":"fine"}\n'
                                       '{"level":"error","msg":"exec: \\"/bin/nope\\": not found"}\n')
    rc = pyshim.Runc(FakeRunner(code=1), "/usr/sbin/runc", "/run/r", str(tmp_path))
    with pytest.raises(pyshim.RuntimeFailure) as ei:
        loop.run_until_complete(rc.start("c1"))
    assert str(ei.value) == 'OCI runtime start failed: exec: "/bin/nope": not found'


def _banner_sections(source: str) -> list[str]:
    """The name of each banner section of pyshim.py: the title line under a
    `# ====` rule, up to its first colon or full stop."""
    lines = source.splitlines()
    names = []
    for i, line in enumerate(lines[:-1]):
        if line.startswith("# ====") and not lines[i + 1].startswith("# ====") and \
                (i == 0 or not lines[i - 1].startswith("#")):
            title = lines[i + 1][2:]
            names.append(re.split(r"[:.]", title, maxsplit=1)[0].strip().lower())
    return names


def test_module_docstring_lists_the_banner_sections() -> None:
    with open(pyshim.__file__) as f:
        source = f.read()
    doc = " ".join(pyshim.__doc__.split())
    listed = doc.split("Sections, in dependency order (each under a banner of that name): ", 1)[1]
    listed = [name.strip().lower() for name in listed.rstrip(".").split(",")]
    assert _banner_sections(source) == listed


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


# -- CRI runtime options and pyshim's settings file ------------------------------------


def _settings_file(tmp_path, text: str) -> str:
    path = tmp_path / "pyshim.toml"
    path.write_text(text)
    return str(path)


def _cri_any(path: str = "", body: bytes = b"", url: str = "runtimeoptions.v1.Options") -> any_pb2.Any:
    return _any(url, pb.CriRuntimeOptions(type_url="io.containerd.pyshim.v1", config_path=path,
                                          config_body=body))


def test_settings_file_every_key(tmp_path) -> None:
    path = _settings_file(tmp_path, textwrap.dedent("""\
        runc_binary = "/usr/local/bin/crun"
        runc_root = "/run/alt-runc"
        systemd_cgroup = true
        log_level = "debug"
        template = false
        memory_release_interval = 7
    """))
    s = pyshim.Settings.load(path)
    assert (s.path, s.runc_binary, s.runc_root, s.systemd_cgroup) == (
        path, "/usr/local/bin/crun", "/run/alt-runc", True)
    assert (s.log_level, s.template, s.memory_release_interval) == ("debug", False, 7.0)


def test_settings_empty_file_gives_defaults(tmp_path) -> None:
    s = pyshim.Settings.load(_settings_file(tmp_path, "# nothing set\n"))
    d = pyshim.Settings()
    assert all(getattr(s, k) == getattr(d, k) for k in pyshim.SETTINGS_KEYS)
    assert d.template and d.memory_release_interval == 30 and not d.systemd_cgroup


@pytest.mark.parametrize(("text", "error"), [
    ('colour = "blue"\n', "unknown key 'colour'"),
    ("[runc]\nroot = '/x'\n", "unknown key 'runc'"),
    ("template = 1\n", "key 'template' must be a boolean, not 1"),
    ('systemd_cgroup = "yes"\n', "key 'systemd_cgroup' must be a boolean"),
    ("runc_root = 5\n", "key 'runc_root' must be a string, not 5"),
    ('runc_root = "relative/dir"\n', "key 'runc_root' must be an absolute path"),
    ('runc_binary = ""\n', "key 'runc_binary' must not be empty"),
    ('log_level = "loud"\n', "key 'log_level' must be one of debug, info, warning, error"),
    ("memory_release_interval = true\n", "key 'memory_release_interval' must be a number of seconds"),
    ("memory_release_interval = -1\n", "must be 0..86400 seconds"),
    ("memory_release_interval = nan\n", "must be 0..86400 seconds"),
    ("template = \n", "not valid TOML"),
])
def test_settings_errors_name_file_and_key(tmp_path, text: str, error: str) -> None:
    path = _settings_file(tmp_path, text)
    with pytest.raises(pyshim.InvalidArgument) as e:
        pyshim.Settings.load(path)
    assert str(e.value).startswith(f"pyshim settings {path}: ") and error in str(e.value)


def test_settings_missing_or_relative_file(tmp_path) -> None:
    with pytest.raises(pyshim.InvalidArgument, match=r"settings /nonexistent/p\.toml: No such file"):
        pyshim.Settings.load("/nonexistent/p.toml")
    with pytest.raises(pyshim.InvalidArgument, match="must be an absolute path"):
        pyshim.Settings.load("pyshim.toml")


def test_settings_json_round_trip_carries_only_changes(tmp_path) -> None:
    path = _settings_file(tmp_path, 'log_level = "warning"\ntemplate = false\nmemory_release_interval = 0\n')
    s = pyshim.Settings.load(path)
    text = s.to_json()
    assert json.loads(text) == {"path": path, "log_level": "warning", "template": False,
                                "memory_release_interval": 0.0}
    back = pyshim.Settings.from_json(text)
    assert all(getattr(back, k) == getattr(s, k) for k in pyshim.Settings.__slots__)
    with pytest.raises(pyshim.InvalidArgument, match="-settings"):
        pyshim.Settings.from_json('{"path": "/x", "bogus": 1}')


@pytest.mark.parametrize("url", ["runtimeoptions.v1.Options", "cri.runtimeoptions.v1.Options",
                                 "type.googleapis.com/runtimeoptions.v1.Options"])
def test_decode_cri_options_reads_the_settings_file(tmp_path, url: str) -> None:
    path = _settings_file(tmp_path, 'runc_binary = "crun"\nrunc_root = "/run/r"\nsystemd_cgroup = true\n')
    opts = pyshim.decode_options(_cri_any(path, url=url))
    assert (opts.binary_name, opts.root, opts.systemd_cgroup) == ("crun", "/run/r", True)


def test_decode_cri_options_without_a_file_gives_defaults() -> None:
    assert pyshim.decode_options(_cri_any()) == pb.RuncOptions()


def test_decode_cri_options_config_body_wins(tmp_path) -> None:
    """containerd newer than 1.6 sends the file's content as config_body."""
    opts = pyshim.decode_options(_cri_any("/not/read.toml", b'runc_root = "/run/body"\n'))
    assert opts.root == "/run/body"


def test_decode_cri_options_uses_the_shims_own_settings(tmp_path) -> None:
    """The shim's settings (from start) stand in for their file; another file is read."""
    path = _settings_file(tmp_path, 'runc_root = "/run/from-file"\n')
    own = pyshim.Settings.from_dict({"runc_root": "/run/from-start"}, "test", path)
    assert pyshim.decode_options(_cri_any(path), own).root == "/run/from-start"
    other = tmp_path / "other.toml"
    other.write_text('runc_root = "/run/other"\n')
    assert pyshim.decode_options(_cri_any(str(other)), own).root == "/run/other"


def test_decode_cri_options_bad_file_is_invalid_argument(tmp_path) -> None:
    path = _settings_file(tmp_path, "colour = 1\n")
    with pytest.raises(pyshim.InvalidArgument, match="unknown key 'colour'"):
        pyshim.decode_options(_cri_any(path))


def test_start_reads_cri_settings_without_protobuf(tmp_path) -> None:
    path = _settings_file(tmp_path, "template = false\n")
    raw = _cri_any(path).SerializeToString()
    s = pyshim._cri_settings(raw)
    assert s is not None and s.path == path and s.template is False
    assert pyshim._cri_settings(_cri_any().SerializeToString()) is None
    runc = _any("containerd.runc.v1.Options", pb.RuncOptions(root="/r")).SerializeToString()
    assert pyshim._cri_settings(runc) is None
    assert pyshim._shim_cgroup(raw) == ""


def test_install_gaps_names_what_a_new_shim_could_not_import(tmp_path, monkeypatch) -> None:
    assert pyshim.install_gaps() == []
    # Modules gone from a half-removed install: a package, a module of a package.
    monkeypatch.setattr(pyshim, "SHIM_MODULES", (*pyshim.SHIM_MODULES, "gone_pkg", "json.gone"))
    assert pyshim.install_gaps() == ["gone_pkg", "json.gone"]
    # uvloop's directory off the path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not os.path.isdir(os.path.join(p, "uvloop"))])
    assert "uvloop" in pyshim.install_gaps()
    launcher = str(tmp_path / "gone" / "containerd-shim-pyshim-v1")
    monkeypatch.setattr(sys, "argv", [launcher, "start"])
    assert pyshim.install_gaps()[0] == launcher


def test_install_gaps_of_a_warm_start_check_the_files_the_template_imported(tmp_path, monkeypatch) -> None:
    # A warm start's process is forked from the template, which imported every
    # module a shim runs: what counts is that the files they came from are there.
    kept, gone = tmp_path / "kept_mod.py", tmp_path / "gone_mod.py"
    kept.write_text("")
    for name, path in (("kept_mod", kept), ("gone_mod", gone)):
        module = types.ModuleType(name)
        module.__file__ = str(path)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(pyshim, "SHIM_MODULES", (*pyshim.SHIM_MODULES, "kept_mod", "gone_mod"))
    assert pyshim.install_gaps(loaded=True) == ["gone_mod"]
    # A cold start looks on the path, where neither is.
    assert pyshim.install_gaps() == ["kept_mod", "gone_mod"]


def test_spawned_processes_get_the_environment_as_it_is_now(monkeypatch) -> None:
    # spawn hands posix_spawn os.environ's own dict: a change made after import
    # (a forked shim takes its request's environment) must reach the child.
    monkeypatch.setenv("PYSHIM_UNIT_SET", "now")
    monkeypatch.delenv("PYSHIM_UNIT_GONE", raising=False)
    os.environ["PYSHIM_UNIT_GONE"] = "then"
    del os.environ["PYSHIM_UNIT_GONE"]
    r, w = os.pipe()
    try:
        pid = pyshim.spawn(["/bin/sh", "-c", 'echo "$PYSHIM_UNIT_SET ${PYSHIM_UNIT_GONE-unset}"'], (0, w, 2))
        os.close(w)
        w = -1
        out = os.read(r, 100)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert out == b"now unset\n"


def test_settings_flag_reaches_the_shims_argv() -> None:
    f = pyshim.Flags(["-namespace", "n", "-id", "i", "-address", "/a", "-settings", '{"path":"/p"}', "start"])
    assert f.settings == '{"path":"/p"}'
    argv = pyshim.shim_argv(f)
    assert argv[argv.index("-settings") + 1] == '{"path":"/p"}'
    assert pyshim.Flags(argv[argv.index("-namespace"):]).settings == f.settings
    assert "-settings" not in pyshim.shim_argv(pyshim.Flags(["-namespace", "n", "-id", "i"]))


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


@pytest.mark.parametrize(("argv", "message"), [
    (["-bogus", "start"], "flag provided but not defined: -bogus"),
    (["-namespace"], "flag needs an argument: -namespace"),
])
def test_flags_errors(capsys, argv: list[str], message: str) -> None:
    """As Go's flag package: the error, then the usage, on stderr; exit status 2."""
    with pytest.raises(SystemExit) as raised:
        pyshim.Flags(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message + "\n" + "Usage: containerd-shim-pyshim-v1")
    assert "-namespace NS" in err


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_flags_help(capsys, flag: str) -> None:
    with pytest.raises(SystemExit) as raised:
        pyshim.Flags(["-namespace", "n", flag, "start"])
    assert raised.value.code == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == pyshim.USAGE
    for name in pyshim.Flags.STRINGS | pyshim.Flags.BOOLS:
        assert f"  -{name} " in out.err  # every flag Flags parses is listed


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


@contextlib.contextmanager
def _full_backlog(path: str) -> Iterator[None]:
    """A listener at `path` that accepts nothing, its backlog filled, while the
    block runs: what a stopped (SIGSTOP) or wedged shim or template looks like
    to a connect. Everything is closed after it; the socket file stays."""
    with contextlib.ExitStack() as stack:
        lsock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        lsock.bind(path)
        lsock.listen(0)
        while True:
            c = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        yield


def _within(seconds: float, call):
    """call()'s result or exception, from a thread: a call that blocks fails the
    test after `seconds` instead of hanging the suite."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(call).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"still blocked after {seconds} s") from None
    finally:
        pool.shutdown(wait=False)


def test_a_group_shim_with_a_full_backlog_is_joined_without_waiting(tmp_path) -> None:
    """start's "is the group's shim alive" never blocks: a blocking connect to a
    shim that accepts nothing waits for as long as the shim does (containerd's
    `ctr run` then hangs with no line in any log). A listener there is alive;
    only nobody listening is not."""
    path = str(tmp_path / "s")
    assert not pyshim._can_connect(path)  # ENOENT
    with _full_backlog(path):
        assert _within(5.0, lambda: pyshim._can_connect(path))
    assert not pyshim._can_connect(path)  # the socket file is left, nobody listens: ECONNREFUSED


def test_a_template_with_a_full_backlog_is_refused_at_once(tmp_path) -> None:
    """The cold start's connection to the template: EAGAIN (spawn_shim then starts
    the shim cold), not a wait behind a template that takes nothing."""
    path = str(tmp_path / "t")
    with _full_backlog(path), pytest.raises(OSError) as raised:
        _within(5.0, lambda: pyshim._template_connect(path))
    assert raised.value.errno == errno.EAGAIN


def test_a_template_lock_held_too_long_is_a_clear_error(tmp_path) -> None:
    path = str(tmp_path / "t")
    holder = os.open(path + ".lock", os.O_RDWR | os.O_CREAT)
    try:
        import fcntl

        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: flock conflicts even here
        t0 = time.monotonic()
        with pytest.raises(OSError) as raised:
            pyshim._lock_template(path, wait=0.2)
        assert raised.value.errno == errno.ETIMEDOUT
        assert 0.2 <= time.monotonic() - t0 < 2.0
        fcntl.flock(holder, fcntl.LOCK_UN)
        lock = pyshim._lock_template(path, wait=0.2)
        os.close(lock)
    finally:
        os.close(holder)


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
        self.held = 0  # requests that reached a closed gate
        self.server: pyshim.TtrpcServer | None = None

    async def up(self) -> None:
        async def forward(req: pb.ForwardRequest, meta: dict) -> empty_pb2.Empty:
            if self.gate is not None:
                self.held += 1
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
        await _until(lambda: fake.held == 1)  # the first event is with containerd
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
    res = _run([sys.executable, "-c", PUBLISHER_SCRIPT, str(binary)], timeout=45, cwd=REPO)
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
    """The binary a private containerd of these tests would run: this
    Python's scripts dir first (a venv's), then PATH."""
    path = shutil.which(BINARY, path=harness.shim_search_path())
    assert path, f"{BINARY} is not installed: run `pip install .`"
    return path


def _shim(how: str) -> list[str]:
    """The installed entry point, or the working tree's pyshim.py run as a script."""
    return [_binary()] if how == "installed" else [sys.executable, os.path.join(REPO, "pyshim.py")]


HOW = ["installed", "source"]


def _version_fields(text: str) -> tuple[str, list[tuple[str, str]]]:
    """`-v` output as (first line, [(label, value)]), checking the Go shim's
    layout: a "name:" line, "  Label: value" lines, then one blank line."""
    lines = text.split("\n")
    assert lines[-2:] == ["", ""], f"no blank last line: {text!r}"
    assert lines[0].endswith(":"), text
    fields = []
    for line in lines[1:-2]:
        label, sep, value = line.partition(": ")
        assert sep and label.startswith("  ") and not label.startswith("   "), line
        fields.append((label.strip(), value.strip()))
    return lines[0], fields


@pytest.mark.parametrize("how", HOW)
def test_version_flag(how: str) -> None:
    """`-v` prints as containerd-shim-runc-v2 -v does, with Python in Go's place;
    an installed build names its git commit, the source tree says "unknown"."""
    res = _run([*_shim(how), "-v"])
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    name, fields = _version_fields(res.stdout)
    assert name == "containerd-shim-pyshim-v1:"
    assert [label for label, _ in fields] == ["Version", "Revision", "Python version"]
    values = dict(fields)
    assert values["Version"] == pyshim.VERSION
    assert values["Python version"] == platform.python_version()
    assert res.stdout.split("\n")[1] == f"  Version:  {pyshim.VERSION}"  # two spaces, as Go
    if how == "source":
        assert values["Revision"] == "unknown"
    elif os.path.exists(os.path.join(REPO, ".git")):
        # Built from this checkout by `pip install .` (maybe at an older commit):
        # a commit id, ".m" when the tree had changes. test_install.py checks
        # that a fresh build names exactly the checked-out commit.
        assert re.fullmatch(r"[0-9a-f]{40}(\.m)?", values["Revision"]), values


def test_version_layout_is_the_go_shims() -> None:
    go = shutil.which("containerd-shim-runc-v2")
    require(go, "containerd-shim-runc-v2 is not installed")
    ours, theirs = _run([_binary(), "-v"]), _run([go, "-v"])
    assert theirs.returncode == ours.returncode == 0
    go_name, go_fields = _version_fields(theirs.stdout)
    name, fields = _version_fields(ours.stdout)
    assert name == "containerd-shim-pyshim-v1:"
    # containerd 1.6 prints argv[0] as given, later ones its base name: pyshim
    # prints the base name.
    assert os.path.basename(go_name) == "containerd-shim-runc-v2:"
    assert [label for label, _ in go_fields] == ["Version", "Revision", "Go version"]
    assert [label for label, _ in fields] == ["Version", "Revision", "Python version"]
    # Line for line the same up to the value: "  Version:  ", "  Revision: ", ...
    for a, b in zip(theirs.stdout.split("\n")[1:3], ours.stdout.split("\n")[1:3], strict=True):
        prefix = re.compile(r"\s*[^:]+:\s*")
        assert prefix.match(a).group() == prefix.match(b).group(), (a, b)


SERVE_WRAPPER = 'exec "$0" "$@" 3<&0 0</dev/null'


@pytest.mark.parametrize("debug", [False, True])
def test_debug_flag_raises_the_log_level(tmp_path, debug: bool) -> None:
    """The installed binary serving a socket (fd 3, as `start` hands it over):
    with -debug its log has debug lines, without it none."""
    path = str(tmp_path / "shim.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    argv = ["/bin/sh", "-c", SERVE_WRAPPER, _binary(), "-namespace", "ns-debug", "-id", "c1",
            "-address", str(tmp_path / "none.sock")] + (["-debug"] if debug else [])
    env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
    # cwd has no `log` fifo, so the shim logs to its stderr.
    proc = subprocess.Popen(argv, stdin=lsock.fileno(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=str(tmp_path), env=env, text=True)
    lsock.close()
    try:
        async def connect() -> int:
            client = await pyshim.TtrpcClient.connect(path)
            try:
                payload = await client.call(pyshim.TASK_SERVICE, "Connect",
                                            pb.ConnectRequest(id="c1").SerializeToString(),
                                            {pyshim.NAMESPACE_KEY: "ns-debug"})
            finally:
                client.close()
            return pb.ConnectResponse.FromString(payload).shim_pid

        assert uvloop.run(asyncio.wait_for(connect(), 20)) == proc.pid  # sh exec'd the shim
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    levels = re.findall(r"^time=\S+ level=(\w+) ", err, re.MULTILINE)
    assert "info" in levels, err  # "shim started", "shim exiting"
    if debug:
        assert re.search(r'level=debug msg="serving api on socket" pid=\d+ socket=\S*shim.sock', err), err
    else:
        assert "debug" not in levels, err


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("action", ["start", "delete"])
def test_action_without_namespace_fails_clearly(tmp_path, how: str, action: str) -> None:
    res = _run([*_shim(how), "-id", "c1", "-address", "/run/containerd/containerd.sock", action],
               cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert "namespace cannot be empty" in res.stderr
    assert res.stdout == ""
    assert os.listdir(tmp_path) == []  # no address file, nothing else


def test_start_that_cannot_make_its_socket_fails_in_one_line(tmp_path) -> None:
    """What containerd shows when `start` cannot create the shim's socket
    (here /run/containerd is a read-only tmpfs, in a private mount namespace):
    one line, no newline (containerd appends ": exit status 1"), nothing written.
    Running it as another user would need the interpreter readable by that
    user, which a Python under /root is not."""
    require(os.geteuid() == 0, "needs root to mount in a private namespace")
    require(shutil.which("unshare"), "unshare (util-linux) is not installed")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.makedirs("/run/containerd", 0o711, exist_ok=True)
    script = ('mount --make-rprivate / && mount -t tmpfs -o ro,size=64k tmpfs /run/containerd'
              ' && exec "$@"')
    res = _run(["unshare", "-m", "sh", "-c", script, "sh", _binary(),
                "-namespace", "ns-ro", "-id", "c1", "-address", str(tmp_path / "c.sock"), "start"],
               cwd=str(bundle), stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stdout == "", res
    assert re.fullmatch(r"pyshim start: \[Errno 30\] Read-only file system: '/run/containerd[^'\n]*'",
                        res.stderr), repr(res.stderr)
    assert os.listdir(bundle) == []


@pytest.mark.parametrize("how", HOW)
def test_unknown_flag_fails_clearly(tmp_path, how: str) -> None:
    res = _run([*_shim(how), "-bogus", "start"], cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    assert "flag provided but not defined: -bogus" in res.stderr


# ------------------------------------------------------------------ binary:// stdio


def test_logger_argv_from_the_uri() -> None:
    """Each query key, then its first value (empty if none); the path unescaped."""
    lg = pyshim.LoggingBinary("binary:///opt/my%20log/bin?tag=a+b&flag&tag=ignored&dir=%2Ftmp")
    assert lg.argv == ["/opt/my log/bin", "tag", "a b", "flag", "", "dir", "/tmp"]
    assert pyshim.LoggingBinary("binary:///bin/logger").argv == ["/bin/logger"]


@pytest.mark.parametrize("uri", ["binary://", "binary:logger", "binary:?x=1"])
def test_logger_needs_an_absolute_path(uri: str) -> None:
    with pytest.raises(pyshim.InvalidArgument, match="absolute path"):
        pyshim.LoggingBinary(uri)


def test_binary_stdio_refusals(loop) -> None:
    with pytest.raises(pyshim.InvalidArgument, match="named by stdout"):
        pyshim.Stdio(loop, "", "", "binary:///bin/logger").open()


def test_terminal_output_goes_to_the_logging_binary(loop) -> None:
    """With a terminal and a logging binary: runc gets /dev/null, the binary's fd 4
    pipe is at EOF at once, and what the program writes to the tty arrives on its
    fd 3 pipe, which ends when the tty's last user closes it (the pty's EIO)."""
    import socket

    s = pyshim.Stdio(loop, "", "binary:///bin/logger", "binary:///bin/logger", terminal=True)
    fds = s.open()
    master, slave = os.openpty()
    try:
        assert fds[0] == fds[1] == fds[2] and os.path.samestat(os.fstat(fds[0]), os.stat(os.devnull))
        out, err = s.logging_binary.fds
        assert os.read(err, 10) == b""  # nobody writes a terminal's stderr
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(s.console_path)
            pyshim.send_fd(c.fileno(), master)
            s.receive_console()
        os.close(master)
        master = -1
        s.close_after_start()
        os.write(slave, b"to the logger\n" * 200)  # less than a pty buffers: no reader yet
        os.close(slave)
        slave = -1
        loop.run_until_complete(asyncio.wait_for(s.drain(5), 10))
        assert [c.done.done() for c in s.copiers] == [True]
        got = b""
        while chunk := os.read(out, 65536):
            got += chunk
        assert got == b"to the logger\r\n" * 200  # the tty's ONLCR
        assert s.log_pipe == -1 and not os.path.exists(s.console_dir or "/nonexistent")
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        s.close()
    assert s.logging_binary.fds == [] and s.master == -1


def test_binary_stdio_gives_the_container_write_ends_and_keeps_no_read_end(loop) -> None:
    s = pyshim.Stdio(loop, "", "binary:///bin/logger", "binary:///bin/logger")
    _, out, err = s.open()
    try:
        assert s.copiers == [] and len(s.logging_binary.fds) == 2
        for w, r in zip((out, err), s.logging_binary.fds):
            assert stat.S_ISFIFO(os.fstat(w).st_mode)
            assert os.fstat(w).st_ino == os.fstat(r).st_ino
    finally:
        s.close()
    assert s.logging_binary.fds == [] and s.child_fds == []


def test_installed_binary_ignores_pythonpath(tmp_path) -> None:
    # The launcher runs Python with -I -S: a PYTHONPATH in containerd's
    # environment (here one holding a broken pyshim) changes nothing.
    (tmp_path / "pyshim.py").write_text("raise SystemExit('the wrong pyshim was imported')\n")
    res = _run([_binary(), "-v"], env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("containerd-shim-pyshim-v1:")


_LEAN_START = """
import os, sys
sys.path[:0] = {paths!r}
import pyshim
pyshim.spawn_shim = lambda flags, fd, template=True: os.getpid()  # the shim itself is not under test
rc = pyshim.main(["-namespace", "ns", "-address", {address!r}, "-id", "c1", "start"])
heavy = ["json", "hashlib", "re", "asyncio", "uvloop", "google.protobuf", "pyshim_pb2"]
print(rc, [m for m in heavy if m in sys.modules])
"""


def test_start_path_imports_nothing_heavy(tmp_path) -> None:
    # `start` runs once per container in a fresh interpreter: every import
    # it makes is paid at every container start.
    (tmp_path / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {"a": "b"}}))
    address = f"/tmp/pysh-lean-{os.getpid()}/c.sock"
    sock = pyshim.socket_path(address, "ns", "c1")
    paths = [p for p in sys.path if p]
    try:
        res = _run([sys.executable, "-I", "-S", "-c", _LEAN_START.format(paths=paths, address=address)],
                   cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    finally:
        if os.path.exists(sock):
            os.unlink(sock)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"unix://{sock}0 []"  # the address, then rc and no heavy module
    assert (tmp_path / "address").read_text() == f"unix://{sock}"


@pytest.mark.parametrize(("kind", "data"), [("fork", b""), ("start", b"\n\x00options\x00\xff")])
def test_template_request_round_trip(kind: str, data: bytes) -> None:
    argv = ["/usr/bin/python3", "-IS", "/x/containerd-shim-pyshim-v1", "-namespace", "n s", "-id", "é"]
    env = {"PATH": "/bin", "EMPTY": "", "EQ": "a=b=c"}
    body = pyshim._pack_request(kind, argv, env, "/run/bundle dir", data)
    assert pyshim._unpack_request(body) == {"kind": kind, "cwd": "/run/bundle dir", "argv": argv,
                                            "env": env, "data": data}


def _request(fields: bytes, data: bytes = b"", extra: int = 0) -> bytes:
    return struct.pack(">II", len(fields), len(data) + extra) + fields + data


@pytest.mark.parametrize("body", [
    b"", b"\0\0\0", _request(b""), _request(b"fork\0/"), _request(b"fork\0/\0x"), _request(b"fork\0/\x000"),
    _request(b"fork\0/\x003\0a"), _request(b"fork\0/\x001\0a\0NOEQ"), _request(b"fork\0/\x001\0a\0=v"),
    _request(b"start\0/\x001\0a", b"x", extra=1), _request(b"start\0/\x001\0a", b"xy", extra=-1)])
def test_malformed_template_request_is_refused(body: bytes) -> None:
    with pytest.raises((ValueError, struct.error)):
        pyshim._unpack_request(body)


def test_template_path_is_named_by_the_launcher_file(tmp_path) -> None:
    """The native launcher computes the same name in C (bin/launcher.c): the
    sha256 of the launcher's identity and containerd's address. A launcher
    written anew (a reinstall) gives another name; without one, the name
    comes from the interpreter and pyshim.py."""
    launcher = tmp_path / "containerd-shim-pyshim-v1"
    launcher.write_bytes(b"x")
    st = os.stat(launcher)
    ident = f"{launcher}\0{st.st_dev}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_size}"
    assert pyshim.launcher_identity(str(launcher)) == ident
    key = hashlib.sha256(f"{ident}\0{pyshim.BUILD_ID}\0/run/c.sock".encode()).hexdigest()[:16]
    first = pyshim.template_path("/run/c.sock", str(launcher))
    assert first == f"{pyshim.SOCKET_DIR}/pyshim-template-{key}"
    assert pyshim.template_path("/run/other.sock", str(launcher)) != first
    launcher.unlink()
    launcher.write_bytes(b"xy")  # another build's launcher at the same path
    assert pyshim.template_path("/run/c.sock", str(launcher)) != first
    assert pyshim.launcher_identity(str(tmp_path / "missing")) == ""


def test_group_id_skips_json_without_group_keys(tmp_path) -> None:
    (tmp_path / "config.json").write_text("not json at all")
    assert pyshim.group_id(str(tmp_path), "cid") == "cid"
    (tmp_path / "config.json").write_text('{"annotations": {"io.containerd.runc.v2.group": ')  # cut short
    assert pyshim.group_id(str(tmp_path), "cid") == "cid"
    (tmp_path / "config.json").write_text('["io.kubernetes.cri.sandbox-id"]')  # not an object
    assert pyshim.group_id(str(tmp_path), "cid") == "cid"


@pytest.mark.parametrize(("pid", "status", "ns"), [
    (4242, 137, 1_795_000_000_123_456_789), (0, 137, 1_795_000_000_000_000_000), (1, 0, 5), (2**32 - 1, 255, 0)])
def test_delete_response_is_the_protobuf_encoding(pid: int, status: int, ns: int) -> None:
    want = pb.DeleteResponse(pid=pid, exit_status=status)
    want.exited_at.FromNanoseconds(ns)
    got = pyshim._delete_response(pid, status, ns)
    assert got == want.SerializeToString()
    assert pb.DeleteResponse.FromString(got) == want


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
    ("binary:///usr/bin/logger", pyshim.InvalidArgument),  # only Stdio starts a logger
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


def test_stack_dump_names_come_from_one_clock_reading(tmp_path, monkeypatch) -> None:
    """A dump's name is its time; the newest STACK_DUMPS_KEPT are kept by name order.
    Seconds and fraction must come from one reading: read apart, a dump just after a
    second boundary was named a second early, sorted first and removed at once."""
    at = 1767225599 * 10**9 + 999_999_999  # 2025-12-31T23:59:59.999999999Z
    monkeypatch.setattr(pyshim.time, "time_ns", lambda: at)
    path = pyshim.write_stack_dump(str(tmp_path), "dump one\n")
    assert os.path.basename(path) == f"stacks-{os.getpid()}-20251231T235959.999999999Z.log"
    at += 2  # over the boundary
    newest = pyshim.write_stack_dump(str(tmp_path), "dump two\n")
    assert os.path.basename(newest) == f"stacks-{os.getpid()}-20260101T000000.000000001Z.log"
    assert sorted(os.listdir(tmp_path))[-1] == os.path.basename(newest)
    assert open(newest).read() == "dump two\n"


def test_cpus_saturated_reads_the_instant_runnable_count(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pyshim.os, "cpu_count", lambda: 2)
    path = tmp_path / "loadavg"
    path.write_text("0.50 0.40 0.30 3/412 9999\n")
    assert pyshim.cpus_saturated(str(path))
    path.write_text("9.50 9.40 9.30 2/412 9999\n")  # the averages are not looked at
    assert not pyshim.cpus_saturated(str(path))
    for bad in ("", "0.1 0.1 0.1\n", "0.1 0.1 0.1 x/4 1\n"):
        path.write_text(bad)
        assert not pyshim.cpus_saturated(str(path))
    assert not pyshim.cpus_saturated(str(tmp_path / "missing"))


def test_housekeeping_waits_for_busy_cpus_but_not_past_its_bound(monkeypatch) -> None:
    """A round due while the node's CPUs are all taken is put off in steps of
    BUSY_RETRY_SECONDS, and done once they are free, or at the bound regardless."""
    now = [100.0]
    monkeypatch.setattr(pyshim.time, "monotonic", lambda: now[0])

    class Loop:
        def __init__(self) -> None:
            self.later: list = []

        def call_later(self, delay, fn, *args):
            self.later.append((delay, fn, args))

        def step(self) -> None:
            delay, fn, args = self.later.pop(0)
            now[0] += delay
            fn(*args)

    busy = [True]
    monkeypatch.setattr(pyshim, "cpus_saturated", lambda path=pyshim.LOADAVG: busy[0])
    ran: list[float] = []
    loop = Loop()
    pyshim.when_cpus_free(loop, lambda: ran.append(now[0]), now[0] + 1.0)
    assert ran == [] and loop.later[0][0] == pyshim.BUSY_RETRY_SECONDS
    loop.step()
    busy[0] = False
    loop.step()
    assert ran == [100.0 + 2 * pyshim.BUSY_RETRY_SECONDS] and loop.later == []
    busy[0] = True  # busy throughout: done at the bound
    pyshim.when_cpus_free(loop, lambda: ran.append(now[0]), now[0] + 1.0)
    while loop.later:
        loop.step()
    assert len(ran) == 2 and 1.0 <= ran[1] - ran[0] < 1.0 + 2 * pyshim.BUSY_RETRY_SECONDS

    # Housekeeping goes through it, and stays armed (no second round) meanwhile.
    monkeypatch.setattr(pyshim, "malloc_trim", lambda: ran.append("trim"))
    monkeypatch.setattr(pyshim, "release_zero_pages", lambda: ran.append("zero") or 0)
    hk = pyshim.Housekeeping(loop)
    hk.trim = True
    hk.poke()
    loop.step()  # the round is due: the CPUs are busy
    hk.poke()
    assert hk.armed and len(loop.later) == 1 and "trim" not in ran
    busy[0] = False
    loop.step()
    assert ran[-2:] == ["trim", "zero"] and not hk.armed

"""ttrpc server and client behaviour, in-process on real unix sockets.

The server (pyshim.TtrpcServer) runs on a uvloop loop in a thread of its own; the tests
talk to it with raw blocking sockets (framing written out independently here, so that
malformed input can be sent) and with pyshim's TtrpcClient on a second uvloop loop.
No containerd is needed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import pytest
import uvloop
from harness import pb_varint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyshim
import pyshim_pb2 as pb

pytestmark = pytest.mark.unit  # needs no containerd: the fast tier (-m unit)

SERVICE = "test.v1.Echo"
HDR = struct.Struct(">IIBB")  # written out again on purpose: not pyshim.HEADER
IO_TIMEOUT = 5.0


# ----------------------------------------------------------------------------- server


class Served:
    """A TtrpcServer on its own uvloop thread, with a small methods table."""

    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self.slow_finished: list[str] = []
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx["message"]))
        self.server = pyshim.TtrpcServer(self.loop, self._methods())
        self.thread = threading.Thread(target=self.loop.run_forever, name="ttrpc-server", daemon=True)
        self.thread.start()
        self.address = name
        self.serve(name)

    def serve(self, name: str) -> None:
        fd = pyshim.unix_listen(name)
        asyncio.run_coroutine_threadsafe(self.server.serve_fd(fd), self.loop).result(IO_TIMEOUT)

    def _methods(self) -> dict:
        from google.protobuf import empty_pb2

        async def echo(req: pb.StateRequest, meta: dict[str, str]) -> pb.StateResponse:
            # The metadata comes back in `bundle`, so a test can see what the handler got.
            return pb.StateResponse(id=req.id, exec_id=req.exec_id, bundle=json.dumps(meta, sort_keys=True))

        async def not_found(req: pb.StateRequest, meta: dict[str, str]) -> pb.StateResponse:
            raise pyshim.NotFound(f"container {req.id} not found")

        async def esrch(req: pb.StateRequest, meta: dict[str, str]) -> pb.StateResponse:
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH))

        async def slow(req: pb.KillRequest, meta: dict[str, str]) -> empty_pb2.Empty:
            await asyncio.sleep(req.signal / 1000)  # `signal` carries the delay in ms
            self.slow_finished.append(req.id)
            return empty_pb2.Empty()

        async def slow_fail(req: pb.KillRequest, meta: dict[str, str]) -> empty_pb2.Empty:
            await asyncio.sleep(req.signal / 1000)
            self.slow_finished.append(req.id)
            raise pyshim.FailedPrecondition(f"{req.id}: refused late")

        async def returns_none(req: pb.StateRequest, meta: dict[str, str]) -> None:
            return None  # a handler bug: the request must still be answered

        return {
            (SERVICE, "Echo"): (pb.StateRequest, echo),
            (SERVICE, "NotFound"): (pb.StateRequest, not_found),
            (SERVICE, "Esrch"): (pb.StateRequest, esrch),
            (SERVICE, "Slow"): (pb.KillRequest, slow),
            (SERVICE, "ReturnsNone"): (pb.StateRequest, returns_none),
            (SERVICE, "SlowFail"): (pb.KillRequest, slow_fail),
        }

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(0.5), self.loop).result(IO_TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(IO_TIMEOUT)
            self.loop.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    d = tempfile.mkdtemp(prefix="pysh-ttrpc-")
    s = Served(os.path.join(d, "ttrpc.sock"))
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------- raw client


def request_bytes(service: str = SERVICE, method: str = "Echo", payload: bytes = b"",
                  timeout_nano: int = 0, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    req = pb.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    for k, v in metadata:
        req.metadata.add(key=k, value=v)
    return req.SerializeToString()


def frame(sid: int, body: bytes, mtype: int = 1, flags: int = 0, length: int | None = None) -> bytes:
    return HDR.pack(len(body) if length is None else length, sid, mtype, flags) + body


class Raw:
    """A blocking ttrpc connection that can also send malformed input."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.connect(address)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, sid: int, method: str = "Echo", payload: bytes = b"", **kw) -> None:
        self.send(frame(sid, request_bytes(method=method, payload=payload, **kw)))

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            b = self.sock.recv(n - len(buf))
            if not b:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += b
        return buf

    def response(self) -> tuple[int, pb.Response]:
        """(stream id, Response) of the next frame, which must be a response."""
        length, sid, mtype, _flags = HDR.unpack(self._exact(HDR.size))
        assert mtype == 2, f"frame type {mtype}, want 2 (response)"
        resp = pb.Response()
        resp.ParseFromString(self._exact(length))
        return sid, resp

    def call(self, sid: int, method: str = "Echo", payload: bytes = b"", **kw) -> pb.Response:
        self.request(sid, method, payload, **kw)
        got, resp = self.response()
        assert got == sid
        return resp

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(served: Served) -> Iterator[Raw]:
    r = Raw(served.address)
    try:
        yield r
    finally:
        r.close()


def echo_ok(conn: Raw, sid: int, cid: str = "c1") -> None:
    resp = conn.call(sid, "Echo", pb.StateRequest(id=cid).SerializeToString())
    assert resp.status.code == 0, resp.status.message
    out = pb.StateResponse()
    out.ParseFromString(resp.payload)
    assert out.id == cid


# ----------------------------------------------------------------------------- normal calls


def test_normal_call_through_raw_socket(raw: Raw) -> None:
    resp = raw.call(1, "Echo", pb.StateRequest(id="abc", exec_id="e1").SerializeToString())
    assert resp.status.code == 0
    out = pb.StateResponse()
    out.ParseFromString(resp.payload)
    assert (out.id, out.exec_id) == ("abc", "e1")


def test_many_requests_on_one_connection_in_one_write(raw: Raw) -> None:
    raw.send(b"".join(frame(sid, request_bytes(payload=pb.StateRequest(id=f"c{sid}").SerializeToString()))
                      for sid in range(1, 40, 2)))
    got = {}
    for _ in range(20):
        sid, resp = raw.response()
        out = pb.StateResponse()
        out.ParseFromString(resp.payload)
        got[sid] = out.id
    assert got == {sid: f"c{sid}" for sid in range(1, 40, 2)}


def test_metadata_reaches_the_handler(raw: Raw) -> None:
    meta = (("containerd-namespace-ttrpc", "ns1"), ("x-trace", "42"))
    resp = raw.call(1, "Echo", pb.StateRequest(id="m").SerializeToString(), metadata=meta)
    out = pb.StateResponse()
    out.ParseFromString(resp.payload)
    assert json.loads(out.bundle) == dict(meta)


def test_ttrpc_client_call(served: Served) -> None:
    async def main() -> bytes:
        c = await pyshim.TtrpcClient.connect("unix://" + served.address)
        try:
            return await c.call(SERVICE, "Echo", pb.StateRequest(id="via-client").SerializeToString(),
                                {"containerd-namespace-ttrpc": "nsx"})
        finally:
            c.close()

    out = pb.StateResponse()
    out.ParseFromString(uvloop.run(main()))
    assert out.id == "via-client"
    assert json.loads(out.bundle) == {"containerd-namespace-ttrpc": "nsx"}


def test_ttrpc_client_concurrent_calls_are_matched_by_stream_id(served: Served) -> None:
    async def main() -> list[str]:
        c = await pyshim.TtrpcClient.connect(served.address)
        try:
            bodies = await asyncio.gather(*(c.call(SERVICE, "Echo", pb.StateRequest(id=f"n{i}").SerializeToString())
                                            for i in range(50)))
        finally:
            c.close()
        ids = []
        for b in bodies:
            out = pb.StateResponse()
            out.ParseFromString(b)
            ids.append(out.id)
        return ids

    assert uvloop.run(main()) == [f"n{i}" for i in range(50)]


def test_ttrpc_client_raises_remote_error_with_code(served: Served) -> None:
    async def main() -> pyshim.RemoteError:
        c = await pyshim.TtrpcClient.connect(served.address)
        try:
            with pytest.raises(pyshim.RemoteError) as ei:
                await c.call(SERVICE, "NotFound", pb.StateRequest(id="zz").SerializeToString())
            return ei.value
        finally:
            c.close()

    err = uvloop.run(main())
    assert err.code == pyshim.NOT_FOUND
    assert "zz" in str(err)


# ----------------------------------------------------------------------------- errors


def test_unknown_service_is_unimplemented(raw: Raw) -> None:
    raw.send(frame(1, request_bytes(service="no.such.Service", method="Echo")))
    sid, resp = raw.response()
    assert sid == 1
    assert resp.status.code == pyshim.UNIMPLEMENTED == 12
    echo_ok(raw, 3)


def test_unknown_method_is_unimplemented(raw: Raw) -> None:
    resp = raw.call(1, "NoSuchMethod")
    assert resp.status.code == 12
    assert "NoSuchMethod" in resp.status.message
    echo_ok(raw, 3)


def test_even_stream_id_is_invalid_argument_and_connection_survives(raw: Raw) -> None:
    raw.request(2)
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (2, pyshim.INVALID_ARGUMENT)
    assert "odd" in resp.status.message
    echo_ok(raw, 1)
    echo_ok(raw, 3)


@pytest.mark.parametrize("reuse", [5, 3], ids=["reused", "decreasing"])
def test_reused_or_decreasing_stream_id_is_invalid_argument(raw: Raw, reuse: int) -> None:
    echo_ok(raw, 5)
    raw.request(reuse)
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (reuse, 3)
    echo_ok(raw, 7)


def test_request_that_is_not_protobuf_is_invalid_argument(raw: Raw) -> None:
    raw.send(frame(1, b"\x0a\x05ab"))  # field 1, length 5, only 2 bytes follow
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (1, 3)
    echo_ok(raw, 3)


def test_method_payload_that_is_not_protobuf_is_invalid_argument(raw: Raw) -> None:
    resp = raw.call(1, "Echo", b"\x0a\xff\xff\xff\xff\x0f")  # length far past the end
    assert resp.status.code == 3
    echo_ok(raw, 3)


def test_oversized_body_is_resource_exhausted_and_connection_survives(raw: Raw) -> None:
    big = pyshim.MAX_MESSAGE + 1
    raw.send(HDR.pack(big, 1, 1, 0))
    chunk = bytes(1 << 20)
    left = big
    while left:
        n = min(left, len(chunk))
        raw.send(chunk[:n])
        left -= n
    raw.request(3, "Echo", pb.StateRequest(id="after").SerializeToString())
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (1, 8)
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (3, 0)
    out = pb.StateResponse()
    out.ParseFromString(resp.payload)
    assert out.id == "after"


def _request_of_size(total: int, cid: str) -> bytes:
    """A valid Echo request body of exactly `total` bytes (padded with an unknown field)."""
    base = pb.StateRequest(id=cid).SerializeToString()
    n = total
    for _ in range(10):
        body = request_bytes(payload=base + b"\x7a" + pb_varint(n) + bytes(n))  # field 15, bytes
        if len(body) == total:
            return body
        n -= len(body) - total
    raise AssertionError("cannot pad to size")


def test_largest_allowed_body_is_served(raw: Raw) -> None:
    raw.send(frame(1, _request_of_size(pyshim.MAX_MESSAGE, "big")))
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (1, 0), resp.status.message
    out = pb.StateResponse()
    out.ParseFromString(resp.payload)
    assert out.id == "big"


def test_not_found_maps_to_code_5(raw: Raw) -> None:
    resp = raw.call(1, "NotFound", pb.StateRequest(id="ghost").SerializeToString())
    assert resp.status.code == pyshim.NOT_FOUND == 5
    assert "ghost" in resp.status.message


def test_plain_esrch_oserror_maps_to_not_found(raw: Raw) -> None:
    resp = raw.call(1, "Esrch")
    assert resp.status.code == 5


def test_deadline_shorter_than_handler_is_deadline_exceeded(served: Served, raw: Raw) -> None:
    slow = pb.KillRequest(id="deadline", signal=400).SerializeToString()
    raw.request(1, "Slow", slow, timeout_nano=50_000_000)
    echo_ok(raw, 3)  # the slow handler does not hold up the connection
    sid, resp = raw.response()
    assert (sid, resp.status.code) == (1, 4)
    # The handler itself is shielded: it runs to completion past the caller's deadline.
    for _ in range(500):
        if "deadline" in served.slow_finished:
            break
        threading.Event().wait(0.01)
    assert "deadline" in served.slow_finished


def test_failure_after_the_deadline_is_logged_not_lost(served: Served, raw: Raw) -> None:
    """Found by bench/fuzz_ttrpc.py: a handler that failed after its caller's deadline
    left "Task exception was never retrieved" to asyncio (raw text on stderr)."""
    r, w = os.pipe()
    old = pyshim.log.fd
    pyshim.log.fd = w
    try:
        slow = pb.KillRequest(id="late-failure", signal=200).SerializeToString()
        resp = raw.call(1, "SlowFail", slow, timeout_nano=20_000_000)
        assert resp.status.code == pyshim.DEADLINE_EXCEEDED
        for _ in range(500):
            if "late-failure" in served.slow_finished:
                break
            threading.Event().wait(0.01)
        echo_ok(raw, 3)  # one loop turn later, the callback has run
    finally:
        pyshim.log.fd = old
        os.close(w)
    with os.fdopen(r) as f:
        logged = f.read()
    assert 'msg="request failed after its deadline" method=SlowFail' in logged, logged
    assert "late-failure: refused late" in logged
    assert served.loop_errors == []


def test_deadline_longer_than_handler_is_ok(raw: Raw) -> None:
    slow = pb.KillRequest(id="in-time", signal=10).SerializeToString()
    resp = raw.call(1, "Slow", slow, timeout_nano=5_000_000_000)
    assert resp.status.code == 0


def test_handler_returning_garbage_is_answered_internal(raw: Raw) -> None:
    """A handler bug answers that request with an error; it never leaves the caller waiting."""
    raw.sock.settimeout(2.0)
    raw.request(1, "ReturnsNone")
    sid, resp = raw.response()
    assert sid == 1
    assert resp.status.code in (pyshim.INTERNAL, pyshim.UNKNOWN)
    echo_ok(raw, 3)


def test_data_frames_are_ignored(raw: Raw) -> None:
    raw.send(frame(1, b"stray data", mtype=3))
    echo_ok(raw, 3)


# ----------------------------------------------------------------------------- robustness


def test_client_closing_mid_frame_does_not_disturb_others(served: Served) -> None:
    keep = Raw(served.address)
    half_open = Raw(served.address)
    try:
        echo_ok(keep, 1)
        whole = frame(1, request_bytes(payload=pb.StateRequest(id="x").SerializeToString()))
        for cut in (3, HDR.size, HDR.size + 5):
            gone = Raw(served.address)
            gone.send(whole[:cut])
            gone.close()
        half_open.send(whole[:HDR.size + 2])  # stays open with half a frame
        echo_ok(keep, 3)
        fresh = Raw(served.address)
        try:
            echo_ok(fresh, 1)
        finally:
            fresh.close()
        half_open.send(whole[HDR.size + 2:])  # completing it later is fine too
        sid, resp = half_open.response()
        assert (sid, resp.status.code) == (1, 0)
    finally:
        keep.close()
        half_open.close()


def test_connection_count_returns_to_zero_after_clients_leave(served: Served) -> None:
    conns = [Raw(served.address) for _ in range(5)]
    for i, c in enumerate(conns):
        echo_ok(c, 1, f"c{i}")
    for c in conns:
        c.close()
    probe = Raw(served.address)
    try:
        echo_ok(probe, 1)

        async def count() -> int:
            for _ in range(200):
                if len(served.server.conns) == 1:
                    break
                await asyncio.sleep(0.01)
            return len(served.server.conns)

        assert asyncio.run_coroutine_threadsafe(count(), served.loop).result(IO_TIMEOUT) == 1
    finally:
        probe.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.one_of(
    st.binary(min_size=1, max_size=300),
    # well-framed request frames with random bodies, stream ids and types
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=64)),
             min_size=1, max_size=5).map(lambda fs: b"".join(frame(s, b, mtype=t & 3) for s, b, t in
                                                             ((s, b, t) for s, t, b in fs))),
))
def test_random_bytes_never_kill_the_server(served: Served, junk: bytes) -> None:
    r = Raw(served.address)
    try:
        r.send(junk)
    except OSError:
        pass  # the server may hang up on garbage: that is allowed
    finally:
        r.close()
    fresh = Raw(served.address)
    try:
        echo_ok(fresh, 1)
    finally:
        fresh.close()


def test_server_still_answers_after_the_fuzzing(served: Served) -> None:
    r = Raw(served.address)
    try:
        for sid in range(1, 20, 2):
            echo_ok(r, sid)
    finally:
        r.close()


# ----------------------------------------------------------------------------- peer check


def test_peer_with_another_uid_or_gid_is_refused(served: Served) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another uid")
    name = f"@pyshim-test-peer-{os.getpid()}"
    served.serve(name)  # abstract: no file permissions stand in the way
    req = frame(1, request_bytes(payload=pb.StateRequest(id="p").SerializeToString())).hex()
    script = (
        "import os, socket, sys\n"
        "if sys.argv[1] in ('nobody', 'other-gid'):\n"
        "    os.setgroups([]); os.setgid(65534)\n"
        "if sys.argv[1] == 'nobody':\n"
        "    os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(5)\n"
        f"s.connect('\\0' + {name[1:]!r})\n"
        "try:\n"
        f"    s.sendall(bytes.fromhex({req!r}))\n"
        "    print(len(s.recv(4096)))\n"
        "except OSError as e:\n"
        "    print(0)\n"
    )
    same = subprocess.run([sys.executable, "-c", script, "root"], check=False, capture_output=True, text=True, timeout=20)
    other = subprocess.run([sys.executable, "-c", script, "nobody"], check=False, capture_output=True, text=True, timeout=20)
    assert same.returncode == 0, same.stderr
    assert int(same.stdout) > 0  # control: our own uid is answered
    assert other.returncode == 0, other.stderr
    assert int(other.stdout) == 0  # another uid: closed without an answer
    # Our uid with another gid is refused too, as by the Go shim's ttrpc server.
    gid = subprocess.run([sys.executable, "-c", script, "other-gid"], check=False, capture_output=True, text=True, timeout=20)
    assert gid.returncode == 0, gid.stderr
    assert int(gid.stdout) == 0


# ----------------------------------------------------------------------------- shutdown, client


def test_shutdown_answers_inflight_requests_then_closes() -> None:
    d = tempfile.mkdtemp(prefix="pysh-ttrpc-")
    s = Served(os.path.join(d, "s.sock"))
    try:
        r = Raw(s.address)
        r.request(1, "Slow", pb.KillRequest(id="drain", signal=200).SerializeToString())
        echo_ok(r, 3)  # the slow request is in flight now
        asyncio.run_coroutine_threadsafe(s.server.shutdown(5.0), s.loop).result(IO_TIMEOUT)
        sid, resp = r.response()
        assert (sid, resp.status.code) == (1, 0)
        assert r.sock.recv(1) == b""  # then the connection is closed
        with pytest.raises(OSError):
            Raw(s.address)  # and the listener is gone
    finally:
        s.loop.call_soon_threadsafe(s.loop.stop)
        s.thread.join(IO_TIMEOUT)
        s.loop.close()
        shutil.rmtree(d, ignore_errors=True)


def test_client_call_timeout_is_enforced_by_the_client() -> None:
    """TtrpcClient.call(timeout=T) gives up after T with asyncio.TimeoutError even
    when the peer never answers: Publisher relies on it (it retries on TimeoutError),
    so that a hung containerd cannot stall event delivery forever."""
    d = tempfile.mkdtemp(prefix="pysh-ttrpc-")
    path = os.path.join(d, "mute.sock")
    lfd = pyshim.unix_listen(path)

    async def main() -> bool:
        c = await pyshim.TtrpcClient.connect(path)
        call = asyncio.ensure_future(c.call(SERVICE, "Echo", b"", timeout=0.2))
        done, _ = await asyncio.wait([call], timeout=3)
        c.close()
        if not done:
            call.cancel()
            return False
        return isinstance(call.exception(), asyncio.TimeoutError)

    try:
        assert uvloop.run(main()), "call(timeout=0.2) was still waiting after 3 s"
    finally:
        os.close(lfd)
        shutil.rmtree(d, ignore_errors=True)


def test_client_pending_calls_fail_when_the_connection_drops() -> None:
    d = tempfile.mkdtemp(prefix="pysh-ttrpc-")
    path = os.path.join(d, "drop.sock")
    lfd = pyshim.unix_listen(path)
    lsock = socket.socket(fileno=lfd)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        c = await pyshim.TtrpcClient.connect(path)
        peer, _ = await loop.run_in_executor(None, lsock.accept)
        call = asyncio.ensure_future(c.call(SERVICE, "Echo", b""))
        peer.settimeout(IO_TIMEOUT)
        assert await loop.run_in_executor(None, peer.recv, HDR.size)  # the call is in flight
        peer.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(call, 5)
        assert c.closed
        with pytest.raises(ConnectionError):
            await c.call(SERVICE, "Echo", b"")

    try:
        uvloop.run(main())
    finally:
        lsock.close()
        shutil.rmtree(d, ignore_errors=True)


def test_client_wire_format_odd_increasing_ids_timeout_and_metadata() -> None:
    """What TtrpcClient puts on the wire, read by a raw peer that answers by hand."""
    d = tempfile.mkdtemp(prefix="pysh-ttrpc-")
    path = os.path.join(d, "peer.sock")
    lsock = socket.socket(fileno=pyshim.unix_listen(path))
    seen: list[tuple[int, int, pb.Request]] = []

    def peer() -> None:
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(IO_TIMEOUT)
            buf = b""
            while len(seen) < 2:
                buf += conn.recv(65536)
                while len(buf) >= HDR.size:
                    length, sid, mtype, _flags = HDR.unpack_from(buf)
                    if len(buf) < HDR.size + length:
                        break
                    req = pb.Request()
                    req.ParseFromString(buf[HDR.size:HDR.size + length])
                    buf = buf[HDR.size + length:]
                    seen.append((sid, mtype, req))
            for sid, _, req in reversed(seen):  # answered out of order
                conn.sendall(frame(sid, pb.Response(payload=req.method.encode()).SerializeToString(), mtype=2))

    t = threading.Thread(target=peer)
    t.start()

    async def main() -> list[bytes]:
        c = await pyshim.TtrpcClient.connect(path)
        try:
            return await asyncio.gather(c.call("svc", "First", b"\x01", {"k": "v"}, timeout=2.5),
                                        c.call("svc", "Second", b""))
        finally:
            c.close()

    try:
        assert uvloop.run(main()) == [b"First", b"Second"]
    finally:
        t.join(IO_TIMEOUT)
        lsock.close()
        shutil.rmtree(d, ignore_errors=True)
    (sid1, type1, first), (sid2, type2, second) = seen
    assert (sid1, sid2, type1, type2) == (1, 3, 1, 1)
    assert (first.service, first.method, first.payload) == ("svc", "First", b"\x01")
    assert first.timeout_nano == 2_500_000_000
    assert [(kv.key, kv.value) for kv in first.metadata] == [("k", "v")]
    assert second.timeout_nano == 0 and not second.metadata


def test_a_peer_that_does_not_read_is_not_read_either(served: Served) -> None:
    """Requests sent without reading the answers: once the answers pile up, the
    server stops reading, so the sender blocks instead of the server's memory growing."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(served.address)
    s.setblocking(False)
    payload = pb.StateRequest(id="flood").SerializeToString()
    chunk = b"".join(frame(sid, request_bytes(payload=payload)) for sid in range(1, 2001, 2))
    sid0, sent, cap = 2001, 0, 16 << 20
    try:
        while sent < cap:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                # Blocked: does the server read on, if given time? (bounded wait)
                import select

                if not select.select([], [s], [], 2.0)[1]:
                    break
                continue
            # The next chunk carries fresh, increasing stream ids.
            chunk = b"".join(frame(sid, request_bytes(payload=payload))
                             for sid in range(sid0, sid0 + 2000, 2))
            sid0 += 2000
        assert sent < cap, f"the server read {sent} bytes of requests nobody read the answers to"
        print(f"blocked after {sent} bytes of requests")
        other = Raw(served.address)
        try:
            echo_ok(other, 1)  # it serves others meanwhile
        finally:
            other.close()
    finally:
        s.close()

#!/usr/bin/env python3
"""Fuzzes the shim's ttrpc frame decoder and its request dispatcher.

Three targets, each driven by hypothesis:

  decoder   pyshim.FrameDecoder, fed random streams of frames (random stream ids,
            types, flags, bodies, headers announcing more than 4 MiB, cut anywhere) in
            random chunks, compared with an independent reference decoder written
            here. Properties: feed() never raises, returns the reference's frames,
            and keeps at most one incomplete frame buffered.
  dispatch  pyshim.ServerConnection with pyshim.TtrpcServer and the real
            TaskService method table, on a uvloop loop, fed through a fake
            transport: unknown services and methods, random bytes as requests,
            random protobuf payloads for all 17 task methods (structured from
            their descriptors, or raw bytes), random timeouts and metadata, random
            stream ids, flags and types, fed in one burst or frame by frame.
  socket    the same inputs over a real unix socket to a served TtrpcServer,
            half-closed at the end; then a good request on a new connection.

Properties of dispatch and socket: no exception escapes data_received() or a
request's task (the loop's exception handler records any); every complete request
frame gets exactly one response on its stream id, except a Wait on a process that
has not exited (which, as in the Go shim, is answered only at that exit) and those
are released when the connection closes; the fixed refusals get their codes (4 MiB+
-> RESOURCE_EXHAUSTED, even or reused ids and bad protobuf -> INVALID_ARGUMENT,
unknown service or method -> UNIMPLEMENTED); no request is answered INTERNAL (an
unexpected exception in a handler); the server answers a good request afterwards;
the process's RSS stays bounded.

Nothing outside a temp dir is touched: the TaskService finds a fake `runc` first and
only on its PATH (create/exec start a short `sleep` as the "container", every other
command succeeds, a console socket is refused), every path in the structured
payloads points into the temp dir, and rootfs mounts target a missing directory.
Events go to a recording publisher.

    python3 bench/fuzz_ttrpc.py                   # short budget (CI: tests/test_fuzz.py)
    python3 bench/fuzz_ttrpc.py --inputs 100000   # the long run (inputs per target)

Prints one line per target and a summary; exits 1 if a property failed (hypothesis
prints the shrunk input).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import resource
import shutil
import socket
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter, deque

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyshim
import pyshim_pb2 as pb

HDR = struct.Struct(">IIBB")  # written out again on purpose: not pyshim.HEADER
MAX = 4 << 20
TASK = "containerd.task.v2.Task"
METHODS = {
    "State": pb.StateRequest, "Create": pb.CreateTaskRequest, "Start": pb.StartRequest,
    "Delete": pb.DeleteRequest, "Pids": pb.PidsRequest, "Pause": pb.PauseRequest,
    "Resume": pb.ResumeRequest, "Checkpoint": pb.CheckpointTaskRequest, "Kill": pb.KillRequest,
    "Exec": pb.ExecProcessRequest, "ResizePty": pb.ResizePtyRequest, "CloseIO": pb.CloseIORequest,
    "Update": pb.UpdateTaskRequest, "Wait": pb.WaitRequest, "Stats": pb.StatsRequest,
    "Connect": pb.ConnectRequest, "Shutdown": pb.ShutdownRequest,
}
# Codes the dispatcher itself gives, whatever the handler.
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 3, 8, 12, 13

FAKE_RUNC = r"""#!/bin/sh
# A stand-in for runc: it never touches a container.
log=/dev/null
while [ $# -gt 0 ]; do
    case "$1" in
        --root|--log-format) shift 2 ;;
        --log) log=$2; shift 2 ;;
        --systemd-cgroup) shift ;;
        *) break ;;
    esac
done
cmd=$1
[ $# -gt 0 ] && shift
case "$cmd" in
    create|exec)
        pidfile="" prev=""
        for a in "$@"; do
            if [ "$a" = --console-socket ]; then
                echo '{"level":"error","msg":"fake runc: no terminal here"}' >>"$log"
                exit 1
            fi
            [ "$prev" = --pid-file ] && pidfile=$a
            prev=$a
        done
        /bin/sleep 0.05 </dev/null >/dev/null 2>&1 &
        echo $! >"$pidfile"
        ;;
    ps) echo '[]' ;;
esac
exit 0
"""


# --------------------------------------------------------------- reference decoder


def reference_frames(stream: bytes) -> list[tuple[int, int, int, bytes | int]]:
    """Every complete frame of `stream`: a body over MAX is its announced length
    once all of it has gone by (it is discarded, not kept)."""
    out: list[tuple[int, int, int, bytes | int]] = []
    i = 0
    while len(stream) - i >= HDR.size:
        length, sid, mtype, flags = HDR.unpack_from(stream, i)
        i += HDR.size
        if len(stream) - i < length:
            break
        out.append((sid, mtype, flags, length if length > MAX else stream[i:i + length]))
        i += length
    return out


def expected_answers(frames) -> list[tuple[int, int | None]]:
    """(stream id, code or None for "whatever the handler says") for each request."""
    out: list[tuple[int, int | None]] = []
    last = 0
    for sid, mtype, _flags, body in frames:
        if mtype != 1:
            continue
        if isinstance(body, int):
            out.append((sid, RESOURCE_EXHAUSTED))
        elif sid % 2 == 0 or sid <= last:
            out.append((sid, INVALID_ARGUMENT))
        else:
            last = sid
            req = pb.Request()
            try:
                req.ParseFromString(body)
            except Exception:  # noqa: BLE001 - any parse failure
                out.append((sid, INVALID_ARGUMENT))
                continue
            if req.service not in pyshim.TASK_SERVICES or req.method not in METHODS:
                out.append((sid, UNIMPLEMENTED))
            else:
                out.append((sid, None))
    return out


def parse_responses(data: bytes) -> list[tuple[int, int]]:
    out = []
    for sid, mtype, _flags, body in reference_frames(data):
        assert mtype == 2, f"the server sent a frame of type {mtype}"
        assert not isinstance(body, int), "the server sent a frame over 4 MiB"
        resp = pb.Response()
        resp.ParseFromString(body)
        out.append((sid, resp.status.code))
    return out


# --------------------------------------------------------------- strategies


class Paths:
    """Everything the structured payloads may name, all inside one temp dir."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.bin = os.path.join(root, "bin")
        self.bundle = os.path.join(root, "bundle")  # has config.json, no rootfs/
        self.cwd = os.path.join(root, "cwd")  # empty: a bundle "" finds nothing
        self.fifo = os.path.join(root, "io", "fifo")
        for d in (self.bin, self.bundle, self.cwd, os.path.dirname(self.fifo)):
            os.makedirs(d)
        os.mkfifo(self.fifo)
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            f.write('{"linux": {"namespaces": [{"type": "pid"}]}}')
        runc = os.path.join(self.bin, "runc")
        with open(runc, "w") as f:
            f.write(FAKE_RUNC)
        os.chmod(runc, 0o755)


class Draw:
    """Where the fuzzer's choices come from: hypothesis (`st.data()`, which shrinks a
    failing input to a small one) or a seeded PRNG (fast: the long runs)."""

    def __init__(self, data=None, rng: random.Random | None = None) -> None:
        self.data = data
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        if self.data is not None:
            return self.data.draw(st.integers(lo, hi))
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bool(self) -> bool:
        return self.int(0, 1) == 1

    def binary(self, max_size: int) -> bytes:
        if self.data is not None:
            return self.data.draw(st.binary(max_size=max_size))
        n = self.rng.randint(0, max_size)
        return self.rng.randbytes(n)

    def text(self, max_size: int = 24) -> str:
        if self.data is not None:
            return self.data.draw(st.text(max_size=max_size))
        n = self.rng.randint(0, max_size)
        pool = self.choice(["ascii", "ascii", "any"])
        if pool == "ascii":
            return "".join(chr(self.rng.randint(32, 126)) for _ in range(n))
        return "".join(chr(self.rng.choice([self.rng.randint(0, 0xD7FF),
                                            self.rng.randint(0xE000, 0x10FFFF)])) for _ in range(n))


class Generator:
    """Inputs for the decoder and the dispatcher: streams of ttrpc frames."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        io = os.path.join(paths.root, "io")
        self.io = io
        self.stdio = ["", paths.fifo, "fifo://" + paths.fifo, os.path.join(io, "missing"),
                      os.path.join(io, "out"), "file://" + os.path.join(io, "f", "out"),
                      "file://relative", "binary:///bin/true", "tcp://x", "out.txt"]
        self.bundles = [paths.bundle, paths.bundle, "", paths.root,
                        os.path.join(paths.root, "missing"), "\0"]
        self.methods = sorted(METHODS)

    def id(self, d: Draw) -> str:
        return d.choice(["c1", "c2", "c1"]) if d.int(0, 3) else d.text()

    def exec_id(self, d: Draw) -> str:
        return d.choice(["", "e1", "e2"]) if d.int(0, 3) else d.text()

    def stdio_path(self, d: Draw) -> str:
        if d.int(0, 4):
            return d.choice(self.stdio)
        name = d.text(12).replace("/", "_").replace("\0", "_")
        return os.path.join(self.io, "r", name)  # "r" does not exist

    def bundle(self, d: Draw) -> str:
        if d.int(0, 4):
            return d.choice(self.bundles)
        return os.path.join(self.paths.root, d.text(8).replace("\0", "_"))

    def any(self, d: Draw) -> tuple[str, bytes] | None:
        kind = d.int(0, 3)
        if kind == 0:
            return None
        if kind == 1:
            v = d.bool()
            o = pb.RuncOptions(binary_name=d.choice(["", "runc", "no-such-runc", "/nonexistent/runc",
                                                     os.path.join(self.paths.bin, "runc")]),
                               root=d.choice(["", os.path.join(self.paths.root, "runc-root")]),
                               systemd_cgroup=v, no_pivot_root=v)
            return "containerd.runc.v1.Options", o.SerializeToString()
        if kind == 2:
            return (d.choice(["containerd.runc.v1.Options", "containerd.linux.runc.CreateOptions",
                              "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                              "", "x/y"]), d.binary(40))
        return "json", d.choice([b"{}", b'{"cpu": {}}', b"[]", b"null", b"{",
                                 b'{"process": {"args": ["/bin/true"]}}'])

    def mounts(self, d: Draw) -> list:
        return [pb.Mount(type=d.choice(["bind", "tmpfs", "overlay", "", "x"]),
                         source=d.choice(["", "none", self.paths.root, "/nonexistent"]),
                         options=[d.choice(["ro", "rbind", "nosuid", "size=1k",
                                            "lowerdir=/nonexistent", "bogus"])
                                  for _ in range(d.int(0, 3))])
                for _ in range(d.int(0, 2) if d.int(0, 3) == 0 else 0)]

    def u32(self, d: Draw) -> int:
        if d.bool():
            return d.choice([0, 1, 9, 15, 19, 24, 64, 65, 80, 2**31, 2**32 - 1])
        return d.int(0, 2**32 - 1)

    def structured(self, d: Draw, name: str) -> bytes:
        """A message of the method's request type, every field filled from the
        descriptor, strings from the sets above."""
        cls = METHODS[name]
        m = cls()
        for f in cls.DESCRIPTOR.fields:
            key = f.name
            if key == "id":
                m.id = self.id(d)
            elif key == "exec_id":
                m.exec_id = self.exec_id(d)
            elif key == "bundle":
                m.bundle = self.bundle(d)
            elif key in ("stdin", "stdout", "stderr") and f.type == f.TYPE_STRING:
                setattr(m, key, self.stdio_path(d))
            elif key in ("checkpoint", "parent_checkpoint", "path"):
                setattr(m, key, "" if d.int(0, 3) else d.text(8))
            elif key in ("options", "spec", "resources"):
                value = self.any(d)
                if value is not None:
                    getattr(m, key).type_url, getattr(m, key).value = value
            elif key == "rootfs":
                m.rootfs.extend(self.mounts(d))
            elif key == "annotations":
                for _ in range(d.int(0, 2)):
                    m.annotations[d.text(6)] = d.text(6)
            elif key == "terminal":
                m.terminal = d.int(0, 7) == 0
            elif f.type == f.TYPE_BOOL:
                setattr(m, key, d.bool())
            elif f.type == f.TYPE_UINT32:
                setattr(m, key, self.u32(d))
        return m.SerializeToString()

    def request(self, d: Draw) -> tuple[str, bytes]:
        """(task method name or "", the Request's bytes)."""
        kind = d.choice(["task"] * 8 + ["unknown-method", "unknown-service", "raw"])
        if kind == "raw":
            return "", d.binary(80)
        service, method = d.choice(pyshim.TASK_SERVICES), d.choice(self.methods)
        if kind == "unknown-method":
            method = d.text(10) if d.bool() else d.choice(["state", "Forward", ""])
        elif kind == "unknown-service":
            service = d.text(16) if d.bool() else d.choice(
                ["containerd.task.v1.Task", "containerd.services.events.ttrpc.v1.Events", ""])
        if method in METHODS:
            payload = self.structured(d, method) if d.int(0, 4) else d.binary(64)
        else:
            payload = d.binary(32)
        req = pb.Request(service=service, method=method, payload=payload,
                         timeout_nano=0 if d.int(0, 3) else d.choice([1, 1000, 10**9, -1, 2**63 - 1]))
        for _ in range(d.int(0, 2)):
            req.metadata.add(key=d.choice(["containerd-namespace-ttrpc", "x"]), value=d.text(8))
        body = req.SerializeToString()
        if d.int(0, 19) == 0 and body:  # a valid request with one byte changed
            i = d.int(0, len(body) - 1)
            body = body[:i] + bytes([d.int(0, 255)]) + body[i + 1:]
        return (method if service in pyshim.TASK_SERVICES else ""), body

    def setup(self, d: Draw) -> list[tuple[str, bytes]]:
        """A good Create, then maybe Start, Exec and the exec's Start."""
        good = ["", self.paths.fifo, "fifo://" + self.paths.fifo, os.path.join(self.io, "out")]
        cid = d.choice(["c1", "c2"])
        create = pb.CreateTaskRequest(id=cid, bundle=self.paths.bundle, stdin=d.choice(["", self.paths.fifo]),
                                      stdout=d.choice(good), stderr=d.choice(good))
        steps = [("Create", create), ("Start", pb.StartRequest(id=cid)),
                 ("Exec", pb.ExecProcessRequest(id=cid, exec_id="e1", stdout=d.choice(good))),
                 ("Start", pb.StartRequest(id=cid, exec_id="e1"))]
        return [(m, pb.Request(service=TASK, method=m, payload=msg.SerializeToString()).SerializeToString())
                for m, msg in steps[:d.int(1, 4)]]

    def frames(self, d: Draw) -> tuple[list[tuple[str, bytes]], bytes]:
        """A list of (task method or "", frame bytes), and trailing bytes (nothing,
        random bytes, or a header whose body never comes)."""
        out = []
        sid = 1
        # Half the inputs start from a container that exists (and maybe runs, with
        # an exec), so that the rest reach past the "not found" answers.
        setup = self.setup(d) if d.bool() else []
        for i in range(len(setup) + d.int(1, 8)):
            method, body = setup[i] if i < len(setup) else self.request(d)
            how = d.choice(["next"] * 12 + ["even", "reuse", "random", "zero"])
            if how == "next":
                sid += 2 * d.int(1, 3)
            elif how == "even":
                sid += 1
            elif how == "random":
                sid = d.int(0, 2**32 - 1)
            elif how == "zero":
                sid = 0
            sid &= 0xFFFFFFFF
            mtype = d.choice([1] * 10 + [0, 2, 3, 255])
            flags = d.choice([0] * 6 + [1, 2, 255])
            if d.int(1, 200) == 100:  # not 0: hypothesis favours the low end
                length = MAX + d.choice([1, 2, 4096])
                out.append(("", HDR.pack(length, sid, mtype, flags) + bytes(length)))
            else:
                out.append((method if mtype == 1 else "", HDR.pack(len(body), sid, mtype, flags) + body))
        tail = d.choice([b"", b"", b"random", b"header"])
        if tail == b"random":
            tail = d.binary(24)
        elif tail == b"header":
            tail = HDR.pack(d.int(0, 2**32 - 1), 99, 1, 0)
        return out, tail

    def cuts(self, d: Draw, total: int) -> list[int]:
        """Cut points for feeding `total` bytes in pieces."""
        if total <= 1 or d.bool():
            return []
        return sorted({d.int(1, total - 1) for _ in range(d.int(1, 6))})


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a] or [b""]


# --------------------------------------------------------------- the harness


class Recorder:
    """Stands in for the Publisher: keeps the last events."""

    def __init__(self) -> None:
        self.events: deque = deque(maxlen=64)
        self.count = 0

    def publish(self, topic: str, type_url: str, value: bytes) -> None:
        self.events.append(topic)
        self.count += 1


class FakeTransport:
    """What ServerConnection needs of an asyncio transport; writes are kept."""

    def __init__(self, loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.out = bytearray()
        self.closing = False
        self.protocol = None

    def get_extra_info(self, name: str):
        return self.sock if name == "socket" else None

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)


class Harness:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.errors: list[str] = []
        self.loop.set_exception_handler(self._on_loop_error)
        self.service: pyshim.TaskService | None = None
        self.reaper = pyshim.Reaper(self.loop, self._on_exit)
        self.runner = pyshim.Runner(self.loop, self.reaper)
        self.publisher = Recorder()
        self.shutdowns = 0
        self.pair = socket.socketpair()  # its fd gives the peer check our own uid
        self.stats = Counter()

    def _on_loop_error(self, loop, context) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _on_exit(self, pid: int, code: int) -> None:
        if self.service is not None:
            self.service.on_exit(pid, code)

    def _on_empty(self) -> None:
        self.shutdowns += 1

    def new_service(self) -> pyshim.TtrpcServer:
        """A fresh TaskService for one input, and a server with its method table."""
        self.service = pyshim.TaskService(self.loop, self.runner, self.publisher, "fuzz",
                                          self._on_empty)
        return pyshim.TtrpcServer(self.loop, self.service.methods())

    def run_until(self, done, timeout: float) -> bool:
        async def wait() -> bool:
            end = time.monotonic() + timeout
            while not done():
                if time.monotonic() > end:
                    return False
                await asyncio.sleep(0.002)
            return True

        return self.loop.run_until_complete(wait())

    def finish_service(self) -> None:
        """Ends what the example left: kill its processes, release unresolved waits
        (as the shim's own exit would), and forget the service."""
        svc = self.service
        for p in list(svc.pids.values()):
            assert p.pid > 0, f"the service holds pid {p.pid}"  # kill(0) would hit us
            try:
                os.kill(p.pid, 9)
            except ProcessLookupError:
                pass
        self.run_until(lambda: not svc.pids, 2.0)
        for c in list(svc.containers.values()):
            for p in [c.init, *c.execs.values()]:
                p.stdio.close()
                if not p.wait.done():
                    p.wait.cancel()
        if svc.oom is not None:
            for cid in list(svc.containers):
                svc.oom.forget(cid)
        self.loop.run_until_complete(asyncio.sleep(0))  # a loop turn: the cancellations run
        self.service = None

    # ---- dispatch: in-process, fake transport

    def dispatch(self, frames: list[tuple[str, bytes]], tail: bytes, points: list[int],
                 stepwise: bool) -> None:
        server = self.new_service()
        conn = pyshim.ServerConnection(server)
        tr = FakeTransport(self.loop, self.pair[0])
        tr.protocol = conn
        conn.connection_made(tr)
        stream = b"".join(f for _, f in frames) + tail
        ref = reference_frames(stream)
        want = expected_answers(ref)
        methods = {}
        for (method, f), (sid, mtype, _fl, _b) in zip(frames, ref, strict=False):
            if mtype == 1 and method:
                methods.setdefault(sid, method)
        self.stats["requests"] += len(want)

        def answered() -> int:
            return len(parse_responses(bytes(tr.out)))

        if stepwise:
            # Frame by frame, each answered (or given a moment, for a Wait) before the next.
            fed = 0
            for method, f in frames:
                for piece in cut(f, points):
                    conn.data_received(piece)
                fed += len(f)
                n = len(expected_answers(reference_frames(stream[:fed])))
                self.run_until(lambda n=n: answered() >= n, 0.2 if method == "Wait" else 3.0)
            conn.data_received(tail)
        else:
            for piece in cut(stream, points):
                conn.data_received(piece)
        # Every request not waiting for an exit is answered within a bound (check()
        # says which may wait); a Wait gets a moment for its process to exit.
        need = Counter(sid for sid, _ in want if methods.get(sid) != "Wait")

        def all_but_waits() -> bool:
            return not need - Counter(sid for sid, _ in parse_responses(bytes(tr.out)))

        self.run_until(all_but_waits, 3.0)
        self.run_until(lambda: conn.inflight == 0, 0.1)
        assert not self.errors, self.errors
        got = parse_responses(bytes(tr.out))
        self.check(want, got, methods)
        assert len(conn.decoder._buf) < HDR.size + MAX, "the decoder keeps more than a frame"
        conn.close()
        assert self.run_until(lambda: conn.closed and conn not in server.conns, 5)
        self.finish_service()
        self.run_until(lambda: conn.inflight == 0, 2.0)
        assert conn.inflight == 0, f"{conn.inflight} requests still in flight after close"
        assert not self.errors, self.errors

    def check(self, want, got, methods) -> None:
        got_sids = Counter(sid for sid, _ in got)
        want_sids = Counter(sid for sid, _ in want)
        extra = got_sids - want_sids
        assert not extra, f"answers to streams nobody asked on: {extra}"
        for sid, code in got:
            assert code != INTERNAL, f"stream {sid} ({methods.get(sid)}) answered INTERNAL"
        # Fixed refusals: matched in order per stream id.
        by_sid: dict[int, list[int]] = {}
        for sid, code in got:
            by_sid.setdefault(sid, []).append(code)
        for sid, code in want:
            if code is not None and sid in by_sid:
                assert code in by_sid[sid], f"stream {sid}: want {code}, got {by_sid[sid]}"
        missing = want_sids - got_sids
        for sid, n in missing.items():
            # Only a request on a fresh, valid stream id can be left waiting.
            assert n == 1 and methods.get(sid) == "Wait", \
                f"stream {sid} ({methods.get(sid)}) unanswered: want {want}, got {got}"
            self.stats["wait pending"] += 1
        for _sid, code in got:
            self.stats[f"code {code}"] += 1

    # ---- socket: the same, over a real unix socket

    def over_socket(self, frames: list[tuple[str, bytes]], tail: bytes) -> None:
        server = self.new_service()
        path = os.path.join(self.paths.root, "s.sock")
        if os.path.exists(path):
            os.unlink(path)
        self.loop.run_until_complete(server.serve_fd(pyshim.unix_listen(path)))
        stream = b"".join(f for _, f in frames) + tail
        ref = reference_frames(stream)
        want = expected_answers(ref)
        methods = {}
        for (method, _f), (sid, mtype, _fl, _b) in zip(frames, ref, strict=False):
            if mtype == 1 and method:
                methods.setdefault(sid, method)

        async def talk(data: bytes, enough) -> bytes:
            """Sends `data`, reads until `enough(responses)` (3 s at most), then
            half-closes and reads on: the server must close the connection."""
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            buf = bytearray()

            async def recv_until(pred) -> bool:
                end = time.monotonic() + 3.0
                while not pred():
                    left = end - time.monotonic()
                    if left <= 0:
                        return False
                    try:
                        b = await asyncio.wait_for(self.loop.sock_recv(s, 65536), left)
                    except TimeoutError:
                        return False
                    if not b:
                        return True
                    buf.extend(b)
                return True

            try:
                await self.loop.sock_connect(s, path)
                await self.loop.sock_sendall(s, data)
                await recv_until(lambda: enough(parse_responses(bytes(buf))))
                s.shutdown(socket.SHUT_WR)
                eof = []

                async def until_eof() -> None:
                    while True:
                        b = await self.loop.sock_recv(s, 65536)
                        if not b:
                            eof.append(True)
                            return
                        buf.extend(b)

                try:
                    await asyncio.wait_for(until_eof(), 3.0)
                except TimeoutError:
                    pass
                assert eof, "the server kept the half-closed connection open"
                return bytes(buf)
            finally:
                s.close()

        waits = {sid for sid, m in methods.items() if m == "Wait"}
        need = Counter(sid for sid, _ in want if sid not in waits)

        def enough(got) -> bool:
            return not need - Counter(sid for sid, _ in got)

        got = parse_responses(self.loop.run_until_complete(talk(stream, enough)))
        self.check(want, got, methods)
        req = pb.Request(service=TASK, method="Connect",
                         payload=pb.ConnectRequest(id="c1").SerializeToString()).SerializeToString()
        good = HDR.pack(len(req), 1, 1, 0) + req
        after = parse_responses(self.loop.run_until_complete(talk(good, bool)))
        assert after == [(1, 0)], f"a good request after the input got {after}"
        assert not self.errors, self.errors
        self.loop.run_until_complete(server.shutdown(0.5))
        self.finish_service()
        # Python 3.13 (and uvloop under it) removes a unix server's socket file itself
        # when the server closes; on 3.11 it stays for us to remove.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def close(self) -> None:
        self.pair[0].close()
        self.pair[1].close()
        self.loop.close()


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=300, help="inputs per target (default 300)")
    ap.add_argument("--socket-share", type=int, default=10,
                    help="the socket target gets inputs/N (default 10)")
    ap.add_argument("--targets", default="decoder,dispatch,socket")
    ap.add_argument("--engine", choices=["hypothesis", "random"],
                    help="default: hypothesis up to 2000 inputs, else random (faster)")
    ap.add_argument("--seed", type=int, help="the random engine's seed (default: a new one)")
    ap.add_argument("--rss-limit-kb", type=int, default=64 * 1024,
                    help="fail if RSS grows more than this after the first 10%% (default 64 MiB)")
    args = ap.parse_args(argv)

    root = tempfile.mkdtemp(prefix="pyshim-fuzz-")
    paths = Paths(root)
    os.environ["PATH"] = paths.bin  # which("runc") finds the fake one, and only it
    os.chdir(paths.cwd)
    log_path = os.path.join(root, "shim.log")
    pyshim.log.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pyshim.set_subreaper()  # the fake containers' sleeps are reaped by the Reaper
    h = Harness(paths)
    gen = Generator(paths)
    rss = {"start": rss_kb(), "base": 0, "max": 0}
    counts: Counter = Counter()
    failures: list[tuple[str, str]] = []
    budgets = {"decoder": args.inputs, "dispatch": args.inputs,
               "socket": max(1, args.inputs // args.socket_share)}

    def sample(target: str) -> None:
        counts[target] += 1
        n, budget = counts[target], budgets[target]
        if n % 200 == 0 or n == budget:
            now = rss_kb()
            rss["max"] = max(rss["max"], now)
            if n >= budget // 10 and not rss["base"]:
                rss["base"] = now
            if rss["base"] and now - rss["base"] > args.rss_limit_kb:
                raise AssertionError(f"RSS grew from {rss['base']} to {now} kB")

    def one_decoder(d: Draw) -> None:
        frames, tail = gen.frames(d)
        stream = b"".join(f for _, f in frames) + tail
        if d.int(0, 9) == 0:
            stream = d.binary(300)
        dec = pyshim.FrameDecoder()
        got = []
        for piece in cut(stream, gen.cuts(d, len(stream))):
            got += dec.feed(piece)
            assert len(dec._buf) < HDR.size + MAX
        assert got == reference_frames(stream), (got[:4], reference_frames(stream)[:4])
        sample("decoder")

    def one_dispatch(d: Draw) -> None:
        frames, tail = gen.frames(d)
        points = gen.cuts(d, min(200, sum(len(f) for _, f in frames)))
        h.dispatch(frames, tail, points, stepwise=d.bool())
        sample("dispatch")

    def one_socket(d: Draw) -> None:
        frames, tail = gen.frames(d)
        h.over_socket(frames, tail)
        sample("socket")

    bodies = {"decoder": one_decoder, "dispatch": one_dispatch, "socket": one_socket}
    engine = args.engine or ("hypothesis" if args.inputs <= 2000 else "random")
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    def run_target(name: str) -> None:
        body, budget = bodies[name], budgets[name]
        if engine == "hypothesis":
            @settings(max_examples=budget, deadline=None, database=None, print_blob=True,
                      suppress_health_check=list(HealthCheck))
            @given(data=st.data())
            def fuzz(data) -> None:
                body(Draw(data=data))

            try:
                fuzz()
            except Exception as e:  # noqa: BLE001 - reported; the exit code says it
                traceback.print_exc()
                failures.append((name, repr(e)))
            return
        for i in range(budget):
            try:
                body(Draw(rng=random.Random(f"{seed}/{name}/{i}")))
            except Exception as e:  # noqa: BLE001 - reported; the exit code says it
                traceback.print_exc()
                failures.append((name, f"input {i} of seed {seed}: {e!r}"))
                h.errors.clear()
                if h.service is not None:
                    h.finish_service()
                if len(failures) >= 20:
                    return

    print(f"engine: {engine}" + (f", seed {seed}" if engine == "random" else ""), flush=True)
    t_all = time.monotonic()
    try:
        for name in args.targets.split(","):
            t0 = time.monotonic()
            before = counts[name]
            run_target(name)
            print(f"{name}: {counts[name] - before} inputs in {time.monotonic() - t0:.0f} s",
                  flush=True)
    finally:
        h.close()
        os.close(pyshim.log.fd)
        with open(log_path, errors="replace") as f:
            errors = [ln for ln in f if "level=error" in ln]
        shutil.rmtree(root, ignore_errors=True)
    rss["max"] = max(rss["max"], rss_kb())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB, the true peak
    total = sum(counts.values())
    print(f"inputs: {total} ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"time: {time.monotonic() - t_all:.0f} s; failures: {len(failures)}; "
          f"peak RSS: {peak} kB; RSS start {rss['start']} kB, after the first 10%: "
          f"{rss['base']} kB, max sampled {rss['max']} kB, end {rss_kb()} kB; "
          f"shim log error lines: {len(errors)}")
    print("answers: " + ", ".join(f"{k} {v}" for k, v in sorted(h.stats.items())))
    print(f"events published: {h.publisher.count}; Shutdown accepted: {h.shutdowns}")
    for name, what in failures[:20]:
        print(f"FAILED {name}: {what}")
    for line in errors[:5]:
        print("  log: " + line.rstrip()[:300])
    return 1 if failures or errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""pyshim as a native shim of each containerd line, beside that line's Go shim.

What `start` answers and how the daemon connects (plain address, version 2, on 1.6 and
1.7; JSON BootstrapParams version 3 on 2.x, kept in the bundle's bootstrap.json), which
task services the shim serves, `-info` through containerd's introspection, a restart
with a shim that died, and the upgrade from the host's containerd (/usr/bin/containerd)
to the platform's on the same root/state/address. Every scenario runs for both runtimes
and asserts the line's row of harness.BEHAVIOURS; where pyshim should equal the Go shim,
its normalized outcome must equal the Go shim's of the same test (the RUNC case runs
first by parametrization). docs/containerd2.md is the table these tests prove.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import harness
import pytest
from harness import PYSHIM, RUNC, Containerd, new_id, require_e2e, shim_pids, wait_for

import pyshim

RUNTIMES = [pytest.param(RUNC, id="runc"), pytest.param(PYSHIM, id="pyshim")]
GROUP = "io.containerd.runc.v2.group"
SANDBOX_SERVICE = "containerd.runtime.sandbox.v1.Sandbox"
HOST_CONTAINERD_DIR = "/usr/bin"  # the distribution's containerd: the "before" of an upgrade

_outcomes: dict[tuple[str, str], Any] = {}


def same_as_go_shim(key: str, runtime: str, outcome: Any) -> None:
    """Record the RUNC outcome; pyshim's must equal it (the RUNC case runs first)."""
    _outcomes[(key, runtime)] = outcome
    ref = _outcomes.get((key, RUNC))
    if runtime != RUNC:
        assert ref is not None, f"{key}: the Go shim's case did not run before pyshim's"
        assert outcome == ref, f"{key}: pyshim differs from the Go shim"


def ok(d: Containerd, *args: str) -> str:
    res = d.ctr(*args, timeout=30)
    assert res.returncode == 0, f"ctr {' '.join(args)} -> {res.returncode}: {res.stderr}"
    return res.stdout


def run(d: Containerd, runtime: str, rootfs: str, cid: str, group: str = "") -> None:
    ann = ("--annotation", f"{GROUP}={group}") if group else ()
    ok(d, "run", "-d", "--runtime", runtime, *ann, "--rootfs", rootfs, cid, "/bin/sleep", "1000")
    wait_for(lambda: d.tasks().get(cid) == "RUNNING", 10, message=f"{cid} not RUNNING")


def bundle(d: Containerd, cid: str) -> str:
    return os.path.join(d.state, harness.TASK_PLUGIN_DIR, d.namespace, cid)


def connections(d: Containerd, cid: str) -> list[int | None]:
    """The version of each `connecting to shim CID` line of the daemon's log (2.x and
    1.7 log one at every connection; None for a line without a version)."""
    out = []
    for line in d.log_text().splitlines():
        if f'msg="connecting to shim {cid}"' in line:
            m = re.search(r"\bversion=(\d+)", line)
            out.append(int(m[1]) if m else None)
    return out


def bootstrap(d: Containerd, cid: str) -> dict | None:
    """The bundle's bootstrap.json with its socket path normalized, or None."""
    try:
        with open(os.path.join(bundle(d, cid), "bootstrap.json")) as f:
            params = json.load(f)
    except FileNotFoundError:
        return None
    params["address"] = re.sub(r"/[0-9a-f]{64}$", "/SOCKET", params["address"])
    return params


def shim_address(d: Containerd, cid: str) -> str:
    """The socket path containerd connects to for cid: bootstrap.json, else `address`."""
    path = os.path.join(bundle(d, cid), "bootstrap.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["address"]
    with open(os.path.join(bundle(d, cid), "address")) as f:
        return f.read().strip()


def call(address: str, service: str, method: str, payload: bytes = b"") -> int:
    """One ttrpc call on a shim's socket: its status code (0 = answered)."""
    async def go() -> int:
        client = await pyshim.TtrpcClient.connect(address.removeprefix("unix://"))
        try:
            await client.call(service, method, payload, {pyshim.NAMESPACE_KEY: harness.NAMESPACE},
                              timeout=10)
            return 0
        except pyshim.RemoteError as e:
            return e.code
        finally:
            client.close()

    return asyncio.run(go())


def remove_all(d: Containerd, *cids: str) -> None:
    for cid in cids:
        d.ctr("task", "kill", "-s", "KILL", cid, timeout=30)
    for cid in cids:
        wait_for(lambda c=cid: d.tasks().get(c) in ("STOPPED", None), 10)
        d.ctr("task", "rm", cid, timeout=30)
        d.ctr("container", "rm", cid, timeout=30)
    wait_for(lambda: not shim_pids(d), 10, message="shims left after delete")


@pytest.fixture
def fresh_no_template(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """A daemon whose pyshim starts every shim cold (PYSHIM_TEMPLATE=0)."""
    require_e2e()
    d = Containerd()
    d.env[pyshim.TEMPLATE_ENV] = "0"
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


# ---------------------------------------------------------------------------- bootstrap


def _bootstrap_scenario(d: Containerd, runtime: str, rootfs: str) -> dict:
    b = harness.behaviour()
    alone, first, second = new_id("alone"), new_id("g1"), new_id("g2")
    group = new_id("grp")
    run(d, runtime, rootfs, alone)
    run(d, runtime, rootfs, first, group)
    run(d, runtime, rootfs, second, group)  # `start` finds the group's socket in use
    roles = {"alone": alone, "first": first, "second": second}
    seen = {role: connections(d, cid) for role, cid in roles.items()}
    expected = [] if b.shim_version is None else [b.shim_version]
    assert seen == dict.fromkeys(roles, expected)
    params = {role: bootstrap(d, cid) for role, cid in roles.items()}
    want = ({"version": b.shim_version, "address": "unix:///run/containerd/s/SOCKET",
             "protocol": "ttrpc"} if b.writes_bootstrap_json else None)
    assert params == dict.fromkeys(roles, want)
    assert shim_address(d, first) == shim_address(d, second) != shim_address(d, alone)
    assert len(shim_pids(d, runtime)) == 2
    out = {"connections": seen, "bootstrap": params}
    # The shim answers the task API of the version it announced.
    addr = shim_address(d, alone)
    codes = {s: call(addr, s, "Connect", pyshim_connect(alone)) for s in pyshim.TASK_SERVICES}
    served = {s for s, code in codes.items() if code == 0}
    assert set(b.go_shim_task_services) <= served
    if runtime == PYSHIM:
        assert served == set(pyshim.TASK_SERVICES)
    else:
        assert served == set(b.go_shim_task_services)
    # 1.7's Go shim serves a no-op "pause" Sandbox service (its plugin
    # io.containerd.ttrpc.v1.pause), 2.1's dropped it; pyshim serves none: see
    # docs/containerd2.md for who would call it.
    sandbox = call(addr, SANDBOX_SERVICE, "PingSandbox")
    assert sandbox == (0 if runtime == RUNC and b.go_shim_serves_sandbox else pyshim.UNIMPLEMENTED)
    out["connected"] = codes[pyshim.TASK_SERVICE_V3 if b.shim_version == 3 else pyshim.TASK_SERVICE]
    remove_all(d, alone, first, second)
    return out


def pyshim_connect(cid: str) -> bytes:
    import pyshim_pb2 as pb

    return pb.ConnectRequest(id=cid).SerializeToString()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_start_answers_the_lines_version(fresh_containerd: Containerd, rootfs: str,
                                         runtime: str) -> None:
    """containerd 2.x connects with version=3 to both shims (pyshim told 2.x from the
    daemon's binary), 1.6/1.7 take both shims' plain address as version 2; a grouped
    container's `start` (socket in use) answers the same form."""
    out = _bootstrap_scenario(fresh_containerd, runtime, rootfs)
    same_as_go_shim("bootstrap", runtime, out)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_start_answers_the_same_without_the_template(fresh_no_template: Containerd, rootfs: str,
                                                     runtime: str) -> None:
    """The cold path of `start` (no warm template) gives the same answer."""
    out = _bootstrap_scenario(fresh_no_template, runtime, rootfs)
    same_as_go_shim("bootstrap-cold", runtime, out)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_no_deprecation_names_the_shim(fresh_containerd: Containerd, rootfs: str,
                                       runtime: str) -> None:
    """After a shim's whole life on this daemon (run, exec, pause/resume, a grouped pair,
    a daemon restart that reconnects, kill and delete), the daemon lists no deprecation
    (`ctr deprecations list`, 1.7+) and logs none: nothing pyshim answers or serves is a
    form the line has deprecated. The same holds for the line's own Go shim."""
    d, b = fresh_containerd, harness.behaviour()
    alone, first, second = new_id("dep"), new_id("dg1"), new_id("dg2")
    group = new_id("grp")
    run(d, runtime, rootfs, alone)
    run(d, runtime, rootfs, first, group)
    run(d, runtime, rootfs, second, group)
    ran = d.ctr("task", "exec", "--exec-id", "e1", alone, "/bin/sh", "-c", "echo hi", timeout=30)
    assert (ran.returncode, ran.stdout) == (0, "hi\n"), ran.stderr
    ok(d, "task", "pause", alone)
    ok(d, "task", "resume", alone)
    d.stop()
    d.start()
    wait_for(lambda: d.tasks().get(alone) == "RUNNING", 20, message="not reconnected")
    ok(d, "task", "exec", "--exec-id", "e2", first, "/bin/true")
    remove_all(d, alone, first, second)
    listed = d.ctr("deprecations", "list", timeout=30)
    assert (listed.returncode == 0) == b.deprecations_service, listed.stderr
    # A warning or error that speaks of a deprecation (the info lines loading the
    # deprecation plugin and the CRI config's ignoreDeprecationWarnings are not ones).
    logged = [line for line in d.log_text().splitlines()
              if re.search(r"level=(warning|error)", line) and re.search(r"(?i)deprecat", line)]
    out = {"listed": listed.stdout.strip() if listed.returncode == 0 else None,
           "logged": logged}
    assert out == {"listed": "" if b.deprecations_service else None, "logged": []}, out
    same_as_go_shim("deprecations", runtime, out)


def test_bootstrap_answer_follows_the_daemon_binary() -> None:
    """`start`'s answer for each containerd binary this machine has: JSON version 3
    for a 2.x, the plain address for 1.x and for anything that is not containerd."""
    addr = "unix:///run/containerd/s/" + "a" * 64
    assert pyshim.bootstrap_answer(addr, "/nonexistent") == addr
    assert pyshim.bootstrap_answer(addr, "/bin/sh") == addr
    major = harness.containerd_version()[0]
    assert pyshim.containerd_major(harness.CONTAINERD) == major
    answer = pyshim.bootstrap_answer(addr, harness.CONTAINERD)
    if major >= 2:
        assert json.loads(answer) == {"version": 3, "address": addr, "protocol": "ttrpc"}
        assert answer == f'{{"version":3,"address":"{addr}","protocol":"ttrpc"}}'
    else:
        assert answer == addr


# ---------------------------------------------------------------------------- -info


def _info(binary: str, options: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([binary, "-info"], input=options, capture_output=True, timeout=30,
                          cwd="/", check=False)


def _runc_options(**fields: object) -> bytes:
    from google.protobuf import any_pb2

    import pyshim_pb2 as pb

    value = pb.RuncOptions(**fields).SerializeToString()
    return any_pb2.Any(type_url=pyshim.URL_RUNC_OPTIONS, value=value).SerializeToString()


def _decode_info(raw: bytes) -> dict:
    info: dict[str, Any] = {}
    for number, value in harness.pb_fields(raw):
        if number == 1:
            info["name"] = value.decode()
        elif number == 2:
            info["version"] = {n: v.decode() for n, v in harness.pb_fields(value)}
        elif number in (3, 4):
            fields = dict(harness.pb_fields(value))
            info["options" if number == 3 else "features"] = (fields.get(1, b"").decode(),
                                                              fields.get(2, b""))
    return info


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_info_flag(runtime: str) -> None:
    """`-info` with runc options on stdin: the Go shim 2.x answers a RuntimeInfo (its
    name, version, the options as containerd.runc.v1.Options, `runc features` as
    features); 1.6/1.7's Go shim has no such flag. pyshim answers on every line."""
    b = harness.behaviour()
    binary = harness.GO_SHIM if runtime == RUNC else harness.shim_binary_path(PYSHIM)
    opts = _runc_options(binary_name=harness.RUNC_BINARY, root="/run/pyshim-info-test")
    res = _info(binary, opts)
    if runtime == RUNC and not b.go_shim_info:
        assert res.returncode == 2
        assert b"flag provided but not defined: -info" in res.stderr
        return
    assert res.returncode == 0, res.stderr
    info = _decode_info(res.stdout)
    assert info["name"] == runtime
    assert info["version"][1]
    assert info["options"][0] == pyshim.URL_RUNC_OPTIONS
    assert dict(harness.pb_fields(info["options"][1])) == {  # binary_name = 6, root = 7
        6: harness.RUNC_BINARY.encode(), 7: b"/run/pyshim-info-test"}
    runc_features = subprocess.run([harness.RUNC_BINARY, "features"], capture_output=True,
                                   timeout=30, check=True).stdout
    assert info["features"][0] == pyshim.URL_RUNTIME_FEATURES
    assert json.loads(info["features"][1]) == json.loads(runc_features)
    # No options at all: none are echoed.
    bare = _decode_info(_info(binary).stdout)
    assert "options" not in bare and bare["features"] == info["features"]
    if b.go_shim_info:  # else pyshim answers where the line's Go shim cannot
        same_as_go_shim("info", runtime, {"options": info["options"], "features": info["features"],
                                          "bare": sorted(bare)})
    # A bad options Any is refused, with a message, by both.
    bad = _info(binary, b"\x0a\x1acontainerd.runc.v1.Options\x12\x03\xff\xff\xff")
    assert bad.returncode == 1 and bad.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_inspect_runtime(containerd: Containerd, runtime: str) -> None:
    """containerd's own path to `-info`: the introspection service's PluginInfo, which
    `ctr plugins inspect-runtime` calls (2.x only: 1.6/1.7's ctr has no such command)."""
    b = harness.behaviour()
    res = containerd.ctr("plugins", "inspect-runtime", "--runtime", runtime, timeout=30)
    if not b.inspects_runtime:
        assert res.returncode != 0
        return
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["Name"] == runtime
    assert info["Version"]["Version"]
    assert info["Features"]["ociVersionMax"]
    same_as_go_shim("inspect-runtime", runtime, info["Features"])


# ---------------------------------------------------------------------------- restart


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_restart_keeps_live_shims_and_cleans_up_a_dead_one(fresh_containerd: Containerd,
                                                           rootfs: str, runtime: str) -> None:
    """Stop the daemon, SIGKILL one grouped shim, start it again: the live shim's task
    is reconnected (same version as before) and stays manageable; the dead group's
    tasks get `shim delete` and vanish, for both shims alike."""
    d, b = fresh_containerd, harness.behaviour()
    live, dead1, dead2 = new_id("live"), new_id("dead"), new_id("dead")
    group = new_id("grp")
    run(d, runtime, rootfs, live)
    run(d, runtime, rootfs, dead1, group)
    run(d, runtime, rootfs, dead2, group)
    doomed = harness.live_shim(d, runtime, dead1)
    before = {cid: connections(d, cid) for cid in (live, dead1)}
    d.stop()
    os.kill(doomed, signal.SIGKILL)
    wait_for(lambda: doomed not in shim_pids(d), 10)
    d.start()
    wait_for(lambda: dead1 not in d.tasks() and dead2 not in d.tasks(), 20,
             message="the dead shim's tasks were not cleaned up")
    tasks = d.tasks()
    assert tasks.get(live) == "RUNNING"
    again = connections(d, live)[len(before[live]):]
    assert again == ([] if b.shim_version is None else [b.shim_version])
    exec_out = d.ctr("task", "exec", "--exec-id", "after", live, "/bin/sh", "-c", "echo hi; exit 3")
    assert (exec_out.returncode, exec_out.stdout) == (3, "hi\n")
    assert not os.path.exists(bundle(d, dead1)) and not os.path.exists(bundle(d, dead2))
    for cid in (dead1, dead2):
        d.ctr("container", "rm", cid, timeout=30)
    remove_all(d, live)
    same_as_go_shim("restart-dead", runtime, {"again": again, "tasks": sorted(tasks.values())})


# ---------------------------------------------------------------------------- upgrade


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_upgrade_from_the_host_containerd(rootfs: str, runtime: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A task started under the host's containerd (/usr/bin: 1.6 on Debian 12) keeps
    running and stays manageable after that daemon stops and the platform's containerd
    starts on the same root, state and address. On containerd2 that is the 1.6 -> 2.1
    upgrade: the bundle has only `address` and 2.x migrates it as version 2 (the old
    shim still runs the old code). Elsewhere old and new are the same daemon."""
    require_e2e()
    old_bin = os.path.join(HOST_CONTAINERD_DIR, "containerd")
    new_version = harness.containerd_version()
    d = Containerd()
    try:
        with monkeypatch.context() as m:
            m.setattr(harness, "CONTAINERD", old_bin)
            m.setattr(harness, "CTR", os.path.join(HOST_CONTAINERD_DIR, "ctr"))
            new_path = d.env["PATH"]
            d.env["PATH"] = os.pathsep.join(p for p in new_path.split(os.pathsep)
                                            if p != harness.CONTAINERD_DIR)
            d.start()
            cid = new_id("upg")
            run(d, runtime, rootfs, cid)
            shim = harness.live_shim(d, runtime, cid)
            files = sorted(f for f in os.listdir(bundle(d, cid)) if f in ("address", "bootstrap.json"))
            d.stop()
            d.env["PATH"] = new_path
        d.start()
        assert d.tasks().get(cid) == "RUNNING"
        assert harness.live_shim(d, runtime, cid) == shim, "the old shim serves on"
        b = harness.behaviour(new_version)
        seen = connections(d, cid)
        # The new daemon reconnects once; a bundle made by 1.x has only `address`,
        # which 2.x takes (and keeps in bootstrap.json) as version 2.
        if b.shim_version is None:
            assert seen == []
        else:
            old_major = harness.containerd_version(old_bin)[0]
            assert seen[-1:] == [2 if old_major < 2 else b.shim_version]
        after = bootstrap(d, cid)
        assert after == (None if not b.writes_bootstrap_json else
                         {"version": seen[-1], "address": "unix:///run/containerd/s/SOCKET",
                          "protocol": "ttrpc"})
        res = d.ctr("task", "exec", "--exec-id", "up", cid, "/bin/sh", "-c", "echo up; exit 4")
        assert (res.returncode, res.stdout) == (4, "up\n")
        remove_all(d, cid)
        same_as_go_shim("upgrade", runtime, {"files": files, "seen": seen[-1:], "bootstrap": after})
    finally:
        d.cleanup()


# ---------------------------------------------------------------------------- the wire


def _descriptor_end(data: bytes, start: int) -> int:
    """End of the serialized FileDescriptorProto at `start`: its top-level fields are
    numbers 1-14 of wire type 0 or 2, and the next file begins with another field 1."""
    i, names = start, 0
    while i < len(data):
        try:
            key, j = harness.varint_at(data, i)
            if key >> 3 not in range(1, 15) or key & 7 not in (0, 2):
                break
            if key >> 3 == 1:
                names += 1
                if names > 1:
                    break
            n, j = harness.varint_at(data, j)
            j += n if key & 7 == 2 else 0
        except IndexError:
            break
        if j > len(data):
            break
        i = j
    return i


def embedded_descriptor(binary: str, name: str):
    """The FileDescriptorProto of `name` compiled into a Go binary: raw bytes in a
    google.golang.org/protobuf build (containerd 1.7, 2.x), gzipped in a gogo one (1.6).
    None when the binary holds no such file."""
    import zlib

    from google.protobuf import descriptor_pb2

    with open(binary, "rb") as f:
        data = f.read()
    tag = b"\x0a" + bytes([len(name)]) + name.encode()
    at = data.find(tag)
    while at >= 0:
        fd = descriptor_pb2.FileDescriptorProto()
        try:
            fd.ParseFromString(data[at:_descriptor_end(data, at)])
            if fd.name == name and fd.message_type:
                return fd
        except Exception:  # noqa: BLE001, S110 - not a descriptor after all
            pass
        at = data.find(tag, at + 1)
    at = data.find(b"\x1f\x8b\x08\x00\x00\x00\x00\x00")
    while at >= 0:
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[at:at + (1 << 20)])
        except zlib.error:
            raw = b""
        if raw.startswith(tag):
            fd = descriptor_pb2.FileDescriptorProto()
            fd.ParseFromString(raw)
            return fd
        at = data.find(b"\x1f\x8b\x08\x00\x00\x00\x00\x00", at + 1)
    return None


TASK_PROTOS = {  # ttrpc service name -> the proto file containerd's lines build it from
    pyshim.TASK_SERVICE: ("github.com/containerd/containerd/api/runtime/task/v2/shim.proto",
                          "github.com/containerd/containerd/runtime/v2/task/shim.proto"),
    pyshim.TASK_SERVICE_V3: ("github.com/containerd/containerd/api/runtime/task/v3/shim.proto",),
}


def _fields(msg) -> list[tuple[int, str, int, int]]:
    return sorted((f.number, f.name, f.type, f.label) for f in msg.field)


def test_task_messages_match_the_daemons_protos() -> None:
    """Every request and response of each task service the platform's containerd was
    built with (read from its binary) has pyshim.proto's field numbers, names, types
    and labels: the v2 and v3 messages are one table, so pyshim serves both with the
    same handlers. 1.6 knows only v2; 1.7 has v3's messages but no v3 shim client."""
    import pyshim_pb2 as pb

    found = {}
    for service, names in TASK_PROTOS.items():
        fd = next((d for n in names if (d := embedded_descriptor(harness.CONTAINERD, n))), None)
        if fd is None:
            continue
        found[service] = fd
        (svc,) = [s for s in fd.service if s.name == "Task"]
        assert f"{fd.package}.Task" == service
        msgs = {m.name: m for m in fd.message_type}
        ours = pb.DESCRIPTOR.services_by_name["Task"]
        assert sorted(m.name for m in svc.method) == sorted(m.name for m in ours.methods)
        for method in svc.method:
            mine = ours.methods_by_name[method.name]
            for theirs_type, my_type in ((method.input_type, mine.input_type),
                                         (method.output_type, mine.output_type)):
                short = theirs_type.rsplit(".", 1)[-1]
                assert short == my_type.name, (method.name, theirs_type, my_type.full_name)
                if theirs_type.startswith(".google.protobuf."):
                    continue
                from google.protobuf import descriptor_pb2

                proto = descriptor_pb2.DescriptorProto()
                my_type.CopyToProto(proto)
                assert _fields(msgs[short]) == _fields(proto), (service, short)
    # 1.7's api module already has the v3 messages (wire-equal too); 1.6 has none.
    assert pyshim.TASK_SERVICE in found
    assert (pyshim.TASK_SERVICE_V3 in found) == (harness.containerd_version()[:2] >= (1, 7))


# ---------------------------------------------------------------------------- a shim that dies


def _task_events(lines: list[str], cids: set[str]) -> list[tuple[str, str, int, int]]:
    """(topic, container, pid, exit status) of the /tasks/ events of `cids` among
    `ctr events` lines, whichever way the line prints the event (1.6 and 2.x differ
    before the JSON payload)."""
    out = []
    for line in lines:
        m = re.search(r"(/tasks/[a-z-]+)\s+(\{.*\})\s*$", line)
        if not m:
            continue
        payload = json.loads(m[2])
        if payload.get("container_id") in cids:
            out.append((m[1], payload["container_id"], payload.get("pid", 0),
                        payload.get("exit_status", 0)))
    return out


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_shim_killed_under_a_running_daemon(fresh_containerd: Containerd, rootfs: str,
                                            runtime: str) -> None:
    """SIGKILL a grouped shim while containerd runs: containerd runs `shim delete` for
    each of its tasks and publishes TaskExit (137, the init's pid) then TaskDelete, and
    the tasks are gone; the same for both shims on every line."""
    import threading

    d = fresh_containerd
    group = new_id("grp")
    cids = [new_id("k1"), new_id("k2")]
    for cid in cids:
        run(d, runtime, rootfs, cid, group)
    pids = {cid: int(d.ctr("task", "ls").stdout.split(cid, 1)[1].split()[0]) for cid in cids}
    lines: list[str] = []
    proc = subprocess.Popen([harness.CTR, "--address", d.address, "-n", d.namespace, "events"],
                            env=d.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        # Subscribed once an event of our own shows up.
        def subscribed() -> bool:
            ok(d, "namespaces", "label", d.namespace, f"pyshim-c2={new_id('sub')}")
            return any("/namespaces/update" in line for line in list(lines))

        wait_for(subscribed, 10, 0.2, message=f"ctr events never subscribed: {lines}")
        os.kill(harness.live_shim(d, runtime, cids[0]), signal.SIGKILL)

        def both_deleted() -> list:
            ev = _task_events(list(lines), set(cids))
            return ev if sum(t == "/tasks/delete" for t, *_ in ev) == 2 else []

        events = wait_for(both_deleted, 20, 0.1, message=f"no TaskExit/TaskDelete: {lines}")
    finally:
        proc.kill()
        proc.wait()
        reader.join(5)
    for cid in cids:
        mine = [(t, pid, status) for t, c, pid, status in events if c == cid]
        assert mine == [("/tasks/exit", pids[cid], 137), ("/tasks/delete", pids[cid], 137)]
    wait_for(lambda: not set(cids) & set(d.tasks()), 10, message="tasks left after shim delete")
    for cid in cids:
        d.ctr("container", "rm", cid, timeout=30)
    wait_for(lambda: not shim_pids(d), 10)
    # Per container: containerd cleans the group's tasks up in either interleaving.
    same_as_go_shim("shim-killed", runtime,
                    [[(t, status) for t, c, _, status in events if c == cid] for cid in cids])

"""The shim driven directly, as containerd would drive it, but without containerd.

`containerd-shim-pyshim-v1 ... start` is run in a bundle made here (config.json from
`runc spec`), and the long-lived shim it launches is called over ttrpc with pyshim's own
client. This reaches what ctr cannot ask for: a bundle without config.json, a runc that
does not exist, the publish-binary fallback when TTRPC_ADDRESS is unset, socket and file
modes, grouping. Needs root and runc (real containers run), not containerd.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator

import harness
import pytest
import uvloop
from google.protobuf import any_pb2
from harness import require
from harness.direct import META, NS, TASK, Direct, call, remote_error

import pyshim
import pyshim_pb2 as pb


@pytest.fixture
def direct(rootfs: str) -> Iterator[Direct]:
    require(os.geteuid() == 0, "the shim needs root")
    require(os.access(harness.RUNC_BINARY, os.X_OK), "runc is not installed")
    require(shutil.which("containerd-shim-pyshim-v1", path=harness.shim_search_path()),
            "pyshim is not installed (pip install .)")
    d = Direct(rootfs)
    try:
        yield d
    finally:
        d.cleanup()


# ------------------------------------------------------------------------------ tests


def test_start_socket_address_modes_and_title(direct: Direct) -> None:
    cid = harness.new_id("d")
    bundle = direct.bundle(cid, ["/bin/true"])
    address = direct.start(bundle, cid)
    digest = hashlib.sha256(f"{direct.address}/{NS}/{cid}".encode()).hexdigest()
    assert address == f"unix:///run/containerd/s/{digest}"
    path = address[len("unix://"):]
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(bundle, "address")).st_mode) == 0o644
    conn = call(address, "Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse)
    argv = harness.cmdline(conn.shim_pid)
    assert any("pyshim" in a for a in argv), argv
    assert argv[argv.index("-id") + 1] == cid and argv[argv.index("-namespace") + 1] == NS
    # No task: Shutdown ends the shim and removes its socket.
    call(address, "Shutdown", pb.ShutdownRequest(id=cid))
    harness.wait_for(lambda: not os.path.exists(path), 10, 0.02)


def test_grouped_containers_share_one_shim(direct: Direct) -> None:
    group = harness.new_id("g")
    a, b, c = harness.new_id("a"), harness.new_id("b"), harness.new_id("c")
    ann = {"io.containerd.runc.v2.group": group}
    addr_a = direct.start(direct.bundle(a, ["/bin/true"], ann), a)
    addr_b = direct.start(direct.bundle(b, ["/bin/true"], ann), b)
    addr_c = direct.start(direct.bundle(c, ["/bin/true"],
                                        {"io.kubernetes.cri.sandbox-id": group + "x"}), c)
    assert addr_a == addr_b
    assert addr_c != addr_a
    digest = hashlib.sha256(f"{direct.address}/{NS}/{group}".encode()).hexdigest()
    assert addr_a.endswith(digest)
    pa = call(addr_a, "Connect", pb.ConnectRequest(id=a), pb.ConnectResponse).shim_pid
    pb_ = call(addr_b, "Connect", pb.ConnectRequest(id=b), pb.ConnectResponse).shim_pid
    assert pa == pb_
    for addr, cid in ((addr_a, a), (addr_c, c)):
        call(addr, "Shutdown", pb.ShutdownRequest(id=cid))


def test_bad_inputs_get_clear_errors_and_leave_nothing(direct: Direct) -> None:
    cid = harness.new_id("bad")
    bundle = direct.bundle(cid, ["/bin/true"])
    address = direct.start(bundle, cid)
    runc_state = os.path.join(pyshim.RUNC_ROOT, NS, cid)

    nocfg = direct.bundle(harness.new_id("nocfg"), ["/bin/true"], config=False)
    e = remote_error(address, "Create", pb.CreateTaskRequest(id=cid, bundle=nocfg))
    assert e.code == pyshim.INVALID_ARGUMENT and "config.json" in str(e)

    e = remote_error(address, "Create", pb.CreateTaskRequest(id=cid, bundle="/nonexistent/bundle"))
    assert e.code == pyshim.INVALID_ARGUMENT and "config.json" in str(e)

    opts = any_pb2.Any(type_url=pyshim.URL_RUNC_OPTIONS,
                       value=pb.RuncOptions(binary_name="/nonexistent/runc").SerializeToString())
    e = remote_error(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle, options=opts))
    assert e.code == pyshim.FAILED_PRECONDITION and "runc" in str(e) and "not found" in str(e)

    odd = any_pb2.Any(type_url="example.com/Unknown", value=b"")
    e = remote_error(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle, options=odd))
    assert e.code == pyshim.INVALID_ARGUMENT and "example.com/Unknown" in str(e)

    e = remote_error(address, "Create", pb.CreateTaskRequest(id="../escape", bundle=bundle))
    assert e.code == pyshim.INVALID_ARGUMENT

    # runc itself fails (a rootfs that does not exist): its own words reach the caller.
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["root"]["path"] = "/nonexistent/rootfs"
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    e = remote_error(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle))
    assert e.code == pyshim.UNKNOWN
    assert str(e).startswith("OCI runtime create failed: ") and "rootfs" in str(e)

    assert not os.path.exists(runc_state)
    assert harness.mounts_under(direct.dir) == []
    e = remote_error(address, "State", pb.StateRequest(id=cid))
    assert e.code == pyshim.NOT_FOUND
    # The shim still serves, and leaves when asked.
    call(address, "Shutdown", pb.ShutdownRequest(id=cid))
    harness.wait_for(lambda: not os.path.exists(address[len("unix://"):]), 10, 0.02)


def test_lifecycle_with_publish_binary_fallback(direct: Direct) -> None:
    cid = harness.new_id("life")
    bundle = direct.bundle(cid, ["/bin/sh", "-c", "sleep 0.2; exit 7"])
    address = direct.start(bundle, cid)
    created = call(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle),
                   pb.CreateTaskResponse)
    assert created.pid > 0
    st = call(address, "State", pb.StateRequest(id=cid), pb.StateResponse)
    assert st.status == pb.TASK_STATUS_CREATED and st.pid == created.pid

    async def start_and_wait() -> tuple:
        c = await pyshim.TtrpcClient.connect(address)
        try:
            wait = asyncio.ensure_future(
                c.call(TASK, "Wait", pb.WaitRequest(id=cid).SerializeToString(), META))
            await c.call(TASK, "Start", pb.StartRequest(id=cid).SerializeToString(), META)
            again = None
            try:
                await c.call(TASK, "Start", pb.StartRequest(id=cid).SerializeToString(), META)
            except pyshim.RemoteError as e:
                again = e
            w = pb.WaitResponse()
            w.ParseFromString(await wait)
            return w, again
        finally:
            c.close()

    waited, again = uvloop.run(start_and_wait())
    assert waited.exit_status == 7
    # The Go shim's refusal: code Unknown, "cannot start a running/stopped process".
    assert again is not None and again.code == pyshim.UNKNOWN and "cannot start a" in str(again), again
    st = call(address, "State", pb.StateRequest(id=cid), pb.StateResponse)
    assert st.status == pb.TASK_STATUS_STOPPED and st.exit_status == 7
    deleted = call(address, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
    assert deleted.exit_status == 7 and deleted.pid == created.pid
    assert not os.path.exists(os.path.join(pyshim.RUNC_ROOT, NS, cid))
    call(address, "Shutdown", pb.ShutdownRequest(id=cid))
    harness.wait_for(lambda: not os.path.exists(address[len("unix://"):]), 10, 0.02)

    # Every event went through `BIN --address A publish --topic T --namespace NS`, in order.
    def four_events():
        events = direct.published()
        return events if len(events) >= 4 else None

    events = harness.wait_for(four_events, 10, 0.05)
    topics = [argv[argv.index("--topic") + 1] for argv, _ in events]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    for argv, _ in events:
        assert argv[argv.index("--address") + 1] == direct.address
        assert argv[argv.index("--namespace") + 1] == NS
        assert "publish" in argv
    urls = [a.type_url for _, a in events]
    assert urls == ["containerd.events.TaskCreate", "containerd.events.TaskStart",
                    "containerd.events.TaskExit", "containerd.events.TaskDelete"]
    exit_ev = pb.TaskExit()
    exit_ev.ParseFromString(events[2][1].value)
    assert exit_ev.container_id == cid and exit_ev.exit_status == 7 and exit_ev.pid == created.pid


def test_binary_name_and_root_are_honoured_also_by_delete(direct: Direct) -> None:
    """runc is the BinaryName given in the runtime options, run with --root <Root>/<ns>;
    and after the shim is SIGKILLed, `shim delete` uses the same runc and root to clean
    up, reporting the task as killed (137)."""
    cid = harness.new_id("bin")
    bundle = direct.bundle(cid, ["/bin/sleep", "1000"])
    wrapper, calls = direct.recording_runc("my-runc")
    root = os.path.join(direct.dir, "runc-root")
    opts = any_pb2.Any(type_url=pyshim.URL_RUNC_OPTIONS,
                       value=pb.RuncOptions(binary_name=wrapper, root=root).SerializeToString())
    address = direct.start(bundle, cid)
    created = call(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle, options=opts),
                   pb.CreateTaskResponse)
    call(address, "Start", pb.StartRequest(id=cid))
    assert os.path.isdir(os.path.join(root, NS, cid))
    with open(calls) as f:
        lines = f.read().splitlines()
    assert any(f"--root {root}/{NS} " in ln and " create " in ln for ln in lines), lines
    assert any(" start " in ln for ln in lines), lines

    shim = call(address, "Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).shim_pid
    os.kill(shim, 9)
    harness.wait_for(lambda: not harness.cmdline(shim), 10, 0.02)
    out = subprocess.run([harness.shim_binary_path(), "-namespace", NS, "-id", cid,
                          "-address", direct.address, "-bundle", bundle, "delete"],
                         cwd=bundle, env=direct.env, capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    resp = pb.DeleteResponse()
    resp.ParseFromString(out.stdout)
    assert resp.exit_status == 137 and resp.pid == created.pid
    assert resp.exited_at.seconds > 0
    with open(calls) as f:
        assert any(f"--root {root}/{NS} " in ln and "delete --force" in ln for ln in f), "no delete"
    assert not os.path.isdir(os.path.join(root, NS, cid))
    harness.wait_for(lambda: not harness.cmdline(created.pid), 10, 0.02)


def test_shim_cgroup_from_the_start_options(direct: Direct) -> None:
    """ShimCgroup (runtime options on start's stdin): the shim joins that cgroup in
    every hierarchy that has it; one that does not exist fails start, and no shim is
    left running."""
    group = f"pyshim-shimcg-{os.getpid()}"
    made = []
    for hier in harness.cgroup_hierarchies():
        if os.path.basename(hier) in ("memory", "pids"):
            os.mkdir(os.path.join(hier, group))
            made.append(os.path.join(hier, group))
    require(made, "no memory/pids cgroup v1 hierarchy here")
    try:
        cid = harness.new_id("cg")
        bundle = direct.bundle(cid, ["/bin/true"])
        opts = any_pb2.Any(type_url=pyshim.URL_RUNC_OPTIONS,
                           value=pb.RuncOptions(shim_cgroup="/" + group).SerializeToString())
        address = direct.start(bundle, cid, opts.SerializeToString())
        shim = call(address, "Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).shim_pid
        with open(f"/proc/{shim}/cgroup") as f:
            lines = f.read().splitlines()
        joined = [ln for ln in lines if ln.endswith(":/" + group)]
        assert any(":memory:" in ln for ln in joined) and any(":pids:" in ln for ln in joined), lines
        call(address, "Shutdown", pb.ShutdownRequest(id=cid))
        harness.wait_for(lambda: not harness.cmdline(shim), 10, 0.02)

        # The linux.runc CreateOptions carry it too (field 9); a missing cgroup fails start.
        bad = harness.new_id("cg")
        bad_bundle = direct.bundle(bad, ["/bin/true"])
        lin = any_pb2.Any(type_url=pyshim.URL_LINUX_CREATE_OPTIONS,
                          value=pb.LinuxCreateOptions(shim_cgroup="/no-such-cgroup-x").SerializeToString())
        direct.start(bad_bundle, bad, lin.SerializeToString(), expect=1)
        assert "no-such-cgroup-x" in direct.log() and "does not exist" in direct.log()
        assert not os.path.exists(pyshim.socket_path(direct.address, NS, bad))
        assert not [p for p in harness.shim_pids(direct.address) if bad in harness.cmdline(p)]
    finally:
        for d in made:
            harness.wait_for(lambda d=d: _rmdir(d), 10, 0.05)


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def test_settings_file_named_by_cri_options(direct: Direct) -> None:
    """CRI runtime options (runtimeoptions.v1.Options) name pyshim's settings file:
    `start` reads it and passes it on (-settings; template = false spawns cold), Create
    drives the file's runc with its runc_root, and `shim delete` after a SIGKILL does
    too. A file with an unknown key fails `start` with file and key named, no socket
    and no shim left."""
    wrapper, calls = direct.recording_runc("settings-runc")
    root = os.path.join(direct.dir, "settings-root")
    settings = os.path.join(direct.dir, "pyshim.toml")
    with open(settings, "w") as f:
        f.write(f'runc_binary = "{wrapper}"\nrunc_root = "{root}"\ntemplate = false\n'
                "memory_release_interval = 0\n")

    def cri_options(path: str) -> any_pb2.Any:
        return any_pb2.Any(type_url="runtimeoptions.v1.Options",
                           value=pb.CriRuntimeOptions(type_url="io.containerd.pyshim.v1",
                                                      config_path=path).SerializeToString())

    cid = harness.new_id("set")
    bundle = direct.bundle(cid, ["/bin/sleep", "1000"])
    opts = cri_options(settings)
    address = direct.start(bundle, cid, opts.SerializeToString())
    shim = call(address, "Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).shim_pid
    argv = harness.cmdline(shim)
    passed = json.loads(argv[argv.index("-settings") + 1])
    assert passed == {"path": settings, "runc_binary": wrapper, "runc_root": root,
                      "template": False, "memory_release_interval": 0.0}
    with open(f"/proc/{shim}/stat") as f:
        parent = harness.cmdline(int(f.read().rsplit(")", 1)[1].split()[1]))
    assert not harness.is_template_argv(parent), parent  # spawned cold
    created = call(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle, options=opts),
                   pb.CreateTaskResponse)
    call(address, "Start", pb.StartRequest(id=cid))
    assert os.path.isdir(os.path.join(root, NS, cid))
    with open(calls) as f:
        assert any(f"--root {root}/{NS} " in ln and " create " in ln for ln in f)

    os.kill(shim, 9)
    harness.wait_for(lambda: not harness.cmdline(shim), 10, 0.02)
    out = subprocess.run([harness.shim_binary_path(), "-namespace", NS, "-id", cid,
                          "-address", direct.address, "-bundle", bundle, "delete"],
                         cwd=bundle, env=direct.env, capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    with open(calls) as f:
        assert any(f"--root {root}/{NS} " in ln and "delete --force" in ln for ln in f)
    assert not os.path.isdir(os.path.join(root, NS, cid))
    harness.wait_for(lambda: not harness.cmdline(created.pid), 10, 0.02)

    bad_file = os.path.join(direct.dir, "bad.toml")
    with open(bad_file, "w") as f:
        f.write("runc_root = 7\n")
    bad = harness.new_id("set")
    direct.start(direct.bundle(bad, ["/bin/true"]), bad, cri_options(bad_file).SerializeToString(),
                 expect=1)
    assert f"pyshim settings {bad_file}: key 'runc_root' must be a string" in direct.log()
    assert not os.path.exists(pyshim.socket_path(direct.address, NS, bad))
    assert not [p for p in harness.shim_pids(direct.address) if bad in harness.cmdline(p)]


def test_create_makes_a_missing_rootfs_dir(direct: Direct) -> None:
    """A bundle without `rootfs/` and a Create with rootfs mounts: the shim makes the
    dir 0711 and mounts on it, as the Go shim's NewContainer does (containerd always
    makes the dir, so only a direct client can tell)."""
    cid = harness.new_id("nordir")
    bundle = direct.bundle(cid, ["/bin/true"])
    os.rmdir(os.path.join(bundle, "rootfs"))
    address = direct.start(bundle, cid)
    req = pb.CreateTaskRequest(id=cid, bundle=bundle)
    req.rootfs.add(type="bind", source=direct.rootfs, options=["rbind", "ro"])
    call(address, "Create", req, pb.CreateTaskResponse)
    assert os.path.realpath(os.path.join(bundle, "rootfs")) in harness.mounts_under(bundle)
    call(address, "Delete", pb.DeleteRequest(id=cid), pb.DeleteResponse)
    assert harness.mounts_under(bundle) == []
    made = os.stat(os.path.join(bundle, "rootfs"))  # the dir itself, now that nothing covers it
    assert stat.S_ISDIR(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o711


def _wakeups(pid: int) -> int:
    """How many times process `pid` has gone to sleep and woken (voluntary context
    switches, every thread): constant while it sleeps undisturbed."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def test_an_idle_shim_does_not_wake(direct: Direct) -> None:
    """Memory upkeep (malloc_trim, zero pages, KSM marks) runs once, the interval after
    activity, not on a clock: an idle shim that woke every interval wrote some 20
    pages each time (copying KSM-merged pages back out) and spent CPU for nothing.
    Here the interval is 1 s: 2 s after the last request the shim must sleep on."""
    settings = os.path.join(direct.dir, "idle.toml")
    with open(settings, "w") as f:
        f.write("memory_release_interval = 1\n")
    opts = any_pb2.Any(type_url="runtimeoptions.v1.Options",
                       value=pb.CriRuntimeOptions(type_url="io.containerd.pyshim.v1",
                                                  config_path=settings).SerializeToString())
    cid = harness.new_id("idle")
    address = direct.start(direct.bundle(cid, ["/bin/sleep", "1000"]), cid, opts.SerializeToString())
    shim = call(address, "Connect", pb.ConnectRequest(id=cid), pb.ConnectResponse).shim_pid
    time.sleep(2.0)  # a required gap: the one round after Connect, at 1 s, is over
    before = _wakeups(shim)
    time.sleep(3.5)  # a required gap: a clock of 1 s would have woken it three times
    assert _wakeups(shim) == before

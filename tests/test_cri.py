"""pyshim as a Kubernetes RuntimeClass: pods through containerd's CRI plugin, no cluster.

One private containerd with the CRI plugin on (harness ``cri=``), runtime handlers
``runc`` (io.containerd.runc.v2), ``pyshim`` (io.containerd.pyshim.v1), ``pyshim-conf``
(pyshim with ``options.ConfigPath`` naming a settings file) and ``pyshim-bad`` (a file
with an unknown key). The sandbox ("pause") and busybox images are built here and
imported into CRI's namespace: nothing is pulled. Pods use the host's network, for which
CRI needs no CNI plugin. The client is harness.cri (tests/harness/cri.py: grpcio + cri.proto).

The daemon config is the form of this containerd (harness Behaviour.config_version):
version 2 on 1.6/1.7, version 3 on 2.x, where the handlers live under
io.containerd.cri.v1.runtime with the default sandboxer, podsandbox (a pause container
run as a task of the handler's shim). docs/kubernetes.md shows both.

pyshim's binary on the daemon's PATH is a wrapper that records what containerd hands
`start` on stdin (the handler's runtime options) before running the real shim.

The pod test runs for both handlers: three containers in one pod are served by exactly
one shim (grouped by the io.kubernetes.cri.sandbox-id annotation), ExecSync returns
output and exit code, ContainerStatus reports exit codes, and stopping and removing the
pod leaves no shim process, socket, mount, bundle or runc state behind.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import harness
import pytest
from harness import require, require_e2e

try:
    import grpc
    from harness import cri
except ImportError as e:  # reported by the fixture (a failure under CI=true)
    grpc = cri = None
    _import_error = str(e)

NS = harness.CRI_NAMESPACE
HANDLERS = {"pyshim": harness.PYSHIM, "runc": harness.RUNC}
SLEEP = ["/bin/sleep", "100000"]
EXIT_CODE = 7
SETTINGS = """\
# pyshim settings of the pyshim-conf handler (template = false: test_shim_direct.py)
runc_root = "{root}"
log_level = "warning"
memory_release_interval = 5
"""


# On the daemon's PATH ahead of the real shim: each invocation's argv (one a line) in
# <rec>/<n>.argv and its stdin in <rec>/<n>.stdin, then the real shim with that stdin.
RECORDING_SHIM = """\
#!/bin/sh
rec={rec}/$(date +%s%N)-$$
printf '%s\\n' "$@" > "$rec.argv"
cat > "$rec.stdin"
exec {real} "$@" < "$rec.stdin"
"""
CRI_OPTIONS_URL = "runtimeoptions.v1.Options"  # what 1.6.20, 1.7.24 and 2.1.9 send


@dataclass
class Cri:
    daemon: harness.Containerd
    client: cri.CriClient
    settings_path: str
    bad_path: str
    runc_root: str
    records: str = ""
    startup_log: str = ""
    pods: list[str] = field(default_factory=list)  # run and not yet removed


@pytest.fixture(scope="module")
def crid() -> Iterator[Cri]:
    require_e2e()
    require(cri is not None, f"the CRI client needs grpcio: {globals().get('_import_error')}")
    tmp = tempfile.mkdtemp(prefix="pysh-cri-")
    settings = os.path.join(tmp, "pyshim.toml")
    bad = os.path.join(tmp, "bad.toml")
    root = os.path.join(tmp, "runc-root")
    with open(settings, "w") as f:
        f.write(SETTINGS.format(root=root))
    with open(bad, "w") as f:
        f.write('log_level = "info"\ncolour = "blue"\n')
    records, shim_dir = os.path.join(tmp, "records"), os.path.join(tmp, "bin")
    os.makedirs(records)
    os.makedirs(shim_dir)
    wrapper = os.path.join(shim_dir, harness.shim_binary(harness.PYSHIM))
    with open(wrapper, "w") as f:
        f.write(RECORDING_SHIM.format(rec=shlex.quote(records),
                                      real=shlex.quote(harness.shim_binary_path(harness.PYSHIM))))
    os.chmod(wrapper, 0o755)
    daemon = harness.Containerd(extra_path=[shim_dir], cri={
        "runc": harness.RUNC,
        "pyshim": harness.PYSHIM,
        "pyshim-conf": (harness.PYSHIM, {"ConfigPath": settings}),
        "pyshim-bad": (harness.PYSHIM, {"ConfigPath": bad}),
    })
    daemon.env["PYSHIM_TEMPLATE"] = "1"  # the default, whatever the caller's environment
    client = None
    try:
        _start_with_images(daemon, tmp)
        startup_log = daemon.log_text()
        client = cri.CriClient(daemon.address)
        yield Cri(daemon, client, settings, bad, root, records, startup_log)
    finally:
        if client is not None:
            client.close()
        try:
            daemon.cleanup()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_pod_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that failed half way leaves its pod running: removed here, so that the
    next test starts without one and fails, if it does, for its own reasons."""
    yield
    if "crid" in request.fixturenames:
        c = request.getfixturevalue("crid")
        while c.pods:
            pod = c.pods.pop()
            try:
                c.client.stop_pod(pod)
                c.client.remove_pod(pod)
            except grpc.RpcError:
                pass


# ------------------------------------------------------------------------------ helpers


def _shims(daemon: harness.Containerd) -> list[int]:
    """Long-lived shims of this daemon (not start/delete invocations)."""
    return [p for p in harness.shim_pids(daemon)
            if harness.cmdline(p)[-1:] not in (["start"], ["delete"])]


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _bundles(daemon: harness.Containerd) -> set[str]:
    base = os.path.join(daemon.state, harness.TASK_PLUGIN_DIR, NS)
    return set(os.listdir(base)) if os.path.isdir(base) else set()


def _socket(daemon: harness.Containerd, group: str) -> str:
    digest = hashlib.sha256(f"{daemon.address}/{NS}/{group}".encode()).hexdigest()
    return os.path.join(harness.SHIM_SOCKET_DIR, digest)


def _start_with_images(daemon: harness.Containerd, tmp: str) -> None:
    """Starts the daemon and imports the sandbox and busybox images into k8s.io
    (built locally in `tmp`: there is no registry)."""
    daemon.start()
    for tar, build in (("pause.tar", harness.build_sandbox_image),
                       ("busybox.tar", harness.build_busybox_image)):
        build(os.path.join(tmp, tar))
        daemon.import_image(os.path.join(tmp, tar), namespace=NS)


def _recorded_starts(c: Cri, cid: str) -> list[bytes]:
    """stdin of each recorded `start` of container (or pod) `cid`, oldest first."""
    out = []
    for name in sorted(n for n in os.listdir(c.records) if n.endswith(".argv")):
        with open(os.path.join(c.records, name)) as f:
            argv = f.read().splitlines()
        if argv[-1:] == ["start"] and _flag(argv, "-id") == cid:
            with open(os.path.join(c.records, name[:-len(".argv")] + ".stdin"), "rb") as f:
                out.append(f.read())
    return out


def _any(data: bytes) -> tuple[str, bytes]:
    """(type URL, value) of a marshalled google.protobuf.Any."""
    fields = dict(harness.pb_fields(data))
    assert set(fields) <= {1, 2}, fields
    return fields.get(1, b"").decode(), fields.get(2, b"")


def _status(c: Cri, cid: str) -> tuple[int, int]:
    st = c.client.container_status(cid)
    return st.state, st.exit_code


def _run_pod(c: Cri, handler: str, name: str) -> tuple[str, object, list[str]]:
    """A pod of three containers: two sleep, the third exits with EXIT_CODE."""
    pod_cfg = cri.pod_config(name, harness.new_id("uid"), os.path.join(c.daemon.dir, "pods"))
    pod = c.client.run_pod(pod_cfg, handler)
    c.pods.append(pod)
    cids = []
    for i, cmd in enumerate([SLEEP, SLEEP, ["/bin/sh", "-c", f"exit {EXIT_CODE}"]]):
        config = cri.container_config(f"c{i}", harness.BUSYBOX_REF, cmd, f"c{i}.log")
        cid = c.client.create_container(pod, pod_cfg, config)
        c.client.start_container(cid)
        cids.append(cid)
    return pod, pod_cfg, cids


def _remove_pod(c: Cri, pod: str, runc_root: str, ids: list[str]) -> None:
    """Stop and remove the pod, then check that nothing of it is left."""
    c.client.stop_pod(pod)
    c.client.remove_pod(pod)
    c.pods.remove(pod)
    d = c.daemon
    harness.wait_for(lambda: not _shims(d), 15, message=f"shims left: {_shims(d)}")
    assert not harness.shim_pids(d)  # no start/delete invocation either
    assert not os.path.exists(_socket(d, pod))
    assert not c.client.list_containers(pod)
    assert not _bundles(d) & {pod, *ids}
    assert not harness.mounts_under(d.dir), harness.mounts_under(d.dir)
    for cid in (pod, *ids):
        assert not os.path.exists(os.path.join(runc_root, NS, cid))


# -------------------------------------------------------------------------------- tests


def test_sandbox_image_is_local(crid: Cri) -> None:
    """CRI finds the hand-built sandbox image under its configured name: never pulled."""
    image = crid.client.image_status(harness.SANDBOX_REF)
    assert image is not None and harness.SANDBOX_REF in image.repo_tags


@pytest.mark.parametrize("handler", list(HANDLERS))
def test_pod_of_three_containers(crid: Cri, handler: str) -> None:
    d, client = crid.daemon, crid.client
    pod, _, cids = _run_pod(crid, handler, f"three-{handler}")
    status = client.pod_status(pod)
    assert status.runtime_handler == handler and status.state == cri.pb.SANDBOX_READY

    # The third container's exit code, the others running.
    harness.wait_for(lambda: _status(crid, cids[2]) == (cri.pb.CONTAINER_EXITED, EXIT_CODE), 15,
                     message=f"status of the exiting container: {_status(crid, cids[2])}")
    assert [_status(crid, cid)[0] for cid in cids[:2]] == [cri.pb.CONTAINER_RUNNING] * 2
    assert sorted(x.id for x in client.list_containers(pod)) == sorted(cids)

    # One shim for the whole pod: the sandbox's, on the socket of the sandbox-id group.
    shims = _shims(d)
    assert len(shims) == 1, [harness.cmdline(p) for p in shims]
    argv = harness.cmdline(shims[0])
    assert harness.shim_binary(HANDLERS[handler]) in " ".join(argv[:3])
    assert _flag(argv, "-id") == pod and _flag(argv, "-namespace") == NS
    sock = _socket(d, pod)
    assert os.path.exists(sock)
    for cid in (pod, *cids[:2]):  # containerd's record: address (1.x), bootstrap.json (2.x)
        bundle = os.path.join(d.state, harness.TASK_PLUGIN_DIR, NS, cid)
        assert harness.bundle_address(bundle) == "unix://" + sock, os.listdir(bundle)
    if handler == "pyshim":  # the default log level shows the shim's info lines
        harness.wait_for(lambda: re.search(rf'msg="shim started" pid={shims[0]}\b', d.log_text()), 10)
        # A handler without options: `start` reads an empty stdin (no Any at all).
        assert _recorded_starts(crid, pod) == [b""]

    # ExecSync: stdout, stderr and the exit code, in two containers of the pod.
    r = client.exec_sync(cids[0], ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    r = client.exec_sync(cids[1], ["/bin/cat", "/proc/1/cmdline"])
    assert (r.stdout, r.exit_code) == (b"/bin/sleep\x00100000\x00", 0)

    # A container stopped with no grace period is SIGKILLed: 137.
    client.stop_container(cids[0], timeout=0)
    harness.wait_for(lambda: _status(crid, cids[0]) == (cri.pb.CONTAINER_EXITED, 137), 15,
                     message=f"status of the stopped container: {_status(crid, cids[0])}")
    assert _status(crid, cids[1])[0] == cri.pb.CONTAINER_RUNNING

    _remove_pod(crid, pod, harness.RUNC_ROOT, cids)


def test_daemon_config_is_clean(crid: Cri) -> None:
    """The harness wrote the config form of this containerd, which it took as is: no
    migration, no deprecated key, no warning while the plugins loaded. The one error
    line is CNI's empty conf dir, which host-network pods never use."""
    b = harness.behaviour()
    with open(crid.daemon.config_path) as f:
        assert f.readline() == f"version = {b.config_version}\n"
    noisy = [line for line in crid.startup_log.splitlines()
             if re.search(r"level=(warning|error|fatal)", line)
             and "failed to load cni during init" not in line]
    assert noisy == []
    cni = ("failed to load cni during init, please check CRI plugin status before setting "
           "up network for pods")
    assert re.findall(r'level=error msg="([^"]*)"', crid.startup_log) == [cni]
    # Nothing listed (ctr then prints not even a header); 1.6 has no such command.
    res = crid.daemon.ctr("deprecations", "list")
    assert (res.returncode == 0) == b.deprecations_service, res.stderr
    assert res.returncode != 0 or res.stdout.strip() == "", res.stdout


def test_handler_options_on_the_wire(crid: Cri) -> None:
    """A handler with ``options = {ConfigPath = ...}``: containerd hands pyshim's
    `start` an Any of runtimeoptions.v1.Options holding only config_path (field 2;
    no type_url, no config_body), and keeps the same Any as the container's runtime
    options, which is what it puts in the shim's Create request."""
    pod, _, cids = _run_pod(crid, "pyshim-conf", "wire")
    starts = _recorded_starts(crid, pod)
    assert len(starts) == 1
    url, value = _any(starts[0])
    assert url == CRI_OPTIONS_URL
    assert list(harness.pb_fields(value)) == [(2, crid.settings_path.encode())]
    for cid in (pod, *cids):
        for data in _recorded_starts(crid, cid):  # a version-2 shim's containers: each started
            assert data == starts[0]
        info = json.loads(crid.daemon.ctr("containers", "info", cid, namespace=NS, check=True).stdout)
        opts = info["Runtime"]["Options"]
        assert (info["Runtime"]["Name"], opts["type_url"]) == (harness.PYSHIM, CRI_OPTIONS_URL)
        assert base64.b64decode(opts["value"]) == value
    _remove_pod(crid, pod, crid.runc_root, cids)


def test_handler_settings_file(crid: Cri) -> None:
    """options.ConfigPath of the handler names pyshim's settings: the shim forked from
    the warm template gets them (-settings), runc runs with their runc_root, and the
    shim logs at warning only."""
    d = crid.daemon
    pod, _, cids = _run_pod(crid, "pyshim-conf", "settings")
    harness.wait_for(lambda: _status(crid, cids[2]) == (cri.pb.CONTAINER_EXITED, EXIT_CODE), 15)
    shims = _shims(d)
    assert len(shims) == 1
    argv = harness.cmdline(shims[0])
    assert crid.settings_path in _flag(argv, "-settings")
    parent = harness.cmdline(_ppid(shims[0]))
    assert harness.is_template_argv(parent), parent  # the settings went through the fork

    for cid in (pod, *cids[:2]):  # runc state under the file's runc_root, not the default
        assert os.path.isdir(os.path.join(crid.runc_root, NS, cid)), cid
        assert not os.path.exists(os.path.join(harness.RUNC_ROOT, NS, cid)), cid
    r = crid.client.exec_sync(cids[0], ["/bin/sh", "-c", "exit 5"])
    assert r.exit_code == 5
    _remove_pod(crid, pod, crid.runc_root, cids)
    # warning level: the shim's info lines ("shim started") never reached the log
    assert not re.search(rf'msg="shim started" pid={shims[0]}\b', d.log_text())


def test_bad_settings_file_fails_the_pod_clearly(crid: Cri) -> None:
    """An unknown key fails RunPodSandbox with a message naming the file and the key,
    and leaves no shim behind."""
    cfg = cri.pod_config("bad", harness.new_id("uid"), os.path.join(crid.daemon.dir, "pods"))
    with pytest.raises(grpc.RpcError) as err:
        crid.client.run_pod(cfg, "pyshim-bad")
    text = err.value.details()
    assert crid.bad_path in text and "unknown key 'colour'" in text, text
    harness.wait_for(lambda: not harness.shim_pids(crid.daemon), 15)
    assert not harness.mounts_under(crid.daemon.dir)


@pytest.mark.parametrize("handler", list(HANDLERS))
def test_daemon_cleanup_with_a_live_pod_leaves_nothing(handler: str) -> None:
    """The harness's cleanup() of a CRI daemon whose pod still runs (a test that failed
    half way): no process, mount (the pod's /dev/shm tmpfs, rootfs overlays), shim
    socket or runc state is left, and the temp dir is gone."""
    require_e2e()
    require(cri is not None, f"the CRI client needs grpcio: {globals().get('_import_error')}")
    d = harness.Containerd(cri={handler: HANDLERS[handler]})
    tmp = tempfile.mkdtemp(prefix="pysh-cri-")
    try:
        _start_with_images(d, tmp)
        with cri.CriClient(d.address) as client:
            pod, _, cids = _run_pod(Cri(d, client, "", "", ""), handler, "left-running")
        shm = [m for m in harness.mounts_under(d.dir) if m.endswith("/shm")]
        assert len(shm) == 1, harness.mounts_under(d.dir)  # the pod's IPC namespace /dev/shm
        assert d._reaper is not None
        pids = [d.pid, d._reaper.pid, *harness.shim_pids(d)]
        paths = [_socket(d, pod)] + [os.path.join(harness.RUNC_ROOT, NS, c) for c in (pod, *cids[:2])]
        assert all(os.path.exists(p) for p in paths)
        if handler == "pyshim":  # and the warm template's socket and lock file
            sock = harness.template_socket(d)
            paths += [sock, sock + ".lock"]
            assert os.path.exists(sock) and os.path.exists(sock + ".lock")
    finally:
        d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not os.path.exists(d.dir)
    assert harness.mounts_under(d.dir) == []
    assert harness.daemon_pids(d.address) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), (pid, harness.cmdline(pid))
    for path in paths:
        assert not os.path.exists(path), path

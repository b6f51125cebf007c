"""End-to-end harness: a private containerd driven through ``ctr``.

The one helper package of tests/ and bench/: .ci/setup installs it into the dev venv
(editable, from tests/harness/pyproject.toml), so both import it as ``harness`` and
neither touches sys.path. It needs the stdlib and pytest (harness.scenario, imported
here); ``task_call`` also pyshim, ``harness.cri`` grpcio, ``harness.direct`` pyshim,
protobuf and uvloop. Submodules:
    harness.scenario     the comparison kit; every name of it is re-exported here
    harness.direct       the shim driven without containerd (``Direct``, ``call``)
    harness.soak_cycles  the create/exec/kill/delete soak shared by a test and bench/soak.py
    harness.cri          a small CRI (Kubernetes) client for containerd's CRI plugin
    harness/reaper.py    the subreaper process under each daemon (a script, not imported)

Public surface:
    PYSHIM, RUNC, NAMESPACE, BUSYBOX_REF   runtime names, default namespace and image ref
    wait_for(predicate, timeout, interval) poll until truthy, return the value
    new_id(prefix)                         a container id unique to this process
    make_busybox_rootfs(path)              a static busybox rootfs directory for --rootfs
    build_busybox_image(tar_path, ref)     a hand-made OCI image archive for `ctr images import`
    build_sandbox_image(tar_path, ref)     the same, whose entrypoint sleeps forever (CRI "pause")
    shim_pids(daemon, runtime)             live shim processes of one daemon, by cmdline
    bundle_address(bundle)                 the address of a bundle's shim (per BEHAVIOURS)
    daemon_pids(address)                   every live process naming that daemon's address
    cmdline(pid), shim_binary(runtime)     /proc argv; runtime name -> shim binary name
    reaped(pid)                            dead and reaped (gone from /proc, not a zombie)
    mounts_under(path), umount_tree(path)  mount points at/below path (deepest first)
    cgroup_hierarchies()                   the mounted cgroup hierarchies (v1 + unified)
    Containerd                             the private daemon: start, ctr, kill9, restart,
                                           stop, tasks, containers, images, import_image,
                                           remove_all, cleanup, log_text; with ``cri=``
                                           also containerd's CRI plugin (Kubernetes API)
    CRI_NAMESPACE, SANDBOX_REF             CRI's containerd namespace, its sandbox image ref
    HarnessError                           raised when the daemon cannot be driven
    pb_varint, pb_message, pb_fields       the tests' one protobuf codec: encode a varint,
    varint_at                              a message of (number, value); decode fields

Why a reaper process: PID 1 on the test machines does not reap orphans, and every shim
is an orphan once its `start` invocation exits. Containerd is therefore spawned by a
tiny child-subreaper helper (``_Reaper``, harness/reaper.py) that lives as long as the
``Containerd`` object: shims, and the container processes of a shim killed by a test,
are re-parented to it and reaped there, never to PID 1, and the test process's own
children are untouched. reaper.py's docstring says why it is not the test process, nor
pyshim's C core.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Self, TypeVar

# ---------------------------------------------------------------------------- constants

PYSHIM = "io.containerd.pyshim.v1"
RUNC = "io.containerd.runc.v2"
NAMESPACE = "pyshim-test"
BUSYBOX_REF = "localhost/pyshim/busybox:latest"
CRI_NAMESPACE = "k8s.io"  # where containerd's CRI plugin keeps pods, containers, images
SANDBOX_REF = "localhost/pyshim/pause:1"  # never pulled: built and imported by the harness

# The platform under test (.ci/matrix sets these): the directory holding containerd, ctr
# and that containerd's own Go shim, containerd-shim-runc-v2 (default: Debian's package).
PLATFORM = os.environ.get("PYSHIM_PLATFORM", "host")
CONTAINERD_DIR = os.environ.get("PYSHIM_CONTAINERD_DIR", "/usr/bin")
CONTAINERD = os.path.join(CONTAINERD_DIR, "containerd")
CTR = os.path.join(CONTAINERD_DIR, "ctr")
GO_SHIM = os.path.join(CONTAINERD_DIR, "containerd-shim-runc-v2")
RUNC_BINARY = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"

# Fixed by containerd 1.6 and the runc shim, whatever the daemon's config says.
SHIM_SOCKET_DIR = "/run/containerd/s"
RUNC_ROOT = "/run/containerd/runc"
FIFO_DIR = "/run/containerd/fifo"  # ctr's default --fifo-dir
CGROUP_ROOT = "/sys/fs/cgroup"

# Paths in the state dir: <state>/io.containerd.runtime.v2.task/<ns>/<id>/ is a bundle.
TASK_PLUGIN_DIR = "io.containerd.runtime.v2.task"

_MNT_DETACH = 2
_LAYER_MTIME = 946684800  # 2000-01-01: a fixed mtime keeps image digests reproducible

T = TypeVar("T")


class HarnessError(RuntimeError):
    """The harness could not set up or drive the daemon."""


# ---------------------------------------------------------------------------- platform


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """What one containerd line (and its own Go shim) does where the lines differ. Tests
    look their expectation up here (``behaviour()``) rather than assume one version;
    pyshim is held to the same row as the Go shim."""

    # `ctr task ps` INFO column for an exec's ProcessDetails: 1.6 prints the Go struct
    # (ExecID:x), 1.7 and later the protobuf text form (exec_id:"x").
    ps_exec_info: str
    # After a containerd restart, a task that exited while it was down still shows
    # STOPPED (1.6); 1.7 and later clean up a shim that reports no pids ("cleaning
    # leaked shim process": Delete, Shutdown, bundle removed), so the task is gone
    # and only the container record stays (test_e2e.exited_while_down).
    keeps_exited_task_over_restart: bool
    # The Go shim passes the runc options' CriuPath as --criu to runc checkpoint and
    # restore (1.6 only: 1.7 deprecated the field and its go-runc dropped the flag,
    # which runc 1.2 ignores). pyshim passes it on every line.
    go_shim_passes_criu: bool
    # The bootstrap version the daemon logs at each shim connection ("connecting to
    # shim ID ... version=N"): 2 for a plain address, 3 for the Go shim 2.x's JSON
    # BootstrapParams; None for a line that logs no such line (1.6; 1.7 logs "shim
    # bootstrap parameters" at debug level, with neither id nor version).
    shim_version: int | None
    # The daemon keeps the parsed start answer in the bundle's bootstrap.json (2.x).
    writes_bootstrap_json: bool
    # The task services the line's Go shim serves on its socket.
    go_shim_task_services: tuple[str, ...]
    # The Go shim serves containerd.runtime.sandbox.v1.Sandbox (1.7's no-op "pause"
    # plugin; 1.6 has none and 2.1 dropped it).
    go_shim_serves_sandbox: bool
    # The Go shim answers `-info` (2.x); older ones exit 2 on an unknown flag.
    go_shim_info: bool
    # `ctr plugins inspect-runtime` (introspection PluginInfo with runtime options).
    inspects_runtime: bool
    # What ctr appends to an error of gRPC code Unknown: 1.x ": unknown", 2.x nothing.
    ctr_unknown_suffix: str
    # ctr's error for a request over 4 MiB (an exec with a 4.5 MB spec), as a regex with
    # the length as group 1: 1.x passes it on and containerd's ttrpc client to the shim
    # refuses it (code Unknown); 2.x refuses it at its own gRPC server.
    oversized_request: str

    # The daemon config form this line reads without migrating it: version 2 (1.x,
    # CRI under io.containerd.grpc.v1.cri) or 3 (2.x, CRI split into
    # io.containerd.cri.v1.runtime / .images, with io.containerd.grpc.v1.cri keeping
    # only the stream server). 2.x migrates a version-2 file and logs a warning.
    config_version: int
    # Plugins this line has that a private test daemon does not use (only names the
    # line knows: each would otherwise load, skip or fail noisily). NRI is among them
    # from 1.7: 2.x enables it and listens on /var/run/nri/nri.sock, shared by every
    # daemon of the machine.
    unused_plugins: tuple[str, ...]
    # The CNI binary dirs of the CRI config: 2.1 takes a list ``bin_dirs`` and
    # deprecates ``bin_dir`` (io.containerd.deprecation/cri-cni-bin-dir).
    cni_bin_dirs: bool
    # The daemon has a deprecation warning service (`ctr deprecations list`), 1.7+.
    deprecations_service: bool
    # The bundle file that holds a task's shim address: 1.x reads the shim's own
    # ``address``; 2.x keeps the bootstrap params, {"version", "address", "protocol"},
    # in ``bootstrap.json``, written for every shim (from a version-2 shim's plain
    # address too). Its Go shim, version 3, writes no ``address``.
    bundle_address_file: str
    # The Go shim may publish no /tasks/delete for a deleted task (2.x: it sends the
    # event from a goroutine and can exit, asked to shut down right after Delete, before
    # that goroutine has published it). Seen with 2.1.9 in 5 to 14 of 100 quick
    # `ctr run --rm`; never with 1.6.20 or 1.7.24. pyshim publishes it on every line.
    # Once (a clean-clone run of ddb6f53) such a 2.1.9 `ctr run --rm` never returned.
    go_shim_may_drop_task_delete: bool



_TASK_V2, _TASK_V3 = "containerd.task.v2.Task", "containerd.task.v3.Task"
_UNUSED_1X = ("io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
              "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs")
_UNUSED_17 = (*_UNUSED_1X, "io.containerd.snapshotter.v1.blockfile",
              "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
              "io.containerd.nri.v1.nri")
# 2.0 dropped aufs and zfs (not in 2.1.9's `ctr plugins ls`) and added erofs.
_UNUSED_2X = ("io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
              "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs",
              "io.containerd.differ.v1.erofs", "io.containerd.tracing.processor.v1.otlp",
              "io.containerd.internal.v1.tracing", "io.containerd.nri.v1.nri")

_TTRPC_TOO_BIG = r"ctr: message length (\d+) exceed maximum message size of 4194304: unknown\n"
_GRPC_TOO_BIG = (r"ctr: rpc error: code = ResourceExhausted desc = message length (\d+) exceed "
                 r"maximum message size of 4194304\n")

BEHAVIOURS: dict[tuple[int, int], Behaviour] = {
    (1, 6): Behaviour(ps_exec_info="ExecID:{}", keeps_exited_task_over_restart=True,
                      go_shim_passes_criu=True, config_version=2, unused_plugins=_UNUSED_1X,
                      cni_bin_dirs=False, deprecations_service=False, bundle_address_file="address",
                      shim_version=None, writes_bootstrap_json=False,
                      go_shim_task_services=(_TASK_V2,), go_shim_serves_sandbox=False,
                      go_shim_info=False, inspects_runtime=False,
                      ctr_unknown_suffix=": unknown", go_shim_may_drop_task_delete=False,
                      oversized_request=_TTRPC_TOO_BIG),
    (1, 7): Behaviour(ps_exec_info='exec_id:"{}"', keeps_exited_task_over_restart=False,
                      go_shim_passes_criu=False, config_version=2, unused_plugins=_UNUSED_17,
                      cni_bin_dirs=False, deprecations_service=True, bundle_address_file="address",
                      shim_version=None, writes_bootstrap_json=False,
                      go_shim_task_services=(_TASK_V2,), go_shim_serves_sandbox=True,
                      go_shim_info=False, inspects_runtime=False,
                      ctr_unknown_suffix=": unknown", go_shim_may_drop_task_delete=False,
                      oversized_request=_TTRPC_TOO_BIG),
    (2, 0): Behaviour(ps_exec_info='exec_id:"{}"', keeps_exited_task_over_restart=False,
                      go_shim_passes_criu=False, config_version=3, unused_plugins=_UNUSED_2X,
                      cni_bin_dirs=False, deprecations_service=True,
                      bundle_address_file="bootstrap.json",
                      shim_version=3, writes_bootstrap_json=True,
                      go_shim_task_services=(_TASK_V3,), go_shim_serves_sandbox=False,
                      go_shim_info=True, inspects_runtime=True,
                      ctr_unknown_suffix="", go_shim_may_drop_task_delete=True,
                      oversized_request=_GRPC_TOO_BIG),
    (2, 1): Behaviour(ps_exec_info='exec_id:"{}"', keeps_exited_task_over_restart=False,
                      go_shim_passes_criu=False, config_version=3, unused_plugins=_UNUSED_2X,
                      cni_bin_dirs=True, deprecations_service=True,
                      bundle_address_file="bootstrap.json",
                      shim_version=3, writes_bootstrap_json=True,
                      go_shim_task_services=(_TASK_V3,), go_shim_serves_sandbox=False,
                      go_shim_info=True, inspects_runtime=True,
                      ctr_unknown_suffix="", go_shim_may_drop_task_delete=True,
                      oversized_request=_GRPC_TOO_BIG),
}

_version_cache: dict[str, tuple[int, int, int]] = {}


def containerd_version(binary: str = CONTAINERD) -> tuple[int, int, int]:
    """(major, minor, patch) of a containerd binary, asked once (``containerd --version``
    prints e.g. "containerd github.com/containerd/containerd/v2 2.1.9+unknown")."""
    if binary not in _version_cache:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        m = re.search(r"\s[v]?(\d+)\.(\d+)\.(\d+)", out)
        if not m:
            raise HarnessError(f"cannot read a version in {binary} --version: {out!r}")
        _version_cache[binary] = (int(m[1]), int(m[2]), int(m[3]))
    return _version_cache[binary]


def behaviour(version: tuple[int, ...] | None = None) -> Behaviour:
    """The row of BEHAVIOURS for this containerd: the newest line at or below it."""
    v = tuple(version or containerd_version())[:2]
    lines = [k for k in BEHAVIOURS if k <= v]
    if not lines:
        raise HarnessError(f"containerd {v} is older than every line the tests know")
    return BEHAVIOURS[max(lines)]


# ---------------------------------------------------------------------------- helpers


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
             message: str = "") -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Raises TimeoutError (with ``message``) once ``timeout`` seconds have passed; the
    predicate is always called at least once more after the deadline check.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(message or f"condition not met within {timeout:.1f}s")
        time.sleep(interval)


def wait_task_delete(seen: Callable[[], T], runtime: str, timeout: float = 10.0,
                     message: str = "") -> T | None:
    """Wait, as ``wait_for``, until ``seen`` reports a task's /tasks/delete event.

    Where this line's Go shim is known to lose that event (``go_shim_may_drop_task_delete``)
    and ``runtime`` is the Go shim, a missing event is recorded as a warning and None is
    returned, so the test can go on comparing everything else. pyshim, and the Go shim of
    every other line, is held to the event: a timeout raises.
    """
    try:
        return wait_for(seen, timeout, message=message)
    except TimeoutError:
        if runtime != RUNC or not behaviour().go_shim_may_drop_task_delete:
            raise
    warnings.warn(f"the Go shim published no /tasks/delete: {message}"[:400], stacklevel=2)
    return None


_ids = itertools.count(1)


def new_id(prefix: str = "t") -> str:
    """A container id unique within this process and distinct from other runs' ids.

    The runc shim keeps state in /run/containerd/runc/<ns>/<id> and cgroups at
    /<ns>/<id>, both shared between daemons, so ids must not collide across sessions.
    """
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def cmdline(pid: int) -> list[str]:
    """argv of a live process; [] for a zombie, a kernel thread or a vanished pid."""
    raw = _read(f"/proc/{pid}/cmdline")
    if not raw:
        return []
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of a process, or None if it is gone."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # comm may contain spaces and parens
    return fields[0].decode(), int(fields[1])


def reaped(pid: int) -> bool:
    """Whether ``pid`` is gone from /proc: dead and reaped by its parent (for a task's
    process, its shim), not merely a zombie."""
    return _stat(pid) is None


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of ``root``, from one /proc scan."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            states[pid] = st[0]
            children.setdefault(st[1], []).append(pid)
    out: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        if states.get(pid) not in ("Z", "X"):
            out.append(pid)
    return out


def _names_address(argv: list[str], address: str) -> bool:
    """True if argv carries ``address`` as a flag value (``-address A`` or ``--address=A``)."""
    return any(arg == address or arg.endswith("=" + address) for arg in argv[1:])


def daemon_pids(address: str) -> list[int]:
    """Every live process (shims, ctr clients) whose cmdline names this daemon's address."""
    me = os.getpid()
    return [pid for pid in _pids() if pid != me and _names_address(cmdline(pid), address)]


def shim_binary(runtime: str) -> str:
    """Binary name containerd derives from a runtime name (io.containerd.runc.v2 ->
    containerd-shim-runc-v2); an absolute path names the binary itself."""
    if runtime.startswith("/"):
        return os.path.basename(runtime)
    parts = runtime.split(".")
    return f"containerd-shim-{parts[-2]}-{parts[-1]}"


def shim_search_path() -> str:
    """Where the daemon looks for shim binaries: the platform's containerd dir (its Go
    shim), pip's scripts dir, then the usual dirs."""
    dirs = [CONTAINERD_DIR, sysconfig.get_path("scripts"), *os.environ.get("PATH", "").split(os.pathsep),
            "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    return os.pathsep.join(d for d in dict.fromkeys(dirs) if d)


def shim_binary_path(runtime: str = PYSHIM) -> str:
    """Absolute path of the shim binary of ``runtime`` as the daemon would find it."""
    path = shutil.which(shim_binary(runtime), path=shim_search_path())
    if path is None:
        raise HarnessError(f"{shim_binary(runtime)} not found on {shim_search_path()}")
    return path


def bundle_address(bundle: str, name: str | None = None) -> str | None:
    """The shim address a bundle records (``unix:///run/containerd/s/...``), from the
    file this containerd keeps it in (Behaviour.bundle_address_file) or the one named:
    ``address`` holds it as text, ``bootstrap.json`` as its "address". None without one."""
    name = name or behaviour().bundle_address_file
    raw = _read(os.path.join(bundle, name))
    if not raw:
        return None
    if name == "bootstrap.json":
        try:
            return str(json.loads(raw)["address"])
        except (ValueError, KeyError, TypeError):
            return None
    return raw.decode(errors="replace").strip()


# The tests' one protobuf codec (pyshim's own is its wire code): enough to build and read
# a few fields of a message without the generated classes.


def pb_varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pb_message(*fields: tuple[int, str | bytes | int | bool]) -> bytes:
    """A protobuf message from (field number, value) in order: ints and bools as
    varints (wire type 0), strings and bytes (an embedded message too) length-delimited."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            out += pb_varint(number << 3) + pb_varint(int(value))
        else:
            data = value.encode() if isinstance(value, str) else value
            out += pb_varint(number << 3 | 2) + pb_varint(len(data)) + data
    return bytes(out)


def varint_at(buf: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at buf[i:] and the index after it (IndexError if cut)."""
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def pb_fields(buf: bytes):
    """(field number, value) of each field of a protobuf message, for tests that
    read a few fields without the generated classes: varints as ints,
    length-delimited fields as bytes; other wire types raise ValueError."""
    i = 0
    while i < len(buf):
        key, i = varint_at(buf, i)
        if key & 7 == 0:
            value, i = varint_at(buf, i)
            yield key >> 3, value
        elif key & 7 == 2:
            n, i = varint_at(buf, i)
            yield key >> 3, buf[i:i + n]
            i += n
        else:
            raise ValueError(f"wire type {key & 7}")


def is_template_argv(argv: list[str]) -> bool:
    """Whether a command line is pyshim's warm template: the interpreter, its
    flags if any (-IS), the binary, then `template` (and the title padding)."""
    return "template" in argv[2:4] and any("containerd-shim-pyshim" in a for a in argv[1:3])


def children_titled(parent: int, title: str) -> list[int]:
    """Pids of the live children of `parent` titled `... containerd-shim-pyshim-v1 TITLE`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat(int(name))
        if st is not None and st[0] != "Z" and st[1] == parent \
                and title in cmdline(int(name))[2:4]:
            out.append(int(name))
    return sorted(out)


def start_helpers_of(template: int) -> list[int]:
    """Pids of the start helpers of pyshim's template `template`: its live children
    titled `... containerd-shim-pyshim-v1 start-helper`."""
    return children_titled(template, "start-helper")


def spare_shims_of(template: int) -> list[int]:
    """Pids of the spare shims of pyshim's template `template` (the next warm start's
    shim, made ready): its live children titled `... containerd-shim-pyshim-v1 spare-shim`."""
    return children_titled(template, "spare-shim")


def shim_pids(daemon: Containerd | str, runtime: str | None = None) -> list[int]:
    """Pids of live shim processes started for ``daemon`` (a Containerd or its address).

    A shim is a process whose argv carries the daemon's address as a flag value
    (``-address A``) and, within its first three words (interpreter, script), a binary
    named ``containerd-shim-*`` -- the one of ``runtime`` if given. Includes short-lived
    ``start``/``delete`` invocations.
    """
    address = daemon.address if isinstance(daemon, Containerd) else daemon
    want = shim_binary(runtime) if runtime else None
    out = []
    for pid in daemon_pids(address):
        argv = cmdline(pid)
        names = [os.path.basename(a) for a in argv[:3]]
        if want is not None:
            match = want in names
        else:
            match = any(n.startswith("containerd-shim-") for n in names)
        if match:
            out.append(pid)
    return out


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """kB figures of /proc/PID/smaps_rollup plus uss and threads; None if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":").lower()] = int(parts[1])
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
    except OSError:
        return None
    out["uss"] = out.get("private_clean", 0) + out.get("private_dirty", 0)
    return out


def live_shim(daemon: Containerd, runtime: str, cid: str) -> int:
    """Pid of the long-lived shim of ``runtime`` started with ``-id cid`` (waits
    up to 10 s for it)."""
    def find() -> int | None:
        for pid in shim_pids(daemon, runtime):
            argv = cmdline(pid)
            if argv and argv[-1] not in ("start", "delete") and "-id" in argv \
                    and argv[argv.index("-id") + 1] == cid:
                return pid
        return None

    return wait_for(find, 10, message=f"no live {runtime} shim for {cid}")


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path`` in our mount namespace, deepest first."""
    path = os.path.realpath(path).rstrip("/")
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == path or point.startswith(path + "/"):
                out.append(point)
    # Deepest first; a path mounted several times appears once per layer.
    return sorted(out, key=lambda p: p.count("/"), reverse=True)


_libc = ctypes.CDLL(None, use_errno=True)


def _umount(point: str, flags: int = 0) -> int:
    """umount2(2); returns 0 or the errno."""
    if _libc.umount2(point.encode(), flags) == 0:
        return 0
    return ctypes.get_errno()


def umount_tree(path: str) -> None:
    """Unmount everything at or below ``path``, deepest first; lazily if busy."""
    for _ in range(10):  # stacked mounts need one pass per layer
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            if _umount(point) not in (0, errno.EINVAL, errno.ENOENT):
                _umount(point, _MNT_DETACH)
    left = mounts_under(path)
    if left:
        raise HarnessError(f"mounts left under {path}: {left}")


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------- busybox


def make_busybox_rootfs(path: str) -> str:
    """Create a minimal static-busybox rootfs at ``path`` and return its absolute path.

    bin/busybox plus a relative symlink in bin/ per applet, the mount points runc would
    otherwise create inside it (proc sys dev run tmp), and /etc/passwd, group, hostname.
    `ctr run --rootfs` puts no PATH in the spec, so name binaries by path (/bin/sh).
    """
    root = os.path.abspath(path)
    for d in ("bin", "proc", "sys", "dev", "run", "tmp", "etc", "root"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    os.chmod(os.path.join(root, "root"), 0o700)
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True,
                             text=True).stdout.split()
    for applet in applets:
        if applet == "busybox" or "/" in applet:
            continue  # a "busybox -> busybox" link would loop
        link = os.path.join(root, "bin", applet)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/hostname": "pyshim\n",
        "etc/hosts": "127.0.0.1\tlocalhost\n",
    }
    for name, text in files.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    return root


def _layer_tar(rootfs: str) -> bytes:
    """An uncompressed, reproducible layer tar of ``rootfs`` (root-owned, fixed mtime)."""
    def norm(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = _LAYER_MTIME
        return ti

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            rel = os.path.relpath(dirpath, rootfs)
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                arc = name if rel == "." else f"{rel}/{name}"
                tar.add(full, arcname=arc, recursive=False, filter=norm)
    return buf.getvalue()


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def build_busybox_image(tar_path: str, ref: str = BUSYBOX_REF,
                        entrypoint: list[str] | None = None,
                        cmd: list[str] | None = None) -> str:
    """Write an OCI image-layout archive of a busybox image to ``tar_path``; return ``ref``.

    Import it with ``ctr images import FILE``: index.json names the manifest both by
    ``io.containerd.image.name`` (taken verbatim by containerd's importer) and by
    ``org.opencontainers.image.ref.name``. One gzip layer, config with PATH and
    ``cmd`` (default ``/bin/sh``), and ``entrypoint`` if given.
    """
    with tempfile.TemporaryDirectory(prefix="pysh-img-") as tmp:
        layer = _layer_tar(make_busybox_rootfs(os.path.join(tmp, "rootfs")))
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    layer_digest, layer_gz = _blob(gzip.compress(layer, compresslevel=6, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": list(cmd) if cmd is not None else ["/bin/sh"],
            "WorkingDir": "/",
            **({"Entrypoint": list(entrypoint)} if entrypoint else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2000-01-01T00:00:00Z", "created_by": "pyshim harness"}],
    }
    config_digest, config_raw = _blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_raw)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": len(layer_gz)}],
    }
    manifest_digest, manifest_raw = _blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_raw),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref},
        }],
    }
    entries = [
        ("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
        ("index.json", json.dumps(index, sort_keys=True).encode()),
    ]
    for digest, data in ((config_digest, config_raw), (layer_digest, layer_gz),
                         (manifest_digest, manifest_raw)):
        entries.append(("blobs/sha256/" + digest.split(":", 1)[1], data))
    with tarfile.open(tar_path, "w") as tar:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, _LAYER_MTIME
            tar.addfile(ti)
        for name, data in entries:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, _LAYER_MTIME
            tar.addfile(ti, io.BytesIO(data))
    return ref


def build_sandbox_image(tar_path: str, ref: str = SANDBOX_REF) -> str:
    """The pod sandbox ("pause") image CRI starts first in every pod: busybox whose
    entrypoint sleeps for ~68 years, named by absolute path (no shell, no PATH lookup).
    The image's Cmd is empty, so the entrypoint alone is the process."""
    return build_busybox_image(tar_path, ref, entrypoint=["/bin/sleep", "2147483647"], cmd=[])


# ---------------------------------------------------------------------------- reaper

class _Reaper:
    """The child-subreaper helper process (harness/reaper.py, whose docstring says why
    the tests need one and why it is its own) that spawns the daemon and reaps every
    orphan below it; it removes ``owned_dir`` if the harness dies without cleanup. Not
    thread-safe: one request at a time."""

    SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reaper.py")

    def __init__(self, owned_dir: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", self.SCRIPT, owned_dir],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     close_fds=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _call(self, **req: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # reported below
        line = self.proc.stdout.readline()
        if not line:
            raise HarnessError(f"reaper exited (status {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise HarnessError(f"reaper: {reply['error']}")
        return reply

    def spawn(self, argv: list[str], env: dict[str, str], log: str) -> int:
        return self._call(op="spawn", argv=argv, env=env, log=log)["pid"]

    def exit_status(self, pid: int) -> int | None:
        """Exit code of a spawned pid once reaped (negative signal number), else None."""
        return self._call(op="status", pid=pid)["exit"]

    def close(self, timeout: float = 20.0) -> None:
        """Close stdin (the reaper then kills and reaps what is left) and reap it."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------- containerd


class Containerd:
    """A private containerd: root, state, sockets, config and log under one /tmp dir.

    Nothing touches /run/containerd/containerd.sock: every ctr call passes --address.
    What containerd 1.6 does not let us move: shim sockets (/run/containerd/s), the runc
    shim's runc root (/run/containerd/runc/<ns>), ctr's fifo dir (/run/containerd/fifo),
    and cgroups (/<ns>/<id>); cleanup() removes what this daemon left there.
    """

    def __init__(self, extra_path: Iterable[str] | None = None,
                 namespace: str = NAMESPACE, log_level: str = "debug",
                 start_timeout: float = 30.0,
                 cri: Mapping[str, str | tuple[str, Mapping[str, object]]] | None = None) -> None:
        """``cri``: enable containerd's CRI plugin (off by default) with these runtime
        handlers, {handler name: runtime_type or (runtime_type, options table)}; the
        first is the default handler. The options table goes verbatim into the
        handler's ``options`` (e.g. {"ConfigPath": "/x.toml"}, {"SystemdCgroup": False})."""
        self.namespace = namespace
        self.cri = dict(cri) if cri else None
        self.start_timeout = start_timeout
        self.dir = tempfile.mkdtemp(prefix="pysh-", dir="/tmp")
        self.root = os.path.join(self.dir, "root")
        self.state = os.path.join(self.dir, "state")
        self.address = os.path.join(self.dir, "c.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = os.path.join(self.dir, "config.toml")
        self.log_path = os.path.join(self.dir, "containerd.log")
        if len(self.ttrpc_address.encode()) >= 108:
            raise HarnessError(f"socket path too long: {self.ttrpc_address}")
        # The Python scripts dir is where `pip install` puts containerd-shim-pyshim-v1.
        path = [*(extra_path or ()), CONTAINERD_DIR, sysconfig.get_path("scripts"),
                *os.environ.get("PATH", "").split(os.pathsep)]
        for std in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
            if std not in path:
                path.append(std)
        self.env = dict(os.environ)
        self.env["PATH"] = os.pathsep.join(p for p in dict.fromkeys(path) if p)
        for var in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "NOTIFY_SOCKET"):
            self.env.pop(var, None)
        self.pid: int | None = None
        self._reaper: _Reaper | None = None
        self._cleaned = False
        self._log_level = log_level
        self._config_for: tuple[int, int, int] | None = None
        self._write_config(log_level)

    # -- lifecycle -------------------------------------------------------------------

    def _write_config(self, log_level: str) -> None:
        """The daemon config in the form this containerd reads as is (version 2 on 1.x,
        3 on 2.x: Behaviour.config_version), so that it logs no migration and no
        deprecation; every path it writes is under our dir. Written for the binary
        ``CONTAINERD`` names when it is called (a test may swap daemons: an upgrade)."""
        version = containerd_version(CONTAINERD)
        d, b = self.dir, behaviour(version)
        self._config_for = version
        # Without cri= only the CRI service goes: on 2.x its parts (cri.v1.runtime,
        # .images, the podsandbox controller) are what other plugins load against, and
        # disabling them costs "failed to load plugin" warnings.
        disabled = [*(() if self.cri else ("io.containerd.grpc.v1.cri",)), *b.unused_plugins]
        text = f"""\
version = {b.config_version}
root = "{self.root}"
state = "{self.state}"
temp = "{d}/tmp"
# Not "io.containerd.runtime.v1.linux" (1.x): 1.6's tasks service fails to load without it.
disabled_plugins = [
""" + "".join(f'  "{name}",\n' for name in disabled) + f"""]

[grpc]
  address = "{self.address}"
  tcp_address = ""

[ttrpc]
  address = ""

[debug]
  address = ""
  level = "{log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""
        if b.config_version == 2:  # 2.x's task plugin has no config (its platforms are the host's)
            text += '\n[plugins."io.containerd.runtime.v2.task"]\n  platforms = ["linux/amd64"]\n'
        if self.cri:
            text += self._cri_config(b)
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(text)

    def _cri_config(self, b: Behaviour) -> str:
        """The CRI plugin's section: every directory it writes is under our dir (its
        root and state dirs follow root/state; CNI and pod logs are pointed here). Pods
        are meant to use host networking, for which CRI needs no CNI plugin: the empty
        conf dir only costs an error line in the log ("failed to load cni during
        init"). restrict_oom_score_adj because root here may lack CAP_SYS_RESOURCE,
        which raising a score below ours needs.

        Version 2 (1.x) keeps it all under io.containerd.grpc.v1.cri. Version 3 (2.x):
        images (snapshotter, the pinned sandbox image) under io.containerd.cri.v1.images,
        pods, runtimes and CNI under io.containerd.cri.v1.runtime, the stream server
        still under io.containerd.grpc.v1.cri; each handler names its sandboxer,
        "podsandbox" (a pause container run through the shim's task API)."""
        assert self.cri
        d = self.dir
        for sub in ("cni/conf", "cni/bin", "pods"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        bin_dir = (f'bin_dirs = ["{d}/cni/bin"]' if b.cni_bin_dirs else f'bin_dir = "{d}/cni/bin"')
        server = 'plugins."io.containerd.grpc.v1.cri"'
        if b.config_version == 2:
            rt = f"{server}.containerd"
            text = f"""
[{server}]
  sandbox_image = "{SANDBOX_REF}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{server}.cni]
  {bin_dir}
  conf_dir = "{d}/cni/conf"

[{rt}]
  snapshotter = "overlayfs"
  default_runtime_name = "{next(iter(self.cri))}"
"""
            handler_keys = ""
        else:
            images = 'plugins."io.containerd.cri.v1.images"'
            runtime = 'plugins."io.containerd.cri.v1.runtime"'
            rt = f"{runtime}.containerd"
            text = f"""
[{server}]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[{images}]
  snapshotter = "overlayfs"

[{images}.pinned_images]
  sandbox = "{SANDBOX_REF}"

[{runtime}]
  restrict_oom_score_adj = true
  disable_apparmor = true

[{runtime}.cni]
  {bin_dir}
  conf_dir = "{d}/cni/conf"

[{rt}]
  default_runtime_name = "{next(iter(self.cri))}"
"""
            handler_keys = '  sandboxer = "podsandbox"\n'
        for name, handler in self.cri.items():
            rtype, options = (handler, {}) if isinstance(handler, str) else handler
            text += f'\n[{rt}.runtimes.{_toml_key(name)}]\n'
            text += f'  runtime_type = {_toml_value(rtype)}\n' + handler_keys
            if options:
                text += f'\n[{rt}.runtimes.{_toml_key(name)}.options]\n'
                for key, value in options.items():
                    text += f"  {_toml_key(key)} = {_toml_value(value)}\n"
        return text

    @property
    def running(self) -> bool:
        return self.pid is not None and _alive(self.pid)

    def start(self) -> None:
        """Start the daemon and wait until ``ctr version`` answers (HarnessError if not)."""
        if self._cleaned:
            raise HarnessError("start() after cleanup()")
        if self.running:
            raise HarnessError("containerd already running")
        if self._reaper is None:
            self._reaper = _Reaper(self.dir)
        if containerd_version(CONTAINERD) != self._config_for:
            self._write_config(self._log_level)  # another daemon: its own config form
        with open(self.log_path, "a") as f:
            f.write(f"--- harness: starting containerd at {time.strftime('%H:%M:%S')}\n")
        self.pid = self._reaper.spawn([CONTAINERD, "--config", self.config_path],
                                      self.env, self.log_path)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self.running:
                code = self._reaper.exit_status(self.pid)
                raise HarnessError(f"containerd exited ({code}) during start:\n"
                                   + self.log_text()[-4000:])
            if os.path.exists(self.address):
                res = self.ctr("version", timeout=10)
                if res.returncode == 0 and "Server:" in res.stdout:
                    return
            if time.monotonic() > deadline:
                raise HarnessError(f"containerd not answering after {self.start_timeout}s:\n"
                                   + self.log_text()[-4000:])
            time.sleep(0.02)

    def _wait_exit(self, timeout: float) -> bool:
        """Wait until the daemon pid is reaped; True if it is gone."""
        assert self._reaper is not None and self.pid is not None
        pid, reaper = self.pid, self._reaper
        try:
            wait_for(lambda: reaper.exit_status(pid) is not None, timeout, 0.02)
        except TimeoutError:
            return False
        return True

    def kill9(self) -> None:
        """SIGKILL the daemon and wait until it is reaped. Shims keep running."""
        if self.pid is None or self._reaper is None:
            return
        _kill(self.pid, signal.SIGKILL)
        if not self._wait_exit(10):
            raise HarnessError(f"containerd {self.pid} survived SIGKILL")
        self.pid = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the daemon (SIGKILL after ``timeout``) and wait for it. Shims stay."""
        if self.pid is None or self._reaper is None:
            return
        _kill(self.pid, signal.SIGTERM)
        if not self._wait_exit(timeout):
            self.kill9()
        self.pid = None

    def restart(self) -> None:
        """Stop the daemon if it runs, then start it again on the same root/state/sockets."""
        self.stop()
        self.start()

    def log_text(self) -> str:
        """Everything the daemon (and, through it, its shims) logged so far."""
        raw = _read(self.log_path)
        return raw.decode(errors="replace") if raw else ""

    # -- ctr -------------------------------------------------------------------------

    def ctr(self, *args: str, input: str | None = None, timeout: float = 60,
            check: bool = False, namespace: str | None = None) -> subprocess.CompletedProcess:
        """Run ``ctr --address SOCK -n NAMESPACE *args`` and capture text output.

        ``check=True`` raises HarnessError with ctr's stderr on a non-zero exit.
        subprocess.TimeoutExpired propagates (ctr is killed first).
        """
        argv = [CTR, "--address", self.address, "-n", namespace or self.namespace, *args]
        res = subprocess.run(argv, check=False, input=input, capture_output=True,
                             text=True, timeout=timeout, env=self.env,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} -> {res.returncode}\n"
                               f"stdout: {res.stdout}\nstderr: {res.stderr}")
        return res

    def tasks(self, namespace: str | None = None) -> dict[str, str]:
        """{container id: status} from ``ctr task ls`` (RUNNING, STOPPED, PAUSED, ...)."""
        res = self.ctr("task", "ls", check=True, timeout=30, namespace=namespace)
        out = {}
        for line in res.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                out[fields[0]] = fields[2]
        return out

    def containers(self, namespace: str | None = None) -> list[str]:
        res = self.ctr("containers", "ls", "-q", check=True, timeout=30, namespace=namespace)
        return res.stdout.split()

    def images(self, namespace: str | None = None) -> list[str]:
        res = self.ctr("images", "ls", "-q", check=True, timeout=30, namespace=namespace)
        return res.stdout.split()

    def namespaces(self) -> list[str]:
        return self.ctr("namespaces", "ls", "-q", check=True, timeout=30).stdout.split()

    def import_image(self, tar_path: str, namespace: str | None = None) -> None:
        """``ctr images import`` (unpacks with the default overlayfs snapshotter);
        into ``CRI_NAMESPACE`` for the CRI plugin to see it."""
        self.ctr("images", "import", tar_path, check=True, timeout=120, namespace=namespace)

    # -- cleanup ---------------------------------------------------------------------

    def _bundle_ids(self) -> set[tuple[str, str]]:
        base = os.path.join(self.state, TASK_PLUGIN_DIR)
        out = set()
        for ns in os.listdir(base) if os.path.isdir(base) else ():
            for cid in os.listdir(os.path.join(base, ns)):
                out.add((ns, cid))
        return out

    def _live_shim_ids(self) -> set[tuple[str, str]]:
        """(namespace, id) from the cmdlines of this daemon's live shims."""
        out = set()
        for pid in shim_pids(self):
            argv = cmdline(pid)
            try:
                out.add((argv[argv.index("-namespace") + 1], argv[argv.index("-id") + 1]))
            except (ValueError, IndexError):
                continue
        return out

    def _logged_ids(self) -> set[tuple[str, str]]:
        """(namespace, id) of every shim the log mentions: the shim's own "starting signal
        loop path=<bundle>" and containerd's "cleaning up after shim disconnected id= ns="
        (a dead shim whose bundle containerd already removed, but whose socket it left)."""
        text = self.log_text()
        out = {(ns, cid) for ns, cid in re.findall(
            re.escape(TASK_PLUGIN_DIR) + r"/([^/\s\"]+)/([^/\s\"]+)", text)}
        out |= {(ns, cid) for cid, ns in re.findall(r"\bid=(\S+) namespace=(\S+)", text)}
        return out

    def _socket_path(self, ns: str, group: str) -> str:
        """Where a shim of this daemon listens: sha256(<grpc address>/<ns>/<group id>)."""
        digest = hashlib.sha256(f"{self.address}/{ns}/{group}".encode()).hexdigest()
        return os.path.join(SHIM_SOCKET_DIR, digest)

    def _shim_sockets(self, ids: set[tuple[str, str]]) -> set[str]:
        """Socket paths this daemon's shims listen on or did: each bundle's recorded
        address plus the computed path of every known (namespace, id). The address is in
        the hash, so a computed path can only be ours."""
        socks = {self._socket_path(ns, cid) for ns, cid in ids}
        for ns, cid in self._bundle_ids():
            for name in ("address", "bootstrap.json"):  # 1.x / 2.x (both for a v2 shim)
                addr = bundle_address(os.path.join(self.state, TASK_PLUGIN_DIR, ns, cid), name)
                if addr and addr.startswith("unix://"):
                    socks.add(addr[len("unix://"):])
        return {s for s in socks if s.startswith(SHIM_SOCKET_DIR + "/")}

    def _template_sockets(self) -> set[str]:
        """Socket and lock file of pyshim's warm template(s) below our reaper: a template
        serves one containerd only, and SIGKILLed it cannot remove its socket."""
        if self._reaper is None:
            return set()
        out = set()
        for pid in _descendants(self._reaper.pid):
            argv = cmdline(pid)
            if is_template_argv(argv):
                for path in _unix_socket_paths(pid):
                    if path.startswith(SHIM_SOCKET_DIR + "/pyshim-template-"):
                        out |= {path, path + ".lock"}
        return out

    def _kill_shims(self) -> None:
        """SIGKILL every shim of this daemon, then every non-daemon process under the
        reaper (orphaned container processes), and wait until they are gone."""
        def victims() -> list[int]:
            pids = set(shim_pids(self))
            if self._reaper is not None:
                daemon = self.pid if self.running else None
                for pid in _descendants(self._reaper.pid):
                    # Spare a live daemon and its own children (shim start/delete runs).
                    if daemon is None or (pid != daemon and not _is_descendant(pid, daemon)):
                        pids.add(pid)
            return sorted(pids)

        for _ in range(20):
            pids = victims()
            if not pids:
                return
            for pid in pids:
                _kill(pid)
            try:
                wait_for(lambda ps=pids: not any(_alive(p) for p in ps), 5, 0.02)
            except TimeoutError:
                pass

    def remove_all(self, timeout: float = 20.0) -> None:
        """Kill and delete every task and container in every namespace, keeping images.

        Tasks get SIGKILL through ctr (paused ones are resumed first), then
        ``task rm -f``, then ``containers rm``. If a shim does not cooperate before
        ``timeout``, all shims of this daemon are SIGKILLed and deletion is retried.
        """
        deadline = time.monotonic() + timeout
        for attempt in range(2):
            try:
                self._remove_all_once(deadline)
                return
            except (HarnessError, subprocess.TimeoutExpired, TimeoutError):
                if attempt:
                    raise
                self._kill_shims()
                deadline = time.monotonic() + timeout

    def _remove_all_once(self, deadline: float) -> None:
        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        for ns in self.namespaces():
            tasks = self.tasks(ns)
            for cid, status in tasks.items():
                if status == "PAUSED":
                    self.ctr("task", "resume", cid, namespace=ns, timeout=left())
                if status != "STOPPED":
                    self.ctr("task", "kill", "-a", "-s", "KILL", cid, namespace=ns,
                             timeout=left())
            if tasks:
                try:
                    wait_for(lambda ns=ns: all(s in ("STOPPED", "UNKNOWN")
                                               for s in self.tasks(ns).values()),
                             min(5.0, left()), 0.05)
                except TimeoutError:
                    pass  # task rm -f below kills and waits itself
            for cid in self.tasks(ns):
                self.ctr("task", "rm", "-f", cid, namespace=ns, timeout=left())
            cids = self.containers(ns)
            if cids:
                self.ctr("containers", "rm", *cids, namespace=ns, timeout=left())
            if self.tasks(ns) or self.containers(ns):
                raise HarnessError(f"could not remove tasks/containers in {ns}")

    def cleanup(self) -> None:
        """Remove everything this daemon created, then its temp dir. Idempotent.

        Order: tasks, containers, images (through ctr) -> stop the daemon -> SIGKILL
        shims and orphans -> stop the reaper -> runc state, shim sockets and cgroups of
        known containers -> unmount under the dir (deepest first) -> remove the dir.
        Errors are collected and raised at the end, after every step has run.
        """
        if self._cleaned:
            return
        errors: list[str] = []
        # Ours beyond doubt: a bundle or a live shim. Only these get `runc delete`.
        owned = self._bundle_ids() | self._live_shim_ids()
        if self.running:
            try:
                self.remove_all()
                for ns in self.namespaces():
                    imgs = self.images(ns)
                    if imgs:
                        self.ctr("images", "rm", *imgs, namespace=ns, timeout=60)
            except Exception as e:  # noqa: BLE001 - keep cleaning
                errors.append(f"remove_all: {e}")
        try:
            self.stop()
        except HarnessError as e:
            errors.append(str(e))
        owned |= self._bundle_ids() | self._live_shim_ids()
        known = owned | self._logged_ids()
        sockets = self._shim_sockets(known) | self._template_sockets()
        self._kill_shims()
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
        self.pid = None
        for ns, cid in sorted(owned):
            self._remove_runc_state(ns, cid)
        for sock in sockets:
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass
            except OSError as e:
                errors.append(f"unlink {sock}: {e}")
        for ns in {ns for ns, _ in known}:
            _rmdir_cgroups(ns)
        _remove_fifos({cid for _, cid in known})
        try:
            umount_tree(self.dir)
        except HarnessError as e:
            errors.append(str(e))
        try:
            shutil.rmtree(self.dir)
        except OSError as e:
            errors.append(f"rmtree {self.dir}: {e}")
        self._cleaned = True
        if errors:
            raise HarnessError("cleanup incomplete: " + "; ".join(errors))

    def _remove_runc_state(self, ns: str, cid: str) -> None:
        """Best effort: what a SIGKILLed runc shim leaves (runc state dir, cgroups)."""
        root = os.path.join(RUNC_ROOT, ns)
        if os.path.isdir(os.path.join(root, cid)):
            subprocess.run([RUNC_BINARY, "--root", root, "delete", "--force", cid],
                           check=False, capture_output=True, timeout=30)
            shutil.rmtree(os.path.join(root, cid), ignore_errors=True)
        for hier in cgroup_hierarchies():
            try:
                os.rmdir(os.path.join(hier, ns, cid))
            except OSError:
                pass

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _unix_socket_paths(pid: int) -> list[str]:
    """Paths of the named unix sockets a process holds open (its fds' socket inodes,
    looked up in /proc/net/unix)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    except OSError:
        return []
    paths = []
    with open("/proc/net/unix") as f:
        next(f, None)  # Num RefCount Protocol Flags Type St Inode Path
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith("/"):
                paths.append(fields[7])
    return paths


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: object) -> str:
    """A TOML scalar: bool, int or string (JSON string escapes are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise HarnessError(f"no TOML form for {value!r}")


def _is_descendant(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        st = _stat(pid)
        if st is None or st[1] <= 1:
            return False
        if st[1] == ancestor:
            return True
        pid = st[1]
    return False


def cgroup_hierarchies() -> list[str]:
    try:
        names = os.listdir(CGROUP_ROOT)
    except OSError:
        return []
    return [os.path.join(CGROUP_ROOT, n) for n in names
            if os.path.isdir(os.path.join(CGROUP_ROOT, n)) and not os.path.islink(
                os.path.join(CGROUP_ROOT, n))]


def _rmdir_cgroups(ns: str) -> None:
    """Remove the empty /<ns> cgroup runc leaves in every hierarchy (fails if in use)."""
    for hier in cgroup_hierarchies():
        try:
            os.rmdir(os.path.join(hier, ns))
        except OSError:
            pass


def _remove_fifos(ids: set[str]) -> None:
    """Remove ctr's FIFO dirs (<FIFO_DIR>/<random>/<id>-stdin|stdout|stderr) that hold
    only FIFOs of these container ids: ctr removes them when a task is deleted through
    it, so they are left only by tasks whose daemon died."""
    try:
        dirs = os.listdir(FIFO_DIR)
    except OSError:
        return
    for name in dirs:
        path = os.path.join(FIFO_DIR, name)
        try:
            entries = os.listdir(path)
        except OSError:
            continue
        owned = [e.rpartition("-") for e in entries]
        if entries and all(cid in ids and std in ("stdin", "stdout", "stderr")
                           for cid, _, std in owned):
            shutil.rmtree(path, ignore_errors=True)


# The comparison kit (ctr steps, same_as_runc, events, task calls) lives in its own
# module; its names are harness's too. Last, because it imports the names above.
from harness.scenario import *

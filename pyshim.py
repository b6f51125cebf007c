"""pyshim: a containerd runtime v2 shim written in Python.

containerd runs it as runtime `io.containerd.pyshim.v1` (binary
`containerd-shim-pyshim-v1`). One long-lived shim process per container (or
per group of containers) drives runc, holds the containers' stdio, reaps
their exits and reports events back to containerd over ttrpc.

Public surface:
    main()                      the binary's entry point (start, delete, serve)
    Reaper                      the one owner of waitpid(-1)
    FrameDecoder, encode_frame  the ttrpc frame codec
    TtrpcServer, TtrpcClient    ttrpc over unix sockets on uvloop
    Runc                        one typed method per runc command
    InitProcess, ExecProcess    per-process state machines with behaviour
    Container                   a container's init, execs and runc
    ExitRouter                  the one owner of container exits and their order
    TaskService                 containerd.task.v2.Task and containerd.task.v3.Task
    Publisher                   ordered, retrying event delivery to containerd
    Settings                    pyshim's settings file (a CRI handler's ConfigPath)
    ShimError and subclasses    errors that carry a ttrpc status code

Sections, in dependency order (each under a banner of that name): constants,
errors, C bindings, log, reaper, ttrpc, stdio, runc, processes, cgroups,
settings, task service, events, start / delete, serve, warm template, memory report,
main.
"""

from __future__ import annotations

import os
import struct
import sys
import time

import _reaper

# =============================================================================
# Constants
# =============================================================================

VERSION = "0.1.0"
# The git commit this copy was built from: setup.py's build rewrites this line
# (the Go shim's Revision). A source tree or a build without git says "unknown".
REVISION = "unknown"
# A hash of the sources this copy was built from, which setup.py's build also
# compiles into the native launcher: both name the warm template with it.
BUILD_ID = ""
RUNTIME_NAME = "io.containerd.pyshim.v1"

SOCKET_DIR = "/run/containerd/s"
SOCKET_PATH_LIMIT = 106  # as containerd: sun_path less the NUL and slack
RUNC_ROOT = "/run/containerd/runc"
# runc and criu are looked up here, never on the container's PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
NAMESPACE_KEY = "containerd-namespace-ttrpc"

# ttrpc framing: length u32, stream id u32, type u8, flags u8 (big-endian).
HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20
MSG_REQUEST = 1
MSG_RESPONSE = 2

TASK_SERVICE = "containerd.task.v2.Task"
# containerd 2.x's task API for version-3 shims: the same 17 methods and, in 2.1,
# wire-identical messages (docs/containerd2.md), so one handler table serves both.
TASK_SERVICE_V3 = "containerd.task.v3.Task"
TASK_SERVICES = (TASK_SERVICE, TASK_SERVICE_V3)
# The bootstrap version `start` answers a containerd that accepts it (its
# MAX_SHIM_VERSION): 3 is task API v3 over ttrpc, as containerd-shim-runc-v2 2.x.
SHIM_VERSION = 3
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

# Any type URLs, as containerd's typeurl registry names them.
URL_RUNC_OPTIONS = "containerd.runc.v1.Options"
URL_LINUX_CREATE_OPTIONS = "containerd.linux.runc.CreateOptions"
URL_PROCESS_DETAILS = "containerd.runc.v1.ProcessDetails"
# What containerd's CRI plugin sends for a handler whose runtime_type is not runc's:
# {type_url = 1, config_path = 2, config_body = 3 (newer than 1.6)}. 1.6.20 names it
# "runtimeoptions.v1.Options" (seen on the wire); the "cri." form is accepted too.
URL_CRI_OPTIONS = ("runtimeoptions.v1.Options", "cri.runtimeoptions.v1.Options")
URL_RUNC_CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"
# `-info`'s features: `runc features` JSON under the type URL the Go shim gives it.
URL_RUNTIME_FEATURES = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
URL_LINUX_CHECKPOINT_OPTIONS = "containerd.linux.runc.CheckpointOptions"
EVENT_URL = "containerd.events."

# Delete waits for a process's output to drain while it keeps flowing, and gives up
# once no byte has moved for this long. The Go shim waits 2 s in all, and so drops the
# end of an output its reader is slow to take (a loaded node: tens of kB of a tty's
# last output seen lost); pyshim drops only what nobody is taking.
IO_DRAIN_SECONDS = 2.0
# A logging binary (binary:// stdio) must signal ready within this (the Go
# shim waits without limit), and gets this long to exit after SIGTERM at
# Delete before SIGKILL (as the Go shim's 12 s).
LOGGING_BINARY_READY_SECONDS = 10.0
LOGGING_BINARY_STOP_SECONDS = 12.0
EVENT_QUEUE_MAX = 4096
EXEC_ID_MAX = 76

# errno and signal numbers, taken from the system headers when the C core was
# built (build_reaper.py), never written down as literals.
ENOENT, ESRCH, EEXIST, EINVAL, EBUSY, ECONNREFUSED, EAGAIN = (
    _reaper.lib.ENOENT, _reaper.lib.ESRCH, _reaper.lib.EEXIST, _reaper.lib.EINVAL, _reaper.lib.EBUSY,
    _reaper.lib.ECONNREFUSED, _reaper.lib.EAGAIN)
SIGINT, SIGKILL, SIGPIPE, SIGTERM, SIGXFSZ = (
    _reaper.lib.SIGINT, _reaper.lib.SIGKILL, _reaper.lib.SIGPIPE, _reaper.lib.SIGTERM, _reaper.lib.SIGXFSZ)

# =============================================================================
# Errors: each carries the ttrpc (gRPC) status code it is answered with.
# =============================================================================

OK = 0
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13


class ShimError(Exception):
    """Root of pyshim's errors; `code` is the status code sent to the caller."""

    code = UNKNOWN


class InvalidArgument(ShimError):
    code = INVALID_ARGUMENT


class NotFound(ShimError):
    code = NOT_FOUND


class AlreadyExists(ShimError):
    code = ALREADY_EXISTS


class FailedPrecondition(ShimError):
    code = FAILED_PRECONDITION


class RuntimeFailure(ShimError):
    """runc failed; the message carries runc's own words (code Unknown, as
    the Go shim answers)."""


class RemoteError(ShimError):
    """A ttrpc peer answered with a non-OK status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# =============================================================================
# C bindings: thin wrappers that turn -errno into OSError.
# =============================================================================

_lib = _reaper.lib
_ffi = _reaper.ffi


def _check(rc: int, what: str = "") -> int:
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc) + (f": {what}" if what else ""))
    return rc


def set_subreaper() -> None:
    _check(_lib.reaper_set_subreaper())


def unix_listen(name: str, backlog: int = 64) -> int:
    """Listening socket fd for a path or an abstract ('@name') address."""
    b = name.encode()
    return _check(_lib.reaper_unix_listen(b, len(b), backlog), name)


def unix_connect(name: str, nonblock: bool = False) -> int:
    b = name.encode()
    return _check(_lib.reaper_unix_connect(b, len(b), 1 if nonblock else 0), name)


def peer_cred(fd: int) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected unix socket."""
    out = _ffi.new("int[3]")
    _check(_lib.reaper_peer_cred(fd, out))
    return out[0], out[1], out[2]


def send_fd(sock: int, fd: int, data: bytes = b"") -> int:
    return _check(_lib.reaper_send_fd(sock, fd, data, len(data)))


def recv_fd(sock: int, size: int = 256) -> tuple[bytes, int]:
    """(data, fd) from one message; fd is -1 when none was attached."""
    buf = _ffi.new("char[]", size)
    fdp = _ffi.new("int *")
    n = _check(_lib.reaper_recv_fd(sock, buf, size, fdp))
    return _ffi.buffer(buf, n)[:], fdp[0]


def malloc_trim() -> None:
    _lib.reaper_malloc_trim(0)


_ZERO_SKIP = (b"[stack]", b"[vdso]", b"[vvar]", b"[vvar_vclock]", b"[vsyscall]")


def release_zero_pages() -> int:
    """Gives back the pages of this process's anonymous private mappings that
    hold nothing but zeros and are its alone (see reaper_release_zero_pages):
    memory that was touched but never written (uvloop's 256 kB read buffer,
    zeroed allocations, malloc growth) costs a private page each until then.
    Returns the number of pages given back; 0, doing nothing, when this
    process has more than one thread (the check and the madvise must not race
    a writer) or no pagemap to read."""
    try:
        if len(os.listdir("/proc/self/task")) != 1:
            return 0
        with open("/proc/self/maps", "rb") as f:
            maps = f.read()
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    released = 0
    try:
        for line in maps.splitlines():
            fields = line.split(None, 5)
            if len(fields) < 5 or fields[1] != b"rw-p" or fields[4] != b"0":
                continue
            name = fields[5].strip() if len(fields) == 6 else b""
            if name in _ZERO_SKIP or name.startswith(b"/"):
                continue
            lo, _, hi = fields[0].partition(b"-")
            start = int(lo, 16)
            n = _lib.reaper_release_zero_pages(pagemap, start, int(hi, 16) - start)
            if n > 0:
                released += n
    finally:
        os.close(pagemap)
    return released


# KSM (kernel samepage merging): pages of mappings marked MADV_MERGEABLE that are
# identical to other marked pages are merged by the host's ksmd, if it runs.
KSM_ENV = "PYSHIM_KSM"  # "auto" or "off": overrides the settings file's `ksm`
KSM_RUN = "/sys/kernel/mm/ksm/run"  # 1: ksmd merges; read only, pyshim never writes it
KSM_RESCAN_SECONDS = 30.0  # after activity, a shim marks the mappings it made since
FIRST_RELEASE_SECONDS = 0.3  # after a shim's start: its zero pages given back, past Create and Start
# Memory upkeep gives way to a node whose CPUs are all taken (a burst of starts):
# looked at again every BUSY_RETRY_SECONDS, done regardless after BUSY_WAIT_MAX_SECONDS.
BUSY_RETRY_SECONDS = 0.3
BUSY_WAIT_MAX_SECONDS = 5.0
LOADAVG = "/proc/loadavg"
KSM_MODES = ("auto", "off")
_KSM_SKIP = (b"[vdso]", b"[vvar]", b"[vvar_vclock]", b"[vsyscall]")


def ksm_host_on(path: str = KSM_RUN) -> bool:
    """Whether the host's ksmd is merging (run = 1)."""
    try:
        return _read_small(path).strip() == b"1"
    except OSError:
        return False


def ksm_mode(settings: Settings | None) -> str:
    """"auto" or "off": $PYSHIM_KSM when it says one of them, else the settings
    file's `ksm`, else auto."""
    env = os.environ.get(KSM_ENV, "")
    if env in KSM_MODES:
        return env
    return settings.ksm if settings is not None else "auto"


def cpus_saturated(path: str = LOADAVG) -> bool:
    """Whether more tasks are runnable on this node right now than it has CPUs
    (the caller among them): /proc/loadavg's "RUNNABLE/TOTAL" field, an
    instant count, not an average. False when it cannot be read."""
    try:
        runnable = int(_read_small(path, 256).split()[3].partition(b"/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return runnable > (os.cpu_count() or 1)


def when_cpus_free(loop, fn, deadline: float) -> None:
    """Calls fn() now, unless the node's CPUs are all taken and the monotonic
    `deadline` is still ahead: then looks again BUSY_RETRY_SECONDS later. What
    fn does (walking the page map, malloc_trim) is then done after a burst of
    container starts instead of taking CPU from it."""
    if cpus_saturated() and time.monotonic() < deadline:
        loop.call_later(BUSY_RETRY_SECONDS, when_cpus_free, loop, fn, deadline)
    else:
        fn()


class Housekeeping:
    """A shim's memory upkeep: malloc_trim and the all-zero pages given back
    (`trim`), and with KSM on, the mappings made since marked mergeable
    (`ksm`), `delay` seconds after activity (a request answered, a child
    reaped), not on a clock: an idle shim then never wakes, and writes none
    of the pages ksmd has merged (each write would copy one back out), nor
    spends CPU. Only after the activity has ended is there anything new to
    give back or to mark, so one round after the last of it is enough. A
    round due while the node's CPUs are all taken waits for them (at most
    BUSY_WAIT_MAX_SECONDS, when_cpus_free)."""

    __slots__ = ("armed", "delay", "ksm", "loop", "trim")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.delay = MEMORY_RELEASE_SECONDS
        self.trim = False
        self.ksm = False
        self.armed = False

    def poke(self) -> None:
        """Something happened: a round is due `delay` seconds from now, unless one is already."""
        if not self.armed and (self.trim or self.ksm):
            self.armed = True
            self.loop.call_later(self.delay, self.due)

    def due(self) -> None:
        when_cpus_free(self.loop, self.run, time.monotonic() + BUSY_WAIT_MAX_SECONDS)

    def run(self) -> None:
        self.armed = False
        if self.trim:
            malloc_trim()
            release_zero_pages()
        if self.ksm:
            ksm_advise(True)


def ksm_advise(mergeable: bool) -> int:
    """MADV_MERGEABLE (or MADV_UNMERGEABLE) on every private writable mapping
    of this process: anonymous ones and the copied-on-write pages of private
    file mappings (.data); returns how many mappings took it.

    madvise rather than PR_SET_MEMORY_MERGE: the prctl's flag lives on the mm
    and survives exec on current kernels, and posix_spawn's child shares our
    mm until its exec, so there is no moment to clear it for runc alone. A
    mapping's VM_MERGEABLE is gone at exec. Mappings made later (malloc
    growth) need another call: the shim's Housekeeping repeats it after activity.
    """
    advice = _lib.MADV_MERGEABLE if mergeable else _lib.MADV_UNMERGEABLE
    with open("/proc/self/maps", "rb") as f:
        maps = f.read()
    done = 0
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5 or fields[1][1:2] != b"w" or fields[1][3:4] != b"p":
            continue
        if len(fields) == 6 and fields[5].strip() in _KSM_SKIP:
            continue
        lo, _, hi = fields[0].partition(b"-")
        start = int(lo, 16)
        if _lib.reaper_madvise(start, int(hi, 16) - start, advice) == 0:
            done += 1
    return done


# Mount options understood as flags (set, clear); others go to the data string.
_MS = _lib
MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "async": (0, _MS.MS_SYNCHRONOUS),
    "atime": (0, _MS.MS_NOATIME),
    "bind": (_MS.MS_BIND, 0),
    "defaults": (0, 0),
    "dev": (0, _MS.MS_NODEV),
    "diratime": (0, _MS.MS_NODIRATIME),
    "dirsync": (_MS.MS_DIRSYNC, 0),
    "exec": (0, _MS.MS_NOEXEC),
    "mand": (_MS.MS_MANDLOCK, 0),
    "noatime": (_MS.MS_NOATIME, 0),
    "nodev": (_MS.MS_NODEV, 0),
    "nodiratime": (_MS.MS_NODIRATIME, 0),
    "noexec": (_MS.MS_NOEXEC, 0),
    "nomand": (0, _MS.MS_MANDLOCK),
    "norelatime": (0, _MS.MS_RELATIME),
    "nostrictatime": (0, _MS.MS_STRICTATIME),
    "nosuid": (_MS.MS_NOSUID, 0),
    "rbind": (_MS.MS_BIND | _MS.MS_REC, 0),
    "relatime": (_MS.MS_RELATIME, 0),
    "remount": (_MS.MS_REMOUNT, 0),
    "ro": (_MS.MS_RDONLY, 0),
    "rw": (0, _MS.MS_RDONLY),
    "strictatime": (_MS.MS_STRICTATIME, 0),
    "suid": (0, _MS.MS_NOSUID),
    "sync": (_MS.MS_SYNCHRONOUS, 0),
}
PROPAGATION_FLAGS: dict[str, int] = {
    "private": _MS.MS_PRIVATE,
    "rprivate": _MS.MS_PRIVATE | _MS.MS_REC,
    "shared": _MS.MS_SHARED,
    "rshared": _MS.MS_SHARED | _MS.MS_REC,
    "slave": _MS.MS_SLAVE,
    "rslave": _MS.MS_SLAVE | _MS.MS_REC,
    "unbindable": _MS.MS_UNBINDABLE,
    "runbindable": _MS.MS_UNBINDABLE | _MS.MS_REC,
}


def parse_mount_options(options: list[str]) -> tuple[int, int, str]:
    """(flags, propagation flags, data) for a list of mount options."""
    flags = 0
    propagation = 0
    data = []
    for opt in options:
        if opt in MOUNT_FLAGS:
            set_, clear = MOUNT_FLAGS[opt]
            flags = (flags | set_) & ~clear
        elif opt in PROPAGATION_FLAGS:
            propagation |= PROPAGATION_FLAGS[opt]
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def mount(typ: str, source: str, target: str, options: list[str]) -> None:
    """Mounts one containerd Mount on `target`, as mount(8) would."""
    flags, propagation, data = parse_mount_options(options)
    if typ == "bind":
        flags |= _MS.MS_BIND
    fstype = b"" if flags & _MS.MS_BIND else typ.encode()
    src, tgt = source.encode(), target.encode()
    if len(data) >= 4096:
        raise InvalidArgument(f"mount options of {target} exceed one page ({len(data)} bytes)")
    _check(_lib.reaper_mount(src, tgt, fstype, flags & ~_MS.MS_RDONLY if flags & _MS.MS_BIND else flags,
                             data.encode() or _ffi.NULL), f"mount {typ} {source} on {target}")
    if flags & _MS.MS_BIND and flags & (_MS.MS_RDONLY | _MS.MS_NOSUID | _MS.MS_NODEV | _MS.MS_NOEXEC):
        # A bind mount takes its flags only on a remount.
        _check(_lib.reaper_mount(_ffi.NULL, tgt, _ffi.NULL, flags | _MS.MS_REMOUNT, _ffi.NULL),
               f"remount {target}")
    if propagation:
        _check(_lib.reaper_mount(_ffi.NULL, tgt, _ffi.NULL, propagation, _ffi.NULL),
               f"propagation of {target}")


def unmount_all(target: str) -> None:
    """Unmounts every mount stacked on `target`; a busy one is detached."""
    tgt = target.encode()
    for _ in range(64):
        rc = _lib.reaper_umount(tgt, 0)
        if rc == 0:
            continue
        err = -rc
        if err in (EINVAL, ENOENT):  # not a mount point (any more), or gone
            return
        if err == EBUSY:
            _check(_lib.reaper_umount(tgt, _MS.MNT_DETACH), f"unmount {target}")
            continue
        raise OSError(err, f"{os.strerror(err)}: unmount {target}")


# =============================================================================
# Log: logrus text format, to the bundle's `log` fifo (our stderr).
# =============================================================================

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _quote(v: object) -> str:
    s = str(v)
    if s and all(c.isalnum() or c in "-_./:@" for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogrusLog:
    """A logrus-style line logger that never blocks and never raises.

    Writes go to a non-blocking fd: when the reader (containerd) is away and
    the fifo is full, a line is dropped rather than stalling the shim.
    """

    __slots__ = ("fd", "fields", "lead", "level")

    def __init__(self, fd: int = 2, level: str = "info") -> None:
        self.fd = fd
        self.level = _LEVELS[level]
        self.lead = ""  # right after msg: the shim's " pid=N", as the Go shim's lines carry it
        self.fields = ""  # at the end of every line: namespace and runtime

    def __call__(self, level: str, msg: str, **kv: object) -> None:
        if _LEVELS[level] < self.level:
            return
        ns = time.time_ns()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
        line = f'time="{stamp}.{ns % 1_000_000_000:09d}Z" level={level} msg={_quote(msg)}{self.lead}'
        for k, v in kv.items():
            line += f" {k}={_quote(v)}"
        try:
            os.write(self.fd, (line + self.fields + "\n").encode(errors="replace"))
        except OSError:
            pass


log = LogrusLog()


def _atomic_write(directory: str, name: str, data: bytes, mode: int = 0o644) -> None:
    """Writes directory/name through a temp file and rename, following no
    symlink: a link planted in the bundle is replaced, never written through."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException as e:
            # ENOSPC and friends: no half-written temp file is left behind, and
            # the error names the file (os.write's does not).
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror, os.path.join(directory, name)) from None
            raise
    finally:
        os.close(dfd)


def _read_small(path: str, limit: int = 1 << 20) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def which(name: str, path: str | None = None) -> str:
    """Absolute path of an executable, searched on the shim's own PATH."""
    if "/" in name:
        if os.access(name, os.X_OK):
            return os.path.abspath(name)
        raise FileNotFoundError(2, f'exec: "{name}": no such file or directory')
    for d in (path or os.environ.get("PATH") or DEFAULT_PATH).split(":"):
        p = os.path.join(d or ".", name)
        if os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    raise FileNotFoundError(2, f'exec: "{name}": executable file not found in $PATH')


# =============================================================================
# Reaper: the one owner of waitpid(-1).
# =============================================================================

_SPAWN_SIGDEF = (SIGPIPE, SIGXFSZ)  # Python ignores them; children must not


def spawn(argv: list[str], fds: tuple[int, int, int], env: dict[str, str] | None = None,
          setpgroup: bool = False, extra: tuple[tuple[int, int], ...] = (),
          setsid: bool = False) -> int:
    """posix_spawn(argv) with stdio dup'd from `fds` (and `extra` (fd, target)
    pairs); returns the pid. The caller must register the pid with the reaper
    before it yields to the event loop."""
    actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(fds)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in extra]
    kw = {"setsid": True} if setsid else {"setpgroup": 0} if setpgroup else {}
    return os.posix_spawn(argv[0], argv, _ENVIRON if env is None else env,
                          file_actions=actions, setsigdef=_SPAWN_SIGDEF, **kw)


# The environment a child inherits, for posix_spawn, which converts every key
# and value of the mapping it is given: os.environ's own dict of bytes (kept in
# step with it, and what putenv was given) skips os.environ's decoding and
# encoding of each in Python, 0.07 ms of a spawn with 40 variables.
_ENVIRON = getattr(os.environ, "_data", os.environ)


class Reaper:
    """Reaps every child of the shim and routes each exit.

    SIGCHLD arrives as a byte on a pipe made in C, watched by the loop. An
    exit whose pid was registered with `watch` resolves that future (runc
    commands); every other exit goes to `on_exit` (container processes).
    Other signals the shim handles come down the same pipe (`catch`).
    Loop thread only.
    """

    __slots__ = ("_codes", "_pids", "_waiters", "fd", "handlers", "loop", "on_exit")

    BATCH = 64

    def __init__(self, loop, on_exit) -> None:
        self.loop = loop
        self.on_exit = on_exit
        self._waiters: dict[int, object] = {}
        self._pids = _ffi.new("int[]", self.BATCH)
        self._codes = _ffi.new("int[]", self.BATCH)
        self.handlers: dict[int, object] = {}
        self.fd = _check(_lib.reaper_sigchld_fd())
        loop.add_reader(self.fd, self.reap)

    def catch(self, signo: int, handler) -> None:
        """Calls handler() on the loop whenever `signo` arrives."""
        _check(_lib.reaper_catch_signal(signo))
        self.handlers[signo] = handler

    def watch(self, pid: int):
        """A future resolved with the exit code of `pid` (a child we spawned)."""
        fut = self.loop.create_future()
        self._waiters[pid] = fut
        return fut

    def reap(self) -> None:
        try:
            while os.read(self.fd, 256):
                pass
        except BlockingIOError:
            pass
        while True:
            n = _lib.reaper_reap(self._pids, self._codes, self.BATCH)
            if n < 0:
                log("error", "waitpid failed", error=os.strerror(-n))
                break
            for i in range(n):
                pid, code = self._pids[i], self._codes[i]
                fut = self._waiters.pop(pid, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(code)
                else:
                    try:
                        self.on_exit(pid, code)
                    except Exception as e:  # noqa: BLE001 - one bad exit never stops reaping
                        log("error", "exit handler failed", process_pid=pid, error=repr(e))
            if n < self.BATCH:
                break
        caught = _lib.reaper_caught_signals() if self.handlers else 0
        for signo, handler in self.handlers.items():
            if caught >> signo & 1:
                try:
                    handler()
                except Exception as e:  # noqa: BLE001 - a failed handler never stops reaping
                    log("error", "signal handler failed", signal=signo, error=repr(e))


# =============================================================================
# ttrpc: frame codec, server and client.
# =============================================================================


def encode_frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


class FrameDecoder:
    """Incremental ttrpc frame decoder with bounded memory.

    `feed` returns complete frames as (stream_id, type, flags, payload); a
    frame whose length exceeds MAX_MESSAGE is discarded as it arrives and
    returned once with its announced length (an int) as payload, so the
    caller can answer RESOURCE_EXHAUSTED on that stream, naming the length
    as Go's ttrpc does, and keep the connection.
    """

    __slots__ = ("_buf", "_skip", "_skip_frame")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._skip_frame: tuple[int, int, int, int] | None = None

    def feed(self, data: bytes) -> list[tuple[int, int, int, bytes | int]]:
        out = []
        buf = self._buf
        buf += data
        while True:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return out
                self._skip_frame, frame = None, self._skip_frame
                out.append(frame)
            if len(buf) < HEADER.size:
                return out
            length, sid, mtype, flags = HEADER.unpack_from(buf)
            if length > MAX_MESSAGE:
                del buf[:HEADER.size]
                self._skip = length
                self._skip_frame = (sid, mtype, flags, length)
                continue
            end = HEADER.size + length
            if len(buf) < end:
                return out
            out.append((sid, mtype, flags, bytes(buf[HEADER.size:end])))
            del buf[:end]

    @property
    def oversized_length(self) -> int:
        """Announced length of the frame being discarded (0 if none)."""
        return self._skip_frame[3] if self._skip_frame else 0


def status_response(code: int, message: str, payload: bytes = b"") -> bytes:
    import pyshim_pb2 as pb

    resp = pb.Response(payload=payload)
    if code:
        resp.status.code = code
        resp.status.message = message
    return resp.SerializeToString()


# The text containerd's errdefs put after a message of these codes: the Go shim's
# errors wrap errdefs' sentinels, so their message ends with it ("process does not
# exist x: not found"). containerd 1.x strips and re-adds it; 2.x's ctr shows the
# message as it is, so pyshim's must end the same way.
ERRDEFS_SUFFIX = {NOT_FOUND: "not found", ALREADY_EXISTS: "already exists",
                  INVALID_ARGUMENT: "invalid argument", FAILED_PRECONDITION: "failed precondition"}


def _error_status(e: BaseException) -> tuple[int, str]:
    """The one place where an exception becomes a ttrpc status."""
    if isinstance(e, (ShimError, OSError)):
        if isinstance(e, ShimError):
            code = e.code
        else:
            code = {ESRCH: NOT_FOUND, ENOENT: NOT_FOUND, EEXIST: ALREADY_EXISTS,
                    EINVAL: INVALID_ARGUMENT}.get(e.errno or 0, UNKNOWN)
        msg = str(e)
        suffix = ERRDEFS_SUFFIX.get(code)
        if suffix and not msg.endswith(": " + suffix):
            msg = f"{msg}: {suffix}"
        return code, msg
    log("error", "internal error", error=repr(e))
    return INTERNAL, f"internal error: {e!r}"


class TtrpcServer:
    """Serves registered ttrpc methods on listening unix sockets.

    `services` maps (service, method) to (request class, coroutine function).
    Only peers with the shim's own euid and egid are served (SO_PEERCRED),
    as the Go shim's ttrpc server requires.
    """

    __slots__ = ("after_request", "conns", "gid", "loop", "methods", "servers", "uid")

    def __init__(self, loop, methods: dict) -> None:
        self.loop = loop
        self.methods = methods
        self.after_request = None  # called once each request is answered
        self.servers: list = []
        self.conns: set = set()
        self.uid = os.geteuid()
        self.gid = os.getegid()

    async def serve_fd(self, fd: int) -> None:
        import socket

        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        srv = await self.loop.create_unix_server(lambda: ServerConnection(self), sock=sock)
        self.servers.append(srv)

    def stop_listening(self) -> None:
        """No new connections; the open ones are still served (idempotent)."""
        for srv in self.servers:
            srv.close()

    async def shutdown(self, deadline: float = 2.0) -> None:
        """Closes the listeners, then waits for in-flight requests to be answered."""
        self.stop_listening()
        end = self.loop.time() + deadline
        while any(c.inflight for c in self.conns) and self.loop.time() < end:
            await _sleep(0.01)
        for c in list(self.conns):
            c.close()


async def _sleep(t: float) -> None:
    import asyncio

    await asyncio.sleep(t)


class ServerConnection:
    """One ttrpc connection: a reader that decodes frames and one task per request."""

    __slots__ = ("closed", "decoder", "inflight", "last_sid", "server", "transport")

    def __init__(self, server: TtrpcServer) -> None:
        self.server = server
        self.transport = None
        self.decoder = FrameDecoder()
        self.last_sid = 0
        self.inflight = 0
        self.closed = False

    # asyncio protocol callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = peer_cred(sock.fileno())
        except OSError as e:
            log("warning", "refusing connection: no peer credentials", error=str(e))
            transport.close()
            self.closed = True
            return
        if uid != self.server.uid or gid != self.server.gid:
            log("warning", "refusing connection from another user", peer_pid=pid, peer_uid=uid,
                peer_gid=gid)
            transport.close()
            self.closed = True
            return
        self.server.conns.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.conns.discard(self)

    def eof_received(self):
        return False

    # A peer that sends requests but does not read the answers is not read
    # from either, so the answers waiting for it stay bounded (the Go server
    # stops reading, too, when its writer blocks).
    def pause_writing(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        for sid, mtype, _flags, payload in self.decoder.feed(data):
            self._frame(sid, mtype, payload)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _send(self, sid: int, body: bytes) -> None:
        if not self.closed and not self.transport.is_closing():
            self.transport.write(encode_frame(sid, MSG_RESPONSE, body))

    def _frame(self, sid: int, mtype: int, payload: bytes | int) -> None:
        if mtype != MSG_REQUEST:
            return  # no streams on the task API: data frames are ignored
        if isinstance(payload, int):  # discarded: too long (Go ttrpc's words)
            self._send(sid, status_response(
                RESOURCE_EXHAUSTED,
                f"message length {payload} exceed maximum message size of {MAX_MESSAGE}"))
            return
        if sid % 2 != 1:
            self._send(sid, status_response(
                INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"))
            return
        if sid <= self.last_sid:
            self._send(sid, status_response(
                INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"))
            return
        self.last_sid = sid
        import pyshim_pb2 as pb

        req = pb.Request()
        try:
            req.ParseFromString(payload)
        except Exception as e:  # noqa: BLE001 - any parse failure is the peer's bad input
            self._send(sid, status_response(INVALID_ARGUMENT, f"unmarshal request error: {e}"))
            return
        self.inflight += 1
        self.server.loop.create_task(self._dispatch(sid, req))

    async def _dispatch(self, sid: int, req) -> None:
        try:
            entry = self.server.methods.get((req.service, req.method))
            if entry is None:
                if any(s == req.service for s, _ in self.server.methods):
                    body = status_response(UNIMPLEMENTED, f"{req.service}.{req.method} not implemented")
                else:
                    body = status_response(UNIMPLEMENTED, f"service {req.service}")
            else:
                body = await self._call(entry, req)
            self._send(sid, body)
        finally:
            self.inflight -= 1
            if self.server.after_request is not None:
                self.server.after_request()

    async def _call(self, entry, req) -> bytes:
        import asyncio

        cls, fn = entry
        msg = cls()
        try:
            msg.ParseFromString(req.payload)
        except Exception as e:  # noqa: BLE001 - any parse failure is the peer's bad input
            return status_response(INVALID_ARGUMENT, f"unmarshal {cls.__name__}: {e}")
        meta = {kv.key: kv.value for kv in req.metadata}
        # The handler runs to completion even past the caller's deadline, so
        # that a half-done runc command never leaves the task inconsistent.
        task = asyncio.ensure_future(fn(msg, meta))
        try:
            if req.timeout_nano > 0:
                resp = await asyncio.wait_for(asyncio.shield(task), req.timeout_nano / 1e9)
            else:
                resp = await task
            body = resp.SerializeToString()
        except TimeoutError:
            # The handler goes on; whatever it ends with is logged, not lost.
            task.add_done_callback(lambda t, m=req.method: _late_outcome(m, t))
            return status_response(DEADLINE_EXCEEDED, f"{req.method}: deadline exceeded")
        except Exception as e:  # noqa: BLE001 - every failure becomes a status, never a dead connection
            code, message = _error_status(e)
            return status_response(code, message)
        return status_response(OK, "", body)


def _late_outcome(method: str, task) -> None:
    """Done callback of a handler that outlived its caller's deadline."""
    if task.cancelled():
        return
    e = task.exception()
    if e is None:
        log("info", "request finished after its deadline", method=method)
    else:
        log("info", "request failed after its deadline", method=method, error=str(e) or repr(e))


class TtrpcClient:
    """A ttrpc client over a unix socket (events to containerd, and tests).

    Calls are multiplexed on odd, increasing stream ids. `call` raises
    RemoteError for a non-OK status and ConnectionError when the connection
    is gone.
    """

    __slots__ = ("closed", "decoder", "loop", "next_sid", "pending", "transport")

    def __init__(self, loop) -> None:
        self.loop = loop
        self.transport = None
        self.decoder = FrameDecoder()
        self.next_sid = 1
        self.pending: dict[int, object] = {}
        self.closed = False

    @classmethod
    async def connect(cls, address: str, loop=None) -> TtrpcClient:
        import asyncio
        import socket

        loop = loop or asyncio.get_running_loop()
        address = address.removeprefix("unix://")
        # Non-blocking: a containerd whose backlog is full is EAGAIN (retried
        # by the caller), not a stalled event loop.
        sock = socket.socket(fileno=unix_connect(address, nonblock=True))
        sock.setblocking(False)  # the socket object's own mode, for the loop
        self = cls(loop)
        await loop.create_unix_connection(lambda: _ClientProtocol(self), sock=sock)
        return self

    async def call(self, service: str, method: str, payload: bytes,
                   metadata: dict[str, str] | None = None, timeout: float = 0) -> bytes:
        import pyshim_pb2 as pb

        if self.closed:
            raise ConnectionError("ttrpc: closed")
        sid = self.next_sid
        self.next_sid += 2
        req = pb.Request(service=service, method=method, payload=payload,
                         timeout_nano=int(timeout * 1e9))
        for k, v in (metadata or {}).items():
            req.metadata.add(key=k, value=v)
        fut = self.loop.create_future()
        self.pending[sid] = fut
        self.transport.write(encode_frame(sid, MSG_REQUEST, req.SerializeToString()))
        try:
            if timeout > 0:
                # Enforced here too: a peer that never answers cannot stall us.
                import asyncio

                body = await asyncio.wait_for(fut, timeout)
            else:
                body = await fut
        finally:
            self.pending.pop(sid, None)
        resp = pb.Response()
        resp.ParseFromString(body)
        if resp.status.code:
            raise RemoteError(resp.status.code, resp.status.message)
        return resp.payload

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _lost(self) -> None:
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("ttrpc: connection closed"))
        self.pending.clear()


class _ClientProtocol:
    __slots__ = ("client",)

    def __init__(self, client: TtrpcClient) -> None:
        self.client = client

    def connection_made(self, transport) -> None:
        self.client.transport = transport

    def data_received(self, data: bytes) -> None:
        c = self.client
        for sid, mtype, _flags, payload in c.decoder.feed(data):
            fut = c.pending.get(sid)
            if fut is None or fut.done() or mtype != MSG_RESPONSE:
                continue
            if isinstance(payload, int):  # discarded: too long
                fut.set_exception(RemoteError(
                    RESOURCE_EXHAUSTED,
                    f"response length {payload} exceeds maximum message size of {MAX_MESSAGE}"))
            else:
                fut.set_result(payload)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.client._lost()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


# =============================================================================
# Stdio: pipes to the container, copied to and from containerd's fifos.
# =============================================================================

_SPLICE_CHUNK = 1 << 16


def _open_fifo_pair(path: str, write: bool) -> tuple[int, int]:
    """Opens a fifo both ways, non-blocking, returning (used fd, keep-alive fd).

    For output (`write`), the shim writes and also holds a read end, so a
    vanished reader never turns a write into EPIPE: output waits in the
    fifo until a reader returns. For stdin, the shim reads and holds a write
    end, so a client that disconnects does not end the container's stdin;
    CloseIO drops that write end.
    """
    flags = os.O_NONBLOCK | os.O_CLOEXEC
    rd = os.open(path, os.O_RDONLY | flags)
    try:
        wr = os.open(path, os.O_WRONLY | flags)
    except BaseException:
        os.close(rd)
        raise
    return (wr, rd) if write else (rd, wr)


class Copier:
    """Moves bytes from one pipe to another with splice(2), on the loop.

    Nothing is buffered in the shim: when the destination is full the data
    stays in the source pipe and the writer blocks, so no output is lost and
    memory stays flat. At the source's EOF the destination is closed (unless
    `keep_dst`) and `done` resolves. Loop thread only.
    """

    __slots__ = ("_pending", "_started", "_waiting_dst", "done", "dst", "loop", "moved", "on_close",
                 "splice", "src")

    def __init__(self, loop, src: int, dst: int, on_close=None, splice: bool = True) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.on_close = on_close
        self.done = loop.create_future()
        self._waiting_dst = False
        self._started = False
        # A pty is no pipe: splice(2) cannot be counted on for it, so a copy
        # to or from a terminal reads and writes through one small buffer.
        self.splice = splice
        self._pending = b""
        self.moved = 0  # bytes copied so far: Delete's drain waits while this grows

    def start(self) -> None:
        if not self._started and self.src >= 0:
            self._started = True
            self.loop.add_reader(self.src, self._readable)

    def _readable(self) -> None:
        if not self.splice:
            self._read_write()
            return
        moved = 0
        while True:
            try:
                n = os.splice(self.src, self.dst, _SPLICE_CHUNK, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if moved == 0:
                    # The source is readable, so it is the destination that is
                    # full: wait for it instead of spinning on the source.
                    self.loop.remove_reader(self.src)
                    self.loop.add_writer(self.dst, self._writable)
                    self._waiting_dst = True
                return
            except OSError as e:
                # EPIPE: nobody reads the destination (a container that closed
                # its stdin). Drop what is pending and finish.
                log("debug", "copy ended", error=str(e))
                self.close()
                return
            if n == 0:
                self.close()
                return
            moved += n
            self.moved += n

    def _writable(self) -> None:
        self.loop.remove_writer(self.dst)
        self._waiting_dst = False
        if self._pending and not self._flush():
            return
        self.loop.add_reader(self.src, self._readable)

    def _read_write(self) -> None:
        try:
            data = os.read(self.src, _SPLICE_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the terminal's other side has closed
        if not data:
            self.close()
            return
        self._pending = data
        self._flush()

    def _flush(self) -> bool:
        """Writes what is pending; False (and waiting for the destination) if
        it could not all be written now."""
        while self._pending:
            try:
                n = os.write(self.dst, self._pending)
            except BlockingIOError:
                self.loop.remove_reader(self.src)
                self.loop.add_writer(self.dst, self._writable)
                self._waiting_dst = True
                return False
            except OSError as e:
                log("debug", "copy ended", error=str(e))
                self.close()
                return False
            self._pending = self._pending[n:]
            self.moved += n
        return True

    def close(self) -> None:
        """Stops copying and closes both ends (idempotent)."""
        if self.src < 0:
            return
        if self._waiting_dst:
            self.loop.remove_writer(self.dst)
        elif self._started:
            self.loop.remove_reader(self.src)
        os.close(self.src)
        self.src = -1
        if self.moved:  # what reached the destination: where did an output's end go?
            log("debug", "copy closed", bytes=self.moved, unsent=len(self._pending))
        if self.on_close is not None:
            self.on_close(self.dst)
        else:
            os.close(self.dst)
        if not self.done.done():
            self.done.set_result(None)


class Stdio:
    """The stdio of one container process.

    For each of stdin/stdout/stderr that containerd named a fifo for, a pipe
    is made: the container gets one end (`child_fds`, handed to runc), the
    shim copies the other to or from the fifo. Loop thread only.
    """

    __slots__ = (
        "_fifo_fds",
        "_refs",
        "child_fds",
        "console_dir",
        "console_sock",
        "copiers",
        "log_pipe",
        "logging_binary",
        "loop",
        "master",
        "stderr",
        "stdin",
        "stdin_keep",
        "stdout",
        "terminal",
    )

    def __init__(self, loop, stdin: str, stdout: str, stderr: str, terminal: bool = False) -> None:
        self.loop = loop
        self.stdin, self.stdout, self.stderr, self.terminal = stdin, stdout, stderr, terminal
        self.child_fds: list[int] = []
        self.copiers: list[Copier] = []
        self.stdin_keep = -1
        self._fifo_fds: dict[str, tuple[int, int]] = {}
        self._refs: dict[int, str] = {}  # a copy's write end -> the output it is a dup of
        self.master = -1  # the pty master, with a terminal
        self.console_sock = -1
        self.console_dir = ""
        self.logging_binary: LoggingBinary | None = None  # with a binary:// stdout
        self.log_pipe = -1  # with a terminal and a logger: the write end its fd 3 reads

    def open(self, uid: int = 0, gid: int = 0) -> tuple[int, int, int]:
        """Makes the pipes and opens the fifos; returns the fds runc gets."""
        try:
            return self._open(uid, gid)
        except BaseException:
            self.close()
            raise

    def _open(self, uid: int, gid: int) -> tuple[int, int, int]:
        binary = self.stdout.startswith("binary://")
        if self.stderr.startswith("binary://") and not binary:
            raise InvalidArgument(f"stdio URI {self.stderr!r}: a logging binary must be named by stdout")
        if self.terminal:
            if binary:
                self._open_log_pipes()
            return self._open_console()
        if binary:
            # As the Go shim: stdout's URI decides, and the logging binary
            # gets both output pipes (ctr --log-uri names it for both).
            self.logging_binary = LoggingBinary(self.stdout)
        null = -1
        fds = []
        if self.stdin:
            r, w = os.pipe2(os.O_CLOEXEC)
            self.child_fds.append(r)
            os.set_blocking(w, False)
            src, keep = _open_fifo_pair(self.stdin, write=False)
            self.stdin_keep = keep
            self.copiers.append(Copier(self.loop, src, w))
            fds.append(r)
        else:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.child_fds.append(null)
            fds.append(null)
        for path in (self.stdout, self.stderr):
            if self.logging_binary is not None:
                # The read end goes to the logging binary, never to a copier:
                # the shim moves no byte of this output.
                r, w = os.pipe2(os.O_CLOEXEC)
                self.logging_binary.fds.append(r)
                self.child_fds.append(w)
                fds.append(w)
                continue
            if not path:
                if null < 0:
                    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                    self.child_fds.append(null)
                fds.append(null)
                continue
            r, w = os.pipe2(os.O_CLOEXEC)
            self.child_fds.append(w)
            os.set_blocking(r, False)
            dst = self._fifo_writer(path)
            self.copiers.append(Copier(self.loop, r, dst, on_close=self._release))
            fds.append(w)
        if (uid or gid) and self.logging_binary is None:  # the Go shim leaves a logger's pipes as they are
            for fd in fds:
                if fd != null:  # a pipe; never the host's /dev/null
                    os.fchown(fd, uid, gid)
        return fds[0], fds[1], fds[2]

    def _open_log_pipes(self) -> None:
        """A terminal with a logging binary, as the Go shim does it: the binary
        gets a stdout pipe, into which the shim copies the terminal's output
        once runc has sent the pty master, and a stderr pipe that nobody
        writes to (a terminal has no separate stderr). The Go shim drops that
        pipe's write end to its garbage collector; pyshim closes it at once,
        so the binary sees EOF on fd 4 right away."""
        self.logging_binary = LoggingBinary(self.stdout)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.logging_binary.fds.append(r)
        os.set_blocking(w, False)
        self.log_pipe = w
        r, w = os.pipe2(os.O_CLOEXEC)
        self.logging_binary.fds.append(r)
        os.close(w)

    def _open_console(self) -> tuple[int, int, int]:
        """With a terminal, runc makes the pty and sends its master to a
        console socket (in a fresh 0700 dir); runc itself gets /dev/null."""
        import tempfile

        self.console_dir = tempfile.mkdtemp(prefix="pyshim-pty-")
        self.console_sock = unix_listen(self.console_path, 1)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.child_fds.append(null)
        return null, null, null

    @property
    def console_path(self) -> str:
        return os.path.join(self.console_dir, "pty.sock")

    def receive_console(self) -> None:
        """After runc create/exec succeeded: takes the pty master runc sent,
        and sets up the copies stdin fifo -> master -> stdout fifo (or the
        logging binary's stdout pipe)."""
        import select
        import socket

        if not select.select([self.console_sock], [], [], 5.0)[0]:
            raise RuntimeFailure("runc did not send the terminal to the console socket")
        lsock = socket.socket(fileno=self.console_sock)
        self.console_sock = -1
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(5.0)
                _, master = recv_fd(conn.fileno())
        finally:
            lsock.close()
            self._remove_console_dir()
        if master < 0:
            raise RuntimeFailure("runc sent no terminal on the console socket")
        os.set_blocking(master, False)
        self.master = master
        if self.stdin:
            src, keep = _open_fifo_pair(self.stdin, write=False)
            self.stdin_keep = keep
            # stdin's EOF must not hang up the terminal: the master stays open.
            self.copiers.append(Copier(self.loop, src, master, on_close=_keep_fd, splice=False))
        if self.log_pipe >= 0:
            dst, self.log_pipe = self.log_pipe, -1
            self.copiers.append(Copier(self.loop, os.dup(master), dst, on_close=_close_log_pipe, splice=False))
        elif self.stdout:
            dst = self._fifo_writer(self.stdout)
            self.copiers.append(Copier(self.loop, os.dup(master), dst, on_close=self._release, splice=False))

    def resize(self, width: int, height: int) -> None:
        import fcntl
        import termios

        if self.master >= 0:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def _remove_console_dir(self) -> None:
        if self.console_dir:
            for path in (self.console_path, self.console_dir):
                try:
                    (os.rmdir if path == self.console_dir else os.unlink)(path)
                except OSError:
                    pass
            self.console_dir = ""

    def _fifo_writer(self, path: str) -> int:
        """A write end of output `path` for one copy. stdout and stderr may name
        one fifo: it is opened once, and each copy gets a dup of its own, because
        the loop keeps one writer callback per fd (two copies waiting on one fd
        for room, the second replaced the first's, which then never copied again)."""
        if path not in self._fifo_fds:
            self._fifo_fds[path] = _open_output(path)
        wr = os.dup(self._fifo_fds[path][0])
        self._refs[wr] = path
        return wr

    def _release(self, wr: int) -> None:
        """A copy has ended: closes its write end, and the output's own once no
        copy writes to it any more."""
        path = self._refs.pop(wr)
        os.close(wr)
        if path not in self._refs.values():
            w, keep = self._fifo_fds.pop(path)
            os.close(w)
            if keep >= 0:
                os.close(keep)

    def close_after_start(self) -> None:
        """After runc succeeded: starts copying, and drops the shim's copies
        of the container's ends so that the container's exit is seen as EOF
        on its output pipes. Until then nothing is copied, so what runc itself
        prints when it fails never reaches the client (its log.json has it)."""
        for c in self.copiers:
            c.start()
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds.clear()

    def close_stdin(self) -> None:
        """CloseIO: once the client closes its end, stdin ends for the container."""
        if self.stdin_keep >= 0:
            os.close(self.stdin_keep)
            self.stdin_keep = -1

    async def drain(self, idle: float) -> None:
        """Waits for the output copiers to reach EOF as long as they keep
        moving bytes; returns once none has moved one for `idle` seconds (a
        process left holding the output open, a reader that stopped reading)."""
        import asyncio

        # The outputs: the copies to a fifo or file, and to a logging binary.
        outs = [c for c in self.copiers if c.on_close == self._release or c.on_close is _close_log_pipe]
        pending, moved = {c.done for c in outs}, -1
        while pending and moved != (moved := sum(c.moved for c in outs)):
            _, pending = await asyncio.wait(pending, timeout=idle)

    def close(self) -> None:
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds.clear()
        if self.console_sock >= 0:
            os.close(self.console_sock)
            self.console_sock = -1
        self._remove_console_dir()
        self.close_stdin()
        for c in self.copiers:
            c.close()
        self.copiers.clear()
        for w, keep in self._fifo_fds.values():
            os.close(w)
            if keep >= 0:
                os.close(keep)
        self._fifo_fds.clear()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        if self.log_pipe >= 0:
            os.close(self.log_pipe)
            self.log_pipe = -1
        if self.logging_binary is not None:
            self.logging_binary.close()


def _keep_fd(fd: int) -> None:
    """on_close for a copy whose destination outlives it (the pty master)."""


def _close_log_pipe(fd: int) -> None:
    """on_close for the copy from a terminal to a logging binary: its EOF is
    the binary's EOF on fd 3."""
    os.close(fd)


def _open_output(path: str) -> tuple[int, int]:
    """(write fd, keep-alive fd or -1) for an output: a fifo path (plain or
    `fifo://`), or a `file://` URI or plain file, appended to."""
    import stat

    scheme, sep, rest = path.partition("://")
    if sep:
        if scheme == "fifo":
            path = rest
        elif scheme == "file":
            path = rest.split("?", 1)[0]
            if not path.startswith("/"):
                raise InvalidArgument(f"stdio URI {path!r}: file:// needs an absolute path")
            os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
            return _open_append(path), -1
        elif scheme == "binary":
            raise InvalidArgument(f"stdio URI {path!r}: a logging binary must be named by stdout")
        else:
            raise InvalidArgument(f"stdio URI {path!r}: unsupported scheme {scheme!r}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISFIFO(st.st_mode):
        return _open_fifo_pair(path, write=True)
    return _open_append(path, 0o600), -1


def _open_append(path: str, mode: int = 0o644) -> int:
    """A file opened for appending, without O_APPEND: splice(2) refuses an
    O_APPEND destination (EINVAL), so the offset starts at the end instead.
    stdout and stderr naming one file share this fd, and so its offset."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    os.lseek(fd, 0, os.SEEK_END)
    return fd


class LoggingBinary:
    """A logging binary named by a `binary:///path?key=value` stdout URI,
    run as the Go shim runs it.

    The binary gets the read ends of the container's stdout and stderr pipes
    as fds 3 and 4 (the shim keeps no read end) and a pipe as fd 5 that it
    writes to, or closes, once it is ready; /dev/null as stdio; an
    environment of CONTAINER_ID and CONTAINER_NAMESPACE only; and, as
    arguments, each query key followed by its first value. It is spawned
    with `spawn` and its exit comes from the reaper. Loop thread only.
    """

    __slots__ = ("argv", "exited", "fds", "pid", "ready")

    def __init__(self, uri: str) -> None:
        from urllib.parse import parse_qsl, unquote, urlsplit

        u = urlsplit(uri)
        path = unquote(u.path)
        if not path.startswith("/"):
            raise InvalidArgument(f"stdio URI {uri!r}: binary:// needs an absolute path")
        argv = [path]
        seen = set()
        for key, value in parse_qsl(u.query, keep_blank_values=True):
            if key not in seen:
                seen.add(key)
                argv += [key, value]
        self.argv = argv
        self.fds: list[int] = []  # the pipes' read ends, until the binary holds them
        self.pid = 0
        self.exited = None  # the reaper's future for pid
        # fd 5's read end stays open while the binary lives: one that writes
        # to it again must not die of SIGPIPE.
        self.ready = -1

    async def start(self, loop, reaper: Reaper, cid: str, namespace: str,
                    timeout: float = LOGGING_BINARY_READY_SECONDS) -> None:
        """Spawns the binary and waits (without blocking the loop) until it
        writes to or closes fd 5; RuntimeFailure if it cannot be started or
        does not get ready within `timeout` (it is killed then)."""
        import asyncio
        import fcntl

        r, w = os.pipe2(os.O_CLOEXEC)
        self.ready = r
        owned = [w]
        try:
            # posix_spawn dup2s in order: a source fd below 6 could be
            # overwritten by an earlier dup2 to 0..5 before its own turn.
            srcs = []
            for fd in (*self.fds, w):
                if fd < 6:
                    fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 6)
                    owned.append(fd)
                srcs.append(fd)
            null_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            owned.append(null_r)
            null_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            owned.append(null_w)
            env = {"CONTAINER_ID": cid, "CONTAINER_NAMESPACE": namespace}
            try:
                self.pid = spawn(self.argv, (null_r, null_w, null_w), env, extra=tuple(zip(srcs, (3, 4, 5))))
            except OSError as e:
                raise RuntimeFailure(f"failed to start logging binary {self.argv[0]}: "
                                     f"{(e.strerror or str(e)).lower()}") from None
            self.exited = reaper.watch(self.pid)
        finally:
            for fd in owned:
                os.close(fd)
            self._close_fds()
        fut = fd_ready(loop, r)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self.close()
            raise RuntimeFailure(f"logging binary {self.argv[0]} did not signal ready on fd 5 "
                                 f"within {timeout:g}s: killed") from None
        finally:
            fd_forget(loop, r)
        log("debug", "logging binary ready", id=cid, logger_pid=self.pid, binary=self.argv[0])

    async def stop(self, timeout: float = LOGGING_BINARY_STOP_SECONDS) -> None:
        """At Delete: SIGTERM, then SIGKILL if it has not exited within
        `timeout`, as the Go shim does."""
        import asyncio
        if self._signal(SIGTERM):
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            except TimeoutError:
                log("warning", "logging binary still running after SIGTERM: killed", logger_pid=self.pid)
        self.close()

    def _signal(self, sig: int) -> bool:
        """Signals the binary if it has not been reaped yet (its pid cannot
        have been reused before that); True if it was signalled."""
        if self.exited is None or self.exited.done():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def close(self) -> None:
        """Kills the binary if it still runs (the reaper reaps it) and closes
        the shim's fds (idempotent)."""
        self._close_fds()
        self._signal(SIGKILL)
        if self.ready >= 0:
            os.close(self.ready)
            self.ready = -1


# =============================================================================
# runc: spawning through the reaper, and one typed method per runc command.
# =============================================================================


def fd_ready(loop, fd: int, write: bool = False):
    """A future resolved once `fd` is readable (or writable). The callback
    unregisters itself, so it fires once however the waiter is scheduled;
    a waiter that gives up calls `fd_forget`."""
    fut = loop.create_future()
    remove = loop.remove_writer if write else loop.remove_reader

    def ready() -> None:
        remove(fd)
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    return fut


def fd_forget(loop, fd: int, write: bool = False) -> None:
    (loop.remove_writer if write else loop.remove_reader)(fd)


class Runner:
    """Runs runc (and other helper binaries) with exits from the reaper."""

    __slots__ = ("loop", "null", "reaper")

    def __init__(self, loop, reaper: Reaper) -> None:
        self.loop = loop
        self.reaper = reaper
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    async def run(self, argv: list[str], stdio: tuple[int, int, int] | None = None,
                  input: bytes | None = None, capture: bool = False) -> tuple[int, bytes]:
        """Runs argv to completion; returns (exit code, captured stdout+stderr).

        With `stdio` the child gets those fds; otherwise stdout and stderr
        are captured (when `capture`) or discarded.
        """
        import asyncio

        out_r = -1
        in_w = -1
        close_after = []
        try:
            if stdio is None:
                stdin = self.null
                if input is not None:
                    stdin, in_w = os.pipe2(os.O_CLOEXEC)
                    close_after.append(stdin)
                if capture:
                    out_r, out_w = os.pipe2(os.O_CLOEXEC)
                    close_after.append(out_w)
                    stdio = (stdin, out_w, out_w)
                else:
                    stdio = (stdin, self.null, self.null)
            pid = spawn(argv, stdio)
            exited = self.reaper.watch(pid)
        finally:
            for fd in close_after:
                os.close(fd)
        chunks = []
        if in_w >= 0:
            try:
                await self._write_all(in_w, input)
            finally:
                os.close(in_w)
        if out_r >= 0:
            try:
                await self._read_all(out_r, chunks, exited)
            finally:
                os.close(out_r)
        code = await asyncio.shield(exited)
        return code, b"".join(chunks)

    async def _write_all(self, fd: int, data: bytes) -> None:
        os.set_blocking(fd, False)
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                try:
                    await fd_ready(self.loop, fd, write=True)
                finally:
                    fd_forget(self.loop, fd, write=True)
            except BrokenPipeError:
                return

    async def _read_all(self, fd: int, chunks: list, exited) -> None:
        import asyncio

        os.set_blocking(fd, False)
        limit = 1 << 20
        while True:
            try:
                b = os.read(fd, 65536)
            except BlockingIOError:
                fut = fd_ready(self.loop, fd)
                try:
                    if exited.done():
                        # A grandchild may hold the pipe open: do not wait for it.
                        done, _ = await asyncio.wait([fut], timeout=0.2)
                        if not done:
                            return
                    else:
                        await asyncio.wait([fut, exited], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    fd_forget(self.loop, fd)
                continue
            if not b:
                return
            if limit > 0:
                chunks.append(b[:limit])
                limit -= len(b)


# --- the typed runc layer ------------------------------------------------------

# What runc says when the process (kill) or container (delete) a command
# names is gone.
RUNC_GONE = {"kill": ("not running", "does not exist", "no such process", "process already finished"),
             "delete": ("not exist",)}


def runc_failure(command: str, what: str, message: str) -> ShimError:
    """The one mapping of a failed runc command to the error its caller gets,
    as containerd-shim-runc-v2 maps them: a `kill` or `delete` of a process
    or container that is gone is NotFound; anything else is runc's own words
    (code Unknown)."""
    if any(s in message for s in RUNC_GONE.get(command, ())):
        return NotFound(f"process already finished: {what}: {message}")
    return RuntimeFailure(f"{what}: {message}")


class Runc:
    """One container's runc, shaped like go-runc: a method per runc command,
    each owning its argument list; every command logs to the bundle's
    log.json, whose last error is the message a failure carries. Callers
    never build argv."""

    __slots__ = ("binary", "bundle", "criu", "log_path", "no_new_keyring", "no_pivot", "root",
                 "runner", "systemd")

    def __init__(self, runner: Runner | None, binary: str, root: str, bundle: str,
                 systemd: bool = False, no_pivot: bool = False, no_new_keyring: bool = False,
                 criu: str = "") -> None:
        self.runner = runner
        self.binary = binary
        self.root = root
        self.bundle = bundle
        self.log_path = os.path.join(bundle, "log.json")
        self.systemd = systemd
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.criu = criu  # the runtime options' CriuPath; "" lets runc find criu

    def _argv(self, *args: str) -> list[str]:
        base = [self.binary, "--root", self.root, "--log", self.log_path, "--log-format", "json"]
        if self.criu:
            base += ["--criu", self.criu]
        if self.systemd:
            base.append("--systemd-cgroup")
        return base + list(args)

    def last_error(self) -> str:
        """The last error runc wrote to its json log (only the tail is read)."""
        import json

        try:
            fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 65536, max(0, size - 65536))
        finally:
            os.close(fd)
        for line in reversed(tail.splitlines()):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") == "error":
                return str(entry.get("msg", ""))
        return ""

    async def _run(self, what: str, *args: str, stdio=None, input: bytes | None = None) -> bytes:
        """Runs `runc args` to completion; its output, or the mapped error."""
        code, out = await self.runner.run(self._argv(*args), stdio=stdio, input=input,
                                          capture=stdio is None)
        if code != 0:
            msg = self.last_error() or out.decode(errors="replace").strip() or f"exit status {code}"
            raise runc_failure(args[0], what, msg)
        return out

    @staticmethod
    def _console(socket: str) -> list[str]:
        return ["--console-socket", socket] if socket else []

    async def create(self, cid: str, pid_file: str, stdio, console_socket: str = "") -> None:
        args = ["create", "--bundle", self.bundle, "--pid-file", pid_file]
        if self.no_pivot:
            args.append("--no-pivot")
        if self.no_new_keyring:
            args.append("--no-new-keyring")
        await self._run("OCI runtime create failed", *args, *self._console(console_socket), cid,
                        stdio=stdio)

    async def start(self, cid: str) -> None:
        await self._run("OCI runtime start failed", "start", cid)

    async def exec(self, cid: str, spec_path: str, pid_file: str, stdio, console_socket: str = "") -> None:
        await self._run("OCI runtime exec failed", "exec", "--process", spec_path, "--detach",
                        "--pid-file", pid_file, *self._console(console_socket), cid, stdio=stdio)

    async def kill(self, cid: str, signo: int, all: bool = False, what: str = "OCI runtime kill failed") -> None:
        await self._run(what, "kill", *(["--all"] if all else []), cid, str(signo))

    async def delete(self, cid: str) -> None:
        await self._run("failed to delete task", "delete", cid)

    async def pause(self, cid: str) -> None:
        await self._run("OCI runtime pause failed", "pause", cid)

    async def resume(self, cid: str, what: str = "OCI runtime resume failed") -> None:
        await self._run(what, "resume", cid)

    async def update(self, cid: str, resources: bytes) -> None:
        """`resources`: the JSON of an OCI LinuxResources, on runc's stdin."""
        await self._run("OCI runtime update failed", "update", "--resources", "-", cid, input=resources)

    async def ps(self, cid: str) -> list[int]:
        import json

        out = await self._run("failed to list pids", "ps", "--format", "json", cid)
        try:
            return json.loads(out.decode().strip().splitlines()[-1]) or []
        except (ValueError, IndexError):
            raise RuntimeFailure(f"runc ps: unexpected output {out[:200]!r}") from None

    async def state(self, cid: str) -> dict:
        import json

        out = await self._run("failed to read the container's state", "state", cid)
        try:
            return json.loads(out)
        except ValueError:
            raise RuntimeFailure(f"runc state: unexpected output {out[:200]!r}") from None

    async def checkpoint(self, cid: str, image: str, work: str, opts) -> None:
        """`runc checkpoint` into `image`, criu working in `work`. A failure
        carries runc's first line and where criu's dump.log was copied (the
        bundle's criu-dump.log), as the Go shim's does."""
        import shutil

        code, out = await self.runner.run(self._argv(*checkpoint_args(image, work, opts), cid), capture=True)
        if code == 0:
            return
        dump_log = os.path.join(self.bundle, "criu-dump.log")
        try:
            shutil.copyfile(os.path.join(work, "dump.log"), dump_log)
        except OSError as e:
            log("warning", "cannot copy criu's dump.log", id=cid, error=str(e))
        text = out.decode(errors="replace").strip() or self.last_error()
        first = text.splitlines()[0] if text else ""
        raise RuntimeFailure(f"{os.path.basename(self.binary)} did not terminate successfully: "
                             f"exit status {code}: {first} path= {dump_log}")

    async def restore(self, cid: str, image: str, parent: str, work: str, pid_file: str, stdio,
                      console_socket: str = "") -> None:
        """`runc restore --detach`: the checkpointed processes come back and
        are reparented to this shim (a subreaper), hence --no-subreaper."""
        args = ["restore", "--image-path", image, "--work-path", work]
        if parent:
            args += ["--parent-path", parent]
        args += ["--detach", "--pid-file", pid_file, *self._console(console_socket)]
        if self.no_pivot:
            args.append("--no-pivot")
        await self._run("OCI runtime restore failed", *args, "--no-subreaper", "--bundle", self.bundle, cid,
                        stdio=stdio)

    def force_delete_now(self, cid: str) -> int:
        """`runc delete --force`, waited for synchronously (`shim delete`, with
        no event loop nor reaper); runc's exit code."""
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            pid = spawn(self._argv("delete", "--force", cid), (null, 2, 2))
        finally:
            os.close(null)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)


def checkpoint_args(path: str, work: str, opts) -> list[str]:
    """`runc checkpoint` flags for the image and work dirs and the options, in
    the order the Go shim passes them (the container id goes last)."""
    args = ["checkpoint", "--image-path", path, "--work-path", work]
    for on, flag in ((opts.open_tcp, "--tcp-established"), (opts.external_unix_sockets, "--ext-unix-sk"),
                     (opts.terminal, "--shell-job"), (opts.file_locks, "--file-locks")):
        if on:
            args.append(flag)
    if opts.cgroups_mode:
        # The Go shim 1.6 drops this option; runc checks the value.
        args += ["--manage-cgroups-mode", opts.cgroups_mode]
    for ns in opts.empty_namespaces:
        args += ["--empty-ns", ns]
    if not opts.exit:
        args.append("--leave-running")
    return args


# =============================================================================
# Processes: the init and exec processes of a container, each a state machine
# with behaviour (containerd's init_state.go), and the one router of exits.
# =============================================================================

CREATED, RUNNING, PAUSED, STOPPED, DELETED = "created", "running", "paused", "stopped", "deleted"

# (state, event) -> new state; anything else is an illegal call.
TRANSITIONS: dict[tuple[str, str], str] = {
    (CREATED, "start"): RUNNING,
    (CREATED, "exit"): STOPPED,
    (CREATED, "delete"): DELETED,
    (RUNNING, "exit"): STOPPED,
    (RUNNING, "pause"): PAUSED,
    (PAUSED, "resume"): RUNNING,
    (PAUSED, "exit"): STOPPED,
    (STOPPED, "delete"): DELETED,
    # Update keeps the state; it is refused once the process has stopped.
    (CREATED, "update"): CREATED,
    (RUNNING, "update"): RUNNING,
    (PAUSED, "update"): PAUSED,
    # So does Checkpoint (with `exit`, the exit that follows is an ordinary one).
    (RUNNING, "checkpoint"): RUNNING,
    (PAUSED, "checkpoint"): PAUSED,
}

STATUS_CODES = {CREATED: 1, RUNNING: 2, STOPPED: 3, PAUSED: 4}
STATUS_PAUSING = 5  # an init while `runc pause` runs (not a state: nothing else changes)

# The Go shim's words (code Unknown) for a start, delete, pause, resume,
# update or checkpoint that the process's state forbids (its init_state.go
# and exec_state.go); ctr prints them as they are.
REFUSALS: dict[tuple[str, str], str] = {
    (RUNNING, "start"): "cannot start a running process",
    (PAUSED, "start"): "cannot start a paused process",
    (STOPPED, "start"): "cannot start a stopped process",
    (RUNNING, "delete"): "cannot delete a running process",
    (PAUSED, "delete"): "cannot delete a paused process",
    (CREATED, "pause"): "cannot pause task in created state",
    (CREATED, "resume"): "cannot resume task in created state",
    (RUNNING, "resume"): "cannot resume a running process",
    (PAUSED, "pause"): "cannot pause a paused container",
    (STOPPED, "pause"): "cannot pause a stopped container",
    (STOPPED, "resume"): "cannot resume a stopped container",
    (STOPPED, "update"): "cannot update a stopped container",
    (CREATED, "checkpoint"): "cannot checkpoint a task in created state",
    (STOPPED, "checkpoint"): "cannot checkpoint a stopped container",
}


def _read_pid(path: str) -> int:
    """The pid runc wrote; RuntimeFailure unless it is a positive number (a
    pid of 0 would make a later kill(2) signal the shim's own group)."""
    text = _read_small(path, 64).strip()
    if not text.isdigit() or int(text) <= 0:
        raise RuntimeFailure(f"failed to retrieve OCI runtime container pid: {path}: {text[:20]!r}")
    return int(text)


def _unlink_quietly(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


class Process:
    """The init process of a container or one of its execs.

    `state` moves only through TRANSITIONS (`transition`); each operation
    first checks its event, so an illegal call raises before anything runs.
    `wait` is one future, resolved once with the exit status. `reaped` is
    set once the reaper has reported the pid: a signal or a cgroup read
    after that could reach another process that reuses the pid.
    """

    __slots__ = ("container", "exit_status", "exited_at", "id", "pausing", "pid", "reaped", "starting",
                 "state", "stdio", "wait")

    def __init__(self, pid_id: str, container: Container, stdio: Stdio, loop) -> None:
        self.id = pid_id
        self.container = container
        self.pid = 0
        self.state = CREATED
        self.exit_status = 0
        self.exited_at = 0
        self.wait = loop.create_future()
        self.stdio = stdio
        self.starting = False
        self.pausing = False
        self.reaped = False

    def check(self, event: str) -> str:
        """The state `event` leads to; FailedPrecondition if it is illegal now
        (or the Go shim's own refusal, code Unknown: REFUSALS)."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            if (self.state, event) in REFUSALS:
                raise ShimError(REFUSALS[self.state, event])
            raise FailedPrecondition(f"cannot {event} a {self.state} process")
        return new

    def transition(self, event: str) -> None:
        self.state = self.check(event)

    def set_exited(self, status: int, at_ns: int) -> None:
        self.transition("exit")
        self.exit_status = status
        self.exited_at = at_ns
        if not self.wait.done():
            self.wait.set_result(status)

    def check_start(self) -> None:
        self.check("start")
        if self.starting:
            raise FailedPrecondition(f"process {self.id} is already starting")

    def has_exited(self) -> bool:
        """Exited, reaped, or no longer in /proc (an exit the router holds)."""
        return self.state in (STOPPED, DELETED) or self.reaped or not os.path.exists(f"/proc/{self.pid}")

    @property
    def status(self) -> int:
        """The containerd task Status of the state (UNKNOWN 0 once deleted).
        An init reads PAUSING while its pause runs; an exec reads PAUSED while
        its container is paused or pausing, as with the Go shims 1.6.20,
        1.7.24 and 2.1.9 (tests/test_fields.py: their sources read as if an
        exec said PAUSING there, but they answer PAUSED)."""
        init = self.container.init
        if init is self:
            return STATUS_PAUSING if self.pausing else STATUS_CODES.get(self.state, 0)
        if init is not None and (init.pausing or init.state == PAUSED):
            return STATUS_CODES[PAUSED]
        return STATUS_CODES.get(self.state, 0)

    def check_gone(self) -> None:
        """NotFound once the process has exited (a kill would find nothing)."""
        if self.state in (STOPPED, DELETED) or self.reaped:
            raise NotFound(f"process {self.id}: process already finished")

    def resize(self, width: int, height: int) -> None:
        """A process without a terminal is left alone, as the Go shim does."""
        if self.state in (STOPPED, DELETED):
            raise ShimError("cannot resize a stopped container")  # the Go shim's words
        self.stdio.resize(width, height)

    def close_io(self) -> None:
        """Closes the stdin fifo's write end, as the Go shim's CloseIO does
        whatever the request's `stdin` says (containerd always sends true)."""
        self.stdio.close_stdin()

    async def _close_stdio(self) -> None:
        if self.stdio.logging_binary is not None:
            await self.stdio.logging_binary.stop()
        self.stdio.close()

    def check_delete(self) -> None:
        self.check("delete")


class InitProcess(Process):
    """A container's init: runc create/start/kill/pause/resume/delete of the
    whole container."""

    __slots__ = ()

    async def create(self, fds: tuple[int, int, int]) -> None:
        """`runc create`; sets `pid`. The caller closes stdio on failure."""
        c = self.container
        pid_file = os.path.join(c.bundle, "init.pid")
        await c.runc.create(c.id, pid_file, fds, self.stdio.console_path if self.stdio.terminal else "")
        if self.stdio.terminal:
            self.stdio.receive_console()
        self.pid = _read_pid(pid_file)
        self.stdio.close_after_start()

    async def start(self, exits: ExitRouter, namespace: str) -> None:
        """`runc start`, or the restore of a task created from a checkpoint.
        On failure the process stays created (a restore keeps its checkpoint,
        so Start may be retried, as with the Go shim)."""
        self.check_start()
        c = self.container
        self.starting = True
        try:
            if c.restore is not None:
                await self._restore()
            else:
                await c.runc.start(c.id)
        finally:
            self.starting = False
        self.transition("start")

    def started_event(self):
        import pyshim_pb2 as pb

        return "/tasks/start", pb.TaskStart(container_id=self.container.id, pid=self.pid)

    def needs_cleanup_after_exit(self) -> bool:
        """Whether the exit waits for `clean_up_after_exit` before it is published."""
        return self.state == PAUSED or self.container.shares_pidns

    async def clean_up_after_exit(self) -> None:
        """A paused container is thawed first, so that the rest of it can die
        and runc can delete it; without a pid namespace of its own, whatever is
        left in its cgroup is killed: nothing else will (both as the Go shim)."""
        await self.thaw_after_exit()
        if self.container.shares_pidns:
            await self.kill_all()

    def resize(self, width: int, height: int) -> None:
        """Whatever the init's state, as the Go shim's Init.Resize (a stopped
        init's terminal, if any, is resized; without one nothing happens)."""
        self.stdio.resize(width, height)

    async def _restore(self) -> None:
        c = self.container
        image, parent, work, fds = c.restore
        pid_file = os.path.join(c.bundle, "init.pid")
        await c.runc.restore(c.id, image, parent, work, pid_file, fds,
                             self.stdio.console_path if self.stdio.terminal else "")
        if self.stdio.terminal:
            self.stdio.receive_console()
        self.pid = _read_pid(pid_file)
        c.restore = None
        self.stdio.close_after_start()

    async def kill(self, signo: int, all: bool) -> None:
        self.check_gone()
        await self.container.runc.kill(self.container.id, signo, all)

    async def pause(self) -> None:
        self.check("pause")
        self.pausing = True  # State says PAUSING meanwhile, as the Go shim's
        try:
            await self.container.runc.pause(self.container.id)
        finally:
            self.pausing = False
        self.transition("pause")

    async def resume(self) -> None:
        self.check("resume")
        await self.container.runc.resume(self.container.id)
        self.transition("resume")

    async def update(self, resources: bytes) -> None:
        """`resources`: the OCI LinuxResources JSON, checked before runc sees it."""
        import json

        self.check("update")
        try:
            valid = isinstance(json.loads(resources), dict)
        except ValueError:
            valid = False
        if not valid:
            raise InvalidArgument(f"resources of {self.container.id}: not the JSON of an OCI LinuxResources")
        await self.container.runc.update(self.container.id, resources)

    async def checkpoint(self, path: str, decode_options):
        """criu dumps the whole container into `path`, working in the options'
        work_path, else in a scratch dir under the bundle's work dir that is
        removed afterwards. Unless the options say `exit`, the task keeps
        running; with `exit` its exit is reaped and routed like any other.
        `decode_options()` gives the options once the state allows the call;
        they are returned."""
        import shutil

        self.check("checkpoint")
        c = self.container
        if not path:
            raise InvalidArgument(f"checkpoint of {c.id}: no image path")
        opts = decode_options()
        work = opts.work_path or os.path.join(c.bundle, "work", "criu-work")
        try:
            await c.runc.checkpoint(c.id, path, work, opts)
        finally:
            if not opts.work_path:
                shutil.rmtree(work, ignore_errors=True)
        return opts

    async def thaw_after_exit(self) -> None:
        """As the Go shim: a container whose init died paused is resumed, so
        that the rest of it can die and runc can delete it."""
        if self.state != PAUSED:
            return
        try:
            await self.container.runc.resume(self.container.id, what="resume")
        except ShimError as e:
            log("debug", "resuming a container whose init exited paused", id=self.id, error=str(e))

    async def kill_all(self) -> None:
        """SIGKILL to every process left in the container's cgroup."""
        try:
            await self.container.runc.kill(self.container.id, SIGKILL, all=True, what="kill all")
        except ShimError as e:
            log("warning", "killing the container's remaining processes", id=self.container.id, error=str(e))

    def metrics(self) -> tuple[str, bytes]:
        """The container's cgroup metrics: through the init's pid while it is
        not reaped (once reaped, the pid may be another process's), else
        through the cgroup it was in."""
        c = self.container
        if not c.cgroup:
            if not self.pid or self.reaped:
                raise NotFound(f"cgroup of {c.id} does not exist")
            c.cgroup = proc_cgroup(self.pid)
        return container_metrics(self.pid, c.cgroup)

    def remember_cgroup(self) -> None:
        """Reads the init's cgroup once it has a pid (Create or Start)."""
        c = self.container
        if not c.cgroup and self.pid and not self.reaped:
            try:
                c.cgroup = proc_cgroup(self.pid)
            except NotFound:
                pass  # exited already: Stats will say so

    async def delete(self, oom: OomWatcher | None) -> None:
        """`runc delete` of a created or stopped container, then its stdio and
        rootfs; a container runc no longer knows is deleted all the same."""
        c = self.container
        self.check_delete()
        await self.stdio.drain(IO_DRAIN_SECONDS)
        if any(e.state == RUNNING for e in c.execs.values()):
            raise FailedPrecondition(f"container {c.id} still has running execs")
        if oom is not None:
            oom.forget(c.id)  # before runc removes the cgroup
        try:
            await c.runc.delete(c.id)
        except NotFound:
            pass
        await self._close_stdio()
        for e in c.execs.values():
            e.stdio.close()
        if c.mounted:
            unmount_all(c.rootfs)
            c.mounted = False
        self.transition("delete")
        if not self.wait.done():
            self.wait.set_result(self.exit_status)


class ExecProcess(Process):
    """A process started in a running container with `runc exec`."""

    __slots__ = ("spec",)

    def __init__(self, pid_id: str, container: Container, stdio: Stdio, loop, spec: bytes) -> None:
        super().__init__(pid_id, container, stdio, loop)
        self.spec = spec

    def _spec_json(self) -> bytes:
        """The process spec with its terminal as the Exec request asked (the
        Go shim sets it from the request, whatever the spec said); a spec
        that is not a JSON object goes to runc as it came."""
        import json

        try:
            spec = json.loads(self.spec)
        except ValueError:
            return self.spec  # runc refuses it in its own words, as before
        if not isinstance(spec, dict):
            return self.spec
        spec["terminal"] = self.stdio.terminal
        return json.dumps(spec).encode()

    async def start(self, exits: ExitRouter, namespace: str) -> None:
        """`runc exec --detach`; sets `pid`. On failure the exec stays created
        and its stdio is closed, as with the Go shim. Counted by `exits` from
        here: an init exit meanwhile waits for this exec's exit or failure."""
        self.check_start()
        exits.exec_started(self.container)
        try:
            await self._start(namespace)
        except BaseException:
            exits.exec_ended(self.container)
            raise

    def started_event(self):
        import pyshim_pb2 as pb

        return "/tasks/exec-started", pb.TaskExecStarted(container_id=self.container.id, exec_id=self.id,
                                                         pid=self.pid)

    async def _start(self, namespace: str) -> None:
        c = self.container
        if c.init_exited():
            raise FailedPrecondition(f"container {c.id} init process is not running")
        spec_path = os.path.join(c.bundle, f".exec-{self.id}.json")
        pid_file = os.path.join(c.bundle, f"{self.id}.pid")
        self.starting = True
        try:
            fds = self.stdio.open(*c.io_owner)  # as the Go shim: the init's IoUid/IoGid
            if self.stdio.logging_binary is not None:
                runner = c.runc.runner
                await self.stdio.logging_binary.start(runner.loop, runner.reaper, self.id, namespace)
            fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, self._spec_json())
            finally:
                os.close(fd)
            try:
                await c.runc.exec(c.id, spec_path, pid_file, fds,
                                  self.stdio.console_path if self.stdio.terminal else "")
            except ShimError:
                # As the Go shim: Wait returns (status 0) once runc exec has
                # failed, while the exec itself stays created.
                if not self.wait.done():
                    self.wait.set_result(self.exit_status)
                raise
            if self.stdio.terminal:
                self.stdio.receive_console()
            self.pid = _read_pid(pid_file)
        except BaseException:
            self.stdio.close()
            raise
        finally:
            self.starting = False
            _unlink_quietly(spec_path, pid_file)
        self.stdio.close_after_start()
        self.transition("start")

    async def kill(self, signo: int, all: bool) -> None:
        self.check_gone()
        if not self.pid:
            raise FailedPrecondition(f"exec {self.id} has not started")
        try:
            os.kill(self.pid, signo)
        except ProcessLookupError:
            raise NotFound(f"process {self.id}: process already finished") from None

    async def delete(self, oom: OomWatcher | None = None) -> None:
        self.check_delete()
        await self.stdio.drain(IO_DRAIN_SECONDS)
        await self._close_stdio()
        self.transition("delete")
        if not self.wait.done():  # an exec that never started: release its waiters
            self.wait.set_result(self.exit_status)
        del self.container.execs[self.id]


class Container:
    """One container: bundle, runc, init process and its execs.

    `restore` is set only between a Create from a checkpoint and the Start
    that restores it: (image path, parent image path, criu work path, the
    stdio fds runc restore gets). `live_execs` counts the execs starting or
    running: the init's exit is published after theirs (ExitRouter).
    """

    __slots__ = ("bundle", "cgroup", "execs", "held_init_exit", "id", "init", "io_owner", "live_execs",
                 "mounted", "restore", "rootfs", "runc", "shares_pidns")

    def __init__(self, cid: str, bundle: str, runc: Runc) -> None:
        self.id = cid
        self.bundle = bundle
        self.runc = runc
        self.rootfs = os.path.join(bundle, "rootfs")
        self.mounted = False
        self.init: InitProcess | None = None
        self.execs: dict[str, ExecProcess] = {}
        self.live_execs = 0
        self.held_init_exit: tuple[int, int] | None = None
        self.shares_pidns = False
        self.io_owner = (0, 0)  # the options' IoUid/IoGid: the init's and every exec's pipes
        # The init's /proc/PID/cgroup, read once it has a pid: Stats answers
        # from it after the init is reaped, until Delete (as the Go shim,
        # which loads the cgroup at Create).
        self.cgroup = ""
        self.restore: tuple[str, str, str, tuple[int, int, int]] | None = None

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise NotFound(f"process {exec_id} does not exist in container {self.id}")
        return p

    def init_exited(self) -> bool:
        """The init has exited: reaped, stopped, or its exit held. An exec may
        start in a created, running or paused container (runc judges the
        last two), as with the Go shim, which refuses only an exited init."""
        return self.init.state in (STOPPED, DELETED) or self.init.reaped or self.held_init_exit is not None

    def check_exec(self, eid: str) -> None:
        """Why a new exec `eid` may not be added now (the Go shim's words)."""
        if eid in self.execs:
            raise AlreadyExists(f"id {eid}: already exists")
        if self.init.state in (STOPPED, DELETED):
            raise ShimError(f"cannot exec in a {self.init.state} state")  # Unknown, as the Go shim
        if self.init.state == PAUSED:
            raise ShimError("cannot exec in a paused state")  # Unknown, as the Go shim
        if self.restore is not None:
            raise ShimError("cannot exec in a created state")  # not restored yet


class Subscription:
    """Exits seen while one Start (or Create) was in flight: `exits` of pids
    nobody knew yet, and the `held` exit of the process it starts."""

    __slots__ = ("exits", "held", "process")

    def __init__(self, process: Process | None) -> None:
        self.process = process
        self.exits: dict[int, tuple[int, int]] = {}
        self.held: tuple[int, int] | None = None


class ExitRouter:
    """Owns every exit the reaper reports that is not a runc command's.

    An exit (pid, status, time) goes, by the first rule that applies:
      1. to a process being started (a Subscription's): held, and replayed
         by `end` once its Start has published TaskStart / TaskExecStarted
         (or has failed): TaskStart before TaskExit;
      2. to a known process: delivered now;
      3. with Starts in flight: kept in each of their subscriptions, made
         before they spawned, in case it is the pid one of them is about to
         read from runc's pid file (`claim`);
      4. else it is an orphan's (or a pid reused since): reaped and dropped.
         It is never kept for a later process that gets the same pid.
    An init's exit is published only once its container's starting and
    running execs are out (`exec_started` / `exec_ended`): exec exits before
    the init exit. Loop thread only.
    """

    __slots__ = ("deliver", "pids", "publish", "subscriptions")

    def __init__(self, deliver, publish) -> None:
        """`deliver(p, status, at)`: an exit of `p`, to be handled; it calls
        `publish_exit` when that exit may be published. `publish(p, status,
        at)` publishes it."""
        self.deliver = deliver
        self.publish = publish
        self.pids: dict[int, Process] = {}
        self.subscriptions: list[Subscription] = []

    def subscribe(self, process: Process | None = None) -> Subscription:
        """Before a spawn whose pid is not known yet (or a Start of `process`)."""
        sub = Subscription(process)
        self.subscriptions.append(sub)
        return sub

    def claim(self, sub: Subscription, p: Process) -> None:
        """`p` has its pid: from now on its exits are routed to it; an exit of
        that pid seen since `sub` was made is its own."""
        self.pids[p.pid] = p
        sub.process = p
        early = sub.exits.pop(p.pid, None)
        if early is not None and sub.held is None:
            sub.held = early

    def end(self, sub: Subscription) -> None:
        """The Start is over (its event published, or failed): replay the held exit."""
        self.subscriptions.remove(sub)
        if sub.held is not None:
            held, sub.held = sub.held, None
            self._route(sub.process, *held)

    def forget(self, p: Process) -> None:
        if self.pids.get(p.pid) is p:
            del self.pids[p.pid]

    def on_exit(self, pid: int, status: int, at: int | None = None) -> None:
        """The reaper's callback."""
        at = at or time.time_ns()
        p = self.pids.get(pid)
        for sub in self.subscriptions:
            if p is not None and sub.process is p:
                sub.held = (status, at)
                return
        if p is not None:
            self._route(p, status, at)
        elif self.subscriptions:
            for sub in self.subscriptions:
                sub.exits[pid] = (status, at)
        else:
            log("debug", "exit of a process that is not ours", process_pid=pid, status=status)

    def _route(self, p: Process, status: int, at: int) -> None:
        self.forget(p)
        p.reaped = True
        self.deliver(p, status, at)

    def exec_started(self, c: Container) -> None:
        """Counted from the start of an exec's Start: an init that dies
        meanwhile holds its exit until this exec's exit (or failure)."""
        c.live_execs += 1

    def exec_ended(self, c: Container) -> None:
        """An exec has exited or failed to start: the last one releases a held
        init exit."""
        c.live_execs -= 1
        if c.live_execs == 0 and c.held_init_exit is not None:
            held, c.held_init_exit = c.held_init_exit, None
            self.publish(c.init, *held)

    def publish_exit(self, p: Process, status: int, at: int) -> None:
        """Publishes `p`'s exit now, or for an init with execs still out, once
        the last of them has ended."""
        c = p.container
        if p is c.init and c.live_execs > 0:
            c.held_init_exit = (status, at)
            return
        self.publish(p, status, at)
        if p is not c.init:
            self.exec_ended(c)


# =============================================================================
# cgroups: a container's metrics and its OOM notifications, read from the
# cgroup files themselves (only Stats and Start come here).
# =============================================================================

CGROUP_ROOT = "/sys/fs/cgroup"
URL_CGROUPS_V1_METRICS = "io.containerd.cgroups.v1.Metrics"
URL_CGROUPS_V2_METRICS = "io.containerd.cgroups.v2.Metrics"
CLOCK_TICKS = 100  # USER_HZ: the unit of cpuacct.stat
MAX_UINT64 = (1 << 64) - 1

# memory.stat keys (v1) that are fields of V1MemoryStat under another name.
_V1_MEMORY_RENAMES = {"pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault",
                      "pgmajfault": "pg_maj_fault", "hierarchical_memsw_limit": "hierarchical_swap_limit"}
# blkio files (v1) and the V1BlkIOStat field each fills; the throttle files
# stand in when the CFQ ones are empty, as containerd's cgroups library does.
_V1_BLKIO_FILES = (
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("time_recursive", "io_time_recursive"),
    ("sectors_recursive", "sectors_recursive"),
)


def _cg_read(path: str) -> str | None:
    """A cgroup file's text, or None when it does not exist (IgnoreNotExist)."""
    try:
        return _read_small(path).decode()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _cg_uint(path: str, default: int = 0) -> int:
    text = _cg_read(path)
    if text is None:
        return default
    text = text.strip()
    if text == "max":
        return MAX_UINT64
    try:
        return int(text)
    except ValueError:
        return default


def _cg_keyed(path: str) -> dict[str, int]:
    """`key value` lines (memory.stat, cpu.stat, memory.events) as a dict."""
    return _parse_keyed(_cg_read(path) or "")


def _parse_keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def _pure_v2(root: str = CGROUP_ROOT) -> bool:
    """A cgroup v2-only host (the v2 hierarchy mounted at `root` itself)."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def proc_cgroup(pid: int) -> str:
    """The text of /proc/PID/cgroup; NotFound once the process is gone."""
    try:
        return _read_small(f"/proc/{pid}/cgroup").decode()
    except OSError:
        raise NotFound(f"cgroup of pid {pid} does not exist") from None


def cgroup_paths(pid: int, root: str = CGROUP_ROOT, text: str = "") -> tuple[dict[str, str], str]:
    """({v1 controller: dir}, v2 dir or "") of a process, from /proc/PID/cgroup
    (or from `text`, that file as read earlier).

    A v1 controller's dir is that of its hierarchy (`cpu,cpuacct` or `cpu`),
    as mounted under `root`. The v2 dir is under `root` on a pure v2 host and
    under `root`/unified on a hybrid one.
    """
    text = text or proc_cgroup(pid)
    v1: dict[str, str] = {}
    v2 = ""
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if not controllers:
            unified = root if _pure_v2(root) else os.path.join(root, "unified")
            v2 = os.path.join(unified, path)
            continue
        for name in controllers.split(","):
            if name.startswith("name="):
                continue
            base = os.path.join(root, controllers)
            if not os.path.isdir(base):
                base = os.path.join(root, name)
            v1[name] = os.path.join(base, path)
    return v1, v2


def _counter_fields(cls) -> set[str]:
    """Names of the uint64 fields of a metrics message (not its sub-messages)."""
    return {f.name for f in cls.DESCRIPTOR.fields if f.message_type is None}


def _v1_blkio_entries(text: str, field, devices: dict[tuple[int, int], str]) -> None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or ":" not in parts[0]:
            continue  # "Total N"
        major, _, minor = parts[0].partition(":")
        try:
            key = (int(major), int(minor))
            value = int(parts[-1])
        except ValueError:
            continue
        field.add(op=parts[1] if len(parts) == 3 else "", device=devices.get(key, ""),
                  major=key[0], minor=key[1], value=value)


def block_devices(dev: str = "/dev") -> dict[tuple[int, int], str]:
    """(major, minor) -> /dev path of the block devices, as containerd names them."""
    import stat

    out: dict[tuple[int, int], str] = {}
    try:
        names = os.listdir(dev)
    except OSError:
        return out
    for name in names:
        path = os.path.join(dev, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode):
            out.setdefault((os.major(st.st_rdev), os.minor(st.st_rdev)), path)
    return out


def v1_metrics(dirs: dict[str, str], devices: dict[tuple[int, int], str] | None = None):
    """CgroupsV1Metrics from the v1 controller dirs of one cgroup; files that
    do not exist are skipped, and so is a controller without a dir. As in
    containerd's cgroups library, a controller that exists is present in the
    answer even when all its figures are zero."""
    import pyshim_pb2 as pb

    m = pb.CgroupsV1Metrics()
    d = dirs.get("pids")
    if d and os.path.isdir(d):
        m.pids.SetInParent()
        m.pids.current = _cg_uint(os.path.join(d, "pids.current"))
        limit = _cg_uint(os.path.join(d, "pids.max"))
        m.pids.limit = 0 if limit == MAX_UINT64 else limit
    d = dirs.get("cpuacct")
    if d and os.path.isdir(d):
        usage = m.cpu.usage
        usage.SetInParent()
        usage.total = _cg_uint(os.path.join(d, "cpuacct.usage"))
        ticks = _cg_keyed(os.path.join(d, "cpuacct.stat"))
        usage.user = ticks.get("user", 0) * 1_000_000_000 // CLOCK_TICKS
        usage.kernel = ticks.get("system", 0) * 1_000_000_000 // CLOCK_TICKS
        usage.per_cpu.extend(int(v) for v in (_cg_read(os.path.join(d, "cpuacct.usage_percpu")) or "").split())
    d = dirs.get("cpu")
    if d and os.path.isdir(d):
        st = _cg_keyed(os.path.join(d, "cpu.stat"))
        t = m.cpu.throttling
        t.SetInParent()
        t.periods = st.get("nr_periods", 0)
        t.throttled_periods = st.get("nr_throttled", 0)
        t.throttled_time = st.get("throttled_time", 0)
    d = dirs.get("memory")
    if d and os.path.isdir(d):
        mem = m.memory
        mem.SetInParent()
        fields = _counter_fields(pb.V1MemoryStat)
        for key, value in _cg_keyed(os.path.join(d, "memory.stat")).items():
            name = _V1_MEMORY_RENAMES.get(key, key)
            if key.startswith("total_") and key[6:] in _V1_MEMORY_RENAMES:
                name = "total_" + _V1_MEMORY_RENAMES[key[6:]]
            if name in fields:
                setattr(mem, name, value)
        for entry, prefix in ((mem.usage, "memory."), (mem.swap, "memory.memsw."),
                              (mem.kernel, "memory.kmem."), (mem.kernel_tcp, "memory.kmem.tcp.")):
            if not os.path.exists(os.path.join(d, prefix + "usage_in_bytes")):
                continue
            entry.SetInParent()
            entry.usage = _cg_uint(os.path.join(d, prefix + "usage_in_bytes"))
            entry.limit = _cg_uint(os.path.join(d, prefix + "limit_in_bytes"))
            entry.max = _cg_uint(os.path.join(d, prefix + "max_usage_in_bytes"))
            entry.failcnt = _cg_uint(os.path.join(d, prefix + "failcnt"))
        oom = _cg_keyed(os.path.join(d, "memory.oom_control"))
        if oom:
            m.memory_oom_control.SetInParent()
            m.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
            m.memory_oom_control.under_oom = oom.get("under_oom", 0)
            m.memory_oom_control.oom_kill = oom.get("oom_kill", 0)
    d = dirs.get("hugetlb")
    if d and os.path.isdir(d):
        for name in sorted(os.listdir(d)):
            if name.startswith("hugetlb.") and name.endswith(".usage_in_bytes"):
                size = name[len("hugetlb."):-len(".usage_in_bytes")]
                m.hugetlb.add(pagesize=size, usage=_cg_uint(os.path.join(d, name)),
                              max=_cg_uint(os.path.join(d, f"hugetlb.{size}.max_usage_in_bytes")),
                              failcnt=_cg_uint(os.path.join(d, f"hugetlb.{size}.failcnt")))
    d = dirs.get("blkio")
    if d and os.path.isdir(d):
        m.blkio.SetInParent()
        texts = {f: _cg_read(os.path.join(d, "blkio." + f)) or "" for f, _ in _V1_BLKIO_FILES}
        if not any(t.strip() for t in texts.values()):
            texts = {f: _cg_read(os.path.join(d, "blkio.throttle." + f)) or "" for f, _ in _V1_BLKIO_FILES[:2]}
        if devices is None and any(t.strip() for t in texts.values()):
            devices = block_devices()
        for f, field in _V1_BLKIO_FILES:
            if texts.get(f):
                _v1_blkio_entries(texts[f], getattr(m.blkio, field), devices or {})
    return m


def v2_metrics(d: str):
    """CgroupsV2Metrics from one cgroup v2 dir; absent files are skipped."""
    import pyshim_pb2 as pb

    if not os.path.isdir(d):
        raise NotFound(f"cgroup {d} does not exist")
    m = pb.CgroupsV2Metrics()
    if os.path.exists(os.path.join(d, "pids.current")):
        m.pids.SetInParent()
        m.pids.current = _cg_uint(os.path.join(d, "pids.current"))
        limit = _cg_uint(os.path.join(d, "pids.max"))
        m.pids.limit = 0 if limit == MAX_UINT64 else limit
    cpu = _cg_keyed(os.path.join(d, "cpu.stat"))
    if cpu:
        m.cpu.SetInParent()
    for name in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec"):
        setattr(m.cpu, name, cpu.get(name, 0))
    if os.path.exists(os.path.join(d, "memory.current")):
        mem = m.memory
        mem.SetInParent()
        m.memory_events.SetInParent()
        fields = _counter_fields(pb.V2MemoryStat) - {"usage", "usage_limit", "swap_usage", "swap_limit"}
        for key, value in _cg_keyed(os.path.join(d, "memory.stat")).items():
            if key in fields:
                setattr(mem, key, value)
        mem.usage = _cg_uint(os.path.join(d, "memory.current"))
        mem.usage_limit = _cg_uint(os.path.join(d, "memory.max"))
        mem.swap_usage = _cg_uint(os.path.join(d, "memory.swap.current"))
        mem.swap_limit = _cg_uint(os.path.join(d, "memory.swap.max"))
        events = _cg_keyed(os.path.join(d, "memory.events"))
        for name in ("low", "high", "max", "oom", "oom_kill"):
            setattr(m.memory_events, name, events.get(name, 0))
    io_stat = _cg_read(os.path.join(d, "io.stat"))
    if io_stat is not None:
        m.io.SetInParent()
    for line in (io_stat or "").splitlines():
        dev, *pairs = line.split()
        major, _, minor = dev.partition(":")
        kv = dict(p.split("=", 1) for p in pairs if "=" in p)
        try:
            m.io.usage.add(major=int(major), minor=int(minor), rbytes=int(kv.get("rbytes", 0)),
                           wbytes=int(kv.get("wbytes", 0)), rios=int(kv.get("rios", 0)),
                           wios=int(kv.get("wios", 0)))
        except ValueError:
            continue
    for name in sorted(os.listdir(d)):
        if name.startswith("hugetlb.") and name.endswith(".current") and name.count(".") == 2:
            size = name.split(".")[1]
            m.hugetlb.add(pagesize=size, current=_cg_uint(os.path.join(d, name)),
                          max=_cg_uint(os.path.join(d, f"hugetlb.{size}.max")))
    return m


def container_metrics(pid: int, text: str = "") -> tuple[str, bytes]:
    """(type url, serialized metrics) of the cgroup that `pid` is in (or that
    `text`, its /proc/PID/cgroup read earlier, names): v1 when its memory or
    cpu controllers are in v1 hierarchies, else v2."""
    v1, v2 = cgroup_paths(pid, text=text)
    if any(k in v1 for k in ("memory", "cpuacct", "pids")):
        return URL_CGROUPS_V1_METRICS, v1_metrics(v1).SerializeToString()
    if not v2:
        raise NotFound(f"cgroup of pid {pid} does not exist")
    return URL_CGROUPS_V2_METRICS, v2_metrics(v2).SerializeToString()


class OomWatcher:
    """Publishes TaskOOM for the containers whose cgroup reports an OOM kill.

    cgroup v1: one eventfd per container, registered on its memory cgroup's
    memory.oom_control through cgroup.event_control and watched by the loop.
    cgroup v2: one fd of memory.events per container in a shared epoll (the
    kernel flags a change with EPOLLPRI), and the oom_kill counter is compared
    with the last one seen. Nothing runs while no OOM happens. Loop thread only.
    """

    __slots__ = ("epoll", "fds", "loop", "on_oom", "watches")

    def __init__(self, loop, on_oom) -> None:
        self.loop = loop
        self.on_oom = on_oom
        self.watches: dict[str, list] = {}   # container id -> [fd, cgroup dir, is v2, oom_kill seen]
        self.fds: dict[int, str] = {}        # fd -> container id
        self.epoll = None

    def watch(self, cid: str, pid: int) -> None:
        """Starts watching the memory cgroup of `pid` for container `cid`."""
        v1, v2 = cgroup_paths(pid)
        mem = v1.get("memory")
        if mem:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                ctl = os.open(os.path.join(mem, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    reg = os.open(os.path.join(mem, "cgroup.event_control"), os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(reg, f"{fd} {ctl}".encode())
                    finally:
                        os.close(reg)
                finally:
                    os.close(ctl)
            except BaseException:
                os.close(fd)
                raise
            self.loop.add_reader(fd, self._fire, fd)
            self.watches[cid] = [fd, mem, False, 0]
        elif v2 and os.path.exists(os.path.join(v2, "memory.events")):
            import select

            fd = os.open(os.path.join(v2, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)
            if self.epoll is None:
                self.epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
                self.loop.add_reader(self.epoll.fileno(), self._v2_ready)
            self.epoll.register(fd, select.EPOLLPRI | select.EPOLLET)
            self.watches[cid] = [fd, v2, True, 0]
            self.watches[cid][3] = self._oom_kills(fd)
        else:
            return
        self.fds[self.watches[cid][0]] = cid

    def check(self, cid: str) -> None:
        """Publishes an OOM of `cid` not yet seen: called before its init's
        exit is published, so that TaskOOM comes first."""
        w = self.watches.get(cid)
        if w is not None:
            self._fire(w[0])

    def forget(self, cid: str) -> None:
        w = self.watches.pop(cid, None)
        if w is None:
            return
        fd = w[0]
        self.fds.pop(fd, None)
        if w[2]:
            self.epoll.unregister(fd)
        else:
            self.loop.remove_reader(fd)
        os.close(fd)

    @staticmethod
    def _oom_kills(fd: int) -> int:
        """oom_kill of memory.events, read through the watched fd: reading it
        is what re-arms the kernel's change notification for that fd."""
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return _parse_keyed(os.read(fd, 4096).decode()).get("oom_kill", 0)
        except OSError:
            return 0

    def _v2_ready(self) -> None:
        for fd, _ in self.epoll.poll(0):
            self._fire(fd)

    def _fire(self, fd: int) -> None:
        cid = self.fds.get(fd)
        if cid is None:
            return
        w = self.watches[cid]
        if w[2]:
            count = self._oom_kills(fd)
            fired, w[3] = count > w[3], count
        else:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            # The eventfd also fires when the cgroup is removed: no OOM then.
            fired = os.path.exists(os.path.join(w[1], "memory.oom_control"))
        if fired:
            self.on_oom(cid)


# =============================================================================
# Settings: pyshim's own file, named by a CRI runtime handler's ConfigPath.
# =============================================================================

# key -> (accepted types, what the error calls it). bool is an int to Python: the
# checks below reject a bool where a number is asked for.
SETTINGS_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "runc_binary": ((str,), "string"),
    "runc_root": ((str,), "string"),
    "systemd_cgroup": ((bool,), "boolean"),
    "log_level": ((str,), "string"),
    "template": ((bool,), "boolean"),
    "memory_release_interval": ((int, float), "number of seconds"),
    "ksm": ((str,), "string"),
}
MEMORY_RELEASE_SECONDS = 30.0


class Settings:
    """What a pyshim settings file (TOML) sets; every key is optional.

        runc_binary = "runc"              runc to drive: a name on PATH or a path
        runc_root = "/run/containerd/runc"  runc --root (the namespace is appended)
        systemd_cgroup = false            runc --systemd-cgroup
        log_level = "info"                debug, info, warning or error
        template = true                   fork shims from the warm template
        memory_release_interval = 30      seconds after activity to malloc_trim; 0: never
        ksm = "auto"                      auto: shims' memory mergeable when the
                                          host's ksmd runs; off: never ($PYSHIM_KSM
                                          overrides)

    `start` reads the file (tomllib is imported only then) and hands the long-lived
    shim its values as one JSON argument (-settings), so the shim itself never
    imports tomllib. Unknown keys and wrong types are errors naming file and key.
    """

    __slots__ = ("path", *SETTINGS_KEYS)

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.runc_binary = ""
        self.runc_root = ""
        self.systemd_cgroup = False
        self.log_level = ""
        self.template = True
        self.memory_release_interval = MEMORY_RELEASE_SECONDS
        self.ksm = "auto"

    @classmethod
    def load(cls, path: str, body: bytes = b"") -> Settings:
        """The settings in the file `path`, or in `body` (its content, as containerd
        newer than 1.6 sends it) when given. InvalidArgument on any fault."""
        import tomllib

        where = f"pyshim settings {path or '(config_body)'}"
        if not body:
            if not os.path.isabs(path):
                raise InvalidArgument(f"{where}: ConfigPath must be an absolute path")
            try:
                body = _read_small(path)
            except OSError as e:
                raise InvalidArgument(f"{where}: {e.strerror or e}") from None
        try:
            table = tomllib.loads(body.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise InvalidArgument(f"{where}: not valid TOML: {e}") from None
        return cls.from_dict(table, where, path)

    @classmethod
    def from_dict(cls, table: dict, where: str, path: str = "") -> Settings:
        """Checked settings from a parsed table; `where` prefixes every error."""
        self = cls(path)
        for key, value in table.items():
            spec = SETTINGS_KEYS.get(key)
            if spec is None:
                raise InvalidArgument(f"{where}: unknown key {key!r} (known: {', '.join(SETTINGS_KEYS)})")
            types, name = spec
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise InvalidArgument(f"{where}: key {key!r} must be a {name}, not {value!r}")
            if key == "log_level" and value not in _LEVELS:
                raise InvalidArgument(f"{where}: key 'log_level' must be one of {', '.join(_LEVELS)}, not {value!r}")
            if key == "runc_root" and not os.path.isabs(value):
                raise InvalidArgument(f"{where}: key 'runc_root' must be an absolute path, not {value!r}")
            if key == "runc_binary" and not value:
                raise InvalidArgument(f"{where}: key 'runc_binary' must not be empty")
            if key == "ksm" and value not in KSM_MODES:
                raise InvalidArgument(f"{where}: key 'ksm' must be one of {', '.join(KSM_MODES)}, not {value!r}")
            if key == "memory_release_interval":
                if not 0 <= value <= 86400:  # also rejects nan
                    raise InvalidArgument(f"{where}: key 'memory_release_interval' must be 0..86400 seconds, "
                                          f"not {value!r}")
                value = float(value)
            setattr(self, key, value)
        return self

    def to_json(self) -> str:
        """The path and every value that differs from the default, as JSON."""
        import json

        default = Settings()
        table = {k: getattr(self, k) for k in self.__slots__
                 if k == "path" or getattr(self, k) != getattr(default, k)}
        return json.dumps(table, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        """The -settings argument `start` wrote; checked again (it is argv)."""
        import json

        try:
            table = json.loads(text)
        except ValueError as e:
            raise InvalidArgument(f"-settings: {e}") from None
        if not isinstance(table, dict):
            raise InvalidArgument("-settings: not a JSON object")
        path = table.pop("path", "")
        return cls.from_dict(table, f"-settings (from {path or 'no file'})", path if isinstance(path, str) else "")


# =============================================================================
# Task service: containerd.task.v2.Task and containerd.task.v3.Task
# =============================================================================


def _valid_id(kind: str, value: str) -> str:
    """Rejects ids that could escape the bundle when used as a file name."""
    if not value or len(value) > EXEC_ID_MAX or value[0] in "._-" or not all(
            c.isascii() and (c.isalnum() or c in "._-") for c in value):
        raise InvalidArgument(f"{kind} {value!r}: must match [A-Za-z0-9][A-Za-z0-9_.-]{{0,75}}")
    return value


def _parse_any(msg, any_msg, what: str):
    """`msg` parsed from the value of `any_msg`: a value that does not parse
    is the caller's bad input (InvalidArgument), never an internal error."""
    try:
        msg.ParseFromString(any_msg.value)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and its kin
        raise InvalidArgument(f"{what} {any_msg.type_url!r}: {e}") from None
    return msg


def decode_options(any_msg, settings: Settings | None = None):
    """Runtime options of any type containerd sends, as one RuncOptions.

    CRI options name a settings file: its runc keys become the options. The
    shim's own `settings` (read by `start`) stand in for the file they came
    from; another file is read here (a container of another handler)."""
    import pyshim_pb2 as pb

    opts = pb.RuncOptions()
    if any_msg is None or not any_msg.type_url:
        return opts
    url = any_msg.type_url.rsplit("/", 1)[-1]
    if url in URL_CRI_OPTIONS:
        cri = _parse_any(pb.CriRuntimeOptions(), any_msg, "runtime options")
    elif url == URL_RUNC_OPTIONS:
        _parse_any(opts, any_msg, "runtime options")
    elif url == URL_LINUX_CREATE_OPTIONS:
        lin = _parse_any(pb.LinuxCreateOptions(), any_msg, "runtime options")
    else:
        raise InvalidArgument(f"unsupported runtime options type {any_msg.type_url!r}")
    if url in URL_CRI_OPTIONS:
        if not cri.config_path and not cri.config_body:
            return opts
        if settings is not None and settings.path == cri.config_path and not cri.config_body:
            s = settings
        else:
            s = Settings.load(cri.config_path, cri.config_body)
        opts.binary_name = s.runc_binary
        opts.root = s.runc_root
        opts.systemd_cgroup = s.systemd_cgroup
    elif url == URL_LINUX_CREATE_OPTIONS:
        opts.no_pivot_root = lin.no_pivot_root
        opts.no_new_keyring = lin.no_new_keyring
        opts.shim_cgroup = lin.shim_cgroup
        opts.io_uid = lin.io_uid
        opts.io_gid = lin.io_gid
        opts.criu_image_path = lin.criu_image_path
        opts.criu_work_path = lin.criu_work_path
        opts.systemd_cgroup = lin.cgroups_mode == "systemd"
    return opts


def decode_checkpoint_options(any_msg):
    """Checkpoint options of either type, as one RuncCheckpointOptions (the
    two messages share field names, not numbers)."""
    import pyshim_pb2 as pb

    opts = pb.RuncCheckpointOptions()
    if any_msg is None or not any_msg.type_url:
        return opts
    url = any_msg.type_url.rsplit("/", 1)[-1]
    if url == URL_RUNC_CHECKPOINT_OPTIONS:
        _parse_any(opts, any_msg, "checkpoint options")
    elif url == URL_LINUX_CHECKPOINT_OPTIONS:
        lin = _parse_any(pb.LinuxCheckpointOptions(), any_msg, "checkpoint options")
        for name in ("exit", "open_tcp", "external_unix_sockets", "terminal", "file_locks",
                     "cgroups_mode", "image_path", "work_path"):
            setattr(opts, name, getattr(lin, name))
        opts.empty_namespaces.extend(lin.empty_namespaces)
    else:
        raise InvalidArgument(f"unsupported checkpoint options type {any_msg.type_url!r}")
    return opts


# Go's zero time.Time as a Timestamp (0001-01-01): what the Go shim sends as
# the exit time of a process that has not exited (it never leaves it unset).
GO_ZERO_TIME_SECONDS = -62135596800


def _ts(msg_field, ns: int) -> None:
    """An exit time into `msg_field`; 0 (not exited) as the Go shim writes it."""
    if ns:
        msg_field.FromNanoseconds(ns)
    else:
        msg_field.seconds = GO_ZERO_TIME_SECONDS


def _empty():
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()


class TaskService:
    """containerd.task.v2.Task and containerd.task.v3.Task (one handler table
    under both names) for the containers of this shim.

    Handlers are thin: look up the process, call it, publish the event.
    Exits go through one ExitRouter, which keeps the ordering rules (see
    there). Loop thread only.
    """

    def __init__(self, loop, runner: Runner, publisher: Publisher, namespace: str, on_empty,
                 settings: Settings | None = None) -> None:
        self.loop = loop
        self.settings = settings  # from start's -settings: stands in for its file
        self.runner = runner
        self.publisher = publisher
        self.namespace = namespace
        self.on_empty = on_empty
        self.containers: dict[str, Container] = {}
        self.exits = ExitRouter(self._exited, self._publish_exit)
        self.creating: set[str] = set()  # ids whose Create is in flight
        self.oom: OomWatcher | None = None  # made at the first Start

    def methods(self) -> dict:
        import pyshim_pb2 as pb

        table = {
            "State": (pb.StateRequest, self.state),
            "Create": (pb.CreateTaskRequest, self.create),
            "Start": (pb.StartRequest, self.start),
            "Delete": (pb.DeleteRequest, self.delete),
            "Pids": (pb.PidsRequest, self.pids_),
            "Pause": (pb.PauseRequest, self.pause),
            "Resume": (pb.ResumeRequest, self.resume),
            "Checkpoint": (pb.CheckpointTaskRequest, self.checkpoint),
            "Kill": (pb.KillRequest, self.kill),
            "Exec": (pb.ExecProcessRequest, self.exec_),
            "ResizePty": (pb.ResizePtyRequest, self.resize_pty),
            "CloseIO": (pb.CloseIORequest, self.close_io),
            "Update": (pb.UpdateTaskRequest, self.update),
            "Wait": (pb.WaitRequest, self.wait),
            "Stats": (pb.StatsRequest, self.stats),
            "Connect": (pb.ConnectRequest, self.connect),
            "Shutdown": (pb.ShutdownRequest, self.shutdown),
        }
        return {(service, name): entry for service in TASK_SERVICES for name, entry in table.items()}

    @property
    def pids(self) -> dict[int, Process]:
        """Processes by pid, until their exit (the exit router's table)."""
        return self.exits.pids

    def container(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found")
        return c

    def _publish(self, topic: str, msg) -> None:
        self.publisher.publish(topic, EVENT_URL + type(msg).__name__, msg.SerializeToString())

    # --- Create --------------------------------------------------------------

    async def create(self, req, meta):
        cid = _valid_id("container id", req.id)
        if cid in self.containers or cid in self.creating:
            raise AlreadyExists(f"container {cid}: already exists")
        # Claimed until this Create ends: a second Create of the same id while
        # the first waits for runc must not mount over (and, failing, unmount)
        # the first one's rootfs.
        self.creating.add(cid)
        try:
            return await self._create(cid, req, meta)
        finally:
            self.creating.discard(cid)

    async def _create(self, cid: str, req, meta):
        import pyshim_pb2 as pb

        ns = meta.get(NAMESPACE_KEY) or self.namespace
        c, opts = self._new_container(cid, req, ns)
        p = c.init = InitProcess(cid, c, Stdio(self.loop, req.stdin, req.stdout, req.stderr, req.terminal),
                                 self.loop)
        sub = self.exits.subscribe()  # before runc create spawns the init
        try:
            await self._bring_up(c, p, req, opts, ns)
            if p.pid:
                self.exits.claim(sub, p)
                p.remember_cgroup()
            self.containers[cid] = c
            ev = pb.TaskCreate(container_id=cid, bundle=req.bundle, checkpoint=req.checkpoint, pid=p.pid)
            ev.rootfs.extend(req.rootfs)
            ev.io.stdin, ev.io.stdout, ev.io.stderr, ev.io.terminal = req.stdin, req.stdout, req.stderr, req.terminal
            self._publish("/tasks/create", ev)
        finally:
            self.exits.end(sub)
        log("info", "task created", id=cid, process_pid=p.pid, checkpoint=req.checkpoint)
        return pb.CreateTaskResponse(pid=p.pid)

    def _new_container(self, cid: str, req, ns: str) -> tuple[Container, object]:
        """The Container of a Create: its config.json read, its options decoded,
        its runc found."""
        import json

        bundle = req.bundle
        try:
            config = json.loads(_read_small(os.path.join(bundle, "config.json"), 16 << 20))
        except FileNotFoundError:
            raise InvalidArgument(f"bundle {bundle!r}: config.json: no such file or directory") from None
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"bundle {bundle!r}: config.json: {e}") from None
        opts = decode_options(req.options if req.HasField("options") else None, self.settings)
        try:
            binary = which(opts.binary_name or "runc")
        except FileNotFoundError as e:
            raise FailedPrecondition(f"runc binary not found: {e.strerror}") from None
        runc = Runc(self.runner, binary, os.path.join(opts.root or RUNC_ROOT, ns), bundle,
                    systemd=opts.systemd_cgroup, no_pivot=opts.no_pivot_root,
                    no_new_keyring=opts.no_new_keyring, criu=opts.criu_path)
        c = Container(cid, bundle, runc)
        namespaces = ((config.get("linux") or {}).get("namespaces")) or []
        c.shares_pidns = not any(n.get("type") == "pid" and not n.get("path") for n in namespaces)
        return c, opts

    async def _bring_up(self, c: Container, p: InitProcess, req, opts, ns: str) -> None:
        """Rootfs mounted, stdio open, then `runc create` (or, for a checkpoint,
        what Start's restore needs); undone on failure."""
        import json

        try:
            if req.rootfs:
                try:
                    os.mkdir(c.rootfs, 0o711)  # as the Go shim: a bundle may come without one
                except FileExistsError:
                    pass
            for m in req.rootfs:
                mount(m.type, m.source, c.rootfs, list(m.options))
                c.mounted = True
            # Cleanup after a shim death (`shim delete`) needs the same runc.
            _atomic_write(c.bundle, "options.json",
                          json.dumps({"binary_name": c.runc.binary, "root": opts.root or RUNC_ROOT}).encode(),
                          mode=0o600)  # as the Go shim's: it names the runc root
            c.io_owner = (opts.io_uid, opts.io_gid)
            fds = p.stdio.open(*c.io_owner)
            if p.stdio.logging_binary is not None:
                await p.stdio.logging_binary.start(self.loop, self.runner.reaper, c.id, ns)
            if req.checkpoint:
                # As the Go shim: nothing runs until Start restores it; criu
                # works in CriuWorkPath, else in the bundle's work dir.
                work = opts.criu_work_path or os.path.join(c.bundle, "work")
                c.restore = (req.checkpoint, req.parent_checkpoint, work, fds)
            else:
                await p.create(fds)
        except BaseException:
            p.stdio.close()
            if c.mounted:
                try:
                    unmount_all(c.rootfs)
                except OSError as e:
                    log("warning", "unmount after failed create", error=str(e))
            raise

    # --- Start and Exec ------------------------------------------------------

    async def start(self, req, meta):
        import pyshim_pb2 as pb

        c = self.container(req.id)
        p = c.process(req.exec_id)
        sub = self.exits.subscribe(p)  # before runc spawns anything
        try:
            await p.start(self.exits, self.namespace)
            self.exits.claim(sub, p)
            self._publish(*p.started_event())
            if p is c.init:
                p.remember_cgroup()  # a restored init has its pid only now
                self._watch_oom(c)
        finally:
            # An exit held while starting is published now: after the start
            # event on success, and at all on failure.
            self.exits.end(sub)
        return pb.StartResponse(pid=p.pid)

    async def exec_(self, req, meta):
        import json

        import pyshim_pb2 as pb

        c = self.container(req.id)
        eid = _valid_id("exec id", req.exec_id)
        c.check_exec(eid)
        try:
            json.loads(req.spec.value)  # as the Go shim: a spec that is no JSON is refused here
        except ValueError as e:
            raise ShimError(f"process spec of exec {eid}: {e}") from None
        stdio = Stdio(self.loop, req.stdin, req.stdout, req.stderr, req.terminal)
        c.execs[eid] = ExecProcess(eid, c, stdio, self.loop, spec=req.spec.value)
        self._publish("/tasks/exec-added", pb.TaskExecAdded(container_id=c.id, exec_id=eid))
        return _empty()

    def _watch_oom(self, c: Container) -> None:
        if self.oom is None:
            self.oom = OomWatcher(self.loop, self._publish_oom)
        try:
            self.oom.watch(c.id, c.init.pid)
        except (OSError, ShimError) as e:
            # A task that has already exited (/bin/true) has no cgroup left to
            # watch: that is normal, not worth a warning.
            log("debug" if c.init.has_exited() else "warning", "cannot watch the container for OOM kills",
                id=c.id, error=str(e))

    def _publish_oom(self, cid: str) -> None:
        import pyshim_pb2 as pb

        self._publish("/tasks/oom", pb.TaskOOM(container_id=cid))
        log("info", "container OOM-killed a process", id=cid)

    # --- exits ---------------------------------------------------------------

    def on_exit(self, pid: int, code: int, at: int | None = None) -> None:
        """The reaper's callback for every exit that is not a runc command's."""
        self.exits.on_exit(pid, code, at)

    def _exited(self, p: Process, code: int, at: int) -> None:
        """ExitRouter's delivery: an init's exit is published after its
        clean-up (InitProcess.clean_up_after_exit), if it needs one."""
        c = p.container
        if p is c.init:
            if self.oom is not None:
                self.oom.check(c.id)  # TaskOOM goes before the exit it caused
            if p.needs_cleanup_after_exit():
                self.loop.create_task(self._publish_after_cleanup(p, code, at))
                return
        self.exits.publish_exit(p, code, at)

    async def _publish_after_cleanup(self, p: InitProcess, code: int, at: int) -> None:
        await p.clean_up_after_exit()
        self.exits.publish_exit(p, code, at)

    def _publish_exit(self, p: Process, code: int, at: int) -> None:
        import pyshim_pb2 as pb

        p.set_exited(code, at)
        ev = pb.TaskExit(container_id=p.container.id, id=p.id, pid=p.pid, exit_status=code)
        _ts(ev.exited_at, at)
        self._publish("/tasks/exit", ev)
        log("info", "process exited", id=p.container.id, exec_id=p.id, process_pid=p.pid, status=code)

    # --- the other methods -----------------------------------------------------

    async def state(self, req, meta):
        import pyshim_pb2 as pb

        c = self.container(req.id)
        p = c.process(req.exec_id)
        s = p.stdio
        # exec_id is left empty, as the Go shim leaves it (containerd reads `id`).
        resp = pb.StateResponse(id=p.id, bundle=c.bundle, pid=p.pid, status=p.status,
                                stdin=s.stdin, stdout=s.stdout, stderr=s.stderr, terminal=s.terminal,
                                exit_status=p.exit_status)
        _ts(resp.exited_at, p.exited_at)
        return resp

    async def wait(self, req, meta):
        import asyncio

        import pyshim_pb2 as pb

        p = self.container(req.id).process(req.exec_id)
        await asyncio.shield(p.wait)
        resp = pb.WaitResponse(exit_status=p.exit_status)
        _ts(resp.exited_at, p.exited_at)
        return resp

    async def kill(self, req, meta):
        await self.container(req.id).process(req.exec_id).kill(req.signal, req.all)
        return _empty()

    async def pause(self, req, meta):
        import pyshim_pb2 as pb

        c = self.container(req.id)
        await c.init.pause()
        self._publish("/tasks/paused", pb.TaskPaused(container_id=c.id))
        return _empty()

    async def resume(self, req, meta):
        import pyshim_pb2 as pb

        c = self.container(req.id)
        await c.init.resume()
        self._publish("/tasks/resumed", pb.TaskResumed(container_id=c.id))
        return _empty()

    async def update(self, req, meta):
        """Passes the OCI LinuxResources JSON in `resources` to `runc update`."""
        await self.container(req.id).init.update(req.resources.value)
        return _empty()

    async def checkpoint(self, req, meta):
        """`runc checkpoint` of the init into `req.path`; on failure the caller
        gets runc's own words and where criu's log was copied."""
        c = self.container(req.id)
        opts = await c.init.checkpoint(req.path, lambda: decode_checkpoint_options(
            req.options if req.HasField("options") else None))
        log("info", "task checkpointed", id=c.id, path=req.path, exit=opts.exit)
        return _empty()

    async def stats(self, req, meta):
        import pyshim_pb2 as pb

        url, value = self.container(req.id).init.metrics()
        resp = pb.StatsResponse()
        resp.stats.type_url = url
        resp.stats.value = value
        return resp

    async def delete(self, req, meta):
        import pyshim_pb2 as pb

        c = self.container(req.id)
        p = c.process(req.exec_id)
        await p.delete(self.oom)
        self.exits.forget(p)
        if p is c.init:
            del self.containers[c.id]
            # A container and its processes refer to each other (init, execs <->
            # Process.container): unlinked here, refcounting frees them at once.
            # Left to the cyclic GC, a grouped shim holds every deleted container
            # until a collection, which Python 3.13 runs after 2000 net allocations
            # (3.11: 700): ~200 of them (+320 kB RSS) in a create/delete soak.
            c.init = None
            c.execs.clear()
            ev = pb.TaskDelete(container_id=c.id, pid=p.pid, exit_status=p.exit_status, id=c.id)
            _ts(ev.exited_at, p.exited_at)
            self._publish("/tasks/delete", ev)
        resp = pb.DeleteResponse(pid=p.pid, exit_status=p.exit_status)
        _ts(resp.exited_at, p.exited_at)
        return resp

    async def pids_(self, req, meta):
        import pyshim_pb2 as pb

        c = self.container(req.id)
        pids = await c.runc.ps(c.id)
        by_pid = {e.pid: e.id for e in c.execs.values() if e.pid}
        resp = pb.PidsResponse()
        for pid in pids:
            info = resp.processes.add(pid=pid)
            if pid in by_pid:
                info.info.type_url = URL_PROCESS_DETAILS
                info.info.value = pb.ProcessDetails(exec_id=by_pid[pid]).SerializeToString()
        return resp

    async def resize_pty(self, req, meta):
        self.container(req.id).process(req.exec_id).resize(req.width, req.height)
        return _empty()

    async def close_io(self, req, meta):
        self.container(req.id).process(req.exec_id).close_io()
        return _empty()

    async def connect(self, req, meta):
        import pyshim_pb2 as pb

        c = self.containers.get(req.id)
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0, version=VERSION)

    async def shutdown(self, req, meta):
        if not self.containers:
            # Answer first; the shim stops once the response is written.
            self.loop.call_soon(self.on_empty)
        return _empty()

    async def kill_all(self) -> None:
        """At shutdown: SIGKILL to every process of every container."""
        for c in list(self.containers.values()):
            await c.init.kill_all()


# =============================================================================
# Events: one ordered queue, delivered to containerd with retries.
# =============================================================================


class Publisher:
    """Forwards events to containerd in publish order.

    Over ttrpc (`TTRPC_ADDRESS`) when known, else through the publish binary
    (`BIN --address A publish --topic T --namespace NS`, the Any on stdin).
    While containerd is away the head event is retried with backoff; the
    queue is bounded (the oldest is dropped, with an error logged, past
    EVENT_QUEUE_MAX) and `publish` never blocks.
    """

    __slots__ = (
        "address",
        "binary",
        "client",
        "idle",
        "loop",
        "namespace",
        "queue",
        "runner",
        "task",
        "ttrpc_address",
        "wake",
    )

    def __init__(self, loop, runner: Runner | None, namespace: str, ttrpc_address: str,
                 binary: str, address: str) -> None:
        import asyncio
        import collections

        self.loop = loop
        self.runner = runner
        self.namespace = namespace
        self.ttrpc_address = ttrpc_address
        self.binary = binary
        self.address = address
        self.queue: collections.deque = collections.deque()
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.client: TtrpcClient | None = None
        self.task = None

    def start(self) -> None:
        self.task = self.loop.create_task(self._run())

    def publish(self, topic: str, type_url: str, value: bytes) -> None:
        if len(self.queue) >= EVENT_QUEUE_MAX:
            dropped = self.queue.popleft()
            log("error", "event queue full: dropping the oldest event", topic=dropped[0])
        self.queue.append((topic, type_url, value, time.time_ns()))
        self.idle.clear()
        if not self.wake.is_set():
            # Woken a turn of the loop later: the reply of the request that
            # published (Create, Start) is written first, as the Go shim's
            # events go out beside its replies, not ahead of them.
            self.loop.call_soon(self.wake.set)

    async def flush(self, timeout: float) -> bool:
        """Waits until every queued event is delivered; False on timeout."""
        import asyncio

        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        import asyncio

        backoff = 0.05
        while True:
            if not self.queue:
                self.idle.set()
                self.wake.clear()
                await self.wake.wait()
                continue
            item = self.queue[0]
            try:
                await self._send(*item)
            except RemoteError as e:
                log("error", "containerd refused an event: dropped", topic=item[0], error=str(e))
            except (TimeoutError, OSError, ConnectionError, RuntimeFailure) as e:
                # One warning per outage; the retries after it log at debug.
                log("warning" if backoff == 0.05 else "debug", "publishing an event failed: will retry",
                    topic=item[0], error=str(e) or repr(e))
                if self.client is not None:
                    self.client.close()
                    self.client = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            self.queue.popleft()
            backoff = 0.05

    async def _send(self, topic: str, type_url: str, value: bytes, at: int) -> None:
        import pyshim_pb2 as pb

        if self.ttrpc_address:
            if self.client is None or self.client.closed:
                self.client = await TtrpcClient.connect(self.ttrpc_address, self.loop)
            req = pb.ForwardRequest()
            env = req.envelope
            env.timestamp.FromNanoseconds(at)
            env.namespace = self.namespace
            env.topic = topic
            env.event.type_url = type_url
            env.event.value = value
            await self.client.call(EVENTS_SERVICE, "Forward", req.SerializeToString(),
                                   {NAMESPACE_KEY: self.namespace}, timeout=10)
            return
        from google.protobuf import any_pb2

        data = any_pb2.Any(type_url=type_url, value=value).SerializeToString()
        argv = [self.binary, "--address", self.address, "publish", "--topic", topic,
                "--namespace", self.namespace]
        code, out = await self.runner.run(argv, input=data, capture=True)
        if code != 0:
            raise RuntimeFailure(f"{self.binary} publish: exit status {code}: {out[:300]!r}")


# =============================================================================
# start / delete: the short-lived actions containerd runs.
# =============================================================================


USAGE = """\
Usage: containerd-shim-pyshim-v1 [flags] [start | delete]
containerd runs this binary for runtime io.containerd.pyshim.v1; it is not
meant to be started by hand. Flags:
  -namespace NS         containerd namespace that owns the shim (required)
  -id ID                the task's id
  -address PATH         containerd's socket
  -publish-binary PATH  containerd's binary, to publish events with when
                        TTRPC_ADDRESS is unset
  -bundle DIR           the bundle (delete only; default: working directory)
  -socket ADDR          accepted for compatibility; the socket is fd 3
  -debug-socket ADDR    accepted for compatibility (the Go shim's pprof socket);
                        pyshim serves none: SIGUSR1 dumps its stacks to the log
  -debug                log at debug level
  -info                 read runtime options (an Any) on stdin, print a
                        containerd.types.RuntimeInfo protobuf on stdout, exit
  -settings JSON        settings `start` read from a CRI handler's ConfigPath
  -v                    print the version and exit
By hand, on a node: containerd-shim-pyshim-v1 memory [-json] lists every
pyshim process with its memory (PSS, USS, RSS), the total and the total per
container.
"""


class Flags:
    """The shim's command line, parsed as Go's flag package does: an unknown
    flag exits 2 with the usage, -h / -help exits 0 with it."""

    __slots__ = (
        "action",
        "address",
        "bundle",
        "debug",
        "debug_socket",
        "id",
        "info",
        "namespace",
        "publish_binary",
        "settings",
        "socket",
        "version",
    )

    # -settings is pyshim's own: `start` passes the long-lived shim its Settings.
    STRINGS = frozenset({"namespace", "address", "publish-binary", "id", "bundle", "socket", "settings",
                         "debug-socket"})
    BOOLS = frozenset({"debug", "v", "info"})

    def __init__(self, argv: list[str]) -> None:
        self.namespace = self.address = self.publish_binary = self.id = ""
        self.bundle = self.socket = self.settings = self.debug_socket = ""
        self.debug = self.version = self.info = False
        self.action = ""
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg == "--" or not arg.startswith("-") or arg == "-":
                rest = argv[i + 1:] if arg == "--" else argv[i:]
                self.action = rest[0] if rest else ""
                return
            name, eq, value = arg.lstrip("-").partition("=")
            if name in ("h", "help"):
                sys.stderr.write(USAGE)
                raise SystemExit(0)
            if name in self.BOOLS:
                on = value.lower() not in ("false", "0") if eq else True
                setattr(self, {"v": "version"}.get(name, name), on)
            elif name in self.STRINGS:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        self._bad(f"flag needs an argument: -{name}")
                    value = argv[i]
                setattr(self, name.replace("-", "_"), value)
            else:
                self._bad(f"flag provided but not defined: -{name}")
            i += 1

    @staticmethod
    def _bad(message: str) -> None:
        sys.stderr.write(f"{message}\n{USAGE}")
        raise SystemExit(2)


def group_id(bundle: str, default: str) -> str:
    """The shim group of a container: its group annotation, else its id."""
    try:
        raw = _read_small(os.path.join(bundle, "config.json"), 16 << 20)
    except OSError:
        return default
    # json costs `start` ~10 ms of imports (re): only parsed when it may matter.
    if not any(key.encode() in raw for key in GROUP_ANNOTATIONS):
        return default
    import json

    try:
        spec = json.loads(raw)
    except ValueError:
        return default
    ann = (spec.get("annotations") if isinstance(spec, dict) else None) or {}
    for key in GROUP_ANNOTATIONS:
        if ann.get(key):
            return ann[key]
    return default


def _sha256_hex(data: bytes) -> str:
    """sha256 without hashlib, whose OpenSSL binding costs `start` ~4 ms."""
    try:
        from _sha256 import sha256  # CPython <= 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # CPython >= 3.12
        except ImportError:
            from hashlib import sha256
    return sha256(data).hexdigest()


def socket_path(containerd_address: str, namespace: str, group: str) -> str:
    """Path of the shim socket: sha256 of containerd address/namespace/group."""
    import posixpath

    joined = posixpath.normpath(posixpath.join(containerd_address, namespace, group))
    if joined.startswith("//"):
        joined = joined[1:]
    path = os.path.join(SOCKET_DIR, _sha256_hex(joined.encode()))
    if len(path) > SOCKET_PATH_LIMIT:
        raise OSError(36, f"socket path {path!r} is longer than {SOCKET_PATH_LIMIT} bytes")
    return path


def _socket_dir() -> None:
    """Makes SOCKET_DIR 0700. An existing one is set to 0700 too when it is
    ours: containerd's Go shims create it 0600 (root ignores the missing x)."""
    os.makedirs(SOCKET_DIR, 0o700, exist_ok=True)
    st = os.lstat(SOCKET_DIR)
    if st.st_uid == os.geteuid() and st.st_mode & 0o7777 != 0o700:
        os.chmod(SOCKET_DIR, 0o700)


def _can_connect(path: str) -> bool:
    """Whether a process listens on `path`. Never waits: a listener whose
    backlog is full (a busy or stopped shim) answers EAGAIN at once, and is
    there all the same; only ENOENT and ECONNREFUSED say nobody is."""
    try:
        os.close(unix_connect(path, nonblock=True))
        return True
    except OSError as e:
        return e.errno == EAGAIN


def _python_argv() -> list[str]:
    """How this program was started: the interpreter with its -I/-S flags
    (see bin/containerd-shim-pyshim-v1) and the script, or `-m pyshim`."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and os.path.isfile(sys.argv[0]) else ""
    opts = ("I" if sys.flags.isolated else "") + ("S" if sys.flags.no_site else "")
    argv = [sys.executable] + (["-" + opts] if opts and script else [])
    return argv + ([script] if script else ["-m", "pyshim"])


def shim_argv(flags: Flags) -> list[str]:
    """The command line of the long-lived shim for these flags."""
    argv = _python_argv() + ["-namespace", flags.namespace, "-id", flags.id, "-address", flags.address]
    if flags.publish_binary:
        argv += ["-publish-binary", flags.publish_binary]
    if flags.debug:
        argv.append("-debug")
    if flags.settings:
        argv += ["-settings", flags.settings]
    return argv


def spawn_shim(flags: Flags, sock_fd: int, template: bool = True) -> int:
    """Launches the long-lived shim serving `sock_fd` (as its fd 3); returns its pid.

    The one place a shim process is made. It is forked from the warm template
    (unless PYSHIM_TEMPLATE=0 or `template` is false); whenever the template cannot be had, it is
    spawned cold. Either way cwd (the bundle), environment and arguments are
    this process's own.
    """
    argv = shim_argv(flags)
    if os.environ.get(TEMPLATE_ENV, "1") != "0" and template:
        try:
            return template_fork(argv, sock_fd, flags.address)
        except (OSError, ValueError) as e:
            log("warning", "warm template unavailable: starting the shim cold", error=str(e))
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        # stdout must not be inherited: containerd reads start's stdout to EOF.
        return spawn(argv, (null, null, null), setpgroup=True, extra=((sock_fd, 3),))
    finally:
        os.close(null)


def _adjust_oom_score(pid: int, parent: int) -> None:
    """The shim is a little more killable than containerd (`parent`, the
    process that ran `start`), as the Go shim is."""
    try:
        score = str(min(int(_read_small(f"/proc/{parent}/oom_score_adj")) + 1, 1000)).encode()
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, score)
        finally:
            os.close(fd)
    except (OSError, ValueError) as e:
        log("warning", "could not adjust the shim's oom score", error=str(e))


def _log_to_bundle(bundle: str) -> None:
    """Points `log` at the bundle's log fifo when containerd reads it, else
    nowhere: containerd takes everything `start` writes to stdout *and*
    stderr as the shim address, so `start` never writes to stderr."""
    try:
        log.fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        log.fd = -1


def _pb_strings(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (last one wins),
    skipping the others: enough to read a string option without importing
    protobuf on the lean `start` path. ValueError on malformed input."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            b = data[i]
            value |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                return value, i
            shift += 7

    out: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(i)
            out[key >> 3] = data[i:i + n]
            i += n
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(data):
            raise ValueError("truncated field")
    return out


def _shim_cgroup(any_bytes: bytes) -> str:
    """ShimCgroup from the runtime options `start` gets on stdin (an Any of
    containerd.runc.v1.Options, field 3, or containerd.linux.runc.CreateOptions,
    field 9); "" when absent or unreadable (Create decodes the options fully)."""
    if not any_bytes:
        return ""
    try:
        fields = _pb_strings(any_bytes)
        url = fields.get(1, b"").decode().rsplit("/", 1)[-1]
        number = {URL_RUNC_OPTIONS: 3, URL_LINUX_CREATE_OPTIONS: 9}.get(url)
        if number is None:
            return ""
        return _pb_strings(fields.get(2, b"")).get(number, b"").decode()
    except (ValueError, UnicodeDecodeError) as e:
        log("warning", "unreadable runtime options on stdin", error=str(e))
        return ""


def _cri_settings(any_bytes: bytes) -> Settings | None:
    """The settings named by CRI runtime options on `start`'s stdin (an Any of
    runtimeoptions.v1.Options), read without protobuf; None when the options are
    of another type or name no file. InvalidArgument on a bad file."""
    fields = _pb_strings(any_bytes)
    if fields.get(1, b"").decode().rsplit("/", 1)[-1] not in URL_CRI_OPTIONS:
        return None
    inner = _pb_strings(fields.get(2, b""))
    path, body = inner.get(2, b"").decode(), inner.get(3, b"")
    if not path and not body:
        return None
    return Settings.load(path, body)


def _join_cgroup(pid: int, path: str) -> None:
    """Moves the shim into the existing cgroup `path`, in every hierarchy that
    has it (cgroup v1 controllers, and v2 / unified), as the Go shim does for
    ShimCgroup. None having it is an error: the operator asked for it."""
    root = CGROUP_ROOT
    rel = path.strip("/")
    if not rel or ".." in rel.split("/"):
        raise InvalidArgument(f"shim cgroup {path!r}: not a cgroup path")
    dirs = [root] if _pure_v2(root) else [
        os.path.join(root, d) for d in sorted(os.listdir(root))
        if os.path.isdir(os.path.join(root, d)) and not os.path.islink(os.path.join(root, d))]
    joined = 0
    for d in dirs:
        procs = os.path.join(d, rel, "cgroup.procs")
        if not os.path.exists(procs):
            continue
        with open(procs, "w") as f:
            f.write(str(pid))
        joined += 1
    if not joined:
        raise FailedPrecondition(f"shim cgroup {path!r} does not exist in any cgroup hierarchy")


# What a new shim (and the template) import beyond what `start` itself has
# loaded (this module, _reaper, cffi's backend).
SHIM_MODULES = ("pyshim_pb2", "uvloop", "google.protobuf")


def install_gaps(loaded: bool = False) -> list[str]:
    """What the install this `start` runs from lacks for a new shim: its
    interpreter, its launcher, modules of SHIM_MODULES, each as a path or a
    module name; [] when whole. A half-removed install (an `rm -rf` or a pip
    uninstall in progress, a dependency gone) would otherwise start a shim
    that dies at its first import, with a traceback in containerd's log.
    Modules are looked for on the path, not imported (that would cost the
    start tens of ms); their directories are already listed in the import
    system's cache: about 0.3 ms. With `loaded` (a warm start, in a process
    forked from the template, which imported them all), a module imported
    here counts as there while the file it came from is: a stat each, about
    0.02 ms in all."""
    # importlib.machinery's PathFinder, from the module the interpreter has
    # loaded at start-up (importing importlib.machinery costs 0.5 ms more).
    from _frozen_importlib_external import PathFinder

    script = sys.argv[0] if sys.argv and "/" in sys.argv[0] else ""  # not `-c`
    gaps = [p for p in (sys.executable, script) if p and not os.path.exists(p)]
    for name in SHIM_MODULES:
        origin = getattr(sys.modules.get(name), "__file__", None) if loaded else None
        if origin:
            if not os.path.exists(origin):
                gaps.append(name)
            continue
        top, _, sub = name.partition(".")
        spec = PathFinder.find_spec(top)
        if spec is not None and sub:
            spec = PathFinder.find_spec(name, spec.submodule_search_locations)
        if spec is None or (spec.has_location and not os.path.exists(spec.origin or "")):
            gaps.append(name)
    return gaps


def action_start(flags: Flags) -> int:
    """`start` run as its own process (cold): the Python path of the launcher."""
    _log_to_bundle(os.getcwd())
    try:
        options = sys.stdin.buffer.read()  # an Any of the runtime options, or nothing
    except (OSError, ValueError, AttributeError):
        options = b""
    answer = start_work(flags, options, os.getcwd(), os.getppid(), spawn_shim)
    sys.stdout.write(answer)
    return 0


def start_work(flags: Flags, options: bytes, bundle: str, parent: int, spawner,
               warm: bool = False) -> str:
    """All of `start`'s work for the container in `bundle`, run by containerd's
    process `parent`, with runtime options `options`; returns what `start`
    prints. `spawner(flags, sock_fd, template_ok)` launches the long-lived
    shim and returns its pid: spawn_shim in a cold `start`, the template's own
    fork when the native launcher hands `start` to the warm template (`warm`:
    this process is a child of the template). The caller points `log` at the
    bundle first (_log_to_bundle)."""
    log.fields = f" namespace={_quote(flags.namespace)} id={_quote(flags.id)} runtime={RUNTIME_NAME}"
    shim_cgroup = _shim_cgroup(options)
    path = socket_path(flags.address, flags.namespace, group_id(bundle, flags.id))
    address = "unix://" + path
    _socket_dir()
    try:
        fd = unix_listen(path)
    except OSError as e:
        if e.errno != 98:  # EADDRINUSE
            raise
        if _can_connect(path):
            # The group's shim is alive: this container joins it.
            _atomic_write(bundle, "address", address.encode())
            return bootstrap_answer(address, _containerd_binary(flags, parent))
        os.unlink(path)
        fd = unix_listen(path)
    try:
        os.chmod(path, 0o600)
        # Only a new shim reads the settings file: a container joining its group's
        # shim above is served with the settings that shim started with.
        try:
            settings = _cri_settings(options) if options else None
        except ValueError as e:  # malformed protobuf: Create will say more
            log("warning", "unreadable runtime options on stdin", error=str(e))
            settings = None
        if settings is not None:
            if settings.log_level:
                log.level = _LEVELS[settings.log_level]
            flags.settings = settings.to_json()
        gaps = install_gaps(loaded=warm)
        if gaps:
            raise FailedPrecondition(
                f"refusing to start a shim from a half-removed install: {', '.join(gaps)} not found"
                f" (by {sys.executable}, in {[d for d in sys.path if d]}); reinstall pyshim")
        pid = spawner(flags, fd, settings is None or settings.template)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    _adjust_oom_score(pid, parent)
    if shim_cgroup:
        try:
            _join_cgroup(pid, shim_cgroup)
        except BaseException:
            # As the Go shim: no shim is left running outside the cgroup asked for.
            os.kill(pid, 9)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
    _atomic_write(bundle, "address", address.encode())
    return bootstrap_answer(address, _containerd_binary(flags, parent))


def containerd_major(binary: str) -> int:
    """The major version of the containerd executable `binary` (the -publish-binary
    containerd passes, its own os.Executable()), read from the Go build info
    every Go binary carries in its .go.buildinfo ELF section: its main package is
    github.com/containerd/containerd/cmd/containerd in 1.x and
    github.com/containerd/containerd/v2/cmd/containerd in 2.x. No subprocess (a
    `containerd --version` costs `start` tens of ms), about 8 kB read. 0 when it
    cannot be told (not a 64-bit little-endian ELF, an old Go layout, no such
    file): the caller then answers what every containerd accepts."""
    try:
        with open(binary, "rb") as f:
            head = f.read(64)
            if head[:6] != b"\x7fELF\x02\x01":
                return 0
            shoff = struct.unpack_from("<Q", head, 0x28)[0]
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
            if shentsize < 64 or not 0 < shnum <= 4096 or shstrndx >= shnum:
                return 0
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            # (name offset, file offset, size) of each section header
            secs = [struct.unpack_from("<I20xQQ", table, i * shentsize) for i in range(shnum)]
            f.seek(secs[shstrndx][1])
            names = f.read(min(secs[shstrndx][2], 1 << 16))
            for name_at, offset, size in secs:
                if names[name_at:name_at + 14] == b".go.buildinfo\0":
                    f.seek(offset)
                    info = f.read(min(size, 4096))
                    break
            else:
                return 0
    except (OSError, struct.error):
        return 0
    # Go 1.18+: magic, pointer size, flags (2 = strings inline), then the Go
    # version and the module info as varint-prefixed strings from byte 32.
    if info[:14] != b"\xff Go buildinf:" or len(info) < 33 or not info[15] & 2:
        return 0
    at = info.find(b"path\tgithub.com/containerd/containerd/")
    if at < 0:
        return 0
    rest = info[at + 38:at + 48]  # "cmd/..." in 1.x, "vN/cmd/..." from 2.x on
    if rest.startswith(b"cmd/"):
        return 1
    major, slash, _ = rest[1:].partition(b"/")
    return int(major) if rest[:1] == b"v" and slash and major.isdigit() else 0


def bootstrap_answer(address: str, containerd: str) -> str:
    """What `start` prints for `address` to the containerd executable
    `containerd`: 2.x gets the JSON BootstrapParams of a version-3 ttrpc shim,
    byte for byte as Go's encoding/json writes the Go shim 2.x's; 1.6 and 1.7
    (and a containerd that cannot be told) get the plain address their Go
    shims print, which every containerd takes as version 2: 1.7 would refuse a
    version 3. MAX_SHIM_VERSION cannot tell them apart: 1.7 and 2.1 both send 2.
    The bundle's `address` file is written either way (1.6/1.7 read it after a
    restart; 2.x reads its own bootstrap.json, made from this answer)."""
    if containerd_major(containerd) < 2:
        return address
    # An address is a socket path: no quote, backslash or control character.
    return f'{{"version":{SHIM_VERSION},"address":"{address}","protocol":"ttrpc"}}'


def _containerd_binary(flags: Flags, parent: int) -> str:
    """containerd's executable: -publish-binary, else `parent`, the process that
    ran `start` (containerd runs `start` itself)."""
    return flags.publish_binary or f"/proc/{parent}/exe"


def _pb_field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def runtime_features(binary: str) -> bytes | None:
    """`BINARY features` as compact JSON, or None when it fails (a runc
    without the command): the Go shim then leaves the features out too."""
    import json

    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = spawn([binary, "features"], (null, w, null))
    finally:
        os.close(w)
        os.close(null)
    try:
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return None
    try:
        return json.dumps(json.loads(out), separators=(",", ":")).encode()
    except ValueError:
        return None


def action_info(flags: Flags) -> int:
    """`-info`: containerd 2.x's introspection (ctr plugins inspect-runtime,
    CRI's runtime feature check) runs the shim with runtime options on stdin
    and reads a containerd.types.RuntimeInfo{name=1, version=2
    RuntimeVersion{version=1, revision=2}, options=3 Any, features=4 Any}.
    As the Go shim: the options read back as containerd.runc.v1.Options (the
    effective ones, whatever type came in), the features are runc's own."""
    from google.protobuf import any_pb2

    raw = sys.stdin.buffer.read()
    opts = None
    if raw:
        any_msg = any_pb2.Any()
        try:
            any_msg.ParseFromString(raw)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and its kin
            raise InvalidArgument(f"failed to read runtime options: {e}") from None
        opts = decode_options(any_msg)
    version = _pb_field(1, VERSION.encode()) + (_pb_field(2, REVISION.encode()) if REVISION else b"")
    info = _pb_field(1, RUNTIME_NAME.encode()) + _pb_field(2, version)
    if opts is not None:
        info += _pb_field(3, _pb_field(1, URL_RUNC_OPTIONS.encode()) + _pb_field(2, opts.SerializeToString()))
    binary = which((opts.binary_name if opts is not None else "") or "runc")
    features = runtime_features(binary)
    if features is not None:
        info += _pb_field(4, _pb_field(1, URL_RUNTIME_FEATURES.encode()) + _pb_field(2, features))
    sys.stdout.buffer.write(info)
    return 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """A containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3},
    encoded by hand: `shim delete` is a fresh interpreter too, and importing
    protobuf would cost it ~30 ms. Zero fields are left out, as proto3 does."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    ts = (b"\x08" + _varint(seconds) if seconds else b"") + (b"\x10" + _varint(nanos) if nanos else b"")
    return ((b"\x08" + _varint(pid) if pid else b"") + (b"\x10" + _varint(exit_status) if exit_status else b"")
            + b"\x1a" + _varint(len(ts)) + ts)


def action_delete(flags: Flags) -> int:
    """Cleans up after a dead shim: runc delete --force, unmount, and report
    the task as killed (137) on stdout."""
    import json

    bundle = flags.bundle or os.getcwd()
    try:
        opts = json.loads(_read_small(os.path.join(bundle, "options.json")))
    except (OSError, ValueError):
        opts = {}
    root = os.path.join(opts.get("root") or RUNC_ROOT, flags.namespace)
    try:
        runc = Runc(None, which(opts.get("binary_name") or "runc"), root, bundle)
        status = runc.force_delete_now(flags.id)
        if status != 0:
            log("warning", "runc delete --force failed", id=flags.id, status=status)
    except OSError as e:
        log("warning", "runc delete --force", id=flags.id, error=str(e))
    try:
        unmount_all(os.path.join(bundle, "rootfs"))
    except OSError as e:
        log("warning", "unmount rootfs", error=str(e))
    try:
        pid = int(_read_small(os.path.join(bundle, "init.pid")).strip() or 0)
    except (OSError, ValueError):
        pid = 0
    sys.stdout.buffer.write(_delete_response(pid, 128 + SIGKILL, time.time_ns()))
    return 0


# =============================================================================
# serve: the long-lived shim.
# =============================================================================


def _open_log() -> None:
    """Makes the bundle's `log` fifo our stderr, read-write and non-blocking:
    holding a read end means a vanished containerd never causes EPIPE, and a
    full fifo drops lines instead of stalling the shim."""
    import stat

    try:
        if not stat.S_ISFIFO(os.stat("log").st_mode):
            return
        fd = os.open("log", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    os.dup2(fd, 2)
    os.close(fd)


STACK_DUMPS_KEPT = 3  # stack dump files a shim keeps in its bundle, newest first
STACK_DUMP_MAX = 1 << 20  # bytes of one dump file


def _await_chain(task) -> list[str]:
    """A task's await chain as traceback-style lines: each coroutine (or generator) it
    awaits, outermost first, down to the one that is suspended, then what that waits for."""
    import linecache

    lines = []
    coro = task.get_coro()
    for _ in range(128):  # a cycle-proof bound: chains are a few deep
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_qualname}')
            text = linecache.getline(code.co_filename, frame.f_lineno).strip()
            if text:
                lines.append(f"    {text}")
        nxt = getattr(coro, "cr_await", None)
        if nxt is None:
            nxt = getattr(coro, "gi_yieldfrom", None)
        if nxt is None or not (hasattr(nxt, "cr_frame") or hasattr(nxt, "gi_frame")):
            break
        coro = nxt
    waiter = getattr(task, "_fut_waiter", None)
    if waiter is not None and hasattr(waiter, "get_coro"):  # another task: its own chain is listed
        lines.append(f"  waiting for task {waiter.get_name()} ({_coro_name(waiter.get_coro())})")
    elif waiter is not None:
        lines.append(f"  waiting for {waiter!r}")
    return lines


def _coro_name(coro) -> str:
    return getattr(coro, "__qualname__", type(coro).__name__)


def dump_stacks() -> str:
    """Every thread's whole stack and every asyncio task's whole await chain, as text."""
    import asyncio
    import threading
    import traceback

    out = []
    frames = sys._current_frames()
    me = threading.get_ident()
    for t in threading.enumerate():
        out.append(f"thread {t.name} (ident {t.ident}{', dumping' if t.ident == me else ''}):")
        frame = frames.get(t.ident)
        if frame is not None:
            out.append("".join(traceback.format_stack(frame)).rstrip("\n"))
        out.append("")
    try:
        tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    except RuntimeError:
        tasks = []
    for task in tasks:
        out.append(f"task {task.get_name()} ({_coro_name(task.get_coro())}, {task._state.lower()}):")
        out.extend(_await_chain(task))
        out.append("")
    return "\n".join(out) + "\n"


def write_stack_dump(directory: str, text: str) -> str:
    """Writes a dump, unescaped, to <directory>/stacks-<pid>-<utc time>.log (at most
    STACK_DUMP_MAX bytes), keeping this shim's newest STACK_DUMPS_KEPT; returns its path."""
    pid = os.getpid()
    prefix = f"stacks-{pid}-"
    now = time.time_ns()  # one reading: seconds and fraction read apart could run backwards
    name = prefix + time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z.log"
    data = text.encode(errors="replace")
    if len(data) > STACK_DUMP_MAX:
        data = data[:STACK_DUMP_MAX - 32] + b"\n... (dump truncated)\n"
    _atomic_write(directory, name, data, 0o600)
    old = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".log"))
    for stale in old[:-STACK_DUMPS_KEPT]:
        try:
            os.unlink(os.path.join(directory, stale))
        except OSError:
            pass
    return os.path.join(directory, name)


class ShimBase:
    """What serve() sets up before it knows which shim it is: the event loop,
    the reaper, runc's runner and the housekeeping. A spare shim makes it
    ahead of its fork request (_spare_shim); any other shim in serve()."""

    __slots__ = ("housekeeping", "loop", "reaper", "runner", "service")

    def __init__(self) -> None:
        import asyncio

        import uvloop

        # UV_USE_IO_URING=0 only matters to libuv 1.45-1.48, where it stops the
        # loop's io_uring rings. The libuv in uvloop 0.21+ (1.49 and later) reads
        # it only for the file-operation ring, which uvloop never asks for, and
        # always creates the small epoll_ctl ring (one fd, ~28 kB USS per shim):
        # no environment variable avoids that one.
        os.environ.setdefault("UV_USE_IO_URING", "0")
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.service: TaskService | None = None
        self.housekeeping = Housekeeping(self.loop)
        self.reaper = Reaper(self.loop, self.on_exit)
        self.runner = Runner(self.loop, self.reaper)

    def on_exit(self, pid: int, code: int) -> None:
        if self.service is not None:
            self.service.on_exit(pid, code)
        self.housekeeping.poke()


def serve(flags: Flags, base: ShimBase | None = None) -> int:
    import gc
    import signal
    import socket

    import pyshim_pb2  # noqa: F401  (loaded before the heap is frozen)

    _open_log()
    log.lead = f" pid={os.getpid()}"
    log.level = _LEVELS["debug" if flags.debug else "info"]
    log.fields = f" namespace={_quote(flags.namespace)} runtime={RUNTIME_NAME}"
    settings = None
    if flags.settings:
        try:
            settings = Settings.from_json(flags.settings)
        except InvalidArgument as e:
            log("error", "bad settings", error=str(e))
            return 1
        if settings.log_level:  # the handler's file says so explicitly: it wins over -debug
            log.level = _LEVELS[settings.log_level]
    try:
        set_subreaper()
    except OSError as e:
        log("error", "cannot become a child subreaper", error=str(e))
        return 1
    try:
        # Closed here, not left to the collector: an unclosed socket's
        # finalizer builds a ResourceWarning (its repr: getsockname and
        # getpeername) and runs the warning filters, ~0.5 ms in a new shim.
        with socket.socket(fileno=os.dup(3)) as s:
            sock_path = s.getsockname()
    except OSError:
        log("error", "no listening socket on fd 3")
        return 1

    if base is None:
        base = ShimBase()
    else:  # a spare's: the request's environment has replaced the one it was made in
        os.environ.setdefault("UV_USE_IO_URING", "0")
    loop, housekeeping, reaper, runner = base.loop, base.housekeeping, base.reaper, base.runner
    stop = loop.create_future()
    service: TaskService | None = None
    publisher = Publisher(loop, runner, flags.namespace, os.environ.get("TTRPC_ADDRESS", ""),
                          flags.publish_binary, flags.address)

    def finish() -> None:
        if not stop.done():
            stop.set_result(None)

    service = base.service = TaskService(loop, runner, publisher, flags.namespace, finish, settings)
    server = TtrpcServer(loop, service.methods())
    publisher.start()
    reaper.reap()  # children that exited before the fd was watched

    def on_usr1() -> None:
        text = dump_stacks()
        tasks = ",".join(sorted(service.containers)) if service is not None else ""
        kv: dict[str, object] = {"tasks": tasks}
        try:  # the bundle the shim runs in; a grouped shim's may be gone
            kv["file"] = write_stack_dump(os.getcwd(), text)
        except OSError as e:
            kv["file_error"] = str(e)
        log("info", "=== BEGIN stack dump ===\n" + text + "=== END stack dump ===", **kv)

    # Through the reaper's pipe, not loop.add_signal_handler: uvloop's runs
    # enough Python per signal to cost every shim ~0.2 MB of private pages.
    reaper.catch(signal.SIGUSR1, on_usr1)
    reaper.catch(signal.SIGTERM, finish)
    reaper.catch(signal.SIGINT, finish)

    interval = settings.memory_release_interval if settings else MEMORY_RELEASE_SECONDS
    ksm = ksm_mode(settings)
    if ksm == "auto" and ksm_host_on():
        housekeeping.ksm = True
        log("debug", "ksm: memory mergeable", mappings=ksm_advise(True))
    elif ksm == "off" and template_ksm:  # undo what the template's mappings carry
        ksm_advise(False)
    housekeeping.trim = interval > 0
    housekeeping.delay = interval if interval > 0 else KSM_RESCAN_SECONDS
    server.after_request = housekeeping.poke
    gc.freeze()

    def release_first() -> None:
        log("debug", "zero pages released", pages=release_zero_pages())

    # The loop's read buffer and the rest zeroed since the fork are given back
    # FIRST_RELEASE_SECONDS after the start, not 30 s later (Housekeeping's
    # rounds do it after that), and not before the first request: containerd
    # has sent Create by now, and walking the page map (1-2 ms of CPU) would
    # be on its path to `runc create`. In a burst of starts it waits for the
    # CPUs, which the other containers' starts need more.
    loop.call_later(FIRST_RELEASE_SECONDS, when_cpus_free, loop, release_first,
                    time.monotonic() + FIRST_RELEASE_SECONDS + BUSY_WAIT_MAX_SECONDS)
    log("debug", "serving api on socket", socket=sock_path)
    log("info", "shim started", socket=sock_path, version=VERSION)
    if isinstance(template_heap, str):  # forked from a template that could not do it
        log("info", "template heap left mortal", reason=template_heap)
    elif template_heap is not None:
        log("debug", "template heap immortal", objects=template_heap)
    if settings:
        log("debug", "settings", path=settings.path, runc_root=settings.runc_root,
            runc_binary=settings.runc_binary, systemd_cgroup=settings.systemd_cgroup,
            template=settings.template, memory_release_interval=interval, ksm=ksm)

    async def serve_until_stopped() -> None:
        # The start bound fd 3 and listens on it: containerd's connection
        # waits in its backlog until the loop accepts it. One run of the loop
        # for the set-up and the serving (uvloop makes and unmakes its signal
        # socketpair at each run).
        await server.serve_fd(3)
        await stop

    loop.run_until_complete(serve_until_stopped())

    async def shutdown() -> None:
        import asyncio

        # Kill and reap before hanging up: containerd runs `shim delete` as soon
        # as the connection drops, and its `runc delete --force` must meet a
        # stopped container, not race our own `runc kill`.
        server.stop_listening()
        await service.kill_all()
        waits = [c.init.wait for c in service.containers.values()
                 if c.init is not None and c.init.pid and not c.init.wait.done()]
        if waits:
            await asyncio.wait(waits, timeout=5.0)
        await server.shutdown()
        if not await publisher.flush(5.0):
            log("warning", "shutting down with undelivered events", count=len(publisher.queue))

    loop.run_until_complete(shutdown())
    try:
        os.unlink(sock_path)
    except OSError:
        pass
    log("info", "shim exiting")
    return 0


# =============================================================================
# Warm template: shims forked from a process that has imported everything.
# =============================================================================

TEMPLATE_ENV = "PYSHIM_TEMPLATE"  # "0" turns the template off: every shim starts cold
TEMPLATE_IDLE_ENV = "PYSHIM_TEMPLATE_IDLE"  # seconds idle (no request, no live shim) before it exits
TEMPLATE_IDLE_DEFAULT = 600.0
TEMPLATE_TITLE_ROOM = 1024  # bytes of argv reserved for the forked shims' titles
_LEN = struct.Struct(">I")
_TERM_SIGNALS = (15, 2)  # SIGTERM, SIGINT: the template's handlers leave on them
template_ksm = False  # in the template: its mappings were made mergeable (its shims inherit that)
template_heap: int | str | None = None  # in the template: immortalize_heap's answer, for its shims' log


def launcher_identity(launcher: str | None = None) -> str:
    """The identity of the file this program was started from (the native
    launcher, whose `start` computes the same string in C: see
    bin/launcher.c): its real path, device, inode, mtime and ctime in ns and
    size, NUL-separated. "" when started otherwise (`python -m pyshim`)."""
    if launcher is None:
        launcher = sys.argv[0] if sys.argv and os.path.isfile(sys.argv[0]) else ""
    if not launcher:
        return ""
    real = os.path.realpath(launcher)
    try:
        st = os.stat(real)
    except OSError:
        return ""
    return f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_size}"


def template_path(containerd_address: str, launcher: str | None = None) -> str:
    """The template socket of one containerd and this pyshim build: an
    upgrade never forks shims from old code, and a shim is always a
    descendant of its own containerd's `start` (process tree and cgroup),
    never of another containerd's.

    The build is the launcher file (`launcher`, default the one this program
    was started from: pip writes it anew at every install) and BUILD_ID
    (compiled into the launcher too), so that the native launcher finds the
    socket without Python; started without a launcher, the interpreter and
    pyshim.py. The template itself also steps aside when
    pyshim.py changes under it (_template_fresh)."""
    ident = launcher_identity(launcher)
    if not ident:
        st = os.stat(__file__)
        ident = (f"{os.path.realpath(sys.executable)}\0{os.path.realpath(__file__)}\0{VERSION}\0"
                 f"{st.st_mtime_ns}\0{st.st_size}")
    key = f"{ident}\0{BUILD_ID}\0{containerd_address}"
    return os.path.join(SOCKET_DIR, "pyshim-template-" + _sha256_hex(key.encode())[:16])


def _module_stamp() -> tuple[int, int, int, int]:
    """What changes when pyshim.py is rewritten: inode, size, mtime, ctime."""
    st = os.stat(__file__)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _template_connect(path: str) -> int:
    """A connection to the template, launching the template if none answers.

    The launcher binds the socket itself, so the connection is queued at once
    and answered when the template has warmed up; a lock file makes
    concurrent starts launch one template.
    """
    try:
        return _connect_now(path)
    except OSError as e:
        if e.errno not in (ENOENT, ECONNREFUSED):
            raise  # EAGAIN: a template that takes no connection; the shim starts cold
    _socket_dir()
    lock = _lock_template(path)
    try:
        try:
            return _connect_now(path)
        except OSError:
            pass
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        _remove_dead_templates(path)
        lfd = unix_listen(path)
        try:
            os.chmod(path, 0o600)
            argv = _python_argv() + ["template", " " * TEMPLATE_TITLE_ROOM]
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                spawn(argv, (null, null, null), setsid=True, extra=((lfd, 3),))
            finally:
                os.close(null)
        finally:
            os.close(lfd)
        return _connect_now(path)
    finally:
        os.close(lock)


def _connect_now(path: str) -> int:
    """A blocking connection to the unix socket `path`, had without waiting:
    a listener whose backlog is full is OSError EAGAIN, not a `start` stuck
    behind a stalled process."""
    fd = unix_connect(path, nonblock=True)
    os.set_blocking(fd, True)
    return fd


TEMPLATE_LOCK_WAIT = 3.0  # seconds a start waits for another one launching the template


def _lock_template(path: str, wait: float = TEMPLATE_LOCK_WAIT) -> int:
    """The lock file of the template at `path`, open and held (flock).

    A leaving template unlinks the lock file while it holds it, so a lock
    taken on a file that is no longer the one at that name is dropped and
    taken again: two launchers never hold different files for one template.
    A lock still held after `wait` seconds (its holder is stuck) is OSError
    ETIMEDOUT: the caller starts its shim cold rather than wait on.
    """
    deadline = time.monotonic() + wait
    while True:
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if not _flock_by(lock, deadline):
                raise OSError(_lib.ETIMEDOUT, "timed out waiting for the template's lock",
                              path + ".lock")
            if os.fstat(lock).st_ino == os.stat(path + ".lock").st_ino:
                return lock
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(lock)
            raise
        os.close(lock)


def _flock_by(fd: int, deadline: float) -> bool:
    """Takes the exclusive flock of `fd`, trying until the monotonic `deadline`;
    False if another holder kept it that long."""
    import fcntl

    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _remove_dead_templates(keep: str) -> None:
    """Removes the sockets and lock files of templates nobody answers on
    any more (killed ones, those of pyshim builds since upgraded), and lock
    files whose socket is gone. Run only when a template is launched, which
    is rare. A live template of another build is left alone, and so is a
    lock someone holds."""
    import fcntl

    prefix = os.path.join(SOCKET_DIR, "pyshim-template-")
    try:
        names = os.listdir(SOCKET_DIR)
    except OSError:
        return
    for name in names:
        path = os.path.join(SOCKET_DIR, name)
        sock = path.removesuffix(".lock")
        if not path.startswith(prefix) or sock == keep:
            continue
        if sock != path:  # a lock file: with its socket, it is seen as that socket
            if os.path.lexists(sock):
                continue
        elif _can_connect(sock):
            continue
        try:
            lock = os.open(sock + ".lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            lock = -1
        try:
            if lock >= 0:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if sock == path:
                os.unlink(sock)
            if lock >= 0 and os.fstat(lock).st_ino == os.stat(sock + ".lock").st_ino:
                os.unlink(sock + ".lock")
        except OSError:
            pass  # being launched right now, or already gone
        finally:
            if lock >= 0:
                os.close(lock)


_REQUEST = struct.Struct(">II")  # a request's header: bytes of fields, bytes of data


def _pack_request(kind: str, argv: list[str], env: dict[str, str], cwd: str, data: bytes = b"") -> bytes:
    """A template request: the _REQUEST header, then the fields NUL-separated
    (kind, cwd, argc, argv, then KEY=VALUE env entries; none of them can hold a
    NUL), then `data` as is (a `start`'s stdin). No json on the `start` path:
    importing it costs ~10 ms. bin/launcher.c writes the same layout."""
    fields = b"\0".join(os.fsencode(f) for f in
                        [kind, cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())])
    return _REQUEST.pack(len(fields), len(data)) + fields + data


def _unpack_request(body: bytes) -> dict:
    """{"kind", "cwd", "argv", "env", "data"} from the bytes after _REQUEST's
    header, given as (fields length, data length) + body; ValueError if malformed."""
    flen, dlen = _REQUEST.unpack_from(body)
    if len(body) != _REQUEST.size + flen + dlen:
        raise ValueError("malformed request")
    fields = [os.fsdecode(f) for f in body[_REQUEST.size:_REQUEST.size + flen].split(b"\0")]
    if len(fields) < 3:
        raise ValueError("malformed request")
    argc = int(fields[2])
    if not 0 < argc <= len(fields) - 3:
        raise ValueError("malformed request")
    env = {}
    for entry in fields[3 + argc:]:
        k, eq, v = entry.partition("=")
        if not eq or not k:
            raise ValueError(f"malformed environment entry {entry!r}")
        env[k] = v
    return {"kind": fields[0], "cwd": fields[1], "argv": fields[3:3 + argc], "env": env,
            "data": body[_REQUEST.size + flen:]}


def template_fork(argv: list[str], sock_fd: int, containerd_address: str, timeout: float = 3.0) -> int:
    """Asks the warm template to fork a shim running `argv` on `sock_fd`.

    One request per connection: a "fork" request (_pack_request: cwd, argv,
    env) with the socket attached (SCM_RIGHTS); the answer is "ok PID" or
    "error TEXT".
    """
    fd = _template_connect(template_path(containerd_address))
    return _request_fork(fd, argv, sock_fd, dict(os.environ), os.getcwd(), timeout)


def _request_fork(fd: int, argv: list[str], sock_fd: int, env: dict[str, str], cwd: str,
                  timeout: float) -> int:
    """The "fork" request of template_fork on the template connection `fd`
    (closed here): a shim running `argv` on `sock_fd`, in `cwd` with `env`."""
    import select

    try:
        # The shim's socket goes only to a template of our own user (as the
        # native launcher checks too): the credentials of whoever listens there.
        if peer_cred(fd)[1:] != (os.geteuid(), os.getegid()):
            raise OSError(13, "refused: the template there belongs to another user")  # EACCES
        msg = _pack_request("fork", argv, env, cwd)
        sent = send_fd(fd, sock_fd, msg)
        while sent < len(msg):
            sent += os.write(fd, msg[sent:])
        reply = b""
        deadline = time.monotonic() + timeout
        while not reply.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise OSError(62, "timed out waiting for the warm template")  # ETIME
            chunk = os.read(fd, 256)
            if not chunk:
                raise OSError(104, "the warm template closed the connection")  # ECONNRESET
            reply += chunk
    finally:
        os.close(fd)
    if reply.startswith(b"ok "):
        return int(reply[3:])
    raise OSError(5, "warm template: " + reply.decode(errors="replace").strip())  # EIO


def set_title(argv: list[str]) -> None:
    """Rewrites this process's command line (/proc/PID/cmdline, ps) in place,
    within the room the original argv had."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    room = end - start
    data = "\0".join(argv).encode()[:room - 1]
    _ffi.memmove(_ffi.cast("char *", start), data + b"\0" * (room - len(data)), room)


def _warm_up(rounds: int = 12) -> None:
    """Rehearses the shim's steady state on a throwaway loop, so that what it
    builds lazily (uvloop internals, protobuf classes, quickened bytecode and
    its caches, codec objects) is made once here, before the heap is frozen
    and shared with every fork, instead of once per shim.

    It serves the task API on an abstract socket and calls it the way
    containerd does (Connect, State, Wait, Kill, Delete, Exec, Create with
    bad input), forwards events to a fake containerd, and copies bytes through
    a Copier. Nothing is left behind; a failure only costs memory.
    """
    import asyncio

    import uvloop
    from google.protobuf import empty_pb2

    import pyshim_pb2 as pb

    tag = f"@pyshim-warm-{os.getpid()}"
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    fds: list[int] = []
    try:
        publisher = Publisher(loop, None, "warm", tag + "-events", "", "")
        service = TaskService(loop, None, publisher, "warm", lambda: None)
        server = TtrpcServer(loop, service.methods())

        async def forward(req, meta):
            return empty_pb2.Empty()

        events = TtrpcServer(loop, {(EVENTS_SERVICE, "Forward"): (pb.ForwardRequest, forward)})
        fds.append(unix_listen(tag))
        fds.append(unix_listen(tag + "-events"))

        async def rehearse() -> None:
            await server.serve_fd(fds[0])
            await events.serve_fd(fds[1])
            publisher.start()
            client = await TtrpcClient.connect(tag, loop)
            calls = [
                ("Connect", pb.ConnectRequest(id="warm")),
                ("State", pb.StateRequest(id="warm")),
                ("Wait", pb.WaitRequest(id="warm")),
                ("Kill", pb.KillRequest(id="warm", signal=9)),
                ("Pids", pb.PidsRequest(id="warm")),
                ("CloseIO", pb.CloseIORequest(id="warm", stdin=True)),
                ("Exec", pb.ExecProcessRequest(id="warm", exec_id="e")),
                ("Delete", pb.DeleteRequest(id="warm")),
                ("Create", pb.CreateTaskRequest(id="warm", bundle="/nonexistent")),
                ("Shutdown", pb.ShutdownRequest(id="warm")),
            ]
            for _ in range(rounds):
                for method, req in calls:
                    try:
                        await client.call(TASK_SERVICE, method, req.SerializeToString(),
                                          {NAMESPACE_KEY: "warm"}, timeout=5)
                    except RemoteError:
                        pass
                ev = pb.TaskExit(container_id="warm", id="warm", pid=1, exit_status=0)
                _ts(ev.exited_at, time.time_ns())
                service._publish("/tasks/exit", ev)
                try:  # Stats: parse the template's own cgroup, read-only
                    container_metrics(os.getpid())
                except (ShimError, OSError):
                    pass
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                r2, w2 = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                copier = Copier(loop, r, w2)
                copier.start()
                os.write(w, b"warm")
                os.close(w)
                await copier.done
                os.close(r2)
            await publisher.flush(5.0)
            client.close()
            await server.shutdown(0.5)
            await events.shutdown(0.5)
            publisher.task.cancel()
            await asyncio.sleep(0)

        loop.run_until_complete(rehearse())
    except Exception as e:  # noqa: BLE001 - a failed rehearsal only costs memory
        log("warning", "template warm-up incomplete", error=repr(e))
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        loop.close()
        asyncio.set_event_loop(None)


def _rehearse_one_shot(rounds: int = 3) -> None:
    """Runs, in the template, what every shim runs once as it starts and the
    warm-up loop does not (parsing its flags and its request, retitling,
    giving back zero pages, writing a file atomically, finding a binary,
    reading and writing JSON as Create does, comparing environments).
    From Python 3.12 on, a function's first runs write its inline caches
    (counters, then specializations) into its code object: run here first,
    those writes are made once in the template, instead of copying a page of
    its heap into every shim (on 3.14, 71 of a shim's private pages were
    code objects written so). Nothing is left behind."""
    import json

    with open("/proc/self/cmdline", "rb") as f:
        title = [os.fsdecode(a) for a in f.read().split(b"\0")[:-1]]
    argv = ["-namespace", "warm", "-id", "warm", "-address", "/warm", "-publish-binary", "/warm"]
    scratch = f"/run/pyshim-warm-{os.getpid()}"
    try:
        os.mkdir(scratch, 0o700)
    except OSError:
        scratch = ""
    try:
        for _ in range(rounds):
            flags = Flags(argv)
            _unpack_request(_pack_request("fork", shim_argv(flags), {"PATH": "/bin"}, "/"))
            set_title(title)
            release_zero_pages()
            try:
                which("sh")
            except FileNotFoundError:
                pass
            if scratch:
                _atomic_write(scratch, "warm", json.dumps({"binary_name": "runc", "root": RUNC_ROOT}).encode(),
                              mode=0o600)
            json.loads(b'{"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "pid"}]}}')  # Create's config.json
            environ = dict(os.environ)  # the forked shim compares its environment with its request's
            _ = [k for k in os.environ if k not in environ], os.environ.get("PATH")
    except (OSError, ValueError) as e:  # a failed rehearsal only costs memory
        log("warning", "template rehearsal incomplete", error=repr(e))
    finally:
        if scratch:
            try:
                os.unlink(os.path.join(scratch, "warm"))
            except OSError:
                pass
            try:
                os.rmdir(scratch)
            except OSError:
                pass


PACK_CODE_ENV = "PYSHIM_PACK_CODE"  # "0": the template leaves code objects where its imports put them


def _calls_of(fn) -> list:
    """Runs fn() in this thread; returns the code objects of the Python
    functions it ran, in the order of their first call."""
    seen: dict[int, object] = {}

    def hook(frame, event, arg) -> None:
        if event == "call":
            seen.setdefault(id(frame.f_code), frame.f_code)

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return list(seen.values())


def pack_code(first: list) -> int:
    """In the template, before the warm-up that its shims inherit: gives every
    function whose code a shim runs a copy of that code object, allocated side
    by side, and rebinds the functions to the copies; returns how many were
    copied.

    Whatever the interpreter, a shim writes the code objects it runs: their
    reference counts (3.11), their inline caches as instructions warm up and
    specialize, and on 3.13 and later a branch's history at every
    conditional jump. Where the imports left them, the 180 code objects a
    shim runs (100 kB) lay spread over 130 pages of the template's heap, each
    copied into every shim at its first write. Copied here, in the order the
    warm-up first called them (`first`) and then all of pyshim's own in
    source order, they fill a few dozen pages, and the pages they left hold
    nothing a shim writes. Copies are made after the heap's holes are
    filled, so that they come from fresh pymalloc pools and the top of the
    malloc heap, in order; the originals are freed (their holes filled again
    before the fork)."""
    import gc
    import types

    code_type = types.CodeType
    functions = [o for o in gc.get_objects() if type(o) is types.FunctionType]
    here = _rehearse_one_shot.__code__.co_filename
    parent: dict[int, object] = {}
    own: list = []

    def nest(code) -> None:
        if code.co_filename == here:
            own.append(code)
        for k in code.co_consts:
            if type(k) is code_type and id(k) not in parent:
                parent[id(k)] = code
                nest(k)

    tops = {id(f.__code__): f.__code__ for f in functions}
    for code in list(tops.values()):
        nest(code)
    order = list(first) + sorted(own, key=lambda c: c.co_firstlineno)
    want: dict[int, object] = {}
    for code in order:  # a nested code object is reached through the one it is in
        while id(code) not in want:
            want[id(code)] = code
            code = parent.get(id(code))
            if code is None:
                break
    for code in want.values():
        # replace() reads co_code, which the code object makes at its first
        # read and keeps, and may make other things once (3.14, code compiled
        # from source): a throwaway copy of each, made here, makes them before
        # the holes are filled, not between the copies (co_code's bytes were
        # every other block of the packing).
        code.replace()
    copies: dict[int, object] = {}

    def copy(code):
        new = copies.get(id(code))
        if new is None:
            consts = code.co_consts
            if any(type(k) is code_type and id(k) in want for k in consts):
                consts = tuple(copy(k) if type(k) is code_type and id(k) in want else k for k in consts)
            new = copies[id(code)] = code.replace(co_consts=consts)
        return new

    fill_pool_holes()
    fill_malloc_holes()
    for code in order:
        copy(code)
    for f in functions:
        new = copies.get(id(f.__code__))
        if new is not None:
            f.__code__ = new
    return len(copies)


def immortal_terms() -> tuple[int, int] | str:
    """How this interpreter marks an object immortal, as (the 32-bit count,
    the ob_flags bits), or why it cannot be done here.

    Only the layouts read from CPython's headers: 3.12 and 3.13 test the sign
    bit of the low 32 bits of ob_refcnt and saturate it at UINT_MAX (their
    _Py_IMMORTAL_REFCNT); 3.14 stores _Py_IMMORTAL_INITIAL_REFCNT (3 << 30)
    and sets _Py_IMMORTAL_FLAGS in ob_flags. Free-threaded builds count in
    other fields, debug and trace-refs builds check and list every object.
    """
    v = sys.version_info[:2]
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if v < (3, 12):
        return f"Python {v[0]}.{v[1]} has no immortal objects"
    if v > (3, 14):
        return f"Python {v[0]}.{v[1]}: object layout not known to this pyshim"
    if "t" in sys.abiflags or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return "free-threaded build"
    if hasattr(sys, "gettotalrefcount") or hasattr(sys, "getobjects"):
        return "debug build"
    if sys.maxsize < 1 << 32 or sys.byteorder != "little":
        return "not a 64-bit little-endian build"
    return (3 << 30, 1) if v >= (3, 14) else (0xFFFFFFFF, 0)


def immortalize_heap() -> int | str:
    """Makes every object the template holds immortal (template only, just
    before gc.freeze): the shims it forks then never write a refcount on the
    pages they share with it. Returns how many objects it marked, or why it
    marked none.

    The objects are everything the collector tracks (gc.get_objects) and,
    transitively, what they hold that it does not track: strings, numbers,
    atomic tuples and dicts, code objects with their constants and names, and
    the str keys of dicts (which a dict's traversal skips). Nothing marked is
    ever freed; the template and its shims leave with os._exit, so no
    finalizer of theirs is skipped either.
    """
    import gc

    terms = immortal_terms()
    if isinstance(terms, str):
        return terms
    refcnt, flags = terms
    probe = object()
    mark = _lib.reaper_immortalize
    mark(id(probe), refcnt, flags)
    held = [probe] * 8
    if sys.getrefcount(probe) != refcnt:  # the layout is not the one we read
        return f"immortal refcount not honoured ({sys.getrefcount(probe)})"
    del held
    code_type = type(immortal_terms.__code__)
    is_tracked = gc.is_tracked
    referents = gc.get_referents
    stack: list = []

    def push_held(o: object) -> None:
        if type(o) is code_type:  # no traversal; co_varnames & co. would be new tuples
            stack.extend((o.co_consts, o.co_names, o.co_filename, o.co_name, o.co_qualname,
                          o.co_linetable, o.co_exceptiontable))
            return
        stack.extend(referents(o))
        if isinstance(o, dict):
            stack.extend(dict.keys(o))

    tracked = gc.get_objects()
    for obj in tracked:
        mark(id(obj), refcnt, flags)
    count = len(tracked)
    # Every tracked object is marked now; walk into the untracked ones they
    # hold, with immortality as the visited mark.
    for obj in tracked:
        push_held(obj)
        while stack:
            o = stack.pop()
            if is_tracked(o) or mark(id(o), refcnt, flags):
                continue
            count += 1
            push_held(o)
    del tracked
    return count


_ballast: list = []  # in the template: what fill_pool_holes allocated, kept for good


def pool_holes() -> list[tuple[int, int, int]]:
    """(block size, blocks in use, free blocks) of each pymalloc size class with
    a pool in use, from sys._debugmallocstats() (read from a memfd it writes to
    in place of stderr); [] when this interpreter does not report them."""
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return []
    fd = os.memfd_create("pyshim-mallocstats", os.MFD_CLOEXEC)
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        try:
            stats()
        finally:
            os.dup2(saved, 2)
        os.lseek(fd, 0, os.SEEK_SET)
        text = b""
        while chunk := os.read(fd, 1 << 16):
            text += chunk
    finally:
        os.close(saved)
        os.close(fd)
    out = []
    for line in text.decode(errors="replace").splitlines():
        fields = line.split()  # class, size, num pools, blocks in use, avail blocks
        if len(fields) == 5 and all(f.isdigit() for f in fields):
            out.append((int(fields[1]), int(fields[3]), int(fields[4])))
        elif out:
            break  # the table ended
    return out


def fill_pool_holes() -> int:
    """Fills the free blocks of the template's pymalloc pools with small objects
    that are never freed (template only, just before gc.freeze); returns how
    many it allocated.

    A shim's own allocations would otherwise land in those holes: each small
    object it makes after the fork would copy one of the template's pages
    (4 kB for a 48-byte object), scattering its private memory over pages it
    shared. With the holes filled, pymalloc serves the shim from pools of its
    own, packed. A block size no object here fits (16 bytes) stays as it is.
    """
    bytes_head = sys.getsizeof(b"")  # a bytes object's header and its trailing NUL
    float_size = sys.getsizeof(0.0)
    holes = pool_holes()
    fill: list = [None] * sum(free for _, _, free in holes)
    i = 0
    for size, _, free in holes:
        if size - 16 < float_size <= size:
            for k in range(free):
                fill[i] = k + 0.5  # a new float each
                i += 1
        elif size - bytes_head >= 2:  # bytes of length 0 and 1 are shared singletons
            for _ in range(free):
                fill[i] = bytes(size - bytes_head)
                i += 1
    del fill[i:]
    _ballast.append(fill)
    return i


MALLOC_HOLE_MAX = 64 << 10  # free chunks up to this size are filled with blocks; bigger ones are plugged whole
TCACHE_SIZES = range(32, 1041, 16)  # glibc's tcache chunk sizes (64 bins on 64-bit)
TCACHE_DRAIN_MAX = 4096  # blocks of one size at most, draining its tcache bin and bins


_malloc_info_text = bytearray()  # malloc_holes' reading buffer, kept once made


def malloc_holes() -> list[tuple[int, int, int]]:
    """(smallest chunk size, count, total bytes) of each size range of the free
    chunks of glibc's main arena, from malloc_info(3) (its tcache is not
    listed)."""
    import re

    global _malloc_info_text
    fd = os.memfd_create("pyshim-mallocinfo", os.MFD_CLOEXEC)
    try:
        n = _lib.reaper_malloc_info(fd)
        if n < 0:
            return []
        # Read into a buffer kept from call to call: bytes made and freed
        # here would be free chunks again after fill_malloc_holes took them all.
        if len(_malloc_info_text) < n:
            _malloc_info_text = bytearray(max(n + (n >> 1), 64 << 10))
        got = os.preadv(fd, [memoryview(_malloc_info_text)[:n]], 0)
    finally:
        os.close(fd)
    text = memoryview(_malloc_info_text)[:got]
    start = _malloc_info_text.find(b'<heap nr="0">', 0, got)
    end = _malloc_info_text.find(b"</heap>", max(start, 0), got)
    if start < 0 or end < 0:
        return []
    out = []
    for m in re.finditer(rb'<(?:size|unsorted) from="(\d+)" to="(\d+)" total="(\d+)" count="(\d+)"', text[start:end]):
        low, count = int(m[1]) & ~7, int(m[4])  # the low bits are glibc's flags
        if low > 0 and count:
            out.append((low, count, int(m[3])))
    return out


def fill_malloc_holes(rounds: int = 8) -> int:
    """Takes every free chunk of the template's glibc heap for good (template
    only, after fill_pool_holes), so that what is malloc'ed next, in the
    template or in a shim, comes from the heap's top: each tcache size until
    malloc hands out adjacent chunks first, then what malloc_info lists, until
    it lists none (at most `rounds` times: a bigger chunk split for a smaller
    request leaves a remainder). Returns the blocks taken.

    Like fill_pool_holes for pymalloc: a shim's malloc would otherwise take
    the small chunks and copy the template's page around each (dicts' tables,
    lists' arrays, buffers of more than 512 bytes). A chunk bigger than
    MALLOC_HOLE_MAX is taken whole, after malloc_trim gave back its inner
    pages: they stay given back (malloc writes only a chunk's edges), and a
    request that best-fit would have carved from it, in the middle of the
    heap, is served from the top instead. pack_code needs that: with a
    big free chunk left (a template that compiled pyshim.py, having no
    .pyc), its copies went half to the chunk and half to the top."""
    malloc_trim()  # first: merges the fastbins' chunks into the chunks listed below
    taken = 0
    for size in TCACHE_SIZES:  # the tcache's capacity differs between glibc versions
        taken += _lib.reaper_malloc_keep_until_packed(size - 8, size, TCACHE_DRAIN_MAX)
    last: list[tuple[int, int, int]] = []
    for _ in range(rounds):
        holes = malloc_holes()
        if not holes or holes == last:  # none left, or none malloc hands out (glibc 2.43 lists some)
            break
        last = holes
        malloc_trim()  # the pages of a big chunk the listing's own buffers used are given back again
        for low, count, total in holes:
            if low > MALLOC_HOLE_MAX and count == 1:
                taken += _lib.reaper_malloc_keep((total & ~7) - 8, 1)  # exactly the chunk (total has its flag bits)
            else:
                taken += _lib.reaper_malloc_keep(low - 8, count)  # a chunk of `low` serves low - 8 bytes
    malloc_trim()
    return taken


def serve_template() -> int:
    """The template process: accepts fork requests on fd 3 until killed.

    Single-threaded and loop-free, so fork() is safe. Its children (the
    shims) are reaped here; a shim never needs the template after the fork.
    """
    import gc
    import json  # noqa: F401  (for the shims: loaded once, shared)
    import select
    import signal
    import socket

    gc.disable()
    os.environ.setdefault("UV_USE_IO_URING", "0")  # see serve(): only older libuvs heed it
    import pyshim_pb2  # noqa: F401
    os.chdir("/")  # never pin the launching container's bundle
    try:
        idle_limit = float(os.environ.get(TEMPLATE_IDLE_ENV, TEMPLATE_IDLE_DEFAULT))
    except ValueError:
        idle_limit = TEMPLATE_IDLE_DEFAULT
    if os.environ.get(PACK_CODE_ENV, "1") != "0":
        first = _calls_of(lambda: (_warm_up(), _rehearse_one_shot()))
        try:
            pack_code(first)
        except (ValueError, TypeError, MemoryError) as e:  # only memory is lost
            log("warning", "template code packing failed", error=repr(e))
        del first
    _warm_up()
    _rehearse_one_shot()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    lsock = socket.socket(fileno=3)
    lsock.setblocking(True)
    path = lsock.getsockname()
    # The launcher bound the file before starting us: its inode now is ours.
    # (fstat of the socket fd would give the socket's inode, not the file's.)
    try:
        own_ino = os.stat(path).st_ino
    except OSError:
        own_ino = -1

    def remove_files() -> None:
        """Unlinks what the launch made for us, the socket and its lock file,
        unless a newer template has taken that name since. Done holding the
        lock (waiting for it at most a second): a launcher holding it may be
        launching that newer template right now."""
        lock = -1
        try:
            lock = os.open(path + ".lock", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            if not _flock_by(lock, time.monotonic() + 1.0):
                os.close(lock)
                lock = -1
        except OSError:
            if lock >= 0:
                os.close(lock)
            lock = -1
        try:
            ino = os.stat(path).st_ino
        except OSError:
            ino = None
        try:
            if ino == own_ino:
                os.unlink(path)
            # Held, and no other template's socket at our name: the lock is
            # nobody's (a launcher that opened it finds it unlinked and retries).
            if lock >= 0 and ino in (own_ino, None) and \
                    os.fstat(lock).st_ino == os.stat(path + ".lock").st_ino:
                os.unlink(path + ".lock")
        except OSError:
            pass
        finally:
            if lock >= 0:
                os.close(lock)

    def leave(signo: int, frame: object) -> None:
        # Stopped on purpose: its files go too, so the next start launches
        # a new template at once instead of finding a dead socket.
        remove_files()
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    # `kill -USR1` asks a shim for a stack dump; one sent to every pyshim
    # process must not kill the template (SIGUSR1's default action). Its log
    # goes nowhere, so it has nothing to dump.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    global template_heap, template_ksm
    template_heap = immortalize_heap()
    fill_pool_holes()
    fill_malloc_holes()
    if ksm_mode(None) == "auto" and ksm_host_on():
        template_ksm = ksm_advise(True) > 0
    gc.freeze()
    # From here on the template runs C (reaper_template_serve) and Python
    # only in the processes it forks, or when something is for Python to do.
    stamp = _ffi.new("long long[4]", _module_stamp())
    watch = os.fsencode(__file__)
    out = _ffi.new("long[4]")
    helper = _ffi.new("int *", -1)
    helper_pid = -1
    idle_ms = max(0, int(idle_limit * 1000))
    spare_ms = SPARE_SHIM_DELAY_MS if os.environ.get(SPARE_SHIM_ENV, "1") != "0" else -1
    while True:
        r = _lib.reaper_template_serve(lsock.fileno(), idle_ms, watch, stamp, helper, helper_pid,
                                       spare_ms, out)
        if r in (0, 1) and helper[0] >= 0:  # a child: the helper must see the template's end close with it
            os.close(helper[0])
        if r == 0:  # the forked child of one request: it answers it and exits
            _template_request(lsock, int(out[0]), int(out[1]),
                              _ffi.unpack(_lib.reaper_template_request(), int(out[2])), int(out[3]))
        if r == 1:  # the spare shim
            _spare_shim(lsock, int(out[1]))
        if r == -_lib.ETIMEDOUT:
            # Idle with no shim to reap: leave, unless a start already queued.
            remove_files()
            if not select.select([lsock], [], [], 0)[0]:
                os._exit(0)  # no finalization: it would meet immortal objects
        elif r == -_lib.ESTALE:
            # pyshim.py was rewritten under us (an upgrade in place): this
            # build forks nothing more. The requester (told so) starts cold,
            # and launches a template of the new code; our shims carry on.
            remove_files()
            os._exit(0)
        elif r == -_lib.ECHILD:  # a start found no helper: one for the next starts
            if helper[0] < 0:
                helper_pid = _spawn_start_helper(lsock, helper)
        elif r != -_lib.EINTR:  # (a signal: its handler has run by now)
            log("warning", "template request failed", error=os.strerror(-r))
            time.sleep(0.1)  # EMFILE, ENOMEM: give what ran out a moment


# The start helper's and the spare's receive buffer: a bigger request is forked for.
_HANDOVER_MESSAGE_MAX = _lib.reaper_handover_message_max
START_HELPER_IDLE_ENV = "PYSHIM_START_HELPER_IDLE"  # seconds without a start before the helper leaves
START_HELPER_IDLE_DEFAULT = 30.0


def _title_as(word: str) -> None:
    """In a child of the template: titled `... containerd-shim-pyshim-v1 WORD`
    (the template's interpreter, flags and binary, then `word`)."""
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    at = next(i for i, a in enumerate(argv) if a.endswith(BINARY_NAME.encode()))
    set_title([os.fsdecode(a) for a in argv[:at + 1]] + [word])


def _spawn_start_helper(lsock, helper) -> int:
    """In the template: forks the start helper (_start_helper), which does
    the warm starts the template hands it, one after another, in a process
    of its own: a start's work (~200 pages written on 3.11) touches no page
    the shims share, and costs no fork and no exit. Made at the first warm
    start, it leaves after START_HELPER_IDLE_DEFAULT seconds without one (its
    ~2 MB are not kept on an idle node); the next start is forked for and
    makes a new one. Sets helper[0] to the template's end of their
    socketpair and returns the helper's pid; -1 and no helper when it cannot
    be had (each start then forks for itself)."""
    import signal
    import socket

    try:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as e:
        log("warning", "no start helper", error=str(e))
        return -1
    signal.pthread_sigmask(signal.SIG_BLOCK, _TERM_SIGNALS)
    try:
        pid = _lib.reaper_fork()
        if pid == 0:
            mine.close()
            _lib.reaper_template_forget()  # the spare's socketpair is the template's
            _start_helper(lsock, theirs)  # never returns
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM_SIGNALS)
    theirs.close()
    if pid < 0:
        mine.close()
        return -1
    mine.setblocking(False)
    helper[0] = mine.detach()
    return pid


def _start_helper(lsock, sock) -> None:
    """The start helper's loop: each message on `sock` is a start request
    with the launcher's connection attached; it answers it as a forked start
    would (_template_start, whose shim the template forks). Leaves when the
    template's end closes, or when idle. Never returns."""
    import gc
    import select
    import signal
    import socket

    try:
        path = lsock.getsockname()
        lsock.close()
        for signo in _TERM_SIGNALS:
            signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM_SIGNALS)
        _title_as("start-helper")
        gc.enable()  # long-lived: its garbage is collected, unlike the template's
        fd = sock.detach()
        try:
            idle = float(os.environ.get(START_HELPER_IDLE_ENV, START_HELPER_IDLE_DEFAULT))
        except ValueError:
            idle = START_HELPER_IDLE_DEFAULT
        leaving = False
        while True:
            if not select.select([fd], [], [], 0 if leaving else idle)[0]:
                if leaving:
                    break
                # Idle: no more starts are taken (the template's next hand-over
                # fails, and it forks for that start); those already queued
                # are still answered.
                with socket.socket(fileno=os.dup(fd)) as s:
                    s.shutdown(socket.SHUT_RD)
                leaving = True
                continue
            data, conn_fd = recv_fd(fd, _HANDOVER_MESSAGE_MAX)  # EINTR is retried in C
            if not data:
                break  # the template is gone
            if conn_fd < 0:
                continue
            conn = socket.socket(fileno=conn_fd)
            try:
                reply = _template_start(path, _unpack_request(data), peer_cred(conn_fd)[0])
            except (ValueError, UnicodeError, struct.error) as e:
                reply = f"error {e}\n".encode()
            except Exception as e:  # noqa: BLE001 - one bad start must not end the helper
                reply = f"error {e!r}\n".encode()
            try:
                conn.sendall(reply)
            except OSError:
                pass  # the launcher gave up
            conn.close()
    except BaseException as e:  # noqa: BLE001 - the helper must reach os._exit
        try:
            log("error", "start helper failed", error=repr(e))
        except BaseException:  # noqa: BLE001, S110
            pass
    finally:
        os._exit(0)


def _template_request(lsock, conn_fd: int, fd: int, data: bytes, peer: int) -> None:
    """In the process the template forked for one request (its connection
    `conn_fd`, the fd that came with it, its bytes, the requester's pid):
    a "fork" becomes the shim it asks for (the template has answered "ok
    PID" already, as soon as fork returned, having checked the request's form
    first: the requester waits for no page this child faults in); a "start"
    (when the start helper could not take it) is done here (_template_start).
    Never returns. SIGTERM and SIGINT come blocked."""
    import signal
    import socket

    code = 1
    conn = None
    try:
        conn = socket.socket(fileno=conn_fd)
        try:
            req = _unpack_request(data)
        except (ValueError, UnicodeError, struct.error) as e:
            conn.sendall(f"error {e}\n".encode())
            raise SystemExit(1) from None
        if req["kind"] == "fork":
            lsock.close()
            conn.close()
            _become_shim(fd, req)  # never returns
        path = lsock.getsockname()
        lsock.close()  # the template's: this process accepts nothing
        for signo in _TERM_SIGNALS:
            signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM_SIGNALS)
        conn.sendall(_template_start(path, req, peer))
        code = 0
    except SystemExit:
        pass
    except BaseException as e:  # noqa: BLE001 - this process must reach os._exit
        try:
            if conn is not None:
                conn.sendall(f"error {e!r}\n".encode())
        except BaseException:  # noqa: BLE001, S110 - the requester is gone
            pass
    finally:
        os._exit(code)


class _StartCold(Exception):
    """The template declines a `start` it was handed: the launcher runs it in Python."""


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _template_start(path: str, req: dict, peer: int) -> bytes:
    """In a process forked for it: a whole `start` handed over by the native launcher
    (process `peer`): its argv, environment, cwd (the bundle) and stdin (the
    runtime options). The same start_work as a cold `start`, its shim a
    "fork" request to the template listening at `path`, which forks it from
    a heap no `start` has touched. Returns the reply: b"exit CODE LEN\n" and
    the LEN bytes the launcher prints (the answer on stdout for 0, the error on stderr for 1), or
    b"cold ..." when the launcher should run `start` in Python instead."""
    env = req["env"]
    if env.get(TEMPLATE_ENV, "1") == "0":
        return b"cold template turned off\n"
    try:
        flags = Flags(req["argv"])
    except SystemExit:  # a flag error: Python's `start` says it
        return b"cold bad flags\n"
    if flags.action != "start" or not flags.namespace or flags.version or flags.info:
        return b"cold not a start\n"
    bundle = req["cwd"]
    try:
        parent = _parent_of(peer)  # containerd, which ran the launcher
    except (OSError, ValueError, IndexError):
        return b"cold launcher gone\n"

    def fork_here(flags: Flags, sock_fd: int, template_ok: bool) -> int:
        if not template_ok:
            raise _StartCold("settings")  # the handler's settings turn the template off
        try:
            fd = _connect_now(path)
        except OSError as e:  # it left meanwhile, or takes no connection
            raise _StartCold("template gone" if e.errno != EAGAIN else "template busy") from e
        return _request_fork(fd, shim_argv(flags), sock_fd, env, bundle, 3.0)

    saved = (log.fd, log.fields, log.level)
    _log_to_bundle(bundle)
    if flags.debug:
        log.level = _LEVELS["debug"]
    try:
        code, text = 0, start_work(flags, req["data"], bundle, parent, fork_here, warm=True)
    except _StartCold as e:
        return f"cold {e}\n".encode()
    except (ShimError, OSError) as e:
        code, text = 1, f"pyshim start: {e}"
    except Exception as e:  # noqa: BLE001 - a bug here still answers the launcher
        code, text = 1, f"pyshim start: {e!r}"
    finally:
        if log.fd >= 0:
            os.close(log.fd)
        log.fd, log.fields, log.level = saved
    out = text.encode(errors="replace")
    return f"exit {code} {len(out)}\n".encode() + out


def _take_shim_request(fd: int, req: dict) -> Flags:
    """In a child of the template: become the process a cold spawn would have
    made for fork request `req`, its socket `fd` on fd 3, in req's "cwd" with
    its "env" and "argv"; returns its flags, for serve()."""
    import gc
    import signal

    if log.fd > 2:  # a log the template had open (it has none as launched)
        os.close(log.fd)
    log.fd = 2
    for signo in (*_TERM_SIGNALS, signal.SIGUSR1):  # the template's, not ours
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM_SIGNALS)
    os.setsid()
    os.chdir(req["cwd"])
    # Only differences: usually none, since the template was launched by
    # the same containerd, and every write here would be a private page.
    env = req["env"]
    for k in [k for k in os.environ if k not in env]:
        del os.environ[k]
    for k, v in env.items():
        if os.environ.get(k) != v:
            os.environ[k] = v
    os.dup2(fd, 3)
    os.close(fd)
    argv = req["argv"]
    set_title(argv)
    i = argv.index("-namespace")  # after the interpreter, its flags and the script
    sys.argv = argv[i - 1:]
    gc.enable()
    return Flags(argv[i:])


def _exit_with(what: str, run) -> None:
    """In a child of the template that must end in os._exit: exits with what
    run() returns, or 1, logging "WHAT failed", when it raises. Never returns."""
    code = 1
    try:
        code = run()
    except BaseException as e:  # noqa: BLE001 - the child must reach os._exit
        try:
            log("error", f"{what} failed", error=repr(e))
        except BaseException:  # noqa: BLE001, S110 - logging may fail with no stderr left
            pass
    finally:
        os._exit(code)


def _become_shim(fd: int, req: dict) -> None:
    """In a process the template forked for fork request `req` (its socket
    `fd`): that shim (_take_shim_request, serve). Never returns."""
    _exit_with("forked shim", lambda: serve(_take_shim_request(fd, req)))


SPARE_SHIM_ENV = "PYSHIM_SPARE_SHIM"  # "0": the template keeps no spare shim
SPARE_SHIM_DELAY_MS = 20  # quiet after a fork request before the next spare is made


def _spare_shim(lsock, fd: int) -> None:
    """The spare shim, a child of the template (reaper_template_serve made it,
    with `fd` its end of their socketpair): it makes its ShimBase, the part of
    a shim's set-up no request decides, then waits for the template to hand
    it a fork request with its socket, and becomes that shim. Leaves when the
    template's end closes with no request (the template is gone). Never
    returns. SIGTERM and SIGINT come blocked."""
    import signal

    def run() -> int:
        # The template's listening socket is on fd 3, where the shim's will
        # be: /dev/null holds that number meanwhile, so that none of the
        # loop's fds made below takes it.
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(null, lsock.detach(), inheritable=False)
        os.close(null)
        for signo in _TERM_SIGNALS:  # a spare may be stopped like any shim
            signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _TERM_SIGNALS)
        _title_as("spare-shim")
        base = ShimBase()
        data, sock_fd = recv_fd(fd, _HANDOVER_MESSAGE_MAX)  # EINTR is retried in C
        os.close(fd)
        if not data or sock_fd < 0:
            return 0  # the template left: no shim to become
        return serve(_take_shim_request(sock_fd, _unpack_request(data)), base)

    _exit_with("spare shim", run)


# =============================================================================
# Memory report: what every pyshim process on this node costs
# (`containerd-shim-pyshim-v1 memory [-json]`, an operator's command).
# =============================================================================

BINARY_NAME = "containerd-shim-pyshim-v1"


def _proc_kb(pid: int, name: str, keys: tuple[str, ...]) -> dict[str, int]:
    """The kB values of `keys` in /proc/PID/<name> ("Key:  123 kB" lines); {} if gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            for line in f:
                key, _, rest = line.decode(errors="replace").partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _listening_unix_paths(pid: int) -> list[str]:
    """Paths of the listening unix sockets process `pid` holds (/proc/net/unix)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open(f"/proc/{pid}/net/unix") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []
    # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening.
    return [r[7] for r in rows if len(r) >= 8 and r[6] in inodes and int(r[3], 16) & 0x10000]


def _bundle_address(bundle: str) -> str:
    """The shim address a bundle names (`address`, or 2.x's bootstrap.json), as a path."""
    for name in ("address", "bootstrap.json"):
        try:
            text = _read_small(os.path.join(bundle, name), 1 << 16).decode(errors="replace")
        except OSError:
            continue
        if name == "bootstrap.json":
            import json

            try:
                text = str(json.loads(text).get("address", ""))
            except (ValueError, AttributeError):
                continue
        return text.strip().removeprefix("unix://")
    return ""


def memory_processes() -> list[dict]:
    """Every pyshim process on this node: its kind (template or shim), namespace, shim
    id, bundle, the containers it serves (bundles beside its own whose address is its
    socket), RSS/PSS/USS and KSM-merged pages from /proc. start/delete runs are left out."""
    procs = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            argv = _read_small(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0")
        except OSError:
            continue
        at = next((i for i, a in enumerate(argv[:3]) if a.endswith(BINARY_NAME)), None)
        if at is None:
            continue
        args = argv[at + 1:]
        if "template" in args[:2]:
            kind = "template"
        elif args[:1] == ["start-helper"]:
            kind = "start-helper"  # the template's: does the warm starts
        elif args[:1] == ["spare-shim"]:
            kind = "spare-shim"  # the template's: the next warm start's shim, made ready
        elif args and args[-1] in ("start", "delete", "memory") or "-namespace" not in args:
            continue
        else:
            kind = "shim"
        opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}
        mem = _proc_kb(pid, "smaps_rollup", ("Rss", "Pss", "Private_Clean", "Private_Dirty"))
        if not mem:
            continue
        entry = {"pid": pid, "kind": kind, "namespace": opt.get("-namespace", ""),
                 "id": opt.get("-id", ""), "bundle": "", "containers": [],
                 "rss_kb": mem.get("Rss", 0), "pss_kb": mem.get("Pss", 0),
                 "uss_kb": mem.get("Private_Clean", 0) + mem.get("Private_Dirty", 0),
                 "ksm_merging_pages": None}
        try:
            with open(f"/proc/{pid}/ksm_merging_pages") as f:
                entry["ksm_merging_pages"] = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pass
        if kind == "shim":
            try:
                entry["bundle"] = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
            except OSError:
                pass
            sockets = set(_listening_unix_paths(pid))
            parent = os.path.dirname(entry["bundle"])
            try:
                siblings = sorted(os.listdir(parent)) if parent else []
            except OSError:
                siblings = []
            entry["containers"] = [c for c in siblings
                                   if _bundle_address(os.path.join(parent, c)) in sockets]
        procs.append(entry)
    return sorted(procs, key=lambda e: (e["kind"] != "template", e["namespace"], e["id"], e["pid"]))


def _ksm_running() -> bool:
    try:
        with open("/sys/kernel/mm/ksm/run") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def memory_report(argv: list[str]) -> int:
    """`memory [-json]`: a table (or JSON) of every pyshim process, the total and the
    total per container. PSS is a process's private pages plus its share of each page
    it shares (a page shared by 10 shims counts 1/10 to each): summed over processes
    it is what they cost together, with nothing counted twice."""
    as_json = False
    for arg in argv:
        if arg.lstrip("-") == "json":
            as_json = True
        elif arg.lstrip("-") in ("h", "help"):
            sys.stderr.write(f"Usage: {BINARY_NAME} memory [-json]\n")
            return 0
        else:
            sys.stderr.write(f"unknown argument {arg!r}\nUsage: {BINARY_NAME} memory [-json]\n")
            return 2
    procs = memory_processes()
    containers = sum(len(p["containers"]) for p in procs)
    total = {k: sum(p[k] for p in procs) for k in ("rss_kb", "pss_kb", "uss_kb")}
    ksm = _ksm_running()
    summary = {"processes": len(procs), "containers": containers, **total,
               "pss_kb_per_container": round(total["pss_kb"] / containers) if containers else None,
               "ksm_running": ksm}
    if as_json:
        import json

        print(json.dumps({"processes": procs, "total": summary}, indent=2))
        return 0

    def mb(kb: int) -> str:
        return f"{kb / 1024:.2f} MB"

    rows = [("PID", "KIND", "NAMESPACE", "ID", "CONTAINERS", "RSS", "PSS", "USS", "KSM PAGES")]
    for p in procs:
        ksm_pages = p["ksm_merging_pages"]
        rows.append((str(p["pid"]), p["kind"], p["namespace"] or "-", p["id"] or "-",
                     str(len(p["containers"])) if p["kind"] == "shim" else "-",
                     mb(p["rss_kb"]), mb(p["pss_kb"]), mb(p["uss_kb"]),
                     "-" if ksm_pages is None else str(ksm_pages)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    per = mb(summary["pss_kb_per_container"]) if containers else "-"
    print(f"\ntotal: {len(procs)} processes, {containers} containers: PSS {mb(total['pss_kb'])}, "
          f"USS {mb(total['uss_kb'])}, RSS {mb(total['rss_kb'])}; PSS per container {per}")
    print(f"KSM: {'on' if ksm else 'off'} on this host (/sys/kernel/mm/ksm/run)")
    print("PSS counts each shared page once, split among the processes sharing it; "
          "USS is what a process holds alone.")
    return 0


# =============================================================================
# main: the binary's entry point.
# =============================================================================


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "memory":  # an operator's command, not containerd's
        return memory_report(args[1:])
    flags = Flags(args)
    if flags.version:
        # The Go shim's layout, blank last line included, with Python for Go.
        print(f"containerd-shim-pyshim-v1:\n  Version:  {VERSION}\n  Revision: {REVISION}\n"
              f"  Python version: {sys.version.split()[0]}\n")
        return 0
    if flags.debug:
        log.level = _LEVELS["debug"]
    if flags.info:
        # Before the namespace check: containerd passes no flag but -info.
        try:
            return action_info(flags)
        except (ShimError, OSError) as e:
            sys.stderr.write(f"{RUNTIME_NAME}: {e}")
            return 1
    if flags.action == "template":
        return serve_template()
    if not flags.namespace:
        print("shim namespace cannot be empty: containerd runs this binary for runtime "
              f"{RUNTIME_NAME} (-h lists the flags)", file=sys.stderr)
        return 1
    if not flags.action:
        return serve(flags)
    if flags.action == "start":
        try:
            return action_start(flags)
        except (ShimError, OSError) as e:
            # containerd shows start's output as the error, followed by
            # ": exit status 1": one clear line, no newline (as the Go shim).
            sys.stderr.write(f"pyshim start: {e}")
            return 1
    if flags.action == "delete":
        return action_delete(flags)
    print(f"unknown action {flags.action!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

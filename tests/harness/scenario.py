"""What the comparison tests share: ctr steps, the check for leftovers, one scenario
run against both shims, ``ctr events``, and task API calls on a shim's own socket.

Every scenario that should behave alike runs once per runtime (``RUNTIMES``: the Go shim
first). ``same_as_runc`` remembers the Go shim's normalized outcome and holds pyshim's to
it; ``compare_with_runc`` does the same for a scenario run in a daemon of its own.
Re-exported by ``harness``: tests write ``from harness import ctr, ok, same_as_runc``.

Public surface:
    RUNTIMES, CTR_TIMEOUT, Step            pytest params (runc, pyshim); ctr's deadline;
                                           a ctr outcome (exit code, stdout, stderr)
    ctr, ok, norm, ctr_bg, finish          one ctr call; one that must succeed; ids and
                                           times normalized; ctr in the background
    task_row, wait_status, task_ps         ``ctr task ls`` / ``ps`` rows; wait for a status
    exec_info, bundle_of, remove           ps INFO of an exec; a task's bundle; task + container rm
    exit_warning, exited_while_down        ctr's non-zero exit warning; a task that exited
                                           while containerd was down, per BEHAVIOURS
    run_sleeper, kill_and_remove           a detached sleeper; SIGKILL it and remove it
    same_as_runc, compare_with_runc        pyshim's outcome held to the Go shim's
    checked, assert_no_leftovers           no shim of the daemon, no zombie or ctr child left
    ctr_children, pid_gone                 (zombie, ctr) children of ours; a pid dead or zombie
    EventLog, events                       ``ctr events`` parsed; per-container task topics
    task_call                              one task API call on a container's shim socket
    LOGGER, write_logger, logger_record    a ``binary://`` logging binary and what it recorded
    daemon_with, shim_of                   a daemon with extra environment; a task's shim pid
    template_socket                        the warm template's socket of a daemon's pyshim
    require, require_e2e                   skip for want of a prerequisite (fail under CI=true)
    run_without_pidns, run_sleeper_id      a task in the host's pid namespace; a sleeper by id
    stop_and_remove                        SIGKILL, wait for STOPPED, remove task and container
    exec_request, exec_state               an ExecProcessRequest from the container's spec; an exec's status
    tasks_call                             one call of containerd's own Tasks API (gRPC)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self

import pytest

import harness
from harness import CTR, PYSHIM, RUNC, Containerd, _stat, new_id, shim_pids, wait_for

import pyshim_pb2 as pb

RUNTIMES = [pytest.param(RUNC, id="runc"), pytest.param(PYSHIM, id="pyshim")]
CTR_TIMEOUT = 30.0

Step = tuple[int, str, str]  # (ctr exit code, stdout, stderr)

__all__ = [
    "CTR_TIMEOUT", "LOGGER", "RUNTIMES", "EventLog", "Step", "assert_no_leftovers", "bundle_of",
    "checked", "compare_with_runc", "ctr", "ctr_bg", "ctr_children", "daemon_with", "events",
    "exec_info", "exit_warning", "exited_while_down", "finish", "kill_and_remove",
    "logger_record", "norm", "ok", "pid_gone", "remove", "require", "require_e2e",
    "run_sleeper", "same_as_runc", "shim_of", "task_call", "task_ps", "task_row",
    "wait_status", "write_logger", "run_without_pidns", "run_sleeper_id", "stop_and_remove",
    "exec_request", "exec_state", "tasks_call", "grpc_module", "template_socket",
]


# ------------------------------------------------------------------------ prerequisites


def require(condition: object, reason: str) -> None:
    """Skip unless ``condition``; under CI=true a would-be skip fails instead, so that CI
    never passes by skipping."""
    if condition:
        return
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true forbids skipping: {reason}", pytrace=False)
    pytest.skip(reason)


def require_e2e() -> None:
    """Prerequisites of every test that drives a real containerd."""
    require(os.geteuid() == 0, "end-to-end tests need root")
    for path in (harness.CONTAINERD, harness.CTR, harness.RUNC_BINARY, harness.BUSYBOX):
        require(os.access(path, os.X_OK), f"{path} is not installed")


# ---------------------------------------------------------------------------- leftovers


def ctr_children() -> tuple[list[int], list[int]]:
    """(zombie children, live ctr children) of the test process."""
    me, zombies, ctrs = os.getpid(), [], []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        state, ppid = raw[raw.rindex(b")") + 2:].split()[:2]
        if int(ppid) != me:
            continue
        if state in (b"Z", b"X"):
            zombies.append(int(name))
        elif harness.cmdline(int(name))[:1] == [CTR]:
            ctrs.append(int(name))
    return zombies, ctrs


def assert_no_leftovers(d: Containerd) -> None:
    """Scenario 8: no shim of this daemon and no zombie/ctr child of ours is left."""
    try:
        wait_for(lambda: not shim_pids(d), 10, 0.05)
    except TimeoutError:
        pids = shim_pids(d)
        raise AssertionError(f"shims left for {d.address}: "
                             f"{[(p, harness.cmdline(p)) for p in pids]}") from None
    zombies, ctrs = ctr_children()
    assert zombies == [], f"zombie children of the test process: {zombies}"
    assert ctrs == [], f"ctr children still running: {ctrs}"


@contextmanager
def checked(d: Containerd, request: pytest.FixtureRequest) -> Iterator[Containerd]:
    """Yields ``d``; after a test that passed, asserts it left nothing behind (a failed
    test has its own report)."""
    failed = request.session.testsfailed
    yield d
    if request.session.testsfailed == failed:
        assert_no_leftovers(d)


# ------------------------------------------------------------------ comparing the shims


_outcomes: dict[tuple[str, str], Any] = {}


def same_as_runc(key: str, runtime: str, scenario: Callable[[str], Any]) -> Any:
    """Run ``scenario(runtime)`` (which asserts concrete values itself) and return its
    normalized outcome; for pyshim, also assert it equals the Go shim's outcome (taken
    from the RUNC case of the same test, or computed now if that did not run)."""
    outcome = scenario(runtime)
    _outcomes[(key, runtime)] = outcome
    if runtime != RUNC:
        ref = _outcomes.get((key, RUNC))
        if ref is None:
            ref = _outcomes[(key, RUNC)] = scenario(RUNC)
        assert outcome == ref, f"{key}: pyshim differs from the Go shim"
    return outcome


def compare_with_runc(key: str, runtime: str, outcome: Any) -> None:
    """For scenarios that need a daemon of their own: record the RUNC outcome, and
    assert pyshim's equals it when the RUNC case ran (it runs first by parametrization)."""
    _outcomes[(key, runtime)] = outcome
    ref = _outcomes.get((key, RUNC))
    if runtime != RUNC and ref is not None:
        assert outcome == ref, f"{key}: pyshim differs from the Go shim"


# ---------------------------------------------------------------------------------- ctr


def ctr(d: Containerd, *args: str, timeout: float = CTR_TIMEOUT) -> Step:
    res = d.ctr(*args, timeout=timeout)
    return res.returncode, res.stdout, res.stderr


def ok(d: Containerd, *args: str) -> str:
    """ctr that must succeed; returns its stdout."""
    code, out, err = ctr(d, *args)
    assert code == 0, f"ctr {' '.join(args)} -> {code}: {err}"
    return out


def norm(step: Step, *ids: str) -> Step:
    """Ids -> <ID>, ctr's log timestamps -> <T>."""
    def n(text: str) -> str:
        for i in ids:
            text = text.replace(i, "<ID>")
        return re.sub(r'time="[^"]*"', "time=<T>", text)

    return step[0], n(step[1]), n(step[2])


@contextmanager
def ctr_bg(d: Containerd, *args: str, stdin: int = subprocess.DEVNULL
           ) -> Iterator[subprocess.Popen]:
    """A ctr client in the background; killed (if still running) and reaped at exit."""
    argv = [CTR, "--address", d.address, "-n", d.namespace, *args]
    proc = subprocess.Popen(argv, env=d.env, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen, input: str | None = None) -> Step:
    out, err = proc.communicate(input, timeout=CTR_TIMEOUT)
    return proc.returncode, out, err


def task_row(d: Containerd, cid: str) -> tuple[int, str] | None:
    """(pid, status) of a task from ``ctr task ls``; None if there is none."""
    for line in ok(d, "task", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1]), fields[2]
    return None


def wait_status(d: Containerd, cid: str, status: str, timeout: float = 10) -> int:
    """Wait until the task has ``status``; returns its pid."""
    row = wait_for(lambda: (r := task_row(d, cid)) and r[1] == status and r, timeout,
                   message=f"task {cid} never {status}: {task_row(d, cid)}")
    return row[0]


def exec_info(exec_id: str) -> str:
    """What ``ctr task ps`` shows in INFO for an exec: this containerd's form (BEHAVIOURS)."""
    return harness.behaviour().ps_exec_info.format(exec_id)


def task_ps(d: Containerd, cid: str) -> list[tuple[int, str]]:
    """[(pid, INFO)] from ``ctr task ps``."""
    rows = []
    for line in ok(d, "task", "ps", cid).splitlines()[1:]:
        pid, _, info = line.strip().partition(" ")
        rows.append((int(pid), info.strip()))
    return rows


def bundle_of(d: Containerd, cid: str) -> str:
    return os.path.join(d.state, harness.TASK_PLUGIN_DIR, d.namespace, cid)


def remove(d: Containerd, cid: str) -> dict[str, Step]:
    """task rm + container rm of a stopped task, normalized."""
    return {"task rm": norm(ctr(d, "task", "rm", cid), cid),
            "container rm": norm(ctr(d, "containers", "rm", cid), cid)}


def exit_warning(code: int) -> str:
    """What ``ctr task rm`` prints for a task that exited non-zero (normalized)."""
    return f'time=<T> level=warning msg="task <ID> exit with non-zero exit code {code}"\n'


def run_sleeper(d: Containerd, runtime: str, rootfs: str, *flags: str) -> tuple[str, int]:
    cid = new_id()
    assert ctr(d, "run", "-d", "--runtime", runtime, *flags, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000") == (0, "", "")
    return cid, wait_status(d, cid, "RUNNING")


def kill_and_remove(d: Containerd, cid: str) -> dict:
    assert ctr(d, "task", "kill", "-s", "KILL", cid) == (0, "", "")
    wait_status(d, cid, "STOPPED")
    res = remove(d, cid)
    assert res["task rm"] == (0, "", exit_warning(137))
    return res


def pid_gone(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[0] in ("Z", "X")


def exited_while_down(d: Containerd, cid: str, pid: int, code: int) -> dict[str, Step]:
    """After a containerd restart, a task that exited while containerd was down: what
    this containerd does with it (BEHAVIOURS.keeps_exited_task_over_restart), asserted,
    and the normalized ``task rm`` / ``container rm`` outcome.

    1.6 asks the shim for State and shows the task STOPPED with its exit code. 1.7 and
    later call Pids while loading the shim and, finding none, take it for a leak: Delete
    and Shutdown, then the bundle is removed; the task is gone, the container stays."""
    if harness.behaviour().keeps_exited_task_over_restart:
        assert wait_status(d, cid, "STOPPED", timeout=20) == pid
        res = remove(d, cid)
        assert res["task rm"] == (0, "", exit_warning(code) if code else "")
    else:
        bundle = bundle_of(d, cid)
        wait_for(lambda: not os.path.exists(bundle), 20,
                 message=f"containerd kept the bundle of {cid}, a shim with no pids")
        assert task_row(d, cid) is None, "the exited task outlived the leak cleanup"
        assert cid in d.containers(), "the cleanup removed the container record too"
        res = remove(d, cid)
        code_, out, err = res["task rm"]
        assert (code_, out) == (1, "") and "ctr: no running task found" in err, res
    assert res["container rm"] == (0, "", "")
    return res


# ------------------------------------------------------------------------------- events


_EVENT = re.compile(r"^\S+ \S+ \S+ UTC (\S+) (/\S+) (\{.*\})\s*$")


class EventLog:
    """``ctr events`` in the background; lines parsed into (topic, payload)."""

    def __init__(self, d: Containerd) -> None:
        self.d = d
        self.events: list[tuple[str, dict]] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        argv = [CTR, "--address", self.d.address, "-n", self.d.namespace, "events"]
        self._proc = subprocess.Popen(argv, env=self.d.env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # Subscribed once an event we cause ourselves shows up.
        marker = new_id("sub")

        def subscribed() -> bool:
            ok(self.d, "namespaces", "label", self.d.namespace, f"pyshim-e2e={marker}")
            return any(t == "/namespaces/update" and marker in json.dumps(p)
                       for t, p in self.snapshot())

        wait_for(subscribed, 10, 0.2, message=f"ctr events never subscribed: {self.raw}")
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            m = _EVENT.match(line)
            with self._lock:
                self.raw.append(line)
                if m and m.group(1) == self.d.namespace:
                    self.events.append((m.group(2), json.loads(m.group(3))))

    def snapshot(self) -> list[tuple[str, dict]]:
        with self._lock:
            return list(self.events)

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._thread is not None
        self._proc.kill()
        self._proc.wait()
        self._thread.join(5)

    def of(self, cid: str) -> list[tuple[str, dict]]:
        """Task events of one container, in arrival order."""
        return [(t, p) for t, p in self.snapshot()
                if t.startswith("/tasks/") and p.get("container_id") == cid]


@contextmanager
def events(d: Containerd, runtime: str) -> Iterator[Callable[[str, str], list[str]]]:
    """``ctr events`` in the background (an ``EventLog``, subscribed when this yields).
    Yields ``topics(cid, until)``: waits until topic ``until`` was seen for container
    ``cid``, then returns that container's /tasks/* topics in the order containerd
    delivered them. A /tasks/delete that the ``runtime``'s Go shim lost
    (``harness.wait_task_delete``: a warning) is put at the end of its record, where it
    comes when it is published, so pyshim is compared with what the Go shim does when it
    does not lose it."""
    with EventLog(d) as log:
        def topics(cid: str, until: str) -> list[str]:
            def mine() -> list[str]:
                return [t for t, _ in log.of(cid)]

            def seen() -> list[str] | None:
                got = mine()
                return got if until in got else None

            message = f"no {until} event for {cid}: {log.raw[-10:]}"
            if until != "/tasks/delete":
                return wait_for(seen, 10, 0.05, message=message)
            got = harness.wait_task_delete(seen, runtime, 10, message=message)
            return got if got is not None else [*mine(), until]

        yield topics


# ----------------------------------------------------------------------------- task API


def task_call(d: Containerd, cid: str, method: str, req) -> bytes | tuple[int, str]:
    """One task API call on the container's shim socket, either shim, as containerd
    would make it: containerd 2.x keeps a shim's address and version in the bundle's
    bootstrap.json (version 3: task API v3), 1.x only its address. Returns the
    response payload, or (status code, message) when the shim refuses."""
    import pyshim  # the task service names and the client; only the tests that call need it

    bundle = bundle_of(d, cid)
    try:
        with open(os.path.join(bundle, "bootstrap.json")) as f:
            params = json.load(f)
    except FileNotFoundError:
        with open(os.path.join(bundle, "address")) as f:
            params = {"address": f.read().strip(), "version": 2}
    service = pyshim.TASK_SERVICE_V3 if params.get("version", 2) >= 3 else pyshim.TASK_SERVICE

    async def call() -> bytes | tuple[int, str]:
        client = await pyshim.TtrpcClient.connect(params["address"])
        try:
            return await client.call(service, method, req.SerializeToString(),
                                     {pyshim.NAMESPACE_KEY: d.namespace}, timeout=10)
        except pyshim.RemoteError as e:
            return e.code, str(e)
        finally:
            client.close()

    return asyncio.run(call())


# ----------------------------------------------------------------------- logging binary


# A logging binary for `binary://` URIs: records how it was started (argv, environment,
# cwd, its fds 0-5), copies fd 3 and fd 4 into files, signals ready on fd 5, ignores
# SIGTERM so that it flushes and exits at EOF, and marks that it finished.
LOGGER = r"""#!/bin/sh
trap '' TERM
d=$2
env | sort > "$d/env"
pwd > "$d/cwd"
echo $$ > "$d/pid"
echo "$#" "$@" > "$d/args"
for fd in 0 1 2 3 4 5; do
    echo "$fd $(ls -lL /proc/$$/fd/$fd | cut -c1) $(ls -l /proc/$$/fd/$fd | cut -c2-4)" >> "$d/fds"
done
cat <&3 > "$d/stdout" &
cat <&4 > "$d/stderr" &
exec 3<&- 4<&-
echo ready >&5
exec 5>&-
wait
echo done > "$d/done"
"""


def write_logger(directory, name: str, text: str, mode: int = 0o755) -> str:
    path = os.path.join(str(directory), name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def logger_record(out: str, *replace: tuple[str, str]) -> dict[str, str]:
    """Every file the logger wrote into ``out``, with the given replacements."""
    rec = {}
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name)) as f:
            text = f.read()
        for old, new in replace:
            text = text.replace(old, new)
        rec[name] = text
    rec.pop("pid", None)
    return rec


# ------------------------------------------------------------------------------ daemons


def template_socket(daemon: Containerd, launcher: str | None = None) -> str:
    """The warm template socket of this daemon's pyshim shims, as the installed pyshim
    (the one containerd runs) computes it: the native launcher's identity (default the
    installed one; a symlink to it names the same file) is part of the name."""
    launcher = launcher or os.path.join(sysconfig.get_path("scripts"), harness.shim_binary(PYSHIM))
    code = f"import pyshim; print(pyshim.template_path({daemon.address!r}, {launcher!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                          text=True, check=True).stdout.strip()


@contextmanager
def daemon_with(extra_path: list[str] | None = None, **env: str) -> Iterator[Containerd]:
    """A started private containerd whose environment (and so its shims' and pyshim's
    template's) has these variables, and ``extra_path`` first on its PATH; os.environ
    is restored afterwards."""
    require_e2e()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    daemon = Containerd(extra_path=extra_path)  # copies os.environ
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shim_of(daemon: Containerd, cid: str, runtime: str = PYSHIM) -> int:
    """The pid of the long-lived shim serving task ``cid`` (not a start/delete run)."""
    for pid in shim_pids(daemon, runtime):
        argv = harness.cmdline(pid)
        if "-id" in argv and argv[argv.index("-id") + 1] == cid and argv[-1] not in ("start", "delete"):
            return pid
    raise AssertionError(f"no shim for {cid}")


# ------------------------------------------------- specs, exec requests, containerd's Tasks API


def run_without_pidns(d: Containerd, runtime: str, rootfs: str, tmp_path, cid: str,
                      script: str, annotations: dict[str, str] | None = None) -> int:
    """`ctr run -d --config` of `/bin/sh -c script` in the host's pid namespace; the pid."""
    spec = json.loads(ok(d, "oci", "spec"))
    if annotations:
        spec.setdefault("annotations", {}).update(annotations)
    spec["root"] = {"path": os.path.abspath(rootfs), "readonly": True}
    spec["process"]["args"] = ["/bin/sh", "-c", script]
    spec["process"]["terminal"] = False
    spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "pid"]
    spec["linux"]["cgroupsPath"] = f"/{d.namespace}/{cid}"  # `ctr oci spec` names no container
    path = os.path.join(str(tmp_path), f"{cid}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    step = ctr(d, "run", "-d", "--runtime", runtime, "--config", path, cid)
    assert step == (0, "", ""), step
    return wait_status(d, cid, "RUNNING")


def stop_and_remove(d: Containerd, cid: str) -> None:
    ctr(d, "task", "kill", "-s", "KILL", cid)
    wait_status(d, cid, "STOPPED")
    ok(d, "task", "rm", cid)
    ok(d, "containers", "rm", cid)


def exec_request(d: Containerd, cid: str, eid: str, args: list[str], terminal: bool,
                 stdout: str = "") -> pb.ExecProcessRequest:
    """An ExecProcessRequest whose process spec (the container's, with `args`) says
    terminal:false, asking for a terminal or not in its own `terminal` field."""
    with open(os.path.join(bundle_of(d, cid), "config.json")) as f:
        process = json.load(f)["process"]
    process["args"] = args
    process["terminal"] = False
    req = pb.ExecProcessRequest(id=cid, exec_id=eid, terminal=terminal, stdout=stdout)
    req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
    req.spec.value = json.dumps(process).encode()
    return req


def exec_state(d: Containerd, cid: str, eid: str) -> int:
    raw = task_call(d, cid, "State", pb.StateRequest(id=cid, exec_id=eid))
    assert isinstance(raw, bytes), raw
    return pb.StateResponse.FromString(raw).status


def grpc_module():
    """The grpc module (grpcio); a test without it skips, or fails under CI=true."""
    try:
        import grpc
    except ImportError:
        require(False, "grpcio is not installed (.ci/setup installs it)")
    return grpc


def tasks_call(d: Containerd, method: str, payload: bytes) -> bytes:
    """One call of containerd's containerd.services.tasks.v1.Tasks service."""
    grpc = grpc_module()
    with grpc.insecure_channel(f"unix://{d.address}") as channel:
        rpc = channel.unary_unary(f"/containerd.services.tasks.v1.Tasks/{method}",
                                  request_serializer=None, response_deserializer=None)
        return rpc(payload, metadata=[("containerd-namespace", d.namespace)], timeout=30)


def run_sleeper_id(d: Containerd, runtime: str, rootfs: str, cid: str, *flags: str) -> int:
    assert ctr(d, "run", "-d", "--runtime", runtime, *flags, "--rootfs", rootfs, cid,
               "/bin/sleep", "1000") == (0, "", "")
    return wait_status(d, cid, "RUNNING")

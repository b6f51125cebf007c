"""Checkpoint and restore (runc + criu), pyshim against the Go runc shim.

Every scenario runs once per runtime through the session containerd; pyshim's
normalized outcome must equal the Go shim's (``same_as_runc``).

* ``test_checkpoint_through_containerd``: ``ctr task checkpoint`` and ``ctr c
  checkpoint --task`` on a running task. Where criu cannot dump on this kernel (criu
  3.17 fails "kerndat_vdso_fill_symtable" on Linux 6.18), the test proves the failure
  path instead of the round trip: runc's words and the copied criu-dump.log reach ctr,
  the task keeps running (also for ``exit``), criu's scratch dir is gone and no image is
  made. Where ``criu check`` passes (Debian 13: criu 4.1.1 on the same kernel), it
  checkpoints a counting task and restores it with ``ctr c restore --live``: the counter
  goes on from where it was. criu locks the task's network namespace with
  iptables-restore, which Debian's criu only suggests: without iptables the dump fails
  for both shims ("Locking network failed" in criu-dump.log).
* ``test_restore_and_checkpoint_flags``: the task API's restore (Create with a
  checkpoint, Start restores) and every checkpoint option, driven on the shim's socket
  with a recording runc wrapper as BinaryName. The wrapper turns ``restore`` into
  ``runc run --detach`` with the same stdio and pid file (a stand-in for criu that
  works on any kernel) and records every command line, so both shims' runc command
  lines, events, states, output and exit codes are compared; the one difference is
  CriuPath, which pyshim always passes as ``--criu`` and the Go shim only on 1.6
  (``BEHAVIOURS.go_shim_passes_criu``).
* ``test_restore_failure_is_runcs_own_words``: the same restore with the real runc
  and criu: the caller gets runc's error, the task stays CREATED and is deleted cleanly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import harness
import pytest
from google.protobuf import any_pb2
from harness import (
    RUNTIMES,
    Containerd,
    bundle_of,
    checked,
    ctr,
    events,
    exit_warning,
    kill_and_remove,
    new_id,
    norm,
    ok,
    remove,
    run_sleeper,
    same_as_runc,
    task_call,
    task_row,
    wait_for,
    wait_status,
)

import pyshim
import pyshim_pb2 as pb

CRIU = "/usr/sbin/criu"
DUMP_FAILED = "criu failed: type DUMP errno 0"


@pytest.fixture
def daemon(containerd: Containerd, request: pytest.FixtureRequest) -> Iterator[Containerd]:
    with checked(containerd, request) as d:
        yield d


@pytest.fixture
def scratch() -> Iterator[str]:
    """A temp dir for bundles, images and output (the shims' paths must be absolute)."""
    path = tempfile.mkdtemp(prefix="pysh-cp-", dir="/tmp")
    try:
        yield path
    finally:
        harness.umount_tree(path)
        shutil.rmtree(path, ignore_errors=True)


_criu: list[bool] = []


def criu_works() -> bool:
    """Whether `criu check` passes on this machine (asked once)."""
    if not _criu:
        res = subprocess.run([CRIU, "check"], capture_output=True, text=True, check=False)
        _criu.append(res.returncode == 0 and "Error" not in res.stdout + res.stderr)
    return _criu[0]


def normb(step, d: Containerd, cid: str):
    """norm() plus the bundle path -> <BUNDLE>."""
    code, out, err = norm(step, cid)
    bundle = bundle_of(d, cid).replace(cid, "<ID>")
    return code, out.replace(bundle, "<BUNDLE>"), err.replace(bundle, "<BUNDLE>")


def checkpoint_request(cid: str, path: str, **options) -> pb.CheckpointTaskRequest:
    req = pb.CheckpointTaskRequest(id=cid, path=path)
    if options:
        req.options.type_url = pyshim.URL_RUNC_CHECKPOINT_OPTIONS
        req.options.value = pb.RuncCheckpointOptions(**options).SerializeToString()
    return req


# --------------------------------------------------------------- through containerd


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_checkpoint_through_containerd(daemon: Containerd, busybox_image: str, runtime: str,
                                       scratch: str) -> None:
    conftest = sys.modules["conftest"]
    conftest.require(os.access(CRIU, os.X_OK), f"{CRIU} is not installed")
    if criu_works():
        same_as_runc("checkpoint-round-trip", runtime,
                     lambda r: _round_trip(daemon, busybox_image, r))
    else:
        same_as_runc("checkpoint-criu-fails", runtime,
                     lambda r: _criu_fails(daemon, busybox_image, r, scratch))


def _criu_fails(d: Containerd, image: str, r: str, scratch: str) -> dict:
    with events(d, r) as topics:
        cid = new_id("cp")
        ok(d, "run", "-d", "--runtime", r, image, cid, "sleep", "1000")
        pid = wait_status(d, cid, "RUNNING")
        bundle = bundle_of(d, cid)
        words = f"runc did not terminate successfully: exit status 1: {DUMP_FAILED}"
        refused = (1, "", (f"ctr: {words} path= <BUNDLE>/criu-dump.log"
                          f"{harness.behaviour().ctr_unknown_suffix}\n"))
        res = {"task checkpoint": normb(ctr(d, "task", "checkpoint", cid), d, cid)}
        assert res["task checkpoint"] == refused
        assert task_row(d, cid) == (pid, "RUNNING")
        # criu's own words are in the copy of its log the message points at.
        with open(os.path.join(bundle, "criu-dump.log")) as f:
            errors = re.findall(r"Error \(criu/[^)]*\): (.*)", f.read())
        assert errors, "criu-dump.log has no criu error"
        res["criu's last error"] = errors[-1]
        assert not os.path.exists(os.path.join(bundle, "work", "criu-work"))

        res["container checkpoint"] = normb(
            ctr(d, "containers", "checkpoint", "--task", cid, f"localhost/cp/{cid}:1"), d, cid)
        assert res["container checkpoint"] == refused
        assert d.images() == [image], "a checkpoint image was made of a failed dump"
        assert task_row(d, cid) == (pid, "RUNNING")

        # ctr sends checkpoint options only to io.containerd.runc.*: `exit` (and a
        # work path kept afterwards) through the task API, for both shims alike.
        work = os.path.join(scratch, f"work-{r}")
        code, msg = task_call(d, cid, "Checkpoint", checkpoint_request(
            cid, os.path.join(scratch, f"image-{r}"), exit=True, work_path=work))
        res["exit"] = code, msg.replace(bundle, "<BUNDLE>")
        assert res["exit"] == (pyshim.UNKNOWN, f"{words} path= <BUNDLE>/criu-dump.log")
        assert os.path.exists(os.path.join(work, "dump.log")), "the given work path was not kept"
        assert task_row(d, cid) == (pid, "RUNNING"), "a failed dump with exit stopped the task"

        assert ctr(d, "task", "kill", "-s", "KILL", cid) == (0, "", "")
        wait_status(d, cid, "STOPPED")
        res["stopped"] = task_call(d, cid, "Checkpoint", checkpoint_request(cid, scratch))
        assert res["stopped"] == (pyshim.UNKNOWN, "cannot checkpoint a stopped container")
        res.update(remove(d, cid))
        assert res["task rm"] == (0, "", exit_warning(137))
        res["events"] = topics(cid, "/tasks/delete")
    assert res["events"] == ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed",
                             "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]
    return res


def _round_trip(d: Containerd, image: str, r: str) -> dict:
    """Where criu works: checkpoint a counter (it keeps running), kill it, restore the
    checkpoint: it counts on from where it was. (Reached on the debian13 platform; the
    host's criu 3.17 cannot dump on its kernel.)"""
    cid = new_id("cp")
    ref = f"localhost/cp/{cid}:1"
    counter = "i=0; while true; do echo $i > /tmp/n; i=$((i+1)); sleep 0.1; done"
    ok(d, "run", "-d", "--runtime", r, image, cid, "sh", "-c", counter)
    wait_status(d, cid, "RUNNING")

    def count() -> int:
        step = ctr(d, "task", "exec", "--exec-id", new_id("n"), cid, "cat", "/tmp/n")
        return int(step[1]) if step[0] == 0 and step[1].strip().isdigit() else -1

    before = wait_for(lambda: (n := count()) >= 5 and n, 10)
    # Checkpointed after `before` was read, so the restored counter starts above it.
    res = {"checkpoint": norm(ctr(d, "containers", "checkpoint", "--task", "--rw", cid, ref), cid)}
    assert res["checkpoint"][0] == 0, res["checkpoint"]
    ok(d, "task", "kill", "-s", "KILL", cid)
    wait_status(d, cid, "STOPPED")
    ok(d, "task", "rm", cid)
    ok(d, "containers", "rm", cid)
    res["restore"] = norm(ctr(d, "containers", "restore", "--live", "--rw", cid, ref), cid)
    assert res["restore"][0] == 0, res["restore"]
    wait_status(d, cid, "RUNNING")
    first = wait_for(lambda: (n := count()) >= 0 and (n,), 10)[0]
    later = wait_for(lambda: (n := count()) > first and n, 10)
    res["counts on"] = before <= first < later  # a fresh start would count from 0
    assert res["counts on"], (before, first, later)
    kill_and_remove(d, cid)
    ok(d, "images", "rm", ref)
    return res


# ------------------------------------------------------------- on the shim's socket

# A runc wrapper for BinaryName: records each command line (one JSON list a line), turns
# `restore` into `run --detach` (same stdio, pid file, console socket and bundle: the
# checkpointed command starts afresh, standing in for criu), makes `checkpoint` write an
# image file and, without --leave-running, SIGKILL the container as criu's dump would.
# Every other command is the real runc's.
FAKE_RUNC = """#!/usr/bin/python3 -I
import json, os, sys
RUNC, RECORD = {runc!r}, {record!r}
args = sys.argv[1:]
with open(RECORD, "a") as f:
    f.write(json.dumps(args) + "\\n")
i = 0
while args[i].startswith("-"):
    i += 1 if args[i] in ("--systemd-cgroup", "--debug") else 2
glob, cmd, rest = args[:i], args[i], args[i + 1:]
if cmd == "restore":
    out, j = [], 0
    while j < len(rest):
        if rest[j] in ("--image-path", "--work-path", "--parent-path"):
            j += 2
            continue
        out.append("--no-subreaper" if rest[j] == "-no-subreaper" else rest[j])
        j += 1
    os.execv(RUNC, [RUNC, *glob, "run", *out])
if cmd == "checkpoint":
    image = rest[rest.index("--image-path") + 1]
    os.makedirs(image, exist_ok=True)
    with open(os.path.join(image, "inventory.img"), "w") as f:
        f.write("stand-in\\n")
    if "--leave-running" not in rest:
        os.execv(RUNC, [RUNC, *glob, "kill", rest[-1], "KILL"])
    sys.exit(0)
os.execv(RUNC, [RUNC, *args])
"""


def fake_runc(scratch: str, name: str) -> tuple[str, str]:
    """(the wrapper's path, the file it records command lines in)."""
    record = os.path.join(scratch, f"argv-{name}")
    fake = os.path.join(scratch, f"runc-{name}")
    with open(fake, "w") as f:
        f.write(FAKE_RUNC.format(runc=harness.RUNC_BINARY, record=record))
    os.chmod(fake, 0o755)
    return fake, record


def recorded(record: str, command: str) -> list[list[str]]:
    """The recorded `command` lines, from the command on (global flags dropped)."""
    out = []
    with open(record) as f:
        for line in f:
            argv = json.loads(line)
            if command in argv:
                out.append(argv[argv.index(command):])
    return out


def second_bundle(d: Containerd, host: str, cid: str, scratch: str, rootfs: str,
                  args: list[str], terminal: bool = False) -> str:
    """A bundle for a second container served by ``host``'s shim: the host's spec with
    its own command and cgroup."""
    with open(os.path.join(bundle_of(d, host), "config.json")) as f:
        spec = json.load(f)
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"] = {"path": rootfs, "readonly": True}
    spec["linux"]["cgroupsPath"] = f"/{d.namespace}/{cid}"
    path = os.path.join(scratch, cid)
    os.makedirs(os.path.join(path, "rootfs"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(spec, f)
    return path


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def runc_options(**fields) -> any_pb2.Any:
    return any_pb2.Any(type_url=pyshim.URL_RUNC_OPTIONS,
                       value=pb.RuncOptions(**fields).SerializeToString())


def state(d: Containerd, host: str, cid: str) -> tuple[int, int]:
    """(status, pid) of a container from the State of ``host``'s shim."""
    st = pb.StateResponse.FromString(task_call(d, host, "State", pb.StateRequest(id=cid)))
    return st.status, st.pid


def call_ok(d: Containerd, host: str, method: str, req, resp_cls):
    raw = task_call(d, host, method, req)
    assert isinstance(raw, bytes), f"{method}: {raw}"
    return resp_cls.FromString(raw)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_restore_and_checkpoint_flags(daemon: Containerd, rootfs: str, runtime: str,
                                      scratch: str) -> None:
    """Create with a checkpoint runs nothing (pid 0, CREATED, no exec); Start restores:
    TaskStart with the restored pid, stdio copied, RUNNING. Checkpoint passes every
    option as the Go shim does and leaves the task running; with `exit` the task exits
    and that exit is published. The recorded runc command lines must be the Go shim's."""
    def scenario(r: str) -> dict:
        fake, record = fake_runc(scratch, r)
        paths = {}

        def path(name: str) -> str:
            paths[name] = os.path.join(scratch, f"{name}-{r}")
            return paths[name]

        with events(daemon, r) as topics:
            host, _ = run_sleeper(daemon, r, rootfs)
            cid = new_id("rs")
            bundle = second_bundle(daemon, host, cid, scratch, rootfs,
                                   ["/bin/sh", "-c", "echo restored; exec sleep 1000"])
            out = path("out")
            image = path("image")
            os.makedirs(image)
            opts = runc_options(binary_name=fake, criu_path=CRIU, criu_work_path=path("criu-work"))
            req = pb.CreateTaskRequest(id=cid, bundle=bundle, stdout="file://" + out,
                                       stderr="file://" + out, checkpoint=image, options=opts)
            res = {"create pid": call_ok(daemon, host, "Create", req, pb.CreateTaskResponse).pid}
            assert res["create pid"] == 0
            assert state(daemon, host, cid) == (1, 0)  # CREATED
            spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                               value=json.dumps({"args": ["/bin/true"], "cwd": "/"}).encode())
            res["exec before start"] = task_call(daemon, host, "Exec", pb.ExecProcessRequest(
                id=cid, exec_id="e1", spec=spec))
            assert res["exec before start"] == (pyshim.UNKNOWN, "cannot exec in a created state")

            pid = call_ok(daemon, host, "Start", pb.StartRequest(id=cid), pb.StartResponse).pid
            with open(f"/proc/{pid}/cgroup") as f:  # the restored init is in its cgroup
                assert f"/{daemon.namespace}/{cid}\n" in f.read()
            assert state(daemon, host, cid) == (2, pid)  # RUNNING
            res["output"] = wait_for(lambda: read_text(out), 10)
            assert res["output"] == "restored\n"

            res["checkpoint"] = task_call(daemon, host, "Checkpoint", checkpoint_request(
                cid, path("image2"), open_tcp=True, external_unix_sockets=True, terminal=True,
                file_locks=True, empty_namespaces=["network"]))
            assert res["checkpoint"] == b""
            assert os.listdir(paths["image2"]) == ["inventory.img"]
            assert state(daemon, host, cid) == (2, pid)

            res["checkpoint exit"] = task_call(daemon, host, "Checkpoint", checkpoint_request(
                cid, path("image3"), exit=True))
            assert res["checkpoint exit"] == b""
            res["wait"] = call_ok(daemon, host, "Wait", pb.WaitRequest(id=cid),
                                  pb.WaitResponse).exit_status
            assert res["wait"] == 137
            assert state(daemon, host, cid) == (3, pid)  # STOPPED
            res["delete"] = call_ok(daemon, host, "Delete", pb.DeleteRequest(id=cid),
                                    pb.DeleteResponse).exit_status
            assert res["delete"] == 137
            kill_and_remove(daemon, host)
            res["events"] = topics(cid, "/tasks/delete")
        assert res["events"] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]

        def normalize(argv: list[str]) -> list[str]:
            text = json.dumps(argv).replace(bundle, "<BUNDLE>").replace(cid, "<ID>")
            for name, p in paths.items():
                text = text.replace(p, f"<{name}>")
            return ["--no-subreaper" if a == "-no-subreaper" else a for a in json.loads(text)]

        with open(record) as f:
            lines = [normalize(json.loads(ln)) for ln in f]
        runs: dict[str, list[list[str]]] = {}
        for argv in lines:
            cmd = next((k for k, a in enumerate(argv) if a in ("restore", "checkpoint")), None)
            if cmd is not None:
                runs.setdefault(argv[cmd], []).append(argv[cmd:])
                runs.setdefault("global flags", []).append(argv[:cmd])
        # CriuPath: the Go shim passes it as --criu where BEHAVIOURS says so (1.6; 1.7
        # deprecated the field and its Go shim drops it), pyshim on every line (runc 1.1,
        # on Debian 12 and 13, uses it; runc 1.2 warns and ignores it). Apart from that
        # the global flags are the Go shim's.
        passes_criu = r == harness.PYSHIM or harness.behaviour().go_shim_passes_criu
        flags = runs.pop("global flags")
        assert all((g[-2:] == ["--criu", CRIU]) == passes_criu for g in flags), flags
        res["global flags but --criu"] = [g[:-2] if passes_criu else g for g in flags]
        res["runc"] = runs
        assert runs["restore"] == [[
            "restore", "--image-path", "<image>", "--work-path", "<criu-work>", "--detach",
            "--pid-file", "<BUNDLE>/init.pid", "--no-subreaper", "--bundle", "<BUNDLE>", "<ID>"]]
        assert runs["checkpoint"] == [
            ["checkpoint", "--image-path", "<image2>", "--work-path", "<BUNDLE>/work/criu-work",
             "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
             "--empty-ns", "network", "--leave-running", "<ID>"],
            ["checkpoint", "--image-path", "<image3>", "--work-path", "<BUNDLE>/work/criu-work",
             "<ID>"]]
        assert not os.path.exists(os.path.join(bundle, "work", "criu-work"))
        return res

    same_as_runc("restore-checkpoint-flags", runtime, scenario)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_restore_failure_is_runcs_own_words(daemon: Containerd, rootfs: str, runtime: str,
                                            scratch: str) -> None:
    """Start of a task created from an image dir criu cannot restore: runc's error
    reaches the caller, the task stays CREATED (pid 0) and deletes cleanly, leaving
    no runc state, cgroup or process."""
    def scenario(r: str) -> dict:
        with events(daemon, r) as topics:
            host, _ = run_sleeper(daemon, r, rootfs)
            cid = new_id("rf")
            bundle = second_bundle(daemon, host, cid, scratch, rootfs, ["/bin/sleep", "1000"])
            image = os.path.join(scratch, f"image-{r}")
            os.makedirs(image)
            req = pb.CreateTaskRequest(id=cid, bundle=bundle, checkpoint=image)
            assert call_ok(daemon, host, "Create", req, pb.CreateTaskResponse).pid == 0
            code, msg = task_call(daemon, host, "Start", pb.StartRequest(id=cid))
            res = {"start": (code, msg.replace(bundle, "<BUNDLE>").replace(image, "<IMAGE>"))}
            assert code == pyshim.UNKNOWN and msg.startswith("OCI runtime restore failed: "), msg
            assert state(daemon, host, cid) == (1, 0)
            # The task keeps its checkpoint, so Start can be retried. pyshim runs runc
            # again, which (with the file it missed) goes on to criu, whose failure is
            # reported. The Go shim does not: go-runc closed the restore's stdio pipes
            # after the first attempt, so its runc never starts and the caller is given
            # the first failure again (the last error in log.json). Not compared.
            with open(os.path.join(image, "descriptors.json"), "w") as f:
                json.dump(["/dev/null", "/dev/null", "/dev/null"], f)
            code, msg = task_call(daemon, host, "Start", pb.StartRequest(id=cid))
            msg = msg.replace(bundle, "<BUNDLE>").replace(image, "<IMAGE>")
            with open(os.path.join(bundle, "log.json")) as f:
                runs = len(f.readlines())
            if r == harness.PYSHIM:
                criu = "criu failed: type RESTORE errno 0\nlog file: <BUNDLE>/work/restore.log"
                assert (code, msg, runs) == (pyshim.UNKNOWN, f"OCI runtime restore failed: {criu}", 2)
            else:
                assert (code, msg, runs) == (pyshim.UNKNOWN, res["start"][1], 1)
            assert state(daemon, host, cid) == (1, 0)
            res["delete"] = call_ok(daemon, host, "Delete", pb.DeleteRequest(id=cid),
                                    pb.DeleteResponse).exit_status
            assert not os.path.exists(os.path.join(pyshim.RUNC_ROOT, daemon.namespace, cid))
            for hier in harness.cgroup_hierarchies():
                assert not os.path.exists(os.path.join(hier, daemon.namespace, cid)), hier
            kill_and_remove(daemon, host)
            res["events"] = topics(cid, "/tasks/delete")
        assert res["events"] == ["/tasks/create", "/tasks/delete"]
        return res

    same_as_runc("restore-failure", runtime, scenario)


# ---------------------------------------------------------------------- pure parts


def test_checkpoint_options_of_either_type_decode_alike() -> None:
    """containerd.runc.v1 and containerd.linux.runc CheckpointOptions number image_path
    and work_path the other way round; both decode to the same options."""
    fields = {"exit": True, "open_tcp": True, "external_unix_sockets": True, "terminal": True,
              "file_locks": True, "empty_namespaces": ["network", "ipc"], "cgroups_mode": "soft",
              "image_path": "/img", "work_path": "/work"}
    runc = any_pb2.Any(type_url="types.containerd.io/" + pyshim.URL_RUNC_CHECKPOINT_OPTIONS,
                       value=pb.RuncCheckpointOptions(**fields).SerializeToString())
    linux = any_pb2.Any(type_url=pyshim.URL_LINUX_CHECKPOINT_OPTIONS,
                        value=pb.LinuxCheckpointOptions(**fields).SerializeToString())
    assert runc.value != linux.value
    want = pb.RuncCheckpointOptions(**fields)
    assert pyshim.decode_checkpoint_options(runc) == want
    assert pyshim.decode_checkpoint_options(linux) == want
    assert pyshim.decode_checkpoint_options(None) == pb.RuncCheckpointOptions()
    with pytest.raises(pyshim.InvalidArgument, match="example.com/Other"):
        pyshim.decode_checkpoint_options(any_pb2.Any(type_url="example.com/Other"))
    for url in (pyshim.URL_RUNC_CHECKPOINT_OPTIONS, pyshim.URL_LINUX_CHECKPOINT_OPTIONS):
        # A value that does not parse is the caller's error, as for runtime options.
        with pytest.raises(pyshim.InvalidArgument, match="checkpoint options"):
            pyshim.decode_checkpoint_options(any_pb2.Any(type_url=url, value=b"\x0a\xff\xff\xff\x0f"))


def test_checkpoint_args() -> None:
    """The runc checkpoint flags per option (cgroups_mode too, which the Go shim 1.6
    drops), --leave-running unless exit."""
    args = pyshim.checkpoint_args("/img", "/w", pb.RuncCheckpointOptions(
        cgroups_mode="soft", empty_namespaces=["network", "ipc"], file_locks=True))
    assert args == ["checkpoint", "--image-path", "/img", "--work-path", "/w", "--file-locks",
                    "--manage-cgroups-mode", "soft", "--empty-ns", "network", "--empty-ns", "ipc",
                    "--leave-running"]
    assert pyshim.checkpoint_args("/img", "/w", pb.RuncCheckpointOptions(exit=True)) == [
        "checkpoint", "--image-path", "/img", "--work-path", "/w"]


def test_checkpoint_bad_requests_get_clear_errors(daemon: Containerd, rootfs: str) -> None:
    """pyshim only (the Go shim would hand runc an empty path or panic on a foreign
    options type): bad Checkpoint requests are refused before runc runs, and the task
    is untouched."""
    cid, pid = run_sleeper(daemon, harness.PYSHIM, rootfs)
    odd = pb.CheckpointTaskRequest(id=cid, path="/tmp/never")
    odd.options.type_url = "example.com/Other"
    for req, code, words in [
        (pb.CheckpointTaskRequest(id=cid), pyshim.INVALID_ARGUMENT, "no image path"),
        (odd, pyshim.INVALID_ARGUMENT, "unsupported checkpoint options type 'example.com/Other'"),
        (pb.CheckpointTaskRequest(id="nosuch", path="/tmp/never"), pyshim.NOT_FOUND,
         "container nosuch not found"),
    ]:
        got = task_call(daemon, cid, "Checkpoint", req)
        assert isinstance(got, tuple) and got[0] == code and words in got[1], got
    assert not os.path.exists("/tmp/never")
    # runc never ran: here its checkpoint fails in criu, which leaves criu-dump.log.
    assert not os.path.exists(os.path.join(bundle_of(daemon, cid), "criu-dump.log"))
    assert task_row(daemon, cid) == (pid, "RUNNING")
    kill_and_remove(daemon, cid)

"""The warm template: shims forked from a process that has imported everything.

Through a real containerd: a forked shim is the template's child and carries the
cold shim's command line; killing the template leaves running shims and containers
alone and the next start brings a new template; a template that cannot be had makes
`start` fall back to a cold spawn; the template's socket is 0600 in a 0700 dir and
refuses other users.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator

import harness
import pytest
from harness import daemon_with, shim_of

PYSHIM = harness.PYSHIM


def _installed(expr: str) -> str:
    """Evaluates `expr` in the installed pyshim (the one containerd runs), whose
    template socket name depends on its own file."""
    out = subprocess.run([sys.executable, "-c", f"import pyshim; print({expr})"], cwd="/",
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _launcher() -> str:
    """The installed native launcher (containerd runs it): the template's name
    is made from its identity."""
    return os.path.join(sysconfig.get_path("scripts"), harness.shim_binary(PYSHIM))




def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _is_template(pid: int) -> bool:
    return harness.is_template_argv(harness.cmdline(pid))


@pytest.fixture
def templated(rootfs: str) -> Iterator[harness.Containerd]:
    """A daemon whose shims come from the warm template (the default)."""
    with daemon_with(PYSHIM_TEMPLATE="1") as daemon:
        yield daemon


def test_template_can_be_turned_off(rootfs: str) -> None:
    with daemon_with(PYSHIM_TEMPLATE="0") as daemon:
        cid = harness.new_id("off")
        _run_d(daemon, rootfs, cid)
        shim = shim_of(daemon, cid)
        assert not _is_template(_ppid(shim))
        assert harness.cmdline(shim)[-2:] != ["template"]


def _run_d(daemon: harness.Containerd, rootfs: str, cid: str) -> None:
    daemon.ctr("run", "-d", "--runtime", PYSHIM, "--rootfs", rootfs, cid, "/bin/sleep", "1000",
               check=True)


def test_forked_shim_is_titled_like_a_cold_one(templated: harness.Containerd, rootfs: str) -> None:
    cid = harness.new_id("tf")
    _run_d(templated, rootfs, cid)
    shim = shim_of(templated, cid)
    assert _is_template(_ppid(shim)), harness.cmdline(_ppid(shim))
    argv = harness.cmdline(shim)
    assert argv[argv.index("-namespace") + 1] == templated.namespace
    assert argv[argv.index("-address") + 1] == templated.address
    assert "pyshim" in " ".join(argv)
    path = harness.template_socket(templated)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    r = templated.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/sh", "-c", "exit 4")
    assert r.returncode == 4


def _fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def test_forked_shim_holds_none_of_the_templates_files(templated: harness.Containerd,
                                                       rootfs: str) -> None:
    """Every pipe, socket or other file the template holds stays in the template:
    a shim inherits nothing from it but what it would get from a cold spawn. Both
    ways a shim is forked: asked by a Python `start` (the first, which launches the
    template) and in a `start` the native launcher handed over whole (the next),
    for which the template opened the bundle's log itself."""
    cid, warm = harness.new_id("tfd"), harness.new_id("tfd")
    _run_d(templated, rootfs, cid)
    _run_d(templated, rootfs, warm)
    shim = shim_of(templated, cid)
    template = _ppid(shim)
    assert _is_template(template) and _ppid(shim_of(templated, warm)) == template
    template_fds = _fds(template)
    for pid in (shim, shim_of(templated, warm)):
        shim_fds = _fds(pid)
        shared = {fd: target for fd, target in shim_fds.items()
                  if target in template_fds.values() and target != "/dev/null"}
        assert not shared, (shared, template_fds, shim_fds)
        logs = [fd for fd, target in shim_fds.items() if target.endswith("/log")]
        assert logs == [2], shim_fds  # its own bundle's log, as its stderr, once
    # The template holds stdio (/dev/null), its listening socket, its ends of the
    # start helper's socketpair (made at the first warm start) and of the spare
    # shim's (made after its first fork), and at most libuv's process-wide signal
    # lock pipe (both ends), made by its warm-up loop.
    assert all(template_fds[fd] == "/dev/null" for fd in (0, 1, 2)), template_fds
    assert template_fds[3].startswith("socket:"), template_fds
    extra = [t for fd, t in template_fds.items() if fd > 3]
    sockets = [t for t in extra if t.startswith("socket:")]
    pipes = [t for t in extra if t.startswith("pipe:")]
    assert len(sockets) <= 2 and len(pipes) in (0, 2) and len(set(pipes)) <= 1 \
        and len(extra) == len(sockets) + len(pipes), template_fds


def test_killing_the_template_leaves_shims_alone(templated: harness.Containerd, rootfs: str) -> None:
    first = harness.new_id("tk")
    _run_d(templated, rootfs, first)
    shim = shim_of(templated, first)
    template = _ppid(shim)
    assert _is_template(template)
    os.kill(template, signal.SIGKILL)
    harness.wait_for(lambda: _ppid(shim) != template, 10, 0.02)
    # The running shim and its container carry on.
    assert templated.tasks()[first] == "RUNNING"
    r = templated.ctr("task", "exec", "--exec-id", "e1", first, "/bin/sh", "-c", "echo alive; exit 3")
    assert (r.returncode, r.stdout) == (3, "alive\n")
    # The next start brings a new template.
    second = harness.new_id("tk")
    _run_d(templated, rootfs, second)
    new_template = _ppid(shim_of(templated, second))
    assert _is_template(new_template) and new_template != template
    templated.ctr("task", "kill", "-s", "KILL", first, check=True)
    harness.wait_for(lambda: templated.tasks()[first] == "STOPPED", 10, 0.05)


def test_unreachable_template_falls_back_to_a_cold_spawn(templated: harness.Containerd,
                                                         rootfs: str) -> None:
    path = harness.template_socket(templated)
    # Whatever template answers there now is replaced by a directory nobody can
    # connect to or remove as a socket: `start` must not depend on it.
    if os.path.exists(path):
        os.unlink(path)
    os.mkdir(path)
    try:
        cid = harness.new_id("tc")
        r = templated.ctr("run", "--rm", "--runtime", PYSHIM, "--rootfs", rootfs, cid,
                          "/bin/sh", "-c", "echo cold; exit 2", timeout=60)
        assert (r.returncode, r.stdout) == (2, "cold\n"), r.stderr
        assert "warm template unavailable" in templated.log_text()
    finally:
        os.rmdir(path)


def test_a_stalled_template_forks_no_second_shim(templated: harness.Containerd, rootfs: str) -> None:
    """A template that stalls past start's timeout (here: SIGSTOP) makes start spawn
    the shim cold. When the template resumes, it finds the request abandoned and
    forks nothing: a second shim on the same socket would answer containerd for a
    task it does not hold, and never exit."""
    first = harness.new_id("ts")
    _run_d(templated, rootfs, first)
    template = _ppid(shim_of(templated, first))
    assert _is_template(template)
    second = harness.new_id("ts")
    os.kill(template, signal.SIGSTOP)
    try:
        _run_d(templated, rootfs, second)  # waits out the template, then starts cold
    finally:
        os.kill(template, signal.SIGCONT)
    assert "timed out waiting for the warm template" in templated.log_text()
    cold = shim_of(templated, second)
    assert not _is_template(_ppid(cold))
    # A required gap, not a wait: a resumed template acting on the stale request would
    # have forked a second shim within it.
    time.sleep(2.0)

    def shims_of(cid: str) -> list[int]:
        return [p for p in harness.shim_pids(templated, PYSHIM)
                if cid in harness.cmdline(p) and harness.cmdline(p)[-1] not in ("start", "delete")]

    assert shims_of(second) == [cold], [harness.cmdline(p) for p in shims_of(second)]
    # The template still serves the next start.
    third = harness.new_id("ts")
    _run_d(templated, rootfs, third)
    assert _ppid(shim_of(templated, third)) == template


def test_usr1_leaves_the_template_alone_and_still_dumps_its_shims(templated: harness.Containerd,
                                                                  rootfs: str) -> None:
    """An operator's `kill -USR1` to every pyshim process: the template ignores it
    (the default action would kill it), its shims still dump their stacks."""
    first = harness.new_id("tu")
    _run_d(templated, rootfs, first)
    shim = shim_of(templated, first)
    template = _ppid(shim)
    assert _is_template(template)
    start = len(templated.log_text())
    os.kill(template, signal.SIGUSR1)
    os.kill(shim, signal.SIGUSR1)
    harness.wait_for(lambda: "=== END stack dump ===" in templated.log_text()[start:], 10,
                     message="the forked shim wrote no stack dump")
    assert _is_template(template), "the template died of SIGUSR1"
    second = harness.new_id("tu")
    _run_d(templated, rootfs, second)
    assert _ppid(shim_of(templated, second)) == template


@pytest.mark.parametrize("who", ["other-uid", "other-gid"])
def test_template_refuses_another_user(templated: harness.Containerd, rootfs: str, who: str) -> None:
    cid = harness.new_id("tu")
    _run_d(templated, rootfs, cid)  # makes sure a template is up
    path = harness.template_socket(templated)
    # Open the file modes for this test, so that the connection is made and it is
    # the template's own peer-credential check that must refuse it.
    dirs = [os.path.dirname(os.path.dirname(path)), os.path.dirname(path)]
    modes = [stat.S_IMODE(os.stat(d).st_mode) for d in dirs]
    for d in dirs:
        os.chmod(d, 0o711)
    os.chmod(path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            if who == "other-uid":
                os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                try:
                    s.sendall(struct.pack(">I", 2) + b"{}")
                except BrokenPipeError:
                    pass  # refused before our request was read: the answer is queued
                answer = s.recv(200)
            except OSError as e:
                answer = f"oserror {e.errno}".encode()
            os.write(w, answer)
        finally:
            os._exit(0)
    os.close(w)
    try:
        answer = os.read(r, 200)
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        os.chmod(path, 0o600)
        for d, mode in zip(dirs, modes, strict=True):
            os.chmod(d, mode)
    assert answer.startswith(b"error refused"), answer
    # ... and it still serves its own user.
    other = harness.new_id("tu")
    _run_d(templated, rootfs, other)
    assert _is_template(_ppid(shim_of(templated, other)))



def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out.update(int(c) for c in f.read().split())
    return out


@pytest.mark.parametrize("fields", [
    b"fork\0/",                       # no argc
    b"fork\0/\0x",                    # argc not a number
    b"fork\0/\x000",                  # no argument
    b"fork\0/\x003\0a",               # fewer arguments than argc
    b"fork\0/\x001\0a\0NOEQ",         # an environment entry without '='
    b"fork\0/\x001\0a\0=v",           # ... or without a name
])
def test_a_malformed_fork_request_is_refused_before_any_fork(templated: harness.Containerd,
                                                             rootfs: str, fields: bytes) -> None:
    """The template answers a fork's "ok PID" itself, right after fork() (the
    requester does not wait for the child to run), so it must check the
    request's form before it forks: a malformed one gets an error and no
    process, as Python's parse (_unpack_request) would refuse it."""
    first = harness.new_id("tm")
    _run_d(templated, rootfs, first)  # makes sure a template is up
    path = harness.template_socket(templated)
    template = _ppid(shim_of(templated, first))
    assert _is_template(template)
    before = _children(template)
    listener = socket.socket(socket.AF_UNIX)  # the socket a real request would hand over
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.settimeout(10)
        socket.send_fds(s, [struct.pack(">II", len(fields), 0) + fields], [listener.fileno()])
        answer = s.recv(200)
    finally:
        s.close()
        listener.close()
    assert answer == b"error malformed request\n", answer
    assert _children(template) <= before, "the template forked for a malformed request"
    # ... and it still forks shims for well-formed ones.
    other = harness.new_id("tm")
    _run_d(templated, rootfs, other)
    assert _ppid(shim_of(templated, other)) == template

def test_dead_templates_are_cleared_and_sigterm_removes_the_socket(templated: harness.Containerd,
                                                                   rootfs: str) -> None:
    path = harness.template_socket(templated)
    # A template socket nobody answers on (as a SIGKILLed or upgraded build leaves).
    dead = os.path.join(os.path.dirname(path), "pyshim-template-0000deadbeef0000")
    s = socket.socket(socket.AF_UNIX)
    s.bind(dead)
    s.close()
    open(dead + ".lock", "w").close()
    # A lock file alone (what a SIGTERMed template left before it removed its lock).
    orphan = os.path.join(os.path.dirname(path), "pyshim-template-0000deadbeef0001.lock")
    open(orphan, "w").close()
    cid = harness.new_id("tg")
    _run_d(templated, rootfs, cid)
    template = _ppid(shim_of(templated, cid))
    assert _is_template(template)
    # SIGTERM: the template leaves and takes its socket with it; shims carry on.
    os.kill(template, signal.SIGTERM)
    harness.wait_for(lambda: not os.path.exists(path), 10, 0.02)
    assert templated.tasks()[cid] == "RUNNING"
    # The next start launches a new template, clearing dead sockets on the way.
    other = harness.new_id("tg")
    _run_d(templated, rootfs, other)
    assert _is_template(_ppid(shim_of(templated, other)))
    assert not os.path.exists(dead) and not os.path.exists(dead + ".lock")
    assert not os.path.exists(orphan)


def _files_of(path: str) -> list[str]:
    """What the socket dir holds under one template's name (its socket, its lock)."""
    d, name = os.path.split(path)
    return sorted(n for n in os.listdir(d) if n.startswith(name))


def _gone(pid: int) -> bool:
    return not harness.cmdline(pid)  # exited (a zombie has no command line)


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_template_leaves_none_of_its_files(templated: harness.Containerd, rootfs: str,
                                                     signo: int) -> None:
    path = harness.template_socket(templated)
    cids = [harness.new_id("tf"), harness.new_id("tf")]
    for cid in cids:
        _run_d(templated, rootfs, cid)
    shims = [shim_of(templated, cid) for cid in cids]
    template = _ppid(shims[0])
    assert _is_template(template) and _ppid(shims[1]) == template
    name = os.path.basename(path)
    assert _files_of(path) == [name, name + ".lock"]
    os.kill(template, signo)
    harness.wait_for(lambda: _gone(template), 10, 0.02)
    assert _files_of(path) == []
    # The shims it forked carry on, and serve their containers.
    for cid, shim in zip(cids, shims):
        assert harness.cmdline(shim) and templated.tasks()[cid] == "RUNNING"
        # The exit code proves the shim ran the exec; not its output, which ctr itself
        # sometimes drops under load (its stdout fifo race, bench/exec_output_race.py).
        r = templated.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/sh", "-c", "exit 7")
        assert (r.returncode, r.stderr) == (7, ""), r
    # The next start launches a new template, with files of its own.
    other = harness.new_id("tf")
    _run_d(templated, rootfs, other)
    assert _is_template(_ppid(shim_of(templated, other)))
    assert _files_of(path) == [name, name + ".lock"]


def test_a_replaced_template_leaves_the_newer_ones_files(templated: harness.Containerd,
                                                         rootfs: str) -> None:
    """A template whose socket name another template has taken since (its file
    removed by hand, here) removes nothing of the newer one's when it leaves."""
    path = harness.template_socket(templated)
    first, second, third = (harness.new_id("tr") for _ in range(3))
    _run_d(templated, rootfs, first)
    old = _ppid(shim_of(templated, first))
    assert _is_template(old)
    os.unlink(path)  # the old template still runs, listening on a file no longer there
    _run_d(templated, rootfs, second)
    new = _ppid(shim_of(templated, second))
    assert _is_template(new) and new != old
    inodes = [os.stat(p).st_ino for p in (path, path + ".lock")]
    os.kill(old, signal.SIGTERM)
    harness.wait_for(lambda: _gone(old), 10, 0.02)
    assert [os.stat(p).st_ino for p in (path, path + ".lock")] == inodes
    _run_d(templated, rootfs, third)
    assert _ppid(shim_of(templated, third)) == new
    os.kill(new, signal.SIGTERM)
    harness.wait_for(lambda: _gone(new), 10, 0.02)
    assert _files_of(path) == []


def test_idle_template_exits_and_removes_its_socket(rootfs: str) -> None:
    with daemon_with(PYSHIM_TEMPLATE="1", PYSHIM_TEMPLATE_IDLE="1") as daemon:
        path = harness.template_socket(daemon)
        cid = harness.new_id("ti")
        _run_d(daemon, rootfs, cid)
        template = _ppid(shim_of(daemon, cid))
        assert _is_template(template)
        time.sleep(2.5)  # a required gap: over twice the idle timeout (1 s), with a shim alive
        assert harness.cmdline(template), "left while a shim it forked was alive"
        daemon.remove_all()  # the shim exits; the template is idle from now on

        def probed_and_gone() -> bool:
            # Connections that ask for nothing (as another launcher's sweep of
            # dead templates makes) are not use: the template still leaves.
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
            except OSError:
                pass
            return not harness.cmdline(template)

        harness.wait_for(probed_and_gone, 15, 0.2)
        assert _files_of(path) == []


def test_each_containerd_has_its_own_template(templated: harness.Containerd, rootfs: str) -> None:
    """A shim must descend from its own containerd's `start` (process tree and
    cgroup), never from a template another containerd launched."""
    with daemon_with(PYSHIM_TEMPLATE="1") as other:
        a, b = harness.new_id("ta"), harness.new_id("tb")
        _run_d(templated, rootfs, a)
        _run_d(other, rootfs, b)
        ta, tb = _ppid(shim_of(templated, a)), _ppid(shim_of(other, b))
        assert _is_template(ta) and _is_template(tb) and ta != tb
        assert harness.template_socket(templated) != harness.template_socket(other)


def _frames(pid: int) -> dict[int, int]:
    """Frame number of each present page of `pid`'s writable private mappings."""
    out = {}
    with open(f"/proc/{pid}/maps") as f:
        spans = [line.split()[:2] for line in f]
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
        for span, perms in spans:
            if not perms.startswith("rw") or perms[3] != "p":
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            if start >= 1 << 47:  # [vsyscall]
                continue
            pm.seek(start // 4096 * 8)
            raw = pm.read((end - start) // 4096 * 8)
            for i, entry in enumerate(struct.unpack(f"{len(raw) // 8}Q", raw)):
                if entry >> 63:
                    out[start + i * 4096] = entry & ((1 << 55) - 1)
    return out


def test_a_start_writes_almost_nothing_in_the_template(templated: harness.Containerd,
                                                        rootfs: str) -> None:
    """Every page the template writes after forking a shim stops being shared with it
    (copy-on-write gives the template a new frame): a template that ran Python per
    request wrote 130 to 250 pages at every start, and each shim kept its own copy of
    them. Its request loop is C: a start may move a few frames (its stack, the request
    buffer), not tens."""
    _run_d(templated, rootfs, harness.new_id("tw"))
    first = harness.new_id("tw")
    _run_d(templated, rootfs, first)
    template = _ppid(shim_of(templated, first))
    assert _is_template(template)
    moved = []
    for _ in range(3):
        before = _frames(template)
        cid = harness.new_id("tw")
        _run_d(templated, rootfs, cid)
        assert _ppid(shim_of(templated, cid)) == template, "the start did not go to the template"
        after = _frames(template)
        moved.append(sum(1 for addr, frame in after.items() if before.get(addr) != frame))
    assert max(moved) <= 12, f"pages of the template written per start: {moved}"


def test_warm_starts_go_through_the_start_helper_and_survive_its_death(
        templated: harness.Containerd, rootfs: str) -> None:
    """The first warm start makes the template's start helper (a child titled
    `start-helper`, sharing none of its files with the shims), which does the next
    ones; the shims are still the template's children. Killed, the helper is
    replaced at the next start, and no start fails meanwhile: the template forks for
    a start itself when there is no helper."""
    first = harness.new_id("th")
    _run_d(templated, rootfs, first)  # cold: launches the template
    template = _ppid(shim_of(templated, first))
    assert _is_template(template)
    _run_d(templated, rootfs, harness.new_id("th"))  # warm, forked for: makes the helper
    helpers = harness.start_helpers_of(template)
    assert len(helpers) == 1, helpers
    for cid in (harness.new_id("th"), harness.new_id("th")):
        _run_d(templated, rootfs, cid)
        assert _ppid(shim_of(templated, cid)) == template
    assert harness.start_helpers_of(template) == helpers
    helper_fds = set(_fds(helpers[0]).values()) - {"/dev/null"}
    assert not helper_fds & set(_fds(shim_of(templated, first)).values())
    os.kill(helpers[0], signal.SIGKILL)
    for _ in range(3):
        cid = harness.new_id("th")
        _run_d(templated, rootfs, cid)
        assert _ppid(shim_of(templated, cid)) == template
    harness.wait_for(lambda: len(harness.start_helpers_of(template)) == 1 and harness.start_helpers_of(template) != helpers, 10,
                     message="no new start helper")


def test_an_idle_start_helper_leaves_and_comes_back(rootfs: str) -> None:
    """The start helper holds memory of its own (its starts' writes): it leaves after
    PYSHIM_START_HELPER_IDLE seconds without a start (2 here), and the next start
    still goes to the template and makes a new one."""
    with daemon_with(PYSHIM_TEMPLATE="1", PYSHIM_START_HELPER_IDLE="2") as daemon:
        first = harness.new_id("ti")
        _run_d(daemon, rootfs, first)
        template = _ppid(shim_of(daemon, first))
        _run_d(daemon, rootfs, harness.new_id("ti"))
        helpers = harness.start_helpers_of(template)
        assert len(helpers) == 1, helpers
        harness.wait_for(lambda: not harness.start_helpers_of(template), 15, message="the idle start helper stayed")
        cid = harness.new_id("ti")
        _run_d(daemon, rootfs, cid)  # forked for: makes a new helper at once
        assert _ppid(shim_of(daemon, cid)) == template
        again = harness.start_helpers_of(template)
        assert len(again) == 1 and again != helpers, again


def _one_spare(template: int) -> int:
    """The template's spare shim, waited for (it is made once the template has been
    quiet for a moment after a fork)."""
    harness.wait_for(lambda: len(harness.spare_shims_of(template)) == 1, 10,
                     message="the template made no spare shim")
    return harness.spare_shims_of(template)[0]


def test_a_warm_start_becomes_the_spare_shim_and_a_new_spare_is_made(
        templated: harness.Containerd, rootfs: str) -> None:
    """After its first fork the template keeps one spare shim (a child titled
    `spare-shim`, its loop and reaper made): the next warm start's shim is that
    process, serving as a forked one does, and another spare follows. A spare holds
    none of the template's files, ignores an operator's `kill -USR1`, and is listed
    by `memory`."""
    first, second = harness.new_id("tp"), harness.new_id("tp")
    _run_d(templated, rootfs, first)  # cold: launches the template
    template = _ppid(shim_of(templated, first))
    assert _is_template(template)
    _run_d(templated, rootfs, second)  # forked
    spare = _one_spare(template)
    argv = harness.cmdline(spare)
    assert argv[-1] == "spare-shim" and "pyshim" in " ".join(argv), argv
    # It waits on idle CPU time only; the template keeps the usual policy.
    assert os.sched_getscheduler(spare) == os.SCHED_IDLE
    assert os.sched_getscheduler(template) == os.SCHED_OTHER
    template_files = set(_fds(template).values()) - {"/dev/null"}
    assert not template_files & set(_fds(spare).values()), (_fds(template), _fds(spare))
    os.kill(spare, signal.SIGUSR1)
    res = subprocess.run([harness.shim_binary_path(PYSHIM), "memory", "-json"], check=True,
                         capture_output=True, text=True, timeout=60)
    kinds = {p["pid"]: p["kind"] for p in json.loads(res.stdout)["processes"]}
    assert kinds.get(spare) == "spare-shim", kinds
    assert harness.spare_shims_of(template) == [spare], "the spare died of SIGUSR1"

    third = harness.new_id("tp")
    _run_d(templated, rootfs, third)
    shim = shim_of(templated, third)
    assert shim == spare, (shim, spare)
    # Raised back before it took the start: the shim, and the container runc made.
    assert os.sched_getscheduler(shim) == os.SCHED_OTHER
    init = int(templated.ctr("task", "ls").stdout.split(third, 1)[1].split()[0])
    assert os.sched_getscheduler(init) == os.SCHED_OTHER
    argv = harness.cmdline(shim)
    assert argv[argv.index("-id") + 1] == third and argv[argv.index("-address") + 1] == templated.address
    assert os.readlink(f"/proc/{shim}/cwd").endswith("/" + third)
    r = templated.ctr("task", "exec", "--exec-id", "e1", third, "/bin/sh", "-c", "exit 4")
    assert r.returncode == 4
    logs = [fd for fd, target in _fds(shim).items() if target.endswith("/log")]
    assert logs == [2], _fds(shim)
    assert _one_spare(template) != spare
    templated.ctr("task", "kill", "-s", "KILL", third, check=True)
    harness.wait_for(lambda: templated.ctr("task", "ls").stdout.count("STOPPED") >= 1, 10,
                     message="the spare-made shim reported no exit")


def test_a_dead_spare_is_replaced_and_a_stopped_template_takes_its_spare_along(
        templated: harness.Containerd, rootfs: str) -> None:
    """A spare killed while it waits costs no start (the template forks instead) and
    is replaced; SIGTERM stops a spare as any shim; the spare leaves with its template."""
    first = harness.new_id("tq")
    _run_d(templated, rootfs, first)
    template = _ppid(shim_of(templated, first))
    _run_d(templated, rootfs, harness.new_id("tq"))
    spare = _one_spare(template)
    os.kill(spare, signal.SIGKILL)
    harness.wait_for(lambda: _gone(spare), 10, message="the killed spare stayed")
    cid = harness.new_id("tq")
    _run_d(templated, rootfs, cid)
    assert _ppid(shim_of(templated, cid)) == template and shim_of(templated, cid) != spare
    spare = _one_spare(template)
    os.kill(spare, signal.SIGTERM)
    harness.wait_for(lambda: _gone(spare), 10, message="SIGTERM left the spare running")
    spare = _one_spare(template)
    os.kill(template, signal.SIGTERM)
    harness.wait_for(lambda: _gone(spare), 10, message="the spare outlived its template")
    assert templated.ctr("task", "ls").stdout.count("RUNNING") == 3


def test_the_spare_shim_can_be_turned_off(rootfs: str) -> None:
    """PYSHIM_SPARE_SHIM=0 in containerd's environment: the template forks every shim
    when it is asked, and keeps no spare."""
    with daemon_with(PYSHIM_TEMPLATE="1", PYSHIM_SPARE_SHIM="0") as daemon:
        first = harness.new_id("tr")
        _run_d(daemon, rootfs, first)
        template = _ppid(shim_of(daemon, first))
        for _ in range(3):
            cid = harness.new_id("tr")
            _run_d(daemon, rootfs, cid)
            assert _ppid(shim_of(daemon, cid)) == template
        time.sleep(0.5)  # 25 times the delay after which a spare would be made
        assert harness.spare_shims_of(template) == []

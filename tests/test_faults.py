"""The failure matrix of the "survive faults" issue, through a real containerd and ``ctr``.

Each row runs for both runtimes where it applies: the Go shim (io.containerd.runc.v2)
is the reference and runs first; its outcome is recorded (``compare_with_runc``). Where
the Go shim fails a row that pyshim passes, only pyshim is asserted and a comment says so.

Rows (the numbers of the issue):
 1. containerd kill -9, tasks exit while it is down, restart: every exit is reported.
 2. the shim gets SIGKILL: containerd's `shim delete` cleans up everything.
 3. tasks that exit at once, many times in a row: TaskStart before TaskExit, right codes.
    PYSHIM_FAULTS_QUICK=N sets the runs per runtime (default 100: 50 /bin/true, 50
    `exit 3`; the issue asks for 200, which takes about twice as long).
 4. 100 concurrent execs while the init is killed: no hang, exec exits before the init's.
 5. a background child holds stdout after the init exits: `ctr run --rm` returns.
 6. SIGTERM/SIGINT to a shim holding a running task (asserted for pyshim only).
 7. a peer of another uid on the shim socket is refused, and the refusal is logged.
 8. malformed ttrpc input: each gets a status error or a closed connection, the shim
    keeps serving and its RSS stays bounded.
 9. create/start/exec/kill/delete cycles on one grouped shim: RSS and fds do not grow.
    100 cycles by default, 1000 with PYSHIM_SOAK=1; tests/harness/soak_cycles.py holds the
    scenario, which bench/soak.py runs too and prints the figures of.
10. bad bundles: a rootfs that does not exist; a full filesystem ("/run full"), met by
    the shim itself, driven directly as in test_shim_direct.py (through ctr, a full
    tmpfs only makes ctr's own mkfifo fail before any shim runs): the bundle on a tmpfs
    that fills up after `start` (Create fails clearly, nothing is left, the same Create
    works once there is space), and /run/containerd/s with no inode left at `start` (a
    tmpfs over it in a private mount namespace, `unshare --mount`: the host's /run is
    never touched; the namespace's mounts go with it, and are unmounted explicitly).

The Go shim of containerd 1.6.20, in our runs: passes 1, 2, 3, 5, 7 and 10 (but leaves
an empty options.json in a full bundle); hangs on 4
(a `ctr task kill` or `ctr task exec` unanswered for 30/60 s, 4 runs of 6) or publishes
exec exits after the init's (1 run of 6); exits on
SIGTERM/SIGINT too (6); keeps half-closed connections open on 8 (+3 fds); grows on 9
(+1476 kB RSS and +2 fds over 1000 cycles).

The tests never assert on wall-clock time; every wait is bounded by a timeout.
(Each containerd has a warm template of its own, so a pyshim shim always lives in its
own daemon's process tree, and another test run's cleanup cannot reach it.)
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import warnings
from typing import Any

import harness
import pytest
from harness import (
    CTR,
    PYSHIM,
    RUNC,
    RUNTIMES,
    Containerd,
    EventLog,
    bundle_of,
    compare_with_runc,
    ctr,
    ctr_bg,
    direct,
    exited_while_down,
    live_shim,
    new_id,
    norm,
    ok,
    pb_message,
    pid_gone,
    require,
    same_as_runc,
    shim_pids,
    soak_cycles,
    task_row,
    wait_for,
    wait_status,
)

import pyshim
import pyshim_pb2 as pb

# The fixtures `daemon` and `fresh` are conftest's: the session daemon / a daemon of the
# test's own, both checked for leftover shims, zombies and ctr children after a passing test.


# ---------------------------------------------------------------------------- helpers


def shim_socket(d: Containerd, cid: str) -> str:
    address = harness.bundle_address(bundle_of(d, cid))
    assert address and address.startswith("unix://"), address
    return address[len("unix://"):]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def runc_state(d: Containerd, cid: str) -> str:
    return os.path.join(harness.RUNC_ROOT, d.namespace, cid)


def run_d(d: Containerd, runtime: str, rootfs: str, cid: str, *argv: str,
          extra: tuple[str, ...] = ()) -> int:
    """``ctr run -d`` and wait until RUNNING; returns the init's host pid."""
    ok(d, "run", "-d", "--runtime", runtime, *extra, "--rootfs", rootfs, cid, *argv)
    return wait_status(d, cid, "RUNNING")


def kill_rm(d: Containerd, cid: str) -> None:
    ok(d, "task", "kill", "-s", "KILL", cid)
    wait_status(d, cid, "STOPPED")
    ok(d, "task", "rm", cid)
    ok(d, "containers", "rm", cid)


def zombies_under(root: int) -> list[int]:
    """Zombie processes in the tree below ``root`` (one /proc scan)."""
    parent: dict[int, int] = {}
    zombies = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = harness._stat(int(name))
        if st is None:
            continue
        parent[int(name)] = st[1]
        if st[0] == "Z":
            zombies.append(int(name))

    def below(pid: int) -> bool:
        for _ in range(64):
            pid = parent.get(pid, 0)
            if pid == root:
                return True
            if pid <= 1:
                return False
        return False

    return [z for z in zombies if below(z)]


# ------------------------------------------------------- 1. exits while containerd is down


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exits_while_containerd_is_down(fresh: Containerd, rootfs: str, runtime: str) -> None:
    d = fresh
    codes = {"zero": 0, "three": 3, "big": 42}
    cids = {name: new_id(name) for name in [*codes, "hostkill", "alive"]}
    pids = {}
    for name, code in codes.items():
        # The sleep is long enough for the kill -9 below to land first.
        pids[name] = run_d(d, runtime, rootfs, cids[name], "/bin/sh", "-c", f"sleep 2; exit {code}")
    pids["hostkill"] = run_d(d, runtime, rootfs, cids["hostkill"], "/bin/sleep", "1000")
    pids["alive"] = run_d(d, runtime, rootfs, cids["alive"], "/bin/sleep", "1000")
    shims = sorted(shim_pids(d, runtime))

    d.kill9()
    assert sorted(shim_pids(d, runtime)) == shims, "the shims must outlive their daemon"
    os.kill(pids["hostkill"], signal.SIGKILL)
    for name in (*codes, "hostkill"):
        # Reaped: its shim has the exit and queues it, as nobody listens.
        wait_for(lambda n=name: harness.reaped(pids[n]), 15, message=f"{name} was not reaped")
    d.start()

    res: dict[str, Any] = {}
    # Each exited task as this containerd treats it (harness.exited_while_down).
    for name, code in [*codes.items(), ("hostkill", 137)]:
        res[name] = exited_while_down(d, cids[name], pids[name], code)
    assert task_row(d, cids["alive"]) == (pids["alive"], "RUNNING")
    assert not pid_gone(pids["alive"])
    # The survivor is still fully served.
    res["exec"] = ctr(d, "task", "exec", "--exec-id", "after", cids["alive"],
                      "/bin/sh", "-c", "exit 9")
    assert res["exec"] == (9, "", "")
    kill_rm(d, cids["alive"])
    wait_for(lambda: not shim_pids(d), 10, message="shims did not exit after delete")
    compare_with_runc("faults-exits-while-down", runtime, res)


# ---------------------------------------------------------------- 2. the shim gets SIGKILL


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_shim_sigkill_is_cleaned_up(daemon: Containerd, busybox_image: str,
                                    runtime: str) -> None:
    d, cid = daemon, new_id("shimkill")
    with EventLog(d) as log:
        ok(d, "run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "1000")
        pid = wait_status(d, cid, "RUNNING")
        shim = live_shim(d, runtime, cid)
        rootfs_dir = os.path.join(bundle_of(d, cid), "rootfs")
        assert harness.mounts_under(rootfs_dir) == [rootfs_dir]
        assert os.path.isdir(runc_state(d, cid))
        sock = shim_socket(d, cid)

        os.kill(shim, signal.SIGKILL)
        wait_for(lambda: any(t == "/tasks/delete" for t, _ in log.of(cid)), 20,
                 message=f"no /tasks/delete after the shim died: {log.of(cid)}")
        events = log.of(cid)
    topics = [t for t, _ in events]
    exits = [p for t, p in events if t == "/tasks/exit"]
    assert len(exits) == 1 and exits[0].get("exit_status") == 137, events
    assert topics.index("/tasks/exit") < topics.index("/tasks/delete")
    # containerd forgets a task whose shim died: it is not left RUNNING.
    wait_for(lambda: cid not in d.tasks(), 10, message=f"task left: {d.tasks()}")
    wait_for(lambda: pid_gone(pid), 10, message="the container process survived")
    wait_for(lambda: pid_gone(shim), 10)
    assert harness.mounts_under(rootfs_dir) == [], "rootfs left mounted"
    assert not os.path.exists(runc_state(d, cid)), "runc state left"
    res = {"topics": topics[-2:], "exit": 137,
           "socket left": os.path.exists(sock),
           "container rm": norm(ctr(d, "containers", "rm", cid), cid)}
    assert res["container rm"] == (0, "", "")
    wait_for(lambda: not shim_pids(d), 10, message="a shim delete is still running")
    compare_with_runc("faults-shim-sigkill", runtime, res)


# ------------------------------------------------------------ 3. tasks that exit at once


QUICK_RUNS = int(os.environ.get("PYSHIM_FAULTS_QUICK", "100"))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_quick_exits_start_before_exit(daemon: Containerd, rootfs: str, runtime: str) -> None:
    d = daemon
    cases = [(["/bin/true"], 0), (["/bin/sh", "-c", "exit 3"], 3)]
    runs: list[tuple[str, int]] = []
    hung: list[tuple[str, str, list[str]]] = []
    go_races = runtime == RUNC and harness.behaviour().go_shim_may_drop_task_delete
    with EventLog(d) as log:
        for i in range(QUICK_RUNS):
            argv, code = cases[i % 2]
            cid = new_id("quick")
            try:
                step = ctr(d, "run", "--rm", "--runtime", runtime, "--rootfs", rootfs, cid, *argv)
            except subprocess.TimeoutExpired:
                if not go_races:
                    raise
                # The same race of the 2.x Go shim (harness.Behaviour), seen once in a
                # clean-clone run: that `ctr run --rm` never returned. Recorded and
                # cleaned up, not asserted; pyshim's runs are never excused.
                hung.append((cid, d.tasks().get(cid, "no task"), [t for t, _ in log.of(cid)]))
                d.ctr("task", "kill", "-s", "KILL", cid, timeout=30)
                d.ctr("task", "delete", "-f", cid, timeout=30)
                d.ctr("container", "delete", cid, timeout=30)
                continue
            assert step == (code, "", ""), (i, step)
            runs.append((cid, code))
        last = runs[-1][0]
        harness.wait_task_delete(lambda: any(t == "/tasks/delete" for t, _ in log.of(last)),
                                 runtime, 10, message=f"no /tasks/delete for {last}")
        bad, no_delete = [], []
        for cid, code in runs:
            events = log.of(cid)
            topics = [t for t, _ in events]
            exits = [p.get("exit_status", 0) for t, p in events if t == "/tasks/exit"]
            if runtime == RUNC and harness.behaviour().go_shim_may_drop_task_delete \
                    and topics == ["/tasks/create", "/tasks/start", "/tasks/exit"]:
                # The 2.x Go shim's lost event (harness.Behaviour): recorded, not
                # asserted; pyshim is held to the full sequence.
                no_delete.append(cid)
                topics.append("/tasks/delete")
            if topics != ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"] \
                    or exits != [code]:
                bad.append((cid, topics, exits))
    if no_delete:
        warnings.warn(f"the Go shim published no /tasks/delete for {len(no_delete)} of "
                      f"{len(runs)} runs: {no_delete[:5]}", stacklevel=1)
    if hung:
        warnings.warn(f"the Go shim's `ctr run --rm` never returned for {len(hung)} of "
                      f"{QUICK_RUNS} runs (id, task status, events): {hung[:3]}", stacklevel=1)
    assert bad == [], f"{len(bad)} of {len(runs)} runs out of order or misreported: {bad[:5]}"


# ------------------------------------------------- 4. concurrent execs, the init is killed


EXECS = 100


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_concurrent_execs_while_init_is_killed(daemon: Containerd, rootfs: str,
                                               runtime: str) -> None:
    d, cid = daemon, new_id("execs")
    procs: list[subprocess.Popen] = []
    with EventLog(d) as log:
        pid = run_d(d, runtime, rootfs, cid, "/bin/sleep", "1000")
        try:
            for i in range(EXECS):
                argv = [CTR, "--address", d.address, "-n", d.namespace, "task", "exec",
                        "--exec-id", f"e{i}", cid, "/bin/sleep", "3"]
                procs.append(subprocess.Popen(argv, env=d.env, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True))

            def started() -> int:
                return sum(t == "/tasks/exec-started" for t, _ in log.of(cid))

            # Kill the init while many execs run and others are still being started.
            wait_for(lambda: started() >= EXECS // 10, 30,
                     message=f"execs never started: {started()}")
            try:
                kill = ctr(d, "task", "kill", "-s", "KILL", cid)
                codes = []
                for p in procs:
                    _, err = p.communicate(timeout=60)  # no hang: bounded
                    codes.append((p.returncode, err.strip()[-200:]))
            except subprocess.TimeoutExpired as e:
                if runtime == RUNC:
                    # Recorded only: with ~100 execs in flight, the Go shim of
                    # containerd 1.6.20 hung in our runs (`ctr task kill` or some
                    # `ctr task exec` got no answer within its timeout); pyshim passes
                    # this row except for the exit-order bug reported below.
                    print(f"{runtime}: hung: {' '.join(e.cmd[-8:])} ({started()} execs started)")
                    for p in procs:
                        p.kill()
                        p.communicate()
                    d.remove_all()  # SIGKILLs the shim if it does not cooperate
                    return
                raise
            assert kill == (0, "", ""), kill
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        wait_status(d, cid, "STOPPED", timeout=30)

        def init_exit() -> list[int]:
            return [i for i, (t, p) in enumerate(log.of(cid))
                    if t == "/tasks/exit" and p.get("id") == cid]

        wait_for(init_exit, 10, message="no /tasks/exit for the init")
        time.sleep(0.5)  # a required gap, not a wait: anything published late would show now
        events = log.of(cid)
    started_ids = {p["exec_id"] for t, p in events if t == "/tasks/exec-started"}
    exit_at = {}
    for i, (t, p) in enumerate(events):
        if t == "/tasks/exit":
            assert p.get("id") not in exit_at, f"two exits for {p.get('id')}"
            exit_at[p.get("id")] = (i, p.get("exit_status", 0))
    init_at, init_status = exit_at.pop(cid)
    assert init_status == 137
    missing = started_ids - exit_at.keys()
    assert not missing, f"started execs without a /tasks/exit: {sorted(missing)}"
    # Fails intermittently for pyshim (about 2 runs in 3 here): an exec whose
    # `runc exec` is still in flight when the init dies is not yet counted in
    # Container.running_execs (it is incremented only after runc returns), so
    # _init_exited publishes the init's TaskExit at once; that exec's TaskExecStarted
    # and TaskExit follow after it. The Go shim hangs on this row or misorders too.
    late = sorted(e for e, (i, _) in exit_at.items() if i > init_at)
    if late and runtime == RUNC:
        # Recorded only: when it does not hang, the Go shim of containerd 1.6.20 also
        # publishes some exec exits after the init's (seen in our runs).
        print(f"{runtime}: exec exits published after the init's: {late}")
        late = []
    if late:
        where = {e: [(i, t) for i, (t, p) in enumerate(events) if p.get("exec_id") == e
                     or p.get("id") == e] for e in late}
        logged = [ln for ln in d.log_text().splitlines()
                  if any(f"exec_id={e} " in ln for e in late)]
        raise AssertionError(f"{runtime}: exec exits published after the init's (at "
                             f"{init_at} of {len(events)}): {where}\n" + "\n".join(logged))
    # ctr's view agrees: a started exec ended with 0 (it finished) or 137 (killed).
    by_id = {f"e{i}": c for i, c in enumerate(codes)}
    wrong = {e: by_id[e] for e in started_ids if by_id[e][0] != exit_at[e][1]}
    assert not wrong, f"ctr exit codes differ from /tasks/exit: {wrong}"
    assert all(exit_at[e][1] in (0, 137) for e in started_ids)
    assert pid_gone(pid)
    ok(d, "task", "rm", cid)
    ok(d, "containers", "rm", cid)
    print(f"{runtime}: {len(started_ids)} execs started, "
          f"{sum(1 for e in started_ids if exit_at[e][1] == 137)} killed")


# ------------------------------------------------ 5. a background child holds stdout


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_background_child_holds_stdout(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """The issue's command. In the container's own pid namespace the kernel kills the
    background child together with the init, which closes the pipe soon after."""
    d, cid = daemon, new_id("bgchild")
    marker = f"{random.randrange(10**8, 10**9)}"  # sleep's argument names our child

    def children() -> list[int]:
        return [p for p in harness._pids()
                if harness.cmdline(p) == ["sleep", marker] and not pid_gone(p)]

    t0 = time.monotonic()
    step = ctr(d, "run", "--rm", "--runtime", runtime, "--rootfs", rootfs, cid,
               "/bin/sh", "-c", f"sleep {marker} & echo bg; exit 0", timeout=30)
    took = time.monotonic() - t0
    assert step == (0, "bg\n", ""), step
    assert cid not in d.containers()
    wait_for(lambda: not children(), 10, message=f"the background child survived: {children()}")
    reaper = d._reaper.pid if d._reaper is not None else 1
    wait_for(lambda: not zombies_under(reaper), 5,
             message=f"zombies: {zombies_under(reaper)}")
    print(f"{runtime}: ctr run --rm returned after {took:.2f}s")
    compare_with_runc("faults-bg-child", runtime, step)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_writer_outside_holds_stdout(daemon: Containerd, rootfs: str, runtime: str) -> None:
    """A writer that outlives the init (a child in the host's pid namespace, here the
    test itself through /proc/<init>/fd/1) keeps the stdout pipe open after the init
    exits: the shim must stop waiting for EOF and report the exit, and Delete must not
    hang. (`--with-ns pid:/proc/1/ns/pid` would be the literal case, but runc 1.1.5
    fails it on this VM for both shims: "can't get final child's PID from pipe: EOF".)"""
    d, cid = daemon, new_id("holder")
    with ctr_bg(d, "run", "--rm", "--runtime", runtime, "--rootfs", rootfs, cid,
                "/bin/sh", "-c", "echo first; read x; exit 0", stdin=subprocess.PIPE) as proc:
        pid = wait_status(d, cid, "RUNNING")
        holder = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY)  # the pipe's write end
        try:
            assert proc.stdin is not None
            t0 = time.monotonic()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=30)  # bounded: no hang
            took = time.monotonic() - t0
            os.write(holder, b"late\n")  # the pipe is still there, but nobody reads
        except BrokenPipeError:
            took = time.monotonic() - t0
        finally:
            os.close(holder)
    step = (proc.returncode, out, err)
    assert step == (0, "first\n", ""), step
    assert cid not in d.containers()
    wait_for(lambda: pid_gone(pid), 10)
    reaper = d._reaper.pid if d._reaper is not None else 1
    wait_for(lambda: not zombies_under(reaper), 5,
             message=f"zombies: {zombies_under(reaper)}")
    print(f"{runtime}: ctr run --rm returned {took:.2f}s after the init was told to exit")
    compare_with_runc("faults-writer-outside", runtime, step)


# ------------------------------------------------------ 6. SIGTERM / SIGINT to the shim


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_shim_terminated_by_signal(daemon: Containerd, rootfs: str, runtime: str,
                                   sig: signal.Signals) -> None:
    d, cid = daemon, new_id("shimsig")
    pid = run_d(d, runtime, rootfs, cid, "/bin/sleep", "1000")
    shim = live_shim(d, runtime, cid)
    sock = shim_socket(d, cid)
    start = len(d.log_text())
    os.kill(shim, sig)
    try:
        wait_for(lambda: pid_gone(shim), 10)
        gone = True
    except TimeoutError:
        gone = False
    outcome = {"shim gone": gone, "socket left": os.path.exists(sock),
               "task process gone": pid_gone(pid), "task": task_row(d, cid)}
    print(f"{runtime} SIG{sig.name[3:]}: {outcome}")
    if runtime == RUNC:
        # Recorded only. In our runs the Go shim (containerd 1.6.20) also exits on
        # SIGTERM and SIGINT and its socket is gone; its task's process is killed by
        # containerd's `shim delete` (runc delete --force) rather than by the shim.
        return
    assert gone, "pyshim did not exit on the signal"
    # The shim is not our child, so its exit status is read from its last words: it
    # logs "shim exiting" just before main() returns 0 (and containerd copies the log
    # asynchronously).
    exiting = re.compile(r'msg="shim exiting".*runtime=' + re.escape(PYSHIM))
    wait_for(lambda: exiting.search(d.log_text()[start:]), 10,
             message=f"no 'shim exiting' line: {d.log_text()[start:][-3000:]}")
    assert not outcome["socket left"], "socket file left behind"
    wait_for(lambda: pid_gone(pid), 10, message="the task's process survived")
    # containerd notices the dead shim and reports the task gone.
    wait_for(lambda: cid not in d.tasks(), 20, message=f"task left: {d.tasks()}")
    assert not os.path.exists(runc_state(d, cid))
    ok(d, "containers", "rm", cid)


# ------------------------------------------------ 7. a peer with another uid is refused


# argv: socket, then the ttrpc request (built here with harness's codec) in hex.
_PEER_SCRIPT = r"""
import socket, struct, sys
req = bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-failed", e); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(struct.pack(">IIBB", len(req), 1, 1, 0) + req)
    data = s.recv(65536)
    print("closed" if not data else "answered " + data.hex())
except socket.timeout:
    print("timeout")
except OSError as e:
    print("closed", e)
"""


# sys.executable may sit under /root (pyenv), out of reach of uid 65534.
PEER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_peer_with_another_uid_is_refused(daemon: Containerd, rootfs: str,
                                          runtime: str) -> None:
    d, cid = daemon, new_id("peer")
    run_d(d, runtime, rootfs, cid, "/bin/sleep", "1000")
    shim = live_shim(d, runtime, cid)
    sock = shim_socket(d, cid)
    start = len(d.log_text())
    paths = ["/run/containerd", os.path.dirname(sock), sock]
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    out = ""
    for _ in range(10):
        # Every pyshim `start` on the machine makes /run/containerd/s 0700 again, so a
        # shim started meanwhile (another test run) can close the door: retry then.
        try:
            for p in paths[:-1]:
                os.chmod(p, modes[p] | 0o011)  # search for others
            os.chmod(sock, modes[sock] | 0o066)
            # subprocess forks, then setgid/setuid(65534) before exec.
            connect = _request("containerd.task.v2.Task", "Connect", pb_message((1, cid)),
                               d.namespace)
            res = subprocess.run([PEER_PYTHON, "-I", "-c", _PEER_SCRIPT, sock, connect.hex()],
                                 user=65534, group=65534, extra_groups=[],
                                 capture_output=True, text=True, timeout=30, cwd="/",
                                 check=False)
        finally:
            for p in reversed(paths):
                os.chmod(p, modes[p])
        assert res.returncode == 0, res.stderr
        out = res.stdout.strip()
        if not out.startswith("connect-failed"):
            break
    assert {p: stat.S_IMODE(os.stat(p).st_mode) for p in paths} == modes
    assert out.startswith("closed"), f"{runtime}: the other uid got: {out}"

    def refusal() -> list[str]:
        return [ln for ln in d.log_text()[start:].splitlines()
                if re.search(r"refus|handshake|credential|permission", ln, re.IGNORECASE)]

    if runtime == PYSHIM:  # its log line, which containerd copies asynchronously
        wait_for(lambda: any("refusing connection from another user" in ln and "peer_uid=65534" in ln
                             and f"namespace={d.namespace}" in ln for ln in refusal()), 10,
                 message=d.log_text()[start:][-3000:])
    print(f"{runtime}: peer of uid 65534 -> {out}; logged: {refusal()}")
    # The shim still serves its own user.
    assert not pid_gone(shim)
    assert ctr(d, "task", "exec", "--exec-id", "after", cid, "/bin/sh", "-c", "exit 4") \
        == (4, "", "")
    kill_rm(d, cid)
    compare_with_runc("faults-peer-uid", runtime, out.split()[0])


# ------------------------------------------------------------- 8. malformed ttrpc input


def _request(service: str, method: str, payload: bytes, ns: str) -> bytes:
    """A ttrpc Request: service, method, payload and the namespace in its metadata."""
    return pb_message((1, service), (2, method), (3, payload),
                      (5, pb_message((1, "containerd-namespace-ttrpc"), (2, ns))))


def _frame(sid: int, body: bytes, mtype: int = 1) -> bytes:
    return struct.pack(">IIBB", len(body), sid, mtype, 0) + body


def _status(body: bytes) -> int:
    """google.rpc.Status.code of a ttrpc Response (0 if no status)."""
    for num, value in harness.pb_fields(body):
        if num == 1:
            return dict(harness.pb_fields(value)).get(1, 0)
    return 0


class Raw:
    """A raw connection to a shim socket (root: the peer check passes)."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(path)
        self.buf = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def read(self, want: int, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Up to ``want`` response frames as (stream id, status code); stops early on
        EOF (sets ``closed``) or when ``timeout`` passes without data."""
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(out) < want:
            while len(self.buf) >= 10:
                length, sid, mtype, _ = struct.unpack(">IIBB", self.buf[:10])
                if len(self.buf) < 10 + length:
                    break
                body, self.buf = self.buf[10:10 + length], self.buf[10 + length:]
                out.append((sid, _status(body) if mtype == 2 else -mtype))
                if len(out) == want:
                    return out
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            self.s.settimeout(left)
            try:
                data = self.s.recv(65536)
            except TimeoutError:
                return out
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return out
            self.buf += data
        return out

    def eof(self, timeout: float = 10.0) -> list[tuple[int, int]]:
        """Half-close, then read every answer until the server closes."""
        self.s.shutdown(socket.SHUT_WR)
        out = self.read(1 << 30, timeout)
        return out

    def close(self) -> None:
        self.s.close()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_malformed_ttrpc_input(daemon: Containerd, rootfs: str, runtime: str) -> None:
    d, cid, ns = daemon, new_id("ttrpc"), daemon.namespace
    pid = run_d(d, runtime, rootfs, cid, "/bin/sleep", "1000")
    shim = live_shim(d, runtime, cid)
    path = shim_socket(d, cid)
    task = harness.behaviour().go_shim_task_services[0]  # what this line's containerd calls
    good = _request(task, "Connect", pb_message((1, cid)), ns)
    rss0, fds0 = rss_kb(shim), fd_count(shim)
    res: dict[str, Any] = {}

    def case(name: str, *chunks: bytes, want: int = 1, eof: bool = False) -> None:
        c = Raw(path)
        try:
            for chunk in chunks:
                c.send(chunk)
            got = c.eof() if eof else c.read(want)
            res[name] = (got, "closed" if c.closed else "open")
        finally:
            c.close()

    case("baseline", _frame(1, good))
    assert res["baseline"] == ([(1, 0)], "open"), res
    rnd = random.Random(20261122)
    case("random bytes", rnd.randbytes(65536), eof=True)
    case("random bytes, valid header", _frame(1, rnd.randbytes(300)), _frame(3, rnd.randbytes(7)))
    case("4 GiB announced", struct.pack(">IIBB", 0xFFFFFFFF, 1, 1, 0), bytes(8 << 20), eof=True)
    over = (4 << 20) + 1
    case("4 MiB + 1, then a good one", struct.pack(">IIBB", over, 1, 1, 0), bytes(over),
         _frame(3, good), want=2)
    case("even stream id", _frame(2, good))
    case("reused stream id", _frame(1, good), _frame(1, good), want=2)
    case("decreasing stream id", _frame(5, good), _frame(3, good), want=2)
    case("unknown service", _frame(1, _request("no.such.Service", "Connect", b"", ns)))
    case("unknown method", _frame(1, _request(task, "NoSuchMethod", b"", ns)))
    case("request does not parse", _frame(1, b"\xff\xff\xff\xff\x0f"))
    case("payload does not parse", _frame(1, _request(task, "Connect", b"\xff\xff\xff", ns)))
    case("half a header, closed", b"\x00\x00\x00", eof=True)
    case("half a body, closed", _frame(1, good)[:20], eof=True)
    for name, got in res.items():
        print(f"{runtime}: {name}: {got}")

    # Every answer to bad input is an error status, or the connection is closed.
    for name, (frames, state) in res.items():
        if name in ("baseline", "4 MiB + 1, then a good one", "reused stream id",
                    "decreasing stream id"):
            continue
        assert all(code > 0 for _, code in frames), (name, frames)
    # The Go shim keeps reading after the peer's half-close while it discards a frame
    # or waits for the rest of one ("random bytes", "4 GiB announced", "half a body"):
    # the connection stays open and unanswered. Asserted for pyshim only.
    if runtime == PYSHIM:
        expected = {
            "random bytes": "closed",
            "4 GiB announced": ([], "closed"),
            "4 MiB + 1, then a good one": ([(1, 8), (3, 0)], "open"),
            "even stream id": ([(2, 3)], "open"),
            "reused stream id": ([(1, 0), (1, 3)], "open"),  # sorted: the
            "decreasing stream id": ([(3, 3), (5, 0)], "open"),  # error may come first
            "unknown service": ([(1, 12)], "open"),
            "unknown method": ([(1, 12)], "open"),
            "request does not parse": ([(1, 3)], "open"),
            "payload does not parse": ([(1, 3)], "open"),
            "half a header, closed": ([], "closed"),
            "half a body, closed": ([], "closed"),
        }
        for name, want in expected.items():
            got = res[name][1] if isinstance(want, str) else (sorted(res[name][0]), res[name][1])
            assert got == want, f"{name}: {res[name]} != {want}"

    # The shim still serves containerd, and kept no memory of the garbage.
    assert not pid_gone(shim)
    assert task_row(d, cid) == (pid, "RUNNING")
    assert ctr(d, "task", "exec", "--exec-id", "after", cid, "/bin/sh", "-c", "echo ok; exit 5") \
        == (5, "ok\n", "")
    grown = rss_kb(shim) - rss0
    print(f"{runtime}: RSS {rss0} kB -> +{grown} kB, fds {fds0} -> {fd_count(shim)}")
    assert grown < 5 * 1024, f"RSS grew by {grown} kB"
    if runtime == PYSHIM:
        # The Go shim keeps the half-closed connections it is still reading open (3 fds
        # more in our runs), so the fd count is asserted for pyshim only.
        wait_for(lambda: fd_count(shim) <= fds0, 5, message=f"fds {fds0} -> {fd_count(shim)}")
    kill_rm(d, cid)


# -------------------------------------------------- 9. cycles on one grouped shim (soak)


SOAK = os.environ.get("PYSHIM_SOAK", "") == "1"
CYCLES = 1000 if SOAK else 100


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_grouped_shim_cycles_do_not_leak(fresh: Containerd, rootfs: str, runtime: str) -> None:
    """The scenario is tests/harness/soak_cycles.py's, shared with bench/soak.py (which prints
    the figures); each cycle checks ctr's answers and raises at the first surprise."""
    r = soak_cycles.run(fresh, runtime, rootfs, CYCLES)
    s0, s1 = r["samples"]["start"], r["samples"]["end"]
    rss0, rss1, fds0, fds1 = s0["rss_kb"], s1["rss_kb"], s0["fds"], s1["fds"]
    print(f"{runtime}: {CYCLES} cycles in {r['seconds']:.0f}s; RSS {rss0} -> {rss1} kB "
          f"({rss1 - rss0:+d} kB); fds {fds0} -> {fds1}")
    budget = 1024 * CYCLES // 1000  # < 1 MB per 1000 cycles
    # Asserted for pyshim only: the Go shim grew by 1476 kB and 2 fds in 1000 cycles.
    if runtime == PYSHIM:
        assert rss1 - rss0 < budget, f"RSS grew {rss1 - rss0} kB in {CYCLES} cycles"
        assert fds1 == fds0, f"fds {fds0} -> {fds1}"


# ------------------------------------------------------------------ 10. bad bundles


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_rootfs_that_does_not_exist(daemon: Containerd, runtime: str) -> None:
    def scenario(r: str) -> dict[str, Any]:
        cid = new_id("norootfs")
        step = norm(ctr(daemon, "run", "--rm", "--runtime", r, "--rootfs", "/nonexistent",
                        cid, "/bin/true"), cid)
        assert step[0] == 1 and step[1] == "", step
        assert step[2].startswith("ctr: failed to create shim task: OCI runtime create failed:"), step
        assert "/nonexistent" in step[2], step
        assert cid not in daemon.containers() and task_row(daemon, cid) is None
        assert not os.path.exists(runc_state(daemon, cid)), "runc state left"
        wait_for(lambda: not shim_pids(daemon), 10, message="the shim did not exit")
        return {"run": step}

    same_as_runc("faults-no-rootfs", runtime, scenario)


# --------------------------------------------------------- 10. a full filesystem ("/run full")
#
# The shim is driven directly (as tests/test_shim_direct.py does), so that the full
# filesystem is met by the shim and not by ctr or containerd first.


def _fill(directory: str) -> int:
    """Fills the filesystem of ``directory`` with one file; returns its size."""
    chunk = bytes(1 << 16)
    size = 0
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        while True:
            try:
                size += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # Then the last bytes of the last page.
                try:
                    while True:
                        size += f.write(b"\0" * 512)
                except OSError:
                    return size


def _processes_naming(word: str, but: tuple[int, ...] = ()) -> list[int]:
    return [p for p in harness._pids() if p not in but and p != os.getpid()
            and any(word in a for a in harness.cmdline(p))]


@pytest.fixture
def shim_direct(rootfs: str):
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    require(os.access(harness.RUNC_BINARY, os.X_OK), "runc is not installed")
    d = direct.Direct(rootfs)
    mounts: list[str] = []
    try:
        yield d, mounts
    finally:
        d.cleanup()  # kills the shims it started and removes the runc state
        for point in reversed(mounts):
            harness.umount_tree(point)
            assert harness.mounts_under(point) == [], f"{point} still mounted"
        subprocess.run(["rm", "-rf", "--one-file-system", d.dir], check=False)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_create_in_a_bundle_on_a_full_filesystem(shim_direct, rootfs: str, runtime: str) -> None:
    """The bundle lives on a tmpfs that fills up after `start` wrote `address`: Create
    must fail with a clear error and leave no mount, runc state, process or file, and
    the same Create must work once there is space again."""
    d, mounts = shim_direct
    call, remote_error, NS = direct.call, direct.remote_error, direct.NS
    cid = new_id("full")
    bundle = os.path.join(d.dir, cid)
    os.makedirs(bundle)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0711", "pyshim-full", bundle],
                   check=True)
    mounts.append(bundle)
    d.bundle(cid, ["/bin/sh", "-c", "exit 3"])
    log_reader = -1
    if runtime == RUNC:
        # The Go shim opens the bundle's log fifo for writing and waits for a reader,
        # as containerd would be.
        os.mkfifo(os.path.join(bundle, "log"))
        log_reader = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
    try:
        address = d.start(bundle, cid, binary=harness.shim_binary_path(runtime))
        filled = _fill(bundle)
        before = {n: os.lstat(os.path.join(bundle, n)).st_size for n in os.listdir(bundle)}
        rootfs_mount = pb_mount(rootfs)
        runc_state = os.path.join(pyshim.RUNC_ROOT, NS, cid)

        e = remote_error(address, "Create", pb.CreateTaskRequest(
            id=cid, bundle=bundle, rootfs=[rootfs_mount]))
        after = {n: os.lstat(os.path.join(bundle, n)).st_size for n in os.listdir(bundle)}
        res: dict[str, Any] = {
            "code": e.code, "message": str(e).replace(bundle, "<bundle>"),
            "new files": {n: s for n, s in after.items() if n not in before},
            "mounted": harness.mounts_under(os.path.join(bundle, "rootfs")),
            "runc state": os.path.exists(runc_state),
            "processes": _processes_naming(cid, but=tuple(shim_pids_of(d, cid))),
        }
        print(f"{runtime}: filled {filled} bytes; Create -> {res}")
        assert "no space left on device" in str(e).lower(), str(e)
        assert res["mounted"] == [] and not res["runc state"] and res["processes"] == []
        if runtime == PYSHIM:
            # The Go shim leaves an empty options.json behind (recorded above).
            assert res["new files"] == {}, res["new files"]
            assert e.code == pyshim.UNKNOWN and "options.json" in str(e), str(e)

        # Space again: the same Create works, and the task runs to its end.
        os.unlink(os.path.join(bundle, "filler"))
        created = call(address, "Create", pb.CreateTaskRequest(
            id=cid, bundle=bundle, rootfs=[rootfs_mount]), pb.CreateTaskResponse)
        assert created.pid > 0
        call(address, "Start", pb.StartRequest(id=cid))
        waited = call(address, "Wait", pb.WaitRequest(id=cid),
                      pb.WaitResponse)
        assert waited.exit_status == 3
        call(address, "Delete", pb.DeleteRequest(id=cid))
        assert harness.mounts_under(os.path.join(bundle, "rootfs")) == []
        assert not os.path.exists(runc_state)
        try:
            call(address, "Shutdown", pb.ShutdownRequest(id=cid))
        except ConnectionError:
            # containerd takes a connection closed by Shutdown as done (ttrpc's
            # ErrClosed): the Go shim can exit before its reply is out (seen on 1.7.24
            # under load). pyshim always answers first.
            if runtime == PYSHIM:
                raise
        harness.wait_for(lambda: not os.path.exists(address[len("unix://"):]), 10, 0.02)
    finally:
        if log_reader >= 0:
            os.close(log_reader)
    # Not compared with the Go shim: the wording differs, and it leaves options.json.


TTY_BYTES = 1_000_000


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("terminal", "shared"), [(False, False), (False, True), (True, False)],
                         ids=["pipe", "pipe-one-fifo", "tty"])
def test_delete_waits_for_a_slow_reader(shim_direct, rootfs: str, runtime: str,
                                        terminal: bool, shared: bool) -> None:
    """A task writes a megabyte (to pipes, or to a terminal) and exits while its reader
    still has tens of kB to take, and then takes them slowly (16 kB/s): Delete, sent at
    once, must not cut the output off while it still flows. pyshim waits as long as
    bytes move (IO_DRAIN_SECONDS without one ends the wait: before that, 2 s in all cut
    the pipe case at 978,944 bytes); the Go shim's delivery is recorded, not asserted
    (it waits 2 s for pipes; it does not cut a terminal's copy at Delete). With stdout
    and stderr on one fifo, both of pyshim's copies once waited for room on one fd and
    the stdout copy stalled for good (937,984 bytes)."""
    import threading

    d, _mounts = shim_direct
    call = direct.call
    cid = new_id("tty")
    bundle = d.bundle(cid, ["/bin/sh", "-c", f"head -c {TTY_BYTES} /dev/zero | tr '\\0' x"])
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    spec["process"]["terminal"] = terminal
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    fifo, errs = os.path.join(d.dir, f"{cid}-stdout"), os.path.join(d.dir, f"{cid}-stderr")
    os.mkfifo(fifo)
    os.mkfifo(errs)
    log_reader = -1
    if runtime == RUNC:  # the Go shim waits for a reader of its log fifo, as containerd is
        os.mkfifo(os.path.join(bundle, "log"))
        log_reader = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
    exited, got = threading.Event(), [0]

    def read() -> None:
        with open(fifo, "rb", buffering=0) as f:
            # ~1.3 MB/s while the task runs (slower than the shim copies, so the
            # fifo and the terminal stay full), 16 kB/s once it has exited.
            while chunk := f.read(4096):
                got[0] += chunk.count(b"x")
                time.sleep(0.25 if exited.is_set() else 0.003)

    def read_stderr() -> None:  # as a client reads it: to its end (nothing comes)
        with open(errs, "rb", buffering=0) as f:
            while f.read(4096):
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not terminal and not shared:
        threading.Thread(target=read_stderr, daemon=True).start()
    try:
        address = d.start(bundle, cid, binary=harness.shim_binary_path(runtime))
        call(address, "Create", pb.CreateTaskRequest(id=cid, bundle=bundle, terminal=terminal,
                                                     stdout=fifo, stderr="" if terminal else fifo if shared else errs,
                                                     rootfs=[pb_mount(rootfs)]))
        call(address, "Start", pb.StartRequest(id=cid))
        waited = call(address, "Wait", pb.WaitRequest(id=cid), pb.WaitResponse)
        exited.set()
        backlog = TTY_BYTES - got[0]
        assert waited.exit_status == 0
        call(address, "Delete", pb.DeleteRequest(id=cid))
        reader.join(60)
        assert not reader.is_alive(), "the output never ended"
        print(f"{runtime}: backlog at exit {backlog} bytes; delivered {got[0]}")
        try:
            call(address, "Shutdown", pb.ShutdownRequest(id=cid))
        except ConnectionError:  # see test_create_in_a_bundle_on_a_full_filesystem
            if runtime == PYSHIM:
                raise
    finally:
        exited.set()
        if log_reader >= 0:
            os.close(log_reader)
    if runtime == RUNC:
        if got[0] != TTY_BYTES:
            warnings.warn(f"the Go shim delivered {got[0]} of {TTY_BYTES} bytes "
                          f"(backlog {backlog} at exit)", stacklevel=1)
        return
    assert backlog > 0, "the reader kept up: nothing was left to drain at Delete"
    assert got[0] == TTY_BYTES, f"delivered {got[0]} of {TTY_BYTES} (backlog {backlog} at exit)"


def pb_mount(rootfs: str):
    return pb.Mount(type="bind", source=rootfs, options=["rbind", "ro"])


def shim_pids_of(d, cid: str) -> list[int]:
    return [p for p in harness._pids()
            if "-id" in (argv := harness.cmdline(p)) and argv[argv.index("-id") + 1] == cid]


_FULL_SOCKET_DIR = r"""
set -u
dir=/run/containerd/s
mkdir -p "$dir"
mount -t tmpfs -o nr_inodes=8,size=64k,mode=0700 pyshim-full "$dir" || exit 90
i=0
while touch "$dir/filler$i" 2>/dev/null; do i=$((i + 1)); done
cd "$BUNDLE" || exit 91
"$SHIM" -namespace "$NS" -id "$CID" -address "$ADDR" -publish-binary /bin/false start \
    </dev/null >"$OUT/stdout" 2>"$OUT/stderr"
echo $? >"$OUT/code"
ls -A "$dir" >"$OUT/ls"
umount "$dir"
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_start_with_a_full_socket_dir(shim_direct, runtime: str) -> None:
    """`start` meets a /run/containerd/s with no inode left (a tmpfs mounted over it in
    a private mount namespace, so that the host's /run is untouched): it must fail with
    a clear error and leave no socket, address file or shim process."""
    d, _mounts = shim_direct
    cid = new_id("fullsock")
    bundle = d.bundle(cid, ["/bin/true"])
    out = os.path.join(d.dir, "out-" + cid)
    os.makedirs(out)
    env = dict(d.env, BUNDLE=bundle, SHIM=harness.shim_binary_path(runtime), NS=direct.NS,
               CID=cid, ADDR=d.address, OUT=out)
    ran = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                          _FULL_SOCKET_DIR], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert ran.returncode == 0, (ran.returncode, ran.stderr)

    def read(name: str) -> str:
        with open(os.path.join(out, name)) as f:
            return f.read().strip()

    time.sleep(0.3)  # a required gap, not a wait: a shim launched anyway would show now
    res = {"code": int(read("code")), "stdout": read("stdout"),
           "stderr": read("stderr").replace(cid, "<id>"),
           "left in the socket dir": [n for n in read("ls").split() if not n.startswith("filler")],
           "address file": os.path.exists(os.path.join(bundle, "address")),
           "shims": shim_pids_of(d, cid)}
    print(f"{runtime}: {res}")
    assert res["code"] != 0 and res["stdout"] == "", res
    assert "no space left on device" in res["stderr"].lower(), res
    assert res["left in the socket dir"] == [] and not res["address file"], res
    assert res["shims"] == [], res
    # The host's socket dir was never touched.
    assert harness.mounts_under("/run/containerd/s") == []
    # Not compared with the Go shim: the wording of the error differs (printed above).

"""The harness's subreaper: a small process under which a private containerd (or a bare
`shim start`) runs, so that every orphan below it is reaped. Run by ``harness._Reaper``
in an interpreter of its own (``python -I -S reaper.py OWNED_DIR``); stdlib only.

Why the tests need it, and why it is not pyshim's C core:
  * PID 1 on the test machines does not reap orphans, and every shim is an orphan once
    its `start` invocation exits (so are a killed shim's container processes). Something
    between PID 1 and containerd must be a child subreaper.
  * It cannot be the test process: a subreaper there either runs waitpid(-1), stealing
    the exit statuses of the tests' own `ctr` children (subprocess would report nonsense,
    the trap STYLE's rule 1 names), or leaves the orphans as its zombies, which the
    leftover checks (harness.ctr_children) rightly fail on.
  * It outlives the test process: if pytest dies without cleanup(), this process still
    stops the daemon, kills what is left and removes the daemon's directory.
  * pyshim's C core (reaper_reap) does not tell "no child left" (ECHILD) from "none has
    exited yet", which the exit condition below needs, and would make the harness depend
    on a built pyshim; the ~15 lines of reaping here are the price of neither.

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout.
{"op": "spawn", "argv", "env", "log"} -> {"pid"}; {"op": "status", "pid"} -> {"exit":
code or null} (negative: killed by that signal). EOF on stdin means the harness is done,
or died without cleaning up: SIGTERM what was spawned, after 5 s SIGKILL every child left
(orphans keep arriving as shims die), and exit once no child is left or after 15 s. If a
spawned process was still alive at EOF the harness died without cleanup(): then also
unmount and remove OWNED_DIR.
"""

import ctypes
import json
import os
import select
import shutil
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
MNT_DETACH = 2

libc = ctypes.CDLL(None, use_errno=True)
spawned: set[int] = set()
exits: dict[int, int] = {}


def reap() -> bool:
    """Reap to exhaustion; False once we have no children at all."""
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        if pid in spawned:
            exits[pid] = os.waitstatus_to_exitcode(st)


def kill_children() -> None:
    me = os.getpid()
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == me:
            try:
                os.kill(int(name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def remove_dir(path: str) -> None:
    for _ in range(10):
        with open("/proc/self/mountinfo") as f:
            points = [ln.split()[4] for ln in f]
        points = [p for p in points if p == path or p.startswith(path + "/")]
        if not points:
            break
        for p in sorted(points, key=len, reverse=True):
            libc.umount2(p.encode(), MNT_DETACH)
    shutil.rmtree(path, ignore_errors=True)


def reply(obj: dict) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


def handle(req: dict) -> None:
    if req["op"] == "spawn":
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            # Python ignores SIGPIPE/SIGXFSZ and we ignore SIGINT: give the child defaults.
            pid = os.posix_spawn(
                req["argv"][0], req["argv"], req["env"], setsid=True, setsigmask=(),
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT),
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
        except OSError as e:
            return reply({"error": str(e)})
        finally:
            os.close(fd)
        spawned.add(pid)
        reply({"pid": pid})
    elif req["op"] == "status":
        reply({"exit": exits.get(req["pid"])})


def main(owned_dir: str) -> None:
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit("reaper: prctl(PR_SET_CHILD_SUBREAPER) failed")
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    signal.set_wakeup_fd(wfd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for pytest, whose teardown cleans up
    buf, eof, unclean = b"", None, False  # eof: monotonic time stdin closed
    while True:
        children = reap()
        if eof is not None:
            if not children or time.monotonic() > eof + 15:
                break
            if time.monotonic() > eof + 5 or not spawned - exits.keys():
                kill_children()
        # Not a sleep: select wakes at once on a request or a SIGCHLD (the wakeup fd).
        r, _, _ = select.select([rfd] if eof is not None else [rfd, 0], [], [],
                                0.1 if eof is not None else 1.0)
        if rfd in r:
            os.read(rfd, 4096)
        if 0 in r:
            data = os.read(0, 65536)
            if not data:
                eof = time.monotonic()
                for pid in spawned - exits.keys():
                    unclean = True
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                continue
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                handle(json.loads(line))
    if unclean:
        remove_dir(owned_dir)


if __name__ == "__main__":
    main(sys.argv[1])

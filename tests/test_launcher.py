"""The native launcher (bin/launcher.c), the installed containerd-shim-pyshim-v1.

Through a real containerd, beside the Go shim: with the warm template up, `start` is
the launcher handing the whole start to the template, with no Python at all (proved
by hiding the interpreter's name from it: pyshim-python); without a template it is
the Python path, which launches one. A template that closes the connection, answers
short or stalls, or one that belongs to another user, leaves `start` to the Python
path, with one warning in containerd's log; the answer and the error text are the
cold start's, byte for byte; the symlink install works; every pyshim process shows
"pyshim" in its command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import harness
import pytest
from harness import daemon_with, template_socket

PYSHIM = harness.PYSHIM
RUNC = harness.RUNC
SCRIPTS = sysconfig.get_path("scripts")
LAUNCHER = os.path.join(SCRIPTS, harness.shim_binary(PYSHIM))
GROUP = "io.containerd.runc.v2.group"
WARNING = "warm template unavailable: starting the shim cold"


def _installed(expr: str) -> str:
    """`expr` evaluated by the installed pyshim (the one containerd runs)."""
    out = subprocess.run([sys.executable, "-c", f"import pyshim; print({expr})"], cwd="/",
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def shim_of(daemon: harness.Containerd, cid: str) -> int:
    """The shim serving `cid`. A shim just forked by the template still has the
    template's command line until it has set its own title: waited for."""
    def find() -> int:
        for pid in harness.shim_pids(daemon, PYSHIM):
            argv = harness.cmdline(pid)
            if "-id" in argv and argv[argv.index("-id") + 1] == cid and argv[-1] not in ("start", "delete"):
                return pid
        return 0

    return harness.wait_for(find, 10, message=f"no shim for {cid}")


def is_template(pid: int) -> bool:
    return harness.is_template_argv(harness.cmdline(pid))


def bundle(daemon: harness.Containerd, cid: str) -> str:
    return os.path.join(daemon.state, harness.TASK_PLUGIN_DIR, daemon.namespace, cid)


def run_d(daemon: harness.Containerd, rootfs: str, cid: str, runtime: str = PYSHIM,
          group: str = "") -> None:
    ann = ("--annotation", f"{GROUP}={group}") if group else ()
    r = daemon.ctr("run", "-d", "--runtime", runtime, *ann, "--rootfs", rootfs, cid, "/bin/sleep", "1000",
                   timeout=60)
    assert r.returncode == 0, r.stderr
    harness.wait_for(lambda: daemon.tasks().get(cid) == "RUNNING", 10, message=f"{cid} not RUNNING")


@contextmanager
def no_python(scripts: str = SCRIPTS) -> Iterator[None]:
    """The launcher's way to Python (the sibling pyshim-python) taken away: any
    `start` that reaches for Python fails with "no Python to run pyshim"."""
    named = os.path.join(scripts, "pyshim-python")
    os.rename(named, named + ".away")
    try:
        yield
    finally:
        os.rename(named + ".away", named)


@pytest.fixture
def daemon() -> Iterator[harness.Containerd]:
    with daemon_with(PYSHIM_TEMPLATE="1") as d:
        yield d


def test_warm_start_runs_no_python_and_matches_the_go_shim(daemon: harness.Containerd, rootfs: str) -> None:
    """The first start is the Python path (it launches the template); after it,
    starts (a new shim, and one joining its group's shim) need no interpreter."""
    first = harness.new_id("lw")
    run_d(daemon, rootfs, first)
    template = ppid(shim_of(daemon, first))
    assert is_template(template)
    alone, g1, g2 = harness.new_id("la"), harness.new_id("lg"), harness.new_id("lg")
    group = harness.new_id("grp")
    with no_python():
        run_d(daemon, rootfs, alone)
        run_d(daemon, rootfs, g1, group=group)
        run_d(daemon, rootfs, g2, group=group)
    assert ppid(shim_of(daemon, alone)) == template
    assert ppid(shim_of(daemon, g1)) == template
    shims = {pid for pid in harness.shim_pids(daemon, PYSHIM) if harness.cmdline(pid)[-1] != "start"}
    assert len(shims) == 3, [harness.cmdline(p) for p in shims]  # first, alone, and the group's one
    addr = {c: harness.bundle_address(bundle(daemon, c)) for c in (alone, g1, g2)}
    assert addr[g1] == addr[g2] != addr[alone]
    # The Go shim, same containerd, same steps: the same bundle record.
    go = {c: harness.new_id("lgo") for c in ("alone", "g1", "g2")}
    go_group = harness.new_id("grp")
    run_d(daemon, rootfs, go["alone"], RUNC)
    run_d(daemon, rootfs, go["g1"], RUNC, go_group)
    run_d(daemon, rootfs, go["g2"], RUNC, go_group)
    go_addr = {c: harness.bundle_address(bundle(daemon, go[c])) for c in go}
    assert go_addr["g1"] == go_addr["g2"] != go_addr["alone"]
    b = harness.behaviour()
    if b.writes_bootstrap_json:  # 2.x: the JSON answer of a version-3 shim, as the Go shim's
        ours = json.loads(open(os.path.join(bundle(daemon, alone), "bootstrap.json")).read())
        theirs = json.loads(open(os.path.join(bundle(daemon, go["alone"]), "bootstrap.json")).read())
        assert {k: v for k, v in ours.items() if k != "address"} == \
            {k: v for k, v in theirs.items() if k != "address"} == {"version": 3, "protocol": "ttrpc"}
    r = daemon.ctr("task", "exec", "--exec-id", "e1", alone, "/bin/sh", "-c", "exit 5")
    assert r.returncode == 5


def test_concurrent_warm_starts_are_all_served(daemon: harness.Containerd, rootfs: str) -> None:
    run_d(daemon, rootfs, harness.new_id("lc"))
    ids = [harness.new_id("lc") for _ in range(8)]
    with no_python():
        procs = [subprocess.Popen([harness.CTR, "--address", daemon.address, "-n", daemon.namespace, "run",
                                   "-d", "--runtime", PYSHIM, "--rootfs", rootfs, cid, "/bin/sleep", "1000"],
                                  env=daemon.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for cid in ids]
        results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    templates = {ppid(shim_of(daemon, cid)) for cid in ids}
    assert len(templates) == 1 and is_template(templates.pop())


def test_cold_start_when_no_template_answers(daemon: harness.Containerd, rootfs: str) -> None:
    """No template (the first start, one stopped, or an upgraded build's name):
    the Python path, which brings a template up for the next start."""
    first = harness.new_id("lo")
    run_d(daemon, rootfs, first)
    template = ppid(shim_of(daemon, first))
    os.kill(template, signal.SIGTERM)
    path = template_socket(daemon)
    harness.wait_for(lambda: not os.path.exists(path), 10, 0.02)
    with no_python():  # nothing answers: the launcher must go for Python, and cannot
        r = daemon.ctr("run", "-d", "--runtime", PYSHIM, "--rootfs", rootfs, harness.new_id("lo"),
                       "/bin/sleep", "1000", timeout=60)
    assert r.returncode != 0 and "no Python to run pyshim" in r.stderr, r.stderr
    cold = harness.new_id("lo")
    run_d(daemon, rootfs, cold)  # Python: it launches a new template
    harness.wait_for(lambda: os.path.exists(path), 10, 0.02)
    warm = harness.new_id("lo")
    with no_python():
        run_d(daemon, rootfs, warm)
    assert is_template(ppid(shim_of(daemon, warm)))
    assert ppid(shim_of(daemon, warm)) == ppid(shim_of(daemon, cold)) != template


class FakeTemplate:
    """A listener on the template's socket that misbehaves as told: "close" (reads the
    request, closes: a template killed mid-request), "short" (answers "exit 0" with
    fewer bytes than it announced), "stall" (reads, never answers). It records every
    request it read. `listen_as` makes another user the listener (SO_PEERCRED)."""

    def __init__(self, path: str, mode: str, listen_as: int | None = None) -> None:
        self.path, self.mode = path, mode
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX)
        if os.path.exists(path):
            os.unlink(path)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.child = 0
        self.counts: list[int] = []
        if listen_as is not None:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child: listen and serve as that user
                try:
                    os.close(r)
                    os.setgroups([])
                    os.setgid(listen_as)
                    os.setuid(listen_as)
                    self.sock.listen(16)
                    os.write(w, b"L")
                    while True:
                        conn, _ = self.sock.accept()
                        data = self._read(conn)
                        os.write(w, f"{len(data)}\n".encode())
                        conn.close()
                finally:
                    os._exit(0)
            os.close(w)
            self.child, self.pipe = pid, r
            assert os.read(r, 1) == b"L"
        else:
            self.sock.listen(16)
            self.thread = threading.Thread(target=self._serve, daemon=True)
            self.thread.start()

    @staticmethod
    def _read(conn: socket.socket) -> bytes:
        conn.settimeout(5)
        data = b""
        try:
            while len(data) < 8 or len(data) < 8 + sum(int.from_bytes(data[i:i + 4], "big") for i in (0, 4)):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        return data

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests.append(self._read(conn))
            if self.mode == "short":
                try:
                    conn.sendall(b"exit 0 64\nunix:///run/containerd/s/cut")
                except OSError:
                    pass  # a sweep's connection, gone already
            elif self.mode == "stall":
                time.sleep(5)
            conn.close()

    def byte_counts(self) -> list[int]:
        """(listen_as) the size of each request the other user's listener got so far."""
        os.set_blocking(self.pipe, False)
        try:
            self.counts += [int(x) for x in os.read(self.pipe, 4096).split()]
        except BlockingIOError:
            pass
        return self.counts

    def close(self) -> None:
        if self.child:
            os.kill(self.child, signal.SIGKILL)
            os.waitpid(self.child, 0)
            os.close(self.pipe)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@pytest.mark.parametrize(("mode", "error"), [
    ("close", "the warm template closed the connection"),
    ("short", "the warm template's answer was cut short"),
    ("stall", "timed out waiting for the warm template")])
def test_a_template_that_fails_mid_request_leaves_start_to_python(daemon: harness.Containerd, rootfs: str,
                                                                  mode: str, error: str) -> None:
    fake = FakeTemplate(template_socket(daemon), mode)
    try:
        cid = harness.new_id("lm")
        seen: list[list[str]] = []
        done = threading.Event()

        def watch_launcher() -> None:  # the launcher, while it waits: named pyshim in ps
            while not done.is_set():
                for pid in harness.shim_pids(daemon, PYSHIM):
                    argv = harness.cmdline(pid)
                    if argv and argv[-1] == "start" and cid in argv and argv not in seen:
                        seen.append(argv)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch_launcher, daemon=True)
        watcher.start()
        try:
            run_d(daemon, rootfs, cid)
        finally:
            done.set()
            watcher.join()
        assert fake.requests, "the launcher sent the fake template nothing"
        req = next(r for r in fake.requests if r)
        import pyshim

        got = pyshim._unpack_request(req)
        assert got["kind"] == "start" and got["argv"][-1] == "start", got
        assert got["argv"][got["argv"].index("-id") + 1] == cid
        assert got["cwd"] == bundle(daemon, cid)
        assert got["env"].get("TTRPC_ADDRESS") == daemon.ttrpc_address
        log = daemon.log_text()
        assert WARNING in log and error in log, log[-3000:]
        # The stalled case tells Python not to wait a second time; the others let it
        # try (and it meets the same fake, which answers its fork request no better).
        # Empty connections are other pyshims' sweeps of dead templates (the socket
        # directory is the machine's).
        kinds = [pyshim._unpack_request(r)["kind"] for r in fake.requests if r]
        assert kinds == (["start"] if mode == "stall" else ["start", "fork"]), kinds
        assert not is_template(ppid(shim_of(daemon, cid)))
        if mode == "stall":
            assert seen and all("pyshim" in " ".join(argv) for argv in seen), seen
    finally:
        fake.close()
    r = daemon.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/sh", "-c", "exit 3")
    assert r.returncode == 3


def test_a_template_of_another_user_is_never_used(daemon: harness.Containerd, rootfs: str) -> None:
    """A listener on the template's name whose credentials are another user's gets
    nothing from the launcher, nor from the Python path after it: no request, no fd."""
    fake = FakeTemplate(template_socket(daemon), "close", listen_as=65534)
    try:
        cid = harness.new_id("lf")
        run_d(daemon, rootfs, cid)
        # The launcher's connection and the Python path's (at least), all closed unasked.
        counts = harness.wait_for(lambda: len(fake.byte_counts()) >= 2 and fake.counts, 10)
        assert all(n == 0 for n in counts), counts
        assert not is_template(ppid(shim_of(daemon, cid)))
        assert "another user" in daemon.log_text()
    finally:
        fake.close()


def _start_by_hand(daemon: harness.Containerd, tmp_path, cid: str, template: str) -> subprocess.CompletedProcess:
    """The launcher run as containerd runs `start`, in a bundle of our own."""
    work = tmp_path / cid
    work.mkdir(exist_ok=True)
    (work / "config.json").write_text("{}")
    env = {**daemon.env, "TTRPC_ADDRESS": daemon.ttrpc_address, "PYSHIM_TEMPLATE": template}
    return subprocess.run([LAUNCHER, "-namespace", daemon.namespace, "-address", daemon.address,
                           "-publish-binary", harness.CONTAINERD, "-id", cid, "start"],
                          cwd=str(work), env=env, input=b"", capture_output=True, timeout=60)


def test_answer_and_error_text_are_the_cold_starts(daemon: harness.Containerd, rootfs: str, tmp_path) -> None:
    run_d(daemon, rootfs, harness.new_id("lt"))  # the template is up
    started: list[str] = []
    try:
        out = {}
        for how in ("1", "0"):  # warm, then cold
            cid = harness.new_id("lt")
            started.append(cid)
            if how == "1":
                with no_python():
                    r = _start_by_hand(daemon, tmp_path, cid, how)
            else:
                r = _start_by_hand(daemon, tmp_path, cid, how)
            assert (r.returncode, r.stderr) == (0, b""), r
            address = (tmp_path / cid / "address").read_text()
            out[how] = r.stdout.decode().replace(address, "ADDRESS")
            assert is_template(ppid(shim_of(daemon, cid))) == (how == "1")
        assert out["1"] == out["0"]
        # An error of start's own: the bundle's `address` cannot be written.
        errors = {}
        for how in ("1", "0"):
            cid = harness.new_id("lt")
            started.append(cid)
            (tmp_path / cid / "address").mkdir(parents=True)
            r = _start_by_hand(daemon, tmp_path, cid, how)
            assert r.returncode == 1 and r.stdout == b"", r
            errors[how] = re.sub(r"\.address\.\d+\.tmp", ".address.PID.tmp", r.stderr.decode())
        assert errors["1"] == errors["0"] and errors["1"].startswith("pyshim start: "), errors
    finally:
        for cid in started:  # shims nobody will connect to, and their sockets
            for pid in harness.shim_pids(daemon, PYSHIM):
                argv = harness.cmdline(pid)
                if "-id" in argv and argv[argv.index("-id") + 1] == cid and argv[-1] != "start":
                    os.kill(pid, signal.SIGKILL)
            address = tmp_path / cid / "address"
            if address.is_file():
                try:
                    os.unlink(address.read_text().removeprefix("unix://"))
                except FileNotFoundError:
                    pass


def test_symlinked_launcher_finds_its_python_and_its_template(rootfs: str, tmp_path) -> None:
    """The README's install: the launcher symlinked into a directory on containerd's
    PATH. It finds pyshim-python beside its real file, and the same template name."""
    links = tmp_path / "links"
    links.mkdir()
    (links / harness.shim_binary(PYSHIM)).symlink_to(LAUNCHER)
    with daemon_with(extra_path=[str(links)], PYSHIM_TEMPLATE="1") as d:
        first = harness.new_id("ls")
        run_d(d, rootfs, first)
        shim = shim_of(d, first)
        assert harness.cmdline(shim)[2] == os.path.realpath(LAUNCHER)
        assert os.path.exists(template_socket(d, str(links / harness.shim_binary(PYSHIM))))
        warm = harness.new_id("ls")
        with no_python():
            run_d(d, rootfs, warm)
        assert ppid(shim_of(d, warm)) == ppid(shim) and is_template(ppid(shim))


def test_every_pyshim_process_is_named_pyshim(daemon: harness.Containerd, rootfs: str) -> None:
    cid = harness.new_id("lp")
    run_d(daemon, rootfs, cid)
    shim = shim_of(daemon, cid)
    for pid in (shim, ppid(shim)):
        argv = harness.cmdline(pid)
        assert "pyshim" in " ".join(argv) and argv[2] == os.path.realpath(LAUNCHER), argv


def test_an_upgrade_never_uses_the_old_template(daemon: harness.Containerd, rootfs: str, tmp_path) -> None:
    """A reinstall writes the launcher anew: its next start finds no template under
    the new name and goes through Python, which launches a template of the new build;
    the old one is left to idle out. pyshim.py rewritten in place (same launcher): the
    template declines, leaves, and the start after it gets a new one."""
    first = harness.new_id("lu")
    run_d(daemon, rootfs, first)
    old = ppid(shim_of(daemon, first))
    old_path = template_socket(daemon)
    copy = LAUNCHER + ".new"  # beside it: a rename across filesystems fails
    shutil.copy2(LAUNCHER, copy)
    os.replace(copy, LAUNCHER)  # as pip writes it: another file at the same path
    assert template_socket(daemon) != old_path
    upgraded = harness.new_id("lu")
    run_d(daemon, rootfs, upgraded)
    new = ppid(shim_of(daemon, upgraded))
    assert is_template(new) and new != old and is_template(old)
    # Once quiet, the template has its spare shim: it must leave with it.
    spares = harness.wait_for(lambda: harness.spare_shims_of(new), 10,
                              message="the new template made no spare shim")
    # pyshim.py itself rewritten under the running template.
    module = _installed("pyshim.__file__")
    st = os.stat(module)
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = harness.new_id("lu")
    run_d(daemon, rootfs, after)
    harness.wait_for(lambda: not harness.cmdline(new), 10, message="the stale template is still there")
    harness.wait_for(lambda: not any(harness.cmdline(p) for p in spares), 10,
                     message="the stale template's spare shim outlived it")
    # That start went through Python (the template declined), which launched a
    # template of the code on disk and asked it for the shim; on a loaded run that
    # template may still be warming up, and the start then goes cold (seen once on
    # debian13). Either way the next start is the new template's, with no Python.
    newest = ppid(shim_of(daemon, after))
    assert newest not in (old, new)
    if is_template(newest):
        warm = harness.new_id("lu")
        with no_python():
            run_d(daemon, rootfs, warm)
        assert ppid(shim_of(daemon, warm)) == newest
        return
    parents = []
    for _ in range(5):  # the new template answers once warm: a later start is its
        cid = harness.new_id("lu")
        run_d(daemon, rootfs, cid)
        parents.append(ppid(shim_of(daemon, cid)))
        if is_template(parents[-1]):
            break
    assert is_template(parents[-1]) and parents[-1] not in (old, new), parents

"""The harness drives a private containerd correctly, proven with the Go runc shim."""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Callable

import harness
import pytest
from harness import RUNC, Containerd, new_id, require, require_e2e, shim_pids, wait_for


def _run(daemon: Containerd, *args: str) -> tuple[int, str, str]:
    res = daemon.ctr("run", "--runtime", RUNC, *args, timeout=60)
    return res.returncode, res.stdout, res.stderr


def _task_pid(daemon: Containerd, cid: str) -> int:
    res = daemon.ctr("task", "ls", check=True)
    for line in res.stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}:\n{res.stdout}")


def test_rootfs_echo(containerd: Containerd, rootfs: str) -> None:
    code, out, err = _run(containerd, "--rm", "--rootfs", rootfs, new_id(), "/bin/echo", "hello")
    assert (code, out) == (0, "hello\n"), err


def test_rootfs_exit_code(containerd: Containerd, rootfs: str) -> None:
    code, _, err = _run(containerd, "--rm", "--rootfs", rootfs, new_id(), "/bin/sh", "-c", "exit 3")
    assert code == 3, err
    assert containerd.containers() == []


def test_image_echo(containerd: Containerd, busybox_image: str) -> None:
    assert busybox_image in containerd.images()
    code, out, err = _run(containerd, "--rm", busybox_image, new_id(), "/bin/echo", "hi")
    assert (code, out) == (0, "hi\n"), err
    # No path: found through the image config's PATH; the rootfs is an overlay mount.
    code, out, err = _run(containerd, "--rm", busybox_image, new_id(),
                          "sh", "-c", 'echo "$PATH"; grep -c " / overlay " /proc/mounts')
    assert (code, out) == (0, "/usr/sbin:/usr/bin:/sbin:/bin\n1\n"), err


def test_kill9_restart_keeps_task(fresh_containerd: Containerd, rootfs: str) -> None:
    d, cid = fresh_containerd, new_id()
    code, _, err = _run(d, "-d", "--rootfs", rootfs, cid, "/bin/sleep", "1000")
    assert code == 0, err
    assert d.tasks() == {cid: "RUNNING"}
    shims = shim_pids(d, RUNC)
    assert len(shims) == 1

    d.kill9()
    assert not d.running
    assert shim_pids(d, RUNC) == shims  # the shim outlives its daemon
    d.restart()
    assert d.tasks() == {cid: "RUNNING"}

    d.ctr("task", "kill", "-s", "KILL", cid, check=True)
    wait_for(lambda: d.tasks().get(cid) == "STOPPED", 10)
    d.ctr("task", "rm", cid, check=True)
    d.ctr("containers", "rm", cid, check=True)
    wait_for(lambda: not shim_pids(d), 10, message="shim did not exit after task rm")
    assert d.containers() == []


def _assert_gone(d: Containerd, pids: list[int], paths: list[str]) -> None:
    assert not os.path.exists(d.dir)
    assert harness.mounts_under(d.dir) == []
    assert harness.daemon_pids(d.address) == []
    for pid in pids:  # not even a zombie: everything below the harness was reaped
        assert not os.path.exists(f"/proc/{pid}"), (pid, harness.cmdline(pid))
    for path in paths:
        assert not os.path.exists(path)


def _start_two_tasks(d: Containerd, rootfs: str, busybox_tar: str) -> tuple[list[int], list[str]]:
    """A --rootfs task and an image task (overlay mount under d.dir), both detached."""
    d.import_image(busybox_tar)
    a, b = new_id(), new_id()
    for args in (("--rootfs", rootfs, a), (harness.BUSYBOX_REF, b)):
        code, _, err = _run(d, "-d", *args, "/bin/sleep", "1000")
        assert code == 0, err
    assert harness.mounts_under(d.dir), "an image task mounts its rootfs under the state dir"
    assert d._reaper is not None
    pids = [_task_pid(d, a), _task_pid(d, b), d.pid, d._reaper.pid, *shim_pids(d)]
    sockets = []
    for cid in (a, b):  # address (1.x) or bootstrap.json (2.x: its Go shim writes no address)
        addr = harness.bundle_address(os.path.join(d.state, harness.TASK_PLUGIN_DIR, d.namespace, cid))
        assert addr is not None
        sockets.append(addr.removeprefix("unix://"))
    runc_state = [os.path.join(harness.RUNC_ROOT, d.namespace, cid) for cid in (a, b)]
    fifos = [os.path.dirname(p) for p in glob.glob(f"{harness.FIFO_DIR}/*/{a}-stdout")]
    assert len(fifos) == 1  # ctr run -d leaves its FIFOs until the task is deleted
    cgroups = [os.path.join(h, d.namespace, cid)
               for h in harness.cgroup_hierarchies() for cid in (a, b)]
    assert any(os.path.isdir(c) for c in cgroups)
    paths = sockets + runc_state + fifos
    assert all(os.path.exists(p) for p in paths)
    return pids, paths + cgroups


def _kill_shims_then_wait(d: Containerd) -> None:
    """Shims die under a live daemon, which cleans up after them (leaking sockets)."""
    for pid in shim_pids(d):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: d.tasks() == {}, 10, message="containerd kept tasks of dead shims")


def _kill9_then_kill_shims(d: Containerd) -> None:
    """Daemon first, so no one runs `shim delete`: mounts, runc state, sockets stay."""
    d.kill9()
    for pid in shim_pids(d):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("crash", [None, _kill_shims_then_wait, _kill9_then_kill_shims],
                         ids=["graceful", "shims-killed", "daemon-and-shims-killed"])
def test_cleanup_leaves_nothing(rootfs: str, busybox_tar: str,
                                crash: Callable[[Containerd], None] | None) -> None:
    require_e2e()
    d = Containerd()
    try:
        d.start()
        pids, paths = _start_two_tasks(d, rootfs, busybox_tar)
        if crash is not None:
            crash(d)
    finally:
        d.cleanup()
    _assert_gone(d, pids, paths)


def test_require_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    require(True, "never")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true forbids skipping: why"):
        require(False, "why")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require(False, "why")

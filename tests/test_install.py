"""Packaging, as an operator meets it.

`pip wheel .` builds one abi3 wheel holding the compiled C core; installed into a
fresh venv it gives a working `containerd-shim-pyshim-v1`, and `pip uninstall`
takes back every file it put there. The sdist builds too, and a wheel made from
it (no .git) says `Revision: unknown`. Those build offline, with the setuptools and
cffi of the Python running the tests (`--no-build-isolation --no-deps --no-index`;
.ci/setup installs them), need no root and no containerd: about 20-40 s.

Then the install forms end to end, each binary symlinked onto the PATH of a private
containerd that holds only system directories and the link: `pip install --user`
(into a throwaway HOME), and the README's venv removed under running containers and
put back. These run pip as the README does, so pip fetches pyshim's dependencies
(and build requirements) from the package index pip is configured with, as .ci/setup
does; they need root and containerd. About 1-2 min.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import harness
import pytest
from harness import PYSHIM, require, require_e2e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = "containerd-shim-pyshim-v1"
OFFLINE = ["--no-build-isolation", "--no-deps", "--no-index"]
ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}


def run(argv: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout,
                         env=kw.pop("env", ENV), **kw)
    return res


def ok(argv: list[str], **kw) -> str:
    res = run(argv, **kw)
    assert res.returncode == 0, f"{argv}: exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def expected_revision() -> str:
    """What setup.py should record for this tree: the commit, ".m" when tracked
    files differ from it; "unknown" when the tests do not run from a checkout."""
    if not os.path.exists(os.path.join(REPO, ".git")):
        return "unknown"
    commit = ok(["git", "-C", REPO, "rev-parse", "HEAD"]).strip()
    modified = ok(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]).strip()
    return commit + (".m" if modified else "")


def build_wheel(source: str, out: str) -> str:
    ok([sys.executable, "-m", "pip", "wheel", *OFFLINE, "-w", out, source])
    wheels = [n for n in os.listdir(out) if n.endswith(".whl")]
    assert len(wheels) == 1, wheels
    return os.path.join(out, wheels[0])


def built_revision(wheel: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        text = z.read("pyshim.py").decode()
    found = re.findall(r'^REVISION = "([^"]*)"$', text, re.MULTILINE)
    assert len(found) == 1, found
    return found[0]


def tree(root: str) -> set[str]:
    """Every file, directory and symlink under root, as relative paths."""
    out = set()
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(d, name), root))
    return out


@pytest.fixture(scope="module", autouse=True)
def build_requirements() -> None:
    """pyproject.toml's build requirements, in the Python that builds here."""
    probe = run([sys.executable, "-c", "import setuptools, cffi; print(setuptools.__version__)"])
    version = tuple(int(x) for x in re.findall(r"\d+", probe.stdout)[:2]) if probe.returncode == 0 else ()
    require(version >= (70, 1), "an offline build needs setuptools>=70.1 and cffi in "
            f"{sys.executable} (.ci/setup installs them): {probe.stdout}{probe.stderr}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[str]:
    """The wheel `pip wheel .` builds from this tree."""
    yield build_wheel(REPO, str(tmp_path_factory.mktemp("wheel")))


def test_pip_wheel_builds_one_abi3_wheel_with_the_compiled_core(wheel: str) -> None:
    name = os.path.basename(wheel)
    assert re.fullmatch(r"pyshim-[0-9.]+-cp310-abi3-linux_\w+\.whl", name), name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        meta = z.read(info).decode()
    assert {"pyshim.py", "pyshim_pb2.py", "_reaper.abi3.so"} <= names, names
    assert "Root-Is-Purelib: false" in meta and "Tag: cp310-abi3-linux_" in meta, meta
    # The binary is a script (bin/), not an entry point: see setup.py.
    scripts = {n.rsplit("/", 1)[-1] for n in names if ".data/scripts/" in n}
    assert scripts == {BINARY, "pyshim-python"}, names
    assert built_revision(wheel) == expected_revision()


def test_the_wheel_in_a_fresh_venv_works_and_uninstalls_without_a_trace(wheel: str, tmp_path) -> None:
    venv = tmp_path / "venv"
    # The venv sees this Python's site-packages for cffi, protobuf and uvloop (and
    # pip) through a .pth file: nothing is downloaded, and nothing is asked of the
    # system Python (Debian 13's, unlike Debian 12's here, has no pip or cffi).
    # pyshim itself goes into the venv, whose own site-packages come first.
    ok([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    site = ok([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip()
    outer = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    with open(os.path.join(site, "outer-site.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    before = tree(str(venv))

    ok([python, "-m", "pip", "install", *OFFLINE[1:], "--ignore-installed", wheel])
    binary = venv / "bin" / BINARY
    assert binary.is_file() and os.access(binary, os.X_OK)
    where = ok([python, "-c", "import pyshim, _reaper; print(pyshim.__file__); print(_reaper.__file__)"],
               cwd=str(tmp_path))  # not the source tree, which `-c` would put first on sys.path
    assert all(p.startswith(str(venv) + "/") for p in where.split()), where
    assert where.split()[1].endswith("_reaper.abi3.so")

    version = ok([str(binary), "-v"])
    assert version.split("\n") == [
        f"{BINARY}:", "  Version:  0.1.0", f"  Revision: {expected_revision()}",
        f"  Python version: {platform.python_version()}", "", ""]

    # Run by hand, without containerd: a usage error, and nothing written.
    work = tmp_path / "work"
    work.mkdir()
    res = run([str(binary), "start"], cwd=str(work), stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("shim namespace cannot be empty: containerd runs this binary for "
                                 "runtime io.containerd.pyshim.v1 (-h lists the flags)"), res.stderr
    res = run([str(binary), "-h"])
    assert res.returncode == 0 and res.stderr.startswith(f"Usage: {BINARY} [flags] [start | delete]")
    assert os.listdir(work) == []

    # As the README installs it: the binary symlinked into a directory on containerd's
    # PATH, run from a clean environment whose PATH holds only system dirs and the link.
    links = tmp_path / "links"
    links.mkdir()
    (links / BINARY).symlink_to(binary)
    clean = {"PATH": f"/usr/sbin:/usr/bin:/sbin:/bin:{links}"}
    res = run([BINARY, "-v"], env=clean, cwd=str(tmp_path))
    assert res.returncode == 0 and res.stdout == version, (res.stdout, res.stderr)

    # A half-removed install (the module gone, the binary left): one line naming the
    # interpreter and what it tried, never a traceback. The borrowed outer site-packages
    # go too: they hold this tree's own pyshim.
    module = where.split()[0]
    borrowed = os.path.join(site, "outer-site.pth")
    for path in (module, borrowed):
        os.rename(path, path + ".away")
    try:
        res = run([BINARY, "-v"], env=clean, cwd=str(tmp_path))
    finally:
        for path in (module, borrowed):
            os.rename(path + ".away", path)
    assert res.returncode == 127 and res.stdout == "", res
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"{BINARY}: {python}") and "cannot import pyshim" in res.stderr, res.stderr
    # ... and with the interpreter itself gone, the same kind of line from the sh part.
    pyshim_python = venv / "bin" / "pyshim-python"
    saved = pyshim_python.read_bytes()
    pyshim_python.unlink()
    try:
        res = run([BINARY, "-v"], env=clean, cwd=str(tmp_path))
    finally:
        pyshim_python.write_bytes(saved)
        pyshim_python.chmod(0o755)
    assert res.returncode == 127 and res.stderr == (
        f"{BINARY}: no Python to run pyshim: {venv}/bin/pyshim-python is missing; reinstall pyshim\n"), res.stderr

    ok([python, "-m", "pip", "uninstall", "-y", "pyshim"])
    assert not binary.exists()
    left = sorted(tree(str(venv)) - before)
    assert left == [], f"left behind by pip uninstall: {left}"


def test_sdist_builds_and_its_wheel_says_revision_unknown(tmp_path) -> None:
    """An sdist carries everything the build needs; built without .git, the
    wheel's -v says `Revision: unknown` instead of failing."""
    out = tmp_path / "sdist"
    out.mkdir()
    hook = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    ok([sys.executable, "-c", hook, str(out)], cwd=REPO)
    (sdist,) = out.iterdir()
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[-1] for n in t.getnames()}
    assert {"setup.py", "pyproject.toml", "build_reaper.py", "_reaper.c", "pyshim.py", "pyshim_pb2.py",
            "pyshim.proto"} <= names, names
    wheel = build_wheel(str(sdist), str(tmp_path / "wheel"))
    with zipfile.ZipFile(wheel) as z:
        assert "_reaper.abi3.so" in z.namelist()
    assert built_revision(wheel) == "unknown"


# -- install forms end to end ---------------------------------------------------------

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def system_python() -> str:
    """The interpreter this test's venv was made from, by the name an operator types."""
    base = os.path.realpath(sys.executable)
    return "/usr/bin/python3" if os.path.realpath("/usr/bin/python3") == base else base


def pip_env(tmp_path, **extra: str) -> dict[str, str]:
    """pip's environment for an install as an operator runs it: this machine's pip
    configuration (PIP_* variables) kept, nothing of this test's venv, a throwaway HOME."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in ENV.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=SYSTEM_PATH, **extra)
    return env


@contextmanager
def daemon_on(links, tmp_path) -> Iterator[harness.Containerd]:
    """A private containerd whose PATH holds only system directories and `links` (where
    the install's symlink is), and whose HOME has no user site: containerd's own."""
    require_e2e()
    d = harness.Containerd()
    d.env = {k: v for k, v in d.env.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    d.env.update(PATH=f"{SYSTEM_PATH}:{links}", HOME=str(tmp_path / "containerd-home"))
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


def task_pids(d: harness.Containerd) -> dict[str, int]:
    """{container id: pid} from `ctr task ls`."""
    rows = [line.split() for line in d.ctr("task", "ls", check=True).stdout.splitlines()[1:]]
    return {r[0]: int(r[1]) for r in rows if len(r) >= 3}


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def sleeper(d: harness.Containerd, rootfs: str, cid: str) -> subprocess.CompletedProcess:
    return d.ctr("run", "-d", "--runtime", PYSHIM, "--rootfs", rootfs, cid, "/bin/sleep", "1000")


def test_pip_install_user_runs_containers_through_a_symlink(wheel: str, rootfs: str, tmp_path) -> None:
    """`pip install --user` of the wheel, by the system's Python, into a throwaway
    HOME: the launcher finds pyshim in that user site from its own place, though it
    runs Python with -I (no user site) and containerd's HOME is another."""
    require_e2e()
    # The system Python may have no pip (Debian 13's has none): this venv's pip, run by
    # the system Python with nothing else of the venv on its path.
    import pip

    only = tmp_path / "pip-only"
    only.mkdir()
    (only / "pip").symlink_to(os.path.dirname(pip.__file__))
    # PEP 668: the system Python is externally managed; the override touches only the
    # throwaway HOME, where --user installs.
    env = pip_env(tmp_path, PYTHONPATH=str(only), PIP_BREAK_SYSTEM_PACKAGES="1")
    python = system_python()
    ok([python, "-m", "pip", "install", "--user", "--no-warn-script-location", wheel],
       env=env, cwd=str(tmp_path))
    user = tmp_path / "home" / ".local"
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert (user / "lib" / version / "site-packages" / "pyshim.py").is_file()
    binary = user / "bin" / BINARY
    assert (user / "bin" / "pyshim-python").read_text().split("\n", 1)[0] == f"#!{python}"

    links = tmp_path / "links"
    links.mkdir()
    (links / BINARY).symlink_to(binary)
    res = run([BINARY, "-v"], env={"PATH": f"{SYSTEM_PATH}:{links}"}, cwd=str(tmp_path))
    assert res.returncode == 0 and res.stdout.startswith(f"{BINARY}:\n  Version:  0.1.0\n"), res

    with daemon_on(links, tmp_path) as d:
        cid = harness.new_id("user")
        r = d.ctr("run", "--rm", "--runtime", PYSHIM, "--rootfs", rootfs, cid, "/bin/echo", "hi")
        assert (r.returncode, r.stdout) == (0, "hi\n"), r
        cid = harness.new_id("user")
        assert sleeper(d, rootfs, cid).returncode == 0
        shim = harness.live_shim(d, PYSHIM, cid)
        # The shim runs the user install's pyshim and C core, nothing of this test's venv.
        assert harness.cmdline(shim)[:3] == [python, "-IS", str(binary)], harness.cmdline(shim)
        core = [f for f in mapped_files(shim) if f.endswith("_reaper.abi3.so")]
        assert core == [str(user / "lib" / version / "site-packages" / "_reaper.abi3.so")], core


def test_a_removed_install_under_running_containers(rootfs: str, tmp_path) -> None:
    """The README's install (a venv, its binary symlinked onto containerd's PATH)
    removed under a running container, then half put back, then whole: each new run
    fails with one line saying why; a shim that dies meanwhile leaves its container
    running, unknown to `ctr task ls`; restarting containerd once the install is
    back cleans it up."""
    require_e2e()
    venv = tmp_path / "opt-pyshim"
    env = pip_env(tmp_path)

    def install() -> None:  # the README's Install commands, as written there
        ok(["python3", "-m", "venv", str(venv)], env=env, cwd=str(tmp_path))
        ok([str(venv / "bin" / "pip"), "install", "-q", REPO], env=env, cwd=str(tmp_path))

    install()
    links = tmp_path / "links"
    links.mkdir()
    (links / BINARY).symlink_to(venv / "bin" / BINARY)
    with daemon_on(links, tmp_path) as d:
        first = harness.new_id("rm")
        assert sleeper(d, rootfs, first).returncode == 0
        shim = harness.live_shim(d, PYSHIM, first)
        init = task_pids(d)[first]

        def refused(why: str) -> None:
            """A new run fails, saying `why` in one line, and leaves no task."""
            cid = harness.new_id("rm")
            r = sleeper(d, rootfs, cid)
            assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r
            assert r.stderr.count("\n") == 1, r.stderr
            assert cid not in task_pids(d)
            d.ctr("container", "rm", cid)

        shutil.rmtree(venv)  # `rm -rf /opt/pyshim`: the link dangles, containerd says so
        gone = f"fork/exec {links}/{BINARY}: no such file or directory"
        refused(gone)

        # The shim dies: containerd cannot run `shim delete`; the container runs on.
        os.kill(shim, signal.SIGKILL)
        harness.wait_for(lambda: d.log_text().count(gone) >= 2, 20, 0.1,
                         message="containerd did not log the failed shim delete")
        assert harness.cmdline(init), "the container's init died with its shim"
        left = task_pids(d)
        assert first not in left, left  # invisible to `ctr task ls`
        assert first in d.containers()
        bundle = os.path.join(d.state, harness.TASK_PLUGIN_DIR, d.namespace, first)
        runc_state = os.path.join("/run/containerd/runc", d.namespace, first)
        assert os.path.isdir(bundle) and os.path.isdir(runc_state)

        # Half put back. The interpreter's pointer missing: the launcher's line.
        install()
        saved = (venv / "bin" / "pyshim-python").read_bytes()
        (venv / "bin" / "pyshim-python").unlink()
        refused(f"{BINARY}: no Python to run pyshim: {venv}/bin/pyshim-python is missing; reinstall pyshim")
        (venv / "bin" / "pyshim-python").write_bytes(saved)
        (venv / "bin" / "pyshim-python").chmod(0o755)
        # A dependency of the shim missing: pyshim's start refuses.
        site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        os.rename(site / "uvloop", tmp_path / "uvloop")
        refused("pyshim start: refusing to start a shim from a half-removed install: uvloop not found "
                f"(by {venv}/bin/python3, in [")

        # Whole again, and containerd restarted: it runs `shim delete` for the dead
        # shim's bundle, which kills and deletes the container's task.
        os.rename(tmp_path / "uvloop", site / "uvloop")
        d.restart()
        harness.wait_for(lambda: not harness.cmdline(init), 30, 0.1,
                         message="the left container still runs after containerd's restart")
        assert first not in task_pids(d)
        harness.wait_for(lambda: not os.path.exists(bundle), 10, 0.1, message=f"{bundle} is left")
        assert not os.path.exists(runc_state)
        assert d.ctr("container", "rm", first).returncode == 0
        r = d.ctr("run", "--rm", "--runtime", PYSHIM, "--rootfs", rootfs, harness.new_id("rm"),
                  "/bin/echo", "back")
        assert (r.returncode, r.stdout) == (0, "back\n"), r

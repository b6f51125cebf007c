"""pyshim: a containerd runtime v2 shim in Python (binary containerd-shim-pyshim-v1)."""

import os
import re
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from distutils.command.build_scripts import build_scripts  # setuptools provides distutils

HERE = os.path.dirname(os.path.abspath(__file__))
REVISION_LINE = re.compile(r'^REVISION = "[^"\n]*"$', re.MULTILINE)
BUILD_ID_LINE = re.compile(r'^BUILD_ID = "[0-9a-f]*"$', re.MULTILINE)
# What the installed shim is made of: their hash is the build's id.
BUILD_SOURCES = ("pyshim.py", "pyshim_pb2.py", "_reaper.c", "build_reaper.py", "setup.py",
                 "bin/launcher.c", "bin/containerd-shim-pyshim-v1")


def git_revision(root: str) -> str:
    """The commit checked out at `root`, with ".m" when tracked files differ
    from it (containerd's mark of a modified tree); "" when `root` is not the
    top of a git checkout (an sdist, a copy) or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return ""  # a tree without .git inside some other repository
        commit = git("rev-parse", "HEAD")
        modified = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + (".m" if modified else "")


def build_id(root: str) -> str:
    """16 hex digits of sha256 over BUILD_SOURCES (names and contents): the
    launcher and pyshim.py of one build carry the same id, and the warm
    template is named with it, so a launcher never hands `start` to a
    template of other code (see pyshim.template_path)."""
    import hashlib

    h = hashlib.sha256()
    for name in BUILD_SOURCES:
        with open(os.path.join(root, name), "rb") as f:
            data = f.read()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()[:16]


class BuildPy(build_py):
    """Writes the git revision into the built copy of pyshim.py, so that
    `containerd-shim-pyshim-v1 -v` names the commit it was built from, and
    the build id, which the launcher gets too."""

    def build_module(self, module, module_file, package):
        out, copied = super().build_module(module, module_file, package)
        if module != "pyshim":
            return out, copied
        revision = git_revision(HERE)
        with open(out) as f:
            text = f.read()
        if revision:
            text, n = REVISION_LINE.subn(f'REVISION = "{revision}"', text)
            if n != 1:
                raise RuntimeError(f"{module_file}: expected one REVISION line, found {n}")
        text, n = BUILD_ID_LINE.subn(f'BUILD_ID = "{build_id(HERE)}"', text)
        if n != 1:
            raise RuntimeError(f"{module_file}: expected one BUILD_ID line, found {n}")
        with open(out, "w") as f:
            f.write(text)
        return out, copied


def build_launcher(python_part: str, out: str, tmp: str) -> None:
    """The installed containerd-shim-pyshim-v1: bin/launcher.c compiled with
    the compiler (and flags) that build _reaper, then `python_part` appended
    as a zip archive's __main__.py, so that `python -IS <this file>` runs it
    (Python runs a zip's __main__.py; the archive may follow other bytes)."""
    import zipfile
    from distutils.ccompiler import new_compiler
    from distutils.sysconfig import customize_compiler

    cc = new_compiler()
    customize_compiler(cc)
    objects = cc.compile([os.path.join(HERE, "bin", "launcher.c")], output_dir=tmp,
                         macros=[("PYSHIM_BUILD_ID", f'"{build_id(HERE)}"')],
                         extra_postargs=["-O2", "-Wall", "-Wextra"])
    # Linked statically where the C library allows it (Debian's libc6-dev has
    # libc.a): every container's `start` execs this, and a static binary
    # skips the dynamic loader: from exec to its connect to the template,
    # 0.42 ms instead of 0.71 (median of 30 traced starts). Without a static
    # libc it is linked as usual.
    from distutils.errors import LinkError

    try:
        cc.link_executable(objects, os.path.basename(out), output_dir=os.path.dirname(out),
                           extra_postargs=["-static"])
    except LinkError:
        cc.link_executable(objects, os.path.basename(out), output_dir=os.path.dirname(out))
    # Stored, not deflated: reading it then needs no zlib.
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as z:
        z.write(python_part, "__main__.py")
    os.chmod(out, 0o755)


class BuildScripts(build_scripts):
    """Copies the scripts (pyshim-python) and builds the native launcher beside them."""

    def run(self):
        super().run()
        build_temp = self.get_finalized_command("build").build_temp
        os.makedirs(self.build_dir, exist_ok=True)
        build_launcher(os.path.join(HERE, "bin", "containerd-shim-pyshim-v1"),
                       os.path.join(self.build_dir, "containerd-shim-pyshim-v1"),
                       os.path.join(build_temp, "launcher"))


setup(
    name="pyshim",
    version="0.1.0",
    description="containerd runtime v2 shim (io.containerd.pyshim.v1) written in Python",
    py_modules=["pyshim", "pyshim_pb2"],
    python_requires=">=3.10",
    cffi_modules=["build_reaper.py:ffibuilder"],
    # pyshim_pb2 was generated by protoc 35.1 and asks for a runtime at least as new.
    install_requires=["cffi>=1.15", "protobuf>=7.35.1", "uvloop>=0.19"],
    # Not a console_scripts entry point: containerd runs the binary at every
    # start. containerd-shim-pyshim-v1 is the native launcher BuildScripts
    # makes from bin/launcher.c (see there for how it reaches Python);
    # pyshim-python only names the interpreter, in the line pip writes.
    scripts=["bin/pyshim-python"],
    cmdclass={"build_py": BuildPy, "build_scripts": BuildScripts},
    # cffi compiles _reaper against the stable ABI (_reaper.abi3.so): one wheel
    # serves every CPython from 3.10 on.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    license="Apache-2.0",
)

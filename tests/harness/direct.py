"""The shim driven directly, as containerd would drive it, but without containerd:
`shim start` run in a bundle made here under a subreaper (``harness._Reaper``), the
long-lived shim called over ttrpc with pyshim's own client. Used by
tests/test_shim_direct.py and tests/test_faults.py.

Public surface:
    NS, TASK, META                      the namespace, task service and metadata used
    Direct(rootfs)                      bundles, a recording publish binary, `start`,
                                        what was published, cleanup
    call(address, method, req, cls)     one task API call (the line's task service)
    remote_error(address, method, req)  the RemoteError a call must raise
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import pytest
import uvloop
from google.protobuf import any_pb2

import harness
import pyshim

NS = "pyshim-direct"
TASK = pyshim.TASK_SERVICE
META = {pyshim.NAMESPACE_KEY: NS}


class Direct:
    """A temp dir with bundles, a recording publish binary, and a subreaper helper
    under which `start` runs (so the shims it launches are reaped, not left to PID 1)."""

    def __init__(self, rootfs: str) -> None:
        self.rootfs = rootfs
        self.dir = tempfile.mkdtemp(prefix="pysh-d-", dir="/tmp")
        self.address = os.path.join(self.dir, "no-containerd.sock")  # hashed, never dialled
        self.record = os.path.join(self.dir, "published")
        self.publisher = os.path.join(self.dir, "publish")
        with open(self.publisher, "w") as f:
            f.write(f"#!/bin/sh\n{{ echo \"$*\"; base64 -w0; echo; }} >> {self.record}\n")
        os.chmod(self.publisher, 0o755)
        self.reaper = harness._Reaper(self.dir)
        self.env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
        self.env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        self.ids: list[str] = []

    def bundle(self, cid: str, args: list[str], annotations: dict | None = None,
               config: bool = True) -> str:
        path = os.path.join(self.dir, cid)
        os.makedirs(os.path.join(path, "rootfs"))
        if config:
            subprocess.run([harness.RUNC_BINARY, "spec", "--bundle", path], check=True)
            with open(os.path.join(path, "config.json")) as f:
                spec = json.load(f)
            spec["process"]["terminal"] = False
            spec["process"]["args"] = args
            spec["root"] = {"path": self.rootfs, "readonly": True}
            spec["linux"]["cgroupsPath"] = f"/{NS}/{cid}"
            spec["annotations"] = annotations or {}
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(spec, f)
        self.ids.append(cid)
        return path

    def recording_runc(self, name: str) -> tuple[str, str]:
        """(path of a runc wrapper named `name`, the file where it appends each
        command line before it runs the real runc)."""
        calls = os.path.join(self.dir, "runc-calls")
        wrapper = os.path.join(self.dir, name)
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\necho "$@" >> {calls}\nexec {harness.RUNC_BINARY} "$@"\n')
        os.chmod(wrapper, 0o755)
        return wrapper, calls

    def start(self, bundle: str, cid: str, options: bytes = b"", expect: int = 0,
              binary: str = "") -> str:
        """Runs `shim start` (pyshim's, or `binary`) in the bundle with `options` (an
        Any) on stdin; returns the address it wrote ("" when it was expected to fail)."""
        stdin = os.path.join(self.dir, f"{cid}.options")
        with open(stdin, "wb") as f:
            f.write(options)
        argv = ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@" <"$0"', stdin, bundle,
                binary or harness.shim_binary_path(), "-namespace", NS, "-id", cid,
                "-address", self.address, "-publish-binary", self.publisher, "start"]
        pid = self.reaper.spawn(argv, self.env, os.path.join(self.dir, "shim.log"))
        code = self._wait_status(pid)
        assert code == expect, f"start exited {code}: {self.log()}"
        if expect:
            return ""
        try:
            with open(os.path.join(bundle, "address")) as f:
                return f.read()
        except FileNotFoundError:  # a Go shim 2.x: only its JSON answer names it
            return json.loads(self.log().strip().splitlines()[-1])["address"]

    def _wait_status(self, pid: int) -> int:
        def status():
            s = self.reaper.exit_status(pid)
            return (s,) if s is not None else None
        return harness.wait_for(status, 20, 0.02)[0]

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "shim.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def published(self) -> list[tuple[list[str], any_pb2.Any]]:
        import base64

        try:
            with open(self.record) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for argv, data in zip(lines[0::2], lines[1::2], strict=False):
            a = any_pb2.Any()
            a.ParseFromString(base64.b64decode(data))
            out.append((argv.split(), a))
        return out

    def cleanup(self) -> None:
        root = os.path.join(pyshim.RUNC_ROOT, NS)
        for cid in self.ids:
            if os.path.isdir(os.path.join(root, cid)):
                subprocess.run([harness.RUNC_BINARY, "--root", root, "delete", "--force", cid],
                               capture_output=True, check=False)
            harness.umount_tree(os.path.join(self.dir, cid, "rootfs"))
        self.reaper.close()  # kills and reaps the shims left under it
        for cid in self.ids:
            for hier in harness.cgroup_hierarchies():
                for p in (os.path.join(hier, NS, cid), os.path.join(hier, NS)):
                    try:
                        os.rmdir(p)
                    except OSError:
                        pass
        for cid in self.ids:
            sock = pyshim.socket_path(self.address, NS, cid)
            if os.path.exists(sock):
                os.unlink(sock)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _call(address: str, method: str, req, resp_cls=None):
    c = await pyshim.TtrpcClient.connect(address)
    try:
        # The task service this line's containerd calls (v3 on 2.x; pyshim serves both).
        body = await c.call(harness.behaviour().go_shim_task_services[0], method,
                            req.SerializeToString(), META, timeout=30)
    finally:
        c.close()
    if resp_cls is None:
        return body
    out = resp_cls()
    out.ParseFromString(body)
    return out


def call(address: str, method: str, req, resp_cls=None):
    return uvloop.run(_call(address, method, req, resp_cls))


def remote_error(address: str, method: str, req) -> pyshim.RemoteError:
    with pytest.raises(pyshim.RemoteError) as info:
        call(address, method, req)
    return info.value

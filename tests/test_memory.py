"""What keeps a forked shim's pages shared with the warm template.

Immortal heap: on CPython 3.12+ default builds the template makes every object it
holds immortal before gc.freeze(), so a forked shim never writes their refcounts;
on 3.11 (and free-threaded or debug builds) it skips that and says so in one log
line of each shim it forks. Asserted per Python version.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness
import pyshim
from test_template import _run_d, _shim_of, daemon_with

PYSHIM = harness.PYSHIM
IMMORTAL = sys.version_info >= (3, 12)


def test_immortal_terms_follow_the_interpreter() -> None:
    terms = pyshim.immortal_terms()
    if sys.version_info < (3, 12):
        assert terms == f"Python 3.{sys.version_info[1]} has no immortal objects"
    elif sys.version_info < (3, 14):
        assert terms == (0xFFFFFFFF, 0)  # _Py_IMMORTAL_REFCNT of 3.12 and 3.13
    else:
        assert terms == (3 << 30, 1)


# Runs in a fresh interpreter: immortalizes its heap as the template does, then
# forks a child that uses the objects hard and reports their refcounts.
_FORK_SCRIPT = textwrap.dedent("""
    import gc, os, sys
    import pyshim
    gc.disable()
    answer = pyshim.immortalize_heap()
    gc.freeze()
    objs = [pyshim.TaskService, pyshim.log, pyshim.Log.__call__.__code__,
            pyshim.Log.__call__.__code__.co_consts, pyshim.SETTINGS_KEYS, pyshim.immortal_terms]
    before = [sys.getrefcount(o) for o in objs]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        held = [o for o in objs for _ in range(1000)]
        pyshim.log("info", "used", n=len(held))
        pyshim.Settings.from_dict({"template": True}, "x")
        after = [sys.getrefcount(o) for o in objs]
        os.write(w, repr(after).encode())
        os._exit(0)
    os.close(w)
    child = eval(os.read(r, 4096))
    os.waitpid(pid, 0)
    print(repr((answer, before, child)))
""")


def test_frozen_objects_keep_their_refcount_in_a_forked_child() -> None:
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], cwd="/", capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    answer, before, child = eval(out.stdout.strip().splitlines()[-1])
    if IMMORTAL:
        assert isinstance(answer, int) and answer > 10000, answer
        refcnt = pyshim.immortal_terms()[0]
        assert before == [refcnt] * len(before)
        assert child == before
    else:
        assert answer == pyshim.immortal_terms()
        assert child != before  # 1000 more references each: the counts were written


def test_forked_shims_say_what_the_template_did(rootfs: str) -> None:
    """Create, start, exec, kill, delete through a forked shim; its log has the one
    line about the template's heap."""
    with daemon_with(PYSHIM_TEMPLATE="1") as daemon:
        cid = harness.new_id("imm")
        _run_d(daemon, rootfs, cid)
        shim = _shim_of(daemon, cid)
        r = daemon.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/sh", "-c", "exit 3")
        assert r.returncode == 3
        usage = harness.smaps_rollup(shim)
        assert usage is not None and usage["uss"] > 0
        daemon.ctr("task", "kill", "-s", "KILL", cid, check=True)
        harness.wait_for(lambda: "STOPPED" in daemon.ctr("task", "ls").stdout,
                         10, message="task never stopped")
        daemon.ctr("task", "delete", cid, check=True)
        daemon.ctr("container", "delete", cid, check=True)
        text = daemon.log_text()
        mortal = [ln for ln in text.splitlines() if "template heap left mortal" in ln]
        immortal = [ln for ln in text.splitlines() if "template heap immortal" in ln]
        if IMMORTAL:
            assert len(immortal) == 1 and not mortal, (immortal, mortal)
            assert "objects=" in immortal[0]
        else:
            assert len(mortal) == 1 and not immortal, (immortal, mortal)
            assert "has no immortal objects" in mortal[0]

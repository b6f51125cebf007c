"""What keeps a forked shim's pages shared with the warm template, or merged.

Immortal heap: on CPython 3.12+ default builds the template makes every object it
holds immortal before gc.freeze(), so a forked shim never writes their refcounts;
on 3.11 (and free-threaded or debug builds) it skips that and says so in one log
line of each shim it forks. Asserted per Python version.

KSM: under `ksm = "auto"` (the default) and a host ksmd that runs, the template and
its shims mark their private writable mappings MADV_MERGEABLE; nothing they execute
(runc, the container's processes) is mergeable. `off` (setting or $PYSHIM_KSM)
marks nothing. The tests that turn host KSM on restore its previous value.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager

import harness
import pytest
from harness import daemon_with, require, require_e2e, shim_of

import pyshim

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
    objs = [pyshim.TaskService, pyshim.log, pyshim.LogrusLog.__call__.__code__,
            pyshim.LogrusLog.__call__.__code__.co_consts, pyshim.SETTINGS_KEYS, pyshim.immortal_terms]
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
        daemon.ctr("run", "-d", "--runtime", harness.PYSHIM, "--rootfs", rootfs, cid, "/bin/sleep", "1000",
                   check=True)
        shim = shim_of(daemon, cid)
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


# --- KSM -------------------------------------------------------------------

@pytest.mark.parametrize("value", ["auto", "off"])
def test_ksm_setting_parses(value: str) -> None:
    s = pyshim.Settings.from_dict({"ksm": value}, "f")
    assert s.ksm == value
    assert pyshim.Settings.from_json(s.to_json()).ksm == value


@pytest.mark.parametrize("value", ["on", "", 1, True])
def test_ksm_setting_rejects_other_values(value: object) -> None:
    with pytest.raises(pyshim.InvalidArgument, match="'ksm'"):
        pyshim.Settings.from_dict({"ksm": value}, "f")


def test_ksm_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    off = pyshim.Settings.from_dict({"ksm": "off"}, "f")
    monkeypatch.delenv(pyshim.KSM_ENV, raising=False)
    assert pyshim.ksm_mode(None) == "auto"
    assert pyshim.ksm_mode(off) == "off"
    monkeypatch.setenv(pyshim.KSM_ENV, "auto")
    assert pyshim.ksm_mode(off) == "auto"
    monkeypatch.setenv(pyshim.KSM_ENV, "off")
    assert pyshim.ksm_mode(None) == "off"


def _mergeable_mappings(pid: int) -> int:
    """How many of the process's mappings carry VM_MERGEABLE ("mg")."""
    with open(f"/proc/{pid}/smaps") as f:
        return sum(1 for line in f if line.startswith("VmFlags:") and " mg" in line)


def _ksm_stat(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/ksm_stat") as f:
        for line in f:
            k, _, v = line.replace(":", " ").partition(" ")
            out[k] = v.strip()
    return out


def test_ksm_advise_marks_and_unmarks_this_process() -> None:
    """What a shim forked from a marking template does under `off`: unmark."""
    assert pyshim.ksm_advise(True) > 0
    assert _mergeable_mappings(os.getpid()) > 0
    assert pyshim.ksm_advise(False) > 0
    assert _mergeable_mappings(os.getpid()) == 0


# --- all-zero pages ---------------------------------------------------------

ZERO_PAGES_CHILD = textwrap.dedent("""
    import ctypes, mmap, struct, sys, threading
    import pyshim

    page = mmap.PAGESIZE
    m = mmap.mmap(-1, 64 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))

    def present() -> list[bool]:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(base // page * 8)
            raw = f.read(64 * 8)
        return [bool(e >> 63) for e in struct.unpack("64Q", raw)]

    for i in range(64):  # every page written, then zeroed again: present, all zero
        m[i * page] = 1
        m[i * page] = 0
    m[7 * page + 100] = 42  # two pages that are not all zero: one early in the page,
    m[9 * page + page - 1] = 9  # one only in its very last byte
    assert all(present())
    if sys.argv[1] == "threads":
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        print(pyshim.release_zero_pages(), sum(present()))
        stop.set()
        t.join()
        sys.exit(0)
    released = pyshim.release_zero_pages()
    after = present()
    assert after[7] and after[9] and sum(after) == 2, after
    assert m[7 * page + 100] == 42 and m[10 * page - 1] == 9 and m[:7 * page] == bytes(7 * page)
    m[3 * page] = 5  # still ours to write
    assert m[3 * page] == 5
    print(released, sum(after))
""")


def _zero_pages_child(mode: str) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", ZERO_PAGES_CHILD, mode], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    released, present = r.stdout.split()
    return int(released), int(present)


@pytest.mark.unit
def test_release_zero_pages_gives_back_only_all_zero_pages() -> None:
    released, present = _zero_pages_child("single")
    assert released >= 62  # this mapping's 62, and whatever else of the process was zero
    assert present == 2


@pytest.mark.unit
def test_release_zero_pages_does_nothing_with_a_second_thread() -> None:
    assert _zero_pages_child("threads") == (0, 64)


POOL_HOLES_CHILD = textwrap.dedent("""
    import sys
    import pyshim

    size = sys.getsizeof(b"") + 15  # a bytes(15) takes one block of this size class

    def strides() -> list[int]:
        probe = [bytes(15) for _ in range(64)]
        return [id(b) - id(a) for a, b in zip(probe, probe[1:])]

    kept = []
    for _ in range(5):  # pymalloc may hand out a fresh pool first: make holes again
        junk = [bytes(15) for _ in range(4000)]
        del junk[::2]  # 2000 holes in that class's pools
        kept.append(junk)
        before = strides()  # new objects go into the holes, not one after the other
        if before.count(size) < 32:
            break
    assert before.count(size) < 32, before
    filled = pyshim.fill_pool_holes()
    after = strides()  # a pool of their own: packed
    # Mostly packed: seen from 40 to 62 of 63 (the interpreter frees and takes blocks
    # of this class between the fill and the probe), against under 32 before.
    assert after.count(size) >= 32, after
    print(filled)
""")


@pytest.mark.unit
def test_fill_pool_holes_sends_new_objects_to_pools_of_their_own() -> None:
    r = subprocess.run([sys.executable, "-c", POOL_HOLES_CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0


MALLOC_HOLES_CHILD = textwrap.dedent("""
    import ctypes
    import pyshim

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 520  # a 528-byte chunk

    def strides() -> list[int]:
        probe = [libc.malloc(n) for _ in range(32)]
        return [b - a for a, b in zip(probe, probe[1:])]

    blocks = [libc.malloc(n) for _ in range(400)]
    for p in blocks[::2]:  # 200 free chunks between blocks in use
        libc.free(p)
    before = strides()  # malloc hands out the free chunks first
    assert before.count(528) < 16, before
    taken = pyshim.fill_malloc_holes()
    after = strides()  # from memory of their own: one after the other
    assert after.count(528) >= 24, after  # a few may still find a chunk split off earlier
    print(taken)
""")


@pytest.mark.unit
def test_fill_malloc_holes_sends_new_blocks_past_the_holes() -> None:
    r = subprocess.run([sys.executable, "-c", MALLOC_HOLES_CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 0


PACK_CODE_CHILD = textwrap.dedent("""
    import pyshim

    def body(name, lines):  # a function whose code object is bigger than pymalloc's 512 bytes
        src = f"def {name}(x):\\n" + "".join(f"    x = x * 3 + {j}\\n" for j in range(lines)) + "    return x\\n"
        scope = {}
        exec(compile(src, "<packed>", "exec"), scope)
        return scope[name]

    big_a, big_b, big_c = body("big_a", 40), body("big_b", 50), body("big_c", 60)

    def outer(n):
        def inner(k):
            return k * 2
        return inner(n) + 1

    def run():
        big_c(1), big_b(1), big_a(1)  # called in the reverse of the order they were made
        outer(1)
        pyshim.Flags(["-namespace", "n", "-id", "i", "-address", "/a"])

    first = pyshim._calls_of(run)
    names = [c.co_name for c in first]
    assert names.index("big_c") < names.index("big_b") < names.index("big_a") < names.index("outer") \\
        < names.index("inner"), names
    before = {f: f.__code__ for f in (big_a, big_b, big_c, outer, pyshim.which, pyshim.Flags.__init__)}
    inner_before = [k for k in outer.__code__.co_consts if hasattr(k, "co_code")]
    results = [big_a(2), big_b(2), big_c(2), outer(5)]
    copied = pyshim.pack_code(first)
    for f, old in before.items():  # a copy, the same code
        assert f.__code__ is not old and f.__code__.co_code == old.co_code, f
        assert f.__code__.co_consts == old.co_consts or f is outer, f
    inner_after = [k for k in outer.__code__.co_consts if hasattr(k, "co_code")]
    assert inner_after[0] is not inner_before[0] and inner_after[0].co_code == inner_before[0].co_code
    assert [big_a(2), big_b(2), big_c(2), outer(5)] == results
    assert pyshim.Flags(["-namespace", "n", "-id", "i", "-address", "/a"]).id == "i"
    # Copied one right after another, in the order of their first call (from the
    # malloc heap's top: its free chunks were taken first), nothing between them.
    import sys
    c, b, a = (id(f.__code__) for f in (big_c, big_b, big_a))
    assert 0 < b - c <= sys.getsizeof(big_c.__code__) + 24, (c, b, a)  # a chunk's header and rounding
    assert 0 < a - b <= sys.getsizeof(big_b.__code__) + 24, (c, b, a)
    print(copied)
""")


@pytest.mark.unit
@pytest.mark.parametrize("pyc", ["cached", "compiled"])
def test_pack_code_copies_the_code_run_first_side_by_side(tmp_path, pyc: str) -> None:
    """Whether pyshim.py came from its .pyc or was compiled (no .pyc, or a
    stale one: compiling leaves big free chunks in the middle of the heap)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if pyc == "compiled":
        env.update(PYTHONPYCACHEPREFIX=str(tmp_path), PYTHONDONTWRITEBYTECODE="1")  # none there, none written
    r = subprocess.run([sys.executable, "-c", PACK_CODE_CHILD], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(pyshim.__file__), env=env)  # the pyshim this process tests
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 100  # the warm-up's code and all of pyshim's own


@contextmanager
def host_ksm(run: str) -> Iterator[None]:
    """/sys/kernel/mm/ksm/run set to `run`, and its previous value put back."""
    require_e2e()
    require(os.access(pyshim.KSM_RUN, os.W_OK), f"{pyshim.KSM_RUN} is not writable")
    with open(pyshim.KSM_RUN) as f:
        before = f.read().strip()
    with open(pyshim.KSM_RUN, "w") as f:
        f.write(run)
    try:
        yield
    finally:
        with open(pyshim.KSM_RUN, "w") as f:
            f.write(before)


def _init_pid(daemon: harness.Containerd, cid: str) -> int:
    for line in daemon.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


@pytest.mark.parametrize("template", ["1", "0"])
def test_ksm_auto_marks_the_shim_and_not_the_container(rootfs: str, template: str) -> None:
    with host_ksm("1"), daemon_with(PYSHIM_TEMPLATE=template, PYSHIM_KSM="") as daemon:
        cid = harness.new_id("ksm")
        daemon.ctr("run", "-d", "--runtime", harness.PYSHIM, "--rootfs", rootfs, cid, "/bin/sleep", "1000",
                   check=True)
        shim = shim_of(daemon, cid)
        assert _mergeable_mappings(shim) > 0
        assert _ksm_stat(shim)["ksm_mergeable"] == "yes"
        assert _ksm_stat(shim)["ksm_merge_any"] == "no"  # no prctl: it would survive exec
        init = _init_pid(daemon, cid)
        r = daemon.ctr("task", "exec", "-d", "--exec-id", "e1", cid, "/bin/sleep", "1000")
        assert r.returncode == 0, r.stderr
        procs = [int(ln.split()[0]) for ln in daemon.ctr("task", "ps", cid, check=True).stdout.splitlines()[1:]]
        assert init in procs and len(procs) == 2
        for pid in procs:
            assert _mergeable_mappings(pid) == 0, harness.cmdline(pid)
            assert _ksm_stat(pid)["ksm_mergeable"] == "no"
            assert _ksm_stat(pid)["ksm_merge_any"] == "no"


@pytest.mark.parametrize(("run", "mode"), [("1", "off"), ("0", "")])
def test_ksm_off_or_host_ksm_off_marks_nothing(rootfs: str, run: str, mode: str) -> None:
    with host_ksm(run), daemon_with(PYSHIM_TEMPLATE="1", PYSHIM_KSM=mode) as daemon:
        cid = harness.new_id("noksm")
        daemon.ctr("run", "-d", "--runtime", harness.PYSHIM, "--rootfs", rootfs, cid, "/bin/sleep", "1000",
                   check=True)
        shim = shim_of(daemon, cid)
        assert _mergeable_mappings(shim) == 0
        assert _ksm_stat(shim)["ksm_mergeable"] == "no"
        with open(f"/proc/{shim}/stat") as f:
            template = int(f.read().rsplit(")", 1)[1].split()[1])
        assert harness.is_template_argv(harness.cmdline(template))
        assert _mergeable_mappings(template) == 0

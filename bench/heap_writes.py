#!/usr/bin/env python3
"""Which objects a shim wrote since the template forked it: the code behind its
private pages (Python 3.14 and later: it asks the shim itself, with sys.remote_exec).

    python3 bench/heap_writes.py [-n 3] [--settle 3] [--env K=V ...] --platform sid

Starts N idle containers through pyshim under a private containerd, waits --settle
seconds, then diffs the last shim's writable pages against its template's, two bytes
at a time (pages present in both at the same address, mapped by the shim alone, with
different contents). The changed addresses go to a script run inside the shim, which
finds the object holding each one (everything reachable from the gc's objects and
the modules, with code objects' constants), and for a code object the instruction
or inline cache written. Prints the pages per mapping, the objects by pages written,
the code writes by instruction, and writes bench/out/PLATFORM/heap_writes.json.
--env sets a variable for containerd and so for the template (PYSHIM_PACK_CODE=0
compares without code packing). A diagnosis, not a figure: the probe itself runs
in the shim after the diff is taken.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import struct
import sys
import tempfile
import time

import on_platform

on_platform.ensure()

import harness
from bench import long_lived_shims, ppid
import shim_pages as sp

REMOTE = r'''
import gc, json, sys, bisect, dis
def _pyshim_heap_probe(path_in, path_out):
    addrs = json.load(open(path_in))
    seen = {}
    todo = list(gc.get_objects())
    for m in list(sys.modules.values()):
        todo.append(m); todo.append(getattr(m, "__dict__", None))
    while todo:
        o = todo.pop()
        if o is None or id(o) in seen:
            continue
        seen[id(o)] = o
        try:
            todo.extend(gc.get_referents(o))
        except Exception:
            pass
        if type(o).__name__ == "code":
            todo.extend(o.co_consts)
    idx = sorted((i, i + sys.getsizeof(o)) for i, o in seen.items())
    starts = [a for a, _ in idx]
    out = []
    CB = type((lambda: 0).__code__).__basicsize__
    for a in addrs:
        k = bisect.bisect_right(starts, a) - 1
        if k < 0 or a >= idx[k][1]:
            out.append([a, "?", "", -1, ""]); continue
        o = seen[idx[k][0]]
        off = a - idx[k][0]
        t = type(o).__name__
        d = ""; ins = ""
        if t == "code":
            d = f"{o.co_filename.rsplit('/',1)[-1]}:{o.co_qualname}|{sys.getsizeof(o)}|{id(o)}"
            if off >= CB:
                unit = (off - CB) // 2
                try:
                    best = None
                    for i in dis.get_instructions(o, adaptive=True, show_caches=False):
                        if i.offset // 2 <= unit:
                            best = i
                    part = "op" if best and best.offset // 2 == unit else f"cache{unit - best.offset // 2}"
                    ins = f"{best.opname}@{best.offset} {part}" if best else f"unit{unit}"
                except Exception as e:
                    ins = f"unit{unit} ({e})"
            else:
                ins = f"header+{off}"
        elif t == "function":
            d = o.__qualname__
        elif t == "dict":
            d = f"len{len(o)}"
        elif t in ("str",):
            d = o[:40]
        elif t == "type":
            d = o.__qualname__
        elif t == "module":
            d = o.__name__
        out.append([a, t, d, off, ins])
    json.dump(out, open(path_out, "w"))
_pyshim_heap_probe(%r, %r)
'''


def changed_units(pid: int, parent: int) -> tuple[list[int], dict]:
    """The addresses of the 2-byte units that differ between PID's private pages and
    its parent's at the same address (writable mappings both have, /dev ones left
    out), and the count of PID's private pages per (mapping, kind)."""
    addrs, pages = [], collections.Counter()
    for _, perms, name, in_parent, kinds in sp.page_kinds(pid, parent):
        if "w" not in perms or not in_parent or name.startswith("/dev"):
            continue
        for addr, kind, x, y in kinds:
            if kind in ("shared", "other"):
                continue
            pages[(name, kind)] += 1
            if kind == "changed" and x is not None and y is not None:
                wx = struct.unpack(f"{sp.PAGE // 2}H", x)
                wy = struct.unpack(f"{sp.PAGE // 2}H", y)
                addrs += [addr + 2 * j for j in range(len(wx)) if wx[j] != wy[j]]
    return addrs, pages


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--settle", type=float, default=3)
    ap.add_argument("--env", action="append", default=[], help="K=V for containerd (and so the template)")
    on_platform.add_argument(ap)
    args = ap.parse_args()
    on_platform.ensure(args.platform)
    if not hasattr(sys, "remote_exec"):
        raise SystemExit(f"needs Python 3.14 or later (sys.remote_exec); this is {sys.version.split()[0]}")
    for kv in args.env:
        k, _, v = kv.partition("=")
        os.environ[k] = v
    with tempfile.TemporaryDirectory(prefix="pysh-hw-") as tmp:
        rootfs = harness.make_busybox_rootfs(os.path.join(tmp, "rootfs"))
        with harness.Containerd(log_level="info") as daemon:
            ids = []
            for _ in range(args.n):
                cid = harness.new_id("hw")
                r = daemon.ctr("run", "-d", "--runtime", harness.PYSHIM, "--rootfs", rootfs, cid,
                               "/bin/sleep", "100000")
                assert r.returncode == 0, r.stderr
                ids.append(cid)
            time.sleep(args.settle)
            shims = long_lived_shims(daemon, harness.PYSHIM)
            pid = shims[-1]
            addrs, pages = changed_units(pid, ppid(pid))
            print("pages:", dict(pages))
            fin, fout = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
            with open(fin, "w") as f:
                json.dump(addrs, f)
            script = os.path.join(tmp, "probe.py")
            with open(script, "w") as f:
                f.write(REMOTE % (fin, fout))
            sys.remote_exec(pid, script)
            daemon.ctr("task", "ps", ids[-1])
            harness.wait_for(lambda: os.path.exists(fout), 20, message="probe wrote nothing")
            time.sleep(0.5)
            with open(fout) as f:
                res = json.load(f)
            pagesof = collections.defaultdict(set)  # (type, object) -> pages it was written on
            units = collections.Counter()  # (type, object) -> units written
            onpage = collections.defaultdict(set)  # page -> the types written on it
            bytype = collections.Counter()
            codes = collections.Counter()  # (instruction, op or cache entry) -> units written
            for a, t, d, off, ins in res:
                pagesof[(t, d)].add(a // sp.PAGE)
                units[(t, d)] += 1
                onpage[a // sp.PAGE].add(t)
                bytype[t] += 1
                if t == "code":
                    codes[(ins.split("@")[0], ins.split(" ")[-1])] += 1
            print(f"{len(addrs)} changed 2-byte units on {len(onpage)} pages")
            print("units by type:", bytype.most_common(20))
            print("top objects by pages:")
            for key, ps in sorted(pagesof.items(), key=lambda kv: -len(kv[1]))[:60]:
                print(f"  {len(ps):3d} pages {units[key]:4d} units  {key[0]} {key[1]}")
            print("code writes (instruction, part):")
            for (op, part), c in codes.most_common(50):
                print(f"  {c:5d} {op} {part}")
            print(f"pages with only code writes: {sum(1 for s in onpage.values() if s == {'code'})}; "
                  f"pages with an unknown word: {sum(1 for s in onpage.values() if '?' in s)}")
            with open(os.path.join(on_platform.out_dir(), "heap_writes.json"), "w") as f:
                json.dump(res, f)
            daemon.remove_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where one shim's private memory is: its pages by mapping, against the process it
was forked from (pyshim's warm template).

    python3 bench/shim_pages.py PID [--parent PPID] [--top 25]

For every mapping of PID, from /proc/PID/pagemap (root: the frame numbers are
needed), each present page is one of:
  shared    the same physical page as the parent's at that address;
  other     another page that PID does not map alone (the kernel's zero page, a
            page KSM merged, a file page another process maps);
  private   a page PID alone maps: a copy-on-write copy, or memory it mapped itself.
Private pages are split by content (read from /proc/PID/mem and /proc/PPID/mem):
  zero      every byte 0;
  same      byte-identical to the parent's page at that address (written back
            unchanged, or touched to no end: a refcount taken and dropped);
  changed   different from the parent's page, or the parent has none there.
Prints a table, most private pages first, and the totals. The parent defaults to
PID's parent process. Read it while the shim is idle: pages move as it runs.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
ZERO = bytes(PAGE)
PRESENT = 1 << 63
EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1


def maps(pid: int) -> list[tuple[int, int, str, str]]:
    """(start, end, perms, name) of each mapping."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[1], parts[5].strip() if len(parts) > 5 else "[anon]"))
    return out


def frames(pagemap, start: int, end: int) -> list[tuple[int, bool]]:
    """(frame number, mapped by this process alone) of each page in [start, end);
    the frame is -1 where none is present."""
    pagemap.seek(start // PAGE * 8)
    raw = pagemap.read((end - start) // PAGE * 8)
    return [(e & PFN_MASK, bool(e & EXCLUSIVE)) if e & PRESENT else (-1, False)
            for e in struct.unpack(f"{len(raw) // 8}Q", raw)]


def read_page(mem, addr: int) -> bytes | None:
    try:
        mem.seek(addr)
        return mem.read(PAGE)
    except OSError:
        return None


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def page_kinds(pid: int, ppid: int):
    """For every mapping of PID: (start, perms, name, in_parent, pages), where pages
    yields (address, kind, PID's bytes, PPID's bytes) for each present page, kind being
    one of the module docstring's (the bytes only for a private page, else None)."""
    parent_maps = {(s, e) for s, e, _, _ in maps(ppid)}
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm, \
            open(f"/proc/{ppid}/pagemap", "rb", buffering=0) as ppm, \
            open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, \
            open(f"/proc/{ppid}/mem", "rb", buffering=0) as pmem:
        for start, end, perms, name in maps(pid):
            if name == "[vsyscall]":
                continue
            in_parent = (start, end) in parent_maps

            def pages(start=start, end=end, in_parent=in_parent):
                mine = frames(pm, start, end)
                theirs = frames(ppm, start, end) if in_parent else [(-1, False)] * len(mine)
                for i, ((a, alone), (b, _)) in enumerate(zip(mine, theirs)):
                    if a < 0:
                        continue
                    addr = start + i * PAGE
                    if a == b:
                        yield addr, "shared", None, None
                    elif not alone:  # the kernel's zero page, a KSM page, a file page
                        yield addr, "other", None, None
                    else:
                        data = read_page(mem, addr)
                        if data == ZERO:
                            yield addr, "zero", data, None
                            continue
                        old = read_page(pmem, addr) if b >= 0 else None
                        if old is not None and data is not None and old == data:
                            yield addr, "same", data, old
                        else:
                            yield addr, "changed", data, old

            yield start, perms, name, in_parent, pages()


def classify(pid: int, ppid: int) -> list[dict]:
    rows = []
    for start, perms, name, _, pages in page_kinds(pid, ppid):
        row = {"mapping": f"{name} {perms}", "start": start, "present": 0, "shared": 0,
               "other": 0, "zero": 0, "same": 0, "changed": 0}
        for _, kind, _, _ in pages:
            row["present"] += 1
            row[kind] += 1
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pid", type=int)
    ap.add_argument("--parent", type=int, help="the process to compare with (default: PID's parent)")
    ap.add_argument("--top", type=int, default=25, help="mappings to list (default 25)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (frame numbers in /proc/PID/pagemap)")
    ppid = args.parent or parent_of(args.pid)
    rows = classify(args.pid, ppid)
    for r in rows:
        r["private"] = r["zero"] + r["same"] + r["changed"]
    rows.sort(key=lambda r: -r["private"])
    cols = ["private", "zero", "same", "changed", "shared", "other"]
    print(f"pid {args.pid} against {ppid}, pages of {PAGE // 1024} kB")
    print("| mapping | address | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows[:args.top]:
        if r["private"]:
            print(f"| {r['mapping']} | {r['start']:x} | " + " | ".join(str(r[c]) for c in cols) + " |")
    total = {c: sum(r[c] for r in rows) for c in cols}
    print("| total | | " + " | ".join(str(total[c]) for c in cols) + " |")
    print(f"private: {total['private'] * PAGE // 1024} kB, of which all-zero {total['zero'] * PAGE // 1024} kB, "
          f"identical to the parent's {total['same'] * PAGE // 1024} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The short budget of bench/fuzz_ttrpc.py, so that CI runs the fuzzer on every change.

The long run (`python3 bench/fuzz_ttrpc.py --inputs 100000`) is run by hand; its figures
are in the README's failure matrix. Needs no root and no containerd: the TaskService
drives a fake runc in a temp dir.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "bench", "fuzz_ttrpc.py")


@pytest.mark.parametrize("engine,inputs", [("hypothesis", 40), ("random", 400)])
def test_fuzz_ttrpc_short_budget(engine: str, inputs: int) -> None:
    res = subprocess.run([sys.executable, SCRIPT, "--engine", engine, "--inputs", str(inputs)],
                         capture_output=True, text=True, timeout=600, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    summary = re.search(r"^inputs: (\d+) .*failures: (\d+);", res.stdout, re.MULTILINE)
    assert summary, out[-3000:]
    # decoder + dispatch + socket (a tenth): every input really ran.
    assert int(summary.group(1)) == 2 * inputs + max(1, inputs // 10), summary.group(0)
    assert summary.group(2) == "0"
    # The inputs reached the task methods: some answered OK, some created a container.
    codes = dict(re.findall(r"code (\d+) (\d+)", res.stdout))
    assert int(codes.get("0", 0)) > 0 and int(codes.get("12", 0)) > 0, res.stdout[-2000:]
    assert int(re.search(r"events published: (\d+)", res.stdout).group(1)) > 0

"""``--platform`` for every bench script: measure on one platform of the CI matrix.

    python3 bench/bench.py --platform debian13 ...

A script calls ``add_argument(parser)``, then ``ensure(args.platform)`` before it
measures anything. On the platform it runs on (env PYSHIM_PLATFORM, which
.ci/in-platform sets) that returns. Otherwise the same command line is run again
through ``bash .ci/in-platform PLATFORM python bench/SCRIPT ...`` from the tree's top,
with that platform's containerd, Go shim and Python, and this process exits with its
status; outside .ci/in-platform "host" goes through it too, for the venv with this
tree's pyshim. Paths in the arguments are therefore taken from the tree's top, and
from a chroot (debian13) only what is written under bench/out/ comes back:
``out_dir()`` is where outputs go by default.

Stdlib only until ``ensure()`` has returned: a script imports this first and calls
``ensure()`` before it imports ``harness``, which the platform's venv has installed
(.ci/setup), so that ``python3 bench/SCRIPT`` works from any Python.

Every table a script prints is headed by ``caption()``: the platform, its
containerd and Python versions, so that figures of two platforms are never mixed.
"""

from __future__ import annotations

import argparse
import os
import platform as _platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PLATFORMS = ("host", "containerd2", "debian13", "sid")
OUT = os.path.join(HERE, "out")


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--platform", choices=PLATFORMS, default="host",
                        help="where to measure (default host); another platform re-runs "
                             "this command through .ci/in-platform")


def ensure(platform: str | None = None) -> None:
    """Return if this process runs on `platform` (None: the --platform of sys.argv, for
    a script that must re-run before imports only the platform's venv has); else run
    this command there and exit with its status. Outside .ci/in-platform (no PYSHIM_PLATFORM) even "host" goes
    through it: that installs this tree's pyshim into the venv the figures are taken
    with. Inside a platform, asking for another one is an error, not a nested run."""
    if platform is None:
        pre = argparse.ArgumentParser(add_help=False)
        add_argument(pre)
        platform = pre.parse_known_args()[0].platform
    current = os.environ.get("PYSHIM_PLATFORM")
    if platform == current:
        return
    if current is not None:
        raise SystemExit(f"this runs on platform {current}, not {platform}")
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    argv = ["bash", os.path.join(".ci", "in-platform"), platform, "python", script, *sys.argv[1:]]
    print(f"running on {platform}: {' '.join(argv)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.chdir(REPO)
    os.execvp(argv[0], argv)


def info() -> dict[str, str]:
    """What the figures were measured on, for a script's JSON output."""
    import harness  # the platform's venv has it; ensure() needs only the stdlib

    return {"platform": harness.PLATFORM,
            "containerd": ".".join(map(str, harness.containerd_version())),
            "go_shim": harness.GO_SHIM,
            "python": _platform.python_version()}


def caption() -> str:
    """One line naming what a table was measured on."""
    i = info()
    return f"platform {i['platform']}: containerd {i['containerd']}, Python {i['python']}"


def out_dir() -> str:
    """bench/out/<platform>/, made if missing: where a script's files go by default."""
    import harness

    path = os.path.join(OUT, harness.PLATFORM)
    os.makedirs(path, exist_ok=True)
    return path

"""Fixtures for end-to-end tests through a private containerd (the harness package).

Fixtures:
    rootfs            session: busybox rootfs dir for `ctr run --rootfs` (removed at the end)
    containerd        session: one private daemon; tasks/containers are removed after
                      every test that used it, images are kept
    busybox_tar       session: path of the hand-built OCI image archive
    busybox_image     session: that archive imported into `containerd`; returns its ref
    fresh_containerd  function: a daemon of the test's own, for kill -9/restart tests
    daemon            function: ``containerd``, checked for leftover shims and zombie or
                      ctr children of the test process before it is cleaned
    fresh             function: ``fresh_containerd``, checked the same way

The helpers themselves are the ``harness`` package (tests/harness/), which .ci/setup
installs into the venv. ``require(condition, reason)`` (harness) skips a test whose
prerequisites are missing, or fails it when CI=true, so that CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import harness
import pytest
from harness import checked, require, require_e2e

LOG_TAIL = 12000  # characters of daemon log attached to a failing test's report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: needs no containerd (the fast tier: pytest -m unit)")


@pytest.fixture(scope="session")
def rootfs() -> Iterator[str]:
    require(os.access(harness.BUSYBOX, os.X_OK), f"{harness.BUSYBOX} is not installed")
    base = tempfile.mkdtemp(prefix="pysh-rootfs-")
    try:
        yield harness.make_busybox_rootfs(os.path.join(base, "rootfs"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _private_daemon() -> Iterator[harness.Containerd]:
    """A started private containerd, cleaned up when the generator closes."""
    require_e2e()
    daemon = harness.Containerd()
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.cleanup()


@pytest.fixture(scope="session")
def containerd() -> Iterator[harness.Containerd]:
    yield from _private_daemon()


@pytest.fixture
def daemon(containerd: harness.Containerd, request: pytest.FixtureRequest) -> Iterator[harness.Containerd]:
    """The session daemon; checked for leftovers before ``_independent_tests`` removes
    everything."""
    with checked(containerd, request) as d:
        yield d


@pytest.fixture
def fresh(fresh_containerd: harness.Containerd,
          request: pytest.FixtureRequest) -> Iterator[harness.Containerd]:
    """A daemon of the test's own; checked for leftovers before it is torn down."""
    with checked(fresh_containerd, request) as d:
        yield d


@pytest.fixture(autouse=True)
def _independent_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the session daemon, remove its tasks and containers."""
    yield
    if "containerd" in request.fixturenames:
        daemon: harness.Containerd = request.getfixturevalue("containerd")
        if not daemon.running:  # a test stopped it: bring it back for the next one
            daemon.start()
        daemon.remove_all()


@pytest.fixture(scope="session")
def busybox_tar() -> Iterator[str]:
    require(os.access(harness.BUSYBOX, os.X_OK), f"{harness.BUSYBOX} is not installed")
    base = tempfile.mkdtemp(prefix="pysh-img-")
    try:
        path = os.path.join(base, "busybox-oci.tar")
        harness.build_busybox_image(path, harness.BUSYBOX_REF)
        yield path
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_image(containerd: harness.Containerd, busybox_tar: str) -> str:
    containerd.import_image(busybox_tar)
    return harness.BUSYBOX_REF


@pytest.fixture
def fresh_containerd() -> Iterator[harness.Containerd]:
    yield from _private_daemon()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the tail of every daemon log the failing test used to its report."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    funcargs = getattr(item, "funcargs", {})
    for name in ("containerd", "fresh_containerd"):
        daemon = funcargs.get(name)
        if isinstance(daemon, harness.Containerd):
            text = daemon.log_text()
            rep.sections.append((f"{name} log ({daemon.log_path}, tail)", text[-LOG_TAIL:]))

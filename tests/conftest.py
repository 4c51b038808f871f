"""Shared fixtures and the tiers: unprivileged tests always run; ``root`` tests skip with a
reason when not root; ``slow`` tests run only when asked for (``pytest -m slow``)."""
import os
import sys

import pytest

IS_ROOT = os.geteuid() == 0
sys.path.insert(0, os.path.dirname(__file__))


def _userns_usable() -> bool:
    import shutil
    import subprocess
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-Urn", "true"], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    wants_slow = "slow" in (config.getoption("-m") or "")
    userns = None
    for item in items:
        if "userns" in item.keywords:
            userns = _userns_usable() if userns is None else userns
            if not userns:
                item.add_marker(pytest.mark.skip(reason="unprivileged user namespaces are not usable here "
                                                 "(see nslab.errors.privilege_hint())"))
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason="needs root: run the suite with sudo"))
        if "slow" in item.keywords and not wants_slow:
            item.add_marker(pytest.mark.skip(reason="slow tier: run with `pytest -m slow`"))


@pytest.fixture(scope="session", autouse=True)
def real_host_untouched():
    """The whole suite must leave the real host's network state exactly as it found it."""
    if not IS_ROOT:
        yield
        return
    from _hoststate import diff, snapshot
    before = snapshot()
    yield
    problems = diff(before, snapshot())
    assert not problems, "the test suite changed the real host's network state: " + "; ".join(problems)


def open_fds() -> dict[str, str]:
    """This process's open fds and what each points to. The directory fd that listing
    itself needs is closed by the time its link is read, so it drops out."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass
    return fds


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves file descriptors open in the controller."""
    before = open_fds()
    yield
    import gc
    import time
    gc.collect()
    # In-process server threads (test_firewall's echo servers) may still be closing the
    # connection they just answered; a real leak is still open a second later.
    deadline = time.monotonic() + 1.0
    while (leaked := open_fds().items() - before.items()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not leaked, "fds leaked: " + ", ".join(f"{fd} -> {target}" for fd, target in sorted(leaked))

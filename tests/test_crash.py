"""Crash safety: SIGKILL the controller right after each kernel-mutating step, then ``gc``.

The controller (tests/_controller.py) runs a lab through every mode. ``NSLAB_CHECKPOINT_LOG``
first lists the checkpoints it passes; then, for each, a fresh controller is armed with
``NSLAB_CRASH_AT`` and dies there. After each death: every descendant gone within 2 s (the
kernel's job: PDEATHSIG, owned nft table, fd-pinned namespaces), ``gc`` collects the dead
lab with no error, a second ``gc`` is a no-op, and nothing is left — no process or zombie,
record, state dir, IPAM reservation, nsfs mount, and (existing host) no link, address,
route, nft table, socket or sysctl changed in the shared namespace.

Fast tier: each distinct checkpoint once. ``-m slow``: every occurrence of every checkpoint,
and more random-time kills.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import random
import signal
import time

import pytest

from _controller import Run, SharedHost, answers, diff_state, nsfs_mounts, pinned_by_mounts
from nslab import gc
from nslab.hosts import scratch_root

pytestmark = pytest.mark.root

SURVIVAL = 2.0       # seconds the kernel gets to kill every descendant
PARALLEL = 2         # controllers at once (2 cores)


def checkpoints(tmp, *extra) -> list[str]:
    """The checkpoints one clean run of the lifecycle scenario passes, in order."""
    log = os.path.join(tmp, "checkpoints.log")
    run = Run(tmp, "lifecycle", *extra, log=log)
    try:
        rc = run.wait()
        assert rc == 0, run.stderr()
    finally:
        run.close()
    with open(log) as f:
        return f.read().split()


def crash_points(names: list[str], every_occurrence: bool) -> list[str]:
    """``name:n`` specs: the first hit of each checkpoint, or every hit."""
    seen: collections.Counter = collections.Counter()
    points = []
    for name in names:
        seen[name] += 1
        if every_occurrence or seen[name] == 1:
            points.append(f"{name}:{seen[name]}")
    return points


def crash_and_collect(tmp, point: str | None, extra: tuple, shared: SharedHost | None,
                      kill_after: float | None = None) -> list[str]:
    """One controller killed at ``point`` (or ``kill_after`` seconds in); returns problems."""
    os.makedirs(tmp, exist_ok=True)
    baseline = shared.state() if shared else None
    mounts = nsfs_mounts()
    run = Run(tmp, *extra, crash_at=point)
    problems = []
    try:
        if kill_after is not None:
            time.sleep(kill_after)
            run.proc.send_signal(signal.SIGKILL)
        rc = run.wait()
        if rc != -signal.SIGKILL:
            return [f"{point}: controller exited {rc}, not killed: {run.stderr()[-2000:]}"]
        t0 = time.monotonic()
        left = run.wait_empty(SURVIVAL)
        if left:
            problems.append(f"{point}: processes alive {SURVIVAL} s after the crash: {left}")
        died_in = time.monotonic() - t0
        ports = [e["port"] for e in run.events() if e.get("port")]
        labs = run.lab_ids()
        report = gc(tmp)
        if report.errors:
            problems.append(f"{point}: gc errors {report.errors}")
        again = gc(tmp)
        if not again.noop:
            problems.append(f"{point}: second gc was not a no-op: {again}")
        # (Killed before its first lab, a controller never made the records directory.)
        if os.path.isdir(run.records) and os.listdir(run.records):
            problems.append(f"{point}: records left {os.listdir(run.records)}")
        for lab in labs:
            leftover = os.path.join(scratch_root(), f"sandbox-{lab}")
            if os.path.exists(leftover):
                problems.append(f"{point}: sandbox state dir left: {leftover}")
        strays = run.zombies_and_strays()
        if strays:
            problems.append(f"{point}: children or zombies left: {strays}")
        pins = pinned_by_mounts(run.netns_cookies(), mounts)
        if pins:
            problems.append(f"{point}: the lab's namespaces are still pinned: {pins}")
        if shared is not None:
            for port in ports:
                if answers(shared.ns, port, timeout=0.5):
                    problems.append(f"{point}: published port {port} still answers")
            changed = diff_state(baseline, shared.state())
            if changed:
                problems.append(f"{point}: shared host netns changed: {changed}")
            if shared.ipam_files():
                problems.append(f"{point}: IPAM state left: {shared.ipam_files()}")
        assert died_in < SURVIVAL + 1
    finally:
        run.close()
    return problems


def run_points(tmp_path, points, extra, shared_factory=None) -> list[str]:
    """Crash at each point (two controllers at a time); every problem, not just the first."""
    def one(i_point):
        i, point = i_point
        tmp = str(tmp_path / f"p{i}")
        shared = shared_factory(tmp) if shared_factory else None
        try:
            ex = extra + (("--netns", shared.path, "--state", shared.state_dir) if shared else ())
            return crash_and_collect(tmp, point, ex, shared)
        finally:
            if shared:
                shared.close()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        return [p for problems in pool.map(one, enumerate(points)) for p in problems]


def _shared(tmp):
    os.makedirs(tmp, exist_ok=True)
    return SharedHost(tmp)


@pytest.fixture(scope="module")
def sandbox_checkpoints(tmp_path_factory):
    return checkpoints(str(tmp_path_factory.mktemp("enum-sandbox")))


@pytest.fixture(scope="module")
def existing_checkpoints(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("enum-existing"))
    shared = SharedHost(tmp)
    try:
        return checkpoints(tmp, "--host", "existing", "--netns", shared.path, "--state",
                           shared.state_dir, "--network", "crashnet")
    finally:
        shared.close()


def test_scenario_passes_every_kind_of_step(sandbox_checkpoints, existing_checkpoints):
    """The lifecycle scenario reaches the checkpoints of every layer (else crashing at them proves nothing)."""
    for names in (sandbox_checkpoints, existing_checkpoints):
        layers = {n.split(".")[0] for n in names}
        assert {"record", "network", "endpoint", "firewall", "lab"} <= layers
    assert {"sandbox.netns", "sandbox.uplink", "none.lo"} <= set(sandbox_checkpoints)
    assert {"network.bridge", "endpoint.veth", "firewall.proxies"} <= set(existing_checkpoints)


def test_crash_at_every_step_sandbox(tmp_path, sandbox_checkpoints):
    """A sandbox lab killed after any kernel-mutating step leaves nothing once gc ran; a second gc is a no-op."""
    points = crash_points(sandbox_checkpoints, every_occurrence=False)
    assert len(points) >= 30
    problems = run_points(tmp_path, points, ("lifecycle",))
    assert not problems, "\n".join(problems)


def test_crash_at_every_step_existing_host(tmp_path, existing_checkpoints):
    """A lab on a shared, persisted host netns killed after any step: gc restores that netns exactly."""
    points = crash_points(existing_checkpoints, every_occurrence=False)
    assert len(points) >= 25
    problems = run_points(tmp_path, points, ("lifecycle", "--host", "existing", "--network", "crashnet"),
                          _shared)
    assert not problems, "\n".join(problems)


def test_gc_detects_a_leak_control(tmp_path):
    """Control: the residue checks do see a leak — kill a controller and skip gc, and they report the record."""
    shared = _shared(str(tmp_path))
    try:
        run = Run(str(tmp_path), "lifecycle", "--host", "existing", "--netns", shared.path,
                  "--state", shared.state_dir, "--network", "crashnet", crash_at="endpoint.veth:1")
        try:
            assert run.wait() == -signal.SIGKILL
            assert not run.wait_empty(SURVIVAL)
            state = shared.state()
            # The veth went with the child's netns (the kernel's part); the bridge is ours to find.
            assert any(name.startswith("br-") for name, *_ in state["links"])
            assert shared.ipam_files() == ["crashnet.json"]
            assert len(os.listdir(run.records)) == 1
        finally:
            run.close()
        assert gc(str(tmp_path)).labs_collected
        assert [n for n, *_ in shared.state()["links"]] == ["lo"]
    finally:
        shared.close()


def random_time_kills(tmp_path, host: str, count: int, seed: int, window: tuple[float, float]) -> list[str]:
    """SIGKILL ``count`` burst controllers, each at a random moment within ``window`` seconds;
    every problem any of them left."""
    rng = random.Random(seed)
    problems = []
    for i in range(count):
        tmp = str(tmp_path / f"k{i}")
        os.makedirs(tmp)
        shared = _shared(tmp) if host == "existing" else None
        extra = ("burst", "--seed", str(i), "--host", host, "--network", "burstnet")
        if shared:
            extra += ("--netns", shared.path, "--state", shared.state_dir)
        try:
            problems += crash_and_collect(tmp, None, extra, shared, kill_after=rng.uniform(*window))
        finally:
            if shared:
                shared.close()
    return problems


@pytest.mark.parametrize("host", ["sandbox", "existing"])
def test_random_time_kill_during_bursts(tmp_path, host):
    """SIGKILL at a random moment of a create/publish/destroy burst: children gone within 2 s, no port answers, 0 residue."""
    problems = random_time_kills(tmp_path, host, 3, 7 if host == "sandbox" else 11, (0.6, 2.5))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_crash_at_every_occurrence_sandbox(tmp_path, sandbox_checkpoints):
    """Slow tier: every occurrence of every checkpoint (each spawn, each teardown step) of a sandbox lab."""
    points = crash_points(sandbox_checkpoints, every_occurrence=True)
    problems = run_points(tmp_path, points, ("lifecycle",))
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_crash_at_every_occurrence_existing_host(tmp_path, existing_checkpoints):
    """Slow tier: every occurrence of every checkpoint of a lab on a shared host netns."""
    points = crash_points(existing_checkpoints, every_occurrence=True)
    problems = run_points(tmp_path, points, ("lifecycle", "--host", "existing", "--network", "crashnet"),
                          _shared)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("host", ["sandbox", "existing"])
def test_random_time_kills_full_count(tmp_path, host):
    """Slow tier: 40 random-time kills per host kind during bursts, 0 residue each time."""
    problems = random_time_kills(tmp_path, host, 40, 1234, (0.3, 3.0))
    assert not problems, "\n".join(problems)

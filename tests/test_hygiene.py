"""Hygiene: create/destroy cycles under a lowered fd limit leave the controller as they found it.

A controller (tests/_controller.py ``hygiene``) runs with ``RLIMIT_NOFILE`` at 256 and, per
cycle, makes a sandbox lab, spawns bridge, none and container: children (a host child
every 4th cycle, killed and closed), closes some, then the lab. It checks after every
public operation that every thread (``/proc/self/task/*/ns/net``) is in the host's netns,
counts children left unreaped, and samples fds and RSS. Pass: fd count unchanged after the
warm-up, RSS growth <= 5 %, no thread ever elsewhere, no zombie. A control run that leaks
on purpose shows each check can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.root


def run_hygiene(cycles: int, warmup: int, *extra: str) -> dict:
    out = subprocess.run([sys.executable, os.path.join(HERE, "_controller.py"), "hygiene", "--cycles",
                          str(cycles), "--warmup", str(warmup), "--nofile", "256", *extra],
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(result: dict, warmup: int) -> list[str]:
    """What the numbers say is wrong (empty: clean)."""
    samples = result["samples"]
    base = next(s for s in samples if s["cycle"] == warmup - 1)
    last = samples[-1]
    problems = []
    if last["fds"] != base["fds"]:
        problems.append(f"fds {base['fds']} after warm-up, {last['fds']} after {last['cycle'] + 1} cycles")
    growth = (last["rss"] - base["rss"]) / base["rss"]
    if growth > 0.05:
        problems.append(f"RSS grew {growth:.1%} after warm-up")
    if result["stray_count"]:
        problems.append(f"{result['stray_count']} thread(s) outside the host netns: {result['strays'][:3]}")
    if result["zombies"]:
        problems.append(f"{result['zombies']} zombie child(ren) seen")
    return problems


def test_create_destroy_cycles_leave_no_trace():
    """40 lab create/destroy cycles at RLIMIT_NOFILE=256: same fd count, RSS growth <= 5 %, threads home, no zombie."""
    result = run_hygiene(40, 16)
    assert result["nofile"] == 256
    assert not verdict(result, 16), verdict(result, 16)


def test_hygiene_checks_catch_a_leaky_controller():
    """Control: a controller that keeps an fd per cycle, parks a thread in a lab netns and never reaps a child fails all three checks."""
    problems = verdict(run_hygiene(6, 2, "--control"), 2)
    assert any(p.startswith("fds") for p in problems)
    assert any("outside the host netns" in p for p in problems)
    assert any("zombie" in p for p in problems)


@pytest.mark.slow
def test_create_destroy_cycles_full_count():
    """Slow tier: 1,024 create/destroy cycles under a lowered fd limit, fds unchanged and RSS growth <= 5 % after warm-up."""
    result = run_hygiene(1024, 64)
    assert not verdict(result, 64), verdict(result, 64)

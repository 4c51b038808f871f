"""Concurrency: 64 bridge spawns at once, from 4 processes x 16 threads sharing one host
netns and one state directory, round after round.

Each process is a controller (tests/_controller.py ``threads``) with its own
``Lab(host=ExistingHost(path, state_dir))`` and its own network, all created at the same
moment (so subnet choice races too). Every round: no error at all (no EEXIST), no
duplicate address, MAC, veth name or subnet, the shared netns holds exactly 4 bridges and
64 veths, and the IPAM files agree with what was handed out. After the last round the
shared netns is exactly as it was, and no IPAM state or record is left.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import time

import pytest

from _controller import Run, SharedHost, diff_state
from nslab.ipam import Ipam

pytestmark = pytest.mark.root

PROCESSES = 4
THREADS = 16


def rounds(tmp_path, count: int) -> dict:
    shared = SharedHost(str(tmp_path))
    baseline = shared.state()
    runs = []
    stats = {"rounds": 0, "spawns": 0, "seconds": 0.0}
    try:
        for i in range(PROCESSES):
            runs.append(Run(str(tmp_path), "threads", "--host", "existing", "--netns", shared.path,
                            "--state", shared.state_dir, "--network", f"net{i}",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for r in range(count):
            t0 = time.monotonic()
            for run in runs:                      # all four start their 16 threads at once
                run.proc.stdin.write(f"go {THREADS}\n".encode())
                run.proc.stdin.flush()
            made = []
            for run in runs:
                line = run.proc.stdout.readline()
                assert line, run.stderr()
                made += json.loads(line)
            stats["seconds"] += time.monotonic() - t0
            errors = [m for m in made if "error" in m]
            assert not errors, f"round {r}: {errors[:5]}"
            assert len(made) == PROCESSES * THREADS
            for field in ("ip", "mac", "veth", "name", "pid"):
                dupes = [v for v, n in collections.Counter(m[field] for m in made).items() if n > 1]
                assert not dupes, f"round {r}: duplicate {field}: {dupes}"
            state = shared.state()
            links = [l for l in state["links"] if l[0] != "lo"]
            bridges = [l for l in links if l[1] == "bridge"]
            veths = [l for l in links if l[1] == "veth"]
            assert len(bridges) == PROCESSES and len(veths) == PROCESSES * THREADS
            assert {l[0] for l in veths} == {m["veth"] for m in made}
            assert all(l[3] in {b[0] for b in bridges} for l in veths)      # each enslaved to a bridge
            subnets = [a[1] for a in state["addresses"] if a[0].startswith("br-")]
            assert len(set(subnets)) == PROCESSES, f"two networks got one subnet: {subnets}"
            held = {}
            for network, subnet in Ipam.held_subnets(shared.state_dir).items():
                with Ipam(shared.state_dir, network, subnet) as ipam:
                    held.update({str(a): o for a, o in ipam.allocations().items()})
            assert set(held) == {m["ip"] for m in made}
            for run in runs:
                run.proc.stdin.write(b"close\n")
                run.proc.stdin.flush()
            for run in runs:
                assert json.loads(run.proc.stdout.readline()) == {"closed": True}
            assert len([l for l in shared.state()["links"] if l[1] == "veth"]) == 0
            stats["rounds"] += 1
            stats["spawns"] += len(made)
        for run in runs:
            run.proc.stdin.write(b"exit\n")
            run.proc.stdin.flush()
        for run in runs:
            assert run.wait() == 0, run.stderr()
        assert not os.listdir(runs[0].records)          # one records dir for all four
        assert not diff_state(baseline, shared.state())
        assert shared.ipam_files() == []
    finally:
        for run in runs:
            run.close()
        shared.close()
    return stats


def test_concurrent_spawns_from_processes_and_threads(tmp_path):
    """2 rounds of 64 concurrent bridge spawns (4 processes x 16 threads, one state dir): no error, no duplicate."""
    rounds(tmp_path, 2)


@pytest.mark.slow
def test_concurrent_spawns_full_count(tmp_path):
    """Slow tier: 20 rounds of 64 concurrent spawns (1,280 spawns) with no duplicate address, MAC or name, no EEXIST."""
    stats = rounds(tmp_path, 20)
    assert stats["spawns"] == 20 * PROCESSES * THREADS

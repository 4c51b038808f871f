"""The real host, touched minimally: one bridge network and one bridge child on the caller's
own netns (``Lab("current")``), then close — and once more with the controller SIGKILLed
half-way and ``gc`` cleaning up. Before and after, the host's network state must be
byte-identical: tests/_hoststate.py's snapshot (links, addresses, IPv4 routes and rules,
nft ruleset, net sysctls, mounts, /run/netns) plus what it leaves out (IPv6 routes and
rules, every per-interface sysctl, /proc/sys/net/bridge).

The network gets a random name (so a bridge ``br-<random>``), never ``nslab0``: other labs
on this machine may be using the default one.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess

import pytest

from _controller import Run, nsfs_mounts, pinned_by_mounts
from nslab import Lab, gc

pytestmark = pytest.mark.root

# Other sessions on a shared machine add and remove their own /run/netns names meanwhile:
# those keys are compared separately (nothing of ours may be there).
_SHARED_KEYS = ("mounts", "netns")


def _ip6(*args):
    out = subprocess.run(["ip", "-6", "-j", *args], capture_output=True, text=True, check=True).stdout
    from _hoststate import _strip
    return _strip(json.loads(out or "[]"))


def _all_net_sysctls() -> dict:
    values = {}
    for top in ("/proc/sys/net/ipv4/conf", "/proc/sys/net/ipv6/conf", "/proc/sys/net/bridge",
                "/proc/sys/net/ipv6", "/proc/sys/net/netfilter"):
        for dirpath, _, files in os.walk(top):
            for name in files:
                path = os.path.join(dirpath, name)
                if "stat" in name or not os.access(path, os.R_OK):
                    continue
                try:
                    with open(path) as f:
                        values[path] = f.read().strip()
                except OSError:
                    pass
    # Counters that move on their own (conntrack), not state.
    for volatile in ("nf_conntrack_count", "nf_conntrack_events"):
        values = {k: v for k, v in values.items() if not k.endswith(volatile)}
    return values


def host_state() -> dict:
    from _hoststate import snapshot
    state = snapshot()
    state["routes6"] = _ip6("route", "show", "table", "all")
    state["rules6"] = _ip6("rule", "show")
    state["sysctls_all"] = _all_net_sysctls()
    return state


def host_diff(before: dict, after: dict) -> list[str]:
    from _hoststate import diff
    return [p for p in diff({k: v for k, v in before.items() if k not in _SHARED_KEYS},
                            {k: v for k, v in after.items() if k not in _SHARED_KEYS})]


def test_current_host_bridge_child_and_close_restore_the_host(tmp_path, monkeypatch):
    """One bridge network and one bridge child on the real host, then close: host state identical, no record left."""
    monkeypatch.setenv("NSLAB_RECORDS_DIR", str(tmp_path / "labs"))
    before = host_state()
    net = f"t{secrets.token_hex(4)}"
    with Lab("current") as lab:
        assert lab.host.kind == "current"
        c = lab.spawn(["sleep", "60"], mode=net, name="c")
        bridge = lab.networks[net].bridge
        during = host_state()
        names = {link["ifname"] for link in during["links"]}
        assert {bridge, c.endpoint.host_ifname} <= names
        assert any(t.get("table", {}).get("name") == f"nslab-{lab.id}"
                   for t in (during.get("nft") or {}).get("nftables", []))
        record = lab.record.path
        assert {e["kind"] for e in lab.record.entries.values()} == {"ipam", "link"}
        c.close()
    after = host_state()
    assert not os.path.exists(record)
    assert host_diff(before, after) == []


def test_current_host_crash_then_gc_restores_the_host(tmp_path):
    """The controller is SIGKILLed with a bridge and a child on the real host: the kernel takes the child and the
    nft table, gc the bridge, its veth and the IPAM state — the host is as before, a second gc is a no-op."""
    before = host_state()
    mounts = nsfs_mounts()
    net = f"t{secrets.token_hex(4)}"
    run = Run(str(tmp_path), "lifecycle", "--host", "current", "--network", net, crash_at="lab.spawned:1")
    try:
        assert run.wait() == -signal.SIGKILL, run.stderr()
        assert not run.wait_empty(2.0)
        dirty = host_state()
        assert any(link.get("ifalias", "").endswith(f":{net}") for link in dirty["links"]), "a bridge was left to collect"
        report = gc(str(tmp_path))
        assert not report.errors and len(report.labs_collected) == 1
        assert any(f"IPAM state of network {net}" in r for r in report.removed), report
        assert gc(str(tmp_path)).noop
        assert host_diff(before, host_state()) == []
        assert run.zombies_and_strays() == []
        assert pinned_by_mounts(run.netns_cookies(), mounts) == []
    finally:
        run.close()


def test_two_current_host_labs_share_forwarding_until_the_last_closes(tmp_path, monkeypatch):
    """Two labs on the real host both consent to forwarding: closing the first leaves it on
    for the second; closing the second puts back what the machine had."""
    monkeypatch.setenv("NSLAB_RECORDS_DIR", str(tmp_path / "labs"))
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        original = f.read().strip()
    before = host_state()
    a = Lab("current", allow_forwarding=True)
    b = Lab("current", allow_forwarding=True)
    try:
        a.close()
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read().strip() == "1"
    finally:
        a.close()
        b.close()
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == original
    assert host_diff(before, host_state()) == []

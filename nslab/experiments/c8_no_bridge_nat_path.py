"""C8 — no bridge or NAT sits in the host-mode path (Under the Hood).

Measured: the same traffic — 20 TCP connections from a container to a server in the
outside network — first from a host-mode container, then from a bridge container. Around
each, two sets of counters are read from the kernel: every nslab nftables rule's packet
counter (the bridge network's FORWARD, NAT and MASQUERADE rules among them) and every
host interface's packet counters. The bridge run is the control: it must move them, or the
instruments would prove nothing.
"""
from __future__ import annotations

import ipaddress
import time

from ._base import Checks, sentence_list
from ._net import Service, counter_deltas, link_stats, rule_counters, stats_delta
from ._programs import run_client

ID = "C8"
CLAIM = "No bridge or NAT sits in the host-mode path"
SABOTAGE = "host-on-bridge"
CONNECTIONS = 20


def _snapshot(lab) -> tuple[dict, dict]:
    return rule_counters(lab.host.netns), link_stats(lab.host.netns)


def _bridge_links(lab, stats: dict) -> list[str]:
    bridges = {n.bridge for n in lab.networks.values()}
    return [name for name in stats if name in bridges or name.startswith("veth")]


def _in(address: str, subnets) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in subnets)


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        lab.spawn(["sleep", "60"], name="bystander")     # the bridge and its rules exist
        outside = str(lab.host.outside_address)
        with Service(lab.host.outside, "tcp", (outside, 0), "outside", show_peer=True) as svc:
            rules0, links0 = _snapshot(lab)
            host_out = run_client(lab, outside, svc.port, CONNECTIONS, mode="host")
            rules1, links1 = _snapshot(lab)
            bridge_out = run_client(lab, outside, svc.port, CONNECTIONS, mode="bridge")
            rules2, links2 = _snapshot(lab)
        host_rules, bridge_rules = counter_deltas(rules0, rules1), counter_deltas(rules1, rules2)
        host_links, bridge_links = stats_delta(links0, links1), stats_delta(links1, links2)
        on_bridge_host = {n: host_links[n]["tx_packets"] + host_links[n]["rx_packets"]
                          for n in _bridge_links(lab, host_links)}
        on_bridge_ctl = {n: bridge_links[n]["tx_packets"] + bridge_links[n]["rx_packets"]
                         for n in _bridge_links(lab, bridge_links)}
        uplink = lab.host.uplink
        host_addr = str(lab.host.address)
        subnets = [n.subnet for n in lab.networks.values()]

    def seen_as(lines):
        return sorted({ln.split()[-1].rsplit(":", 1)[0] for ln in lines if ln.startswith("outside")})
    host_ok = sum(1 for ln in host_out if ln.startswith("outside"))
    bridge_ok = sum(1 for ln in bridge_out if ln.startswith("outside"))
    uplink_host = host_links.get(uplink, {}).get("tx_packets", 0)
    # IPv6 housekeeping (router solicitations, MLD, DAD) crosses a fresh bridge and veth on
    # its own schedule: a handful of packets is noise. Traffic that really took the bridge
    # would cross it at least once per packet sent out of the uplink.
    stray = sum(on_bridge_host.values())
    checks = Checks()
    checks.add("host-mode traffic got through", host_ok == CONNECTIONS, f"{host_ok}/{CONNECTIONS}")
    checks.add("no nslab rule counted host-mode traffic", not host_rules, str(host_rules or "all counters unchanged"))
    checks.add("no veth or bridge carried it", stray < max(8, uplink_host // 2),
               f"{stray} packets on {sentence_list(on_bridge_host) or 'no bridge link'} vs {uplink_host} out of {uplink}")
    checks.add("control: bridge traffic got through", bridge_ok == CONNECTIONS, f"{bridge_ok}/{CONNECTIONS}")
    checks.add("control: bridge traffic moved the counters", bool(bridge_rules) and sum(on_bridge_ctl.values()) > 0,
               f"rules {bridge_rules}; bridge links {on_bridge_ctl}")
    evidence = {"connections": CONNECTIONS, "outside_server": f"{outside}:{svc.port}",
                "host_mode": {"answers": host_ok, "outside_saw": seen_as(host_out), "rule_deltas": host_rules,
                              "bridge_link_packets": on_bridge_host, "uplink_tx_packets": uplink_host},
                "bridge_mode": {"answers": bridge_ok, "outside_saw": seen_as(bridge_out), "rule_deltas": bridge_rules,
                                "bridge_link_packets": on_bridge_ctl,
                                "uplink_tx_packets": bridge_links.get(uplink, {}).get("tx_packets", 0)},
                "checks": checks.to_list()}
    moved = ", ".join(f"{k} +{v}" for k, v in bridge_rules.items())
    host_seen, bridge_seen = seen_as(host_out), seen_as(bridge_out)
    masq = sum(v for k, v in bridge_rules.items() if "MASQUERADE" in k)
    host_masq = sum(v for k, v in host_rules.items() if "MASQUERADE" in k)
    explanation = (
        f"A host-mode container opened {CONNECTIONS} connections to a server in the outside network ({host_ok} "
        f"answered); {uplink_host} packets left through the host's {uplink}. During that run "
        + ("no nslab firewall rule counted a single packet" if not host_rules else
           "rules counted it: " + ", ".join(f"{k} +{v}" for k, v in host_rules.items()))
        + f", and the bridge and veths saw {stray} packets"
        + (" (IPv6 housekeeping of the fresh links, not this traffic)" if 0 < stray < uplink_host // 2 else "")
        + f". The same {CONNECTIONS} connections from a bridge "
        f"container ({bridge_ok} answered) moved the counters — {moved or 'none'} — and crossed the bridge links "
        f"({sum(on_bridge_ctl.values())} packets). The outside server saw the host-mode container as "
        f"{sentence_list(host_seen) if host_seen else 'nobody (no answer)'}"
        + ((", the host's own address, with no rule in between" if not host_rules else
            f", the host's address — but only after MASQUERADE rewrote it ({host_masq} packets counted)" if host_masq
            else ", the host's address, though rules counted its traffic") if host_seen == [host_addr]
           else f" (the host's address is {host_addr})")
        + f", and the bridge container as {sentence_list(bridge_seen) if bridge_seen else 'nobody (no answer)'}"
        + (f": the host's address too, and the MASQUERADE rule counted {masq} packets — the source was "
           "rewritten on the way out" if bridge_seen == [host_addr] and masq else
           ": the host's address, though no MASQUERADE counter moved" if bridge_seen == [host_addr] else
           ": its own bridge address, untranslated" if bridge_seen and all(_in(a, subnets) for a in bridge_seen)
           else "")
        + ".")
    key = (f"host-mode: {len(host_rules)} rules moved, {stray} pkts on bridge links; "
           f"bridge: {len(bridge_rules)} rules moved, {sum(on_bridge_ctl.values())} pkts")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

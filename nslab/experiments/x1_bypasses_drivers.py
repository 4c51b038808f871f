"""X1 — host networking bypasses the network drivers, so network plugins and overlays do not
apply (Expert zone).

The "driver" here is nslab's bridge network driver, and its policy is Docker's: a bridge
container's ports are reachable from outside only if published ("DROP DIRECT ACCESS",
"UNPUBLISHED PORT DROP"). Measured: the outside network is given a route to the bridge's
subnet (as a neighbour on the same L2 segment would have), then tries a bridge container's
unpublished port 7000 and a host-mode container's port 7001, with the rule counters of the
bridge network's firewall read from the kernel around each attempt. The policy must stop
(and count) the first, and never see the second.

Each container is dialled where it really is reachable, as read from inside its own network
namespace: the host-mode container at the host's address if its namespace holds that
address (it does when it shares the host's), else at its own address. So a "host-mode"
child that really sits on the bridge is dialled at its bridge address, its packets cross the
network's rules, and the "no rule of the network saw it" check fails by itself — it does not
lean on the connection check.
"""
from __future__ import annotations

import time

from ..namespaces import Namespace
from ._base import Checks, label, proc_netns
from ._net import connect_from, counter_deltas, ipv4_addresses, rule_counters
from ._programs import start_server

ID = "X1"
CLAIM = ("Host networking bypasses the network drivers, so network plugins and overlays do not apply")
SABOTAGE = "host-on-bridge"
# Base chains hold only the table's dispatch (jumps into per-network chains and maps), as
# Docker's `PREROUTING -m addrtype --dst-type LOCAL -j DOCKER` does: they see every new
# connection to a host address, whoever it is for. The network's own rules live elsewhere.
DISPATCH = ("nat-PREROUTING", "nat-OUTPUT", "nat-POSTROUTING", "filter-FORWARD")


def _split(deltas: dict) -> tuple[dict, dict]:
    dispatch = {k: v for k, v in deltas.items() if k.split(" ", 1)[0] in DISPATCH}
    return {k: v for k, v in deltas.items() if k not in dispatch}, dispatch


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        net = lab.network()
        guarded, g_bind = start_server(lab, "guarded", 7000, mode="bridge")
        bypass, b_bind = start_server(lab, "bypass", 7001, mode="host")
        # The outside becomes a neighbour that routes the bridge subnet to the host.
        lab.host.outside_rtnl.request("route", "add", dst=str(net.subnet), gateway=str(lab.host.address),
                                      obj=f"route {net.subnet} via {lab.host.address} in the outside netns")
        # Where the host-mode container is really reachable, read from inside its netns.
        if bypass.running:
            with Namespace.of_pid(bypass.pid, "net") as bypass_net:
                bypass_addrs = ipv4_addresses(bypass_net)
        else:                                   # its bind failed: the netns the lab placed it in
            bypass_addrs = ipv4_addresses(bypass.netns)
        host_addr = str(lab.host.address)
        target = host_addr if host_addr in bypass_addrs else (bypass_addrs[0] if bypass_addrs else None)
        c0 = rule_counters(lab.host.netns)
        to_bridge = (connect_from(lab.host.outside, str(guarded.address), 7000, timeout=0.3)
                     if guarded.address else {"ok": False, "error": "no address"})
        c1 = rule_counters(lab.host.netns)
        to_host = (connect_from(lab.host.outside, target, 7001, timeout=0.3) if target
                   else {"ok": False, "error": "no address outside loopback"})
        c2 = rule_counters(lab.host.netns)
        nets = {"guarded": proc_netns(guarded), "bypass": proc_netns(bypass), "host": list(lab.host.netns.identity)}
        guarded_addr = str(guarded.address) if guarded.address else None
    saw_bridge, saw_host_all = counter_deltas(c0, c1), counter_deltas(c1, c2)
    saw_host, dispatch = _split(saw_host_all)
    checks = Checks()
    checks.add("the bridge policy blocks the bridge container", not to_bridge["ok"] and bool(saw_bridge),
               f"{to_bridge.get('error') or 'reached'}; counted by {saw_bridge or 'no rule'}")
    checks.add("the host-mode container is reached", to_host["ok"] and to_host.get("banner", "").startswith("bypass"),
               to_host.get("banner") or to_host.get("error", ""))
    checks.add("no rule of the network saw it", not saw_host,
               f"dialled {target}:7001; " + str(saw_host or "no counter of the network moved"))
    evidence = {"bridge": net.bridge, "subnet": str(net.subnet), "rules": len(c2),
                "bridge_container": {"pid": guarded.pid, "netns": nets["guarded"], "address": guarded_addr,
                                     "bind": g_bind, "outside_attempt": to_bridge, "rules_that_counted": saw_bridge},
                "host_container": {"pid": bypass.pid, "netns": nets["bypass"], "bind": b_bind,
                                   "addresses": bypass_addrs, "dialled": target,
                                   "outside_attempt": to_host, "rules_that_counted": saw_host,
                                   "dispatch_rules_that_counted": dispatch},
                "host": {"netns": nets["host"]}, "checks": checks.to_list()}
    explanation = (
        f"The bridge network {net.bridge} ({net.subnet}) carries {len(c2)} counted firewall rules. A client in the "
        f"outside network, routed to that subnet, tried the bridge container's unpublished port "
        f"{guarded_addr}:7000: {to_bridge.get('error') or 'it answered'}"
        + (f", and the network's rules counted it ({', '.join(f'{k} +{v}' for k, v in saw_bridge.items())}). "
           if saw_bridge else ", and no rule counted it. ")
        + f"It then tried the host-mode container where its own namespace says it is reachable, "
          f"{target}:7001{' (the host address)' if target == host_addr else ' (not a host address)'}: "
        + (f"answered ({to_host['banner']})" if to_host["ok"] else to_host.get("error", ""))
        + (" — and not one rule of the bridge network counted a packet"
           if not saw_host else ", and the network's rules counted it ("
           + ", ".join(f"{k} +{v}" for k, v in saw_host.items()) + ")")
        + (f" (only the table's dispatch rule {', '.join(dispatch)} counted the connection, as Docker's "
           f"'-m addrtype --dst-type LOCAL -j DOCKER' jump sees every connection to a host address; no rule it "
           f"leads to matched). " if dispatch else ". ")
        + (f"The host-mode container is in {label(nets['bypass'])}, the host's namespace, so the network's policy "
           "(like any plugin or overlay attached to a network) never sees its traffic."
           if nets["bypass"] == nets["host"] else
           f"The host-mode container is in {label(nets['bypass'])}, not the host's namespace "
           f"({label(nets['host'])}): it is attached to a network, and that network's rules see its traffic."))
    key = (f"bridge :7000 {to_bridge.get('error') or 'reached'} ({sum(saw_bridge.values())} pkts counted); "
           f"host-mode {target}:7001 {'reached' if to_host['ok'] else to_host.get('error')} ({sum(saw_host.values())} counted "
           f"by the network, {sum(dispatch.values())} by dispatch)")
    nuance_text = None
    if checks.ok and dispatch:
        nuance_text = ("the table-wide dispatch rule (Docker's 'addrtype LOCAL -j DOCKER') still counts a connection "
                       "to a host-mode port, but no rule of the bridge network matches it")
    return ctx.result(ID, CLAIM, checks.verdict(nuance_text), evidence, explanation, key, started)

"""C3 — host mode creates no new namespace; the container uses the host's interfaces and
addresses and listens on host ports with no translation (Step 3).

Measured: a host-mode server's netns (``/proc/PID/ns/net``) against the host's; the host's
own socket table (sock_diag inside the host's netns), where the child's listening socket
must appear, owned by the child's pid; and a connection from the simulated outside world to
the host's address and the child's port, where the server reports the address it was
reached at and the client's address: equal to what the client dialled and used, so nothing
translated either side.
"""
from __future__ import annotations

import time

from ..evidence import View
from ._base import Checks, label, proc_netns
from ._net import connect_from, rule_counters
from ._programs import start_server

ID = "C3"
CLAIM = ("Host mode creates no new namespace: the container uses the host's interfaces and addresses "
         "and listens on host ports with no translation")
SABOTAGE = "host-in-own-netns"
PORT = 8000


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        host_net = list(lab.host.netns.identity)
        web, bind = start_server(lab, "web", PORT, mode="host")
        child_net = proc_netns(web)
        # The host's table, with sockets attributed to the child's pid where it owns them.
        host_view = View.gather("host", {"net": lab.host.netns}, pid=web.pid if web.running else None)
        mine = [f"{s.proto} {s.local}" for s in host_view.listening()
                if s.pid == web.pid and s.local.endswith(f":{PORT}")]
        dialled = f"{lab.host.address}:{PORT}"
        reach = connect_from(lab.host.outside, str(lab.host.address), PORT)
        parts = reach.get("banner", "").split()
        seen_local, seen_peer = (parts[1], parts[2]) if len(parts) == 3 else (None, None)
        rules = rule_counters(lab.host.netns)

        checks = Checks()
        checks.add("same netns as the host", child_net == host_net, f"child {label(child_net)}, host {label(host_net)}")
        checks.add("its port is in the host's socket table", bool(mine), ", ".join(mine) or "absent")
        checks.add("reached at the host's address", reach["ok"], reach.get("banner") or reach.get("error", ""))
        checks.add("no translation", seen_local == dialled and seen_peer == reach.get("local"),
                   f"dialled {dialled} from {reach.get('local')}; server saw {seen_local} from {seen_peer}")
        checks.add("no firewall rule involved", not rules, f"{len(rules)} nslab rules in the host netns")
        evidence = {"host": {"netns": host_net, "address": str(lab.host.address)},
                    "child": {"pid": web.pid, "netns": child_net, "bind": bind, "sockets_in_host_table": mine},
                    "outside_client": reach, "server_saw": {"local": seen_local, "peer": seen_peer},
                    "nslab_rules": len(rules), "checks": checks.to_list()}
    same = child_net == host_net
    explanation = (
        f"A server started with --network host (pid {evidence['child']['pid']}) is in {label(child_net)}; the host "
        f"is {label(host_net)}: {'the very same namespace — no new one was made' if same else 'a different namespace'}. "
        f"Listing the host's own sockets shows {', '.join(mine) + ' owned by that pid' if mine else 'no socket of the child'}. "
        f"A client in the outside network dialled {dialled} "
        f"{'and was answered by the child' if reach['ok'] else 'and got ' + reach.get('error', '?')}"
        + (f"; the server saw itself reached at {seen_local} by {seen_peer}, exactly the address dialled and the "
           f"client's own address: no NAT, no proxy, no port mapping" if seen_local == dialled and reach['ok'] else "")
        + f". nslab installed {len(rules)} firewall rules for this.")
    key = (f"child {label(child_net)} {'=' if same else '≠'} host {label(host_net)}; "
           f":{PORT} {'in' if mine else 'not in'} host table; outside→{dialled} "
           f"{'answered, untranslated' if checks.items[3]['ok'] else reach.get('error', 'not as expected')}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

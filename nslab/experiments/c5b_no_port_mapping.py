"""C5b — no port mapping is needed in host mode (Step 5).

Measured: the lab's nftables rules (read back from the kernel) and its publications before
and after a host-mode server starts on port 8001 *without* ``-p``; who holds port 8001 in
the host's socket table; and whether a client in the outside network reaches the server at
the host's address on that port. A bridge child runs first, so the lab's firewall table
exists and "no new rule" means something.
"""
from __future__ import annotations

import time

from ..evidence import View
from ._base import Checks, label, proc_netns
from ._net import connect_from, rule_counters
from ._programs import start_server

ID = "C5b"
CLAIM = "No port mapping is needed in host mode"
SABOTAGE = "host-in-own-netns"
PORT = 8001


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        lab.spawn(["sleep", "60"], name="bystander")             # a bridge child: the firewall exists
        rules_before = sorted(rule_counters(lab.host.netns))
        pubs_before = sorted(lab.firewall.publications)
        api, bind = start_server(lab, "api", PORT, mode="host")
        rules_after = sorted(rule_counters(lab.host.netns))
        pubs_after = sorted(lab.firewall.publications)
        holders = sorted({f"{s.process or '?'} (pid {s.pid})" if s.pid else "another process"
                          for s in View.gather("host", {"net": lab.host.netns},
                                               pid=api.pid if api.running else None).listening()
                          if s.local.endswith(f":{PORT}")})
        reach = connect_from(lab.host.outside, str(lab.host.address), PORT)
        child_net, host_net = proc_netns(api), list(lab.host.netns.identity)

    new_rules = [r for r in rules_after if r not in rules_before]
    checks = Checks()
    checks.add("no new firewall rule", not new_rules, f"{len(rules_before)} rules before, {len(rules_after)} after")
    checks.add("no publication", pubs_after == pubs_before, f"publications: {pubs_after}")
    checks.add("the server itself holds the port", len(holders) == 1 and f"pid {api.pid}" in holders[0],
               ", ".join(holders) or "nobody")
    checks.add("reached on its own port", reach["ok"] and reach.get("banner", "").startswith("api"),
               reach.get("banner") or reach.get("error", ""))
    evidence = {"host": {"netns": host_net, "address": str(lab.host.address)},
                "child": {"pid": api.pid, "netns": child_net, "bind": bind},
                "rules_before": len(rules_before), "rules_after": len(rules_after), "new_rules": new_rules,
                "publications": pubs_after, "port_holders": holders, "outside_client": reach,
                "checks": checks.to_list()}
    explanation = (
        f"A host-mode server was started on port {PORT} with no -p at all (its bind: {'succeeded' if bind == 'bound' else bind}). The lab's firewall had "
        f"{len(rules_before)} rules before and {len(rules_after)} after"
        f"{', none new' if not new_rules else ', new: ' + ', '.join(new_rules)}, and no port was published. In the "
        f"host's socket table port {PORT} is held by {', '.join(holders) or 'nobody'}"
        f"{' — the server itself, no proxy in between' if checks.items[2]['ok'] else ''}. "
        f"From the outside network, {lab.host.address}:{PORT} "
        + (f"answered with the server's banner ({reach['banner']})" if reach["ok"] else f"failed: {reach.get('error')}")
        + f". The child is in {label(child_net)}, the host in {label(host_net)}.")
    key = (f"{len(new_rules)} new rules, {len(pubs_after) - len(pubs_before)} new publications; outside→:{PORT} "
           f"{'answered by the server' if reach['ok'] else reach.get('error')}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

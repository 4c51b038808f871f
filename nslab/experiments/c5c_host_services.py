"""C5c — host mode gives easier access to host services (Step 5).

Measured by the children themselves (``lab.run``): a service listens on the host's
127.0.0.1 only — the usual way to keep a database or an admin port private to the host.
A host-mode child and a bridge-mode child each try to connect to 127.0.0.1 on that port
and report what happened, and which network namespace they were in when they tried.
"""
from __future__ import annotations

import secrets
import time

from ._base import Checks, label
from ._inside import reach
from ._net import Service

ID = "C5c"
CLAIM = "Host mode gives easier access to host services"
SABOTAGE = "host-in-own-netns"


def run(ctx):
    started = time.monotonic()
    banner = f"host-only service {secrets.token_hex(3)}"
    with ctx.lab() as lab:
        host_net = list(lab.host.netns.identity)
        with Service(lab.host.netns, "tcp", ("127.0.0.1", 0), banner) as svc:
            target = [("tcp", "127.0.0.1", svc.port)]
            from_host = lab.run(reach, target, mode="host")
            from_bridge = lab.run(reach, target, mode="bridge")
            served = svc.accepted
    h, b = from_host["results"][0], from_bridge["results"][0]
    checks = Checks()
    checks.add("host-mode child reaches it", h["ok"] and h.get("banner") == banner,
               h.get("banner") or h.get("error", ""))
    checks.add("bridge child does not", not b["ok"] and b.get("error") == "ECONNREFUSED",
               b.get("error") or b.get("banner", ""))
    evidence = {"service": f"127.0.0.1:{target[0][2]} in the host netns", "host": {"netns": host_net},
                "host_child": {"pid": from_host["me"]["pid"], "netns": from_host["me"]["ns"]["net"], "result": h},
                "bridge_child": {"pid": from_bridge["me"]["pid"], "netns": from_bridge["me"]["ns"]["net"], "result": b},
                "connections_served": served, "checks": checks.to_list()}
    explanation = (
        f"A service listened on 127.0.0.1:{target[0][2]} in the host's namespace ({label(host_net)}), reachable "
        f"only from that namespace. The host-mode child, running in {label(from_host['me']['ns']['net'])}, "
        + ("connected and read the service's banner" if h["ok"] else f"got {h.get('error')}")
        + f"; the bridge child, in {label(from_bridge['me']['ns']['net'])}, "
        + (f"got {b.get('error')}: its 127.0.0.1 is its own loopback, where nothing listens"
           if not b["ok"] else "connected too")
        + f". The service counted {served} connection(s). Host mode makes host-local services one connect() away — "
        f"convenient, and exactly why it is less isolated (M4).")
    key = f"127.0.0.1 service: host child {'reached' if h['ok'] else h.get('error')}, bridge child {b.get('error') or 'reached'}"
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

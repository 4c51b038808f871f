"""M1 — the myth "host mode still isolates container networks" is false (Myth Busters).

The seed's answer: host mode removes network isolation. The evidence is C3, C4 and C5c
taken together, gathered here by one host-mode child about itself: the netns it is in
(against the host's), the interfaces it lists (against the host's), and whether it can
connect to a service the host keeps on 127.0.0.1. Each is a way isolation would show; if
any of them showed, the myth would be true and this verdict would say so.
"""
from __future__ import annotations

import time

from ._base import Checks, label, sentence_list
from ._inside import reach
from ._net import Service, interfaces

ID = "M1"
CLAIM = "Myth: host mode still isolates container networks — false: host mode removes network isolation"
SABOTAGE = "host-in-own-netns"


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        host_net = list(lab.host.netns.identity)
        host_ifaces = [[i["index"], i["name"]] for i in interfaces(lab.host.netns)]
        with Service(lab.host.netns, "tcp", ("127.0.0.1", 0), "host-private service") as svc:
            seen = lab.run(reach, [("tcp", "127.0.0.1", svc.port)], mode="host")
    me, got = seen["me"], seen["results"][0]
    checks = Checks()
    checks.add("shares the host's netns", me["ns"]["net"] == host_net,
               f"child {label(me['ns']['net'])}, host {label(host_net)}")
    checks.add("sees the host's interfaces", me["interfaces"] == host_ifaces,
               f"{[n for _, n in me['interfaces']]} vs {[n for _, n in host_ifaces]}")
    checks.add("reaches the host's 127.0.0.1 services", got["ok"], got.get("banner") or got.get("error", ""))
    evidence = {"host": {"netns": host_net, "interfaces": host_ifaces},
                "child": {"pid": me["pid"], "netns": me["ns"]["net"], "interfaces": me["interfaces"]},
                "host_private_service": got, "checks": checks.to_list(), "see_also": ["C3", "C4", "C5c"]}
    isolated = [c["check"] for c in checks.items if not c["ok"]]
    explanation = (
        f"If host mode isolated the container, at least one wall would show. The host-mode child reports being in "
        f"{label(me['ns']['net'])} (the host: {label(host_net)}), lists {sentence_list([n for _, n in me['interfaces']])} "
        f"as its interfaces (the host's: {sentence_list([n for _, n in host_ifaces])}), and "
        + (f"connected to a service the host keeps on 127.0.0.1 ({got['banner']})" if got["ok"]
           else f"could not connect to the host's 127.0.0.1 service ({got.get('error')})")
        + (". No wall: the myth is false — host mode removes network isolation, as the seed says."
           if not isolated else f". Walls found ({', '.join(isolated)} failed): in this setup the child was isolated."))
    key = (f"child {label(me['ns']['net'])} {'=' if me['ns']['net'] == host_net else '≠'} host; "
           f"{'same' if me['interfaces'] == host_ifaces else 'different'} interfaces; host 127.0.0.1 "
           f"{'reached' if got['ok'] else got.get('error')}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

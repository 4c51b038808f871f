"""C4 — ``--network host`` shows the host's interfaces inside the container (Step 4).

Measured: the interface list a host-mode child sees from inside — the child itself calls
``if_nameindex()`` (what ``ip link`` lists) and reports it — against the host's list read
over rtnetlink in the host's netns. A bridge child is started first, so the host has a
bridge and a veth besides its uplink: the host-mode child must see those too.
"""
from __future__ import annotations

import time

from ._base import Checks, label, sentence_list
from ._inside import whoami
from ._net import interfaces

ID = "C4"
CLAIM = "--network host shows the host's interfaces inside the container"
SABOTAGE = "host-in-own-netns"


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        lab.spawn(["sleep", "60"], name="neighbour")          # gives the host a bridge and a veth
        host_net = list(lab.host.netns.identity)
        inside = lab.run(whoami, mode="host")
        host_list = [[i["index"], i["name"]] for i in interfaces(lab.host.netns)]
    seen = inside["interfaces"]
    missing = [n for i, n in host_list if [i, n] not in seen]
    extra = [n for i, n in seen if [i, n] not in host_list]
    checks = Checks()
    checks.add("same netns as the host", inside["ns"]["net"] == host_net,
               f"child {label(inside['ns']['net'])}, host {label(host_net)}")
    checks.add("same interface list", seen == host_list,
               f"inside {[n for _, n in seen]}, host {[n for _, n in host_list]}")
    evidence = {"host": {"netns": host_net, "interfaces": host_list},
                "child": {"pid": inside["pid"], "netns": inside["ns"]["net"], "interfaces": seen},
                "missing_inside": missing, "extra_inside": extra, "checks": checks.to_list()}
    names = [n for _, n in seen]
    explanation = (
        f"The host-mode child (pid {inside['pid']}, in {label(inside['ns']['net'])}) listed its interfaces "
        f"itself: {sentence_list(names)}. The host, read over rtnetlink in {label(host_net)}, has "
        f"{sentence_list([n for _, n in host_list])}. "
        + ("The two lists are identical, index for index — including the bridge and the veth of another "
           "container, which a host-mode container can see and touch."
           if seen == host_list else
           f"They differ: missing inside {sentence_list(missing)}; only inside {sentence_list(extra)}."))
    key = f"inside: {','.join(names)}; " + ("= host's list" if seen == host_list else f"host: {','.join(n for _, n in host_list)}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

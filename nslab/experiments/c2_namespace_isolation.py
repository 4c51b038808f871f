"""C2 — network namespaces isolate interfaces, addresses, routing tables and ports (Step 2).

Measured: two children on two different bridge networks. Their netns identities, their
interfaces (by MAC: two ``eth0`` are still two devices), their addresses and routing
tables, each read from the kernel through ``/proc/PID``; and a server in each binding the
very same port, 7000, where the second bind is the test: in one namespace it would fail
with EADDRINUSE.
"""
from __future__ import annotations

import time

from ..evidence import View
from ._base import Checks, label, proc_netns, sentence_list, view_of
from ._programs import start_server

ID = "C2"
CLAIM = "Network namespaces isolate interfaces, addresses, routing tables and ports"
SABOTAGE = "bridge-shares-host"
PORT = 7000


def _facts(view: View) -> dict:
    return {"interfaces": [f"{i.name} {i.mac}" for i in view.interfaces],
            "addresses": sorted(a.address for a in view.addresses if a.family == "inet" and a.iface != "lo"),
            "routes": [r.item() for r in view.routes if r.family == "inet"]}


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        lab.network()                                           # the default bridge first,
        lab.network("other")                                    # then a second bridge network
        a, a_bind = start_server(lab, "a", PORT, mode="bridge")
        b, b_bind = start_server(lab, "b", PORT, mode="other")
        va, vb = view_of(lab, a), view_of(lab, b)
        fa, fb = _facts(va), _facts(vb)
        net_a, net_b = proc_netns(a), proc_netns(b)
        # Loopback is "00:00:00:00:00:00" everywhere: compare the other devices by MAC.
        devs_a = {i for i in fa["interfaces"] if not i.startswith("lo ")}
        devs_b = {i for i in fb["interfaces"] if not i.startswith("lo ")}
        shared_devs = sorted(devs_a & devs_b)
        shared_addrs = sorted(set(fa["addresses"]) & set(fb["addresses"]))

        checks = Checks()
        checks.add("separate netns", net_a != net_b, f"a {label(net_a)}, b {label(net_b)}")
        checks.add("disjoint interfaces", not shared_devs and bool(devs_a) and bool(devs_b),
                   f"a: {sorted(devs_a)}, b: {sorted(devs_b)}")
        checks.add("different addresses", not shared_addrs, f"shared: {shared_addrs}")
        checks.add("different routing tables", fa["routes"] != fb["routes"],
                   f"a: {fa['routes']}, b: {fb['routes']}")
        checks.add(f"both bind port {PORT}", a_bind == "bound" and b_bind == "bound", f"a {a_bind}, b {b_bind}")
        evidence = {"a": {"pid": a.pid, "netns": net_a, "network": "bridge", "bind": a_bind, **fa},
                    "b": {"pid": b.pid, "netns": net_b, "network": "other", "bind": b_bind, **fb},
                    "port": PORT, "checks": checks.to_list()}
    explanation = (
        f"Two children were started on two bridge networks. Child a is in {label(net_a)}, child b in "
        f"{label(net_b)}{' — the same namespace' if net_a == net_b else ''}. "
        f"Apart from lo, a has {sentence_list(sorted(devs_a))} and b has {sentence_list(sorted(devs_b))}"
        f"{': no device in common' if not shared_devs else ': shared ' + sentence_list(shared_devs)}. "
        f"Their IPv4 addresses are {sentence_list(fa['addresses'])} and {sentence_list(fb['addresses'])}, and "
        f"their routing tables {'differ' if fa['routes'] != fb['routes'] else 'are identical'} "
        f"(first route of a: {fa['routes'][0] if fa['routes'] else 'none'}; of b: "
        f"{fb['routes'][0] if fb['routes'] else 'none'}). "
        f"Each then bound TCP port {PORT}: a {'could' if a_bind == 'bound' else 'could not (' + a_bind + ')'}, "
        f"b {'could too' if b_bind == 'bound' else 'could not (' + b_bind + ')'}"
        f"{' — one port number, two independent port spaces' if a_bind == b_bind == 'bound' else ''}.")
    key = (f"{label(net_a)} vs {label(net_b)}; {len(shared_devs)} shared devices; "
           f"routes {'differ' if fa['routes'] != fb['routes'] else 'equal'}; :{PORT} twice: {a_bind}/{b_bind}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

"""C1 — by default a container gets its own network namespace, its own IP and interfaces, and
reaches other containers and the host through a virtual bridge (seed, Step 1).

Measured: a bridge-mode child's netns (``/proc/PID/ns/net``) against the host's; the
interfaces and addresses it sees; a TCP connection from inside it to a service on the
bridge's gateway address (the host) and to a second bridge child; and, on the host side,
the veth enslaved to the bridge.
"""
from __future__ import annotations

import time

from ..evidence import View
from ..namespaces import Namespace
from ._base import Checks, label, proc_netns, sentence_list
from ._net import Service, connect_from, interfaces
from ._programs import start_server

ID = "C1"
CLAIM = ("By default a container gets its own network namespace, IP and interfaces, and reaches "
         "other containers and the host through a virtual bridge")
SABOTAGE = "bridge-shares-host"


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        net = lab.network()                      # the default bridge (Docker: docker0)
        host_net = list(lab.host.netns.identity)
        child = lab.spawn(["sleep", "60"], name="child")
        sibling, sibling_status = start_server(lab, "sibling", 7000, mode="bridge")
        view = View.gather("child", {}, pid=child.pid)
        child_net = proc_netns(child)
        seen = [i.name for i in view.interfaces]
        addrs = [a.address for a in view.addresses if a.family == "inet" and a.iface != "lo"]
        host_addrs = [a.address.split("/")[0] for a in lab.view("host").addresses if a.family == "inet"]
        with Service(lab.host.netns, "tcp", (str(net.gateway), 0), "host service on the gateway") as svc, \
                Namespace.of_pid(child.pid, "net") as inside:
            to_gateway = connect_from(inside, str(net.gateway), svc.port)
            to_sibling = (connect_from(inside, str(sibling.address), 7000) if sibling.address
                          else {"ok": False, "error": "the sibling has no address of its own"})
        host_ifaces = interfaces(lab.host.netns)
        veth = child.endpoint.host_ifname if child.endpoint else None
        veth_entry = next((i for i in host_ifaces if i["name"] == veth), None)

        checks = Checks()
        checks.add("own netns", child_net != host_net, f"child {label(child_net)}, host {label(host_net)}")
        checks.add("sees only lo and eth0", sorted(seen) == ["eth0", "lo"], ", ".join(seen))
        own = [a for a in addrs if a.split("/")[0] not in host_addrs]
        checks.add("own address", bool(own), ", ".join(addrs) or "no IPv4 address but lo")
        checks.add("reaches the host via the gateway", to_gateway["ok"],
                   to_gateway.get("banner") or to_gateway.get("error", ""))
        checks.add("reaches a second bridge child", to_sibling["ok"] and
                   to_sibling.get("banner", "").startswith("sibling"),
                   to_sibling.get("banner") or to_sibling.get("error", ""))
        checks.add("host side veth on the bridge", bool(veth_entry) and veth_entry["master"] == net.bridge,
                   f"{veth} master {veth_entry['master'] if veth_entry else None}")
        evidence = {
            "host": {"netns": host_net, "addresses": host_addrs},
            "child": {"pid": child.pid, "netns": child_net, "interfaces": seen, "addresses": addrs},
            "sibling": {"pid": sibling.pid, "netns": proc_netns(sibling), "bind": sibling_status,
                        "address": str(sibling.address) if sibling.address else None},
            "bridge": net.bridge, "gateway": str(net.gateway), "subnet": str(net.subnet),
            "host_veth": veth_entry,
            "reach": {"gateway": to_gateway, "sibling": to_sibling},
            "checks": checks.to_list(),
        }
    same = child_net == host_net
    explanation = (
        f"The bridge-mode child (pid {evidence['child']['pid']}) runs in {label(child_net)} and the host in "
        f"{label(host_net)}: {'the same namespace, so nothing is isolated' if same else 'two different namespaces'}. "
        f"From inside, the child lists {sentence_list(seen)} as its interfaces and has "
        f"{sentence_list(addrs) if addrs else 'no address of its own'}"
        f"{' — an address the host does not have' if own else ''}. "
        f"A TCP connection from inside it to the bridge's gateway {net.gateway} (the host) "
        f"{'succeeded' if to_gateway['ok'] else 'failed with ' + to_gateway.get('error', '?')}, and one to the "
        f"second bridge child {'succeeded' if to_sibling['ok'] else 'failed: ' + to_sibling.get('error', '?')}. "
        f"On the host, {('the veth ' + veth + ' is enslaved to ' + str(veth_entry['master'])) if veth_entry else 'no veth of the child'}"
        f"{' — the virtual bridge that carries both paths' if veth_entry else ''}.")
    key = (f"child {label(child_net)} vs host {label(host_net)}; sees {','.join(seen)}; "
           f"{', '.join(own) or 'no own address'}; gateway {'ok' if to_gateway['ok'] else 'x'}, "
           f"sibling {'ok' if to_sibling['ok'] else 'x'}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

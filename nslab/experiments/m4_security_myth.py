"""M4 — the myth "host mode improves security" is false (Myth Busters).

Measured by the children themselves (``lab.run``), from a host-mode child and from a
bridge child, against three services the host keeps to itself:

* TCP on 127.0.0.1 (a database, an admin API);
* an **abstract** UNIX socket (``@name``): the abstract namespace belongs to the network
  namespace, so a host-mode container shares the host's. containerd-shim listened on one,
  and any host-network container could connect and take over the host: CVE-2020-15257;
* a path-based UNIX socket, as a contrast: its reach is decided by the filesystem (mount
  namespace and permissions), not by the network mode.
"""
from __future__ import annotations

import os
import secrets
import time

from ._base import Checks, label
from ._inside import reach
from ._net import Service

ID = "M4"
CLAIM = ("Myth: host mode improves security — false: a host-mode container reaches host-only services "
         "(127.0.0.1 listeners, abstract UNIX sockets: the CVE-2020-15257 class)")
SABOTAGE = "host-in-own-netns"


def run(ctx):
    started = time.monotonic()
    tag = secrets.token_hex(4)
    with ctx.lab() as lab:
        host_net = list(lab.host.netns.identity)
        path = os.path.join(lab.host.state_dir, f"m4-{tag}.sock")
        with Service(lab.host.netns, "tcp", ("127.0.0.1", 0), "host tcp") as tcp, \
                Service(lab.host.netns, "unix", f"@nslab-m4-{tag}", "host abstract") as abstract, \
                Service(lab.host.netns, "unix", path, "host path socket"):
            targets = [("tcp", "127.0.0.1", tcp.port), ("unix", abstract.where), ("unix", path)]
            seen = {mode: lab.run(reach, targets, mode=mode) for mode in ("host", "bridge")}
    res = {mode: {r["target"].split(" ", 1)[0] + (" abstract" if "@" in r["target"] else
                                                   " path" if r["target"].startswith("unix") else ""): r
                  for r in out["results"]} for mode, out in seen.items()}
    h, b = res["host"], res["bridge"]
    checks = Checks()
    checks.add("host-mode child reaches 127.0.0.1", h["tcp"]["ok"], h["tcp"].get("banner") or h["tcp"].get("error"))
    checks.add("host-mode child reaches the abstract socket", h["unix abstract"]["ok"],
               h["unix abstract"].get("banner") or h["unix abstract"].get("error"))
    checks.add("bridge child cannot reach 127.0.0.1", b["tcp"].get("error") == "ECONNREFUSED",
               b["tcp"].get("error") or "reached")
    checks.add("bridge child cannot reach the abstract socket", b["unix abstract"].get("error") == "ECONNREFUSED",
               b["unix abstract"].get("error") or "reached")
    nuance_text = None
    if checks.ok and b["unix path"]["ok"]:
        nuance_text = ("the path-based UNIX socket was reachable from the bridge child too: network isolation does "
                       "not cover it, the filesystem does (Docker gives each container its own root filesystem)")
    evidence = {"host": {"netns": host_net},
                "services": {"tcp": f"127.0.0.1:{targets[0][2]}", "abstract": targets[1][1], "path": path},
                "host_child": {"pid": seen["host"]["me"]["pid"], "netns": seen["host"]["me"]["ns"]["net"],
                               "results": list(h.values())},
                "bridge_child": {"pid": seen["bridge"]["me"]["pid"], "netns": seen["bridge"]["me"]["ns"]["net"],
                                 "results": list(b.values())},
                "checks": checks.to_list()}

    def said(r):
        return "connected" if r["ok"] else r["error"]
    explanation = (
        f"The host kept three services to itself: TCP on 127.0.0.1, the abstract UNIX socket {targets[1][1]} and a "
        f"UNIX socket at a path. The host-mode child ({label(seen['host']['me']['ns']['net'])}, the host being "
        f"{label(host_net)}) got: 127.0.0.1 {said(h['tcp'])}, abstract {said(h['unix abstract'])}, path "
        f"{said(h['unix path'])}. The bridge child ({label(seen['bridge']['me']['ns']['net'])}) got: 127.0.0.1 "
        f"{said(b['tcp'])}, abstract {said(b['unix abstract'])}, path {said(b['unix path'])}. "
        + ("A host-mode container is one connect() away from everything the host exposes only to itself — the "
           "abstract socket case is exactly how CVE-2020-15257 let host-network containers take over containerd-shim. "
           if checks.ok else "")
        + ("The path socket shows where network isolation ends: it was reachable from both, because these children "
           "share the host's filesystem." if b["unix path"]["ok"] else ""))
    key = (f"host child: tcp {said(h['tcp'])}, @abstract {said(h['unix abstract'])}; bridge child: tcp "
           f"{said(b['tcp'])}, @abstract {said(b['unix abstract'])}")
    return ctx.result(ID, CLAIM, checks.verdict(nuance_text), evidence, explanation, key, started)

"""C6 — two host-mode containers cannot listen on the same port; default networking avoids
the conflict with port mapping (Step 6).

Measured, three ways: two host-mode servers both binding port 8002 (the second bind's
errno is the evidence); two bridge-mode servers both binding port 80 (each in its own
namespace); and two bridge children both published on host port 8080 (``-p 8080:80``
twice), where the second publish must be refused with Docker's error ("port is already
allocated") — a check like the others: a lab that accepted the duplicate fails it. It is
also the known nuance: port mapping moves the conflict to the host port, it does not remove it.
"""
from __future__ import annotations

import time

from ..errors import NslabError, PortAllocatedError
from ._base import Checks, errname, label, proc_netns
from ._net import connect_from
from ._programs import start_server

ID = "C6"
CLAIM = ("Two host-mode containers cannot listen on the same port; default networking avoids the conflict "
         "with port mapping")
SABOTAGE = "host-in-own-netns"          # "publish-nothing" flips it too
HOST_PORT = 8002


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        h1, h1_bind = start_server(lab, "host-1", HOST_PORT, mode="host")
        h2, h2_bind = start_server(lab, "host-2", HOST_PORT, mode="host")
        b1, b1_bind = start_server(lab, "bridge-1", 80, mode="bridge", publish=["8080:80"])
        b2, b2_bind = start_server(lab, "bridge-2", 80, mode="bridge")
        try:
            p2 = lab.spawn(["sleep", "60"], name="bridge-3", publish=["8080:80"])
            second_publish = {"refused": False, "published": [str(m) for m in p2.published]}
        except PortAllocatedError as exc:
            second_publish = {"refused": True, "error": exc.strerror, "errno": errname(exc),
                              "hint": exc.hint, "holder": exc.holder}
        except NslabError as exc:
            second_publish = {"refused": True, "error": exc.strerror, "errno": errname(exc), "unclear": True}
        via_mapping = connect_from(lab.host.outside, str(lab.host.address), 8080)
        nets = {c.name: proc_netns(c) for c in (h1, h2, b1, b2)}
        first_publish = [str(m) for m in b1.published]

    checks = Checks()
    checks.add("second host-mode bind fails with EADDRINUSE", h1_bind == "bound" and h2_bind == "EADDRINUSE",
               f"first {h1_bind}, second {h2_bind}")
    checks.add("two bridge children bind port 80", b1_bind == b2_bind == "bound", f"{b1_bind}, {b2_bind}")
    checks.add("the mapping 8080:80 reaches the first", via_mapping["ok"] and
               via_mapping.get("banner", "").startswith("bridge-1"),
               f"published {first_publish}; outside→:8080 {via_mapping.get('banner') or via_mapping.get('error')}")
    refused_clearly = second_publish["refused"] and "port is already allocated" in second_publish.get("error", "")
    checks.add("a second publish of host port 8080 is refused with a clear error", refused_clearly,
               (f"refused: {second_publish['error']}" if second_publish["refused"] else
                f"accepted: {', '.join(second_publish['published']) or 'nothing published'}"))
    evidence = {"host_mode": {"port": HOST_PORT, "first": {"pid": h1.pid, "netns": nets["host-1"], "bind": h1_bind},
                              "second": {"pid": h2.pid, "netns": nets["host-2"], "bind": h2_bind}},
                "bridge_mode": {"port": 80, "first": {"pid": b1.pid, "netns": nets["bridge-1"], "bind": b1_bind,
                                                      "published": first_publish},
                                "second": {"pid": b2.pid, "netns": nets["bridge-2"], "bind": b2_bind}},
                "outside_to_8080": via_mapping, "same_host_port_twice": second_publish,
                "checks": checks.to_list()}
    nuance_text = None
    if checks.ok:
        nuance_text = (f"mapping avoids it only while host ports differ: publishing host port 8080 a second "
                       f"time was refused: \"{second_publish['error']}\"")
    verdict = checks.verdict(nuance_text)
    explanation = (
        f"Two host-mode servers bound port {HOST_PORT}: the first {'succeeded' if h1_bind == 'bound' else 'got ' + h1_bind}, "
        f"the second {'got EADDRINUSE — they share one port space, the host’s' if h2_bind == 'EADDRINUSE' else 'got ' + h2_bind}"
        f" (namespaces {label(nets['host-1'])} and {label(nets['host-2'])}). Two bridge servers then both bound port 80: "
        f"{b1_bind} and {b2_bind}, in {label(nets['bridge-1'])} and {label(nets['bridge-2'])}. The first was published as "
        f"{', '.join(first_publish) or 'nothing'}, and the outside reached "
        f"{(via_mapping['banner'] or '(no banner)').split()[0] if via_mapping['ok'] else 'nothing (' + via_mapping.get('error', '') + ')'} "
        f"at host port 8080; publishing host port 8080 again for a third child was "
        + (f"refused with \"{second_publish['error']}\" ({second_publish.get('hint')})" if second_publish["refused"]
           else "accepted (published: " + (", ".join(second_publish["published"]) or "nothing") + ")")
        + (". So port mapping lets containers share a container port, but each host port can still be mapped once."
           if refused_clearly and b1_bind == b2_bind == "bound" else
           ". So this run did not show both halves: containers sharing a container port, and each host port "
           "mapped at most once."))
    key = (f"host :{HOST_PORT} twice: {h1_bind}/{h2_bind}; bridge :80 twice: {b1_bind}/{b2_bind}; "
           f"-p 8080 twice: {'refused' if second_publish['refused'] else 'accepted'}")
    return ctx.result(ID, CLAIM, verdict, evidence, explanation, key, started)

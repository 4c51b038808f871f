"""X2 — host-mode containers can still have process and filesystem isolation (Expert zone).

Measured by the child itself (``lab.run``): a host-mode child started, as Docker starts
every container, in new PID, mount and UTS namespaces with its own hostname. It reports its
own pid (1: the init of its PID namespace), hostname and namespace identities; they are
compared with the controller's own PID, mount and UTS namespaces and hostname, and with the
host's network namespace — the one namespace it must *share*.
"""
from __future__ import annotations

import os
import socket
import time

from ._base import Checks, label, proc_ns
from ._inside import whoami

ID = "X2"
CLAIM = "Host-mode containers can still have process and filesystem isolation"
SABOTAGE = "host-in-own-netns"
HOSTNAME = "x2-container"


def run(ctx):
    started = time.monotonic()
    me = os.getpid()
    ours = {k: proc_ns(me, k) for k in ("pid", "mnt", "uts")}
    our_hostname = socket.gethostname()
    with ctx.lab() as lab:
        host_net = list(lab.host.netns.identity)
        inside = lab.run(whoami, mode="host", new=("pid", "mnt", "uts"), hostname=HOSTNAME)
    ns = inside["ns"]
    checks = Checks()
    checks.add("PID 1 inside", inside["pid"] == 1, f"getpid() = {inside['pid']}")
    checks.add("own PID namespace", ns["pid"] != ours["pid"], f"{label(ns['pid'], 'pid')} vs {label(ours['pid'], 'pid')}")
    checks.add("own mount namespace", ns["mnt"] != ours["mnt"], f"{label(ns['mnt'], 'mnt')} vs {label(ours['mnt'], 'mnt')}")
    checks.add("own hostname", inside["hostname"] == HOSTNAME and ns["uts"] != ours["uts"],
               f"{inside['hostname']!r} in {label(ns['uts'], 'uts')}, host {our_hostname!r}")
    checks.add("same netns as the host", ns["net"] == host_net, f"{label(ns['net'])} vs host {label(host_net)}")
    evidence = {"child": {"pid_inside": inside["pid"], "hostname": inside["hostname"], "ns": ns,
                          "interfaces": inside["interfaces"]},
                "controller": {"pid": me, "hostname": our_hostname, "ns": ours},
                "host": {"netns": host_net}, "checks": checks.to_list()}
    explanation = (
        f"The host-mode child was started with new PID, mount and UTS namespaces. Asked from inside, it is pid "
        f"{inside['pid']}{' — the init of its own PID namespace, which sees no other process' if inside['pid'] == 1 else ''}, "
        f"in {label(ns['pid'], 'pid')} (the controller: {label(ours['pid'], 'pid')}), with mount namespace "
        f"{label(ns['mnt'], 'mnt')} (controller: {label(ours['mnt'], 'mnt')}) and hostname {inside['hostname']!r} "
        f"(the host's stays {our_hostname!r}). Its network namespace is {label(ns['net'])}; the host's is "
        f"{label(host_net)}"
        + (": shared. Network isolation is one namespace kind among eight; host mode gives up only that one."
           if ns["net"] == host_net else ": not the host's — this child is not in host mode at all."))
    key = (f"pid {inside['pid']} inside, hostname {inside['hostname']!r}; own pid/mnt/uts ns; net "
           f"{'=' if ns['net'] == host_net else '≠'} host")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

"""X2 — host-mode containers can still have process and filesystem isolation (Expert zone).

Measured by the child itself (``lab.run``): a host-mode child started, as Docker starts
every container, in new PID, mount and UTS namespaces with its own hostname. It reports its
own pid (1: the init of its PID namespace), hostname and namespace identities; they are
compared with the controller's own PID, mount and UTS namespaces and hostname, and with the
host's network namespace — the one namespace it must *share*.

A new mount namespace alone is not filesystem isolation: it starts as a copy of the host's
mounts. Docker adds an image and switches the root into it (``pivot_root``); nslab has no
image, so its child keeps the host's files. The experiment measures that too: the controller
writes a file of its own, and the child reports whether it can read it.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time

from ._base import Checks, label, proc_ns
from ._inside import whoami_and_read

ID = "X2"
CLAIM = "Host-mode containers can still have process and filesystem isolation"
SABOTAGE = "host-in-own-netns"
HOSTNAME = "x2-container"


def run(ctx):
    started = time.monotonic()
    me = os.getpid()
    ours = {k: proc_ns(me, k) for k in ("pid", "mnt", "uts")}
    our_hostname = socket.gethostname()
    marker_dir = tempfile.mkdtemp(prefix="nslab-x2-")
    marker = os.path.join(marker_dir, "host-file")
    token = secrets.token_hex(8)
    try:
        with open(marker, "w", encoding="utf-8") as f:
            f.write(token)
        with ctx.lab() as lab:
            host_net = list(lab.host.netns.identity)
            inside = lab.run(whoami_and_read, marker, mode="host", new=("pid", "mnt", "uts"), hostname=HOSTNAME)
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)
    ns = inside["ns"]
    seen = inside["file"]
    host_files = seen["exists"] and seen.get("content") == token
    checks = Checks()
    checks.add("PID 1 inside", inside["pid"] == 1, f"getpid() = {inside['pid']}")
    checks.add("own PID namespace", ns["pid"] != ours["pid"], f"{label(ns['pid'], 'pid')} vs {label(ours['pid'], 'pid')}")
    checks.add("own mount namespace", ns["mnt"] != ours["mnt"],
               f"{label(ns['mnt'], 'mnt')} vs {label(ours['mnt'], 'mnt')}; the host's file {marker} "
               + ("read, same content: no root switch" if host_files else
                  f"not readable ({seen.get('error') or 'other content'})"))
    checks.add("own hostname", inside["hostname"] == HOSTNAME and ns["uts"] != ours["uts"],
               f"{inside['hostname']!r} in {label(ns['uts'], 'uts')}, host {our_hostname!r}")
    checks.add("same netns as the host", ns["net"] == host_net, f"{label(ns['net'])} vs host {label(host_net)}")
    evidence = {"child": {"pid_inside": inside["pid"], "hostname": inside["hostname"], "ns": ns,
                          "interfaces": inside["interfaces"], "host_file": seen, "reads_host_files": host_files},
                "controller": {"pid": me, "hostname": our_hostname, "ns": ours},
                "host": {"netns": host_net}, "checks": checks.to_list()}
    explanation = (
        f"The host-mode child was started with new PID, mount and UTS namespaces. Asked from inside, it is pid "
        f"{inside['pid']}{' — the init of its own PID namespace, which sees no other process' if inside['pid'] == 1 else ''}, "
        f"in {label(ns['pid'], 'pid')} (the controller: {label(ours['pid'], 'pid')}), with mount namespace "
        f"{label(ns['mnt'], 'mnt')} (controller: {label(ours['mnt'], 'mnt')}) and hostname {inside['hostname']!r} "
        f"(the host's stays {our_hostname!r}). "
        + (f"Its mount namespace is its own, but with no root switch: it read the file the controller had just "
           f"written at {marker} — the files are the host's, only the mount table is separate. (Background, not "
           f"measured: Docker switches the root into the container's image; nslab has no image.) "
           if host_files else
           f"The file the controller had just written at {marker} was not visible to it "
           f"({seen.get('error') or 'different content'}). ")
        + f"Its network namespace is {label(ns['net'])}; the host's is {label(host_net)}"
        + (": shared. Network isolation is one namespace kind among eight; host mode gives up only that one."
           if ns["net"] == host_net else ": not the host's — this child is not in host mode at all."))
    key = (f"pid {inside['pid']} inside, hostname {inside['hostname']!r}; own pid/mnt/uts ns"
           f"{' (host files visible: no root switch)' if host_files else ''}; net "
           f"{'=' if ns['net'] == host_net else '≠'} host")
    nuance_text = ("its own mount namespace, but no root switch: the child read a file the host had just written, "
                   "so the files are the host's (nslab has no image to pivot into)") if host_files else None
    return ctx.result(ID, CLAIM, checks.verdict(nuance_text), evidence, explanation, key, started)

"""M3 — the myth "port mapping is still needed in host mode" is false (Myth Busters).

Measured: a host-mode server on port 80 started *with* ``-p 8080:80``, as the myth would
have it. What Docker does, nslab must do: start it, discard the ports, and warn with
Docker's exact words (``Published ports are discarded when using host network mode``).
Evidence: the warning the spawn emitted, the mappings the lab kept, the firewall rules
read back from the kernel, and a client in the outside network trying the service on its
own port (80) and on the "mapped" one (8080). Also shown: nslab's strict option, which turns
the warning into an error (what moby#40608 asked Docker for).
"""
from __future__ import annotations

import time

from ..errors import InputError, NslabError
from ..publish import HOST_MODE_WARNING
from ._base import Checks, label, proc_netns
from ._net import connect_from, rule_counters
from ._programs import start_server

ID = "M3"
CLAIM = ("Myth: port mapping is still needed in host mode — false: the host's ports are used directly, "
         "mappings are discarded")
SABOTAGE = "host-on-bridge"


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        lab.spawn(["sleep", "60"], name="bystander")              # the lab's firewall exists
        rules_before = sorted(rule_counters(lab.host.netns))
        web, bind = start_server(lab, "web", 80, mode="host", publish=["8080:80"])
        rules_after = sorted(rule_counters(lab.host.netns))
        publication = lab.firewall.publication("web")
        own = connect_from(lab.host.outside, str(lab.host.address), 80)
        mapped = connect_from(lab.host.outside, str(lab.host.address), 8080)
        try:
            lab.spawn(["sleep", "60"], name="strict", mode="host", publish=["8080:80"], strict_publish=True)
            strict = {"refused": False}
        except InputError as exc:
            strict = {"refused": True, "error": exc.strerror}
        except NslabError as exc:
            strict = {"refused": True, "error": exc.strerror}
        web_net, host_net = proc_netns(web), list(lab.host.netns.identity)
        warned = list(web.warnings)
        emitted = list(getattr(web, "emitted_warnings", []))
        published = [str(m) for m in web.published]

    new_rules = [r for r in rules_after if r not in rules_before]
    checks = Checks()
    checks.add("Docker's exact warning", warned == [HOST_MODE_WARNING] and HOST_MODE_WARNING in emitted,
               f"lab: {warned}; emitted: {emitted}")
    checks.add("the mapping was discarded", not published and publication is None and not new_rules,
               f"published {published}, {len(new_rules)} new rules")
    checks.add("reachable on its own port", own["ok"] and own.get("banner", "").startswith("web"),
               own.get("banner") or own.get("error", ""))
    checks.add("nothing on the 'mapped' port", not mapped["ok"], mapped.get("error") or mapped.get("banner", ""))
    evidence = {"container": {"pid": web.pid, "netns": web_net, "bind": bind, "asked": "-p 8080:80",
                              "published": published, "warnings": warned, "emitted": emitted},
                "host": {"netns": host_net}, "new_rules": new_rules, "outside_to_80": own,
                "outside_to_8080": mapped, "strict_publish": strict, "checks": checks.to_list()}
    explanation = (
        f"A server was started with --network host and -p 8080:80 (it runs in {label(web_net)}; the host is "
        f"{label(host_net)}). The lab said \"{warned[0] if warned else 'nothing'}\" — "
        f"{'Docker’s exact words' if warned == [HOST_MODE_WARNING] else 'not Docker’s warning'} — kept "
        f"{len(published)} mappings and added {len(new_rules)} firewall rules. From the outside network, port 80 "
        + (f"answered ({own['banner']})" if own["ok"] else f"failed ({own.get('error')})")
        + f" and port 8080 {'got ' + mapped['error'] if not mapped['ok'] else 'answered (' + mapped['banner'] + ')'}: "
        + ("the service is on its own port and the mapping never existed. " if checks.ok else "")
        + (f"With strict publishing, nslab refuses instead: {strict['error']}" if strict["refused"]
           else "Strict publishing did not refuse the ports here."))
    key = (f"warning {'exact' if checks.items[0]['ok'] else 'missing'}; {len(published)} mappings, "
           f"{len(new_rules)} rules; :80 {'ok' if own['ok'] else own.get('error')}, "
           f":8080 {mapped.get('error') or 'answered'}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

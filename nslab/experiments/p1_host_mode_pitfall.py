"""P1 — pitfall: two host-mode containers with ``-p 8080:80`` both bind port 80 (Common Pitfalls).

The seed's "wrong approach" run as written: ``docker run --network host -p 8080:80 nginx``
then the same for httpd, two web servers that both listen on 80. Measured: each spawn's
warning and kept mappings, each server's bind result, the lab's firewall publications, and
what a client in the outside network finds on port 80 and on port 8080 of the host.
"""
from __future__ import annotations

import time

from ..publish import HOST_MODE_WARNING
from ._base import Checks, label, proc_netns
from ._net import connect_from
from ._programs import start_server

ID = "P1"
CLAIM = "Pitfall: two host-mode containers with -p 8080:80 both bind port 80 (the second fails, -p is ignored)"
SABOTAGE = "host-on-bridge"


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        servers = []
        for name in ("nginx", "httpd"):
            try:
                c, bind = start_server(lab, name, 80, mode="host", publish=["8080:80"])
                servers.append({"name": name, "pid": c.pid, "netns": proc_netns(c), "bind": bind,
                                "warnings": list(c.warnings), "published": [str(m) for m in c.published]})
            except OSError as exc:                 # e.g. the host port refused the second time
                servers.append({"name": name, "pid": None, "netns": None, "bind": "not started",
                                "error": exc.strerror or str(exc), "warnings": [], "published": []})
        pubs = sorted(lab.firewall.publications)
        on_80 = connect_from(lab.host.outside, str(lab.host.address), 80)
        on_8080 = connect_from(lab.host.outside, str(lab.host.address), 8080)
        host_net = list(lab.host.netns.identity)
    first, second = servers
    checks = Checks()
    checks.add("the first binds port 80", first["bind"] == "bound", first["bind"])
    checks.add("the second fails with EADDRINUSE", second["bind"] == "EADDRINUSE",
               second.get("error") or second["bind"])
    checks.add("-p was ignored for both", all(s["warnings"] == [HOST_MODE_WARNING] and not s["published"]
                                              for s in servers) and not pubs,
               "; ".join(f"{s['name']}: warnings {s['warnings']}, published {s['published']}" for s in servers))
    checks.add("port 80 is the first one's, 8080 is nobody's",
               on_80.get("banner", "").startswith(first["name"]) and not on_8080["ok"],
               f":80 {on_80.get('banner') or on_80.get('error')}; :8080 {on_8080.get('error') or on_8080.get('banner')}")
    evidence = {"containers": servers, "publications": pubs, "host": {"netns": host_net},
                "outside_to_80": on_80, "outside_to_8080": on_8080, "checks": checks.to_list()}
    explanation = (
        "nginx and httpd were both started with --network host -p 8080:80 and both listen on port 80. "
        + " ".join(f"{s['name']}: bind {'succeeded' if s['bind'] == 'bound' else 'failed: ' + s['bind']}"
                   + (f", warned \"{s['warnings'][0]}\"" if s["warnings"] else ", no warning")
                   + (f", published {', '.join(s['published'])}" if s["published"] else ", nothing published")
                   + f" ({label(s['netns'])})." for s in servers)
        + f" From the outside, port 80 {'answered: ' + on_80['banner'].split()[0] if on_80['ok'] else 'got ' + on_80.get('error', '')}"
        f" and port 8080 {'got ' + on_8080['error'] if not on_8080['ok'] else 'answered: ' + on_8080['banner'].split()[0]}. "
        + ("So -p bought nothing: both mappings were discarded, and the two servers fought over the host's port 80 — "
           "the second lost. The fix is the seed's: drop -p and give each service its own port, or use bridge mode."
           if checks.ok else ""))
    key = (f"binds {first['bind']}/{second['bind']}; -p kept: {len(first['published'])}/{len(second['published'])}; "
           f":80 {on_80.get('banner', '').split(' ')[0] or on_80.get('error')}, :8080 {on_8080.get('error') or 'answered'}")
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

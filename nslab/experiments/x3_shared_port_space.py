"""X3 — a shared port space causes subtle multi-container bugs (Expert zone).

Two services that both default to port 8003 ("metrics" and "admin", say), both in host
mode. Measured twice, in fresh labs, with the start order swapped: which one bound the
port, what the other one's bind said, and who actually answers a client at the host's
address on 8003. The bug is "subtle" because nothing in either service is wrong: the
outcome depends on which started first.
"""
from __future__ import annotations

import time

from ._base import Checks, label, proc_netns
from ._net import connect_from
from ._programs import start_server

ID = "X3"
CLAIM = "Shared port space causes subtle multi-container bugs"
SABOTAGE = "host-in-own-netns"
PORT = 8003


def _round(ctx, first: str, second: str) -> dict:
    with ctx.lab() as lab:
        a, a_bind = start_server(lab, first, PORT, mode="host")
        b, b_bind = start_server(lab, second, PORT, mode="host")
        answer = connect_from(lab.host.outside, str(lab.host.address), PORT)
        return {"order": [first, second], "binds": {first: a_bind, second: b_bind},
                "netns": {first: proc_netns(a), second: proc_netns(b), "host": list(lab.host.netns.identity)},
                "pids": {first: a.pid, second: b.pid},
                "answered_by": answer.get("banner", "").split(" ")[0] if answer["ok"] else None,
                "client": answer}


def run(ctx):
    started = time.monotonic()
    rounds = [_round(ctx, "metrics", "admin"), _round(ctx, "admin", "metrics")]
    checks = Checks()
    for r in rounds:
        first, second = r["order"]
        checks.add(f"{first} first: {second} fails to bind", r["binds"][first] == "bound"
                   and r["binds"][second] == "EADDRINUSE", f"{first} {r['binds'][first]}, {second} {r['binds'][second]}")
        checks.add(f"{first} first: {first} answers", r["answered_by"] == first, f"answered by {r['answered_by']}")
    winners = [r["answered_by"] for r in rounds]
    checks.add("the winner depends on start order", winners[0] != winners[1] and None not in winners,
               f"winners {winners}")
    evidence = {"port": PORT, "rounds": rounds, "checks": checks.to_list()}
    lines = []
    for r in rounds:
        first, second = r["order"]
        lines.append(f"started {first} then {second}: the bind of {first} {'succeeded' if r['binds'][first] == 'bound' else 'got ' + r['binds'][first]} "
                     f"and that of {second} {'succeeded too' if r['binds'][second] == 'bound' else 'got ' + r['binds'][second]}; "
                     f"a client at the host's port {PORT} reached {r['answered_by'] or 'nobody (' + r['client'].get('error', '') + ')'}")
    shared = all(r["netns"][n] == r["netns"]["host"] for r in rounds for n in r["order"])
    text = "; ".join(lines)
    explanation = (
        f"Two host-mode services both use port {PORT}. " + text[:1].upper() + text[1:] + ". "
        + ("Same images, same configuration, opposite outcome: whichever starts first owns the port, and the other "
           "fails at start-up — or, for a service that retries or falls back, silently runs without it. "
           + (f"In each round both were in that lab's host namespace ({label(rounds[0]['netns']['host'])}, then "
              f"{label(rounds[1]['netns']['host'])}): one port space for both." if shared else "")
           if checks.ok else "The outcome did not depend on the start order here.")
    )
    key = f"winner by start order: {winners[0]} then {winners[1]}; loser's bind: " + "/".join(
        r["binds"][r["order"][1]] for r in rounds)
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

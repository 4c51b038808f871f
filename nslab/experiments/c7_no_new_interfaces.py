"""C7 — host mode creates no new interfaces or bridges (Step 7, Under the Hood).

Measured: the host's interfaces (rtnetlink, in the host's netns) before and after each of
three spawns — a host-mode child, then a first bridge child, then a second one. Expected
from the seed and from Docker's bridge driver: the host-mode child adds nothing; the first
bridge child adds the bridge and one veth; the second adds exactly one more veth. (The
bridge comes with the first bridge child because nslab creates it lazily; Docker's daemon
creates docker0 when it starts.)
"""
from __future__ import annotations

import time

from ._base import Checks, sentence_list
from ._net import interfaces

ID = "C7"
CLAIM = "Host mode creates no new interfaces or bridges"
SABOTAGE = "host-on-bridge"


def _names(ns) -> list[str]:
    return [f"{i['name']} ({i['kind']})" for i in interfaces(ns)]


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        host = lab.host.netns
        steps = [("before", None, _names(host))]
        for step, mode in (("host-mode child", "host"), ("first bridge child", "bridge"),
                           ("second bridge child", "bridge")):
            c = lab.spawn(["sleep", "60"], name=step.replace(" ", "-"), mode=mode)
            steps.append((step, c.pid, _names(host)))
    added = {}
    for (_, _, before), (step, _, after) in zip(steps, steps[1:]):
        added[step] = [i for i in after if i not in before]
    removed = {step: [i for i in before if i not in after]
               for (_, _, before), (step, _, after) in zip(steps, steps[1:])}
    kinds = {step: sorted(i.split(" (")[1].rstrip(")") for i in items) for step, items in added.items()}
    checks = Checks()
    checks.add("host-mode child adds no interface", added["host-mode child"] == [],
               sentence_list(added["host-mode child"]))
    checks.add("first bridge child adds the bridge and one veth", kinds["first bridge child"] == ["bridge", "veth"],
               sentence_list(added["first bridge child"]))
    checks.add("second bridge child adds exactly one veth", kinds["second bridge child"] == ["veth"],
               sentence_list(added["second bridge child"]))
    checks.add("nothing removed", not any(removed.values()), str({k: v for k, v in removed.items() if v}))
    evidence = {"steps": [{"step": s, "pid": pid, "host_interfaces": names} for s, pid, names in steps],
                "added": added, "checks": checks.to_list()}
    first = kinds["first bridge child"]
    if first == ["bridge", "veth"]:
        first_text = (": a bridge and a veth. The bridge appeared only now: nslab creates it lazily, with the first "
                      "container that needs it (background, unlike Docker: its daemon creates docker0 when it "
                      "starts, before any container)")
    elif "bridge" not in first:
        first_text = " — no bridge: it existed already, or was never made"
    else:
        first_text = ""
    second = kinds["second bridge child"]
    second_text = (": one veth per container from then on" if second == ["veth"] else
                   f": not the single veth expected ({sentence_list(second)})")
    explanation = (
        f"The host started with {sentence_list(steps[0][2])}. Spawning a host-mode child added "
        f"{sentence_list(added['host-mode child'])}"
        f"{' — it simply runs in the existing namespace' if not added['host-mode child'] else ''}. "
        f"The first bridge child added {sentence_list(added['first bridge child'])}{first_text}. The second bridge "
        f"child added {sentence_list(added['second bridge child'])}{second_text}.")
    key = "added: " + "; ".join(f"{s.split(' child')[0]} {'+' + ','.join(kinds[s]) if kinds[s] else 'nothing'}"
                                for s in added)
    return ctx.result(ID, CLAIM, checks.verdict(), evidence, explanation, key, started)

#!/usr/bin/env python3
"""The tutorial's four myths, through nslab's experiments — and one experiment run against a
deliberately broken lab, to show that a verdict is measured, not written down.

``nslab.experiments.run(ID)`` builds a sandbox lab, measures, and returns a Result: the
verdict (computed from the evidence), a one-paragraph explanation and the evidence itself.
``Context(sabotage=...)`` runs the same code against a lab that misplaces children; the
verdict must flip. This is what ``nslab tour`` does for every claim.

Run:  sudo python3 examples/10_myths.py
"""
import sys
import textwrap

from nslab import experiments
from nslab.experiments import Context


def show(result) -> None:
    print(f"{result.id}: {result.claim}")
    print(textwrap.fill(f"verdict: {result.verdict}", 100, initial_indent="  ", subsequent_indent="    "))
    print(textwrap.fill(result.explanation, 100, initial_indent="  ", subsequent_indent="  "))
    print(f"  ({result.duration:.2f} s; evidence keys: {', '.join(result.evidence)})\n")


def main() -> int:
    results = [experiments.run(claim_id) for claim_id in ("M1", "M2", "M3", "M4")]
    for result in results:
        show(result)
    print("Now M1 again, in a lab whose 'host' children secretly get a namespace of their own:\n")
    broken = experiments.run("M1", Context(sabotage={"host-in-own-netns"}))
    show(broken)
    ok = all(r.holds for r in results) and broken.verdict.startswith("does not hold")
    print("the myths are refuted, and the sabotaged run said so:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

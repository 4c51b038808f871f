"""The seed's claims, one experiment each: measure, then conclude.

``../shared/seed/CLAIMS.md`` numbers every claim of the tutorial nslab was made from (C1-C8,
myths M1-M4, expert points X1-X3, pitfall P1). Each has a module here with the same shape::

    ID = "C3"
    CLAIM = "Host mode creates no new namespace; ..."     # the seed's words, short
    SABOTAGE = "host-in-own-netns"                        # the fault that must flip its verdict
    def run(ctx) -> Result: ...

and the registry runs them::

    >>> from nslab import experiments
    >>> result = experiments.run("C3")                    # a fresh sandbox lab, torn down after
    >>> result.verdict, result.key
    ('holds', 'child net:[4026532246] = host net:[4026532246]; :8000 in the host table ...')
    >>> experiments.run("C3", experiments.Context(sabotage={"host-in-own-netns"})).verdict
    'does not hold (same netns as the host, ... failed)'

A verdict is ``holds``, ``does not hold (...)`` or ``holds with a nuance: ...``, always
computed from the evidence; ``could not run`` (with ``error``) when a step failed.
"""
from __future__ import annotations

import importlib
import time
import traceback
from typing import Callable, Iterable

from ..errors import InputError
from ._base import (COULD_NOT_RUN, DOES_NOT_HOLD, HOLDS, NUANCE, SABOTAGES, Checks, Context,
                    ExperimentError, Result, nuance)

__all__ = ["IDS", "MODULES", "Context", "Result", "Checks", "ExperimentError", "SABOTAGES",
           "HOLDS", "DOES_NOT_HOLD", "NUANCE", "COULD_NOT_RUN", "nuance", "module", "select",
           "run", "run_all"]

#: Claim ID -> module name, in the seed's order.
MODULES = {
    "C1": "c1_bridge_default",
    "C2": "c2_namespace_isolation",
    "C3": "c3_host_shares_netns",
    "C4": "c4_host_interfaces",
    "C5a": "c5a_performance",
    "C5b": "c5b_no_port_mapping",
    "C5c": "c5c_host_services",
    "C6": "c6_port_conflicts",
    "C7": "c7_no_new_interfaces",
    "C8": "c8_no_bridge_nat_path",
    "M1": "m1_isolation_myth",
    "M2": "m2_docker_desktop",
    "M3": "m3_port_mapping_myth",
    "M4": "m4_security_myth",
    "X1": "x1_bypasses_drivers",
    "X2": "x2_other_isolation",
    "X3": "x3_shared_port_space",
    "P1": "p1_host_mode_pitfall",
}
IDS = tuple(MODULES)


def module(claim_id: str):
    """The experiment module for ``claim_id`` (case-insensitive: ``c5a`` works)."""
    return importlib.import_module(f"{__name__}.{MODULES[_canonical(claim_id)]}")


def _canonical(claim_id: object) -> str:
    if isinstance(claim_id, str):
        for known in IDS:
            if known.lower() == claim_id.strip().lower():
                return known
    raise InputError("claim ID", f"unknown; the IDs are {', '.join(IDS)}", claim_id)


def select(ids: Iterable[str] | None = None) -> list[str]:
    """Canonical IDs for ``ids`` (all of them for None/empty), in the seed's order, no repeats."""
    if not ids:
        return list(IDS)
    wanted = {_canonical(i) for i in ids}
    return [i for i in IDS if i in wanted]


def run(claim_id: str, ctx: Context | None = None) -> Result:
    """Run one experiment. Never raises for a failure *during* the experiment: that becomes a
    Result with verdict ``could not run`` and ``error`` set (the tour's non-zero exit)."""
    ctx = ctx or Context()
    mod = module(claim_id)
    started = time.monotonic()
    try:
        result = mod.run(ctx)
        result.duration = round(time.monotonic() - started, 3)      # teardown included
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as "could not run", with the traceback
        return Result(mod.ID, mod.CLAIM, COULD_NOT_RUN,
                      {"traceback": traceback.format_exc(limit=8)},
                      f"The experiment stopped before it could conclude: {exc}",
                      round(time.monotonic() - started, 3), f"error: {exc}",
                      f"{type(exc).__name__}: {exc}", sorted(ctx.sabotage))
    return result


def run_all(ids: Iterable[str] | None = None, ctx: Context | None = None,
            progress: Callable[[int, int, Result], None] | None = None) -> list[Result]:
    """Run the experiments ``ids`` (default: all) in order; ``progress(i, n, result)`` is
    called as each one finishes."""
    ctx = ctx or Context()
    chosen = select(ids)
    results = []
    for n, claim_id in enumerate(chosen, 1):
        result = run(claim_id, ctx)
        results.append(result)
        if progress is not None:
            progress(n, len(chosen), result)
    return results

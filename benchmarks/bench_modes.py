"""The datapath of each network mode, as ratios to loopback: the full ``nslab bench`` run.

Every path (loopback, host mode, bridge child <-> host, child <-> child, published port via
DNAT and via the userland proxy, ``container:``) on one sandbox lab, ``--repeats`` interleaved
rounds of TCP RR, stream and CRR, plus iperf3 and sockperf on the same paths when they are
installed. Writes the ``## Datapath per mode`` section of ``benchmarks/RESULTS.md`` (only that
section: other benchmarks own the others) and prints the table.

Run as root from the project root::

    python3 benchmarks/bench_modes.py [--duration 2] [--repeats 5] [--pin split]
                                      [--no-reference] [--no-same-cpu] [--no-write]
                                      [--chart modes.svg] [--json modes.json]

A second, RR-only run with both ends on one CPU follows (``--no-same-cpu`` skips it): on a
VM the cross-CPU wakeup of the split placement hides most of the stack's cost.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from nslab.bench import CHECKS, DEFAULT_TESTS, PATHS, PINS, run_bench
from _results import RESULTS, write_section  # noqa: E402

SECTION = "## Datapath per mode"


def section(report, argv: list, same_cpu=None) -> str:
    windows = ", ".join(f"{c.path}{'/' + c.baseline if c.baseline != 'loopback' else ''} "
                        f"{c.test} {c.low:g}–{c.high:g}"
                        for c in CHECKS if c.test in ("rr", "stream") and
                        (c.test, c.metric) in (("rr", "p50_us"), ("stream", "gbit_per_s")))
    return "\n".join([
        SECTION, "",
        "Each network mode's datapath measured side by side in one run with nslab's C probe "
        f"(`{' '.join(['python3', 'benchmarks/bench_modes.py', *argv])}`, i.e. `nslab bench`), as "
        "ratios to host loopback (`xlo`); iperf3 (single stream) and sockperf (TCP ping-pong) "
        "on the same paths as the reference columns. Paths: loopback (both ends in the sandbox "
        "host's netns), host (server in a `--network host` child process), bridge (child ↔ "
        "host), bridge-bridge (child ↔ child), dnat / proxy (a published port reached from the "
        "simulated outside network, kernel DNAT only / userland proxy only), container "
        "(`container:` child ↔ the child it joined, over its loopback).",
        "",
        report.markdown(),
        "",
        *([] if same_cpu is None else [
            "### RR with client and server on the same CPU",
            "",
            "On this VM a wakeup across vCPUs costs tens of µs and dominates the round trip "
            "of the split placement above, compressing every RR ratio towards 1. With both "
            "ends on one CPU (`--pin same`) the round trip is a context switch plus the stack, "
            "so the per-path costs show:",
            "",
            same_cpu.markdown(),
            ""]),
        f"Sanity windows (ratio to loopback unless named; `nslab.bench.CHECKS`): {windows}.",
        "",
    ])



def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--pin", choices=PINS, default="split")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--tests", default=",".join(DEFAULT_TESTS))
    ap.add_argument("--no-reference", action="store_true", help="skip iperf3/sockperf")
    ap.add_argument("--no-same-cpu", action="store_true",
                    help="skip the second RR run with both ends on one CPU")
    ap.add_argument("--no-write", action="store_true", help=f"do not touch {RESULTS.name}")
    ap.add_argument("--chart", help="also write the SVG chart here")
    ap.add_argument("--json", help="also write the full report here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (namespaces, nftables, /run/netns)", file=sys.stderr)
        return 2
    report = run_bench(args.paths, args.tests, duration=args.duration, repeats=args.repeats,
                       size=args.size, pin=args.pin, reference_tools=not args.no_reference,
                       progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(report.table())
    same_cpu = None
    if not args.no_same_cpu and "rr" in args.tests.split(","):
        same_cpu = run_bench(args.paths, ["rr"], duration=args.duration, repeats=args.repeats,
                             size=args.size, pin="same", reference_tools=not args.no_reference,
                             progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(same_cpu.table())
    if args.chart:
        pathlib.Path(args.chart).write_text(report.svg())
    if args.json:
        data = {"split": report.to_dict(), "same_cpu_rr": same_cpu.to_dict() if same_cpu else None}
        pathlib.Path(args.json).write_text(json.dumps(data, indent=2))
    if not args.no_write:
        shown, skip = [], False
        for arg in argv:                     # where the chart and JSON went is not a result
            if skip or arg in ("--chart", "--json", "--no-write"):
                skip = arg in ("--chart", "--json") and not skip
                continue
            if not arg.startswith(("--chart=", "--json=")):
                shown.append(arg)
        write_section(section(report, shown, same_cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``nslab`` command: ``tour`` (run the seed's claims), ``bench``, ``gc``, ``leaks``.

Each subcommand lives in its own module and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up and turns nslab's errors into one
readable line (with the hint) instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import NslabError

# name -> (module, one-line help)
COMMANDS = {
    "tour": ("nslab.tour", "run every experiment (or the claim IDs given) and print the verdicts"),
    "bench": ("nslab.bench", "measure the datapath of each network mode, as ratios to loopback"),
    "gc": ("nslab.records_cli", "remove what dead labs left behind (by their records)"),
    "leaks": ("nslab.records_cli", "list nslab objects on this machine, their lab, and the orphans"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nslab", description="A laboratory for Linux network namespaces: "
                                     "Docker's network modes, from the syscalls up.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            # One broken subcommand (say, a C extension that failed to build) must not take
            # the others down with it.
            p.set_defaults(_run=lambda args, exc=exc: _unavailable(args.command, exc))
            continue
        getattr(mod, "add_arguments")(p, name)
        p.set_defaults(_run=getattr(mod, "run"))
    return parser


def _unavailable(command: str, exc: ImportError) -> int:
    print(f"nslab {command}: unavailable here: {exc}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except NslabError as exc:
        print(f"nslab {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nslab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``nslab gc`` and ``nslab leaks``: the garbage collector and the leak report, on the terminal."""
from __future__ import annotations

import argparse
import json

from .records import gc, leak_report, orphaned


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--root", help="state root (default: /run/nslab as root)")


def run(args: argparse.Namespace) -> int:
    if args.command == "gc":
        report = gc(args.root)
        print(json.dumps(report.to_dict(), indent=1) if args.json else report)
        return 1 if report.errors else 0
    report = leak_report(args.root)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    dead = orphaned(report)
    print(f"{len(report['labs'])} lab record(s), {len(dead)} orphaned (dead controller: `nslab gc` removes them)")
    for lab in report["labs"]:
        state = "alive" if lab["alive"] else "ORPHANED"
        print(f"  lab {lab['lab']} pid {lab['pid']}: {state}, {len(lab['entries'])} object(s)")
        for entry in lab["entries"]:
            print(f"    {entry}")
    for link in report["tagged_links"]:
        print(f"  link {link['ifname']} tagged {link['alias']}")
    return 0

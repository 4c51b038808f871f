"""``nslab gc`` and ``nslab leaks``: the garbage collector and the leak report, on the terminal.

    $ sudo nslab leaks            # what nslab left on this machine; exit 1 if anything is orphaned
    $ sudo nslab gc               # remove what dead labs left (by their records); exit 1 on errors
    $ sudo nslab gc --json        # the same, machine-readable

Both are safe while labs run: a live lab's record is locked, and gc never touches it.
Also runnable as ``python3 -m nslab.records_cli gc|leaks``.
"""
from __future__ import annotations

import argparse
import json
import sys

from .records import gc, leak_report, orphaned


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--root", help="state root holding labs/ (default: /run/nslab as root, "
                                       "or $NSLAB_RECORDS_DIR for the records directory)")


def run(args: argparse.Namespace) -> int:
    if args.command == "gc":
        report = gc(args.root)
        print(json.dumps(report.to_dict(), indent=1) if args.json else report)
        return 1 if report.errors else 0
    report = leak_report(args.root)
    problems = _orphans(report)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 1 if problems else 0
    print(_format(report))
    return 1 if problems else 0


def _orphans(report: dict) -> int:
    """How many objects nobody alive owns."""
    count = len(orphaned(report))
    count += sum(1 for x in report["tagged_links"] if x["state"] != "alive")
    count += sum(1 for x in report["state_dirs"] if x["state"] != "alive")
    count += sum(1 for x in report["netns_names"] if x["state"] != "alive")
    count += sum(1 for x in report["nft_tables"] if not x["owner_flag"])
    count += sum(1 for x in report["processes"] if x["state"] != "alive")
    return count


def _format(report: dict) -> str:
    dead = orphaned(report)
    lines = [f"{len(report['labs'])} lab record(s) in {report['records_dir']}, {len(dead)} orphaned "
             "(dead controller: `nslab gc` removes what they left)"]
    for lab in report["labs"]:
        state = "alive" if lab["alive"] else "ORPHANED"
        lines.append(f"  lab {lab['lab']} ({lab['host']} host) pid {lab['pid']}: {state}, "
                     f"{len(lab['entries'])} object(s)")
        lines += [f"    {entry}" for entry in lab["entries"]]
    sections = (("tagged_links", "links tagged by nslab",
                 lambda x: f"{x['ifname']} ({x['alias']}, {x['netns']}, {len(x['ports'])} port(s))"),
                ("state_dirs", "sandbox state directories", lambda x: x["path"]),
                ("netns_names", "persisted netns names", lambda x: x["path"]),
                ("nft_tables", "nslab nft tables in this netns", lambda x: x["table"]),
                ("processes", "nslab helper processes", lambda x: f"pid {x['pid']} (parent {x['ppid']}) "
                                                                  f"{x['cmdline'][:80]}"))
    for key, title, show in sections:
        if report[key]:
            lines.append(f"{title}:")
            lines += [f"  {show(x)}: {x['state']}" for x in report[key]]
    problems = _orphans(report)
    lines.append("nothing orphaned" if not problems else f"{problems} orphaned object(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nslab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("gc", "leaks"):
        add_arguments(sub.add_parser(name), name)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

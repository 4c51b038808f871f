"""``nslab tour``: run the seed's claims as experiments and print what was measured.

The first command to run (as root, on a throwaway VM or anywhere: every experiment runs in
sandbox network namespaces, so this machine's links, routes and firewall stay untouched)::

    $ sudo nslab tour                     # every claim of CLAIMS.md, ~15 s on 2 cores
    $ sudo nslab tour C3 M4               # just these
    $ sudo nslab tour --json | jq .       # for machines
    $ sudo nslab tour --sabotage host-in-own-netns C3    # watch a verdict flip

While it runs, one line per experiment goes to stderr; then a table (ID, claim, verdict, key
evidence) goes to stdout, and a report is written to ``./nslab-report/``: ``report.html``
(each experiment's explanation, checks and evidence, and the latency/throughput charts) and
``report.json``. The exit status is 0 when every experiment ran — whatever its verdict — 1
when one could not run, 2 when nothing could (no privileges: the message says what to do).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import textwrap
import time
from html import escape

from . import __version__
from .errors import InputError, privilege_hint

__all__ = ["add_arguments", "run", "check_privileges", "render_table", "write_report", "machine_facts"]

DEFAULT_REPORT = "nslab-report"


def add_arguments(parser: argparse.ArgumentParser, name: str = "tour") -> None:
    from .experiments import IDS, SABOTAGES
    parser.add_argument("ids", nargs="*", metavar="ID",
                        help=f"claim IDs to run (default: all of {', '.join(IDS)}); case-insensitive")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of a table")
    parser.add_argument("--report", metavar="DIR", default=DEFAULT_REPORT,
                        help=f"write report.html and report.json here (default: ./{DEFAULT_REPORT}/)")
    parser.add_argument("--no-report", action="store_true", help="write no report files")
    parser.add_argument("--list", action="store_true", help="list the claims and exit")
    parser.add_argument("--sabotage", action="append", default=[], choices=sorted(SABOTAGES), metavar="FAULT",
                        help="run against a deliberately wrong lab, to see verdicts flip: "
                             + "; ".join(f"{k}: {v}" for k, v in SABOTAGES.items()))
    parser.add_argument("--perf-seconds", type=float, default=0.1, metavar="S",
                        help="length of one datapath measurement in C5a (default 0.1; 3 rounds of 5 paths × 2)")


# --- privileges ------------------------------------------------------------------------------
def check_privileges() -> str | None:
    """None if this process can make network namespaces; else why not, and what to do."""
    from .namespaces import Namespace
    try:
        Namespace.create("net").close()
    except PermissionError as exc:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
        return (f"every experiment runs in sandbox network namespaces, and this process ({who}) may not create "
                f"one: {getattr(exc, 'strerror', None) or exc}.\nWhat to do: {privilege_hint()}.")
    except OSError as exc:
        return (f"every experiment runs in sandbox network namespaces, and creating one failed: {exc}.\n"
                f"What to do: check that the kernel has network namespaces (CONFIG_NET_NS); {privilege_hint()}.")
    return None


# --- the table ---------------------------------------------------------------------------------
def _verdict_class(result) -> str:
    from .experiments import COULD_NOT_RUN, DOES_NOT_HOLD, NUANCE
    v = result.verdict
    if not result.ran:
        return COULD_NOT_RUN
    if v.startswith(NUANCE):
        return "holds, with a nuance"
    if v.startswith(DOES_NOT_HOLD):
        return DOES_NOT_HOLD
    return v


def _footnote(result) -> str | None:
    """The part of a verdict that does not fit its class: the nuance, failed checks, the error."""
    if not result.ran:
        return result.error
    _, sep, rest = result.verdict.partition(": ")
    if sep and result.verdict.startswith("holds with a nuance"):
        return rest
    if "(" in result.verdict and result.verdict.startswith("does not hold"):
        return result.verdict[result.verdict.index("(") + 1:].rstrip(")")
    return None


def render_table(results, width: int | None = None) -> str:
    """The results as a plain-text table (ID, claim, verdict, key evidence), with the nuances
    and failures as numbered notes under it."""
    width = width or shutil.get_terminal_size((120, 40)).columns
    width = max(80, min(width, 160))
    widths = [4, 34, 24]
    widths.append(width - sum(widths) - 3 * len(widths))
    notes: list[str] = []
    rows = [("ID", "claim", "verdict", "key evidence")]
    for r in results:
        verdict = _verdict_class(r)
        note = _footnote(r)
        if note:
            notes.append(f"[{len(notes) + 1}] {r.id}: {note}")
            verdict += f" [{len(notes)}]"
        rows.append((r.id, r.claim, verdict, r.key))
    lines = []
    for n, row in enumerate(rows):
        cells = [textwrap.wrap(str(c), w, break_on_hyphens=False) or [""] for c, w in zip(row, widths)]
        for k in range(max(len(c) for c in cells)):
            lines.append(" | ".join((c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    if notes:
        lines.append("")
        for note in notes:
            lines.extend(textwrap.wrap(note, width, subsequent_indent="    "))
    return "\n".join(lines)


def _progress(i: int, n: int, result) -> None:
    verdict = _verdict_class(result)
    print(f"[{i:2}/{n}] {result.id:<4} {verdict:<22} {result.duration:5.2f} s  {result.key[:70]}",
          file=sys.stderr, flush=True)


# --- the report --------------------------------------------------------------------------------
def machine_facts() -> dict:
    """What a reader needs to weigh the numbers: kernel, CPUs, Python, nslab, when."""
    return {"kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "nslab": __version__, "root": os.geteuid() == 0,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _document(results, elapsed: float, sabotage) -> dict:
    return {"nslab": __version__, "machine": machine_facts(), "elapsed_s": round(elapsed, 3),
            "sabotage": sorted(sabotage), "all_ran": all(r.ran for r in results),
            "results": [r.to_dict() for r in results]}


def _perf_charts(result) -> str:
    from ._charts import bar_chart
    paths = result.evidence.get("paths") or {}
    lat, tput = [], []
    for name, s in paths.items():
        if s.get("error") or "latency_us" not in s:
            lat.append({"label": name, "value": None, "note": "not measured: " + (s.get("error") or "?")[:60]})
            tput.append({"label": name, "value": None, "note": "not measured"})
            continue
        la, tp = s["latency_us"], s["gbit_per_s"]
        lat.append({"label": name, "value": la["p50"], "low": la["min_p50"], "high": la["max_p50"],
                    "note": f"{la['p50']:.0f} µs ×{s['latency_ratio']:.2f} (p99 {la['p99']:.0f})"})
        tput.append({"label": name, "value": tp["median"], "low": tp["min"], "high": tp["max"],
                     "note": f"{tp['median']:.1f} ×{s['throughput_ratio']:.2f}"})
    rounds = result.evidence.get("rounds")
    return ("<figure>" + bar_chart("Round-trip latency (1-byte TCP request/response), p50", "µs per round trip", lat) +
            f"<figcaption>Lower is better. Bars: median over {rounds} interleaved rounds of the per-round p50; "
            "whiskers: min–max over the rounds; ×: ratio to loopback; p99 in brackets.</figcaption></figure>"
            "<figure>" + bar_chart("TCP throughput", "Gbit/s", tput) +
            f"<figcaption>Higher is better. Bars: median over {rounds} rounds; whiskers: min–max; ×: ratio to "
            "loopback.</figcaption></figure>")


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;width:100%;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f4f4f4}.v{font-weight:bold;white-space:nowrap}.holds{color:#1a7f37}.nuance{color:#9a6700}.fails{color:#cf222e}
.error{color:#fff;background:#cf222e;padding:0 4px}section{border-top:2px solid #eee;margin-top:2em}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}code{background:#f6f8fa}figure{margin:1em 0}
.ok{color:#1a7f37}.no{color:#cf222e}.claim{font-style:italic}
"""


def _css_class(result) -> str:
    v = _verdict_class(result)
    return {"holds": "holds", "holds, with a nuance": "nuance", "does not hold": "fails"}.get(v, "error")


def render_html(doc: dict, results) -> str:
    m = doc["machine"]
    out = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>nslab tour report</title>",
           f"<style>{_CSS}</style></head><body>",
           "<h1>nslab tour: the claims of a host-networking tutorial, measured</h1>",
           f"<p>nslab {escape(doc['nslab'])} on Linux {escape(m['kernel'])} ({escape(m['machine'])}, "
           f"{m['usable_cpus']} of {m['cpus']} CPUs usable), Python {escape(m['python'])}, {escape(m['date'])}. "
           f"{len(results)} experiments in {doc['elapsed_s']:.1f} s, each in its own sandbox lab.</p>"]
    if doc["sabotage"]:
        out.append(f"<p class='error'>Sabotaged run: {escape(', '.join(doc['sabotage']))} — verdicts are "
                   "expected to flip.</p>")
    out.append("<table><tr><th>ID</th><th>claim</th><th>verdict</th><th>key evidence</th></tr>")
    for r in results:
        out.append(f"<tr><td><a href='#{escape(r.id)}'>{escape(r.id)}</a></td><td>{escape(r.claim)}</td>"
                   f"<td class='v {_css_class(r)}'>{escape(_verdict_class(r))}</td><td>{escape(r.key)}</td></tr>")
    out.append("</table>")
    for r in results:
        out.append(f"<section id='{escape(r.id)}'><h2>{escape(r.id)}</h2>")
        out.append(f"<p class='claim'>{escape(r.claim)}</p>")
        out.append(f"<p>Verdict: <span class='v {_css_class(r)}'>{escape(r.verdict)}</span> "
                   f"({r.duration:.2f} s)</p>")
        out.append(f"<p>{escape(r.explanation)}</p>")
        if r.id == "C5a" and r.ran and r.evidence.get("paths"):
            out.append(_perf_charts(r))
        checks = r.evidence.get("checks") if isinstance(r.evidence, dict) else None
        if checks:
            out.append("<table><tr><th>check</th><th>result</th><th>measured</th></tr>")
            for c in checks:
                mark = "<span class='ok'>yes</span>" if c["ok"] else "<span class='no'>no</span>"
                out.append(f"<tr><td>{escape(c['check'])}</td><td>{mark}</td><td>{escape(c['detail'])}</td></tr>")
            out.append("</table>")
        evidence = json.dumps(r.evidence, indent=1, default=str)
        out.append(f"<details><summary>evidence (JSON)</summary><pre>{escape(evidence)}</pre></details></section>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(directory: str, results, elapsed: float, sabotage=()) -> tuple[str, str]:
    """Write ``report.json`` and ``report.html`` into ``directory`` (made if missing)."""
    os.makedirs(directory, exist_ok=True)
    doc = _document(results, elapsed, sabotage)
    json_path = os.path.join(directory, "report.json")
    html_path = os.path.join(directory, "report.html")
    for path, text in ((json_path, json.dumps(doc, indent=1, default=str)), (html_path, render_html(doc, results))):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return html_path, json_path


# --- the command ---------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from . import experiments
    try:
        ids = experiments.select(args.ids)
        ctx = experiments.Context(sabotage=frozenset(args.sabotage), perf_seconds=args.perf_seconds)
    except InputError as exc:
        print(f"nslab tour: {exc.strerror}", file=sys.stderr)
        return 2
    if args.list:
        for claim_id in ids:
            print(f"{claim_id:<4} {experiments.module(claim_id).CLAIM}")
        return 0
    problem = check_privileges()
    if problem:
        print(f"nslab tour: {problem}", file=sys.stderr)
        return 2
    print(f"nslab tour: {len(ids)} experiment(s), each in a sandbox lab (this machine's network is not touched)"
          + (f"; sabotage: {', '.join(sorted(ctx.sabotage))}" if ctx.sabotage else ""), file=sys.stderr, flush=True)
    started = time.monotonic()
    results = experiments.run_all(ids, ctx, progress=_progress)
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps(_document(results, elapsed, ctx.sabotage), indent=1, default=str))
    else:
        print(render_table(results))
    summary = {}
    for r in results:
        summary[_verdict_class(r)] = summary.get(_verdict_class(r), 0) + 1
    print(f"nslab tour: {', '.join(f'{n} {k}' for k, n in summary.items())} in {elapsed:.1f} s", file=sys.stderr)
    if not args.no_report:
        html_path, _ = write_report(args.report, results, elapsed, ctx.sabotage)
        print(f"nslab tour: report written to {html_path} (and report.json)", file=sys.stderr)
    return 0 if all(r.ran for r in results) else 1

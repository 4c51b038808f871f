"""``nslab tour``: the command (run as ``python -m nslab tour ...``, argv only), its table, its
report and charts, and its refusals."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from nslab import experiments
from nslab._charts import bar_chart, nice_ticks
from nslab.experiments import Result
from nslab.tour import render_html, render_table

root = pytest.mark.root


def tour(*args, timeout=120, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "nslab", "tour", *args],
                          capture_output=True, text=True, timeout=timeout)


@root
def test_two_ids_as_json(tmp_path):
    """`nslab tour C1 C3 --json` prints JSON with exactly those results and progress on stderr."""
    proc = tour("C1", "c3", "--json", "--report", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [r["id"] for r in doc["results"]] == ["C1", "C3"]
    assert all(r["verdict"].startswith("holds") and r["evidence"] for r in doc["results"])
    assert doc["all_ran"] and doc["machine"]["kernel"] == os.uname().release
    assert "[ 1/2] C1" in proc.stderr and "[ 2/2] C3" in proc.stderr


@root
def test_full_tour_under_a_minute(tmp_path):
    """The whole tour runs every claim of CLAIMS.md in well under a minute, exits 0 and writes the report."""
    started = time.monotonic()
    proc = tour("--report", str(tmp_path / "report"))
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert elapsed < 60, f"the tour took {elapsed:.1f} s"
    table_ids = [line.split("|")[0].strip() for line in proc.stdout.splitlines() if "|" in line]
    assert [i for i in table_ids if i in experiments.IDS] == list(experiments.IDS)
    with open(tmp_path / "report" / "report.json") as f:
        doc = json.load(f)
    assert [r["id"] for r in doc["results"]] == list(experiments.IDS)
    with open(tmp_path / "report" / "report.html") as f:
        html = f.read()
    assert html.count("<svg") == 2 and "Round-trip latency" in html and "TCP throughput" in html
    print(f"full tour: {elapsed:.1f} s")


@root
def test_sabotage_option_flips_a_verdict():
    """`--sabotage host-in-own-netns C3` still exits 0 (the experiment ran) with a "does not hold" verdict."""
    proc = tour("--sabotage", "host-in-own-netns", "C3", "--json", "--no-report")
    assert proc.returncode == 0, proc.stderr
    (result,) = json.loads(proc.stdout)["results"]
    assert result["verdict"].startswith("does not hold") and result["sabotage"] == ["host-in-own-netns"]


def test_unknown_id_is_refused():
    """An unknown claim ID exits 2 and lists the known ones, before anything is created."""
    proc = tour("C9", "--no-report")
    assert proc.returncode == 2
    assert "C9" in proc.stderr and "C5a" in proc.stderr


def test_list_needs_no_privileges():
    """`--list` prints one line per claim ID."""
    proc = tour("--list")
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list(experiments.IDS)


def test_without_privileges_it_says_why_and_what_to_do(tmp_path):
    """Without the right to create namespaces the tour exits 2, naming the failure and the remedy."""
    prefix = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's capabilities")
        prefix = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")
    proc = tour("C1", "--report", str(tmp_path / "r"), prefix=prefix)
    assert proc.returncode == 2
    assert "may not create" in proc.stderr and "What to do:" in proc.stderr
    assert "Operation not permitted" in proc.stderr
    assert not (tmp_path / "r").exists()


def _result(claim_id, verdict, error=None):
    return Result(claim_id, f"claim {claim_id}", verdict, {"checks": [{"check": "c", "ok": True, "detail": "<d>"}]},
                  "explained", 0.1, f"key {claim_id}", error)


def test_table_shows_verdict_classes_and_notes():
    """The table has one row per result; nuances, failures and errors become numbered notes."""
    results = [_result("C1", "holds"), _result("C6", "holds with a nuance: only while host ports differ"),
               _result("C3", "does not hold (same netns failed)"),
               _result("M2", "could not run", error="ExperimentError: boom")]
    text = render_table(results, width=100)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "holds, with a nuance [1]" in text and "[1] C6: only while host ports differ" in text
    assert "[2] C3: same netns failed" in text and "[3] M2: ExperimentError: boom" in text


def test_html_report_escapes_everything():
    """Text from the evidence is HTML-escaped in the report."""
    doc = {"nslab": "0", "machine": {"kernel": "k", "machine": "m", "cpus": 2, "usable_cpus": 2,
                                     "python": "3", "date": "d"}, "elapsed_s": 1.0, "sabotage": []}
    html = render_html(doc, [_result("C1", "holds <b>")])
    assert "holds &lt;b&gt;" in html and "holds <b>" not in html
    assert "&lt;d&gt;" in html and "<d>" not in html


def test_bar_chart_is_valid_svg_with_one_bar_per_row():
    """bar_chart draws one rect per measured row, whiskers for spreads, and a note for unmeasured rows."""
    import xml.etree.ElementTree as ET
    svg = bar_chart("t <&>", "µs", [{"label": "a", "value": 40.0, "low": 35, "high": 45, "note": "×1.00"},
                                     {"label": "b", "value": 65.0, "note": "×1.62"},
                                     {"label": "c", "value": None, "note": "not measured: refused"}])
    tree = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert len(tree.findall(f"{ns}rect")) == 2
    assert "not measured: refused" in svg and "t &lt;&amp;&gt;" in svg


def test_nice_ticks_cover_the_range():
    """Ticks start at 0, are evenly spaced round numbers, and reach the maximum."""
    for top in (0.7, 9.3, 42.0, 1999.0):
        ticks = nice_ticks(top)
        assert ticks[0] == 0 and ticks[-1] >= top
        steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
        assert len(steps) == 1

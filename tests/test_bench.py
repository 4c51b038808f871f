"""``nslab bench``: each path goes where it claims (veth and nftables counters, the peer address
the server sees), ratios are computed against the same run's loopback, the sanity checks flag
wrong ratios, and the command runs as a subprocess. Root tier, except the pure arithmetic."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from nslab._netlink import Rtnl
from nslab.bench import (CHECKS, PATHS, Bench, Sample, build_report, run_bench)
from nslab.errors import InputError
from nslab.process import PIPE, Child

SHORT = 0.2


@pytest.fixture(scope="module")
def bench():
    """Every path on one sandbox lab, for the module."""
    if os.geteuid() != 0:
        pytest.skip("needs root: run the suite with sudo")
    with Bench(PATHS) as b:
        yield b


def link_stats(ns):
    """{ifname: (rx_bytes, tx_bytes)} of every link in ``ns`` but lo."""
    out = {}
    with Rtnl(ns) as r:
        for link in r.links():
            name = link.get_attr("IFLA_IFNAME")
            if name != "lo":
                st = link.get_attr("IFLA_STATS64")
                out[name] = (st["rx_bytes"], st["tx_bytes"])
    return out


def moved(before, after, ifname):
    """(rx, tx) bytes ``ifname`` moved between two snapshots."""
    return tuple(a - b for a, b in zip(after[ifname], before[ifname]))


def dnat_counter(lab, address, port):
    """Packets counted by the DNAT rules to ``address:port`` in the lab's nslab table
    (read back with ``nft -j`` run inside the host netns)."""
    with Child.spawn(["nft", "-j", "list", "table", "ip", "nslab"], new=(), join=[lab.host.netns],
                     stdout=PIPE) as child:
        out, _ = child.communicate(timeout=10)
    packets = 0
    for item in json.loads(out)["nftables"]:
        exprs = item.get("rule", {}).get("expr", [])
        dnat = [e["dnat"] for e in exprs if "dnat" in e]
        if dnat and dnat[0].get("addr") == address and dnat[0].get("port") == port:
            packets += sum(e["counter"]["packets"] for e in exprs if "counter" in e)
    return packets


# --- what a short run returns ------------------------------------------------------------------
@pytest.mark.root
def test_short_run_has_every_path_and_ratios_to_its_own_loopback():
    """A 0.2 s, one-round bench of a subset returns each path with positive numbers, and every
    ratio is that row's median over the loopback row of the same run."""
    report = run_bench(["bridge", "container"], ["rr", "stream"], duration=SHORT, repeats=1)
    assert report.paths == ["loopback", "bridge", "container"]
    for path in report.paths:
        for test, metric in (("rr", "p50_us"), ("rr", "p99_us"), ("rr", "rate_per_s"),
                             ("stream", "gbit_per_s")):
            row = report.row(path, test)
            assert row is not None and not row.errors, (path, test, row)
            assert row.metrics[metric].median > 0
            base = report.row("loopback", test).metrics[metric].median
            assert row.ratios[metric].value == pytest.approx(row.metrics[metric].median / base)
        assert report.path_facts(path)["mtu"] > 0
    assert report.row("loopback", "rr").ratios["p50_us"].value == 1.0
    assert report.path_facts("bridge")["mtu"] < report.path_facts("loopback")["mtu"]
    assert report.machine["kernel"] == os.uname().release and report.machine["cores"] >= 1
    json.dumps(report.to_dict())
    assert "bridge" in report.table() and report.svg().startswith("<svg")


# --- each path goes where it claims ------------------------------------------------------------
@pytest.mark.root
def test_loopback_and_host_mode_move_no_veth(bench):
    """Loopback and host mode stay on lo: no link of the host netns (veths, bridge, uplink)
    moves, though megabytes flow; host mode's server is another process in the host netns."""
    host = bench.lab.host.netns
    for path in ("loopback", "host"):
        before = link_stats(host)
        r = bench.measure(path, "stream", duration=SHORT)
        after = link_stats(host)
        assert r.bytes_received == r.bytes_sent > 10_000_000
        for ifname in before:
            assert max(moved(before, after, ifname)) < 64 * 1024, (path, ifname)
        assert r.path.client_netns == r.path.server_netns == f"net:[{host.inode}]"
    assert r.server_pid not in (None, os.getpid())


@pytest.mark.root
def test_bridge_paths_show_in_the_child_veth_counters(bench):
    """Bridge traffic crosses the server child's veth (and, child to child, the client's)."""
    host = bench.lab.host.netns
    server = bench.containers["server"].endpoint.host_ifname
    peer = bench.containers["peer"].endpoint.host_ifname
    before = link_stats(host)
    r = bench.measure("bridge", "stream", duration=SHORT)
    after = link_stats(host)
    assert moved(before, after, server)[1] >= r.bytes_sent > 1_000_000   # host -> child: veth tx
    assert max(moved(before, after, peer)) < 64 * 1024

    before = link_stats(host)
    r = bench.measure("bridge-bridge", "stream", duration=SHORT)
    after = link_stats(host)
    assert moved(before, after, peer)[0] >= r.bytes_sent > 1_000_000     # from the client child
    assert moved(before, after, server)[1] >= r.bytes_sent               # into the server child
    assert r.path.client_seen_by_server.startswith(str(bench.containers["peer"].address) + ":")


@pytest.mark.root
def test_dnat_path_counts_in_the_dnat_rule_and_the_uplink(bench):
    """The published-port path enters through the uplink veth and is rewritten by the DNAT
    rule, whose nftables counter moves."""
    lab, nat = bench.lab, bench.containers["dnat"]
    rule_before = dnat_counter(lab, str(nat.address), 5001)
    before = link_stats(lab.host.netns)
    r = bench.measure("dnat", "stream", duration=SHORT)
    after = link_stats(lab.host.netns)
    assert dnat_counter(lab, str(nat.address), 5001) > rule_before
    assert moved(before, after, lab.host.uplink)[0] >= r.bytes_sent > 1_000_000
    assert moved(before, after, nat.endpoint.host_ifname)[1] >= r.bytes_sent


@pytest.mark.root
def test_proxy_hides_the_client_address_and_dnat_keeps_it(bench):
    """Behind DNAT the server sees the outside client's address; behind the userland proxy it
    sees the host's bridge address instead."""
    outside = str(bench.lab.host.outside_address)
    dnat = bench.measure("dnat", "rr", duration=SHORT)
    proxy = bench.measure("proxy", "rr", duration=SHORT)
    assert dnat.path.client_seen_by_server.split(":")[0] == outside
    seen = proxy.path.client_seen_by_server.split(":")[0]
    assert seen == str(bench.containers["proxy"].endpoint.gateway) != outside
    assert bench.sample("dnat", "rr", 0, dnat).problems == []
    assert bench.sample("proxy", "rr", 0, proxy).problems == []


@pytest.mark.root
def test_container_mode_shares_the_server_netns(bench):
    """The container: path is loopback inside the server child's netns, not the host's."""
    r = bench.measure("container", "rr", duration=SHORT)
    server_ns = f"net:[{bench.containers['server'].netns.inode}]"
    assert r.path.client_netns == r.path.server_netns == server_ns != f"net:[{bench.lab.host.netns.inode}]"
    assert r.path.client_seen_by_server.startswith("127.0.0.1:") and r.transactions > 0


@pytest.mark.root
def test_a_wiring_contradiction_is_reported(bench):
    """A result whose server socket sat in another netns than the path claims is a problem."""
    r = bench.measure("bridge", "rr", duration=SHORT)
    assert bench.sample("bridge", "rr", 0, r).problems == []
    r.path.server_netns = f"net:[{bench.lab.host.netns.inode}]"
    assert any("server socket" in p for p in bench.sample("bridge", "rr", 0, r).problems)


@pytest.mark.root
@pytest.mark.skipif(not (shutil.which("iperf3") and shutil.which("sockperf")),
                    reason="iperf3 and sockperf are not installed")
def test_reference_tools_run_on_the_same_paths(bench):
    """iperf3 and sockperf run inside the path's namespaces (a published port included), and
    their /run/netns names go with the bench."""
    with pytest.raises(InputError):
        bench.reference("dnat", "iperf3")        # made without the reference tools' ports
    with Bench(["dnat"], reference_tools=True) as ref:
        assert ref.reference("loopback", "iperf3", duration=1)["gbit_per_s"] > 0
        assert ref.reference("dnat", "sockperf", duration=1)["p50_us"] > 0
        with pytest.raises(InputError):
            ref.reference("dnat", "netperf")
        names = list(ref._persisted.values())
        assert names and all(os.path.exists(f"/run/netns/{n}") for n in names)
        # Each name is in the lab's record before it exists: gc removes it after a crash.
        recorded = {e["name"] for e in ref.lab.record._entries.values() if e["kind"] == "netns-name"}
        assert recorded == set(names)
    ref.close()
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
    assert repr(ref) == "<Bench closed>"


# --- the sanity checks (pure arithmetic) ---------------------------------------------------------
def fabricated(ratios, test="rr", metric="p50_us", base=10.0):
    """A loopback sample and one per path at ``base * ratio``."""
    samples = [Sample("loopback", test, 0, {metric: base})]
    samples += [Sample(path, test, 0, {metric: base * r}) for path, r in ratios.items()]
    return build_report(samples, paths=["loopback", *ratios], tests=[test])


def test_sanity_flags_a_wrong_ratio():
    """Host mode at 3x loopback's latency, or a bridge 'faster' than loopback in throughput
    by half, marks that row and the run suspect, naming the window."""
    report = fabricated({"host": 3.0, "bridge": 1.4, "dnat": 2.0})
    assert report.suspect
    assert report.row("host", "rr").suspect and "3.00x" in report.row("host", "rr").suspect[0]
    assert report.row("bridge", "rr").ok and report.row("dnat", "rr").ok
    assert any(r.startswith("host rr:") for r in report.reasons)
    assert "SUSPECT" in report.table()

    stream = fabricated({"bridge": 1.5, "host": 1.0}, test="stream", metric="gbit_per_s")
    assert not stream.row("host", "stream").suspect and stream.row("bridge", "stream").suspect


def test_sanity_passes_plausible_ratios_and_checks_proxy_against_dnat():
    """Published-looking ratios pass; the proxy's throughput is also judged against DNAT's."""
    ok = fabricated({"host": 1.0, "bridge": 1.5, "bridge-bridge": 1.6, "dnat": 2.5,
                     "proxy": 3.0, "container": 1.02})
    assert not ok.suspect and ok.reasons == []
    st = fabricated({"dnat": 0.8, "proxy": 0.1}, test="stream", metric="gbit_per_s")
    proxy = st.row("proxy", "stream")
    assert proxy.suspect and any("dnat's" in why for why in proxy.suspect)
    assert {c["baseline"] for c in proxy.checks} == {"loopback", "dnat"}


def test_failures_and_contradictions_make_a_row_suspect():
    """A failed run, a wiring problem or a missing baseline is reported, not averaged away."""
    samples = [Sample("loopback", "rr", 0, {"p50_us": 10.0}),
               Sample("bridge", "rr", 0, {}, error="connect(...) failed: Connection refused"),
               Sample("dnat", "rr", 0, {"p50_us": 20.0}, problems=["server saw 172.17.0.1"])]
    report = build_report(samples, paths=["loopback", "bridge", "dnat"], tests=["rr"])
    assert "Connection refused" in report.row("bridge", "rr").suspect[0]
    assert report.row("dnat", "rr").suspect == ["server saw 172.17.0.1"]
    no_base = build_report([Sample("bridge", "rr", 0, {"p50_us": 1.0})],
                           paths=["loopback", "bridge"], tests=["rr"])
    assert no_base.suspect and no_base.row("bridge", "rr").ratios == {}


def test_paired_ratios_and_spread_over_rounds():
    """Medians, quartiles and the per-round paired ratio range are computed over rounds."""
    samples = [Sample("loopback", "stream", r, {"gbit_per_s": v}) for r, v in enumerate([10, 20, 30])]
    samples += [Sample("bridge", "stream", r, {"gbit_per_s": v}) for r, v in enumerate([5, 8, 24])]
    row = build_report(samples, paths=["loopback", "bridge"], tests=["stream"]).row("bridge", "stream")
    st = row.metrics["gbit_per_s"]
    assert (st.median, st.min, st.max, st.q1, st.q3) == (8, 5, 24, 6.5, 16)
    ratio = row.ratios["gbit_per_s"]
    assert ratio.value == pytest.approx(0.4) and (ratio.min, ratio.max) == (0.4, 0.8)


def test_noise_and_a_busy_machine_are_noted_not_judged():
    """A headline metric that doubles between rounds, or a load above the core count, is a
    note on the report; the verdict stays with the ratios."""
    samples = [Sample("loopback", "rr", r, {"p50_us": v}) for r, v in enumerate([10, 20, 11])]
    report = build_report(samples, paths=["loopback"], tests=["rr"],
                          machine={"load_before": 5.0, "cores": 2})
    assert not report.suspect
    assert "loopback rr x2.0" in report.notes[0] and "busy" in report.notes[1]
    assert report.row("loopback", "rr").notes and "ok, noisy" in report.table()


def test_every_check_names_known_paths_and_a_sane_window():
    """Each sanity window is about a known path and metric, and low < high."""
    for c in CHECKS:
        assert c.path in PATHS and c.baseline in PATHS and 0 < c.low < c.high, c


def test_bad_options_are_refused_before_anything_is_built():
    """Unknown paths, tests or pin placements raise InputError."""
    with pytest.raises(InputError):
        Bench(["wormhole"])
    with pytest.raises(InputError):
        Bench(["bridge"], pin="diagonal")
    with pytest.raises(InputError):
        run_bench(["bridge"], ["ping"])


# --- the command -------------------------------------------------------------------------------
@pytest.mark.root
def test_cli_json_runs_as_a_subprocess():
    """`python -m nslab bench --json ...` prints a report that parses, with both paths."""
    proc = subprocess.run([sys.executable, "-m", "nslab", "bench", "--json", "--duration", "0.2",
                           "--repeats", "1", "--paths", "loopback,bridge", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["paths"] == ["loopback", "bridge"]
    rows = {(r["path"], r["test"]) for r in data["rows"]}
    assert {("loopback", "rr"), ("bridge", "stream"), ("bridge", "crr")} <= rows
    assert data["machine"]["kernel"] == os.uname().release


def test_documented_windows_match_the_checks():
    """The window table in nslab.bench's docstring says what CHECKS enforce."""
    import re
    import nslab.bench as bench_module
    windows = {(c.path, c.test, c.baseline): f"{c.low:g}-{c.high:g}" for c in CHECKS}
    seen = 0
    for line in bench_module.__doc__.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in PATHS and len(cells) >= 4 and re.fullmatch(r"[\d.]+-[\d.]+", cells[1]):
            for test, cell in zip(("rr", "stream", "crr"), cells[1:4]):
                assert windows[(cells[0], test, "loopback")] == cell, (cells[0], test)
            seen += 1
    assert seen == len(PATHS) - 1          # every path but the baseline


@pytest.mark.root
def test_a_bench_leaves_no_fd_and_no_child_behind(no_fd_leak):
    """Closing a bench (twice) releases every fd, child and persisted name it made."""
    with Bench(["host", "proxy"], reference_tools=True) as b:
        assert b.measure("host", "crr", duration=SHORT).connections > 0
        assert b.measure("proxy", "rr", duration=SHORT).transactions > 0
        pids = [c.pid for c in b.containers.values()]
        assert repr(b).startswith("<Bench loopback, host, proxy: 1 child, cpus")
    b.close()
    assert b.closed and b.lab.closed
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)

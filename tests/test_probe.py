"""The datapath probe: its arithmetic against known transfers, its histogram against raw
samples, its errors, and (as root) that each path goes where it claims.

Unprivileged tests run over the caller's own loopback; ``root`` tests build fresh netns
(a loopback one, and a bridge + veth pair like Docker's bridge mode).
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings, strategies as st

from nslab import probe
from nslab._probe import lib
from nslab.errors import InputError, NslabError

ROOT = os.geteuid() == 0
CPUS = sorted(os.sched_getaffinity(0))
PIN = (CPUS[0], CPUS[-1])   # two CPUs where there are two


def closed_port(kind=socket.SOCK_STREAM) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exact_percentile(sorted_values, q):
    """Nearest rank: the smallest value with at least q% of the samples at or below it
    (in exact arithmetic: 99.9% of 1,000 is rank 999, which floats round up to 1,000)."""
    import math
    from fractions import Fraction
    rank = max(1, math.ceil(Fraction(str(q)) / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# --- histogram ------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2 ** 64 - 1))
def test_hist_bucket_contains_its_value(v):
    """Every value falls inside its bucket's bounds, and a bucket is at most 1/128 of its value wide."""
    i = lib.nslab_probe_hist_index(v)
    assert 0 <= i < lib.NSLAB_PROBE_HIST_BUCKETS
    lo, hi = lib.nslab_probe_hist_lowest(i), lib.nslab_probe_hist_highest(i)
    assert lo <= v <= hi
    assert hi - lo + 1 <= max(1, lo // 128)


def test_hist_buckets_are_contiguous():
    """Consecutive buckets tile the value range with no gap and no overlap."""
    for i in range(lib.NSLAB_PROBE_HIST_BUCKETS - 1):
        assert lib.nslab_probe_hist_highest(i) + 1 == lib.nslab_probe_hist_lowest(i + 1)
    assert lib.nslab_probe_hist_highest(lib.NSLAB_PROBE_HIST_BUCKETS - 1) == 2 ** 64 - 1


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10 ** 9), min_size=1, max_size=500),
       st.sampled_from([50, 90, 99, 99.9, 100]))
def test_hist_percentile_is_in_the_exact_percentiles_bucket(values, q):
    """The histogram's percentile lands in the bucket of the exact nearest-rank percentile."""
    from nslab._probe import ffi
    hist = ffi.new("uint64_t[]", lib.NSLAB_PROBE_HIST_BUCKETS)
    for v in values:
        hist[lib.nslab_probe_hist_index(v)] += 1
    got = lib.nslab_probe_hist_percentile(hist, q, min(values), max(values))
    exact = exact_percentile(sorted(values), q)
    assert lib.nslab_probe_hist_index(got) == lib.nslab_probe_hist_index(exact)


def test_hist_percentile_rank_is_not_rounded_up_by_floats():
    """1,000 distinct samples: p99.9 is the 999th (not the 1,000th, as 0.999 * 1000 in
    doubles would make it)."""
    from nslab._probe import ffi
    values = [1000 * (i + 1) for i in range(1000)]       # far apart: one bucket each
    hist = ffi.new("uint64_t[]", lib.NSLAB_PROBE_HIST_BUCKETS)
    for v in values:
        hist[lib.nslab_probe_hist_index(v)] += 1
    got = lib.nslab_probe_hist_percentile(hist, 99.9, values[0], values[-1])
    assert lib.nslab_probe_hist_index(got) == lib.nslab_probe_hist_index(values[998])


# --- arithmetic against known transfers (caller's loopback) ----------------------------
def test_stream_fixed_count_counts_every_byte(no_fd_leak):
    """A fixed-size transfer: the receiver counts exactly the bytes the sender sent."""
    n = 7 * 1024 * 1024 + 13          # not a multiple of the buffer
    r = probe.stream(total_bytes=n, warmup=0, pin=None)
    assert r.bytes_sent == n
    assert r.bytes_received == n
    assert r.server.bytes_received == n
    assert 0 < r.measured_bytes < n    # the first read is the start mark, not measured
    assert r.gbit_per_s > 0


def test_stream_duration_measures_after_warmup():
    """A timed stream: the receiver's measured phase excludes the warm-up, totals still match."""
    r = probe.stream(duration=0.3, warmup=0.2, buffer_size=64 * 1024, pin=PIN)
    assert r.bytes_sent == r.bytes_received
    assert r.measured_bytes < r.bytes_received
    assert 0.2 < r.duration_s < 0.45
    assert r.gbit_per_s == pytest.approx(r.measured_bytes * 8 / r.duration_s / 1e9)


def test_rr_client_and_server_count_the_same_transactions(no_fd_leak):
    """Every transaction the client timed (warm-up included) is one the server echoed."""
    r = probe.rr(size=32, response_size=100, count=2000, warmup=0.05, pin=PIN)
    assert r.transactions == 2000
    total = r.transactions + r.warmup_transactions
    assert r.server.transactions == total
    assert r.bytes_sent == r.server.bytes_received == total * 32
    assert r.bytes_received == r.server.bytes_sent == total * 100
    assert r.rate_per_s == pytest.approx(r.transactions / r.duration_s)


def test_rr_percentiles_monotone_and_match_raw_samples():
    """Percentiles rise monotonically and each is within one bucket of the exact one from raw samples."""
    r = probe.rr(size=1, count=3000, warmup=0, samples=3000, pin=None)
    lat = r.latency
    assert 0 < lat.min_us <= lat.p50_us <= lat.p90_us <= lat.p99_us <= lat.p999_us <= lat.max_us
    raw = sorted(r.samples_ns)
    assert len(raw) == 3000
    assert raw[0] == round(lat.min_us * 1e3) and raw[-1] == round(lat.max_us * 1e3)
    assert lat.mean_us == pytest.approx(sum(raw) / len(raw) / 1e3)
    for q, got_us in ((50, lat.p50_us), (90, lat.p90_us), (99, lat.p99_us), (99.9, lat.p999_us)):
        exact = exact_percentile(raw, q)
        got = round(got_us * 1e3)
        assert abs(lib.nslab_probe_hist_index(got) - lib.nslab_probe_hist_index(exact)) <= 1, q


def test_crr_counts_connections():
    """Each CRR transaction is one accepted connection; the facts connection counts as aborted."""
    r = probe.crr(count=200, warmup=0.02, pin=None)
    assert r.connections == 200
    assert r.server.transactions == r.connections + r.warmup_connections
    assert r.server.aborted == 1
    assert r.latency.p50_us > 0 and r.rate_per_s > 0


def test_udp_rr_counts_requests_and_losses():
    """UDP: every measured request is either answered or counted lost, and the server saw the answered ones."""
    r = probe.udp_rr(size=64, count=1000, warmup=0, request_timeout=1.0, pin=None)
    assert r.transactions + r.lost == 1000
    assert r.server.transactions >= r.transactions + r.warmup_transactions
    assert r.loss_ratio == r.lost / 1000
    assert 0 < r.latency.p50_us <= r.latency.p99_us


# --- errors -------------------------------------------------------------------------------
def test_refused_tcp_connect_names_connect(no_fd_leak):
    """Dialing a closed port raises an nslab error with ECONNREFUSED that names connect and the target."""
    port = closed_port()
    with pytest.raises(NslabError) as info:
        probe.rr(connect_port=port, count=10, pin=None, timeout=2)
    assert info.value.errno == errno.ECONNREFUSED
    assert info.value.syscall == "connect"
    assert f"connect(127.0.0.1:{port} from net:[" in str(info.value)


def test_refused_udp_names_the_c_call():
    """A UDP request to a closed port fails in the C loop's recv, and the error says so."""
    port = closed_port(socket.SOCK_DGRAM)
    with pytest.raises(NslabError) as info:
        probe.run_client("udp_rr", "127.0.0.1", port, count=5, warmup=0)
    assert info.value.errno == errno.ECONNREFUSED
    assert info.value.syscall == "recv"
    assert "udp_rr client" in str(info.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"size": 0}, "request_size"),
    ({"pin": (0, 4096)}, "pin"),
    ({"duration": -1}, "duration"),
    ({"address": "localhost"}, "address"),
])
def test_bad_input_raises_before_anything_runs(kwargs, field):
    """Bad arguments raise InputError naming the field."""
    with pytest.raises(InputError) as info:
        probe.rr(**{"count": 10, **kwargs})
    assert info.value.field == field


def test_pin_cpu_pins_only_the_calling_thread():
    """pin_cpu changes the calling thread's CPU mask and no other thread's."""
    before = os.sched_getaffinity(0)
    seen = {}

    def body():
        probe.pin_cpu(CPUS[-1])
        seen["mask"] = os.sched_getaffinity(0)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["mask"] == {CPUS[-1]}
    assert os.sched_getaffinity(0) == before


def test_server_stops_on_request_and_closes_idempotently(no_fd_leak):
    """A server with no client ends on stop(), reports why, and close() twice is harmless."""
    srv = probe.ProbeServer("rr")
    assert "not started" in repr(srv)
    srv.start()
    assert "running" in repr(srv)
    srv.stop()
    report = srv.wait(5)
    assert report.stopped == "stop" and report.transactions == 0
    srv.close()
    srv.close()
    assert srv.closed and "closed" in repr(srv)


# --- one end per process ------------------------------------------------------------------
def _spawn(*argv):
    return subprocess.Popen([sys.executable, "-m", "nslab.probe", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_client_and_server_agree():
    """The JSON server and client, in two processes, count the same transactions."""
    srv = _spawn("server", "rr", "--bind", "127.0.0.1", "--size", "16")
    try:
        listening = json.loads(srv.stdout.readline())
        assert listening["event"] == "listening" and listening["port"] > 0
        out = subprocess.run([sys.executable, "-m", "nslab.probe", "client", "rr", "--address",
                              "127.0.0.1", "--port", str(listening["port"]), "--size", "16",
                              "--count", "500", "--warmup", "0"],
                             capture_output=True, text=True, timeout=30)
        client = json.loads(out.stdout)
        server = json.loads(srv.communicate(timeout=10)[0])
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert client["event"] == "result" and client["transactions"] == 500
    assert server["transactions"] == client["transactions"] + client["warmup_transactions"]
    assert server["bytes_received"] == 500 * 16


def test_cli_sigterm_stops_a_crr_server():
    """SIGTERM ends a CRR server cleanly, with a result saying it was stopped."""
    srv = _spawn("server", "crr", "--bind", "127.0.0.1")
    try:
        json.loads(srv.stdout.readline())
        srv.send_signal(signal.SIGTERM)
        result = json.loads(srv.communicate(timeout=10)[0])
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
    assert srv.returncode == 0
    assert result["event"] == "result" and result["stopped"] == "stop"


def test_cli_error_is_json_and_exit_1():
    """A client that cannot connect prints a JSON error naming the call, and exits 1."""
    out = subprocess.run([sys.executable, "-m", "nslab.probe", "client", "stream", "--address",
                          "127.0.0.1", "--port", str(closed_port()), "--count", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    err = json.loads(out.stdout)
    assert err["event"] == "error" and err["errno"] == errno.ECONNREFUSED
    assert err["syscall"] == "connect"


# --- paths (root: fresh namespaces) -------------------------------------------------------
@pytest.fixture
def lab():
    """One fresh netns with lo up."""
    from nslab._netlink import Rtnl
    from nslab.namespaces import Namespace
    ns = Namespace.create("net")
    with Rtnl(ns) as r:
        r.set_up(r.link_index("lo"), "lo")
    yield ns
    ns.close()


@pytest.fixture
def bridged():
    """A 'host' netns with bridge br0 (10.77.0.1/24) and veth0, whose peer eth0 (10.77.0.2/24)
    is born in a 'child' netns: Docker's bridge mode in miniature."""
    from nslab._netlink import Rtnl
    from nslab.namespaces import Namespace
    host, child = Namespace.create("net"), Namespace.create("net")
    with Rtnl(host) as r:
        r.set_up(r.link_index("lo"), "lo")
        r.request("link", "add", ifname="br0", kind="bridge", obj="br0")
        br = r.link_index("br0")
        r.request("addr", "add", index=br, address="10.77.0.1", prefixlen=24, obj="br0")
        r.request("link", "add", ifname="veth0", kind="veth",
                  peer={"ifname": "eth0", "net_ns_fd": child.fileno()}, obj="veth0")
        veth = r.link_index("veth0")
        r.request("link", "set", index=veth, master=br, obj="veth0")
        r.set_up(veth, "veth0")
        r.set_up(br, "br0")
    with Rtnl(child) as r:
        eth0 = r.link_index("eth0")
        r.request("addr", "add", index=eth0, address="10.77.0.2", prefixlen=24, obj="eth0")
        r.set_up(eth0, "eth0")
    yield host, child
    host.close()
    child.close()


def veth_bytes(host):
    from nslab._netlink import Rtnl
    with Rtnl(host) as r:
        stats = r.link("veth0").get("stats64")
        return stats["rx_bytes"], stats["tx_bytes"]


@pytest.mark.root
def test_loopback_path_facts_name_the_namespace(lab):
    """Both sockets of a loopback run report the lab's netns, and the loopback MTU."""
    r = probe.rr(lab, lab, count=100, warmup=0, pin=None)
    me = f"net:[{lab.inode}]"
    assert r.path.client_netns == me and r.path.server_netns == me
    assert r.path.server_address.startswith("127.0.0.1:")
    assert r.path.mtu > 60000


@pytest.mark.root
def test_bridge_traffic_shows_in_the_veth_counters(bridged):
    """A child -> host stream crosses veth0 (its counters grow by the transfer); a loopback run
    in the host netns leaves them alone."""
    host, child = bridged
    n = 20 * 1024 * 1024
    rx0, tx0 = veth_bytes(host)
    r = probe.stream(child, host, address="10.77.0.1", total_bytes=n, warmup=0, pin=None)
    rx1, tx1 = veth_bytes(host)
    assert r.bytes_received == n
    assert rx1 - rx0 >= n                       # payload plus headers, child -> host
    assert tx1 - tx0 < n / 10                   # only ACKs come back
    assert r.path.client_netns == f"net:[{child.inode}]"
    assert r.path.server_netns == f"net:[{host.inode}]"
    assert r.path.client_seen_by_server.startswith("10.77.0.2:")
    assert r.path.mtu == 1500 and r.path.mss <= 1460

    probe.stream(host, host, total_bytes=n, warmup=0, pin=None)   # loopback in the host netns
    rx2, tx2 = veth_bytes(host)
    assert rx2 - rx1 < 64 * 1024 and tx2 - tx1 < 64 * 1024      # at most stray ND/MLD packets


@pytest.mark.root
def test_bridge_rr_counts_agree_across_namespaces(bridged):
    """RR between two namespaces: counts agree and the CRR client's sockets live in the child."""
    host, child = bridged
    r = probe.rr(child, host, address="10.77.0.1", count=500, warmup=0, pin=None)
    assert r.server.transactions == r.transactions == 500
    c = probe.crr(child, host, address="10.77.0.1", count=50, warmup=0, pin=None)
    assert c.connections == 50 and c.server.transactions == 50
    assert c.path.client_netns == f"net:[{child.inode}]"


@pytest.mark.root
def test_different_namespaces_need_an_address(bridged):
    """Client and server in different namespaces without an address is an input error."""
    host, child = bridged
    with pytest.raises(InputError) as info:
        probe.rr(child, host, count=10)
    assert info.value.field == "address"

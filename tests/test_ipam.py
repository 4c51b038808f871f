"""IPAM: Docker's pool choice, subnet validation, and the file-locked allocator.

Nothing here needs root: the allocator is bookkeeping in a state directory, and the only
kernel data read is a route dump of the caller's own namespace (read-only).
"""
import errno
import ipaddress
import json
import multiprocessing
import os
import random
import socket
import tempfile
import threading
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nslab.ipam as ipam_module
from nslab.errors import InputError, NslabError, ResourceExhaustedError
from nslab.ipam import (DEFAULT_POOLS, POOL_EXHAUSTED, RT_SCOPE_LINK, Ipam, choose_subnet,
                        host_avoid_list, nameserver_networks, parse_nameservers, read_nameservers,
                        validate_subnet)

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


# --- Docker's pools and the choice ------------------------------------------------------------
def test_default_pools_are_dockers():
    """The pools are 172.17-31 as /16s, then 192.168.0.0/16 as /20s, in that order."""
    assert DEFAULT_POOLS[0] == N("172.17.0.0/16")
    assert DEFAULT_POOLS[14] == N("172.31.0.0/16")
    assert DEFAULT_POOLS[15] == N("192.168.0.0/20")
    assert DEFAULT_POOLS[-1] == N("192.168.240.0/20")
    assert len(DEFAULT_POOLS) == 15 + 16


def test_choose_subnet_takes_the_first_free_pool():
    """With nothing to avoid, the first pool is docker0's 172.17.0.0/16."""
    assert choose_subnet([], []) == N("172.17.0.0/16")


def test_choose_subnet_skips_a_running_docker0():
    """An on-link 172.17.0.0/16 (a running docker0) pushes the choice to 172.18.0.0/16."""
    assert choose_subnet([N("172.17.0.0/16")], []) == N("172.18.0.0/16")


def test_choose_subnet_skips_a_pool_holding_a_nameserver():
    """A nameserver at 172.18.0.53 rules out 172.18.0.0/16 even though no route covers it."""
    avoid = host_avoid_list([], ["172.18.0.53"])
    assert choose_subnet(avoid, [N("172.17.0.0/16")]) == N("172.19.0.0/16")


def test_choose_subnet_skips_partial_overlaps_and_taken_networks():
    """A /24 inside a pool, or a supernet covering pools, rules those pools out too."""
    assert choose_subnet([N("172.17.5.0/24")], [N("172.18.0.0/15")]) == N("172.20.0.0/16")
    avoid = [N("172.16.0.0/12"), N("192.168.0.0/20")]
    assert choose_subnet(avoid, []) == N("192.168.16.0/20")


def test_choose_subnet_exhaustion_uses_dockers_wording():
    """When every pool overlaps something, the error is Docker's, as ResourceExhaustedError."""
    with pytest.raises(ResourceExhaustedError) as info:
        choose_subnet([N("172.16.0.0/12")], [N("192.168.0.0/16")])
    assert POOL_EXHAUSTED == "could not find an available, non-overlapping IPv4 address pool"
    assert POOL_EXHAUSTED in str(info.value)


def test_host_avoid_list_keeps_only_ipv4_on_link_main_routes():
    """Only IPv4, main-table, scope-link routes with a destination count; nameservers as /32s."""
    routes = [
        {"family": 2, "dst": "192.168.1.0", "dst_len": 24, "scope": RT_SCOPE_LINK, "table": 254},
        {"family": 2, "dst_len": 0, "scope": 0, "table": 254},                   # default via gw
        {"family": 2, "dst_len": 0, "scope": RT_SCOPE_LINK, "table": 254},       # default dev wg0
        {"family": 2, "dst": "10.8.0.0", "dst_len": 16, "scope": 0, "table": 254},  # via a gateway
        {"family": 2, "dst": "172.17.0.0", "dst_len": 16, "scope": RT_SCOPE_LINK},  # docker0
        {"family": 2, "dst": "10.9.0.0", "dst_len": 16, "scope": RT_SCOPE_LINK, "table": 100},
        {"family": 10, "dst": "fd00::", "dst_len": 64, "scope": RT_SCOPE_LINK, "table": 254},
        {"family": 2, "RTA_DST": "10.7.7.0", "dst_len": 24, "scope": RT_SCOPE_LINK},
    ]
    got = host_avoid_list(routes, ["10.0.0.53", "fe80::1%eth0", "not-an-ip"])
    assert got == [N("192.168.1.0/24"), N("172.17.0.0/16"), N("10.7.7.0/24"), N("10.0.0.53/32")]


def test_host_avoid_list_reads_pyroute2_messages():
    """Real route messages of this namespace (read-only dump) yield exactly its on-link /N's."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        routes = ipr.get_routes(family=socket.AF_INET, table=254)
    expected = [N(f"{r.get_attr('RTA_DST')}/{r['dst_len']}") for r in routes
                if r["scope"] == RT_SCOPE_LINK and r["dst_len"] and r.get_attr("RTA_DST")]
    assert host_avoid_list(routes) == expected
    assert all(isinstance(n, N) for n in expected)


def test_parse_nameservers(tmp_path):
    """resolv.conf parsing keeps nameserver lines in order and ignores comments and junk."""
    text = ("# generated\nnameserver 10.0.0.53\nsearch example.org\n nameserver  fd00::53 # v6\n"
            "nameserver bogus\n;nameserver 1.1.1.1\nnameserver\n")
    assert parse_nameservers(text) == ["10.0.0.53", "fd00::53"]
    assert read_nameservers("/nonexistent/resolv.conf") == []
    path = tmp_path / "resolv.conf"
    path.write_text(text)
    assert nameserver_networks(str(path)) == [N("10.0.0.53/32")]


# --- validate_subnet ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, reason", [
    ("10.0.0.1/24", "host bits"),
    ("10.0.0.0/31", "too small"),
    ("10.0.0.0/32", "too small"),
    ("10.0.0.0", "prefix length"),
    ("fd00::/64", "IPv4"),
    (ipaddress.IPv6Network("fd00::/64"), "IPv4"),
    ("10.0.0.0/33", "not an IP network"),
    ("banana", "not an IP network"),
    ("", "not an IP network"),
    (" 10.0.0.0/24", "not an IP network"),
    ("10.0.0.0/24; rm -rf /", "not an IP network"),
    (24, "expected a string"),
    (None, "expected a string"),
    ("127.0.0.0/8", "loopback"),
    ("224.0.0.0/24", "multicast"),
    ("0.0.0.0/0", "unusable"),
    ("10.1.2.0/24", "overlaps 10.0.0.0/14"),
])
def test_validate_subnet_rejects(value, reason):
    """Each bad subnet raises InputError naming the field and saying why."""
    with pytest.raises(InputError) as info:
        validate_subnet(value, field="networks.lab.subnet", avoid=[N("10.0.0.0/14")])
    assert info.value.field == "networks.lab.subnet"
    assert reason in str(info.value)
    assert "networks.lab.subnet" in str(info.value)


def test_validate_subnet_accepts_good_input():
    """A string or IPv4Network that is clean comes back as the IPv4Network."""
    assert validate_subnet("10.4.0.0/30") == N("10.4.0.0/30")
    assert validate_subnet(N("192.168.0.0/20"), avoid=[N("192.168.16.0/20")]) == N("192.168.0.0/20")


# --- the allocator: examples --------------------------------------------------------------------
@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path)


def journal_path(state_dir, network="n"):
    return os.path.join(state_dir, "ipam", f"{network}.journal")


def read_journal(state_dir, network="n"):
    with open(journal_path(state_dir, network), "rb") as f:
        return f.read()


def test_allocate_lowest_first_and_reserved_addresses(state_dir, no_fd_leak):
    """Addresses come lowest first, skipping network, gateway and broadcast, then run out."""
    with Ipam(state_dir, "n", "10.0.0.0/29") as ipam:
        assert ipam.gateway == A("10.0.0.1")
        got = [ipam.allocate(f"c{i}") for i in range(5)]
        assert got == [A(f"10.0.0.{i}") for i in range(2, 7)]
        with pytest.raises(ResourceExhaustedError) as info:
            ipam.allocate("one-too-many")
        assert "'n'" in str(info.value) and "10.0.0.0/29" in str(info.value)
        assert ipam.capacity == 5


def test_requested_address_errors(state_dir):
    """A requested address that is taken, reserved or outside the subnet is refused clearly."""
    with Ipam(state_dir, "n", "10.0.0.0/24", gateway="10.0.0.254") as ipam:
        assert ipam.allocate("a", "10.0.0.1") == A("10.0.0.1")     # .1 is free: gw is .254
        with pytest.raises(NslabError) as info:
            ipam.allocate("b", "10.0.0.1")
        assert info.value.errno == errno.EADDRINUSE and "'a'" in str(info.value)
        for bad, why in [("10.0.0.254", "gateway"), ("10.0.0.0", "network address"),
                         ("10.0.0.255", "broadcast"), ("10.0.1.1", "outside"),
                         ("10.0.0.300", "not an IPv4"), ("fe80::1", "not an IPv4")]:
            with pytest.raises(InputError) as info:
                ipam.allocate("b", bad)
            assert info.value.field == "address" and why in str(info.value)
        with pytest.raises(InputError) as info:
            ipam.allocate("", None)
        assert info.value.field == "owner"
        assert ipam.allocations() == {A("10.0.0.1"): "a"}


def test_bad_network_name_and_gateway(state_dir):
    """Network names that a path or shell would misread, and gateways outside the subnet, fail."""
    for name in ["", "../x", "a/b", ".hidden", "x;id", "a" * 65, None]:
        with pytest.raises(InputError) as info:
            Ipam(state_dir, name, "10.0.0.0/24")
        assert info.value.field == "network"
    for gw in ["10.0.1.1", "10.0.0.0", "10.0.0.255", "nope"]:
        with pytest.raises(InputError) as info:
            Ipam(state_dir, "n", "10.0.0.0/24", gateway=gw)
        assert info.value.field == "gateway"
    assert not os.path.exists(os.path.join(state_dir, "ipam", "n.json"))


def test_release_is_idempotent_and_reusable(state_dir):
    """release() says whether it freed something, twice is fine, and the address comes back."""
    with Ipam(state_dir, "n", "10.0.0.0/30") as ipam:        # exactly one usable address
        addr = ipam.allocate("a")
        assert addr == A("10.0.0.2")
        with pytest.raises(ResourceExhaustedError):
            ipam.allocate("b")
        assert ipam.release(addr) is True
        assert ipam.release(addr) is False
        assert ipam.release("10.0.0.1") is False              # the gateway is never held
        assert ipam.allocate("b") == addr
        assert ipam.owner_of(addr) == "b"


def test_release_owner_and_release_where(state_dir):
    """release_owner frees all of one owner's addresses; release_where is the GC's filter."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
        for owner in ["a", "b", "a", "c", "dead:1", "dead:2"]:
            ipam.allocate(owner)
        assert ipam.release_owner("a") == [A("10.0.0.2"), A("10.0.0.4")]
        assert ipam.release_owner("a") == []
        gone = ipam.release_where(lambda addr, owner: owner.startswith("dead:"))
        assert gone == {A("10.0.0.6"): "dead:1", A("10.0.0.7"): "dead:2"}
        assert ipam.allocations() == {A("10.0.0.3"): "b", A("10.0.0.5"): "c"}
        assert ipam.allocate("d") == A("10.0.0.2")            # lowest free again


def test_state_is_shared_json_on_disk(state_dir):
    """A second handle sees the first's reservations; the network's description is plain
    JSON, its reservations a plain-text journal with one line per change."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as one, Ipam(state_dir, "n", "10.0.0.0/24") as two:
        one.allocate("x")
        assert two.allocate("y") == A("10.0.0.3")
        assert one.release("10.0.0.2") is True
        assert two.allocations() == {A("10.0.0.3"): "y"}
        with open(os.path.join(state_dir, "ipam", "n.json")) as f:
            data = json.load(f)
        assert data["subnet"] == "10.0.0.0/24" and data["gateway"] == "10.0.0.1"
        assert data["version"] == 2 and data["network"] == "n" and "allocations" not in data
        assert read_journal(state_dir) == (b"nslab-ipam-journal 2 n 10.0.0.0/24 10.0.0.1\n"
                                           b"+10.0.0.2 x\n+10.0.0.3 y\n-10.0.0.2\n")
    assert not [n for n in os.listdir(os.path.join(state_dir, "ipam")) if n.endswith(".tmp")]


def test_reopen_must_agree_and_networks_must_not_overlap(state_dir):
    """Reopening with another subnet/gateway, or a second network overlapping, is an InputError."""
    Ipam(state_dir, "n", "10.0.0.0/24", gateway="10.0.0.9").close()
    with Ipam(state_dir, "n", "10.0.0.0/24") as again:       # no gateway: adopts the stored one
        assert again.gateway == A("10.0.0.9")
    with pytest.raises(InputError) as info:
        Ipam(state_dir, "n", "10.0.1.0/24")
    assert info.value.field == "subnet"
    with pytest.raises(InputError) as info:
        Ipam(state_dir, "n", "10.0.0.0/24", gateway="10.0.0.1")
    assert info.value.field == "gateway"
    with pytest.raises(InputError) as info:
        Ipam(state_dir, "m", "10.0.0.0/16")
    assert "overlaps" in str(info.value) and "'n'" in str(info.value)


def test_for_network_chooses_reuses_and_validates(state_dir):
    """for_network picks Docker's next free pool per new network and keeps an existing one."""
    avoid = [N("172.17.0.0/16")]
    with Ipam.for_network(state_dir, "a", avoid) as a, Ipam.for_network(state_dir, "b", avoid) as b:
        assert (a.subnet, b.subnet) == (N("172.18.0.0/16"), N("172.19.0.0/16"))
    with Ipam.for_network(state_dir, "a", avoid) as again:
        assert again.subnet == N("172.18.0.0/16")
    assert Ipam.held_subnets(state_dir) == {"a": N("172.18.0.0/16"), "b": N("172.19.0.0/16")}
    with pytest.raises(InputError) as info:
        Ipam.for_network(state_dir, "c", avoid, subnet="172.17.1.0/24")
    assert info.value.field == "subnet"
    with pytest.raises(ResourceExhaustedError):
        Ipam.for_network(state_dir, "d", avoid, pools=[N("172.17.0.0/16"), N("172.18.0.0/16")])


def test_remove_only_if_unused_asks_under_the_locks(state_dir, no_fd_leak):
    """gc's removal leaves a network whose journal holds an address, or that someone still
    names (``wanted``, asked while the locks that opening and allocating take are held)."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
        ip = ipam.allocate("live-lab/c1")
        assert Ipam.remove(state_dir, "n", only_if_unused=True) is False
        ipam.release(ip)
        asked = []

        def wanted():
            asked.append(True)
            return True
        assert Ipam.remove(state_dir, "n", only_if_unused=True, wanted=wanted) is False and asked
        assert Ipam.held_subnets(state_dir) == {"n": N("10.0.0.0/24")}
        assert ipam.allocate("live-lab/c2")            # untouched: still usable
        ipam.release_owner("live-lab/c2")
    assert Ipam.remove(state_dir, "n", only_if_unused=True, wanted=lambda: False) is True
    assert Ipam.held_subnets(state_dir) == {}


def test_remove_forgets_and_stale_handles_fail(state_dir, no_fd_leak):
    """remove() deletes a network's state (idempotently); a handle still open gets ENOENT."""
    stale = Ipam(state_dir, "n", "10.0.0.0/24")
    stale.allocate("x")
    assert Ipam.remove(state_dir, "n") is True
    assert Ipam.remove(state_dir, "n") is False
    assert Ipam.held_subnets(state_dir) == {}
    with pytest.raises(FileNotFoundError):
        stale.allocate("y")
    stale.close()
    stale.close()
    assert "closed" in repr(stale)
    with Ipam(state_dir, "n", "10.9.0.0/24") as fresh:
        assert fresh.allocations() == {}
    closing = Ipam(state_dir, "n", "10.9.0.0/24")
    closing.close(remove=True)
    closing.close(remove=True)
    assert Ipam.held_subnets(state_dir) == {}


def test_corrupt_state_is_reported(state_dir):
    """A damaged state file raises an error naming the file instead of handing out addresses."""
    Ipam(state_dir, "n", "10.0.0.0/24").close()
    path = os.path.join(state_dir, "ipam", "n.json")
    with open(path, "w") as f:
        f.write('{"version": 1, "subnet": "10.0.0.0/24"')
    with pytest.raises(NslabError) as info:
        Ipam(state_dir, "n", "10.0.0.0/24")
    assert info.value.errno == errno.EBADMSG and path in str(info.value)


# --- the journal ------------------------------------------------------------------------------
def test_torn_record_at_the_end_is_ignored_and_cut_off(state_dir):
    """A final line without its newline (a writer that died mid-write) never happened: the
    next locked reader cuts it off, and whole lines before it still count."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as one:
        one.allocate("x")                                           # 10.0.0.2
        before = read_journal(state_dir)
        for torn in [b"+10.0.0.3 gho", b"+", b"\0\0\0\0"]:
            with open(journal_path(state_dir), "ab") as f:
                f.write(torn)
            with Ipam(state_dir, "n", "10.0.0.0/24") as two:
                assert two.allocations() == {A("10.0.0.2"): "x"}
            assert read_journal(state_dir) == before
        with open(journal_path(state_dir), "ab") as f:
            f.write(b"-10.0.0.2\n+10.0.0.3 gh")                   # one whole record, one torn
        assert one.allocate("y") == A("10.0.0.2")                   # sees the release only
        assert read_journal(state_dir) == before + b"-10.0.0.2\n+10.0.0.2 y\n"
        assert one.allocate("z") == A("10.0.0.3")


def test_failed_append_leaves_nothing_behind(state_dir, monkeypatch):
    """A write that fails half-way (a full tmpfs) fails the operation and is cut off, so the
    journal stays whole and the next operation works."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
        ipam.allocate("x")
        before = read_journal(state_dir)

        def half_then_enospc(fd, data):
            if len(data) > 4:
                return os.write(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ipam_module, "os", _OsProxy(write=half_then_enospc))
        with pytest.raises(NslabError) as info:
            ipam.allocate("y")
        assert info.value.errno == errno.ENOSPC and "n.journal" in str(info.value)
        monkeypatch.undo()
        assert read_journal(state_dir) == before
        assert ipam.allocate("y") == A("10.0.0.3")
        assert ipam.allocations() == {A("10.0.0.2"): "x", A("10.0.0.3"): "y"}


def test_old_format_and_corrupt_journal_are_reported(state_dir):
    """A state file of another format version (nslab's old single JSON file) is refused as
    corrupt, not misread; so is a journal record no writer could have written."""
    Ipam(state_dir, "n", "10.0.0.0/24").close()
    path = os.path.join(state_dir, "ipam", "n.json")
    with open(path, "w") as f:
        json.dump({"version": 1, "network": "n", "subnet": "10.0.0.0/24", "gateway": "10.0.0.1",
                   "low_water": 3, "allocations": {"10.0.0.2": "x"}}, f)
    for attempt in [lambda: Ipam(state_dir, "n", "10.0.0.0/24"), lambda: Ipam.held_subnets(state_dir)]:
        with pytest.raises(NslabError) as info:
            attempt()
        assert info.value.errno == errno.EBADMSG
        assert "unknown format version 1" in str(info.value) and path in str(info.value)
    Ipam.remove(state_dir, "n")
    for bad in [b"+10.0.0.2 again\n", b"-10.0.0.9\n", b"hello\n", b"+10.0.0.1 gateway\n",
                b"+10.0.0.300 x\n", b"+10.0.0.4\n"]:
        Ipam.remove(state_dir, "m")
        with Ipam(state_dir, "m", "10.0.0.0/24") as ipam:
            ipam.allocate("x")
            with open(journal_path(state_dir, "m"), "ab") as f:
                f.write(bad)
            for _ in range(2):                                      # and it stays refused
                with pytest.raises(NslabError) as info:
                    ipam.allocate("y")
                assert info.value.errno == errno.EBADMSG
                assert journal_path(state_dir, "m") in str(info.value)
    with open(journal_path(state_dir, "m"), "wb") as f:
        f.write(b"something else entirely\n")
    with pytest.raises(NslabError) as info, Ipam(state_dir, "m", "10.0.0.0/24") as ipam:
        ipam.allocations()
    assert info.value.errno == errno.EBADMSG and "not a version 2 journal" in str(info.value)


def test_half_made_or_half_removed_network_is_made_afresh(state_dir):
    """A creation that died before the description leaves no network; a removal that died
    after the journal fails open handles, keeps the subnet taken, and reopening finishes it."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
        ipam.allocate("x")
    os.unlink(os.path.join(state_dir, "ipam", "n.json"))           # journal, no description
    assert Ipam.held_subnets(state_dir) == {}
    with Ipam(state_dir, "n", "10.1.0.0/24") as ipam:              # another subnet is fine
        assert ipam.allocations() == {}
        assert ipam.allocate("y") == A("10.1.0.2")
        os.unlink(journal_path(state_dir))                          # description, no journal
        with pytest.raises(FileNotFoundError):
            ipam.allocate("z")
    assert Ipam.held_subnets(state_dir) == {"n": N("10.1.0.0/24")}
    with Ipam.for_network(state_dir, "n") as ipam:
        assert ipam.subnet == N("10.1.0.0/24") and ipam.allocations() == {}
    leftovers = ["n.journal.123.456.tmp", "n.json.7.8.tmp", "n.journal.1.json.2.3.tmp"]
    for name in leftovers:                                          # of crashed rewrites
        open(os.path.join(state_dir, "ipam", name), "w").close()
    assert Ipam.remove(state_dir, "n") is True
    assert sorted(os.listdir(os.path.join(state_dir, "ipam"))) == [".pools.lock", leftovers[2]]


def test_compaction_keeps_the_journal_short(state_dir):
    """Churn compacts the journal: it never holds much more than twice the live entries."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as one, Ipam(state_dir, "n", "10.0.0.0/24") as two:
        for i in range(5):
            one.allocate(f"keep{i}")
        for k in range(2000):
            (one, two)[k % 2].release((two, one)[k % 2].allocate(f"c{k}"))
            lines = read_journal(state_dir).count(b"\n")
            assert lines <= 1 + 2 * 5 + ipam_module._COMPACT_SLACK + 2
        assert one.allocations() == two.allocations() == {A(f"10.0.0.{i + 2}"): f"keep{i}"
                                                          for i in range(5)}


def _compacting_worker(state_dir, start, queue):
    ipam_module._COMPACT_SLACK = 0                              # compact at every change
    try:
        start.wait()
        with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
            for k in range(20):
                ipam.release(ipam.allocate(f"w{k}"))
            queue.put(str(ipam.allocate("worker" * 40)))            # the new file is longer
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put(exc)


def test_compaction_by_another_process_mid_use(state_dir):
    """A handle whose journal another process compacted (a new file renamed over it) reads
    the new one whole, and appends to it, not to the file it had open."""
    with Ipam(state_dir, "n", "10.0.0.0/24") as mine:
        for i in range(5):
            mine.allocate(f"m{i}")                                  # 10.0.0.2 - .6
        assert mine.release("10.0.0.3")
        before = os.stat(journal_path(state_dir))
        assert _run_processes(_compacting_worker, lambda i: (state_dir,), 1) == ["10.0.0.3"]
        assert os.stat(journal_path(state_dir)).st_ino != before.st_ino
        assert os.stat(journal_path(state_dir)).st_size > before.st_size
        assert mine.allocations() == {A("10.0.0.2"): "m0", A("10.0.0.3"): "worker" * 40,
                                      A("10.0.0.4"): "m2", A("10.0.0.5"): "m3", A("10.0.0.6"): "m4"}
        assert mine.allocate("late") == A("10.0.0.7")
    with Ipam(state_dir, "n", "10.0.0.0/24") as fresh:
        assert fresh.owner_of("10.0.0.7") == "late"


class _OsProxy:
    """``os`` for nslab.ipam, with some functions replaced (to count or to fail them)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def test_cost_per_operation_does_not_grow_with_allocations(state_dir, monkeypatch):
    """Bytes read and written per allocate/release, compactions included (amortized over a
    window several compaction periods long), stay flat from 10 to 1,000 to 4,000 held
    addresses. (The one-file format moved the whole state each time: ~400x from 10 to 4,000.)"""
    counted = {"bytes": 0}

    def pread(fd, n, offset):
        data = os.pread(fd, n, offset)
        counted["bytes"] += len(data)
        return data

    def write(fd, data):
        n = os.write(fd, data)
        counted["bytes"] += n
        return n

    per_op = {}
    for held in (10, 1000, 4000):
        directory = os.path.join(state_dir, str(held))
        with Ipam(directory, "n", "10.0.0.0/16") as one, Ipam(directory, "n", "10.0.0.0/16") as two:
            for i in range(held):
                one.allocate(f"c{i}")
            two.allocations()
            monkeypatch.setattr(ipam_module, "os", _OsProxy(pread=pread, write=write))
            counted["bytes"] = 0
            cycles = 3 * (held + ipam_module._COMPACT_SLACK)
            for k in range(cycles):                                 # each reads the other's
                two.release(one.allocate(f"n{k}"))
            monkeypatch.undo()
            per_op[held] = counted["bytes"] / (2 * cycles)
            assert one.allocations() == two.allocations() and len(two.allocations()) == held
    assert per_op[4000] <= 1.3 * per_op[1000], per_op
    assert per_op[4000] <= 3 * per_op[10], per_op


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(owners=st.lists(st.text(st.characters(codec=None, exclude_categories=()), min_size=1,
                               max_size=256), min_size=1, max_size=5))
def test_any_owner_string_round_trips_through_the_journal(owners):
    """Owners with newlines, backslashes, spaces, non-ASCII or lone surrogates come back from
    another handle exactly, one journal line per reservation."""
    with tempfile.TemporaryDirectory() as tmp, Ipam(tmp, "n", "10.0.0.0/24") as one, \
            Ipam(tmp, "n", "10.0.0.0/24") as two:
        got = {one.allocate(owner): owner for owner in owners}
        assert two.allocations() == got
        assert read_journal(tmp).count(b"\n") == 1 + len(owners)


# --- the allocator against a model ------------------------------------------------------------
OPS = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 3)),                     # owner index
    st.tuples(st.just("alloc_at"), st.integers(0, 15), st.integers(0, 3)),  # offset, owner
    st.tuples(st.just("release"), st.integers(0, 15)),
    st.tuples(st.just("release_owner"), st.integers(0, 3)),
), max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.integers(28, 30), gw_offset=st.integers(1, 14), ops=OPS)
def test_allocator_matches_a_model(prefix, gw_offset, ops):
    """Any sequence of operations gives what a plain set model says: no duplicates, never a
    reserved address, exhaustion exactly when the model is full, released addresses reusable."""
    subnet = N(f"10.1.2.0/{prefix}")
    gw = subnet.network_address + (gw_offset % (subnet.num_addresses - 2)) + 1
    with tempfile.TemporaryDirectory() as tmp, Ipam(tmp, "m", subnet, gateway=gw) as ipam:
        run_model(tmp, subnet, gw, ops, [ipam])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.integers(28, 30), gw_offset=st.integers(1, 14), ops=OPS)
def test_two_handles_compacting_at_every_change_match_the_model(prefix, gw_offset, ops):
    """The same, alternating between two handles of one network while the journal is
    compacted at every change: each handle replays the other's records, then reloads the
    other's snapshot, and neither ever disagrees with the model."""
    subnet = N(f"10.1.2.0/{prefix}")
    gw = subnet.network_address + (gw_offset % (subnet.num_addresses - 2)) + 1
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(ipam_module, "_COMPACT_SLACK", 0), \
            Ipam(tmp, "m", subnet, gateway=gw) as one, Ipam(tmp, "m", subnet) as two:
        run_model(tmp, subnet, gw, ops, [one, two])


def run_model(tmp, subnet, gw, ops, handles):
    size = subnet.num_addresses
    usable = {subnet.network_address + i for i in range(1, size - 1)} - {gw}
    model: dict[A, str] = {}
    for step, op in enumerate(ops):
        ipam = handles[step % len(handles)]
        if op[0] == "alloc":
            owner = f"o{op[1]}"
            free = usable - set(model)
            if not free:
                with pytest.raises(ResourceExhaustedError):
                    ipam.allocate(owner)
            else:
                got = ipam.allocate(owner)
                assert got == min(free)
                model[got] = owner
        elif op[0] == "alloc_at":
            addr, owner = subnet.network_address + (op[1] % size), f"o{op[2]}"
            if addr not in usable:
                with pytest.raises(InputError):
                    ipam.allocate(owner, addr)
            elif addr in model:
                with pytest.raises(NslabError) as info:
                    ipam.allocate(owner, addr)
                assert info.value.errno == errno.EADDRINUSE
            else:
                assert ipam.allocate(owner, str(addr)) == addr
                model[addr] = owner
        elif op[0] == "release":
            addr = subnet.network_address + (op[1] % size)
            assert ipam.release(addr) is (addr in model)
            model.pop(addr, None)
        else:
            owner = f"o{op[1]}"
            freed = ipam.release_owner(owner)
            assert freed == sorted(a for a, o in model.items() if o == owner)
            for a in freed:
                del model[a]
        assert ipam.allocations() == dict(sorted(model.items()))
        assert not (set(model) - usable)
    with Ipam(tmp, "m", subnet) as other:                  # what is on disk agrees
        assert other.allocations() == dict(sorted(model.items()))


# --- concurrency ---------------------------------------------------------------------------------
def test_threads_with_separate_handles_never_share_an_address(state_dir):
    """16 threads, each with its own Ipam on one state dir, allocating at once: no duplicates."""
    barrier = threading.Barrier(16)
    results: list[list[A]] = [[] for _ in range(16)]
    errors = []

    def worker(i):
        try:
            with Ipam(state_dir, "n", "10.0.0.0/22") as ipam:
                barrier.wait()
                for k in range(30):
                    results[i].append(ipam.allocate(f"t{i}-{k}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    flat = [a for r in results for a in r]
    assert len(flat) == len(set(flat)) == 16 * 30
    with Ipam(state_dir, "n", "10.0.0.0/22") as ipam:
        assert set(ipam.allocations()) == set(flat)


def test_threads_sharing_one_handle_never_share_an_address(state_dir):
    """16 threads on one Ipam object (one open file, so flock alone would not exclude them)."""
    barrier = threading.Barrier(16)
    got: list[A] = []
    with Ipam(state_dir, "n", "10.0.0.0/22") as ipam:
        def worker(i):
            barrier.wait()
            for k in range(30):
                addr = ipam.allocate(f"t{i}-{k}")
                got.append(addr)
                if k % 3 == 0:
                    ipam.release(addr)
                    got.remove(addr)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == len(set(got)) == 16 * 20
        assert set(ipam.allocations()) == set(got)


def _process_worker(state_dir, index, count, start, queue):
    try:
        with Ipam(state_dir, "n", "10.0.0.0/22") as ipam:
            start.wait()
            queue.put([str(ipam.allocate(f"p{index}-{k}")) for k in range(count)])
    except BaseException as exc:  # noqa: BLE001 - reported by the parent, not a 60 s timeout
        queue.put(exc)


def _network_worker(state_dir, index, start, queue):
    try:
        start.wait()
        with Ipam.for_network(state_dir, f"net{index}", [N("172.17.0.0/16")]) as ipam:
            queue.put(str(ipam.subnet))
    except BaseException as exc:  # noqa: BLE001
        queue.put(exc)


def _run_processes(target, args_of, n):
    ctx = multiprocessing.get_context("spawn")
    # A barrier, not an event: spawned interpreters take ~100 ms to start, and an event set
    # early would let them run one after the other instead of at once.
    start, queue = ctx.Barrier(n, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=target, args=args_of(i) + (start, queue)) for i in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_processes_never_share_an_address(state_dir):
    """4 processes × 50 allocations on one state dir at once: 200 distinct addresses."""
    results = _run_processes(_process_worker, lambda i: (state_dir, i, 50), 4)
    flat = [a for r in results for a in r]
    assert len(flat) == len(set(flat)) == 200
    with Ipam(state_dir, "n", "10.0.0.0/22") as ipam:
        assert {str(a) for a in ipam.allocations()} == set(flat)


def test_processes_creating_networks_get_distinct_pools(state_dir):
    """4 processes creating networks at once get 4 different Docker pools, none docker0's."""
    subnets = _run_processes(_network_worker, lambda i: (state_dir, i), 4)
    assert sorted(subnets) == [f"172.{n}.0.0/16" for n in range(18, 22)]


def _churn_worker(state_dir, index, count, slots, guard, start, queue):
    ipam_module._COMPACT_SLACK = 0                              # compact at every change
    try:
        rng = random.Random(index)
        held: list[A] = []
        with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
            start.wait()
            for k in range(count):
                if held and (len(held) >= 20 or rng.random() < 0.4):
                    addr = held.pop(rng.randrange(len(held)))
                    with guard:
                        slots[int(addr) & 0xFF] = 0                 # before IPAM frees it
                    assert ipam.release(addr) is True
                else:
                    addr = ipam.allocate(f"p{index}-{k}")
                    with guard:
                        other = slots[int(addr) & 0xFF]
                        assert not other, f"{addr} handed out while process {other - 1} holds it"
                        slots[int(addr) & 0xFF] = index + 1
                    held.append(addr)
            queue.put(sorted(str(a) for a in held))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        queue.put(exc)


def test_processes_allocating_and_releasing_while_compacting_never_share_an_address(state_dir):
    """4 processes allocating and releasing at random, compacting at every change (so each
    keeps reloading the others' snapshots): no address is ever held by two at once."""
    ctx = multiprocessing.get_context("spawn")
    slots, guard = ctx.Array("i", 256, lock=False), ctx.Lock()
    results = _run_processes(_churn_worker, lambda i: (state_dir, i, 150, slots, guard), 4)
    flat = [a for r in results for a in r]
    assert len(flat) == len(set(flat))
    with Ipam(state_dir, "n", "10.0.0.0/24") as ipam:
        assert {str(a) for a in ipam.allocations()} == set(flat)

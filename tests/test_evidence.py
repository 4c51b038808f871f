"""Evidence views: the /proc parsers (no root), then views of real namespaces (root).

Root tests build two throwaway network namespaces with ``Namespace.create("net")`` — a
"sandbox" holding a bridge and a veth, and a "child" holding the veth's peer as ``eth0`` —
and check each view against what was set. The real host's namespace is only ever read.
"""
import dataclasses
import ipaddress
import json
import os
import secrets
import socket
import sys

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nslab.errors import InputError
from nslab.evidence import (PATH_SOCKETS, Address, Interface, Route, Socket, View, compare,
                            decode_proc_endpoint, parse_proc_inet, parse_proc_unix)
from nslab.namespaces import Namespace



# --- parsers (pure) -----------------------------------------------------------------------------
def _kernel_hex(packed: bytes, byteorder: str) -> str:
    """Encode an address the way the kernel prints it: each 32-bit word as a native %08X."""
    return "".join(f"{int.from_bytes(packed[i:i + 4], byteorder):08X}" for i in range(0, len(packed), 4))


def test_decode_proc_endpoint_examples():
    """Known lines decode to the right address and port on both byte orders."""
    assert decode_proc_endpoint("0100007F:1F90", "little") == ("127.0.0.1", 8080)
    assert decode_proc_endpoint("7F000001:1F90", "big") == ("127.0.0.1", 8080)
    assert decode_proc_endpoint("0200A8C0:0035", "little") == ("192.168.0.2", 53)
    assert decode_proc_endpoint("00000000000000000000000001000000:0035", "little") == ("::1", 53)
    assert decode_proc_endpoint("B80D0120000000000000000001000000:01BB", "little") == ("2001:db8::1", 443)
    with pytest.raises(ValueError):
        decode_proc_endpoint("0100007F00:1F90")


@settings(max_examples=200)
@given(addr=st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), port=st.integers(0, 65535),
       byteorder=st.sampled_from(["little", "big"]))
def test_decode_proc_endpoint_round_trips(addr, port, byteorder):
    """Any address and port, printed as the kernel prints them, decodes back exactly."""
    text = f"{_kernel_hex(addr.packed, byteorder)}:{port:04X}"
    assert decode_proc_endpoint(text, byteorder) == (str(addr), port)


TCP_TEXT = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 020012AC:1F90 010012AC:BD2A 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
"""
UDP6_TEXT = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  12: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5151 2 0000000000000000 0
  13: 00000000000000000000000001000000:C000 00000000000000000000000001000000:0035 01 00000000:00000000 00:00000000 00000000     0        0 5252 2 0000000000000000 0
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="sample text written on little-endian")
def test_parse_proc_inet_tcp_and_udp6():
    """A LISTEN and an ESTABLISHED TCP line, an unconnected and a connected UDPv6 line."""
    tcp = parse_proc_inet(TCP_TEXT, "tcp")
    assert [(s.state, s.local, s.remote, s.inode, s.listening) for s in tcp] == [
        ("LISTEN", "0.0.0.0:8080", None, 4242, True),
        ("ESTABLISHED", "172.18.0.2:8080", "172.18.0.1:48426", 4343, False)]
    udp = parse_proc_inet(UDP6_TEXT, "udp6")
    assert [(s.state, s.local, s.remote, s.listening, s.type) for s in udp] == [
        ("UNCONN", "[::]:5353", None, True, "dgram"),
        ("ESTABLISHED", "[::1]:49152", "[::1]:53", False, "dgram")]


UNIX_TEXT = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 @nslab-abstract
0000000000000000: 00000002 00000000 00010000 0001 01 31338 /tmp/a dir/with spaces.sock
0000000000000000: 00000002 00000000 00000000 0002 01 31339 @dgram@with@nuls
0000000000000000: 00000003 00000000 00000000 0001 03 31340
0000000000000000: 00000003 00000000 00000000 0001 03 31341 /run/x.sock
0000000000000000: 00000002 00000000 00000000 0005 01 31342
0000000000000000: 00000002 00000000 00000000 0005 01 31343 @bound-seqpacket
"""


def test_parse_proc_unix_named_abstract_and_unnamed():
    """Abstract names keep their '@', paths keep their spaces, unnamed sockets are counted."""
    named, unnamed = parse_proc_unix(UNIX_TEXT)
    assert unnamed == 2
    assert [(s.local, s.type, s.state, s.listening, s.inode) for s in named] == [
        ("@nslab-abstract", "stream", "LISTEN", True, 31337),
        ("/tmp/a dir/with spaces.sock", "stream", "LISTEN", True, 31338),
        ("@dgram@with@nuls", "dgram", "UNCONN", True, 31339),
        ("/run/x.sock", "stream", "ESTABLISHED", False, 31341),
        ("@bound-seqpacket", "seqpacket", "UNCONN", False, 31343)]


# --- compare on hand-made views (pure) ----------------------------------------------------------
def _view(label, net_ino, uts_ino=1, hostname="h", ifaces=("lo",), listen=()):
    return View(
        label=label, identities={"net": (4, net_ino), "uts": (4, uts_ino), "mnt": (4, 7)},
        inherited={}, hostname=hostname, sysctls={"net.ipv4.ip_forward": "0"},
        interfaces=[Interface(n, i + 1, "loopback" if n == "lo" else "veth", "00:00:00:00:00:00",
                              1500, "UNKNOWN", True) for i, n in enumerate(ifaces)],
        addresses=[Address("lo", "127.0.0.1/8", "inet", "host")],
        routes=[Route("inet", "default", "10.0.0.1", "eth0", "global", "static")],
        sockets=[Socket("tcp", "LISTEN", f"0.0.0.0:{p}", None, p, listening=True) for p in listen])


def test_compare_verdicts_shared_same_differs():
    """Same netns → shared; different netns with equal facts → same; else differs with items."""
    a, b = _view("a", 10, listen=[80]), _view("b", 11, uts_ino=2, hostname="x", ifaces=("lo", "eth0"))
    c = compare(a, b)
    assert c.verdict("net") == "differs" and c.verdict("mnt") == "shared"
    assert c.verdict("uts") == "differs" and c.verdict("hostname") == "differs"
    assert c.verdict("routes") == "same" and c.verdict("addresses") == "same"
    assert c.verdict("sysctls") == "same"
    assert c.facets["interfaces"].only_b == ("eth0 (veth) 00:00:00:00:00:00 mtu 1500 unknown",)
    assert c.facets["listening sockets"].only_a == ("tcp 0.0.0.0:80",)
    assert c.facets["listening sockets"].only_b == ()
    assert c.verdict("listening sockets") == "differs"
    again = compare(a, _view("a2", 10))
    assert again.verdict("interfaces") == "shared" and again.verdict("net") == "shared"
    assert again.facets["listening sockets"].only_a == ("tcp 0.0.0.0:80",)   # shared, yet listed
    assert set(c.differs()) == {"net", "uts", "interfaces", "listening sockets", "hostname"}


def test_path_unix_sockets_are_filesystem_scoped_not_a_netns_difference():
    """A UNIX socket bound to a path, listed by one netns only, is compared by mount namespace
    (shared here) apart from the netns facets; an abstract one still makes the netns differ."""
    path = Socket("unix", "LISTEN", "/run/app.sock", None, 1, listening=True)
    abstract = Socket("unix", "LISTEN", "@app", None, 2, listening=True)
    a = dataclasses.replace(_view("a", 10), sockets=[path])
    b = _view("b", 11)
    c = compare(a, b)
    assert c.verdict("listening sockets") == "same"
    assert c.facets["listening sockets"].only_a == ()
    facet = c.facets[PATH_SOCKETS]
    assert facet.verdict == "shared" and facet.scope == "mnt" and facet.only_a == ("unix/stream /run/app.sock",)
    assert set(c.differs()) == {"net"}
    assert list(c.facets)[-1] == PATH_SOCKETS and "filesystem-scoped" in c.table(width=120)
    assert "(by path: any netns can reach it)" in a.table()
    other_mnt = dataclasses.replace(b, identities={**b.identities, "mnt": (4, 8)})
    assert compare(a, other_mnt).verdict(PATH_SOCKETS) == "differs"
    with_abstract = compare(dataclasses.replace(a, sockets=[path, abstract]), b)
    assert with_abstract.verdict("listening sockets") == "differs"
    assert with_abstract.facets["listening sockets"].only_a == ("unix/stream @app",)


def test_view_and_comparison_serialise_and_print():
    """to_dict() survives JSON, and both tables name the labels and facets."""
    a, b = _view("bridge child", 10, listen=[80]), _view("host child", 11)
    data = json.loads(json.dumps(a.to_dict()))
    assert data["identities"]["net"] == [4, 10] and data["sockets"][0]["local"] == "0.0.0.0:80"
    cdata = json.loads(json.dumps(compare(a, b).to_dict()))
    assert cdata["facets"]["net"]["verdict"] == "differs"
    text = compare(a, b).table(width=90)
    assert "bridge child" in text and "host child" in text and "net: differs" in text
    assert "* tcp 0.0.0.0:80" in text
    assert all(len(line) <= 90 for line in text.splitlines())
    vt = a.table()
    assert vt.startswith("bridge child") and "tcp 0.0.0.0:80 LISTEN" in vt


# --- real namespaces (root) ---------------------------------------------------------------------
def _write(path, value):
    with open(path, "w") as f:
        f.write(value)


def _read(path):
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def lab(tmp_path):
    """A sandbox netns (bridge + veth host side) and a child netns (eth0, listeners)."""
    from nslab._netlink import Rtnl, socket_in
    sandbox, child = Namespace.create("net"), Namespace.create("net")
    uts = Namespace.create("uts")
    rs, rc = Rtnl(sandbox), Rtnl(child)
    owned = [rs, rc]
    try:
        host_side = "veth" + secrets.token_hex(4)[:7]
        rs.request("link", "add", ifname="nslabbr0", kind="bridge", obj="bridge")
        rs.request("link", "add", ifname=host_side, kind="veth", obj="veth",
                   peer={"ifname": "eth0", "net_ns_fd": child.fileno()})
        br, veth = rs.link_index("nslabbr0"), rs.link_index(host_side)
        rs.request("link", "set", index=veth, master=br, state="up", obj="veth")
        rs.request("addr", "add", index=br, address="172.31.250.1", prefixlen=24, obj="bridge")
        rs.set_up(br)
        rs.set_up(1)
        eth0 = rc.link_index("eth0")
        rc.request("link", "set", index=eth0, address="02:42:ac:1f:fa:02", mtu=1400, obj="eth0")
        rc.request("addr", "add", index=eth0, address="172.31.250.2", prefixlen=24, obj="eth0")
        rc.set_up(eth0)
        rc.set_up(1)
        rc.request("route", "add", dst="0.0.0.0/0", gateway="172.31.250.1", obj="default route")
        # Docker's per-netns sysctls, set inside the child only; accept_ra=0 on the bridge.
        child.call(_write, "/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")
        child.call(_write, "/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
        sandbox.call(_write, "/proc/sys/net/ipv6/conf/nslabbr0/accept_ra", "0")
        uts.call(socket.sethostname, "nslab-child")

        abstract = "nslab-ev-" + secrets.token_hex(4)
        path = str(tmp_path / "child.sock")
        tcp = socket_in(child, socket.AF_INET, socket.SOCK_STREAM, 0)
        tcp.bind(("0.0.0.0", 8080))
        tcp.listen()
        udp6 = socket_in(child, socket.AF_INET6, socket.SOCK_DGRAM, 0)
        udp6.bind(("::", 5353))
        unix_abs = socket_in(child, socket.AF_UNIX, socket.SOCK_STREAM, 0)
        unix_abs.bind("\0" + abstract)
        unix_abs.listen()
        unix_path = socket_in(child, socket.AF_UNIX, socket.SOCK_DGRAM, 0)
        unix_path.bind(path)
        client = socket_in(sandbox, socket.AF_INET, socket.SOCK_STREAM, 0)
        client.settimeout(5)
        client.connect(("172.31.250.2", 8080))
        accepted, _ = tcp.accept()
        owned += [tcp, udp6, unix_abs, unix_path, client, accepted]
        yield dict(sandbox=sandbox, child=child, uts=uts, host_side=host_side, abstract=abstract,
                   path=path, client_port=client.getsockname()[1],
                   indexes={"eth0": eth0, host_side: veth, "nslabbr0": br})
    finally:
        for obj in reversed(owned):
            obj.close()
        for ns in (uts, child, sandbox):
            ns.close()


def _dev_names(path):
    return {line.split(":")[0].strip() for line in _read(path).splitlines()[2:]}


@pytest.mark.root
def test_thread_self_net_and_sysctls_follow_the_calling_thread(lab):
    """Inside a thread that entered the child netns, /proc/thread-self/net and /proc/sys/net
    are the child's, while /proc/self/net stays the main thread's (the host's)."""
    knob = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
    host_value = _read(knob)
    value = "1023" if host_value != "1023" else "1022"

    def look():
        _write(knob, value)
        return (_dev_names("/proc/thread-self/net/dev"), _dev_names("/proc/self/net/dev"),
                _dev_names("/proc/net/dev"), _read(knob))
    thread_names, self_names, net_names, inside = lab["child"].call(look)
    host_names = {name for _index, name in socket.if_nameindex()}
    assert thread_names == {"lo", "eth0"}
    assert self_names == net_names == host_names != thread_names
    assert inside == value
    assert _read(knob) == host_value                  # the host's own knob is untouched


@pytest.mark.root
def test_child_view_reports_exactly_what_was_set(lab, no_fd_leak):
    """Identities, interfaces, MAC, MTU, addresses, routes, sockets, hostname and sysctls."""
    child, sandbox = lab["child"], lab["sandbox"]
    view = View.gather("child", {"net": child, "uts": lab["uts"]}, peers={"sandbox": sandbox})
    st_net, st_uts = os.fstat(child.fileno()), os.fstat(lab["uts"].fileno())
    assert view.identities["net"] == (st_net.st_dev, st_net.st_ino)
    assert view.identities["uts"] == (st_uts.st_dev, st_uts.st_ino)
    assert view.identities["mnt"] == Namespace.current("mnt").identity
    assert view.inherited["mnt"] == "caller" and "net" not in view.inherited

    assert [i.name for i in view.interfaces] == ["lo", "eth0"]
    lo, eth0 = view.interfaces
    assert (lo.kind, lo.up, lo.mtu) == ("loopback", True, 65536)
    assert (eth0.kind, eth0.mac, eth0.mtu, eth0.up) == ("veth", "02:42:ac:1f:fa:02", 1400, True)
    assert eth0.index == lab["indexes"]["eth0"]
    assert eth0.peer_index == lab["indexes"][lab["host_side"]]
    assert eth0.link_netnsid is not None
    assert eth0.peer == f"sandbox:{lab['host_side']}"

    assert sorted(a.item() for a in view.addresses if a.family == "inet") == [
        "eth0 inet 172.31.250.2/24", "lo inet 127.0.0.1/8"]
    assert [r.item() for r in view.routes if r.family == "inet"] == [
        "default via 172.31.250.1 dev eth0 proto static",
        "172.31.250.0/24 dev eth0 proto kernel scope link src 172.31.250.2"]

    listening = {s.item() for s in view.listening()}
    assert listening == {"tcp 0.0.0.0:8080", "udp6 [::]:5353", f"unix/stream @{lab['abstract']}",
                         f"unix/dgram {lab['path']}"}
    connected = [(s.local, s.remote) for s in view.connected()]
    assert connected == [("172.31.250.2:8080", f"172.31.250.1:{lab['client_port']}")]

    assert view.hostname == "nslab-child"
    assert view.sysctls["net.ipv4.ip_unprivileged_port_start"] == "0"
    assert view.sysctls["net.ipv4.ping_group_range"] == "0 2147483647"
    assert view.sysctls["net.ipv4.ip_forward"] == "0"
    assert not any(".nslabbr0." in k for k in view.sysctls)      # the bridge is not here


@pytest.mark.root
def test_sandbox_view_sees_bridge_and_peer_but_not_the_childs_sockets(lab):
    """The other netns: bridge, enslaved veth named back to eth0, its own sockets only."""
    view = View.gather("sandbox", {"net": lab["sandbox"]}, peers={"child": lab["child"]})
    veth, br = view.interface(lab["host_side"]), view.interface("nslabbr0")
    assert br.kind == "bridge" and veth.kind == "veth" and veth.master == "nslabbr0"
    assert veth.peer == "child:eth0" and veth.peer_index == lab["indexes"]["eth0"]
    assert view.sysctls["net.ipv6.conf.nslabbr0.accept_ra"] == "0"
    assert view.sysctls["net.ipv4.ip_unprivileged_port_start"] == "1024"
    assert view.listening() == []
    assert [(s.local, s.remote) for s in view.connected()] == [
        (f"172.31.250.1:{lab['client_port']}", "172.31.250.2:8080")]
    assert lab["abstract"] not in view.to_json()


@pytest.mark.root
def test_compare_child_and_sandbox(lab):
    """net differs and mnt is shared; the child's listeners are only on its side."""
    child = View.gather("child", {"net": lab["child"], "uts": lab["uts"]})
    sandbox = View.gather("sandbox", {"net": lab["sandbox"]})
    c = compare(child, sandbox)
    assert c.verdict("net") == "differs" and c.verdict("uts") == "differs"
    assert c.verdict("mnt") == "shared" and c.verdict("pid") == "shared"
    assert c.verdict("hostname") == "differs" and c.verdict("sysctls") == "differs"
    assert "tcp 0.0.0.0:8080" in c.facets["listening sockets"].only_a
    assert c.facets["listening sockets"].only_b == ()
    same = compare(child, View.gather("again", {"net": lab["child"], "uts": lab["uts"]}))
    assert set(same.shared()) == set(same.facets)


@pytest.mark.root
def test_path_socket_is_reachable_from_another_netns_and_compared_as_such(lab):
    """The child's path socket takes a datagram sent from the sandbox netns (the abstract one
    refuses it), and compare() files it as filesystem-scoped, shared, not as a netns difference."""
    from nslab._netlink import socket_in
    with socket_in(lab["sandbox"], socket.AF_UNIX, socket.SOCK_DGRAM, 0) as s:
        s.sendto(b"x", lab["path"])                    # delivered: no ECONNREFUSED
    with socket_in(lab["sandbox"], socket.AF_UNIX, socket.SOCK_STREAM, 0) as s:
        with pytest.raises(ConnectionRefusedError):
            s.connect("\0" + lab["abstract"])
    c = compare(View.gather("child", {"net": lab["child"]}), View.gather("sandbox", {"net": lab["sandbox"]}))
    assert c.facets[PATH_SOCKETS].verdict == "shared"
    assert c.facets[PATH_SOCKETS].only_a == (f"unix/dgram {lab['path']}",)
    assert f"unix/dgram {lab['path']}" not in c.facets["listening sockets"].only_a
    assert f"unix/stream @{lab['abstract']}" in c.facets["listening sockets"].only_a


@pytest.mark.root
def test_fresh_empty_namespaces_look_the_same_but_are_not_shared():
    """Two new netns with only lo (down): every network facet 'same', net 'differs'."""
    with Namespace.create("net") as one, Namespace.create("net") as two:
        c = compare(View.gather("one", {"net": one}), View.gather("two", {"net": two}))
    assert c.verdict("net") == "differs"
    for facet in ("interfaces", "addresses", "routes", "listening sockets", "sysctls"):
        assert c.verdict(facet) == "same", facet


@pytest.mark.root
def test_socket_owner_and_proc_fallback_agree(lab):
    """With pid given, sockets get their owner; /proc parsing and sock_diag see the same."""
    diag = View.gather("child", {"net": lab["child"]}, pid=os.getpid())
    proc = View.gather("child", {"net": lab["child"]}, socket_source="proc")
    assert diag.socket_source == "diag" and proc.socket_source == "proc"
    assert {s.pid for s in diag.listening()} == {os.getpid()}
    assert {s.process for s in diag.listening()} == {psutil.Process().name()[:15]}
    stripped = [dataclasses.replace(s, pid=None, process=None) for s in diag.sockets]
    assert stripped == proc.sockets
    assert diag.identities["uts"] == Namespace.current("uts").identity
    assert diag.inherited["uts"] == "pid"


@pytest.mark.root
def test_host_view_is_read_only_and_matches_the_host():
    """The caller's own netns: its interface names and IPv4 addresses, as psutil sees them."""
    host = Namespace.current("net")
    before = open("/proc/net/dev").read().splitlines()[2:]
    try:
        view = View.gather("host", {"net": host})
    finally:
        host.close()
    names = {name for _index, name in socket.if_nameindex()}
    assert {i.name for i in view.interfaces} == names
    expected = {(nic, f"{a.address}/{ipaddress.IPv4Network(f'0.0.0.0/{a.netmask}').prefixlen}")
                for nic, addrs in psutil.net_if_addrs().items() for a in addrs
                if a.family == socket.AF_INET}
    assert {(a.iface, a.address) for a in view.addresses if a.family == "inet"} == expected
    assert view.hostname == socket.gethostname()
    assert view.sysctls["net.ipv4.ip_forward"] == _read("/proc/sys/net/ipv4/ip_forward")
    assert [line.split()[0] for line in open("/proc/net/dev").read().splitlines()[2:]] == \
        [line.split()[0] for line in before]


@pytest.mark.root
def test_bad_input_is_refused():
    """A gone pid, a non-pid, or a handle filed under the wrong kind is an InputError."""
    with pytest.raises(InputError) as info:
        View.gather("x", pid=2 ** 22 + 12345)
    assert info.value.field == "pid"
    with pytest.raises(InputError):
        View.gather("x", pid=0)
    with Namespace.create("uts") as uts:
        with pytest.raises(InputError) as info:
            View.gather("x", {"net": uts})
    assert info.value.field == "namespaces['net']"
    with pytest.raises(InputError) as info:
        View.gather("x", socket_source="ss")
    assert info.value.field == "socket_source"

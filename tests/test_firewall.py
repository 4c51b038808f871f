"""Publishing, egress NAT and the bridge firewall, end to end with real traffic, as root.

The sandbox (built here with Namespace.create + rtnetlink; no process, nothing named):

    outside (203.0.113.2) ── uplink ──┐              ┌── nslab0 172.17.0.1/16 ── c1 172.17.0.2
                                      │  host netns  │                       └── c2 172.17.0.3
    neighbour (198.51.100.2) ─ uplink2┘ ip_forward=1 └── nslab1 172.18.0.1/16 ── c3 172.18.0.2

Servers in the children answer each connection with the peer address they see, so a test
can tell DNAT (client address kept) from the proxy (the host's bridge address). Dropped
traffic is detected with short timeouts. The ruleset is read back with the real ``nft``
(``nsenter --net=/proc/self/fd/N``: no bind mount, nothing left behind) and compared with
``tests/golden/*.json``; regenerate those with ``NSLAB_UPDATE_GOLDEN=1 pytest -k golden``.
"""
import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from nslab import _nft
from nslab._conntrack import Conntrack, Entry
from nslab._netlink import NETLINK_NETFILTER, Rtnl, socket_in
from nslab import proxy as proxy_module
from nslab.errors import InputError, NslabError, PortAllocatedError, from_errno
from nslab.firewall import Firewall, find_port_holder
from nslab.namespaces import Namespace
from nslab.proxy import UserlandProxy
from nslab.publish import PortMapping

pytestmark = pytest.mark.root

GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("NSLAB_UPDATE_GOLDEN") == "1"
HOST_UPLINK, OUTSIDE = "203.0.113.1", "203.0.113.2"
NEIGHBOUR_GW, NEIGHBOUR = "198.51.100.1", "198.51.100.2"
C1, C2, C3 = "172.17.0.2", "172.17.0.3", "172.18.0.2"
GW0, GW1 = "172.17.0.1", "172.18.0.1"
DROP_TIMEOUT = 0.4


# --- the sandbox -------------------------------------------------------------------------------
def write_sysctl(ns, path, value):
    def write():
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    ns.call(write)


def read_sysctl(ns, path):
    def read():
        with open(f"/proc/sys/{path}") as f:
            return f.read().strip()
    return ns.call(read)


class Sandbox:
    """The namespaces and links of the drawing above; close() drops every fd (and so all)."""

    def __init__(self):
        self.host = Namespace.create("net")
        self.outside = Namespace.create("net")
        self.neighbour = Namespace.create("net")
        self.kids = {n: Namespace.create("net") for n in ("c1", "c2", "c3")}
        with Rtnl(self.host) as r:
            ipr = r.ipr
            ipr.link("set", index=1, state="up")
            for name, peer, addr in (("uplink", self.outside, HOST_UPLINK),
                                     ("uplink2", self.neighbour, NEIGHBOUR_GW)):
                ipr.link("add", ifname=name, kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": peer.fileno()})
                i = r.link_index(name)
                ipr.addr("add", index=i, address=addr, prefixlen=24)
                ipr.link("set", index=i, state="up")
            for br, gw in (("nslab0", GW0), ("nslab1", GW1)):
                ipr.link("add", ifname=br, kind="bridge")
                i = r.link_index(br)
                ipr.addr("add", index=i, address=gw, prefixlen=16)
                ipr.link("set", index=i, state="up")
            for kid, br, addr, gw in (("c1", "nslab0", C1, GW0), ("c2", "nslab0", C2, GW0),
                                      ("c3", "nslab1", C3, GW1)):
                ipr.link("add", ifname=f"veth{kid}", kind="veth",
                         peer={"ifname": "eth0", "net_ns_fd": self.kids[kid].fileno()})
                i = r.link_index(f"veth{kid}")
                ipr.link("set", index=i, master=r.link_index(br))
                ipr.link("set", index=i, state="up")
                self._inside(self.kids[kid], addr, 16, gw)
        self._inside(self.outside, OUTSIDE, 24, None)
        # The neighbour plays moby#45610's attacker: lo down (so 127/8 is not local to it),
        # a route to the host's 127.0.0.1 via its uplink, route_localnet on its own eth0.
        self._inside(self.neighbour, NEIGHBOUR, 24, None, lo=False)
        with Rtnl(self.neighbour) as r:
            r.ipr.route("add", dst="127.0.0.1/32", gateway=NEIGHBOUR_GW)
        write_sysctl(self.neighbour, "net/ipv4/conf/eth0/route_localnet", "1")
        write_sysctl(self.host, "net/ipv4/ip_forward", "1")     # the sandbox host only
        self.servers = []

    @staticmethod
    def _inside(ns, addr, plen, gw, lo=True):
        with Rtnl(ns) as r:
            e = r.link_index("eth0")
            r.ipr.addr("add", index=e, address=addr, prefixlen=plen)
            r.ipr.link("set", index=e, state="up")
            if lo:
                r.ipr.link("set", index=1, state="up")
            if gw:
                r.ipr.route("add", dst="0.0.0.0/0", gateway=gw)

    def close(self):
        for s in self.servers:
            s.close()
        for ns in (self.host, self.outside, self.neighbour, *self.kids.values()):
            ns.close()


def _listen(ns, port, handle, backlog=8):
    """A TCP server in ``ns``: each accepted connection goes to ``handle(conn, peer)`` on a
    thread of its own; closing the returned socket stops it."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(backlog)

    def loop():
        while True:
            try:
                c, peer = s.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c, peer), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return s


def tcp_server(ns, port):
    """Answers each connection with the peer address it sees."""
    def handle(c, peer):
        with c:
            c.sendall(f"{peer[0]}\n".encode())
    return _listen(ns, port, handle, backlog=64)


def count_server(ns, port):
    """Reads to EOF, then answers with the number of bytes it got (tests half-close)."""
    def handle(c, _):
        with c:
            total, buf = 0, bytearray(1 << 16)
            while n := c.recv_into(buf):
                total += n
            c.sendall(str(total).encode())
    return _listen(ns, port, handle)


def echo_server(ns, port):
    """Echoes every byte back; after the client's EOF, ends its own side too."""
    def handle(c, _):
        with c:
            buf = bytearray(1 << 16)
            while n := c.recv_into(buf):
                c.sendall(buf[:n])
    return _listen(ns, port, handle)



def udp_server(ns, port, name=None):
    """Answers each datagram with the sender address it sees (and its own name, if given)."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM, 0)
    s.bind(("0.0.0.0", port))
    prefix = f"{name} " if name else ""

    def loop():
        while True:
            try:
                data, peer = s.recvfrom(2048)
                s.sendto(f"{prefix}{peer[0]} {data.decode()}".encode(), peer)
            except OSError:
                return
    threading.Thread(target=loop, daemon=True).start()
    return s


def ask(ns, addr, port, timeout=1.0):
    """Connect from ``ns``; return the address the server saw."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    s.settimeout(timeout)
    with s:
        s.connect((addr, port))
        return s.recv(100).decode().strip()


def ask_udp(ns, addr, port, timeout=1.0):
    s = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM, 0)
    s.settimeout(timeout)
    with s:
        for _ in range(3):                    # UDP: a lost first datagram is not a failure
            s.sendto(b"ping", (addr, port))
            try:
                return s.recv(100).decode()
            except TimeoutError:
                continue
        raise TimeoutError(f"no UDP answer from {addr}:{port}")


def blocked(ns, addr, port):
    """True if a TCP connection is dropped (times out) or refused."""
    try:
        ask(ns, addr, port, timeout=DROP_TIMEOUT)
    except (TimeoutError, ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def run_in(ns, *argv):
    """A tool's output, run inside ``ns`` (nsenter on our own fd: nothing mounted)."""
    fd = ns.fileno()
    return subprocess.run(["nsenter", f"--net=/proc/self/fd/{fd}", *argv], pass_fds=[fd],
                          capture_output=True, text=True, check=True).stdout


def nft(ns, *args):
    return run_in(ns, "nft", *args)


def ruleset(ns):
    """``nft -j list ruleset``, normalised as moby's golden tests do: no handles, zero counters."""
    def clean(node):
        if isinstance(node, dict):
            out = {k: clean(v) for k, v in node.items() if k != "handle"}
            if "counter" in out and isinstance(out["counter"], dict):
                out["counter"] = {"packets": 0, "bytes": 0}
            return out
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node
    data = json.loads(nft(ns, "-j", "list", "ruleset") or '{"nftables": []}')
    return [clean(item) for item in data["nftables"] if "metainfo" not in item]


def port_free(ns, proto, port):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket_in(ns, socket.AF_INET, kind, 0)
    with s:
        if proto == "tcp":
            # As a server would: old connections in TIME_WAIT do not count as holding it.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            if proto == "tcp":
                s.listen()
            return True
        except OSError:
            return False


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def box():
    sandbox = Sandbox()
    for kid in ("c1", "c2", "c3"):
        sandbox.servers.append(tcp_server(sandbox.kids[kid], 80))
    sandbox.servers.append(udp_server(sandbox.kids["c1"], 53))
    sandbox.servers.append(count_server(sandbox.kids["c1"], 81))
    sandbox.servers.append(echo_server(sandbox.kids["c1"], 82))
    sandbox.servers.append(tcp_server(sandbox.outside, 9000))
    yield sandbox
    sandbox.close()


@contextlib.contextmanager
def firewall(box, via="docker", networks=("nslab0", "nslab1"), **kwargs):
    fw = Firewall(box.host, published_via=via, **kwargs)
    try:
        if "nslab0" in networks:
            fw.add_network("nslab0", ipaddress.IPv4Network("172.17.0.0/16"))
        if "nslab1" in networks:
            fw.add_network("nslab1", "172.18.0.0/16")
        yield fw
    finally:
        fw.close()


# --- reaching a published port --------------------------------------------------------------------
# What each backend shows the container, per client: DNAT keeps the client address, the
# proxy shows the host's bridge address; "nat" masquerades what comes from the host itself.
SEEN = {
    "docker": {"outside": OUTSIDE, "host-lo": GW0, "host-uplink": HOST_UPLINK, "c2": GW0},
    "nat": {"outside": OUTSIDE, "host-lo": GW0, "host-uplink": GW0, "c2": C2},
    "proxy": {"outside": GW0, "host-lo": GW0, "host-uplink": GW0, "c2": GW0},
}


@pytest.mark.parametrize("via", ["docker", "nat", "proxy"])
def test_published_port_reached_from_everywhere(box, via):
    """Through each backend, c1's port 80 published as 8080 answers the outside, the host on
    127.0.0.1 and on its own address, and (hairpin) a sibling on the same bridge."""
    with firewall(box, via) as fw:
        assert fw.publish("c1", "nslab0", C1, "8080:80") == [PortMapping(80, "tcp", 8080)]
        seen = {"outside": ask(box.outside, HOST_UPLINK, 8080),
                "host-lo": ask(box.host, "127.0.0.1", 8080),
                "host-uplink": ask(box.host, HOST_UPLINK, 8080),
                "c2": ask(box.kids["c2"], HOST_UPLINK, 8080)}
        assert seen == SEEN[via]


def test_dnat_keeps_the_client_address_and_the_proxy_hides_it(box):
    """The outside's address reaches the container through DNAT, the proxy replaces it."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "8080:80", via="docker")
        fw.publish("c2", "nslab0", C2, "8081:80", via="proxy")
        assert ask(box.outside, HOST_UPLINK, 8080) == OUTSIDE
        assert ask(box.outside, HOST_UPLINK, 8081) == GW0


def test_another_bridge_network_reaches_a_published_port_through_the_host(box):
    """Published ports are public, as in Docker: c3 on nslab1 reaches c1 via the host address."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "8080:80")
        assert ask(box.kids["c3"], HOST_UPLINK, 8080) == GW0      # DNAT + MASQUERADE of nslab1


@pytest.mark.parametrize("via", ["docker", "proxy", "nat"])
def test_udp_published_port(box, via):
    """UDP port 53 published as 5353 answers the outside and the host's 127.0.0.1."""
    with firewall(box, via) as fw:
        fw.publish("c1", "nslab0", C1, "5353:53/udp")
        assert ask_udp(box.outside, HOST_UPLINK, 5353).split()[0] == \
            (GW0 if via == "proxy" else OUTSIDE)
        assert ask_udp(box.host, "127.0.0.1", 5353).split()[0] == GW0


def test_ephemeral_and_range_host_ports(box):
    """`-p 80` gets a port from the host's ip_local_port_range; `8000-8002:80` the first free."""
    low, high = map(int, read_sysctl(box.host, "net/ipv4/ip_local_port_range").split())
    with firewall(box) as fw:
        [m] = fw.publish("c1", "nslab0", C1, "80")
        assert low <= m.host_port <= high
        assert ask(box.outside, HOST_UPLINK, m.host_port) == OUTSIDE
        fw.publish("c3", "nslab1", C3, "8000:80")
        [r] = fw.publish("c2", "nslab0", C2, "8000-8002:80")
        assert r == PortMapping(80, "tcp", 8001)
        assert ask(box.outside, HOST_UPLINK, 8001) == OUTSIDE


def test_a_wide_port_range_goes_in_one_batch_and_comes_out_again(box):
    """`-p 80-679:80-679`: one batch with a DNAT rule per port (and more) outgrows the
    default socket buffers (the send failed with EMSGSIZE); the buffers grow for
    it, every rule is in the table as nft reads it, c1's server answers through its port 80,
    and unpublish takes them all."""
    with firewall(box, via="nat") as fw:
        published = fw.publish("c1", "nslab0", C1, "80-679:80-679")
        assert [m.host_port for m in published] == list(range(80, 680))
        assert nft(box.host, "list", "ruleset").count("dnat to 172.17.0.2:") == 600
        assert ask(box.outside, HOST_UPLINK, 80) == OUTSIDE
        fw.unpublish("c1")
        assert "dnat to" not in nft(box.host, "list", "ruleset")


def test_a_batch_the_buffers_cannot_hold_is_refused_before_it_is_sent():
    """Without CAP_NET_ADMIN a socket buffer stops at net.core.[rw]mem_max: a batch that would
    not fit is refused with the limit named, and nothing reaches the kernel (a sent batch is
    applied even if its replies are then lost)."""
    class CappedSocket:
        """Stands in for an unprivileged nfnetlink socket, which cannot be had as root."""
        def __init__(self):
            self.sent = []
        def setsockopt(self, level, opt, value):
            if opt in (_nft._SO_SNDBUFFORCE, _nft._SO_RCVBUFFORCE):
                raise PermissionError(errno.EPERM, "Operation not permitted")
        def getsockopt(self, level, opt):
            return 2 * 212992                       # Debian's default net.core.[rw]mem_max
        def bind(self, addr):
            pass
        def sendall(self, data):
            self.sent.append(data)
        def close(self):
            pass
    sock = CappedSocket()
    nf = _nft.Netfilter(sock, "a test netns")
    batch = _nft.Batch("nslab")
    for port in range(2000):
        batch.add_rule(_nft.Rule("DOCKER", (("tcp dport", "==", 20000 + port),),
                                 _nft.Dnat("172.17.0.2", 80)))
    with pytest.raises(NslabError) as info:
        nf.commit(batch)
    assert info.value.errno == errno.EMSGSIZE and "wmem_max" in info.value.hint
    assert sock.sent == []


def test_mixed_backends_in_one_table(box):
    """A nat-backend child in a docker-default table is still served on 127.0.0.1 (by DNAT),
    and its network-level hairpin pieces go with it."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "8080:80", via="nat")
        assert read_sysctl(box.host, "net/ipv4/conf/nslab0/route_localnet") == "1"
        assert ask(box.host, "127.0.0.1", 8080) == GW0
        assert fw.publication("c1").proxies == []
        fw.unpublish("c1")
        assert read_sysctl(box.host, "net/ipv4/conf/nslab0/route_localnet") == "0"
        chains = {item["rule"]["chain"] for item in ruleset(box.host) if "rule" in item}
        assert "nat-postrouting-in__nslab0" not in chains


# --- what must not get through --------------------------------------------------------------------
def test_egress_is_masqueraded_to_the_host_address(box):
    """A child reaching the outside shows up with the host's uplink address."""
    with firewall(box):
        assert ask(box.kids["c1"], OUTSIDE, 9000) == HOST_UPLINK
        assert ask(box.kids["c3"], OUTSIDE, 9000) == HOST_UPLINK


def test_unpublished_port_and_direct_access_are_dropped(box):
    """From the outside (with a route to the bridges), a container address is not reachable,
    published or not, and an unpublished host port is refused."""
    with Rtnl(box.outside) as r:
        r.ipr.route("add", dst="172.16.0.0/12", gateway=HOST_UPLINK)
    try:
        with firewall(box) as fw:
            fw.publish("c1", "nslab0", C1, "8080:80")
            assert ask(box.outside, HOST_UPLINK, 8080) == OUTSIDE        # the server is up
            assert blocked(box.outside, C1, 80)                         # DROP DIRECT ACCESS
            assert blocked(box.outside, C2, 80)                         # UNPUBLISHED PORT DROP
            assert blocked(box.outside, HOST_UPLINK, 8081)              # nothing published there
            assert ask(box.kids["c2"], C1, 80) == C2                    # ICC still works
        # Control: without the firewall the same direct connection goes through.
        assert ask(box.outside, C1, 80) == OUTSIDE
    finally:
        with Rtnl(box.outside) as r:
            r.ipr.route("del", dst="172.16.0.0/12", gateway=HOST_UPLINK)


def test_two_bridge_networks_cannot_reach_each_other(box):
    """c3 (nslab1) cannot reach c1/c2 (nslab0) directly, nor the other way round."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "8080:80")
        assert blocked(box.kids["c3"], C1, 80)
        assert blocked(box.kids["c3"], C2, 80)
        assert blocked(box.kids["c1"], C3, 80)
        assert ask(box.kids["c2"], C1, 80) == C2                        # same bridge: fine
    # Control: without the firewall, the host routes between its bridges, both ways.
    assert ask(box.kids["c3"], C2, 80) == C3
    assert ask(box.kids["c1"], C3, 80) == C1


def test_localhost_publish_is_unreachable_from_a_neighbour(box):
    """moby#45610: a neighbour routing 127.0.0.1 via the host does not reach a port published
    on 127.0.0.1; without the DROP REMOTE LOOPBACK rule it would (vulnerable control)."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "127.0.0.1:8080:80")
        assert ask(box.host, "127.0.0.1", 8080) == GW0
        assert blocked(box.neighbour, "127.0.0.1", 8080)
        assert blocked(box.outside, HOST_UPLINK, 8080)                  # not on other addresses
        # The control: delete just that rule and the neighbour gets through.
        [(chain, handle)] = [(c, h) for c, h in fw.publication("c1").rules
                             if c == "raw-PREROUTING"][1:]
        b = _nft.Batch(fw.table)
        b.del_rule(chain, handle)
        fw.nf.commit(b)
        assert ask(box.neighbour, "127.0.0.1", 8080) == NEIGHBOUR
        assert read_sysctl(box.host, "net/ipv4/conf/nslab0/route_localnet") == "0"


# --- port allocation --------------------------------------------------------------------------------
def test_port_already_published_is_refused_with_dockers_message(box):
    """A second publish of 8080 fails like Docker, names the holder, and changes nothing."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "8080:80")
        before = ruleset(box.host)
        for spec in ("8080:80", "127.0.0.1:8080:80", ["9090:80", "8080:81"]):
            with pytest.raises(PortAllocatedError) as info:
                fw.publish("c2", "nslab0", C2, spec)
            assert "port is already allocated" in str(info.value)
            assert info.value.holder == "nslab publication 'c1'"
        assert "Bind for 0.0.0.0:8080 failed: port is already allocated" in str(
            pytest.raises(PortAllocatedError, fw.publish, "c2", "nslab0", C2, "8080:80").value)
        assert ruleset(box.host) == before
        assert port_free(box.host, "tcp", 9090)                         # the first one released
        fw.publish("c2", "nslab0", C2, "8080:80/udp")                   # other protocol: fine


def test_port_bound_by_another_process_names_it(box):
    """A host port held by a foreign process is refused as the bind failure it is (not with
    the allocator's words Docker keeps for its own publications), naming its pid and command."""
    fd = box.host.fileno()
    code = ("import socket,sys; s=socket.socket(); s.bind(('0.0.0.0', 8099)); s.listen();"
            "print('ready', flush=True); sys.stdin.read()")
    holder = subprocess.Popen(["nsenter", f"--net=/proc/self/fd/{fd}", sys.executable, "-c", code],
                              pass_fds=[fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        with firewall(box) as fw:
            with pytest.raises(PortAllocatedError) as info:
                fw.publish("c1", "nslab0", C1, "8099:80")
            assert "failed to bind host port 0.0.0.0:8099/tcp: address already in use" in \
                str(info.value)
            assert "already allocated" not in str(info.value)
            assert info.value.holder.startswith(f"pid {holder.pid} (")
            assert "sys.stdin.read()" in info.value.holder
            fw.publish("c2", "nslab0", C2, "8098:80")
            with pytest.raises(PortAllocatedError) as info:                # nslab's + foreign
                fw.publish("c1", "nslab0", C1, "8098-8099:80")
            assert "no free host port in 0.0.0.0:8098-8099/tcp" in str(info.value)
            assert "already allocated" not in str(info.value)
            assert list(fw.publications) == ["c2"]
        assert find_port_holder(box.host, "tcp", 8098) is None
    finally:
        holder.stdin.close()
        holder.wait()


def test_invalid_input_changes_nothing(box):
    """Bad specs, keys, bridges or addresses raise InputError before anything changes."""
    with firewall(box) as fw:
        before = ruleset(box.host)
        for args in (("c1", "nslab0", C1, "8080:80/sctp"), ("c1", "nslab9", C1, "80"),
                     ("c1", "nslab0", C3, "80"), ("c1", "nslab0", "172.17.0.0", "80"),
                     ("c1", "nslab0", "not-an-ip", "80"), ("", "nslab0", C1, "80"),
                     ("c1", "nslab0", C1, ["8080:80", "70000"])):
            with pytest.raises(InputError):
                fw.publish(*args)
        with pytest.raises(InputError):
            fw.publish("c1", "nslab0", C1, "80", via="iptables")
        with pytest.raises(InputError):
            fw.add_network("nslab0", "10.0.0.0/8")                      # already there
        with pytest.raises(InputError):
            fw.add_network("br-x", "172.17.128.0/17")                   # overlaps nslab0
        with pytest.raises(InputError):
            fw.add_network("bad name", "10.0.0.0/8")
        assert ruleset(box.host) == before
        assert port_free(box.host, "tcp", 8080)
    with pytest.raises(InputError):
        Firewall(box.host, published_via="userland")


# --- cleanup ------------------------------------------------------------------------------------------
def test_unpublish_and_close_leave_nothing(box, no_fd_leak):
    """After unpublish no rule, proxy or port of that child remains; after close, no table."""
    with firewall(box) as fw:
        empty = ruleset(box.host)
        fw.publish("c1", "nslab0", C1, ["8080:80", "5353:53/udp", "127.0.0.1:8081:80"])
        pids = [p.pid for p in fw.publication("c1").proxies]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        assert not port_free(box.host, "tcp", 8080) and not port_free(box.host, "udp", 5353)
        fw.unpublish("c1")
        fw.unpublish("c1")                                              # idempotent
        assert ruleset(box.host) == empty
        assert not any(alive(p) for p in pids)
        assert port_free(box.host, "tcp", 8080) and port_free(box.host, "udp", 5353)
        assert port_free(box.host, "tcp", 8081)
        fw.publish("c1", "nslab0", C1, "8080:80")                       # republish works
        assert ask(box.outside, HOST_UPLINK, 8080) == OUTSIDE
        pid = fw.publication("c1").proxies[0].pid
    assert "closed" in repr(fw)
    fw.close()                                                          # idempotent
    assert ruleset(box.host) == []
    assert not alive(pid) and port_free(box.host, "tcp", 8080)


def test_nat_backend_restores_its_sysctls(box):
    """route_localnet and bridge-nf-call-iptables go back to what they were on close."""
    brnf = read_sysctl(box.host, "net/bridge/bridge-nf-call-iptables")
    with firewall(box, "nat") as fw:
        fw.publish("c1", "nslab0", C1, "8080:80")
        assert read_sysctl(box.host, "net/ipv4/conf/nslab0/route_localnet") == "1"
        assert read_sysctl(box.host, "net/bridge/bridge-nf-call-iptables") == "1"
    assert read_sysctl(box.host, "net/ipv4/conf/nslab0/route_localnet") == "0"
    assert read_sysctl(box.host, "net/bridge/bridge-nf-call-iptables") == brnf


def test_a_publication_keyed_like_a_bridge_keeps_the_bridges_sysctl(box):
    """bridge-nf-call-iptables stays on while the hairpin network needs it, even after a
    publication whose key is that bridge's name is unpublished."""
    path = "net/bridge/bridge-nf-call-iptables"
    saved = read_sysctl(box.host, path)
    write_sysctl(box.host, path, "0")                   # the sandbox host's, so a change shows
    try:
        with firewall(box, "nat", networks=("nslab0",)) as fw:
            fw.publish("nslab0", "nslab0", C1, "8080:80")
            fw.unpublish("nslab0")
            assert read_sysctl(box.host, path) == "1"   # the network nslab0 still needs it
        assert read_sysctl(box.host, path) == "0"
    finally:
        write_sysctl(box.host, path, saved)


def test_a_failed_route_localnet_write_takes_its_hairpin_rule_out(box, monkeypatch):
    """If route_localnet cannot be set after the batch, the "MASQUERADE FROM HOST" that batch
    added goes with the rest of the publication: a later nat publish has exactly one."""
    with firewall(box, networks=("nslab0",)) as fw:     # docker table: that rule comes lazily
        before = ruleset(box.host)
        real, refuse = fw._write_sysctl, [True]

        def write(path, value, missing_ok=False):
            if refuse[0] and path.endswith("/route_localnet"):
                raise from_errno(errno.EACCES, "write", path)
            real(path, value, missing_ok)
        monkeypatch.setattr(fw, "_write_sysctl", write)
        with pytest.raises(PermissionError):
            fw.publish("c1", "nslab0", C1, "8080:80", via="nat")
        assert ruleset(box.host) == before and fw.publications == {}
        refuse[0] = False
        fw.publish("c1", "nslab0", C1, "8080:80", via="nat")
        assert nft(box.host, "list", "ruleset").count('"MASQUERADE FROM HOST"') == 1
        assert ask(box.outside, HOST_UPLINK, 8080) == OUTSIDE


@pytest.mark.parametrize("teardown", ["close", "remove_network"])
def test_teardown_goes_on_past_a_failing_unpublish(box, monkeypatch, teardown):
    """close() and remove_network() tear down every publication even when one fails, finish
    their own work, then raise that first error: no proxy or held port is left behind."""
    fw = Firewall(box.host)
    try:
        fw.add_network("nslab0", "172.17.0.0/16")
        fw.publish("c1", "nslab0", C1, "8080:80")
        fw.publish("c2", "nslab0", C2, "8081:80")
        pids = [p.pid for key in ("c1", "c2") for p in fw.publication(key).proxies]
        real = fw._flush_udp_conntrack

        def flush(pub):
            if pub.key == "c1":
                raise from_errno(errno.EIO, "ctnetlink delete", "c1's entries")
            real(pub)
        monkeypatch.setattr(fw, "_flush_udp_conntrack", flush)
        with pytest.raises(NslabError) as info:
            if teardown == "close":
                fw.close()
            else:
                fw.remove_network("nslab0")
        assert info.value.errno == errno.EIO
        assert fw.publications == {} and fw.networks == {}
        assert not any(alive(p) for p in pids)
        assert port_free(box.host, "tcp", 8080) and port_free(box.host, "tcp", 8081)
        if teardown == "close":
            assert fw.closed and ruleset(box.host) == []
        else:
            assert "nslab0" not in nft(box.host, "list", "ruleset")
    finally:
        fw.close()


CONTROLLER = """
import os, sys
from nslab.namespaces import Namespace
from nslab.firewall import Firewall
fw = Firewall(Namespace(os.dup(int(sys.argv[1])), "net"))
fw.add_network("nslab0", "172.17.0.0/16")
fw.publish("c1", "nslab0", "172.17.0.2", ["8080:80", "5353:53/udp"])
print(" ".join(str(p.pid) for p in fw.publication("c1").proxies), flush=True)
sys.stdin.read()
"""


def test_sigkill_of_the_controller_leaves_nothing(box):
    """SIGKILL the process owning the Firewall: the owned table, its proxies and held ports
    all disappear with it, with no gc."""
    fd = box.host.fileno()
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(fd)], pass_fds=[fd],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pids = [int(p) for p in ctl.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        assert any("rule" in item for item in ruleset(box.host))
        ctl.send_signal(signal.SIGKILL)
        ctl.wait()
    finally:
        ctl.stdin.close()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(p) for p in pids)
    assert ruleset(box.host) == []
    assert port_free(box.host, "tcp", 8080) and port_free(box.host, "udp", 5353)


# --- the userland proxy ------------------------------------------------------------------------------
def proxied(box, port):
    """A proxy-only firewall publishing c1's ``port`` as 8081: (its ExitStack, the proxy)."""
    stack = contextlib.ExitStack()
    fw = stack.enter_context(firewall(box, "proxy", networks=("nslab0",)))
    fw.publish("c1", "nslab0", C1, f"8081:{port}")
    [proxy] = fw.publication("c1").proxies
    # Settled: the proxy closes its stdout just after its OK line.
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{proxy.pid}/fd/1") and time.monotonic() < deadline:
        time.sleep(0.01)
    return stack, proxy


def connect_outside(box, timeout=10):
    s = socket_in(box.outside, socket.AF_INET, socket.SOCK_STREAM, 0)
    s.settimeout(timeout)
    s.connect((HOST_UPLINK, 8081))
    return s


def test_userland_proxy_alone_holds_no_port_after_close(box):
    """A UserlandProxy serves its socket; once closed the process is gone and the port free."""
    sock = socket_in(box.host, socket.AF_INET, socket.SOCK_STREAM, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as Firewall binds its ports
    sock.bind(("127.0.0.1", 8097))
    sock.listen()
    with Firewall(box.host) as fw:
        fw.add_network("nslab0", "172.17.0.0/16")
        with UserlandProxy.start(box.host, sock, "tcp", (C1, 80)) as proxy:
            sock.close()
            assert proxy.running and "running" in repr(proxy)
            assert os.stat(f"/proc/{proxy.pid}/ns/net").st_ino == box.host.inode
            assert ask(box.host, "127.0.0.1", 8097) == GW0
            pid = proxy.pid
        assert proxy.closed and not alive(pid)
    assert port_free(box.host, "tcp", 8097)


def test_proxy_moves_bulk_data_and_keeps_half_close(box):
    """8 MB through the splice proxy arrive whole, and the client's shutdown(SHUT_WR) reaches
    the server as EOF while the answer still comes back."""
    stack, _ = proxied(box, 81)
    with stack, connect_outside(box) as s:
        s.sendall(os.urandom(1 << 16) * 128)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == str(8 << 20).encode()


def test_proxy_relays_both_directions_at_once(box):
    """8 MB sent while their echo streams back come back byte for byte (neither direction
    starves the other), and each side's EOF reaches the other."""
    data = os.urandom(1 << 20) * 8
    stack, _ = proxied(box, 82)
    with stack, connect_outside(box) as s:
        def send():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        got, digest = 0, hashlib.sha256()
        while chunk := s.recv(1 << 16):
            got += len(chunk)
            digest.update(chunk)
        sender.join(10)
    assert got == len(data) and digest.digest() == hashlib.sha256(data).digest()


def reset(sock):
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def proxy_fds(proxy):
    return len(os.listdir(f"/proc/{proxy.pid}/fd"))


def wait_for_fds(proxy, count, timeout=3.0):
    deadline = time.monotonic() + timeout
    while proxy_fds(proxy) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return proxy_fds(proxy)


@pytest.mark.parametrize("who", ["client", "server"])
def test_proxy_reset_on_one_side_ends_both(box, who):
    """A reset on either side of the proxy ends the other side's connection too (it sees
    the end at once, though it still holds its socket open), and the proxy lets go of the
    connection: not a half-close that would wait on the silent peer forever."""
    srv = socket_in(box.kids["c1"], socket.AF_INET, socket.SOCK_STREAM, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 83))
    srv.listen(1)
    srv.settimeout(10)
    stack, proxy = proxied(box, 83)
    with srv, stack:
        idle = proxy_fds(proxy)
        with connect_outside(box, timeout=5) as client:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                client.sendall(b"hello")
                assert conn.recv(5) == b"hello"              # the relay is up
                survivor = conn if who == "client" else client
                reset(client if who == "client" else conn)
                try:
                    ended = survivor.recv(1) == b""
                except ConnectionResetError:
                    ended = True
                assert ended                                  # not a TimeoutError
                assert wait_for_fds(proxy, idle) == idle      # while the survivor is still open


def test_proxy_releases_its_fds_after_each_connection(box):
    """Once a connection ends, the proxy holds no fd for it: neither socket nor pipe."""
    stack, proxy = proxied(box, 82)
    with stack:
        idle = proxy_fds(proxy)
        for _ in range(3):
            with connect_outside(box) as s:
                s.sendall(b"ping")
                assert s.recv(4) == b"ping"
                s.shutdown(socket.SHUT_WR)
                assert s.recv(1) == b""
        assert wait_for_fds(proxy, idle) == idle


def test_udp_proxy_expires_idle_flows(box):
    """The UDP proxy keeps one upstream socket per client and drops it after the idle timeout."""
    sock = socket_in(box.host, socket.AF_INET, socket.SOCK_DGRAM, 0)
    sock.bind(("127.0.0.1", 5300))
    with UserlandProxy.start(box.host, sock, "udp", (C1, 53), udp_timeout=0.3) as proxy:
        sock.close()
        sockets = lambda: sum(os.readlink(f"/proc/{proxy.pid}/fd/{fd}").startswith("socket:")  # noqa: E731
                              for fd in os.listdir(f"/proc/{proxy.pid}/fd"))
        idle = sockets()
        for _ in range(2):                               # two clients, two flows
            assert ask_udp(box.host, "127.0.0.1", 5300).split()[0] == GW0
        assert sockets() == idle + 2
        deadline = time.monotonic() + 3
        while sockets() > idle and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sockets() == idle


def with_prelude(monkeypatch, prelude):
    """Proxies start as ``python -c PRELUDE`` and then run main(): the prelude alters the
    proxy process (its limits, a call that fails) before any of its own code runs."""
    real = proxy_module._spawn
    code = f"{prelude}\nimport sys\nfrom nslab.proxy import main\nsys.exit(main(sys.argv[1:]))\n"

    def spawn(argv, *rest):
        assert argv[1:3] == ["-m", "nslab.proxy"]
        return real([argv[0], "-c", code, *argv[3:]], *rest)
    monkeypatch.setattr(proxy_module, "_spawn", spawn)


def nofile_limits(pid):
    """(soft, hard) RLIMIT_NOFILE of ``pid``."""
    with open(f"/proc/{pid}/limits") as f:
        [line] = [x for x in f if x.startswith("Max open files")]
    return tuple(int(v) for v in line.split()[3:5])


def test_udp_proxy_raises_its_fd_limit_and_caps_flows_below_it(box, monkeypatch):
    """Started with a soft fd limit below the hard one, the UDP proxy raises it to the hard
    one (as Go does for docker-proxy) and keeps its flow table below that budget: more
    clients than it has fds all get their answer."""
    with_prelude(monkeypatch, "import resource; "
                 "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 128))")
    sock = socket_in(box.host, socket.AF_INET, socket.SOCK_DGRAM, 0)
    sock.bind(("127.0.0.1", 5301))
    with UserlandProxy.start(box.host, sock, "udp", (C1, 53)) as proxy:
        sock.close()
        assert nofile_limits(proxy.pid) == (128, 128)
        for _ in range(140):                             # one flow each, the oldest evicted
            assert ask_udp(box.host, "127.0.0.1", 5301, timeout=0.5).split()[0] == GW0
        assert proxy.running


def test_udp_proxy_survives_running_out_of_fds(box):
    """A flow socket the proxy cannot make (EMFILE) costs that datagram only: the proxy
    lives on, its existing flows still answer, and so does a fresh client once fds are back."""
    sock = socket_in(box.host, socket.AF_INET, socket.SOCK_DGRAM, 0)
    sock.bind(("127.0.0.1", 5302))
    client = socket_in(box.host, socket.AF_INET, socket.SOCK_DGRAM, 0)
    client.settimeout(1)
    with client, UserlandProxy.start(box.host, sock, "udp", (C1, 53)) as proxy:
        sock.close()
        client.sendto(b"a", ("127.0.0.1", 5302))
        assert client.recv(100).split()[0] == GW0.encode()
        limits = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (0, limits[1]))   # no new fd
        with pytest.raises(TimeoutError):
            ask_udp(box.host, "127.0.0.1", 5302, timeout=0.2)                 # dropped
        assert proxy.running
        client.sendto(b"b", ("127.0.0.1", 5302))
        assert client.recv(100).split()[0] == GW0.encode()                   # its flow lives
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, limits)
        assert ask_udp(box.host, "127.0.0.1", 5302).split()[0] == GW0


def test_proxy_pump_without_a_pipe_ends_the_connection(monkeypatch):
    """If its splice pipe cannot be made (EMFILE), a pump ends the connection both ways and
    reports done, instead of leaving it half-forwarded."""
    def no_pipe():
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(proxy_module, "_big_pipe", no_pipe)
    (src, src_peer), (dst, dst_peer) = socket.socketpair(), socket.socketpair()
    done = []
    with src, src_peer, dst, dst_peer:
        proxy_module._pump(src, dst, lambda: done.append(True))
        assert done == [True]
        for peer in (src_peer, dst_peer):
            peer.settimeout(1)
            assert peer.recv(1) == b""


FAILING_THREADS = """
import threading
_start, _failed = threading.Thread.start, set()
def start(self):
    name = getattr(self._target, "__name__", "")
    if name in ("_serve_tcp_conn", "_pump") and name not in _failed:
        _failed.add(name)
        raise RuntimeError("can't start new thread")
    _start(self)
threading.Thread.start = start
"""


def test_tcp_proxy_keeps_serving_when_a_thread_cannot_start(box, monkeypatch):
    """"can't start new thread" closes that one connection (first for a connection's own
    thread, then for its second pump); the proxy keeps accepting and serves the next one."""
    with_prelude(monkeypatch, FAILING_THREADS)
    stack, proxy = proxied(box, 80)
    with stack:
        for _ in range(2):
            with connect_outside(box, timeout=3) as s:
                try:
                    assert s.recv(100) == b""            # closed, not left hanging
                except ConnectionResetError:
                    pass
        assert proxy.running
        assert ask(box.outside, HOST_UPLINK, 8081) == GW0


def test_proxy_fallback_without_the_process_module(box, monkeypatch):
    """Without nslab.process, the proxy is started with Popen and enters the netns itself."""
    monkeypatch.setitem(sys.modules, "nslab.process", None)        # import now fails
    sock = socket_in(box.host, socket.AF_INET, socket.SOCK_STREAM, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 8096))
    sock.listen()
    with Firewall(box.host) as fw:
        fw.add_network("nslab0", "172.17.0.0/16")
        with UserlandProxy.start(box.host, sock, "tcp", (C1, 80)) as proxy:
            sock.close()
            assert isinstance(proxy._proc, subprocess.Popen)
            assert ask(box.host, "127.0.0.1", 8096) == GW0
            assert os.stat(f"/proc/{proxy.pid}/ns/net").st_ino == box.host.inode
            pid = proxy.pid
        assert not alive(pid)


def congestion_controls(ns):
    """{(local, peer): congestion control} of the established TCP sockets in ``ns`` (ss -ti
    prints each socket's algorithm first on its info line)."""
    lines = run_in(ns, "ss", "-tinH", "state", "established").splitlines()
    return {tuple(head.split()[-2:]): info.split()[0]
            for head, info in zip(lines[::2], lines[1::2])}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_proxy_legs_keep_the_namespaces_congestion_control(box):
    """Both of the proxy's connections use the namespace's default congestion control, as
    docker-proxy's do (Go sets none): nslab's proxy must cost what Docker's costs."""
    default = read_sysctl(box.host, "net/ipv4/tcp_congestion_control")
    stack, _ = proxied(box, 82)
    with stack, connect_outside(box) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        ccs = congestion_controls(box.host)
    [upstream] = [cc for (_, peer), cc in ccs.items() if peer == f"{C1}:82"]
    [client_leg] = [cc for (local, _), cc in ccs.items() if local == f"{HOST_UPLINK}:8081"]
    assert upstream == client_leg == default


# --- UDP conntrack entries ---------------------------------------------------------------------------
def ct_entries(ns, **filters):
    """The conntrack entries of ``ns`` (original tuple matching ``filters``), over ctnetlink."""
    with Conntrack(socket_in(ns, proto=NETLINK_NETFILTER), "test") as ct:
        return ct.entries(**filters)


def test_conntrack_session_checks_filters_and_ignores_gone_entries(box):
    """Bad filters are InputErrors; deleting an entry that is not there (any more) is not an
    error and counts nothing; close() is idempotent."""
    with Conntrack(socket_in(box.host, proto=NETLINK_NETFILTER), "test") as ct:
        for bad in ({"proto": "sctp"}, {"proto": "udp", "dport": 0}, {"dport": 53},
                    {"proto": "udp", "dst": "::1"}):
            with pytest.raises(InputError):
                ct.entries(**bad)
        ghost = Entry(socket.IPPROTO_UDP, "192.0.2.1", "192.0.2.2", 1, 2, "192.0.2.2",
                      "192.0.2.1", 2, 1, id=1)
        assert ct.delete([ghost]) == 0 and ct.delete([]) == 0
    assert ct.closed and "closed" in repr(ct)
    ct.close()
    with pytest.raises(NslabError) as info:        # a closed session names itself and its protocol
        ct.entries()
    assert info.value.errno == errno.EBADF and "ctnetlink" in str(info.value) and "test" in str(info.value)


def test_unpublish_deletes_only_its_udp_conntrack_entries(box):
    """Unpublishing UDP mappings deletes the conntrack entries whose original destination is
    their host port (and host IP, when bound), as Docker does; another port, the same port
    on another host IP, and TCP to the same port number keep theirs."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, ["5353:53/udp", f"{HOST_UPLINK}:5356:53/udp"])
        fw.publish("other", "nslab0", C1, ["5354:53/udp", "127.0.0.1:5356:53/udp", "5353:80"])
        for port in (5353, 5356, 5354):
            assert ask_udp(box.outside, HOST_UPLINK, port).split()[0] == OUTSIDE
        assert ask_udp(box.host, "127.0.0.1", 5356).split()[0] == GW0
        assert ask(box.outside, HOST_UPLINK, 5353) == OUTSIDE             # TCP, same number
        udp = lambda port, dst=None: [e for e in ct_entries(box.host, proto="udp", dport=port, dst=dst)  # noqa: E731
                                      if e.src in (OUTSIDE, "127.0.0.1")]
        [dnated] = udp(5353)
        assert (dnated.src, dnated.dst, dnated.reply_src) == (OUTSIDE, HOST_UPLINK, C1)
        assert udp(5356, HOST_UPLINK) and udp(5356, "127.0.0.1") and udp(5354)
        tcp_before = ct_entries(box.host, proto="tcp", dport=5353)
        assert tcp_before

        fw.unpublish("c1")
        assert udp(5353) == [] and udp(5356, HOST_UPLINK) == []
        assert udp(5356, "127.0.0.1") and udp(5354)                         # not c1's
        assert ct_entries(box.host, proto="tcp", dport=5353) == tcp_before  # not UDP


def test_a_udp_client_follows_a_republished_port(box, monkeypatch):
    """Why the flush matters: a client that keeps its UDP socket reaches the container the
    port is published for *now*. The control, with the flush switched off: its datagrams
    keep going to the old container, by the stale DNAT entry."""
    c2 = udp_server(box.kids["c2"], 53, name="c2")
    client = socket_in(box.outside, socket.AF_INET, socket.SOCK_DGRAM, 0)
    client.settimeout(1)
    client.connect((HOST_UPLINK, 5353))                                  # one source port

    def who_answers():
        for _ in range(3):
            client.send(b"ping")
            try:
                return "c2" if client.recv(100).startswith(b"c2 ") else "c1"
            except TimeoutError:
                continue
        raise TimeoutError("no UDP answer on 5353")

    try:
        with firewall(box) as fw:
            fw.publish("web", "nslab0", C1, "5353:53/udp")
            assert who_answers() == "c1"
            fw.unpublish("web")
            fw.publish("web", "nslab0", C2, "5353:53/udp")
            assert who_answers() == "c2"
            monkeypatch.setattr(fw, "_flush_udp_conntrack", lambda pub: None)
            fw.unpublish("web")
            fw.publish("web", "nslab0", C1, "5353:53/udp")
            assert who_answers() == "c2"                                 # stale: still c2
    finally:
        client.close()
        c2.close()


def test_a_second_firewall_on_the_same_table_is_refused(box):
    """Two Firewalls cannot share one table name in one netns; another name is fine."""
    with firewall(box, networks=()):
        with pytest.raises(FileExistsError):
            Firewall(box.host)
        with Firewall(box.host, table="nslab2") as other:
            assert "nslab2" in repr(other)


RULE_FORMS = [
    _nft.Rule("c", (("iifname", "==", "nslab0"),), _nft.ACCEPT, "ICC"),
    _nft.Rule("c", (("oifname", "!=", "veth1234567"), ("ip saddr", "==", "10.0.0.0/8")),
              _nft.MASQUERADE, "MASQUERADE"),
    _nft.Rule("c", (("ip saddr", "==", "172.16.0.0/12"), ("ip daddr", "!=", "192.168.1.0/24")),
              _nft.DROP),
    _nft.Rule("c", (("ip daddr", "==", "172.17.0.2"), ("udp dport", "!=", 53)), _nft.ACCEPT),
    _nft.Rule("c", (("ip saddr", "!=", "10.1.2.3"), ("tcp dport", "==", 65535)),
              _nft.Dnat("10.9.8.7", 1), "DNAT"),
    _nft.Rule("c", (("fib daddr type", "==", "local"),), _nft.Jump("d")),
    _nft.Rule("c", (("fib saddr type", "==", "local"),), _nft.MASQUERADE, "MASQUERADE FROM HOST"),
    _nft.Rule("c", (("ct state", "==", ("established", "related")),), _nft.ACCEPT),
    _nft.Rule("c", (), _nft.DROP, "UNPUBLISHED PORT DROP", counter=True),
    _nft.Rule("c", (("tcp dport", "==", 80),), _nft.ACCEPT, counter=False),
    _nft.Rule("c", (), _nft.Vmap("iifname", "m"), counter=False),
]


def test_every_rule_form_reads_back_as_written():
    """Each match, operator and verdict _nft compiles is printed back by nft as nft syntax."""
    with Namespace.create("net") as ns:
        nf = _nft.Netfilter(socket_in(ns, proto=12), "scratch")
        try:
            b = _nft.Batch("t")
            b.add_table()
            b.add_vmap("m")
            b.add_chain("d")
            b.add_chain("c")                 # a regular chain: no hook-type checks
            for rule in RULE_FORMS:
                b.add_rule(rule)
            handles = nf.commit(b)
            assert len(handles) == len(RULE_FORMS)
            text = nft(ns, "list", "chain", "ip", "t", "c")
        finally:
            nf.close()
        lines = [ln.strip() for ln in text.splitlines()
                 if ln.strip() and not ln.strip().startswith(("table ", "chain ", "type ", "}"))]
        expected = [r.text().replace("counter", "counter packets 0 bytes 0") for r in RULE_FORMS]
        assert lines == expected


# --- golden rulesets ------------------------------------------------------------------------------------
GOLDEN_CASES = {
    "one-bridge": dict(networks=("nslab0",), publish=[]),
    "two-bridges": dict(networks=("nslab0", "nslab1"), publish=[]),
    "publish-tcp": dict(networks=("nslab0",), publish=[("c1", C1, "8080:80")]),
    "publish-localhost": dict(networks=("nslab0",), publish=[("c1", C1, "127.0.0.1:8080:80")]),
    "nat-backend": dict(networks=("nslab0",), publish=[("c1", C1, "8080:80"),
                                                       ("c2", C2, "5353:53/udp")], via="nat"),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_ruleset(box, name):
    """The ruleset `nft -j list ruleset` reads back matches tests/golden/<name>.json."""
    case = GOLDEN_CASES[name]
    with firewall(box, case.get("via", "docker"), case["networks"]) as fw:
        for key, addr, spec in case["publish"]:
            fw.publish(key, "nslab0", addr, spec)
        got = ruleset(box.host)
    path = GOLDEN / f"{name}.json"
    if UPDATE_GOLDEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(path.read_text()), f"ruleset differs from {path}"


def test_rule_comments_read_back_as_dockers(box):
    """The comments nft prints are Docker's, one per kind of rule."""
    with firewall(box) as fw:
        fw.publish("c1", "nslab0", C1, "127.0.0.1:8080:80")
        text = nft(box.host, "list", "ruleset")
    for comment in ("ICC", "UNPUBLISHED PORT DROP", "DNAT", "MASQUERADE", "DROP DIRECT ACCESS",
                    "OUTGOING", "DROP REMOTE LOOPBACK"):
        assert f'comment "{comment}"' in text
    assert 'iifname != "nslab0" ip daddr 127.0.0.1 tcp dport 8080 counter packets 0 bytes 0 ' \
           'dnat to 172.17.0.2:80 comment "DNAT"' in text
    assert 'iifname != "lo" ip daddr 127.0.0.1 tcp dport 8080 counter packets 0 bytes 0 drop ' \
           'comment "DROP REMOTE LOOPBACK"' in text

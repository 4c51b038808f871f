"""Routing netlink (rtnetlink) inside any network namespace, without forking.

pyroute2's ``IPRoute(netns=X)`` forks a helper for every object. nslab instead makes the
socket on a throwaway thread that has entered the namespace (kernel-notes: the socket stays
bound to the namespace it was created in, for life) and hands it to ``IPRoute(use_socket=)``.
The long-lived Python thread never moves.

This module is the only place that speaks rtnetlink; pyroute2's ``NetlinkError`` (not an
``OSError``) is translated here into nslab's errors, naming the request and the object.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
import struct
import threading
from typing import Any, Iterable, Sequence

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from .errors import NslabError, from_errno, from_netlink
from .namespaces import Namespace

__all__ = ["NETLINK_ROUTE", "NETLINK_NETFILTER", "NETLINK_SOCK_DIAG", "socket_in", "NetlinkSession", "Rtnl", "GONE",
           "Request", "rtnl_socket_here", "link_up", "address_add", "default_route_add", "encode_batch",
           "send_batch"]

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

# "Already gone" answers that teardown may ignore, and only teardown.
GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


def rtnl_socket_here() -> socket.socket:
    """A bound rtnetlink socket in the calling thread's netns (the caller is already inside,
    e.g. on a :meth:`Namespace.call` thread): for :func:`send_batch`."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.bind((0, 0))
    return sock


def socket_in(ns: Namespace, family: int = socket.AF_NETLINK, type: int = socket.SOCK_DGRAM,
              proto: int = NETLINK_ROUTE) -> socket.socket:
    """A socket created inside ``ns`` (netlink by default); it stays in ``ns`` for life."""
    return ns.call(socket.socket, family, type | socket.SOCK_CLOEXEC, proto)


class NetlinkSession:
    """One netlink socket this object owns (created by the caller, e.g. with
    :func:`socket_in`: the socket decides the namespace), with the sequence numbers and the
    lock of one request at a time. ``close()`` is idempotent; a context manager."""

    protocol = "netlink"          # for error messages: "nfnetlink", "ctnetlink"...

    def __init__(self, sock: socket.socket, description: str = ""):
        self._sock: socket.socket | None = sock
        self.description = description
        self._lock = threading.Lock()
        self._seq = 0

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise from_errno(errno.EBADF, self.protocol, f"closed session {self.description}")
        return self._sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def close(self) -> None:
        """Close the socket (after a request in flight). Idempotent."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<{type(self).__name__} {self.description} {state}>"


class Rtnl:
    """An rtnetlink session bound to one network namespace. Close it (or use ``with``)."""

    def __init__(self, ns: Namespace):
        self.ns_description = ns.description
        self._ipr: IPRoute | None = IPRoute(use_socket=socket_in(ns))
        # pyroute2 0.9 binds an IPRoute to the thread that made it (RuntimeError elsewhere):
        # other threads get a short-lived session of their own, over our handle on the netns.
        self._owner = threading.get_ident()
        self._ns = Namespace.from_fd(ns.fileno(), "net")
        self._raw: socket.socket | None = None     # for the hot path (add_veth): any thread
        self._raw_lock = threading.Lock()

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            raise NslabError(errno.EBADF, f"rtnetlink session for {self.ns_description} is closed")
        return self._ipr

    def request(self, method: str, *args: Any, obj: str, ignore: Iterable[int] = (), **kwargs: Any):
        """Call ``IPRoute.<method>(*args, **kwargs)``; errors name ``obj`` and the namespace.
        Errnos in ``ignore`` return None (for idempotent teardown)."""
        try:
            if threading.get_ident() == self._owner:
                return getattr(self.ipr, method)(*args, **kwargs)
            _ = self.ipr                                  # raises if closed
            with IPRoute(use_socket=socket_in(self._ns)) as ipr:
                result = getattr(ipr, method)(*args, **kwargs)
                return list(result) if hasattr(result, "__next__") else result
        except NetlinkError as exc:
            if exc.code in tuple(ignore):
                return None
            op = f"{method} {args[0]}" if args and isinstance(args[0], str) else method
            raise from_netlink(exc, op, f"{obj} in {self.ns_description}", _hint(exc.code)) from None

    # --- the requests nslab makes, each one round trip --------------------------------
    def link_index(self, ifname: str) -> int | None:
        """Index of ``ifname``, or None. One ``RTM_GETLINK`` by name, never a dump
        (link_lookup dumps every link: 294 ms at thousands of links, pyroute2#712)."""
        reply = self.request("link", "get", ifname=ifname, obj=f"link {ifname}", ignore=GONE)
        return reply[0]["index"] if reply else None

    def link(self, ifname: str | None = None, index: int | None = None):
        """The link message for one interface, or None if it does not exist."""
        key = {"ifname": ifname} if index is None else {"index": index}
        reply = self.request("link", "get", **key, obj=f"link {ifname or index}", ignore=GONE)
        return reply[0] if reply else None

    def links(self):
        return list(self.request("get_links", obj="links"))

    def addresses(self, family: int = socket.AF_INET):
        return list(self.request("get_addr", family=family, obj="addresses"))

    def routes(self, family: int = socket.AF_INET, table: int = 254):
        return list(self.request("get_routes", family=family, table=table, obj="routes"))

    def set_up(self, index: int, name: str = "") -> None:
        self.request("link", "set", index=index, state="up", obj=f"link {name or index}")

    def add_veth(self, ifname: str, *, master: int, mtu: int, peer_ifname: str, peer_netns: Namespace,
                 obj: str) -> int:
        """Create a veth pair: ``ifname`` here, up and enslaved to ``master``, its peer born in
        ``peer_netns`` as ``peer_ifname``. Returns the peer's ifindex (in its netns).

        The hot path of every bridge-mode spawn, so one hand-encoded RTM_NEWLINK on a raw
        socket (pyroute2 costs ~0.5 ms of Python around the ~1 ms the kernel takes) with
        NLM_F_ECHO: the echoed link names its peer's index in IFLA_LINK (Linux 6.1+; before,
        one RTM_GETLINK asks for it).

        Both ends get txqueuelen 0, as Docker asks (``TxQLen: 0`` in libnetwork's createVeth),
        and one TX and one RX queue: the queues a veth ends up using anyway, asked for up
        front. Left to default, the kernel allocates one per possible CPU and then shrinks the
        real count to one, and each shrink waits for an expedited RCU grace period under
        rtnl_lock (two per pair, ~0.1 ms of the spawn). The one visible difference from
        Docker's veth: ``ip -d link`` shows ``numtxqueues 1`` where Docker's shows the CPU
        count, so ``ethtool -L`` cannot add queues to it."""
        queues = _nla_u32(_IFLA_TXQLEN, 0) + _nla_u32(_IFLA_NUM_TX_QUEUES, 1) + _nla_u32(_IFLA_NUM_RX_QUEUES, 1)
        peer = _ifinfo() + _nla_str(_IFLA_IFNAME, peer_ifname) + _nla_u32(_IFLA_MTU, mtu) + queues + \
            _nla_u32(_IFLA_NET_NS_FD, peer_netns.fileno())
        info = _nla_str(_IFLA_INFO_KIND, "veth") + _nla(_IFLA_INFO_DATA, _nla(_VETH_INFO_PEER, peer))
        body = _ifinfo(flags=_IFF_UP, change=_IFF_UP) + _nla_str(_IFLA_IFNAME, ifname) + \
            _nla_u32(_IFLA_MTU, mtu) + queues + _nla_u32(_IFLA_MASTER, master) + _nla(_IFLA_LINKINFO, info)
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL | _NLM_F_ECHO
        replies = self._raw_request(RTM_NEWLINK, flags, body, f"add veth {ifname}", obj)
        for msg_type, payload in replies:
            if msg_type == RTM_NEWLINK:
                peer_index = _find_attr_u32(payload, 16, _IFLA_LINK)
                if peer_index is not None:
                    return peer_index
        link = self.link(ifname=ifname)            # a kernel that does not echo
        return link.get_attr("IFLA_LINK")

    def _raw_request(self, msg_type: int, flags: int, body: bytes, op: str, obj: str) -> list[tuple[int, bytes]]:
        """One request on the raw socket; the replies before its ack, as (type, payload)."""
        _ = self.ipr                                      # raises if closed
        with self._raw_lock:
            if self._raw is None:
                self._raw = socket_in(self._ns, type=socket.SOCK_RAW)
                self._raw.bind((0, 0))
                self._seq = 0
            self._seq += 1
            seq = self._seq
            self._raw.send(struct.pack("=IHHII", 16 + len(body), msg_type, flags, seq, 0) + body)
            replies = []
            while True:
                data = self._raw.recv(65536)
                off = 0
                while off + 16 <= len(data):
                    length, typ, _, mseq, _ = struct.unpack_from("=IHHII", data, off)
                    if length < 16:
                        break
                    if mseq == seq:
                        if typ == _NLMSG_ERROR:
                            code = -struct.unpack_from("=i", data, off + 16)[0]
                            if code:
                                raise from_errno(code, "netlink " + op, f"{obj} in {self.ns_description}",
                                                 hint=_hint(code))
                            return replies
                        replies.append((typ, data[off + 16:off + length]))
                    off += (length + 3) & ~3

    def delete_link(self, index: int | None = None, ifname: str | None = None) -> bool:
        """Delete a link; True if it was there. Idempotent: a missing link is not an error."""
        key = {"index": index} if index is not None else {"ifname": ifname}
        reply = self.request("link", "del", **key, obj=f"link {ifname or index}", ignore=GONE)
        return reply is not None

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()
            self._ns.close()
            with self._raw_lock:
                if self._raw is not None:
                    self._raw.close()
                    self._raw = None

    @property
    def closed(self) -> bool:
        return self._ipr is None

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Rtnl {self.ns_description} {'closed' if self.closed else 'open'}>"


# --- batches: several requests in one sendmsg -------------------------------------------
# rtnetlink processes every message of one datagram in order, acking each: configuring a
# fresh container namespace (lo up, eth0 up, address, default route) is one round trip
# of ~0.1 ms instead of four pyroute2 calls of ~0.3 ms each (performance.md).
_IFF_UP = 0x1
_NLMSG_ERROR = 2
_NLM_F_ECHO = 0x8
_IFLA_IFNAME, _IFLA_MTU, _IFLA_LINK, _IFLA_MASTER, _IFLA_LINKINFO, _IFLA_NET_NS_FD = 3, 4, 5, 10, 18, 28
_IFLA_TXQLEN, _IFLA_NUM_TX_QUEUES, _IFLA_NUM_RX_QUEUES = 13, 31, 32
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _VETH_INFO_PEER = 1, 2, 1
_IFA_ADDRESS, _IFA_LOCAL, _IFA_BROADCAST = 1, 2, 4
_RTA_OIF, _RTA_GATEWAY = 4, 5


def _nla(attr_type: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), attr_type) + payload + b"\0" * (-len(payload) % 4)


def _nla_str(attr_type: int, value: str) -> bytes:
    return _nla(attr_type, value.encode() + b"\0")


def _nla_u32(attr_type: int, value: int) -> bytes:
    return _nla(attr_type, struct.pack("=I", value))


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def _find_attr_u32(payload: bytes, offset: int, attr_type: int) -> int | None:
    """The u32 value of a top-level attribute of a message body, attributes from ``offset``."""
    while offset + 4 <= len(payload):
        length, typ = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return None
        if typ & 0x3FFF == attr_type and length >= 8:
            return struct.unpack_from("=I", payload, offset + 4)[0]
        offset += (length + 3) & ~3
    return None
_RTPROT_BOOT = 3
_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1


@dataclasses.dataclass
class Request:
    """One encoded rtnetlink request and what it does, for the error message."""
    data: bytes
    what: str


def _request(msg_type: int, flags: int, body: bytes, what: str) -> Request:
    # seq is filled in per batch (encode_batch); portid 0: the kernel.
    flags |= NLM_F_REQUEST | NLM_F_ACK
    return Request(struct.pack("=IHHII", 16 + len(body), msg_type, flags, 0, 0) + body, what)


# Hand-encoded (each ~5 us, where pyroute2's message classes take ~80 us): they are on the
# path of every spawn. tests/test_netlink_encoding.py checks them against pyroute2's bytes.
def link_up(ifname: str, mtu: int | None = None) -> Request:
    """Bring a link up by name (RTM_NEWLINK on an existing link: a 'set')."""
    body = _ifinfo(flags=_IFF_UP, change=_IFF_UP) + _nla_str(_IFLA_IFNAME, ifname)
    if mtu:
        body += _nla_u32(_IFLA_MTU, mtu)
    return _request(RTM_NEWLINK, 0, body, f"set link {ifname} up")


def address_add(index: int, interface: ipaddress.IPv4Interface, ifname: str = "") -> Request:
    ip = interface.ip.packed
    body = struct.pack("=BBBBI", socket.AF_INET, interface.network.prefixlen, 0, 0, index) + \
        _nla(_IFA_LOCAL, ip) + _nla(_IFA_ADDRESS, ip) + \
        _nla(_IFA_BROADCAST, interface.network.broadcast_address.packed)
    return _request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {interface} to {ifname or index}")


def default_route_add(gateway: ipaddress.IPv4Address, index: int) -> Request:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, _RT_TABLE_MAIN, _RTPROT_BOOT, 0,
                       _RTN_UNICAST, 0) + _nla(_RTA_GATEWAY, gateway.packed) + _nla_u32(_RTA_OIF, index)
    return _request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, f"add default route via {gateway}")


def link_index_raw(sock: socket.socket, ifname: str) -> int:
    """RTM_GETLINK by name on a raw rtnetlink socket; the reply carries the index."""
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", ifname)]
    msg["header"]["type"] = RTM_GETLINK
    msg["header"]["flags"] = NLM_F_REQUEST
    msg.encode()
    sock.send(bytes(msg.data))
    data = sock.recv(65536)
    _, msg_type = struct.unpack_from("=IH", data, 0)
    if msg_type == _NLMSG_ERROR:
        raise from_errno(-struct.unpack_from("=i", data, 16)[0], "netlink get link", ifname)
    return struct.unpack_from("=i", data, 16 + 4)[0]  # ifinfomsg: family, pad, type, index


def encode_batch(requests: Sequence[Request]) -> bytes:
    """The requests back to back, numbered 1..n (nlmsg_seq matches each ack to its request)."""
    buf = bytearray()
    for seq, req in enumerate(requests, 1):
        data = bytearray(req.data)
        struct.pack_into("=I", data, 8, seq)
        buf += data + b"\0" * (-len(data) % 4)
    return bytes(buf)


def send_batch(sock: socket.socket, requests: Sequence[Request], where: str) -> None:
    """Send every request in one datagram; raise for the first one the kernel refused."""
    sock.send(encode_batch(requests))
    errors: dict[int, int] = {}
    acked = 0
    while acked < len(requests):
        data = sock.recv(65536)
        off = 0
        while off < len(data):
            length, msg_type, _, seq, _ = struct.unpack_from("=IHHII", data, off)
            if msg_type == _NLMSG_ERROR:
                acked += 1
                code = -struct.unpack_from("=i", data, off + 16)[0]
                if code:
                    errors[seq] = code
            off += (length + 3) & ~3
    if errors:
        seq = min(errors)
        raise from_errno(errors[seq], "netlink " + requests[seq - 1].what, where)


def _hint(code: int) -> str | None:
    if code == errno.EXFULL:
        return "a Linux bridge holds at most 1024 ports (BR_MAX_PORTS): use another network"
    if code == errno.EEXIST:
        return "an interface with that name exists already in that namespace"
    return None

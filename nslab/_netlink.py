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
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from .errors import NslabError, from_errno, from_netlink
from .namespaces import Namespace

__all__ = ["NETLINK_ROUTE", "NETLINK_NETFILTER", "NETLINK_SOCK_DIAG", "socket_in", "Rtnl", "GONE",
           "Request", "rtnl_socket_here", "link_up", "address_add", "default_route_add", "send_batch"]

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


class Rtnl:
    """An rtnetlink session bound to one network namespace. Close it (or use ``with``)."""

    def __init__(self, ns: Namespace):
        self.ns_description = ns.description
        self._ipr: IPRoute | None = IPRoute(use_socket=socket_in(ns))
        # pyroute2 0.9 binds an IPRoute to the thread that made it (RuntimeError elsewhere):
        # other threads get a short-lived session of their own, over our handle on the netns.
        self._owner = threading.get_ident()
        self._ns = Namespace.from_fd(ns.fileno(), "net")

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
_RTPROT_BOOT = 3
_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1


@dataclasses.dataclass
class Request:
    """One encoded rtnetlink request and what it does, for the error message."""
    data: bytes
    what: str


def _encode(msg, msg_type: int, flags: int, what: str) -> Request:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg.encode()
    return Request(bytes(msg.data), what)


def link_up(ifname: str, mtu: int | None = None) -> Request:
    """Bring a link up by name (RTM_NEWLINK on an existing link: a 'set')."""
    msg = ifinfmsg()
    msg["flags"] = msg["change"] = _IFF_UP
    msg["attrs"] = [("IFLA_IFNAME", ifname)] + ([("IFLA_MTU", mtu)] if mtu else [])
    return _encode(msg, RTM_NEWLINK, 0, f"set link {ifname} up")


def address_add(index: int, interface: ipaddress.IPv4Interface, ifname: str = "") -> Request:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET
    msg["prefixlen"] = interface.network.prefixlen
    msg["index"] = index
    ip = str(interface.ip)
    msg["attrs"] = [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip),
                    ("IFA_BROADCAST", str(interface.network.broadcast_address))]
    return _encode(msg, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, f"add address {interface} to {ifname or index}")


def default_route_add(gateway: ipaddress.IPv4Address, index: int) -> Request:
    msg = rtmsg()
    msg.update(family=socket.AF_INET, dst_len=0, table=_RT_TABLE_MAIN, proto=_RTPROT_BOOT,
               scope=0, type=_RTN_UNICAST)
    msg["attrs"] = [("RTA_GATEWAY", str(gateway)), ("RTA_OIF", index)]
    return _encode(msg, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, f"add default route via {gateway}")


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


def send_batch(sock: socket.socket, requests: Sequence[Request], where: str) -> None:
    """Send every request in one datagram; raise for the first one the kernel refused."""
    buf = bytearray()
    for seq, req in enumerate(requests, 1):
        data = bytearray(req.data)
        struct.pack_into("=I", data, 8, seq)  # nlmsg_seq: match acks to requests
        buf += data
    sock.send(bytes(buf))
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

"""Routing netlink (rtnetlink) inside any network namespace, without forking.

pyroute2's ``IPRoute(netns=X)`` forks a helper for every object. nslab instead makes the
socket on a throwaway thread that has entered the namespace (kernel-notes: the socket stays
bound to the namespace it was created in, for life) and hands it to ``IPRoute(use_socket=)``.
The long-lived Python thread never moves.

This module is the only place that speaks rtnetlink; pyroute2's ``NetlinkError`` (not an
``OSError``) is translated here into nslab's errors, naming the request and the object.
"""
from __future__ import annotations

import errno
import socket
from typing import Any, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import NslabError, from_netlink
from .namespaces import Namespace

__all__ = ["NETLINK_ROUTE", "NETLINK_NETFILTER", "NETLINK_SOCK_DIAG", "socket_in", "Rtnl", "GONE"]

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
NETLINK_NETFILTER = 12

# "Already gone" answers that teardown may ignore, and only teardown.
GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


def socket_in(ns: Namespace, family: int = socket.AF_NETLINK, type: int = socket.SOCK_DGRAM,
              proto: int = NETLINK_ROUTE) -> socket.socket:
    """A socket created inside ``ns`` (netlink by default); it stays in ``ns`` for life."""
    return ns.call(socket.socket, family, type | socket.SOCK_CLOEXEC, proto)


class Rtnl:
    """An rtnetlink session bound to one network namespace. Close it (or use ``with``)."""

    def __init__(self, ns: Namespace):
        self.ns_description = ns.description
        self._ipr: IPRoute | None = IPRoute(use_socket=socket_in(ns))

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            raise NslabError(errno.EBADF, f"rtnetlink session for {self.ns_description} is closed")
        return self._ipr

    def request(self, method: str, *args: Any, obj: str, ignore: Iterable[int] = (), **kwargs: Any):
        """Call ``IPRoute.<method>(*args, **kwargs)``; errors name ``obj`` and the namespace.
        Errnos in ``ignore`` return None (for idempotent teardown)."""
        try:
            return getattr(self.ipr, method)(*args, **kwargs)
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

    @property
    def closed(self) -> bool:
        return self._ipr is None

    def __enter__(self) -> "Rtnl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Rtnl {self.ns_description} {'closed' if self.closed else 'open'}>"


def _hint(code: int) -> str | None:
    if code == errno.EXFULL:
        return "a Linux bridge holds at most 1024 ports (BR_MAX_PORTS): use another network"
    if code == errno.EEXIST:
        return "an interface with that name exists already in that namespace"
    return None

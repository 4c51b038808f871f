"""Measuring instruments the experiments share: reach a port from inside a namespace, serve
a banner from one, read interface lists and packet counters, read nftables rule counters.

Everything here works on :class:`~nslab.namespaces.Namespace` handles and never moves the
calling thread: a socket made inside a namespace (``socket_in``) stays there for life, so
``connect_from(ns, ...)`` *is* traffic leaving ``ns``, whoever calls it.

Rule counters are read straight from the kernel (an ``NFT_MSG_GETRULE`` dump over a
``NETLINK_NETFILTER`` socket made inside the host's netns), not through ``nft``: a fresh
machine may not have the binary, and the dump is the same data ``nft list ruleset`` prints.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time

from .._netlink import NETLINK_NETFILTER, Rtnl, socket_in
from ..errors import from_errno
from ..namespaces import Namespace
from ._base import errname

__all__ = ["connect_from", "udp_from", "Service", "interfaces", "ipv4_addresses", "link_stats",
           "rule_counters", "counter_deltas", "read_line"]


# --- reaching things -----------------------------------------------------------------------
def connect_from(ns: Namespace, address: str, port: int, *, timeout: float = 1.0) -> dict:
    """TCP connect from inside ``ns``; read the banner the server sends, if any.

    Returns ``{"ok": True, "banner": ..., "local": "ip:port"}`` or ``{"ok": False,
    "error": "ECONNREFUSED"}`` (``ETIMEDOUT`` when nothing answered: a DROP rule, no route).
    """
    sock = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError as exc:
            return {"ok": False, "error": errname(exc), "to": f"{address}:{port}"}
        local = "%s:%d" % sock.getsockname()[:2]
        try:
            banner = sock.recv(256).decode(errors="replace").strip()
        except OSError as exc:
            banner = f"(no banner: {errname(exc)})"
        return {"ok": True, "banner": banner, "local": local, "to": f"{address}:{port}"}


def connect_unix_from(ns: Namespace, path: str, *, timeout: float = 1.0) -> dict:
    """Connect to a UNIX socket (``@name`` for an abstract one) from inside ``ns``."""
    sock = socket_in(ns, socket.AF_UNIX, socket.SOCK_STREAM, 0)
    with sock:
        sock.settimeout(timeout)
        target = "\0" + path[1:] if path.startswith("@") else path
        try:
            sock.connect(target)
        except OSError as exc:
            return {"ok": False, "error": errname(exc), "to": path}
        try:
            banner = sock.recv(256).decode(errors="replace").strip()
        except OSError as exc:
            banner = f"(no banner: {errname(exc)})"
        return {"ok": True, "banner": banner, "to": path}


def udp_from(ns: Namespace, address: str, port: int, payload: bytes = b"ping", *,
             timeout: float = 1.0) -> dict:
    """Send one UDP datagram from inside ``ns`` and wait for one reply."""
    sock = socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM, 0)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(payload, (address, port))
            data, peer = sock.recvfrom(2048)
        except OSError as exc:
            return {"ok": False, "error": errname(exc), "to": f"{address}:{port}/udp"}
        return {"ok": True, "reply": data.decode(errors="replace").strip(),
                "from": "%s:%d" % peer[:2], "to": f"{address}:{port}/udp"}


class Service:
    """A listening socket made inside a namespace that answers every connection with a
    one-line banner, on its own thread. ``kind``: ``tcp`` (``where=(addr, port)``),
    ``unix`` (``where="@abstract"`` or a path). With ``show_peer`` the banner ends with the
    client's address as this side sees it (so NAT on the way shows). ``peers`` lists them.
    A context manager; ``close()`` is idempotent.
    """

    def __init__(self, ns: Namespace, kind: str, where, banner: str, *, show_peer: bool = False):
        if kind not in ("tcp", "unix"):
            raise ValueError(kind)
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        self.kind, self.where, self.banner, self.show_peer = kind, where, banner, show_peer
        self.peers: list[str] = []
        self._sock = socket_in(ns, family, socket.SOCK_STREAM, 0)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        try:
            if kind == "tcp":
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._sock.bind(where)
                self.where = self._sock.getsockname()[:2]
            else:
                self._sock.bind("\0" + where[1:] if where.startswith("@") else where)
            self._sock.listen(64)
        except BaseException:
            self._release()
            raise
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, name=f"nslab-service-{where}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self.where[1]

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._sock, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                conn, peer = self._sock.accept()
            except OSError:
                continue
            with conn:
                self.accepted += 1
                text = self.banner
                if self.kind == "tcp":
                    self.peers.append("%s:%d" % peer[:2])
                    if self.show_peer:
                        text += " %s:%d" % peer[:2]
                try:
                    conn.sendall(text.encode() + b"\n")
                except OSError:
                    pass

    def close(self) -> None:
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
            self._thread.join(5)
        self._release()

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        if self.kind == "unix" and isinstance(self.where, str) and not self.where.startswith("@"):
            try:
                os.unlink(self.where)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"{self.accepted} served"
        return f"<Service {self.kind} {self.where}: {state}>"


# --- interfaces and their counters -----------------------------------------------------------
def interfaces(ns: Namespace) -> list[dict]:
    """Every link of ``ns``: index, name, kind, and its bridge (sorted by index)."""
    with Rtnl(ns) as rtnl:
        links = rtnl.links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        out = []
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            master = link.get_attr("IFLA_MASTER")
            out.append({"index": link["index"], "name": names[link["index"]],
                        "kind": kind or ("loopback" if link["index"] == 1 else "device"),
                        "master": names.get(master) if master else None})
    return sorted(out, key=lambda i: i["index"])


def ipv4_addresses(ns: Namespace) -> list[str]:
    """The IPv4 addresses of ``ns`` that are not loopback ones, as ``ip -4 addr`` lists them."""
    with Rtnl(ns) as rtnl:
        found = [msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS") for msg in rtnl.addresses()]
    return [a for a in found if a and not a.startswith("127.")]


def link_stats(ns: Namespace, names=None) -> dict[str, dict]:
    """Packet and byte counters (IFLA_STATS64) of the links of ``ns`` (or only ``names``)."""
    out = {}
    with Rtnl(ns) as rtnl:
        for link in rtnl.links():
            name = link.get_attr("IFLA_IFNAME")
            if names is not None and name not in names:
                continue
            stats = link.get_attr("IFLA_STATS64") or {}
            out[name] = {k: int(stats.get(k, 0)) for k in
                         ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}
    return out


def stats_delta(before: dict, after: dict) -> dict[str, dict]:
    return {name: {k: after[name][k] - before.get(name, {}).get(k, 0) for k in after[name]}
            for name in after}


# --- nftables rule counters --------------------------------------------------------------------
_NFT_MSG_GETRULE = 7
_NFNL_SUBSYS_NFTABLES = 10
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NFPROTO_IPV4 = 2


def rule_counters(ns: Namespace, table: str = "nslab") -> dict[str, dict]:
    """Every rule of ``table`` (family ip) in ``ns`` that has a counter:
    ``{"CHAIN#HANDLE": {"chain", "handle", "comment", "packets", "bytes"}}``.
    An absent table gives ``{}`` (no rule can have counted anything)."""
    from pyroute2.netlink.nfnetlink.nftsocket import nft_rule_msg

    msg = nft_rule_msg()
    msg["header"]["type"] = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETRULE
    msg["header"]["flags"] = _NLM_F_REQUEST | _NLM_F_DUMP
    msg["header"]["sequence_number"] = 1
    msg["nfgen_family"] = _NFPROTO_IPV4
    msg["attrs"] = [("NFTA_RULE_TABLE", table)]
    msg.encode()
    sock = socket_in(ns, proto=NETLINK_NETFILTER)
    out: dict[str, dict] = {}
    with sock:
        sock.bind((0, 0))
        sock.send(msg.data)
        while True:
            buf = sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(buf):
                length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", buf, off)
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, off + 16)[0]
                    if code == errno.ENOENT:
                        return out
                    if code:
                        raise from_errno(code, "nfnetlink GETRULE dump", f"table ip {table} in {ns.description}")
                    return out
                rule = nft_rule_msg(buf[off:off + length])
                rule.decode()
                _add_rule(out, rule)
                off += (length + 3) & ~3
                if length < 16:
                    break


def _add_rule(out: dict, rule) -> None:
    chain, handle = rule.get_attr("NFTA_RULE_CHAIN"), rule.get_attr("NFTA_RULE_HANDLE")
    comment = rule.get_attr("NFTA_RULE_USERDATA")
    if isinstance(comment, (bytes, bytearray)):
        # nft's userdata TLV: type 0 (comment), length, text with a NUL.
        comment = bytes(comment[2:2 + comment[1]]).rstrip(b"\0").decode(errors="replace") \
            if len(comment) >= 2 and comment[0] == 0 else None
    for expr in rule.get_attr("NFTA_RULE_EXPRESSIONS") or []:
        if expr.get_attr("NFTA_EXPR_NAME") == "counter":
            data = expr.get_attr("NFTA_EXPR_DATA")
            out[f"{chain}#{handle}"] = {"chain": chain, "handle": handle, "comment": comment or None,
                                        "packets": int(data.get_attr("NFTA_COUNTER_PACKETS") or 0),
                                        "bytes": int(data.get_attr("NFTA_COUNTER_BYTES") or 0)}


def counter_deltas(before: dict, after: dict) -> dict[str, dict]:
    """The rules whose packet counter moved between two :func:`rule_counters` readings."""
    moved = {}
    for key, rule in after.items():
        delta = rule["packets"] - before.get(key, {}).get("packets", 0)
        if delta:
            name = f"{rule['chain']} {rule['comment'] or 'handle %d' % rule['handle']}"
            moved[name] = moved.get(name, 0) + delta
    return moved


# --- child output ------------------------------------------------------------------------------
def read_line(stream, timeout: float) -> str:
    """One line from a child's stdout pipe, or "" if none came within ``timeout``."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()

"""Connection-tracking entries over ctnetlink: list them, and delete exactly the ones asked for.

Why nslab needs it: NAT rules are consulted only when a conntrack entry is *created*; every
later packet of the flow follows the entry. A UDP client that keeps sending to a published
port keeps its entry alive (each datagram refreshes it: 30 s, or 120 s for a flow with
replies), so after the port is unpublished — or published again for another container —
its datagrams still go to the old container address. Docker deletes those entries when it
changes a port mapping (moby ``daemon/libnetwork/iptables/conntrack.go``,
``DeleteConntrackEntriesByPort``: protocol, original destination port, and the host IP
when the binding has one); :meth:`nslab.firewall.Firewall.unpublish` does the same::

    with Conntrack(socket_in(host_ns, proto=NETLINK_NETFILTER), "netns host") as ct:
        gone = ct.delete(ct.entries(proto="udp", dport=5353))

How: a dump (``IPCTNL_MSG_CT_GET`` + ``NLM_F_DUMP``) narrowed in the kernel with
``CTA_FILTER`` (Linux 5.8+) and checked again here, field by field, then one
``IPCTNL_MSG_CT_DELETE`` per entry naming its original tuple *and* its ``CTA_ID``: an entry
that expired and was re-created in between has another id and is left alone. That is what
vishvananda/netlink's ``ConntrackDeleteFilters`` (moby's caller) does too: the kernel's
flush takes no tuple filter.

Messages are pyroute2's ``nfct_msg`` (encoded and decoded by pyroute2); the transport is a
plain ``NETLINK_NETFILTER`` socket the caller creates inside the target netns
(``nslab._netlink.socket_in``), as for :mod:`nslab._nft`. (pyroute2's own ``Conntrack``
closes a socket it was given after its first request, so it cannot be handed one.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET, NFCTAttrTuple, nfct_msg,
)

from ._netlink import NetlinkSession
from .errors import InputError, NslabError, from_errno

__all__ = ["Conntrack", "Entry", "PROTOCOLS"]

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_DUMP_INTR = 0x10          # the table changed during the dump: it may have missed entries
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
_DUMP_ATTEMPTS = 3
IO_TIMEOUT = 10.0               # a kernel that never answers must not hang a teardown
_DELETE_SLICE = 512


@dataclasses.dataclass(frozen=True)
class Entry:
    """One IPv4 conntrack entry: its original tuple (what the first packet looked like), the
    reply tuple (what answers look like: after DNAT, ``reply_src`` is the container), and the
    kernel's id for it."""
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    reply_src: str
    reply_dst: str
    reply_sport: int
    reply_dport: int
    id: int
    zone: int | None = None

    def __str__(self) -> str:
        name = {v: k for k, v in PROTOCOLS.items()}.get(self.proto, str(self.proto))
        return (f"{name} {self.src}:{self.sport} -> {self.dst}:{self.dport} "
                f"(reply {self.reply_src}:{self.reply_sport} -> {self.reply_dst}:{self.reply_dport})")


class Conntrack(NetlinkSession):
    """A ctnetlink session over one ``NETLINK_NETFILTER`` socket it takes ownership of.

    The socket decides the namespace: create it with ``socket_in(ns, proto=12)``. A context
    manager; ``close()`` is idempotent. One request at a time (a lock)."""

    protocol = "ctnetlink"

    def __init__(self, sock: socket.socket, description: str = ""):
        super().__init__(sock, description)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)   # dumps come in bulk
            sock.settimeout(IO_TIMEOUT)
            sock.bind((0, 0))
        except OSError as exc:
            self.close()
            raise from_errno(exc.errno or errno.EIO, "bind(NETLINK_NETFILTER)",
                             f"ctnetlink session {description}") from None
        except BaseException:
            self.close()
            raise

    # --- reading ---------------------------------------------------------------------------
    def entries(self, *, proto: str | None = None, dport: int | None = None,
                dst: str | None = None) -> list[Entry]:
        """The IPv4 entries whose *original* tuple matches every filter given.

        Raises InputError for a bad filter, NslabError (naming ctnetlink and the namespace)
        if the kernel refuses the dump."""
        proto_num, dst = self._check(proto, dport, dst)
        want = NFCTAttrTuple(proto=proto_num, dport=dport, daddr=dst)
        for _ in range(_DUMP_ATTEMPTS):
            with self._io("ctnetlink dump (IPCTNL_MSG_CT_GET)"):
                found, interrupted = self._dump(want)
            if not interrupted:
                break
        return [e for e in found if (proto_num is None or e.proto == proto_num)
                and (dport is None or e.dport == dport) and (dst is None or e.dst == dst)]

    def _dump(self, want: NFCTAttrTuple) -> tuple[list[Entry], bool]:
        msg = nfct_msg.create_from(tuple_orig=want) if want.attrs() else nfct_msg()
        if want.attrs():
            # attrs() computed the filter flags: only the fields given are compared.
            msg["attrs"].append(["CTA_FILTER", {"attrs": [["CTA_FILTER_ORIG_FLAGS", want.flags]]}])
        with self._lock:
            seq = self._send(msg, IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP)
            found: list[Entry] = []
            interrupted = False
            while True:
                for kind, flags, mseq, data in self._messages():
                    if mseq != seq:
                        continue
                    if kind == NLMSG_DONE:
                        return found, interrupted
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, 16)[0]
                        raise from_errno(code, "ctnetlink dump (IPCTNL_MSG_CT_GET)",
                                         f"conntrack table in {self.description}", _hint(code))
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    try:
                        entry = _decode(data)
                    except (ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
                        raise from_errno(errno.EBADMSG, "ctnetlink dump (IPCTNL_MSG_CT_GET)",
                                         f"an undecodable entry in {self.description}: {exc}") from None
                    if entry is not None:
                        found.append(entry)

    # --- deleting --------------------------------------------------------------------------
    def delete(self, entries: list[Entry]) -> int:
        """Delete these entries (matched by original tuple and id); return how many went.

        An entry that is gone already (expired, or deleted by someone else) is not an error.
        Raises NslabError for any other refusal, after trying every entry."""
        deleted, failed = 0, None
        with self._lock, self._io("ctnetlink delete (IPCTNL_MSG_CT_DELETE)"):
            # In slices, so the acks of one sendall() always fit the receive buffer.
            for start in range(0, len(entries), _DELETE_SLICE):
                pending: dict[int, Entry] = {}
                out = bytearray()
                for e in entries[start: start + _DELETE_SLICE]:
                    orig = NFCTAttrTuple(saddr=e.src, daddr=e.dst, proto=e.proto, sport=e.sport,
                                         dport=e.dport)
                    msg = nfct_msg.create_from(tuple_orig=orig, id=e.id, zone=e.zone)
                    seq = self._next_seq()
                    pending[seq] = e
                    out += self._encode(msg, IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq)
                self.sock.sendall(bytes(out))
                while pending:
                    for kind, _flags, seq, data in self._messages():
                        if kind != NLMSG_ERROR or seq not in pending:
                            continue
                        entry = pending.pop(seq)
                        code = -struct.unpack_from("=i", data, 16)[0]
                        if code == 0:
                            deleted += 1
                        elif code != errno.ENOENT and failed is None:
                            failed = (code, entry)
        if failed is not None:
            code, entry = failed
            raise from_errno(code, "ctnetlink delete (IPCTNL_MSG_CT_DELETE)",
                             f"conntrack entry {entry} in {self.description}", _hint(code))
        return deleted

    # --- the wire ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _io(self, what: str):
        """Socket errors (ENOBUFS, a timeout, ...) as nslab errors naming the request."""
        try:
            yield
        except NslabError:
            raise
        except OSError as exc:
            code = errno.ETIMEDOUT if isinstance(exc, TimeoutError) else (exc.errno or errno.EIO)
            raise from_errno(code, what, f"conntrack table in {self.description}",
                             _hint(code)) from None

    @staticmethod
    def _encode(msg: nfct_msg, kind: int, flags: int, seq: int) -> bytes:
        msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | kind
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = seq
        msg["nfgen_family"] = socket.AF_INET
        msg.encode()
        return bytes(msg.data)

    def _send(self, msg: nfct_msg, kind: int, flags: int) -> int:
        seq = self._next_seq()
        self.sock.sendall(self._encode(msg, kind, flags, seq))
        return seq

    def _messages(self):
        """The netlink messages of one recv(): (type, flags, seq, whole message)."""
        buf = self.sock.recv(1 << 20)
        off = 0
        while off + 16 <= len(buf):
            length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
            if length < 16 or off + length > len(buf) or (kind == NLMSG_ERROR and length < 20):
                # Not what the kernel sends: refuse it rather than misread what follows.
                raise from_errno(errno.EBADMSG, "ctnetlink recv",
                                 f"a malformed netlink message ({length} bytes at {off} of {len(buf)})")
            yield kind, flags, seq, buf[off: off + length]
            off += (length + 3) & ~3

    @staticmethod
    def _check(proto, dport, dst) -> tuple[int | None, str | None]:
        """The protocol's number and the address in canonical form; InputError otherwise."""
        if proto is not None and proto not in PROTOCOLS:
            raise InputError("proto", f"one of {', '.join(PROTOCOLS)}", proto)
        if dport is not None and (not isinstance(dport, int) or isinstance(dport, bool)
                                  or not 1 <= dport <= 65535):
            raise InputError("dport", "a port number from 1 to 65535", dport)
        if dport is not None and proto is None:
            raise InputError("dport", "a port filter needs proto (ports are per protocol)", dport)
        if dst is not None:
            try:
                dst = str(ipaddress.IPv4Address(dst))
            except ValueError:
                raise InputError("dst", "an IPv4 address", dst) from None
        return (None if proto is None else PROTOCOLS[proto]), dst


def _decode(data: bytes) -> Entry | None:
    msg = nfct_msg(data)
    msg.decode()
    if msg["nfgen_family"] != socket.AF_INET:
        return None
    orig = msg.get_attr("CTA_TUPLE_ORIG")
    reply = msg.get_attr("CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    o = NFCTAttrTuple.from_netlink(socket.AF_INET, orig)
    r = NFCTAttrTuple.from_netlink(socket.AF_INET, reply)
    return Entry(o.proto, o.saddr, o.daddr, o.sport or 0, o.dport or 0, r.saddr, r.daddr,
                 r.sport or 0, r.dport or 0, msg.get_attr("CTA_ID"), msg.get_attr("CTA_ZONE"))


def _hint(code: int) -> str | None:
    if code == errno.EPERM:
        return "ctnetlink needs CAP_NET_ADMIN in the namespace's user namespace"
    if code in (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EINVAL):
        return "the kernel lacks conntrack over netlink (nf_conntrack_netlink)"
    return None

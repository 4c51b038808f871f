"""nftables over netlink, small and declarative: rules are data, compiled to kernel expressions.

The kernel does not understand ``nft`` syntax; ``nft`` compiles each rule to a list of
*expressions* (load a field into a register, compare, set a verdict) and sends the lot as
one nfnetlink *batch*, which the kernel applies atomically: all of it or none of it.
nslab does the same without the ``nft`` binary (pure Python, works rootless too):

    >>> rule = Rule("nat-prerouting-and-output",
    ...             (("iifname", "!=", "nslab0"), ("tcp dport", "==", 8080)),
    ...             Dnat("172.17.0.2", 80), comment="DNAT")
    >>> batch = Batch("nslab")
    >>> batch.add_rule(rule)                        # -> index of the request in the batch
    >>> handles = Netfilter(sock).commit(batch)     # one sendmsg; {index: rule handle}

which ``nft list ruleset`` prints back as Docker's golden files do::

    iifname != "nslab0" tcp dport 8080 counter packets 0 bytes 0 dnat to 172.17.0.2:80 comment "DNAT"

A :class:`Rule` is a chain name, a tuple of matches ``(field, op, value)``, a verdict and a
comment. The fields are exactly the ones Docker's nftables backend uses (see ``FIELDS``);
each compiles to the bytecode ``nft --debug=netlink`` shows for the same text, so the
ruleset reads back identically. Comments travel as rule userdata in nft's format (TLV,
type 0 = comment), so ``nft list`` shows ``comment "DNAT"``.

The message envelopes (table, chain, set, set element, rule) are pyroute2's nfnetlink
message classes; pyroute2's expression classes are not used because some of them encode
wrongly (``fib`` result and NAT flags are encoded as bit sets), so expressions are packed
here, in about a hundred lines, from ``include/uapi/linux/netfilter/nf_tables.h``.

Transport: one blocking ``NETLINK_NETFILTER`` socket, created by the caller inside the
target network namespace (``nslab._netlink.socket_in``). A batch goes out in one
``sendmsg``; every request carries ``NLM_F_ACK`` and new rules ``NLM_F_ECHO`` (the echo
carries the rule's *handle*, needed to delete exactly that rule later). A ``GETGEN`` request
sent right after the batch marks the end of the replies: netlink answers in order.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELCHAIN, NFT_MSG_DELRULE, NFT_MSG_DELSETELEM, NFT_MSG_DELTABLE, NFT_MSG_GETGEN,
    NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE,
    nft_chain_msg, nft_set_elem_list_msg, nft_set_msg, nft_table_msg,
)

from ._netlink import NetlinkSession
from .errors import NslabError, from_errno

__all__ = ["Rule", "Dnat", "Jump", "Vmap", "ACCEPT", "DROP", "MASQUERADE", "FIELDS", "Batch",
           "Netfilter", "NFT_TABLE_F_OWNER", "HOOKS", "compile_rule"]

# --- constants from the kernel's uapi headers ------------------------------------------------
NFPROTO_IPV4 = 2
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
NFT_TABLE_F_OWNER = 0x2          # table dies with the netlink socket that made it (5.12+)
NFT_SET_MAP = 0x8
NFT_DATA_VERDICT = 0xFFFFFF00
NFT_TYPE_IFNAME = 41             # nft's datatype id for "ifname" (nftables/include/datatype.h)
IFNAMSIZ = 16
NF_DROP, NF_ACCEPT, NFT_JUMP = 0, 1, -3
REG_VERDICT, REG_1, REG_2 = 0, 1, 2
META_IIFNAME, META_OIFNAME, META_L4PROTO = 6, 7, 16
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
CMP_EQ, CMP_NEQ = 0, 1
CT_STATE = 0
CT_ESTABLISHED, CT_RELATED = 0x2, 0x4
FIB_RESULT_ADDRTYPE = 3
FIB_F_SADDR, FIB_F_DADDR = 0x1, 0x2
RTN_LOCAL = 2
NAT_SNAT, NAT_DNAT = 0, 1
NFTNL_UDATA_RULE_COMMENT = 0
_BYTEORDER_INVALID, _BYTEORDER_HOST = struct.pack("=I", 0), struct.pack("=I", 1)   # nft's enum byteorder

# hook name -> (hook number, chain type, priority); priorities as nft's names for them.
HOOKS = {
    "filter-forward": (2, "filter", 0),          # priority filter
    "nat-prerouting": (0, "nat", -100),          # priority dstnat
    "nat-output": (3, "nat", -100),              # priority dstnat (nft < 1.0.7 prints -100)
    "nat-postrouting": (4, "nat", 100),          # priority srcnat
    "raw-prerouting": (0, "filter", -300),       # priority raw
}
PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


# --- verdicts ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Verdict:
    """``accept`` or ``drop``."""
    name: str


@dataclasses.dataclass(frozen=True)
class Jump:
    """``jump CHAIN``."""
    chain: str


@dataclasses.dataclass(frozen=True)
class Vmap:
    """``iifname vmap @MAP`` / ``oifname vmap @MAP``: jump through a verdict map keyed by name."""
    field: str
    map: str


@dataclasses.dataclass(frozen=True)
class Dnat:
    """``dnat to ADDR:PORT``."""
    addr: str
    port: int


@dataclasses.dataclass(frozen=True)
class Masquerade:
    """``masquerade``: SNAT to the address of the outgoing interface."""


ACCEPT, DROP, MASQUERADE = Verdict("accept"), Verdict("drop"), Masquerade()


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: ``chain``, matches ``((field, op, value), ...)``, a verdict, a comment.

    ``op`` is ``"=="`` or ``"!="``. Fields and values (all as nft writes them):
    ``iifname``/``oifname`` (a name), ``ip saddr``/``ip daddr`` (address or prefix),
    ``tcp dport``/``udp dport`` (port), ``fib saddr type``/``fib daddr type`` (``"local"``),
    ``ct state`` (a tuple of ``"established"``, ``"related"``; only ``==``).
    ``counter`` adds a packet/byte counter, as Docker's rules have.
    """
    chain: str
    match: tuple = ()
    verdict: object = None
    comment: str | None = None
    counter: bool = True

    def text(self) -> str:
        """The rule as ``nft list`` prints it (for messages and reprs)."""
        parts = []
        for field, op, value in self.match:
            shown = (",".join(value) if isinstance(value, tuple) else
                     f'"{value}"' if field.endswith("ifname") else str(value))
            parts.append(f"{field} {'!= ' if op == '!=' else ''}{shown}")
        if self.counter:
            parts.append("counter")
        v = self.verdict
        parts.append(v.name if isinstance(v, Verdict) else f"jump {v.chain}" if isinstance(v, Jump)
                     else f"{v.field} vmap @{v.map}" if isinstance(v, Vmap)
                     else f"dnat to {v.addr}:{v.port}" if isinstance(v, Dnat)
                     else "masquerade" if isinstance(v, Masquerade) else "")
        if self.comment:
            parts.append(f'comment "{self.comment}"')
        return " ".join(p for p in parts if p)


# --- netlink attribute packing -----------------------------------------------------------------
def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def _str(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind, b"".join(attrs), nested=True)


def _expr(name: str, *attrs: bytes) -> bytes:
    # NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }
    body = _str(1, name) + (_nest(2, *attrs) if attrs else b"")
    return _attr(1, body, nested=True)


def _data(kind: int, value: bytes) -> bytes:
    return _nest(kind, _attr(1, value))           # NFTA_DATA_VALUE


def _verdict_data(kind: int, code: int, chain: str | None = None) -> bytes:
    inner = _u32(1, code) + (_str(2, chain) if chain else b"")   # NFTA_VERDICT_CODE/_CHAIN
    return _nest(kind, _nest(2, inner))            # NFTA_DATA_VERDICT


def _meta(key: int) -> bytes:
    return _expr("meta", _u32(1, REG_1), _u32(2, key))          # NFTA_META_DREG, _KEY


def _cmp(op: str, value: bytes) -> bytes:
    return _expr("cmp", _u32(1, REG_1), _u32(2, CMP_NEQ if op == "!=" else CMP_EQ),
                 _data(3, value))


def _payload(base: int, offset: int, length: int) -> bytes:
    return _expr("payload", _u32(1, REG_1), _u32(2, base), _u32(3, offset), _u32(4, length))


def _bitwise(length: int, mask: bytes) -> bytes:
    return _expr("bitwise", _u32(1, REG_1), _u32(2, REG_1), _u32(3, length),
                 _data(4, mask), _data(5, b"\0" * length))


def ifname_key(name: str) -> bytes:
    """An interface name as nft compares it: NUL-padded to IFNAMSIZ."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is not 1-15 bytes")
    return raw.ljust(IFNAMSIZ, b"\0")


def _match_ifname(key: int, op: str, value: str) -> list[bytes]:
    return [_meta(key), _cmp(op, ifname_key(value))]


def _match_addr(offset: int, op: str, value: str) -> list[bytes]:
    net = ipaddress.IPv4Network(value, strict=True)
    plen = net.prefixlen
    if plen % 8 == 0:
        # nft loads only the prefix bytes when the prefix is byte-aligned (/8, /16, /24, /32).
        n = plen // 8
        return [_payload(PAYLOAD_NETWORK, offset, n), _cmp(op, net.network_address.packed[:n])]
    return [_payload(PAYLOAD_NETWORK, offset, 4), _bitwise(4, net.netmask.packed),
            _cmp(op, net.network_address.packed)]


def _match_dport(proto: str, op: str, value: int) -> list[bytes]:
    # nft's implicit dependency: "meta l4proto tcp", which nft hides again when printing.
    return [_meta(META_L4PROTO), _cmp("==", bytes([PROTOS[proto]])),
            _payload(PAYLOAD_TRANSPORT, 2, 2), _cmp(op, struct.pack(">H", value))]


def _match_fib(flag: int, op: str, value: str) -> list[bytes]:
    if value != "local":
        raise ValueError(f"fib type {value!r}: only 'local' is supported")
    fib = _expr("fib", _u32(1, REG_1), _u32(2, FIB_RESULT_ADDRTYPE), _u32(3, flag))
    return [fib, _cmp(op, struct.pack("=I", RTN_LOCAL))]           # host byte order


def _match_ct_state(op: str, value: tuple) -> list[bytes]:
    bits = {"established": CT_ESTABLISHED, "related": CT_RELATED}
    mask = 0
    for name in value:
        mask |= bits[name]
    if op != "==":
        raise ValueError("ct state supports only ==")
    ct = _expr("ct", _u32(1, REG_1), _u32(2, CT_STATE))
    return [ct, _bitwise(4, struct.pack("=I", mask)), _cmp("!=", b"\0\0\0\0")]


FIELDS = {
    "iifname": lambda op, v: _match_ifname(META_IIFNAME, op, v),
    "oifname": lambda op, v: _match_ifname(META_OIFNAME, op, v),
    "ip saddr": lambda op, v: _match_addr(12, op, v),
    "ip daddr": lambda op, v: _match_addr(16, op, v),
    "tcp dport": lambda op, v: _match_dport("tcp", op, v),
    "udp dport": lambda op, v: _match_dport("udp", op, v),
    "fib saddr type": lambda op, v: _match_fib(FIB_F_SADDR, op, v),
    "fib daddr type": lambda op, v: _match_fib(FIB_F_DADDR, op, v),
    "ct state": _match_ct_state,
}


def _compile_verdict(v: object) -> list[bytes]:
    if isinstance(v, Verdict):
        code = {"accept": NF_ACCEPT, "drop": NF_DROP}[v.name]
        return [_expr("immediate", _u32(1, REG_VERDICT), _verdict_data(2, code))]
    if isinstance(v, Jump):
        return [_expr("immediate", _u32(1, REG_VERDICT), _verdict_data(2, NFT_JUMP, v.chain))]
    if isinstance(v, Vmap):
        key = {"iifname": META_IIFNAME, "oifname": META_OIFNAME}[v.field]
        return [_meta(key), _expr("lookup", _str(1, v.map), _u32(2, REG_1), _u32(3, REG_VERDICT))]
    if isinstance(v, Dnat):
        return [_expr("immediate", _u32(1, REG_1), _data(2, ipaddress.IPv4Address(v.addr).packed)),
                _expr("immediate", _u32(1, REG_2), _data(2, struct.pack(">H", v.port))),
                _expr("nat", _u32(1, NAT_DNAT), _u32(2, NFPROTO_IPV4), _u32(3, REG_1),
                      _u32(5, REG_2))]
    if isinstance(v, Masquerade):
        return [_expr("masq")]
    if v is None:
        return []
    raise ValueError(f"unknown verdict {v!r}")


def compile_rule(rule: Rule) -> tuple[bytes, bytes | None]:
    """(NFTA_RULE_EXPRESSIONS payload, NFTA_RULE_USERDATA payload or None) for ``rule``."""
    exprs: list[bytes] = []
    for field, op, value in rule.match:
        if op not in ("==", "!="):
            raise ValueError(f"operator {op!r} in {rule.text()!r}")
        exprs += FIELDS[field](op, value)
    if rule.counter:
        exprs.append(_expr("counter"))
    exprs += _compile_verdict(rule.verdict)
    udata = None
    if rule.comment:
        text = rule.comment.encode() + b"\0"
        udata = struct.pack("BB", NFTNL_UDATA_RULE_COMMENT, len(text)) + text
    return b"".join(exprs), udata


# Rule messages are packed here, not by pyroute2: a container's endpoint adds and removes
# one each time, and pyroute2's generic encoding (and decoding the echoed rule) cost ~0.1 ms
# of Python per spawn, on its critical path. tests/test_nft_encoding.py checks the bytes against
# pyroute2's encoding of the same rule.
_NFTA_RULE_TABLE, _NFTA_RULE_CHAIN, _NFTA_RULE_HANDLE, _NFTA_RULE_EXPRESSIONS = 1, 2, 3, 4
_NFTA_RULE_POSITION, _NFTA_RULE_USERDATA = 6, 7
_NFNETLINK_V0 = 0
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33


def _u64(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack(">Q", value))


def _nfgen(family: int) -> bytes:
    return struct.pack("=BBH", family, _NFNETLINK_V0, 0)


def rule_message(family: int, table: str, chain: str, exprs: bytes, udata: bytes | None,
                 before: int | None) -> bytes:
    """The body (nfgenmsg + attributes) of an NFT_MSG_NEWRULE request."""
    body = _nfgen(family) + _str(_NFTA_RULE_TABLE, table) + _str(_NFTA_RULE_CHAIN, chain) + \
        _attr(_NFTA_RULE_EXPRESSIONS, exprs)
    if udata is not None:
        body += _attr(_NFTA_RULE_USERDATA, udata)
    if before is not None:
        body += _u64(_NFTA_RULE_POSITION, before)
    return body


def rule_handle(message: bytes) -> int | None:
    """NFTA_RULE_HANDLE of an echoed NFT_MSG_NEWRULE (header included), None if absent."""
    off, end = 20, len(message)          # nlmsghdr + nfgenmsg
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", message, off)
        if length < 4 or off + length > end:
            return None
        if kind & 0x3FFF == _NFTA_RULE_HANDLE and length == 12:
            return struct.unpack_from(">Q", message, off + 4)[0]
        off += (length + 3) & ~3
    return None


# --- batches -----------------------------------------------------------------------------------
class _RuleText:
    """``add rule CHAIN 'TEXT'`` for an error message, rendered only if one is raised."""
    __slots__ = ("rule",)

    def __init__(self, rule: "Rule"):
        self.rule = rule

    def __str__(self) -> str:
        return f"add rule {self.rule.chain} '{self.rule.text()}'"


@dataclasses.dataclass
class _Request:
    msg: object          # a pyroute2 message, or None when ``raw`` holds the packed body
    kind: int
    flags: int
    what: "str | _RuleText"  # for error messages: "add rule nat-OUTPUT 'ip daddr != ...'"
    raw: bytes | None = None


class Batch:
    """Requests for one table, applied all-or-nothing by :meth:`Netfilter.commit`.

    Each ``add_*``/``del_*`` returns the request's index; ``commit`` maps the indexes of
    ``add_rule`` requests to the new rules' handles.
    """

    def __init__(self, table: str, family: int = NFPROTO_IPV4):
        self.table = table
        self.family = family
        self.requests: list[_Request] = []

    def __len__(self) -> int:
        return len(self.requests)

    def _add(self, msg, kind: int, flags: int, what: str, attrs: list) -> int:
        msg["nfgen_family"] = self.family
        msg["attrs"] = attrs
        self.requests.append(_Request(msg, kind, flags, what))
        return len(self.requests) - 1

    def add_table(self, flags: int = 0) -> int:
        return self._add(nft_table_msg(), NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL,
                         f"add table ip {self.table}",
                         [("NFTA_TABLE_NAME", self.table), ("NFTA_TABLE_FLAGS", flags)])

    def del_table(self) -> int:
        return self._add(nft_table_msg(), NFT_MSG_DELTABLE, 0, f"delete table ip {self.table}",
                         [("NFTA_TABLE_NAME", self.table)])

    def add_chain(self, name: str, hook: str | None = None) -> int:
        """A regular chain, or a base chain on one of ``HOOKS`` (policy accept)."""
        attrs = [("NFTA_CHAIN_TABLE", self.table), ("NFTA_CHAIN_NAME", name)]
        if hook is not None:
            num, ctype, prio = HOOKS[hook]
            attrs += [("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", num),
                                                     ("NFTA_HOOK_PRIORITY", prio)]}),
                      ("NFTA_CHAIN_POLICY", NF_ACCEPT), ("NFTA_CHAIN_TYPE", ctype)]
        return self._add(nft_chain_msg(), NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL,
                         f"add chain {name}", attrs)

    def del_chain(self, name: str) -> int:
        return self._add(nft_chain_msg(), NFT_MSG_DELCHAIN, 0, f"delete chain {name}",
                         [("NFTA_CHAIN_TABLE", self.table), ("NFTA_CHAIN_NAME", name)])

    def add_vmap(self, name: str) -> int:
        """``map NAME { type ifname : verdict }``."""
        return self._add(nft_set_msg(), NFT_MSG_NEWSET, NLM_F_CREATE | NLM_F_EXCL,
                         f"add map {name}",
                         [("NFTA_SET_TABLE", self.table), ("NFTA_SET_NAME", name),
                          ("NFTA_SET_FLAGS", {"NFT_SET_MAP"}),
                          ("NFTA_SET_KEY_TYPE", NFT_TYPE_IFNAME), ("NFTA_SET_KEY_LEN", IFNAMSIZ),
                          ("NFTA_SET_DATA_TYPE", NFT_DATA_VERDICT), ("NFTA_SET_DATA_LEN", 0),
                          ("NFTA_SET_ID", len(self.requests) + 1),
                          # How nft itself marks the key: an ifname is a host-order string.
                          # Without it, `nft list` prints the element keys as "".
                          ("NFTA_SET_USERDATA", [("NFTNL_UDATA_SET_KEYBYTEORDER", _BYTEORDER_HOST),
                                                 ("NFTNL_UDATA_SET_DATABYTEORDER", _BYTEORDER_INVALID)])])

    def _elem(self, kind: int, flags: int, verb: str, vmap: str, key: str, chain: str | None) -> int:
        elem = [("NFTA_SET_ELEM_KEY", {"attrs": [("NFTA_DATA_VALUE", ifname_key(key))]})]
        if chain is not None:
            elem.append(("NFTA_SET_ELEM_DATA", {"attrs": [("NFTA_DATA_VERDICT", {"attrs": [
                ("NFTA_VERDICT_CODE", NFT_JUMP), ("NFTA_VERDICT_CHAIN", chain)]})]}))
        return self._add(nft_set_elem_list_msg(), kind, flags,
                         f"{verb} element {vmap} {{ \"{key}\" }}",
                         [("NFTA_SET_ELEM_LIST_TABLE", self.table), ("NFTA_SET_ELEM_LIST_SET", vmap),
                          ("NFTA_SET_ELEM_LIST_ELEMENTS", [{"attrs": elem}])])

    def add_jump_element(self, vmap: str, key: str, chain: str) -> int:
        """``"KEY" : jump CHAIN`` in a verdict map."""
        return self._elem(NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_EXCL, "add", vmap, key, chain)

    def del_element(self, vmap: str, key: str) -> int:
        return self._elem(NFT_MSG_DELSETELEM, 0, "delete", vmap, key, None)

    def add_rule(self, rule: Rule, before: int | None = None) -> int:
        """Append ``rule`` to its chain, or insert it before the rule with handle ``before``."""
        exprs, udata = compile_rule(rule)
        # Without NLM_F_APPEND, NFTA_RULE_POSITION means "insert before this handle".
        flags = NLM_F_CREATE | NLM_F_ECHO | (NLM_F_APPEND if before is None else 0)
        raw = rule_message(self.family, self.table, rule.chain, exprs, udata, before)
        self.requests.append(_Request(None, NFT_MSG_NEWRULE, flags, _RuleText(rule), raw))
        return len(self.requests) - 1

    def del_rule(self, chain: str, handle: int) -> int:
        raw = _nfgen(self.family) + _str(_NFTA_RULE_TABLE, self.table) + \
            _str(_NFTA_RULE_CHAIN, chain) + _u64(_NFTA_RULE_HANDLE, handle)
        self.requests.append(_Request(None, NFT_MSG_DELRULE, 0, f"delete rule {chain} handle {handle}", raw))
        return len(self.requests) - 1


# --- transport ---------------------------------------------------------------------------------
class Netfilter(NetlinkSession):
    """An nfnetlink session over one ``NETLINK_NETFILTER`` socket it takes ownership of.

    The socket decides the namespace (create it with ``socket_in(ns, proto=12)``) and, for
    tables made with ``NFT_TABLE_F_OWNER``, their lifetime: closing it removes them.
    Thread-safe: one batch at a time.
    """

    protocol = "nfnetlink"

    def __init__(self, sock: socket.socket, description: str = ""):
        super().__init__(sock, description)
        self._rbuf: memoryview | None = None
        self._buf_sizes: dict[int, int] = {}      # SO_SNDBUF/SO_RCVBUF as last read back
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)   # grown per batch as needed
        sock.bind((0, 0))                     # the kernel picks the port id (the table owner)
        # Extended acks: the kernel says which attribute it disliked.
        try:
            sock.setsockopt(270, 11, 1)         # SOL_NETLINK, NETLINK_EXT_ACK
        except OSError:
            pass

    def commit(self, batch: Batch) -> dict[int, int]:
        """Apply ``batch`` atomically; return ``{request index: rule handle}`` for new rules.

        Raises the nslab error for the first request the kernel refused (the whole batch is
        then rolled back by the kernel), naming the request and the namespace.
        """
        if not batch.requests:
            return {}
        with self._lock:
            sock = self.sock
            seqs: dict[int, int] = {}
            data = bytearray(self._control(NFNL_MSG_BATCH_BEGIN, self._next_seq()))
            for index, req in enumerate(batch.requests):
                seq = self._next_seq()
                seqs[seq] = index
                if req.raw is not None:
                    data += struct.pack("=IHHII", 16 + len(req.raw), (NFNL_SUBSYS_NFTABLES << 8) | req.kind,
                                        NLM_F_REQUEST | NLM_F_ACK | req.flags, seq, 0)
                    data += req.raw
                    continue
                msg = req.msg
                msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | req.kind
                msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | req.flags
                msg["header"]["sequence_number"] = seq
                msg.encode()
                data += msg.data
            data += self._control(NFNL_MSG_BATCH_END, self._next_seq())
            fence = self._next_seq()
            self._fit_buffers(len(data), len(batch.requests), batch.table)
            sock.sendall(bytes(data))
            sock.sendall(self._getgen(fence))
            errors, handles = self._collect(seqs, fence)
        if errors:
            index, code = min(errors.items())
            req = batch.requests[index]
            raise from_errno(code, f"nfnetlink batch: {req.what}",
                             f"table ip {batch.table} in {self.description}",
                             _hint(code)) from None
        return handles

    def _fit_buffers(self, send: int, requests: int, table: str) -> None:
        """Make both socket buffers hold this batch, before anything is sent.

        A batch must travel in one sendmsg (nfnetlink applies what one message carries), so
        the send buffer must hold it whole, or the send fails with EMSGSIZE; its replies (an
        ack per request, the echoed rule for each new one) all queue up before the first is
        read, or the kernel drops some (ENOBUFS) of a batch it has applied. A published range
        of a few hundred ports outgrows the defaults. Grown on demand: with SO_*BUFFORCE where
        we may (CAP_NET_ADMIN), else up to net.core.wmem_max / rmem_max."""
        sock = self.sock
        for opt, force, need, limit in (
                (socket.SO_SNDBUF, _SO_SNDBUFFORCE, send + 4096, "net.core.wmem_max"),
                # The kernel counts a reply's whole buffer (truesize), ~1-2 KiB even for an ack.
                (socket.SO_RCVBUF, _SO_RCVBUFFORCE, send + 2048 * requests + 65536, "net.core.rmem_max")):
            if self._buf_sizes.get(opt, 0) >= need:       # known big enough: no syscall
                continue
            self._buf_sizes[opt] = sock.getsockopt(socket.SOL_SOCKET, opt)  # twice what was set
            if self._buf_sizes[opt] >= need:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, need)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, opt, need)
            self._buf_sizes[opt] = sock.getsockopt(socket.SOL_SOCKET, opt)
            if self._buf_sizes[opt] < need:
                raise NslabError(errno.EMSGSIZE,
                                 f"an nfnetlink batch of {requests} requests ({send} bytes) for table "
                                 f"ip {table} in {self.description} needs socket buffers of "
                                 f"{need} bytes: {limit} is lower, and raising ours past it needs "
                                 "CAP_NET_ADMIN", syscall="setsockopt",
                                 obj=f"nfnetlink socket in {self.description}",
                                 hint=f"raise {limit} (sysctl -w {limit}={2 * need}), or publish fewer ports")

    def _collect(self, seqs: dict[int, int], fence: int) -> tuple[dict[int, int], dict[int, int]]:
        errors: dict[int, int] = {}
        handles: dict[int, int] = {}
        if self._rbuf is None:
            # One receive buffer for the session (under its lock): a fresh 1 MiB bytes per
            # recv() is an mmap, an mremap and an munmap (~40 us each time, 3-4 per batch).
            self._rbuf = memoryview(bytearray(1 << 20))
        while True:
            n = self.sock.recv_into(self._rbuf)
            buf = self._rbuf[:n]
            off = 0
            while off + 16 <= n:
                length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", buf, off)
                if kind == NLMSG_ERROR:
                    code = (-struct.unpack_from("=i", buf, off + 16)[0]
                            if length >= 20 and off + 20 <= n else errno.EBADMSG)
                    if seq == fence and code:
                        raise from_errno(code, "nfnetlink getgen", self.description)
                    if code and seq in seqs:
                        errors[seqs[seq]] = code
                elif seq in seqs and (kind & 0xFF) == NFT_MSG_NEWRULE:
                    handles[seqs[seq]] = rule_handle(buf[off: off + length])
                elif seq == fence:
                    return errors, handles
                off += (length + 3) & ~3
                if length < 16:
                    break

    @staticmethod
    def _control(kind: int, seq: int) -> bytes:
        # Batch begin/end: nfgenmsg with res_id = the subsystem, in network byte order.
        return struct.pack("=IHHII", 20, kind, NLM_F_REQUEST, seq, 0) + struct.pack("!BBH", 0, 0, NFNL_SUBSYS_NFTABLES)

    @staticmethod
    def _getgen(seq: int) -> bytes:
        kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
        return struct.pack("=IHHII", 20, kind, NLM_F_REQUEST, seq, 0) + struct.pack("!BBH", 0, 0, 0)

    def close(self) -> None:
        """Close the socket: tables created with ``NFT_TABLE_F_OWNER`` vanish with it."""
        super().close()


def _hint(code: int) -> str | None:
    if code == errno.EPERM:
        return ("the table is owned by another netlink socket (NFT_TABLE_F_OWNER): only the "
                "process that created it can change it")
    if code == errno.EEXIST:
        return "it exists already: another nslab Firewall on this namespace uses the same table name?"
    if code == errno.ENOENT:
        return "it is not there: removed already, or the table was never set up"
    if code == errno.EOPNOTSUPP:
        return "the kernel lacks an nftables module (nf_tables, nft_nat, nft_fib, nft_ct)"
    return None

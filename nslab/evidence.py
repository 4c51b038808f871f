"""Evidence: what does a child (or the host) actually see? Two views, side by side.

A :class:`View` is a snapshot of everything network-shaped that one set of namespaces
shows: the namespace identities, interfaces (kind, MAC, MTU, state, bridge, veth peer),
addresses, routes, TCP/UDP sockets and named UNIX sockets (abstract ones included, shown
with a leading ``@``), the hostname and the sysctls Docker cares about. :func:`compare`
says, facet by facet, whether two views *share* the kernel object (same namespace), merely
look the *same*, or *differ*, and lists what only one side has. UNIX sockets bound to a path
are the exception among sockets: the netns that bound one lists it, but any netns that sees
the file can connect to it, so they form a facet of their own, decided by the mount
namespace and shown apart (``unix path sockets``); abstract ones stay with the netns::

    >>> child = View.gather("bridge child", {"net": child_net, "uts": child_uts}, pid=pid)
    >>> host = View.gather("host child", {"net": host_net}, pid=other_pid)
    >>> print(compare(child, host).table())
    facet / verdict    bridge child                host child
    net: differs       * net:[4026532301]          * net:[4026531840]
    mnt: shared        mnt:[4026531841]            mnt:[4026531841]
    ...
    >>> json.dumps(child.to_dict())                  # structured, for scripts and tests

How it looks inside another namespace without moving anyone
------------------------------------------------------------
The controlling thread never changes namespace (kernel-notes). Netlink dumps (links,
addresses, routes) go over an rtnetlink socket created inside the namespace
(:class:`~nslab._netlink.Rtnl`). Everything read through files runs on a throwaway thread that
entered the network (and UTS) namespace with :meth:`Namespace.call`, because:

* ``/proc/net`` and ``/proc/self/net`` follow the *main thread's* network namespace, while
  ``/proc/thread-self/net`` follows the *calling thread's* (checked on kernel 6.18: a thread
  inside a fresh netns sees 1 interface in ``/proc/thread-self/net/dev`` and the host's in
  ``/proc/self/net/dev``). psutil reads ``/proc/net``, hence only the caller's (psutil#1611).
* ``/proc/sys/net/...`` is resolved against the *opening thread's* network namespace, and
  ``/proc/sys/kernel/hostname`` against its UTS namespace: the same thread reads both.
* Sockets come from ``sock_diag`` (what ``ss`` uses) on a netlink socket made by that thread:
  ``/proc/net/tcp`` walks every bucket of the kernel-wide established hash (262,144 here:
  ~4.5 ms per file, even in an empty namespace) where the four ``inet_diag`` dumps (TCP, UDP,
  v4, v6) take ~0.5 ms together.
  The ``/proc/thread-self/net/{tcp,tcp6,udp,udp6}`` parsers are kept as the fallback when
  sock_diag is missing (``CONFIG_INET_DIAG``), and as a cross-check in the tests. UNIX
  sockets are always read from ``/proc/thread-self/net/unix`` (cheap; abstract names included).
  In those files an IPv4 address is the raw ``__be32`` printed as a native ``u32`` (so its
  bytes are reversed on little-endian machines), IPv6 is four such words, ports are plain hex.

Sockets are matched to a process (``pid``/``process``) only for the ``pid`` given, by its
``/proc/PID/fd`` links: cheap, and exactly the child a student asked about.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import os
import socket
import struct
import sys
import textwrap
import time
from typing import Mapping

from .errors import InputError, NslabError, from_errno
from .namespaces import KINDS, Namespace
from ._netlink import NETLINK_SOCK_DIAG, Rtnl

__all__ = [
    "Interface", "Address", "Route", "Socket", "View", "Facet", "Comparison", "compare",
    "PATH_SOCKETS", "SYSCTLS", "parse_proc_inet", "parse_proc_unix", "decode_proc_endpoint",
]

#: The network sysctls Docker sets or depends on, read inside the view's netns.
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ping_group_range",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",          # present only with br_netfilter loaded
)
#: Read for every bridge of the view (Docker: accept_ra=0 on its bridges; route_localnet=1
#: on a bridge when the userland proxy is off).
BRIDGE_SYSCTLS = ("net.ipv6.conf.{}.accept_ra", "net.ipv4.conf.{}.route_localnet")

# include/net/tcp_states.h; UDP uses ESTABLISHED for connected and CLOSE for unconnected.
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
_UNIX_TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}
_UNIX_STATES = {1: "UNCONN", 2: "CONNECTING", 3: "ESTABLISHED", 4: "DISCONNECTING"}
_SO_ACCEPTCON = 0x10000                         # __SO_ACCEPTCON: a listening UNIX socket
_ARPHRD = {1: "device", 772: "loopback", 65534: "none", 768: "ipip", 776: "sit", 778: "gre"}
_SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_PROTOS = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 9: "ra",
           11: "zebra", 12: "bird", 16: "dhcp", 42: "babel", 186: "bgp", 187: "isis",
           188: "ospf", 189: "rip", 192: "eigrp"}
_RTN = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast",
        6: "blackhole", 7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
IFF_UP = 0x1


# --- the facts ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Interface:
    """One network interface as its namespace sees it."""

    name: str
    index: int
    kind: str                      # IFLA_INFO_KIND (veth, bridge, ...), else from the ARPHRD type
    mac: str | None
    mtu: int | None
    operstate: str                 # IFLA_OPERSTATE: UP, DOWN, UNKNOWN (lo when up), LOWERLAYERDOWN
    up: bool                       # administratively up (IFF_UP)
    master: str | None = None      # the bridge it is enslaved to
    peer_index: int | None = None  # IFLA_LINK: a veth's other end (index in the peer's netns)
    link_netnsid: int | None = None  # set when that other end lives in another netns
    peer: str | None = None        # the other end by name: "eth0", or "label:eth0" elsewhere

    def item(self) -> str:
        bits = [f"{self.name} ({self.kind})", self.mac or "-", f"mtu {self.mtu}",
                self.operstate.lower() if self.up else "admin-down"]
        if self.master:
            bits.append(f"master {self.master}")
        return " ".join(bits)


@dataclasses.dataclass(frozen=True)
class Address:
    """An address on an interface (``10.0.0.2/24``)."""

    iface: str
    address: str
    family: str                    # inet / inet6
    scope: str

    def item(self) -> str:
        return f"{self.iface} {self.family} {self.address}"


@dataclasses.dataclass(frozen=True)
class Route:
    """A route of the main table, rendered the way ``ip route`` prints it."""

    family: str
    dst: str                       # "default" or prefix
    gateway: str | None
    dev: str | None
    scope: str
    proto: str
    type: str = "unicast"
    prefsrc: str | None = None
    metric: int | None = None

    def item(self) -> str:
        bits = [self.dst] if self.type == "unicast" else [self.type, self.dst]
        if self.gateway:
            bits += ["via", self.gateway]
        if self.dev:
            bits += ["dev", self.dev]
        bits += ["proto", self.proto]
        if self.scope != "global":
            bits += ["scope", self.scope]
        if self.prefsrc:
            bits += ["src", self.prefsrc]
        if self.metric:
            bits += ["metric", str(self.metric)]
        return " ".join(bits)


@dataclasses.dataclass(frozen=True)
class Socket:
    """A TCP/UDP socket (``proto`` tcp, tcp6, udp, udp6) or a named UNIX socket (``unix``).

    ``local``/``remote`` are ``addr:port`` (IPv6 in brackets); for UNIX, ``local`` is the
    path, or ``@name`` for an abstract socket, and ``type`` is stream/dgram/seqpacket.
    """

    proto: str
    state: str
    local: str
    remote: str | None
    inode: int
    type: str = "stream"
    listening: bool = False        # TCP LISTEN, UDP bound and unconnected, UNIX listen()ing
    pid: int | None = None
    process: str | None = None

    @property
    def filesystem_scoped(self) -> bool:
        """A UNIX socket bound to a path: reached through the filesystem, so from any network
        namespace that sees the file (``/proc/net/unix`` lists it only in the netns that
        bound it). Abstract (``@``) and TCP/UDP sockets are scoped to their netns."""
        return self.proto == "unix" and not self.local.startswith("@")

    def item(self) -> str:
        if self.proto == "unix":
            return f"unix/{self.type} {self.local}"
        return f"{self.proto} {self.local}"


# --- parsing /proc/net/* (pure) ---------------------------------------------------------------
def decode_proc_endpoint(text: str, byteorder: str = sys.byteorder) -> tuple[str, int]:
    """``"0100007F:1F90"`` → ``("127.0.0.1", 8080)``; 32 hex digits for IPv6.

    The kernel prints each 32-bit word of the address (stored in network order) with
    ``%08X`` as a native integer, so on little-endian machines each word's bytes come out
    reversed; the port is ``ntohs``'ed already.
    """
    addr_hex, port_hex = text.split(":")
    if len(addr_hex) not in (8, 32):
        raise ValueError(f"address of {len(addr_hex)} hex digits: {text!r}")
    raw = b"".join(int(addr_hex[i:i + 8], 16).to_bytes(4, byteorder)
                   for i in range(0, len(addr_hex), 8))
    return str(ipaddress.ip_address(raw)), int(port_hex, 16)


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def parse_proc_inet(text: str, proto: str, byteorder: str = sys.byteorder) -> list[Socket]:
    """Parse ``/proc/net/{tcp,tcp6,udp,udp6}`` text (``proto`` names which)."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        local = decode_proc_endpoint(fields[1], byteorder)
        remote = decode_proc_endpoint(fields[2], byteorder)
        state = TCP_STATES.get(int(fields[3], 16), fields[3])
        out.append(_inet_socket(proto, state, local, remote, int(fields[9])))
    return out


def _inet_socket(proto: str, state: str, local: tuple[str, int], remote: tuple[str, int],
                 inode: int) -> Socket:
    udp = proto.startswith("udp")
    if udp and state == "CLOSE":
        state = "UNCONN"                 # what ss calls an unconnected UDP socket
    connected = remote[1] != 0
    listening = state == "LISTEN" or (udp and state == "UNCONN" and local[1] != 0)
    return Socket(proto, state, _endpoint(*local), _endpoint(*remote) if connected else None,
                  inode, "dgram" if udp else "stream", listening)


def parse_proc_unix(text: str) -> tuple[list[Socket], int]:
    """Parse ``/proc/net/unix``: the named sockets (path or ``@abstract``), and how many
    unnamed ones (socketpairs, client ends) there were."""
    named, unnamed = [], 0
    for line in text.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode [Path]; a path may contain spaces.
        fields = line.split(None, 7)
        if len(fields) < 7:
            continue
        if len(fields) < 8 or not fields[7]:
            unnamed += 1
            continue
        flags, stype, st = int(fields[3], 16), int(fields[4], 16), int(fields[5], 16)
        listening = bool(flags & _SO_ACCEPTCON)
        state = "LISTEN" if listening else _UNIX_STATES.get(st, str(st))
        named.append(Socket("unix", state, fields[7], None, int(fields[6]),
                            _UNIX_TYPES.get(stype, str(stype)),
                            listening or (stype == 2 and st == 1)))    # bound datagram
    return named, unnamed


# --- sock_diag (what ss uses) -------------------------------------------------------------------
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_INET_DIAG_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")    # struct inet_diag_msg, 72 bytes


def _diag_dump(sock: socket.socket, family: int, protocol: int, seq: int) -> list[bytes]:
    """One SOCK_DIAG_BY_FAMILY dump (struct inet_diag_req_v2, every state)."""
    req = struct.pack("=BBBBI48x", family, protocol, 0, 0, 0xFFFFFFFF)
    sock.send(struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY,
                          _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + req)
    out = []
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", data, off)
            if kind == _NLMSG_DONE:
                return out
            if kind == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", data, off + 16)[0]
                raise from_errno(code, "netlink SOCK_DIAG_BY_FAMILY",
                                 f"family {family} protocol {protocol}")
            out.append(data[off + 16:off + length])
            off += (length + 3) & ~3


def _parse_diag(payload: bytes, proto: str) -> Socket:
    (family, state, _t, _r, sport, dport, src, dst, _if, _cookie, _exp, _rq, _wq, _uid,
     inode) = _INET_DIAG_MSG.unpack_from(payload)
    size = 4 if family == socket.AF_INET else 16
    local = (str(ipaddress.ip_address(src[:size])), socket.ntohs(sport))
    remote = (str(ipaddress.ip_address(dst[:size])), socket.ntohs(dport))
    return _inet_socket(proto, TCP_STATES.get(state, str(state)), local, remote, inode)


_INET_FILES = (("tcp", socket.AF_INET, socket.IPPROTO_TCP), ("tcp6", socket.AF_INET6, socket.IPPROTO_TCP),
               ("udp", socket.AF_INET, socket.IPPROTO_UDP), ("udp6", socket.AF_INET6, socket.IPPROTO_UDP))


def _inet_sockets_diag() -> list[Socket]:
    """inet sockets of the calling thread's netns through sock_diag."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                         NETLINK_SOCK_DIAG)
    try:
        found = []
        for seq, (proto, family, protocol) in enumerate(_INET_FILES, 1):
            try:
                found += [_parse_diag(p, proto) for p in _diag_dump(sock, family, protocol, seq)]
            except NslabError as exc:
                if exc.errno == errno.ENOENT and family == socket.AF_INET6:
                    continue                 # IPv6 disabled: nothing to list
                raise
        return found
    finally:
        sock.close()


def _inet_sockets_proc() -> list[Socket]:
    found = []
    for proto, _family, _protocol in _INET_FILES:
        text = _read(f"/proc/thread-self/net/{proto}")
        if text is not None:
            found += parse_proc_inet(text, proto)
    return found


# --- reading inside the namespaces ------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + name.replace(".", "/")


def _read_inside(bridges: list[str], socket_source: str, uts: Namespace | None) -> dict:
    """Runs on a thread inside the view's netns (and UTS ns): files, sysctls, sockets."""
    def body() -> dict:
        out: dict = {"hostname": (_read("/proc/sys/kernel/hostname") or "").strip()}
        sysctls = {}
        for name in SYSCTLS:
            value = _read(_sysctl_path(name))
            if value is not None:
                sysctls[name] = " ".join(value.split())
        for bridge in bridges:
            for pattern in BRIDGE_SYSCTLS:
                # sysctl(8) spells an interface's dots as slashes (eth0.100 → eth0/100);
                # the file path keeps the name as it is.
                value = _read("/proc/sys/" + pattern.replace(".", "/").format(bridge))
                if value is not None:
                    sysctls[pattern.format(bridge.replace(".", "/"))] = value.strip()
        out["sysctls"] = sysctls
        unix = _read("/proc/thread-self/net/unix")
        out["unix"] = parse_proc_unix(unix) if unix is not None else ([], 0)
        out["socket_source"] = socket_source
        if socket_source == "diag":
            try:
                out["inet"] = _inet_sockets_diag()
            except OSError as exc:
                if exc.errno not in (errno.EPROTONOSUPPORT, errno.ENOENT, errno.EINVAL,
                                     errno.EOPNOTSUPP):
                    raise
                out["socket_source"] = "proc"       # no CONFIG_INET_DIAG: read the files
        if out["socket_source"] == "proc":
            out["inet"] = _inet_sockets_proc()
        return out

    if uts is not None:
        # We are on ns.call's throwaway thread: stay in uts until it ends. (Going back could
        # be refused in a rootless lab, where the inherited uts belongs to the initial userns.)
        uts.enter_for_rest_of_thread()
    return body()


def _socket_owners(pid: int) -> dict[int, tuple[int, str]]:
    """socket inode → (pid, command) for the sockets ``pid`` holds open."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    owners = {}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            owners[int(target[8:-1])] = (pid, comm)
    return owners


def _identity_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


# --- the view ---------------------------------------------------------------------------------
@dataclasses.dataclass
class View:
    """What one set of namespaces shows. Build it with :meth:`gather`."""

    label: str
    identities: dict[str, tuple[int, int]]        # kind → (st_dev, st_ino)
    inherited: dict[str, str]                     # kinds not given → "pid" or "caller"
    interfaces: list[Interface]
    addresses: list[Address]
    routes: list[Route]
    sockets: list[Socket]
    hostname: str
    sysctls: dict[str, str]
    pid: int | None = None
    unnamed_unix_sockets: int = 0
    socket_source: str = "diag"                   # "diag" (sock_diag) or "proc" (/proc/net)
    elapsed_ms: float = 0.0

    @classmethod
    def gather(cls, label: str, namespaces: Mapping[str, Namespace] | None = None,
               pid: int | None = None, *, peers: Mapping[str, Namespace] | None = None,
               socket_source: str = "diag") -> "View":
        """Look at ``namespaces`` (kind → handle; ``net`` and ``uts`` are read inside).

        Kinds not given come from ``pid`` (``/proc/PID/ns``) when one is given, else from
        the calling thread: a namespace created with nothing else is what a process would
        see if it were started there by this thread. ``pid`` also names the process whose
        sockets get an owner. ``peers`` (label → net namespace) lets a veth end whose peer
        lives in one of them be named ``label:ifname``. ``socket_source`` is ``"diag"``
        (sock_diag, falling back to /proc when the kernel lacks it) or ``"proc"``.
        Nothing is changed anywhere; the calling thread never moves.
        """
        started = time.perf_counter()
        if socket_source not in ("diag", "proc"):
            raise InputError("socket_source", "expected 'diag' or 'proc'", socket_source)
        namespaces = dict(namespaces or {})
        for kind, ns in namespaces.items():
            if not isinstance(ns, Namespace) or ns.kind.name != kind:
                raise InputError(f"namespaces[{kind!r}]", f"expected a {kind} Namespace handle", ns)
        if pid is not None:
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise InputError("pid", "expected a positive process id", pid)
            if not os.path.exists(f"/proc/{pid}"):
                raise InputError("pid", "no such process (has it exited?)", pid)
        opened: list[Namespace] = []           # handles we open ourselves, closed at the end
        try:
            net = namespaces.get("net")
            if net is None:
                net = Namespace.of_pid(pid, "net") if pid is not None else Namespace.current("net")
                opened.append(net)
            uts = namespaces.get("uts")
            if uts is None and pid is not None:
                uts = Namespace.of_pid(pid, "uts")
                opened.append(uts)

            identities, inherited = {}, {}
            for kind in KINDS:
                if kind in namespaces:
                    identities[kind] = namespaces[kind].identity
                    continue
                if kind == "net":
                    ident, source = net.identity, "pid" if pid is not None else "caller"
                elif pid is not None:
                    ident, source = _identity_of(f"/proc/{pid}/ns/{kind}"), "pid"
                else:
                    ident, source = _identity_of(f"/proc/thread-self/ns/{kind}"), "caller"
                if ident is not None:
                    identities[kind], inherited[kind] = ident, source

            with Rtnl(net) as rtnl:
                links = rtnl.links()
                addrs = list(rtnl.request("get_addr", obj="addresses"))
                routes = list(rtnl.request("get_routes", family=socket.AF_UNSPEC, table=254,
                                           obj="routes (main table)"))
                names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
                interfaces = [_interface(link, names) for link in links]
                if peers:
                    interfaces = _resolve_peers(rtnl, interfaces, peers)
            bridges = [i.name for i in interfaces if i.kind == "bridge"]
            inside = net.call(_read_inside, bridges, socket_source, uts)

            named_unix, unnamed = inside["unix"]
            sockets = inside["inet"] + named_unix
            if pid is not None:
                owners = _socket_owners(pid)
                sockets = [dataclasses.replace(s, pid=owners[s.inode][0], process=owners[s.inode][1])
                           if s.inode in owners else s for s in sockets]
            sockets.sort(key=lambda s: (s.proto, not s.listening, s.local, s.remote or ""))
            return cls(
                label=label, identities=identities, inherited=inherited,
                interfaces=sorted(interfaces, key=lambda i: i.index),
                addresses=[_address(a, names) for a in addrs],
                routes=[_route(r, names) for r in routes],
                sockets=sockets, hostname=inside["hostname"], sysctls=inside["sysctls"],
                pid=pid, unnamed_unix_sockets=unnamed, socket_source=inside["socket_source"],
                elapsed_ms=round((time.perf_counter() - started) * 1000, 3))
        finally:
            for ns in opened:
                ns.close()

    # --- views of the facts --------------------------------------------------------------
    def listening(self) -> list[Socket]:
        """Sockets waiting for others: TCP LISTEN, bound unconnected UDP, listening UNIX."""
        return [s for s in self.sockets if s.listening]

    def connected(self) -> list[Socket]:
        """Sockets with a peer: established (or closing) TCP, connected UDP."""
        return [s for s in self.sockets if s.remote is not None]

    def interface(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces if i.name == name), None)

    def facet_items(self) -> dict[str, list[str]]:
        """Each comparable facet as a list of one-line items (what :func:`compare` diffs)."""
        items = {kind: [f"{kind}:[{ino}]"] for kind, (_dev, ino) in self.identities.items()}
        items["interfaces"] = [i.item() for i in self.interfaces]
        items["addresses"] = sorted(a.item() for a in self.addresses)
        items["routes"] = [r.item() for r in self.routes]
        items["listening sockets"] = sorted({s.item() for s in self.listening() if not s.filesystem_scoped})
        items["hostname"] = [self.hostname]
        items["sysctls"] = [f"{k} = {v}" for k, v in sorted(self.sysctls.items())]
        items[PATH_SOCKETS] = sorted({s.item() for s in self.listening() if s.filesystem_scoped})
        return items

    def to_dict(self) -> dict:
        """Plain JSON-able data (identities as ``[dev, ino]`` lists)."""
        data = dataclasses.asdict(self)
        data["identities"] = {k: list(v) for k, v in self.identities.items()}
        return data

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, width: int = 100) -> str:
        """A readable two-column table: facet, then one item per row."""
        rows: list[tuple[str, str]] = []
        for kind, (_dev, ino) in self.identities.items():
            how = f" (from {self.inherited[kind]})" if kind in self.inherited else ""
            rows.append((f"ns {kind}", f"{kind}:[{ino}]{how}"))
        rows += _section("interfaces", [_iface_line(i) for i in self.interfaces])
        rows += _section("addresses", [a.item() for a in self.addresses])
        rows += _section("routes", [r.item() for r in self.routes])
        rows += _section("sockets", [_socket_line(s) for s in self.sockets])
        if self.unnamed_unix_sockets:
            rows.append(("", f"(+{self.unnamed_unix_sockets} unnamed UNIX sockets)"))
        rows.append(("hostname", self.hostname))
        rows += _section("sysctls", [f"{k} = {v}" for k, v in sorted(self.sysctls.items())])
        title = f"{self.label}" + (f" (pid {self.pid})" if self.pid is not None else "")
        return title + "\n" + _render([("facet", "seen")] + rows, width)

    def __str__(self) -> str:
        return self.table()


def _interface(link, names: Mapping[int, str]) -> Interface:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind is None:
        kind = _ARPHRD.get(link["ifi_type"], f"arphrd-{link['ifi_type']}")
    master = link.get_attr("IFLA_MASTER")
    peer_index = link.get_attr("IFLA_LINK")
    netnsid = link.get_attr("IFLA_LINK_NETNSID")
    peer = None
    if peer_index and netnsid is None and kind == "veth":
        peer = names.get(peer_index)
    return Interface(
        name=link.get_attr("IFLA_IFNAME"), index=link["index"], kind=kind,
        mac=link.get_attr("IFLA_ADDRESS"), mtu=link.get_attr("IFLA_MTU"),
        operstate=link.get_attr("IFLA_OPERSTATE") or "UNKNOWN", up=bool(link["flags"] & IFF_UP),
        master=names.get(master, str(master)) if master else None,
        peer_index=peer_index or None, link_netnsid=netnsid, peer=peer)


def _resolve_peers(rtnl: Rtnl, interfaces: list[Interface],
                   peers: Mapping[str, Namespace]) -> list[Interface]:
    """Name veth peers that live in one of ``peers``: ask this netns which nsid it gave each
    of them (RTM_GETNSID; the link dump has just assigned one to every peer netns), then ask
    that netns for the peer's name by index (one RTM_GETLINK, no dump)."""
    wanted = {i.link_netnsid for i in interfaces if i.link_netnsid is not None}
    if not wanted:
        return interfaces
    by_nsid: dict[int, tuple[str, Namespace]] = {}
    for label, ns in peers.items():
        reply = rtnl.request("get_netnsid", fd=ns.fileno(), obj=f"nsid of {label}")
        nsid = reply.get("nsid") if isinstance(reply, dict) else None
        if nsid is not None and nsid >= 0 and nsid in wanted:
            by_nsid[nsid] = (label, ns)
    out = []
    sessions: dict[int, Rtnl] = {}
    try:
        for iface in interfaces:
            if iface.link_netnsid in by_nsid and iface.peer_index:
                label, ns = by_nsid[iface.link_netnsid]
                if iface.link_netnsid not in sessions:
                    sessions[iface.link_netnsid] = Rtnl(ns)
                link = sessions[iface.link_netnsid].link(index=iface.peer_index)
                if link is not None:
                    iface = dataclasses.replace(iface, peer=f"{label}:{link.get_attr('IFLA_IFNAME')}")
            out.append(iface)
    finally:
        for session in sessions.values():
            session.close()
    return out


def _address(msg, names: Mapping[int, str]) -> Address:
    family = "inet" if msg["family"] == socket.AF_INET else "inet6"
    addr = (msg.get_attr("IFA_LOCAL") if family == "inet" else None) or msg.get_attr("IFA_ADDRESS")
    return Address(iface=names.get(msg["index"], str(msg["index"])),
                   address=f"{addr}/{msg['prefixlen']}", family=family,
                   scope=_SCOPES.get(msg["scope"], str(msg["scope"])))


def _route(msg, names: Mapping[int, str]) -> Route:
    family = "inet" if msg["family"] == socket.AF_INET else "inet6"
    dst = msg.get_attr("RTA_DST")
    oif = msg.get_attr("RTA_OIF")
    gateway = msg.get_attr("RTA_GATEWAY")
    multipath = msg.get_attr("RTA_MULTIPATH")
    if gateway is None and multipath:
        gateway = ",".join(str(h.get_attr("RTA_GATEWAY")) for h in multipath)
    return Route(
        family=family, dst=f"{dst}/{msg['dst_len']}" if msg["dst_len"] else "default",
        gateway=gateway, dev=names.get(oif, str(oif)) if oif else None,
        scope=_SCOPES.get(msg["scope"], str(msg["scope"])),
        proto=_PROTOS.get(msg["proto"], str(msg["proto"])),
        type=_RTN.get(msg["type"], str(msg["type"])),
        prefsrc=msg.get_attr("RTA_PREFSRC"), metric=msg.get_attr("RTA_PRIORITY"))


# --- comparing -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Facet:
    """One line of a comparison: ``verdict`` is shared, same or differs. ``scope`` is the
    namespace kind that decides it: ``net`` for interfaces, addresses, routes, sockets and
    sysctls, ``uts`` for the hostname, the kind itself for an identity, and ``mnt`` for
    UNIX sockets bound to a path, which are filesystem-scoped (see :data:`PATH_SOCKETS`)."""

    name: str
    verdict: str
    common: tuple[str, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    scope: str = ""


@dataclasses.dataclass
class Comparison:
    """Two views, facet by facet. ``facets[name]`` gives one :class:`Facet`."""

    a: str
    b: str
    facets: dict[str, Facet]

    def verdict(self, name: str) -> str:
        return self.facets[name].verdict

    def shared(self) -> list[str]:
        return [n for n, f in self.facets.items() if f.verdict == "shared"]

    def differs(self) -> list[str]:
        return [n for n, f in self.facets.items() if f.verdict == "differs"]

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b,
                "facets": {n: {"verdict": f.verdict, "scope": f.scope, "common": list(f.common),
                               "only_a": list(f.only_a), "only_b": list(f.only_b)}
                           for n, f in self.facets.items()}}

    def table(self, width: int = 120) -> str:
        """Side by side: one section per facet, common items on both sides, items only one
        side has marked ``*``."""
        rows: list[tuple[str, ...]] = [("facet / verdict", self.a, self.b)]
        for f in self.facets.values():
            if f.name == PATH_SOCKETS:
                rows.append(("filesystem-scoped", "(not a network namespace's: a UNIX socket bound to a path is "
                             "listed by the netns that bound it, but any netns that sees the file connects to it; "
                             "shared when the mount namespace is)", ""))
            pairs = [(c, c) for c in f.common]
            extra = max(len(f.only_a), len(f.only_b))
            pairs += [(f"* {f.only_a[i]}" if i < len(f.only_a) else "",
                       f"* {f.only_b[i]}" if i < len(f.only_b) else "") for i in range(extra)]
            for n, (left, right) in enumerate(pairs or [("", "")]):
                rows.append((f"{f.name}: {f.verdict}" if n == 0 else "", left, right))
        return _render(rows, width) + "\n(* only on that side)"

    def __str__(self) -> str:
        return self.table()


#: The facet of listening UNIX sockets bound to a path. They are filesystem-scoped: a
#: process in any network namespace connects to one through the file (only abstract ``@``
#: names are per-netns), so they are compared by mount namespace, apart from the netns
#: facets, and never make two network namespaces "differ".
PATH_SOCKETS = "unix path sockets"

# Which namespace makes a facet "shared" when both views are in it.
_FACET_NS = {"interfaces": "net", "addresses": "net", "routes": "net",
             "listening sockets": "net", "sysctls": "net", "hostname": "uts", PATH_SOCKETS: "mnt"}


def compare(a: View, b: View) -> Comparison:
    """Facet by facet: ``shared`` (the same namespace, hence the same kernel object),
    ``same`` (different namespaces, equal contents) or ``differs``, with the items only one
    side has. Namespace facets are only ever shared or differs. UNIX sockets bound to a
    path are the last facet, :data:`PATH_SOCKETS`, decided by the mount namespace: another
    netns reaches them through the file, so they are no network-namespace difference."""
    items_a, items_b = a.facet_items(), b.facet_items()
    facets = {}
    kinds = [k for k in KINDS if k in a.identities or k in b.identities]
    for name in kinds + list(_FACET_NS):
        left, right = items_a.get(name, []), items_b.get(name, [])
        set_b, set_a = set(right), set(left)
        common = tuple(i for i in left if i in set_b)
        only_a = tuple(i for i in left if i not in set_b)
        only_b = tuple(i for i in right if i not in set_a)
        ns_kind = _FACET_NS.get(name, name)
        ident_a, ident_b = a.identities.get(ns_kind), b.identities.get(ns_kind)
        if ident_a is not None and ident_a == ident_b:
            verdict = "shared"
        elif name in KINDS or only_a or only_b:
            verdict = "differs"
        else:
            verdict = "same"
        facets[name] = Facet(name, verdict, common, only_a, only_b, ns_kind)
    return Comparison(a.label, b.label, facets)


# --- text tables ---------------------------------------------------------------------------------
def _iface_line(i: Interface) -> str:
    line = f"{i.index}: {i.item()}"
    if i.peer or i.peer_index:
        where = f" (link-netnsid {i.link_netnsid})" if i.link_netnsid is not None else ""
        line += f" peer {i.peer or f'ifindex {i.peer_index}'}{where}"
    return line


def _socket_line(s: Socket) -> str:
    line = f"{s.item()} {s.state}"
    if s.filesystem_scoped:
        line += " (by path: any netns can reach it)"
    if s.remote:
        line += f" -> {s.remote}"
    if s.pid is not None:
        line += f" [{s.process} {s.pid}]"
    return line


def _section(name: str, items: list[str]) -> list[tuple[str, str]]:
    if not items:
        return [(name, "(none)")]
    return [(name if n == 0 else "", item) for n, item in enumerate(items)]


def _render(rows: list[tuple[str, ...]], width: int) -> str:
    """Columns: the first as wide as its longest cell, the rest sharing what is left; long
    cells wrap inside their column."""
    ncols = len(rows[0])
    first = min(max(len(r[0]) for r in rows), 28)
    rest = max(20, (width - first - 3 * (ncols - 1)) // max(1, ncols - 1))
    widths = [first] + [rest] * (ncols - 1)
    lines = []
    for n, row in enumerate(rows):
        cells = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(row, widths)]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            lines.append(" | ".join(parts).rstrip())
        if n == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)

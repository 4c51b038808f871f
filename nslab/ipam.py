"""IP address management: which subnet a network gets, and which address each child gets.

Two jobs, both pure bookkeeping (nothing here touches the kernel):

**Choosing a subnet the way Docker does.** Docker's default address pools are
172.17.0.0/16 ... 172.31.0.0/16, then 192.168.0.0/16 cut into /20s. A new network takes the
first pool that overlaps nothing the host already uses, so it never collides with a running
``docker0``, a VPN or the LAN. "Already uses" is Docker's own heuristic (moby
``libnetwork/netutils/utils_linux.go``, ``InferReservedNetworks``): the host's IPv4
*on-link* routes of the main table (scope link, with a destination: since moby PR #42598,
v23.0) and every IPv4 nameserver of ``/etc/resolv.conf`` as a /32. Gathering that data is the
caller's job (one route dump); turning it into a decision is pure and tested here::

    >>> routes = rtnl.routes()                          # pyroute2 messages, main table
    >>> avoid = host_avoid_list(routes, read_nameservers())
    >>> choose_subnet(avoid, taken=Ipam.held_subnets(state_dir).values())
    IPv4Network('172.18.0.0/16')                        # docker0 holds 172.17.0.0/16

**Handing out addresses.** :class:`Ipam` keeps one network's reservations under
``<state_dir>/ipam/``. Every operation takes an ``flock`` on the network's lock file (and a
thread lock, because ``flock`` does not exclude threads sharing one open file), so threads
and processes sharing a state directory never hand out one address twice::

    >>> with Ipam(state_dir, "nslab0", "172.18.0.0/16") as ipam:   # gateway .1 reserved
    ...     ipam.allocate("child-1")                               # lowest free first
    IPv4Address('172.18.0.2')
    ...     ipam.allocate("child-2", "172.18.0.9")                 # or the one asked for
    ...     ipam.release_owner("child-1")                          # on teardown
    ...     ipam.release_where(lambda addr, owner: owner not in alive)   # garbage collection

The reservations are an append-only journal, ``<network>.journal``: a header line, then one
line per change, ``+172.18.0.2 child-1`` or ``-172.18.0.2``, each change one ``O_APPEND``
write made under the lock. An operation therefore costs the same with 10 or 10,000
addresses allocated: each :class:`Ipam` caches what it replayed and, under the lock, reads
only what other handles appended since (they are the only writers, and they hold the lock
too). A final line without its newline is the torn write of a writer that died mid-write;
it never happened (its caller got no answer) and the next locked reader cuts it off (a
``release_where`` cut short this way has released only its whole lines: the rest stay held
until the next collection). When
the journal holds more than twice as many records as live reservations (plus a constant),
the writer rewrites it as a snapshot, to a temporary file renamed over it; other handles see
the new inode at their next operation and read it whole, so compaction costs amortized O(1)
per change. ``<network>.json`` describes the network (subnet, gateway) and is written once:
:meth:`Ipam.held_subnets` reads only those.

The network address, the broadcast address and the gateway are never handed out. A full
subnet raises :class:`~nslab.errors.ResourceExhaustedError` naming the network and subnet;
bad input raises :class:`~nslab.errors.InputError` naming the field, before anything changes.

The state is not fsync'ed: reservations only mean something while the namespaces they
describe exist, and none survives a reboot. A crash (of a process, not the kernel) leaves
every record either whole or torn at the end of the journal, and ``os.replace`` makes a
compaction all-or-nothing: no crash makes two handles hand out one address, or forgets one
that was handed out.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import ipaddress
import json
import os
import re
import socket
import threading
from typing import Callable, Iterable, Iterator

from ._names import check_name
from .errors import InputError, NslabError, ResourceExhaustedError, from_errno

__all__ = [
    "DEFAULT_POOLS", "POOL_EXHAUSTED", "RT_SCOPE_LINK", "choose_subnet", "host_avoid_list",
    "parse_nameservers", "read_nameservers", "nameserver_networks", "validate_subnet", "validate_network_name", "Ipam",
]

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network


def _docker_default_pools() -> tuple[IPv4Network, ...]:
    # moby libnetwork/ipamutils: {172.17.0.0/16, 16}, ..., {172.31.0.0/16, 16},
    # {192.168.0.0/16, 20}.
    sixteens = [IPv4Network(f"172.{n}.0.0/16") for n in range(17, 32)]
    twenties = list(IPv4Network("192.168.0.0/16").subnets(new_prefix=20))
    return tuple(sixteens + twenties)


DEFAULT_POOLS: tuple[IPv4Network, ...] = _docker_default_pools()

#: Docker's message when every pool overlaps something (moby ipam ErrNoAvailablePool).
POOL_EXHAUSTED = "could not find an available, non-overlapping IPv4 address pool"

RT_SCOPE_LINK = 253          # rtnetlink.h: "on-link" routes, e.g. a LAN's 192.168.1.0/24
_RT_TABLE_MAIN = 254
_MAX_PREFIX = 30             # a /30 holds network, gateway, one child, broadcast


# --- choosing a subnet ----------------------------------------------------------------------
def choose_subnet(avoid: Iterable[IPv4Network], taken: Iterable[IPv4Network] = (),
                  pools: Iterable[IPv4Network] = DEFAULT_POOLS) -> IPv4Network:
    """The first of ``pools`` that overlaps no network in ``avoid`` (the host's on-link
    routes and nameservers: :func:`host_avoid_list`) nor in ``taken`` (subnets other nslab
    networks hold). Raises :class:`ResourceExhaustedError` with Docker's wording when none
    is left."""
    blocked = [_as_network(n, "avoid") for n in avoid] + [_as_network(n, "taken") for n in taken]
    for pool in pools:
        if not any(pool.overlaps(b) for b in blocked):
            return pool
    raise ResourceExhaustedError(
        errno.ENOSPC, POOL_EXHAUSTED, obj="Docker's default address pools",
        hint="every pool overlaps a host route, a nameserver or another network: "
             "give the network a subnet explicitly")


def host_avoid_list(routes: Iterable[object], nameservers: Iterable[object] = ()) -> list[IPv4Network]:
    """What a new network's subnet must not overlap, from data the caller fetched.

    ``routes`` are rtnetlink route messages (pyroute2 ``get_routes``) or plain dicts with
    ``dst``/``RTA_DST``, ``dst_len``, ``scope`` and optionally ``family`` and ``table``.
    Only IPv4 main-table routes of scope link with a destination count: a default route
    (no destination) says nothing about which subnets are free (moby PR #42598).
    ``nameservers`` are addresses (strings or ``ip_address`` objects); IPv4 ones become /32s.
    """
    avoid: list[IPv4Network] = []
    for route in routes:
        if _field(route, "family", None) not in (None, 2):         # AF_INET only
            continue
        table = _field(route, "table", None)
        table = _field(route, "RTA_TABLE", None) if table in (None, 252) else table
        if table not in (None, _RT_TABLE_MAIN):
            continue
        if _field(route, "scope", None) != RT_SCOPE_LINK:
            continue
        dst = _field(route, "RTA_DST", None) or _field(route, "dst", None)
        dst_len = _field(route, "dst_len", 0) or 0
        if not dst or not dst_len:
            continue
        avoid.append(IPv4Network(f"{dst}/{dst_len}", strict=False))
    for server in nameservers:
        try:
            addr = ipaddress.ip_address(str(server).split("%")[0])
        except ValueError:
            continue
        if addr.version == 4:
            avoid.append(IPv4Network(f"{addr}/32"))
    return avoid


def parse_nameservers(resolv_conf: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf text, in order (IPv4 and IPv6)."""
    found = []
    for line in resolv_conf.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                continue
            found.append(words[1])
    return found


def read_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """:func:`parse_nameservers` of a file; a missing or unreadable file has none (as Docker)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_nameservers(f.read())
    except OSError:
        return []


def nameserver_networks(path: str = "/etc/resolv.conf") -> list[IPv4Network]:
    """The IPv4 nameservers of ``path`` as /32s: the part of :func:`host_avoid_list` that
    comes from a file (a missing file has none)."""
    return host_avoid_list((), read_nameservers(path))


def _field(msg: object, name: str, default: object) -> object:
    """Read ``name`` from a pyroute2 message (header field or NLA) or a plain mapping."""
    if hasattr(msg, "get_attr") and name.startswith("RTA_"):
        value = msg.get_attr(name)  # type: ignore[attr-defined]
        return default if value is None else value
    try:
        value = msg.get(name)  # type: ignore[attr-defined]
    except (AttributeError, KeyError, TypeError):
        return default
    return default if value is None else value


def _as_network(value: object, field: str) -> IPv4Network:
    if isinstance(value, IPv4Network):
        return value
    try:
        net = ipaddress.ip_network(value, strict=False)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise InputError(field, "not an IPv4 network", value) from None
    if net.version != 4:
        raise InputError(field, "not an IPv4 network", value)
    return net


# --- validating input -----------------------------------------------------------------------
# Ranges a bridge subnet can never sensibly be (the kernel or the routing would misread them).
_UNUSABLE = (
    (IPv4Network("0.0.0.0/8"), "0.0.0.0/8 means 'this network' and is not routable"),
    (IPv4Network("127.0.0.0/8"), "127.0.0.0/8 is loopback"),
    (IPv4Network("224.0.0.0/4"), "224.0.0.0/4 is multicast"),
    (IPv4Network("240.0.0.0/4"), "240.0.0.0/4 is reserved (and 255.255.255.255 is broadcast)"),
)


def validate_subnet(value: object, field: str = "subnet",
                    avoid: Iterable[IPv4Network] = ()) -> IPv4Network:
    """Check a subnet a user gave, before anything changes; return it as ``IPv4Network``.

    Raises :class:`InputError` naming ``field`` when it is not a string or network, not
    IPv4, has no prefix length, has host bits set (``10.0.0.1/24``), is smaller than a
    /30, lies in loopback/multicast/reserved space, or overlaps a network in ``avoid``.
    """
    if isinstance(value, ipaddress.IPv6Network):
        raise InputError(field, "only IPv4 subnets are supported", str(value))
    if isinstance(value, IPv4Network):
        net = value
    elif isinstance(value, str):
        if "/" not in value:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise InputError(field, "not an IP network, expected one like 10.0.0.0/24",
                                 value) from None
            raise InputError(field, "needs a prefix length, like 10.0.0.0/24", value)
        try:
            net = ipaddress.ip_network(value, strict=True)  # type: ignore[assignment]
        except ValueError as exc:
            if "host bits set" in str(exc):
                raise InputError(field, "has host bits set: the address must be the network "
                                        "address of its prefix", value) from None
            raise InputError(field, f"not an IP network ({exc})", value) from None
        if net.version != 4:
            raise InputError(field, "only IPv4 subnets are supported", value)
    else:
        raise InputError(field, "expected a string like 10.0.0.0/24 or an IPv4Network", value)
    if net.prefixlen > _MAX_PREFIX:
        raise InputError(field, f"too small: a /{net.prefixlen} has no room for a gateway and a "
                                f"child (at most /{_MAX_PREFIX})", str(net))
    for special, why in _UNUSABLE:
        if net.overlaps(special):
            raise InputError(field, f"unusable range: {why}", str(net))
    for other in avoid:
        other = _as_network(other, "avoid")
        if net.overlaps(other):
            raise InputError(field, f"overlaps {other}, which the host already uses", str(net))
    return net




def validate_network_name(name: object, field: str = "network") -> str:
    """A network name safe as a file name here (and in any shell): 1-64 letters, digits,
    ``.``, ``_`` or ``-``, starting with a letter or digit."""
    return check_name(name, field)


# --- the allocator --------------------------------------------------------------------------
_POOLS_LOCK = ".pools.lock"
# 1: one JSON file holding every reservation, rewritten whole by each change (O(allocated)).
# 2: a JSON description written once, plus an append-only journal of the reservations.
_VERSION = 2
_JOURNAL_MAGIC = b"nslab-ipam-journal"
# A journal is compacted once it holds more than twice as many records as live reservations,
# plus this many: the rewrite (O(live)) then comes at most once per ``live + slack`` changes.
_COMPACT_SLACK = 256


class Ipam:
    """The address reservations of one network, shared through ``<state_dir>/ipam/``.

    ``Ipam(state_dir, network, subnet, gateway=None)`` opens the network's state. On first
    use it creates it with ``gateway`` (default: the first host address, ``.1``), and the
    subnet must not overlap another network's in the same state directory (Docker: "Pool
    overlaps with other one on this address space"). Reopening with a different subnet, or
    a different explicit gateway, is an :class:`InputError`; without one it adopts the
    stored gateway. Safe from many threads, and from many processes sharing ``state_dir``.
    Files: ``<state_dir>/ipam/<network>.json`` (what the network is: written once, its
    presence means the network exists), ``<network>.journal`` (its reservations),
    ``<network>.lock`` (its flock), ``.pools.lock`` (held while a network is created or
    removed).

    Every operation costs the same however many addresses are allocated: it reads only
    the journal records other handles appended since this one last looked, and appends one
    write of its own (see the module docstring).
    """

    def __init__(self, state_dir: str, network: str, subnet: "str | IPv4Network",
                 gateway: "str | IPv4Address | None" = None, *, _pools_locked: bool = False):
        self.network = validate_network_name(network)
        self.subnet = validate_subnet(subnet)
        self.gateway = self._check_gateway(gateway)
        self._gateway_given = gateway is not None
        self._first = int(self.subnet.network_address) + 1
        self._last = int(self.subnet.broadcast_address) - 1
        self.dir = os.path.join(os.path.abspath(state_dir), "ipam")
        self.state_path = os.path.join(self.dir, f"{self.network}.json")
        self.journal_path = os.path.join(self.dir, f"{self.network}.journal")
        self.lock_path = os.path.join(self.dir, f"{self.network}.lock")
        self._thread_lock = threading.Lock()
        self._lock_fd = -1
        # The journal as this handle last saw it, all guarded by the locks (see _sync). The fd
        # stays open so that the inode it names cannot be freed and reused by a new journal
        # while we compare identities.
        self._journal_fd = -1
        self._journal_id: tuple[int, int] | None = None   # (st_dev, st_ino) of _journal_fd
        self._offset = 0                  # bytes replayed: always the end of a whole record
        self._records = 0                 # records after the header line (compaction trigger)
        self._held: dict[int, str] = {}   # address (as an int) -> owner
        self._holes: list[int] = []       # heap of freed addresses below _next (some stale)
        self._next = self._first          # every address from here up is free unless held
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise from_errno(exc.errno, "mkdir", f"IPAM state directory {self.dir}") from None
        self._open_lock()
        try:
            self._ensure_state(_pools_locked)
        except BaseException:
            self.close()
            raise

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def for_network(cls, state_dir: str, network: str, avoid: Iterable[IPv4Network] = (),
                    subnet: "str | IPv4Network | None" = None,
                    gateway: "str | IPv4Address | None" = None,
                    pools: Iterable[IPv4Network] = DEFAULT_POOLS) -> "Ipam":
        """Open ``network``'s IPAM, choosing its subnet as Docker does when it has none yet.

        An existing network keeps its subnet. A new one gets ``subnet`` (validated against
        ``avoid`` and the other networks of ``state_dir``) or the first free pool; choice and
        creation happen under one directory-wide lock, so two processes creating networks at
        once never get the same pool.
        """
        validate_network_name(network)
        avoid = [_as_network(a, "avoid") for a in avoid]
        if subnet is not None:
            subnet = validate_subnet(subnet, avoid=avoid)
        ipam_dir = os.path.join(os.path.abspath(state_dir), "ipam")
        os.makedirs(ipam_dir, mode=0o700, exist_ok=True)
        with _flocked_file(os.path.join(ipam_dir, _POOLS_LOCK)):
            held = cls.held_subnets(state_dir)
            if network in held:
                if subnet is not None and subnet != held[network]:
                    raise InputError("subnet", f"network {network!r} already holds {held[network]}",
                                     str(subnet))
                return cls(state_dir, network, held[network], gateway, _pools_locked=True)
            if subnet is None:
                subnet = choose_subnet(avoid, held.values(), pools)
            return cls(state_dir, network, subnet, gateway, _pools_locked=True)

    @staticmethod
    def held_subnets(state_dir: str) -> dict[str, IPv4Network]:
        """The subnet of every network with IPAM state in ``state_dir`` (the ``taken`` list).
        Reads only each network's small description, never its reservations."""
        ipam_dir = os.path.join(os.path.abspath(state_dir), "ipam")
        try:
            names = sorted(os.listdir(ipam_dir))
        except FileNotFoundError:
            return {}
        held = {}
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(ipam_dir, name)
            try:
                with open(path, "rb") as f:
                    state = _parse_state(f.read(), path)
            except FileNotFoundError:
                continue                       # removed while we listed: not held any more
            held[state["network"]] = IPv4Network(state["subnet"])
        return held

    @staticmethod
    def remove(state_dir: str, network: str, *, only_if_unused: bool = False,
               wanted: "Callable[[], bool] | None" = None) -> bool:
        """Forget a network's reservations (on network teardown). True if it had any state.
        Idempotent. Handles still open on it fail with ENOENT from then on.

        ``only_if_unused`` (gc): leave it if its journal holds an address or ``wanted()``
        says someone still names it. Both are asked under the locks that opening and
        allocating take, so nobody can start using it between the check and the removal."""
        network = validate_network_name(network)
        ipam_dir = os.path.join(os.path.abspath(state_dir), "ipam")
        if not os.path.isdir(ipam_dir):
            return False
        lock_path = os.path.join(ipam_dir, f"{network}.lock")
        with _flocked_file(os.path.join(ipam_dir, _POOLS_LOCK)):
            if not os.path.exists(lock_path):
                return False
            with _flocked_file(lock_path):
                if only_if_unused and (_journal_holds_any(os.path.join(ipam_dir, f"{network}.journal"))
                                       or (wanted is not None and wanted())):
                    return False
                # The journal first: from then on open handles fail (ENOENT) and a crash here
                # leaves a description without a journal, which counts as half-removed (its
                # subnet stays taken until the next open or remove finishes the job).
                _unlink(os.path.join(ipam_dir, f"{network}.journal"))
                existed = _unlink(os.path.join(ipam_dir, f"{network}.json"))
                leftover = re.compile(rf"{re.escape(network)}\.(?:json|journal)\.\d+\.\d+\.tmp")
                for name in os.listdir(ipam_dir):          # of writers that crashed mid-rewrite
                    if leftover.fullmatch(name):
                        _unlink(os.path.join(ipam_dir, name))
                # Unlinked while we hold it: waiters notice the inode changed and reopen.
                _unlink(lock_path)
        return existed

    # --- the operations ------------------------------------------------------------------
    def allocate(self, owner: str, address: "str | IPv4Address | None" = None) -> IPv4Address:
        """Reserve an address for ``owner``: the lowest free one, or ``address``.

        Raises :class:`InputError` for a bad owner or an address outside the subnet or
        reserved (network, broadcast, gateway); an ``EADDRINUSE`` :class:`NslabError` when
        the requested address is held; :class:`ResourceExhaustedError` when none is free.
        """
        owner = _check_owner(owner)
        wanted = None if address is None else self._check_address(address, "address")
        with self._locked():
            self._sync()
            if wanted is not None:
                chosen = int(wanted)
                if chosen in self._held:
                    raise from_errno(errno.EADDRINUSE, "ipam allocate",
                                     f"address {wanted} in network {self.network!r} "
                                     f"(held by {self._held[chosen]!r})")
            else:
                found = self._lowest_free()
                if found is None:
                    raise ResourceExhaustedError(
                        errno.ENOSPC,
                        f"no free address in network {self.network!r} ({self.subnet}): all "
                        f"{self.capacity} usable addresses are allocated",
                        obj=f"network {self.network} {self.subnet}",
                        hint="release addresses, or use a larger subnet")
                chosen = found
            self._append(_add_record(chosen, owner))
            self._add(chosen, owner)
            return IPv4Address(chosen)

    def release(self, address: "str | IPv4Address") -> bool:
        """Give ``address`` back; True if it was allocated. Idempotent."""
        addr = self._check_address(address, "address", reserved_ok=True)
        with self._locked():
            self._sync()
            key = int(addr)
            if key not in self._held:
                return False
            self._append(_remove_record(key))
            self._remove(key)
            return True

    def release_owner(self, owner: str) -> list[IPv4Address]:
        """Release every address ``owner`` holds; returns them (empty if none)."""
        owner = _check_owner(owner)
        return sorted(self.release_where(lambda _addr, who: who == owner))

    def release_where(self, predicate: Callable[[IPv4Address, str], bool]) -> dict[IPv4Address, str]:
        """Release every reservation for which ``predicate(address, owner)`` is true (the
        garbage collector's tool: release what dead owners held). Returns what it released.
        The predicate runs under the lock: keep it quick and free of IPAM calls."""
        with self._locked():
            self._sync()
            gone = [(a, o) for a, o in self._held.items() if predicate(IPv4Address(a), o)]
            if gone:
                self._append(b"".join(_remove_record(a) for a, _ in gone))   # one write
                for a, _ in gone:
                    self._remove(a)
            return {IPv4Address(a): o for a, o in sorted(gone)}

    def allocations(self) -> dict[IPv4Address, str]:
        """Every reservation, address → owner, lowest address first."""
        with self._locked():
            self._sync()
            return {IPv4Address(a): self._held[a] for a in sorted(self._held)}

    def owner_of(self, address: "str | IPv4Address") -> str | None:
        """Who holds ``address`` (None if free or reserved)."""
        addr = self._check_address(address, "address", reserved_ok=True)
        with self._locked():
            self._sync()
            return self._held.get(int(addr))

    @property
    def capacity(self) -> int:
        """How many addresses children can get: the subnet minus network, broadcast, gateway."""
        return self._last - self._first + 1 - (1 if self._first <= int(self.gateway) <= self._last else 0)

    # --- ownership -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def close(self, remove: bool = False) -> None:
        """Close the lock file; idempotent. Reservations stay on disk unless ``remove``
        (network teardown: :meth:`remove` forgets them all, once)."""
        with self._thread_lock:
            fd, self._lock_fd = self._lock_fd, -1
            self._forget()
            if fd >= 0:
                os.close(fd)
        if remove:
            self.remove(os.path.dirname(self.dir), self.network)

    def __enter__(self) -> "Ipam":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        for name in ("_lock_fd", "_journal_fd"):
            if getattr(self, name, -1) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        else:
            state = (f"{len(self._held)} allocated at last look" if self._journal_id is not None
                     else "open")
        return (f"<Ipam {self.network} {self.subnet} gateway {self.gateway}: {state}, "
                f"{self.state_path}>")

    # --- internals: input ----------------------------------------------------------------
    def _check_gateway(self, gateway: object) -> IPv4Address:
        if gateway is None:
            return self.subnet.network_address + 1
        return self._check_address(gateway, "gateway", gateway_ok=True)

    def _check_address(self, value: object, field: str, reserved_ok: bool = False,
                       gateway_ok: bool = False) -> IPv4Address:
        if isinstance(value, IPv4Address):
            addr = value
        elif isinstance(value, str):
            try:
                addr = IPv4Address(value)
            except ValueError:
                raise InputError(field, "not an IPv4 address", value) from None
        else:
            raise InputError(field, "expected an IPv4 address string or IPv4Address", value)
        if addr not in self.subnet:
            raise InputError(field, f"outside network {self.network!r}'s subnet {self.subnet}",
                             str(addr))
        if reserved_ok:
            return addr
        if addr == self.subnet.network_address:
            raise InputError(field, f"{addr} is the network address of {self.subnet}", str(addr))
        if addr == self.subnet.broadcast_address:
            raise InputError(field, f"{addr} is the broadcast address of {self.subnet}", str(addr))
        if not gateway_ok and addr == self.gateway:
            raise InputError(field, f"{addr} is network {self.network!r}'s gateway", str(addr))
        return addr

    # --- internals: locking ----------------------------------------------------------------
    def _open_lock(self) -> None:
        try:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_errno(exc.errno, "open", f"IPAM lock file {self.lock_path}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold this object's thread lock and the network's flock."""
        with self._thread_lock:
            if self._lock_fd < 0:
                raise from_errno(errno.EBADF, "ipam", f"closed IPAM handle for network {self.network}")
            while True:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                # Ipam.remove() unlinks the lock file while holding it; whoever waited on the
                # old inode must not proceed next to someone locking the new file.
                held = os.fstat(self._lock_fd)
                try:
                    now = os.stat(self.lock_path)
                except FileNotFoundError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    break
                os.close(self._lock_fd)
                self._lock_fd = -1
                if now is None:
                    self._forget()
                    raise self._removed_error()
                self._open_lock()               # removed and made again: _sync reloads
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # --- internals: the description (<network>.json) ----------------------------------------
    def _ensure_state(self, pools_locked: bool) -> None:
        """Create the state on first use, checking the subnet against other networks under
        the directory-wide lock (which :meth:`for_network` may already hold: a second flock
        on it from this process would wait for ourselves)."""
        with self._locked():
            state = self._existing()
        if state is None:
            pools = (contextlib.nullcontext() if pools_locked
                     else _flocked_file(os.path.join(self.dir, _POOLS_LOCK)))
            with pools, self._locked():
                state = self._existing()
                if state is None:
                    for name, held in self.held_subnets(os.path.dirname(self.dir)).items():
                        if name != self.network and held.overlaps(self.subnet):
                            raise InputError("subnet", f"Pool overlaps with other one on this "
                                             f"address space: network {name!r} holds {held}",
                                             str(self.subnet))
                    state = self._fresh_state()
                    self._create(state)
        if state["subnet"] != str(self.subnet):
            raise InputError("subnet", f"network {self.network!r} already holds {state['subnet']}",
                             str(self.subnet))
        if not self._gateway_given:
            self.gateway = IPv4Address(state["gateway"])   # whatever the network was made with
        if state["gateway"] != str(self.gateway):
            raise InputError("gateway", f"network {self.network!r} already has gateway "
                             f"{state['gateway']}", str(self.gateway))

    def _existing(self) -> dict | None:
        """The network's description, or None if it has none or no journal (a creation or
        removal that did not finish: either way the network is to be made afresh)."""
        try:
            with open(self.state_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise from_errno(exc.errno, "read", f"IPAM state {self.state_path}") from None
        state = _parse_state(raw, self.state_path)
        return state if os.path.exists(self.journal_path) else None

    def _fresh_state(self) -> dict:
        return {"version": _VERSION, "network": self.network, "subnet": str(self.subnet),
                "gateway": str(self.gateway), "journal": os.path.basename(self.journal_path)}

    def _create(self, state: dict) -> None:
        """Write a new network's journal, then its description. Any old description is
        unlinked first and the new one renamed in last, so a crash at any point leaves either
        no network (a stray journal the next creation replaces) or a whole one."""
        _unlink(self.state_path)
        self._forget()
        fd = _replace_file(self.journal_path, self._journal_header(), "journal")
        self._adopt(fd, offset=len(self._journal_header()))
        os.close(_replace_file(self.state_path, json.dumps(state, separators=(",", ":")).encode(),
                               "state"))

    def _removed_error(self) -> NslabError:
        return from_errno(errno.ENOENT, "ipam", f"state of network {self.network!r} "
                          f"({self.state_path})", hint="the network was removed (Ipam.remove) "
                          "since this handle opened it: open it again")

    # --- internals: the journal (<network>.journal) -----------------------------------------
    # Line 1: b"nslab-ipam-journal 2 <network> <subnet> <gateway>". Then one record a line:
    # b"+<address> <owner>" (owner in Python's unicode_escape: ASCII, no raw newline) or
    # b"-<address>". Only whole lines count: a final line without its newline is the torn
    # write of a writer that died holding the lock, and is cut off by the next locked reader.
    def _journal_header(self) -> bytes:
        return b"%s %d %s %s %s\n" % (_JOURNAL_MAGIC, _VERSION, self.network.encode(),
                                      str(self.subnet).encode(), str(self.gateway).encode())

    def _sync(self) -> None:
        """Under the locks: bring the cache up to what the journal says. Reads only the bytes
        appended since this handle last looked, or the whole journal if it is another file
        now (compacted, or the network removed and made again)."""
        try:
            st = os.stat(self.journal_path)
        except FileNotFoundError:
            self._forget()
            raise self._removed_error() from None
        except OSError as exc:
            raise from_errno(exc.errno, "stat", f"IPAM journal {self.journal_path}") from None
        if (st.st_dev, st.st_ino) != self._journal_id or st.st_size < self._offset:
            self._reload()
        elif st.st_size > self._offset:
            self._replay(self._read(self._offset, st.st_size), self._offset)

    def _reload(self) -> None:
        self._forget()
        try:
            fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._removed_error() from None
        except OSError as exc:
            raise from_errno(exc.errno, "open", f"IPAM journal {self.journal_path}") from None
        self._adopt(fd, offset=0)
        try:
            data = self._read(0, os.fstat(fd).st_size)
            end = data.find(b"\n") + 1
            words = data[:end].split()
            if not end or len(words) != 5 or words[0] != _JOURNAL_MAGIC \
                    or words[1] != str(_VERSION).encode() or words[2] != self.network.encode():
                raise self._corrupt(0, f"not a version {_VERSION} journal of network "
                                       f"{self.network!r}: {data[:80]!r}")
            if words[3] != str(self.subnet).encode() or words[4] != str(self.gateway).encode():
                raise self._removed_error()     # made again with another subnet or gateway
            self._offset = end
            self._replay(data[end:], end)
        except BaseException:
            self._forget()
            raise

    def _replay(self, data: bytes, base: int) -> None:
        """Apply the whole records of ``data`` (journal bytes from offset ``base``); cut off
        a torn one at the end."""
        end = data.rfind(b"\n") + 1
        pos = base
        try:
            lines = data[:end].split(b"\n")
            lines.pop()                         # after the last newline: empty
            for line in lines:
                self._apply(line, pos)
                pos += len(line) + 1
        except BaseException:
            self._forget()                      # the cache is half-applied: reload next time
            raise
        self._offset = pos
        self._records += len(lines)
        if end < len(data):
            try:
                os.ftruncate(self._journal_fd, pos)
            except OSError as exc:
                raise from_errno(exc.errno, "ftruncate", f"IPAM journal {self.journal_path}: "
                                 "cutting off a torn record") from None

    def _apply(self, line: bytes, pos: int) -> None:
        """One record into the cache, checked: a record no writer could have written (a
        malformed line, an address held twice, a release of a free one) is corruption."""
        op, rest = line[:1], line[1:]
        if op == b"+":
            text, space, owner_raw = rest.partition(b" ")
            addr = _parse_address(text)
            try:
                owner = owner_raw.decode("unicode_escape")
            except UnicodeDecodeError:
                owner = ""
            if addr is None or not space or not owner:
                raise self._corrupt(pos, f"malformed record {line[:300]!r}")
            if not self._first <= addr <= self._last or addr == int(self.gateway):
                raise self._corrupt(pos, f"{line[:40]!r} reserves an address children cannot get")
            if addr in self._held:
                raise self._corrupt(pos, f"{line[:40]!r} reserves an address already held")
            self._add(addr, owner)
        elif op == b"-":
            addr = _parse_address(rest)
            if addr is None:
                raise self._corrupt(pos, f"malformed record {line[:40]!r}")
            if addr not in self._held:
                raise self._corrupt(pos, f"{line[:40]!r} releases an address not held")
            self._remove(addr)
        else:
            raise self._corrupt(pos, f"unknown record {line[:40]!r}")

    def _append(self, records: bytes) -> None:
        """Append whole records with one O_APPEND write under the locks (compacting first if
        the journal is due, so that a failed compaction fails the operation, not after it)."""
        if self._records > 2 * len(self._held) + _COMPACT_SLACK:
            self._compact()
        try:
            _write_all(self._journal_fd, records)
        except OSError as exc:
            # A short write (ENOSPC) would leave a torn record, or some of several: cut it off,
            # so the operation did nothing. If even that fails, the next reader cuts a torn
            # tail itself, and our cache, which never counted the bytes, replays the rest.
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal_fd, self._offset)
            raise from_errno(exc.errno, "write", f"IPAM journal {self.journal_path}") from None
        self._offset += len(records)
        self._records += records.count(b"\n")

    def _compact(self) -> None:
        """Replace the journal by a snapshot of what is held (temporary file + rename under
        the locks: other handles see either the old journal or the whole new one, and notice
        the new inode at their next operation)."""
        data = self._journal_header() + b"".join(_add_record(a, self._held[a])
                                                 for a in sorted(self._held))
        fd = _replace_file(self.journal_path, data, "journal")
        os.close(self._journal_fd)
        self._adopt(fd, offset=len(data))
        self._records = len(self._held)
        holes = {a for a in self._holes if a not in self._held}   # drop stale heap entries
        self._holes = sorted(holes)                                # a sorted list is a heap

    def _adopt(self, fd: int, offset: int) -> None:
        """Make ``fd`` this handle's journal, its records before ``offset`` already applied."""
        st = os.fstat(fd)
        self._journal_fd, self._journal_id = fd, (st.st_dev, st.st_ino)
        self._offset = offset

    def _forget(self) -> None:
        """Drop the cache (closing the journal): the next operation reads the journal anew."""
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd, self._journal_id = -1, None
        self._offset = self._records = 0
        self._held, self._holes, self._next = {}, [], self._first

    def _read(self, start: int, stop: int) -> bytes:
        chunks = []
        while start < stop:
            try:
                chunk = os.pread(self._journal_fd, stop - start, start)
            except OSError as exc:
                raise from_errno(exc.errno, "read", f"IPAM journal {self.journal_path}") from None
            if not chunk:
                break
            chunks.append(chunk)
            start += len(chunk)
        return b"".join(chunks)

    def _corrupt(self, pos: int, why: str) -> NslabError:
        return NslabError(errno.EBADMSG, f"IPAM state {self.journal_path} is corrupt ({why}, at "
                          f"byte {pos}): remove it only if no nslab network uses it",
                          obj=self.journal_path)

    # --- internals: the free addresses ---------------------------------------------------
    # Lowest free first, in amortized O(log holes) whatever is held: every address below _next
    # is held, the gateway, or in the heap _holes; from _next up, an address is free unless
    # held. A heap entry that was taken again (a requested address) is dropped when it
    # surfaces; _next only moves up past held addresses, each of which it passes once.
    def _lowest_free(self) -> int | None:
        held, holes = self._held, self._holes
        while holes and holes[0] in held:
            heapq.heappop(holes)
        if holes:
            return holes[0]
        gateway, nxt = int(self.gateway), self._next
        while nxt <= self._last and (nxt in held or nxt == gateway):
            nxt += 1
        self._next = nxt
        return nxt if nxt <= self._last else None

    def _add(self, addr: int, owner: str) -> None:
        self._held[addr] = owner
        if self._holes and self._holes[0] == addr:
            heapq.heappop(self._holes)
        elif addr == self._next:
            self._next = addr + 1

    def _remove(self, addr: int) -> None:
        del self._held[addr]
        if addr < self._next:
            heapq.heappush(self._holes, addr)


def _journal_holds_any(path: str) -> bool:
    """Does the journal at ``path`` hold an address (read under its network's lock)? A
    journal that cannot be read or parsed counts as holding one: gc leaves it alone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    held: set[bytes] = set()
    for line in data[data.find(b"\n") + 1:data.rfind(b"\n") + 1].split(b"\n")[:-1]:
        if line[:1] == b"+":
            held.add(line[1:].partition(b" ")[0])
        elif line[:1] == b"-":
            held.discard(line[1:])
        else:
            return True
    return bool(held)


def _add_record(addr: int, owner: str) -> bytes:
    return b"+%s %s\n" % (socket.inet_ntoa(addr.to_bytes(4, "big")).encode(),
                          owner.encode("unicode_escape"))


def _remove_record(addr: int) -> bytes:
    return b"-%s\n" % socket.inet_ntoa(addr.to_bytes(4, "big")).encode()


def _parse_address(text: bytes) -> int | None:
    try:
        # inet_pton, unlike inet_aton, takes nothing but a dotted quad.
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text.decode("ascii")), "big")
    except (OSError, UnicodeDecodeError):
        return None


def _parse_state(raw: bytes, path: str) -> dict:
    try:
        state = json.loads(raw)
        if not isinstance(state, dict) or state.get("version") != _VERSION:
            raise ValueError(f"unknown format version {state.get('version')!r}"
                             if isinstance(state, dict) else "not a JSON object")
        IPv4Network(state["subnet"])
        IPv4Address(state["gateway"])
        if not isinstance(state["network"], str):
            raise ValueError("network is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise NslabError(errno.EBADMSG, f"IPAM state {path} is corrupt ({exc}): remove it only if "
                         "no nslab network uses it", obj=path) from None
    return state


def _check_owner(owner: object) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > 256:
        raise InputError("owner", "expected a non-empty string of at most 256 characters", owner)
    return owner


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace_file(path: str, data: bytes, what: str) -> int:
    """Put ``data`` at ``path`` all at once for readers (a temporary file renamed over it) and
    return the new file's descriptor, open for appending."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = -1
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        _write_all(fd, data)
        os.replace(tmp, path)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        _unlink(tmp)
        if isinstance(exc, OSError):
            raise from_errno(exc.errno, "write", f"IPAM {what} {path}") from None
        raise
    return fd


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _flocked_file(path: str) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if needed), for directory-wide decisions.
    Only ever unlinked by :meth:`Ipam.remove` for network lock files, which re-check."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise from_errno(exc.errno, "open", f"IPAM lock file {path}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)                            # closing the last fd drops the flock

"""Docker's bridge firewall and port publishing, as one nslab-owned nftables table per host netns.

The table mirrors Docker's nftables backend (moby ``daemon/libnetwork/drivers/bridge/
internal/nftabler``, whose golden files are the reference) chain for chain and comment for
comment, in table ``ip nslab`` instead of ``ip docker-bridges``::

    fw = Firewall(host_ns)                                   # the table and its base chains
    fw.add_network("nslab0", IPv4Network("172.17.0.0/16"))   # ICC, OUTGOING, MASQUERADE, ...
    fw.publish("web", "nslab0", "172.17.0.2", parse_publish("8080:80"))
    ...
    fw.unpublish("web")                                      # exactly web's rules, ports, proxies
    fw.close()                                               # the table goes

What each part does (rule comments in quotes, as ``nft list ruleset`` shows them):

* base chains ``filter-FORWARD``, ``nat-PREROUTING``, ``nat-OUTPUT``, ``nat-POSTROUTING``,
  ``raw-PREROUTING`` hold only jumps; per-bridge chains are reached through verdict maps
  keyed by interface name, so traffic unrelated to a bridge crosses no per-bridge rule;
* per bridge: "ICC" (children of one bridge talk freely), "OUTGOING" (children reach out),
  "MASQUERADE" (egress leaves with the host's address), and a final "UNPUBLISHED PORT DROP"
  for anything entering the bridge that no published port allows — which is also what keeps
  two bridge networks apart;
* per publication: a forward accept for the container port, "DNAT" from the host port,
  "DROP DIRECT ACCESS" (raw prerouting: the container's address is not reachable from
  outside its bridge, Docker 28+), and for a ``127.0.0.1`` publish "DROP REMOTE LOOPBACK"
  (a neighbour routing 127.0.0.1 to the host must not reach it: moby#45610, CVE-2020-8558).

Publishing backends, per Firewall (``published_via``) or per ``publish(via=...)`` call:

``"docker"``  Docker's default (``userland-proxy: true``): DNAT for traffic from outside and
              from the host's own non-loopback addresses (``nat-OUTPUT`` skips 127.0.0.0/8),
              plus a :class:`~nslab.proxy.UserlandProxy` on the host port that serves the
              rest: 127.0.0.1 from the host, and children of the same bridge (hairpin).
``"nat"``     Docker with ``userland-proxy: false`` (hairpin NAT): DNAT everywhere including
              127.0.0.1, ``route_localnet=1`` on the bridge, "MASQUERADE FROM HOST" and
              "MASQ TO OWN PORT", and ``bridge-nf-call-iptables=1`` in the host netns so
              child-to-child hairpin replies are un-NATed (as dockerd does). The port is still
              bound (reserved) by nslab, but no proxy runs.
``"proxy"``   only the userland proxy, no DNAT: to measure the proxy alone.

Port reservation works as in Docker 28+: nslab binds each host port itself, in the host
netns, and holds it for the life of the publication (TCP sockets listen; the proxy serves
that very socket). Either refusal raises :class:`~nslab.errors.PortAllocatedError` and says
who holds the port. A port another nslab publication has is refused with the text of
Docker's own port allocator, ``Bind for 0.0.0.0:8080 failed: port is already allocated``.
A port bound by another process fails at ``bind(2)``; nslab then reports ``failed to bind
host port 0.0.0.0:8080/tcp: address already in use``, in the shape of moby's bind error
(``"failed to bind host port %s/%s: %w"``, ``daemon/libnetwork/portallocator/
osallocator_linux.go``): the text is nslab's, as Docker's exact wording varies by release.

Atomicity: each ``add_network``/``publish``/``unpublish`` is one nfnetlink batch: all rules
or none. Ports are bound before the batch and released if it fails; proxies start after it
and the rules are removed again if a proxy cannot start. Input errors are raised before
anything changes in the kernel. Once a UDP mapping's rules are gone, its conntrack entries
go too (``nslab._conntrack``, as Docker does): an entry DNATed earlier would otherwise keep
sending a client's datagrams to the old container.

Crash safety: the table is created with the ``owner`` flag (``NFT_TABLE_F_OWNER``, Linux
5.12+): it belongs to this Firewall's netlink socket and **vanishes when that socket
closes — including when the controlling process is SIGKILLed**. Held ports die with the
process too, and proxies with it (control pipe EOF, plus ``PR_SET_PDEATHSIG``). The cost:
only this socket may change the table (``nft`` can list it, not edit or flush it), and the
Firewall object must live as long as the lab. Pass ``owner=False`` for a table that
outlives the process (then :func:`delete_table` is the ``gc`` for it). The sysctls the
``nat`` backend sets (``route_localnet``, ``bridge-nf-call-iptables``) are restored by
``remove_network``/``close``, not by a crash.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import re
import socket
import threading
from typing import Iterable

from . import _nft
from ._netlink import NETLINK_NETFILTER, socket_in
from ._conntrack import Conntrack
from ._nft import ACCEPT, DROP, MASQUERADE, Batch, Dnat, Jump, Netfilter, Rule, Vmap
from .errors import (InputError, NslabError, NslabFileExistsError, PortAllocatedError,
                     from_errno)
from .hosts import read_sysctl_path, write_sysctl_path
from .namespaces import Namespace
from ._faults import checkpoint
from .proxy import UserlandProxy
from .publish import PortMapping, parse_publish

__all__ = ["Firewall", "Publication", "BACKENDS", "delete_table", "find_port_holder"]

BACKENDS = ("docker", "nat", "proxy")

# Docker's names (nftabler.go), so rulesets read the same.
FORWARD = "filter-FORWARD"
POSTROUTING = "nat-POSTROUTING"
PREROUTING = "nat-PREROUTING"
OUTPUT = "nat-OUTPUT"
NAT = "nat-prerouting-and-output"
RAW = "raw-PREROUTING"
FWD_IN_MAP, FWD_OUT_MAP = "filter-forward-in-jumps", "filter-forward-out-jumps"
POST_IN_MAP, POST_OUT_MAP = "nat-postrouting-in-jumps", "nat-postrouting-out-jumps"
LOOPBACK = "127.0.0.0/8"

_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
_IFNAME_BAD = re.compile(r"[\s/:]")


def _fwd_in(br: str) -> str:
    return f"filter-forward-in__{br}"


def _fwd_out(br: str) -> str:
    return f"filter-forward-out__{br}"


def _post_in(br: str) -> str:
    return f"nat-postrouting-in__{br}"


def _post_out(br: str) -> str:
    return f"nat-postrouting-out__{br}"


@dataclasses.dataclass
class _Network:
    bridge: str
    subnet: ipaddress.IPv4Network
    drop_handle: int                          # "UNPUBLISHED PORT DROP": port accepts go before it
    hairpin: bool                             # the network-level hairpin NAT pieces are static
    hairpin_handle: int | None = None         # "MASQUERADE FROM HOST", when added lazily
    nat_keys: set = dataclasses.field(default_factory=set)
    keys: set = dataclasses.field(default_factory=set)
    saved_route_localnet: str | None = None


@dataclasses.dataclass
class Publication:
    """What one ``publish`` call made: resolved mappings, its rules, held sockets, proxies."""
    key: str
    bridge: str
    container_ip: ipaddress.IPv4Address
    via: str
    mappings: list[PortMapping]
    rules: list[tuple[str, int]] = dataclasses.field(default_factory=list)   # (chain, handle)
    sockets: list[socket.socket] = dataclasses.field(default_factory=list)
    proxies: list[UserlandProxy] = dataclasses.field(default_factory=list)

    def __repr__(self) -> str:
        ports = ", ".join(str(m) for m in self.mappings)
        return (f"<Publication {self.key!r} {self.via} {self.container_ip} on {self.bridge}: "
                f"[{ports}], {len(self.rules)} rules, {len(self.proxies)} proxies>")


class Firewall:
    """One nslab-owned nftables table in ``host_ns``, plus the ports and proxies it publishes.

    A context manager; ``close()`` is idempotent and removes everything this object made.
    Thread-safe (one lock).
    """

    def __init__(self, host_ns: Namespace, *, table: str = "nslab", published_via: str = "docker",
                 owner: bool = True):
        if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
            raise InputError("table", "an nft table name: a letter, then up to 63 letters, "
                             "digits, '_' or '-'", table)
        if published_via not in BACKENDS:
            raise InputError("published_via", f"one of {', '.join(BACKENDS)}", published_via)
        self.table = table
        self.published_via = published_via
        self.hairpin = published_via == "nat"     # Docker's config.Hairpin (no userland proxy)
        self.owner = owner
        self._lock = threading.RLock()
        self._networks: dict[str, _Network] = {}
        self._pubs: dict[str, Publication] = {}
        self._ports: dict[tuple[str, int], list[tuple[str, str]]] = {}   # (proto, port) -> [(ip, key)]
        self._saved_brnf: str | None = None
        # Who needs bridge-nf-call-iptables: ("network", bridge) or ("publication", key), so a
        # publication keyed like a bridge never releases the bridge's claim.
        self._brnf_users: set[tuple[str, str]] = set()
        # Our own handle on the namespace: the caller may close theirs; proxies need it.
        self._ns = Namespace.from_fd(host_ns.fileno(), "net")
        self.ns_description = host_ns.description
        self._nf: Netfilter | None = None
        try:
            self._nf = Netfilter(socket_in(self._ns, proto=NETLINK_NETFILTER),
                                 f"netns {self.ns_description}")
            self._nf.commit(self._base_batch())
            checkpoint("firewall.table")
        except NslabError as exc:
            self._release()
            if exc.errno in (errno.EEXIST, errno.EPERM):
                # EPERM: it exists and another socket owns it (NFT_TABLE_F_OWNER).
                raise NslabFileExistsError(
                    errno.EEXIST, f"table ip {table} exists already in netns "
                    f"{self.ns_description}", syscall="nfnetlink newtable", obj=f"table ip {table}",
                    hint="another Firewall (or a crashed owner=False one) has it: pick another "
                         "table name, close that Firewall, or delete_table() a leftover") from None
            raise
        except BaseException:
            self._release()
            raise

    # --- the table ------------------------------------------------------------------------
    def _base_batch(self) -> Batch:
        b = Batch(self.table)
        b.add_table(_nft.NFT_TABLE_F_OWNER if self.owner else 0)
        for vmap in (FWD_IN_MAP, FWD_OUT_MAP, POST_IN_MAP, POST_OUT_MAP):
            b.add_vmap(vmap)
        # Creation order = `nft list` order: the same as Docker's golden files.
        b.add_chain(FORWARD, "filter-forward")
        b.add_chain(OUTPUT, "nat-output")
        b.add_chain(POSTROUTING, "nat-postrouting")
        b.add_chain(PREROUTING, "nat-prerouting")
        b.add_chain(NAT)
        b.add_chain(RAW, "raw-prerouting")
        b.add_rule(Rule(FORWARD, (), Vmap("oifname", FWD_IN_MAP), counter=False))
        b.add_rule(Rule(FORWARD, (), Vmap("iifname", FWD_OUT_MAP), counter=False))
        b.add_rule(Rule(POSTROUTING, (), Vmap("iifname", POST_OUT_MAP), counter=False))
        b.add_rule(Rule(POSTROUTING, (), Vmap("oifname", POST_IN_MAP), counter=False))
        b.add_rule(Rule(PREROUTING, (("fib daddr type", "==", "local"),), Jump(NAT)))
        # With the userland proxy, the host's own 127/8 traffic is left to the proxy.
        skip_loopback = () if self.hairpin else (("ip daddr", "!=", LOOPBACK),)
        b.add_rule(Rule(OUTPUT, skip_loopback + (("fib daddr type", "==", "local"),), Jump(NAT)))
        return b

    @property
    def nf(self) -> Netfilter:
        if self._nf is None:
            raise from_errno(errno.EBADF, "firewall", f"closed table ip {self.table} in "
                             f"{self.ns_description}")
        return self._nf

    # --- networks -------------------------------------------------------------------------
    def add_network(self, bridge: str, subnet: ipaddress.IPv4Network | str) -> None:
        """Docker's per-bridge rules for ``bridge`` carrying ``subnet`` (one batch).

        With the ``nat`` backend the bridge must already exist (``route_localnet`` is set on
        it). Raises InputError for a bad name or subnet, or one already added/overlapping.
        """
        bridge = _check_ifname(bridge, "bridge")
        try:
            subnet = ipaddress.IPv4Network(subnet, strict=True)
        except (ValueError, TypeError) as exc:
            raise InputError("subnet", f"an IPv4 network like 172.17.0.0/16 ({exc})", subnet) from None
        with self._lock:
            nf = self.nf
            if bridge in self._networks:
                raise InputError("bridge", f"{bridge} is already a network of this firewall", bridge)
            for other in self._networks.values():
                if other.subnet.overlaps(subnet):
                    raise InputError("subnet", f"{subnet} overlaps {other.subnet} of {other.bridge}",
                                     str(subnet))
            b = Batch(self.table)
            for chain in (_fwd_in(bridge), _fwd_out(bridge), _post_in(bridge), _post_out(bridge)):
                b.add_chain(chain)
            b.add_jump_element(FWD_IN_MAP, bridge, _fwd_in(bridge))
            b.add_jump_element(FWD_OUT_MAP, bridge, _fwd_out(bridge))
            b.add_jump_element(POST_IN_MAP, bridge, _post_in(bridge))
            b.add_jump_element(POST_OUT_MAP, bridge, _post_out(bridge))
            established = (("ct state", "==", ("established", "related")),)
            b.add_rule(Rule(_fwd_in(bridge), established, ACCEPT))
            b.add_rule(Rule(_fwd_in(bridge), (("iifname", "==", bridge),), ACCEPT, "ICC"))
            drop = b.add_rule(Rule(_fwd_in(bridge), (), DROP, "UNPUBLISHED PORT DROP"))
            b.add_rule(Rule(_fwd_out(bridge), established, ACCEPT))
            b.add_rule(Rule(_fwd_out(bridge), (), ACCEPT, "OUTGOING"))
            b.add_rule(Rule(_post_out(bridge), (("oifname", "!=", bridge),
                                                ("ip saddr", "==", str(subnet))),
                            MASQUERADE, "MASQUERADE"))
            if self.hairpin:
                b.add_rule(_masq_from_host(bridge))
            saved = self._set_route_localnet(bridge) if self.hairpin else None
            try:
                handles = nf.commit(b)
                checkpoint("firewall.network")
            except BaseException:
                if saved is not None:
                    self._write_sysctl(_route_localnet_path(bridge), saved)
                raise
            net = _Network(bridge, subnet, handles[drop], self.hairpin,
                           saved_route_localnet=saved)
            self._networks[bridge] = net
            if self.hairpin:
                self._brnf_acquire(("network", bridge))

    def remove_network(self, bridge: str) -> None:
        """Remove ``bridge``'s chains and map entries (and whatever is still published on it).
        Idempotent: an unknown bridge is not an error. Every publication is attempted; the
        first failure is raised once the network is gone."""
        with self._lock:
            net = self._networks.get(bridge)
            if net is None:
                return
            # Every publication gets its teardown even if one fails (moby's unmapPBs does
            # the same); the first error is raised once the network is gone too.
            first: BaseException | None = None
            for key in list(net.keys):
                try:
                    self.unpublish(key)
                except Exception as exc:    # noqa: BLE001 - re-raised below
                    first = first or exc
            b = Batch(self.table)
            # Map entries first: a chain that a verdict map still jumps to cannot go (EBUSY).
            for vmap in (FWD_IN_MAP, FWD_OUT_MAP, POST_IN_MAP, POST_OUT_MAP):
                b.del_element(vmap, bridge)
            for chain in (_fwd_in(bridge), _fwd_out(bridge), _post_in(bridge), _post_out(bridge)):
                b.del_chain(chain)              # takes its rules with it
            try:
                if self._nf is not None:
                    self._nf.commit(b)
            except NslabError as exc:
                if exc.errno != errno.ENOENT:
                    first = first or exc
            finally:
                del self._networks[bridge]
                checkpoint("firewall.network_removed")
                if net.saved_route_localnet is not None:
                    self._write_sysctl(_route_localnet_path(bridge), net.saved_route_localnet,
                                       missing_ok=True)
                self._brnf_release(("network", bridge))
            if first is not None:
                raise first

    @property
    def networks(self) -> dict[str, ipaddress.IPv4Network]:
        return {b: n.subnet for b, n in self._networks.items()}

    # --- publishing -----------------------------------------------------------------------
    def publish(self, key: str, bridge: str, container_ip, mappings: Iterable[PortMapping] | str,
                *, via: str | None = None) -> list[PortMapping]:
        """Publish ``mappings`` for the child ``key`` at ``container_ip`` on ``bridge``.

        Returns the mappings with host ports resolved (ephemeral ports and host ranges
        picked). One nfnetlink batch: all of the rules or none. An empty list still adds
        "DROP DIRECT ACCESS" for the address, as Docker does for every endpoint.

        Raises InputError (nothing changed) for a bad key, bridge, address, spec or backend;
        PortAllocatedError if a host port is taken; SpawnError if a proxy cannot start.
        """
        via = self.published_via if via is None else via
        if via not in BACKENDS:
            raise InputError("via", f"one of {', '.join(BACKENDS)}", via)
        if not isinstance(key, str) or not key:
            raise InputError("key", "a non-empty str naming the child", key)
        mappings = parse_publish(mappings)
        with self._lock:
            _ = self.nf                          # raises if closed
            if key in self._pubs:
                raise InputError("key", f"{key!r} has published ports already: unpublish it first", key)
            net = self._networks.get(bridge)
            if net is None:
                raise InputError("bridge", f"{bridge!r} is not a network of this firewall "
                                 f"(add_network first); known: {sorted(self._networks)}", bridge)
            try:
                ip = ipaddress.IPv4Address(container_ip)
            except (ValueError, TypeError):
                raise InputError("container_ip", "an IPv4 address", container_ip) from None
            if ip not in net.subnet or ip in (net.subnet.network_address, net.subnet.broadcast_address):
                raise InputError("container_ip", f"an address of {bridge}'s subnet {net.subnet}", str(ip))

            pub = Publication(key, bridge, ip, via, [])
            try:
                for m in mappings:
                    sock, resolved = self._reserve(key, m)
                    pub.sockets.append(sock)
                    pub.mappings.append(resolved)
                self._add_rules(pub, net)
                self._start_proxies(pub)
                checkpoint("firewall.proxies")
            except BaseException:
                self._discard(pub, net)
                raise
            self._pubs[key] = pub
            net.keys.add(key)
            return list(pub.mappings)

    def unpublish(self, key: str) -> None:
        """Remove exactly ``key``'s rules, proxies and held ports, and the conntrack entries
        of its UDP ports (as Docker does). Idempotent."""
        with self._lock:
            pub = self._pubs.pop(key, None)
            if pub is None:
                return
            net = self._networks.get(pub.bridge)
            if net is not None:
                net.keys.discard(key)
            self._discard(pub, net)

    def publication(self, key: str) -> Publication | None:
        return self._pubs.get(key)

    @property
    def publications(self) -> dict[str, Publication]:
        return dict(self._pubs)

    # --- the pieces of publish ------------------------------------------------------------
    def _reserve(self, key: str, m: PortMapping) -> tuple[socket.socket, PortMapping]:
        """Bind the host port (or pick one) in the host netns; the socket is the reservation."""
        ip = m.bind_ip
        if m.host_port is None:
            candidates: Iterable[int] = (0,)
        elif m.host_port_end is None:
            candidates = (m.host_port,)
        else:
            candidates = range(m.host_port, m.host_port_end + 1)
        last: PortAllocatedError | None = None
        for port in candidates:
            holder = self._internal_holder(m.proto, ip, port) if port else None
            if holder is not None:
                last = _allocated(ip, port, m.proto, f"nslab publication {holder!r}")
                continue
            try:
                sock = self._bind(m.proto, ip, port)
                checkpoint("firewall.port")
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise from_errno(exc.errno, "bind", f"{ip}:{port}/{m.proto} in netns "
                                     f"{self.ns_description}") from None
                last = _bind_in_use(ip, port, m.proto, find_port_holder(self._ns, m.proto, port))
                continue
            port = sock.getsockname()[1]
            self._ports.setdefault((m.proto, port), []).append((ip, key))
            return sock, dataclasses.replace(m, host_port=port, host_port_end=None)
        if m.host_port_end is not None:
            raise PortAllocatedError(
                f"no free host port in {ip}:{m.host_port}-{m.host_port_end}/{m.proto}: every "
                f"port of the range is published or bound already", holder=None,
                syscall="bind", obj=f"{ip}:{m.host_port}-{m.host_port_end}/{m.proto}",
                hint="free a port of the range, or publish a wider one")
        assert last is not None
        raise last

    def _internal_holder(self, proto: str, ip: str, port: int) -> str | None:
        for held_ip, key in self._ports.get((proto, port), ()):
            if "0.0.0.0" in (held_ip, ip) or held_ip == ip:
                return key
        return None

    def _bind(self, proto: str, ip: str, port: int) -> socket.socket:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        sock = socket_in(self._ns, socket.AF_INET, kind, 0)
        try:
            if proto == "tcp":
                # Lets a republish reuse a port whose old connections sit in TIME_WAIT; two
                # listeners still conflict. (For UDP it would allow double binds: not set.)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port))
            if proto == "tcp":
                sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        return sock

    def _add_rules(self, pub: Publication, net: _Network) -> None:
        b = Batch(self.table)
        indexes: list[tuple[str, int]] = []

        def add(rule: Rule, before: int | None = None) -> None:
            indexes.append((rule.chain, b.add_rule(rule, before)))

        br, cip = pub.bridge, str(pub.container_ip)
        add(Rule(RAW, (("ip daddr", "==", cip), ("iifname", "!=", br)), DROP, "DROP DIRECT ACCESS"))
        dnat = pub.via in ("docker", "nat")
        nat = pub.via == "nat"
        masq_index = None
        if nat and not net.hairpin and not net.nat_keys:
            # The first nat-backend child on a proxy-mode bridge brings the network-level
            # hairpin piece; it belongs to the network, and goes with its last nat user.
            masq_index = b.add_rule(_masq_from_host(br))
        accepted: set[tuple[str, int]] = set()
        for m in pub.mappings:
            dport = f"{m.proto} dport"
            loopback = m.host_ip is not None and m.host_ip.is_loopback
            if dnat and (m.proto, m.container_port) not in accepted:
                accepted.add((m.proto, m.container_port))
                add(Rule(_fwd_in(br), (("ip daddr", "==", cip), (dport, "==", m.container_port)),
                         ACCEPT), before=net.drop_handle)
            if dnat:
                match: tuple = ()
                if not nat:
                    match += (("iifname", "!=", br),)       # same-bridge hairpin: the proxy's job
                if m.host_ip is not None:
                    match += (("ip daddr", "==", str(m.host_ip)),)
                skip = False
                if not nat and self.hairpin:
                    # A proxy-backed child in a hairpin table: keep 127/8 for its proxy.
                    if loopback:
                        skip = True
                    elif m.host_ip is None:
                        match += (("ip daddr", "!=", LOOPBACK),)
                if not skip:
                    add(Rule(NAT, match + ((dport, "==", m.host_port),),
                             Dnat(cip, m.container_port), "DNAT"))
                if nat and not self.hairpin and (m.host_ip is None or loopback):
                    # A nat-backend child in a proxy-mode table: nat-OUTPUT skips 127/8, so
                    # DNAT the host's loopback traffic to this port here.
                    dst = str(m.host_ip) if loopback else LOOPBACK
                    add(Rule(OUTPUT, (("ip daddr", "==", dst), (dport, "==", m.host_port)),
                             Dnat(cip, m.container_port), "DNAT"))
            if nat:
                add(Rule(_post_in(br), (("ip saddr", "==", cip), ("ip daddr", "==", cip),
                                        (dport, "==", m.container_port)),
                         MASQUERADE, "MASQ TO OWN PORT"))
            if loopback:
                add(Rule(RAW, (("iifname", "!=", "lo"), ("ip daddr", "==", str(m.host_ip)),
                               (dport, "==", m.host_port)), DROP, "DROP REMOTE LOOPBACK"))
        handles = self.nf.commit(b)
        checkpoint("firewall.rules")
        pub.rules = [(chain, handles[i]) for chain, i in indexes]
        if nat:
            # A nat user before the sysctl write: if it fails, _discard takes this batch's
            # "MASQUERADE FROM HOST" out again (else it stays, and the next one adds another).
            net.nat_keys.add(pub.key)
            if masq_index is not None:
                net.hairpin_handle = handles[masq_index]
                net.saved_route_localnet = self._set_route_localnet(br)
            self._brnf_acquire(("publication", pub.key))

    def _start_proxies(self, pub: Publication) -> None:
        if pub.via not in ("docker", "proxy"):
            return
        # Start them all, then wait for all: one interpreter start-up (~30 ms), not n.
        for sock, m in zip(pub.sockets, pub.mappings):
            target = (str(pub.container_ip), m.container_port)
            pub.proxies.append(UserlandProxy.start(self._ns, sock, m.proto, target, wait=False))
        for proxy in pub.proxies:
            proxy.wait_ready()
        # The proxies serve the listening sockets now; nslab keeps its copy as the
        # reservation (closing it would not free the port while a proxy lives anyway).

    def _discard(self, pub: Publication, net: _Network | None) -> None:
        """Undo whatever part of ``pub`` exists: proxies, rules, ports. Best effort, in full."""
        error: BaseException | None = None
        for proxy in pub.proxies:
            proxy.close()
        pub.proxies.clear()
        was_nat_user = net is not None and pub.key in net.nat_keys
        last_nat_user = was_nat_user and not (net.nat_keys - {pub.key}) and not net.hairpin
        if (pub.rules or last_nat_user) and self._nf is not None:
            b = Batch(self.table)
            for chain, handle in pub.rules:
                b.del_rule(chain, handle)
            if last_nat_user and net.hairpin_handle is not None:
                b.del_rule(_post_in(net.bridge), net.hairpin_handle)
            try:
                self._nf.commit(b)
                checkpoint("firewall.rules_removed")
            except NslabError as exc:
                if exc.errno != errno.ENOENT:
                    error = exc
                else:
                    # Someone removed one of them already: the batch failed as a whole, so
                    # delete the rest one by one (idempotent teardown, CNI DEL style).
                    for req in b.requests:
                        single = Batch(self.table)
                        single.requests.append(req)
                        try:
                            self._nf.commit(single)
                        except NslabError as exc2:
                            if exc2.errno != errno.ENOENT:
                                error = exc2
        pub.rules.clear()
        try:
            self._flush_udp_conntrack(pub)
        except OSError as exc:                # NslabError included: finish the teardown first
            error = error or exc
        if was_nat_user:
            net.nat_keys.discard(pub.key)
            if not net.nat_keys and not net.hairpin:
                net.hairpin_handle = None
                if net.saved_route_localnet is not None:
                    self._write_sysctl(_route_localnet_path(net.bridge), net.saved_route_localnet,
                                       missing_ok=True)
                    net.saved_route_localnet = None
            self._brnf_release(("publication", pub.key))
        for sock, m in zip(pub.sockets, pub.mappings):
            held = self._ports.get((m.proto, m.host_port), [])
            if (m.bind_ip, pub.key) in held:
                held.remove((m.bind_ip, pub.key))
            if not held:
                self._ports.pop((m.proto, m.host_port), None)
        for sock in pub.sockets:
            sock.close()
        pub.sockets.clear()
        if error is not None:
            raise error

    def _flush_udp_conntrack(self, pub: Publication) -> None:
        """Delete the conntrack entries of ``pub``'s UDP ports, as Docker does when port
        bindings go (moby clearConntrackEntries -> DeleteConntrackEntriesByPort): with the
        rules gone, an entry DNATed earlier would still steer a client that keeps sending
        to the old container (nslab._conntrack says why). Only entries whose original
        destination is the mapping's host port (and host IP, when bound to one): nothing of
        another mapping or protocol. Called once the rules are gone, so the client's next
        datagram makes a fresh entry under the rules of the moment."""
        udp = [m for m in pub.mappings if m.proto == "udp" and m.host_port]
        if not udp or self._nf is None:
            return
        try:
            sock = socket_in(self._ns, proto=NETLINK_NETFILTER)
        except OSError as exc:
            raise from_errno(exc.errno or errno.EIO, "socket(AF_NETLINK, NETLINK_NETFILTER)",
                             f"netns {self.ns_description}") from None
        with Conntrack(sock, f"netns {self.ns_description}") as ct:
            for m in udp:
                dst = None if m.bind_ip == "0.0.0.0" else m.bind_ip
                ct.delete(ct.entries(proto="udp", dport=m.host_port, dst=dst))
                checkpoint("firewall.conntrack_flushed")

    # --- sysctls for the nat backend (host netns only) ------------------------------------
    def _read_sysctl(self, path: str) -> str:
        return read_sysctl_path(self._ns, path)

    def _write_sysctl(self, path: str, value: str, missing_ok: bool = False) -> None:
        write_sysctl_path(self._ns, path, value, missing_ok)

    def _set_route_localnet(self, bridge: str) -> str:
        """route_localnet=1 on the bridge: DNATed 127.0.0.1 traffic may be routed out of it."""
        path = _route_localnet_path(bridge)
        saved = self._read_sysctl(path)
        self._write_sysctl(path, "1")
        return saved

    def _brnf_acquire(self, user: tuple[str, str]) -> None:
        """bridge-nf-call-iptables=1 while any nat-backend publication or network needs it:
        replies between two children of one bridge are bridged, and only br_netfilter makes
        them cross conntrack to be un-DNATed (dockerd sets it when the proxy is off)."""
        if not self._brnf_users:
            path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
            try:
                self._saved_brnf = self._read_sysctl(path)
                self._write_sysctl(path, "1")
            except NslabError:
                self._saved_brnf = None       # no br_netfilter: hairpin between siblings fails
        self._brnf_users.add(user)

    def _brnf_release(self, user: tuple[str, str]) -> None:
        if user not in self._brnf_users:
            return
        self._brnf_users.discard(user)
        if not self._brnf_users and self._saved_brnf is not None:
            self._write_sysctl("/proc/sys/net/bridge/bridge-nf-call-iptables", self._saved_brnf,
                               missing_ok=True)
            self._saved_brnf = None

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Unpublish everything, remove the networks and the table. Idempotent. Every step
        is attempted; the first failure is raised once the table and socket are gone."""
        with self._lock:
            if self._nf is None:
                return
            # Attempt every step even if one fails: a failed unpublish must not leave the
            # later publications' proxies and ports behind. The first error is raised last.
            first: BaseException | None = None
            try:
                for key in list(self._pubs):
                    try:
                        self.unpublish(key)
                    except Exception as exc:    # noqa: BLE001 - re-raised below
                        first = first or exc
                for bridge in list(self._networks):
                    try:
                        self.remove_network(bridge)
                    except Exception as exc:    # noqa: BLE001 - re-raised below
                        first = first or exc
                b = Batch(self.table)
                b.del_table()
                try:
                    self._nf.commit(b)
                except NslabError as exc:
                    if exc.errno != errno.ENOENT:
                        first = first or exc
            finally:
                self._release()
                checkpoint("firewall.closed")
            if first is not None:
                raise first

    def _release(self) -> None:
        nf, self._nf = self._nf, None
        if nf is not None:
            nf.close()
        self._ns.close()

    @property
    def closed(self) -> bool:
        return self._nf is None

    def __enter__(self) -> "Firewall":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._nf is None:
            return f"<Firewall table ip {self.table} in {self.ns_description}: closed>"
        return (f"<Firewall table ip {self.table} in {self.ns_description} via "
                f"{self.published_via}{' (owner)' if self.owner else ''}: "
                f"{len(self._networks)} networks, {len(self._pubs)} publications>")


# --- helpers ----------------------------------------------------------------------------------
def _masq_from_host(bridge: str) -> Rule:
    return Rule(_post_in(bridge), (("fib saddr type", "==", "local"),), MASQUERADE,
                "MASQUERADE FROM HOST")


def _route_localnet_path(bridge: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet"


def _check_ifname(name: object, field: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name.encode()) <= 15 or _IFNAME_BAD.search(name) \
            or name in (".", ".."):
        raise InputError(field, "an interface name: 1-15 bytes, no whitespace, '/' or ':'", name)
    return name


def _allocated(ip: str, port: int, proto: str, holder: str | None) -> PortAllocatedError:
    # Another nslab publication has it: the words of Docker's allocator (portallocator.go
    # alreadyAllocatedErr), then who holds it (Docker cannot say; nslab can).
    return PortAllocatedError(f"Bind for {ip}:{port} failed: port is already allocated",
                              holder=holder, syscall="bind", obj=f"{ip}:{port}/{proto}",
                              hint=f"held by {holder}" if holder else None)


def _bind_in_use(ip: str, port: int, proto: str, holder: str | None) -> PortAllocatedError:
    # Another process has it: bind(2) said EADDRINUSE. Moby's shape for that failure, not
    # its allocator's words (those are for its own publications only).
    return PortAllocatedError(f"failed to bind host port {ip}:{port}/{proto}: address already "
                              f"in use", holder=holder, syscall="bind", obj=f"{ip}:{port}/{proto}",
                              hint=f"held by {holder}: stop it or publish another host port"
                              if holder else "stop whatever holds it or publish another host port")


def find_port_holder(ns: Namespace, proto: str, port: int) -> str | None:
    """Who holds ``port``/``proto`` in ``ns``: "pid N (cmdline)" or None if unknown.

    Reads the namespace's socket tables (``/proc/thread-self/net/{tcp,tcp6}`` from a thread
    inside it: psutil would read the caller's netns, psutil#1611), then matches the socket
    inodes against ``/proc/*/fd``. A bound but not listening TCP socket is in no table.
    """
    tables = ("tcp", "tcp6") if proto == "tcp" else ("udp", "udp6")

    def inodes() -> set[int]:
        found: set[int] = set()
        for name in tables:
            try:
                with open(f"/proc/thread-self/net/{name}") as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        local, state, inode = fields[1], fields[3], int(fields[9])
                        if int(local.rsplit(":", 1)[1], 16) != port or inode == 0:
                            continue
                        if proto == "tcp" and state != "0A":       # LISTEN only
                            continue
                        found.add(inode)
            except FileNotFoundError:
                continue
        return found

    wanted = {f"socket:[{i}]" for i in ns.call(inodes)}
    if not wanted:
        return None
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    return f"pid {pid} ({_cmdline(pid)})"
            except OSError:
                continue
    return "a socket no visible process holds"


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


def delete_table(host_ns: Namespace, table: str = "nslab") -> bool:
    """Delete a leftover nslab table (one made with ``owner=False``): the firewall's ``gc``.
    True if it was there. An owned table needs no gc: it dies with its process."""
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise InputError("table", "an nft table name", table)
    nf = Netfilter(socket_in(host_ns, proto=NETLINK_NETFILTER), f"netns {host_ns.description}")
    try:
        b = Batch(table)
        b.del_table()
        nf.commit(b)
        return True
    except NslabError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    finally:
        nf.close()

"""Bridge networks, wired the way Docker's bridge driver wires them.

Per network (Docker: daemon start-up or ``docker network create``): a Linux bridge with a
random MAC, ``accept_ra=0``, the gateway address (``.1`` of the subnet), up. The subnet is
the first of Docker's pools that overlaps none of the host's routes or nameservers (so it
never collides with a running ``docker0``), or one the user gives.

Per container (Docker: ``docker run --network bridge``)::

    host netns:       bridge nslab0 ── veth1a2b3c4 (master nslab0, up, mtu 1500)
                                            │  one veth pair; the peer is *born* inside
    container netns:                       eth0 (172.17.0.2/16, up, mtu 1500), lo up,
                                           default via 172.17.0.1,
                                           ip_unprivileged_port_start=0, ping_group_range

The peer is created directly in the container's namespace, never moved there afterwards:
moving a link costs an RCU grace period under RTNL and flushes its state (kernel-notes).
Inside the container, the work is done by the container's own process while nslab's C
trampoline holds it before exec (:mod:`nslab.child_setup`): its sysctls and ``lo`` while the
parent makes the veth, then eth0 as one batch of rtnetlink requests in one ``sendmsg``.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import re
import secrets
import threading
from typing import TYPE_CHECKING, Callable

from . import ipam as _ipam
from ._names import check_name
from ._netlink import GONE, address_add, default_route_add, link_up
from .child_setup import ChildSetup
from .errors import InputError, NslabError
from .hosts import Host, write_sysctl
from .namespaces import Namespace
from ._faults import checkpoint

if TYPE_CHECKING:
    from .process import Child

__all__ = ["BridgeNetwork", "Endpoint", "check_network_name", "DEFAULT_BRIDGE", "CONTAINER_MTU",
           "CONTAINER_SYSCTLS", "container_setup", "eth0_setup", "wire_none"]

DEFAULT_BRIDGE = "nslab0"          # Docker's is docker0: a different name never collides with it
CONTAINER_MTU = 1500


def _ping_group_range() -> str:
    """Docker allows every group to ping (``0 2147483647``). Inside a user namespace the
    kernel takes only mapped gids (EINVAL otherwise), so there it is the mapped range, as
    rootless Docker (RootlessKit) does."""
    try:
        with open("/proc/self/gid_map") as f:
            spans = [tuple(map(int, line.split())) for line in f if line.strip()]
    except OSError:
        spans = []
    if not spans or spans == [(0, 0, 4294967295)]:
        return "0 2147483647"
    top = max(inside + count - 1 for inside, _, count in spans)
    return f"0 {min(top, 2147483647)}"


# What Docker sets inside every *private* netns it creates (docker-behaviors.md, bridge #4).
CONTAINER_SYSCTLS = {
    "net/ipv4/ip_unprivileged_port_start": "0",
    "net/ipv4/ping_group_range": _ping_group_range(),
}
MAX_IFNAME = 15                    # IFNAMSIZ - 1
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def check_network_name(name: object, field: str = "network name") -> str:
    """Docker's network-name rule, plus a length limit; nothing a shell could misread."""
    check_name(name, field)
    if name in ("host", "none") or name.startswith("container:"):
        raise InputError(field, f"{name!r} is a network mode, not a network name", name)
    return name


def check_ifname(name: object, field: str = "bridge name") -> str:
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name):
        raise InputError(field, f"an interface name is 1-{MAX_IFNAME} bytes of letters, digits, "
                                "'_', '.' or '-' (the kernel would take more: a shell would misread them)",
                         name)
    return name


@dataclasses.dataclass
class Endpoint:
    """One container's attachment to a bridge network (Docker: an endpoint)."""

    network: str
    host_ifname: str          # veth + 7 hex, enslaved to the bridge, in the host netns
    ifname: str               # eth0, inside the container netns
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    netns_identity: tuple[int, int]
    owner: str

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.address.ip

    def to_dict(self) -> dict:
        return {"network": self.network, "host_ifname": self.host_ifname, "ifname": self.ifname,
                "address": str(self.address), "gateway": str(self.gateway), "owner": self.owner}


class BridgeNetwork:
    """A bridge, its subnet and its IPAM, in one host namespace. Close to remove the bridge."""

    def __init__(self, host: Host, name: str, *, subnet=None, bridge: str | None = None,
                 tag: str = "nslab", gratuitous_arp: bool = True):
        """``tag`` goes into the bridge's alias (``tag:name``) so it can be found by identity.

        ``gratuitous_arp``: announce each new container's address (Docker 28+), so a reused
        address is reachable at once. The announcement is broadcast to every port of the
        bridge, which makes each spawn O(ports) in the kernel: turn it off for labs of
        hundreds of containers (benchmarks/RESULTS.md has both figures)."""
        self.gratuitous_arp = bool(gratuitous_arp)
        self.name = check_network_name(name)
        self.bridge = check_ifname(bridge) if bridge else "br-" + secrets.token_hex(6)
        # Docker skips pools overlapping the host's on-link routes and its nameservers, so a
        # network never collides with a running docker0 (moby InferReservedNetworks).
        avoid = _ipam.host_avoid_list(host.rtnl.routes(), _ipam.read_nameservers())
        if subnet is not None:
            _ipam.validate_subnet(subnet, "subnet", avoid=avoid)   # InputError before any change
        # Choice and creation under one directory-wide lock: process-safe on a shared state dir.
        # Recorded before the IPAM state exists (write-ahead): a crash right after for_network
        # must leave gc something to find.
        self._ipam_key = host.remember("ipam", state_dir=host.state_dir, network=self.name)
        try:
            self.ipam = _ipam.Ipam.for_network(host.state_dir, self.name, avoid=avoid, subnet=subnet)
        except BaseException:
            host.forget(self._ipam_key)
            raise
        checkpoint("network.ipam")
        self.subnet = self.ipam.subnet
        self.gateway = self.ipam.gateway
        self.host = host
        self._closed = False
        self._lock = threading.Lock()
        self.endpoints: dict[str, Endpoint] = {}
        self._reserved: dict[str, ipaddress.IPv4Address] = {}   # owner -> address, not attached yet
        self._veth_keys: dict[str, str | None] = {}
        try:
            self.index = self._create_bridge(tag)
        except BaseException:
            self._drop_ipam_state()
            raise

    def _create_bridge(self, tag: str) -> int:
        rtnl = self.host.rtnl
        mac = _random_mac()
        alias = f"{tag}:{self.name}"
        self._record_key = self.host.remember("link", ifname=self.bridge, alias=alias, address=mac)
        try:
            rtnl.request("link", "add", ifname=self.bridge, kind="bridge", address=mac,
                         obj=f"bridge {self.bridge}")
        except BaseException:
            self.host.forget(self._record_key)      # not made (EEXIST: someone else's name)
            raise
        checkpoint("network.bridge")
        try:
            index = rtnl.link_index(self.bridge)
            # The alias tags the bridge as nslab's, so gc finds it by tag rather than by name.
            rtnl.request("link", "set", index=index, ifalias=alias, obj=f"bridge {self.bridge}")
            checkpoint("network.alias")
            try:
                write_sysctl(self.host.netns, f"net.ipv6.conf.{self.bridge}.accept_ra", "0")
                checkpoint("network.accept_ra")
            except NslabError as exc:
                if exc.errno != errno.ENOENT:   # IPv6 disabled: nothing to turn off
                    raise
            rtnl.request("addr", "add", index=index, address=str(self.gateway),
                         prefixlen=self.subnet.prefixlen, broadcast=str(self.subnet.broadcast_address),
                         obj=f"gateway {self.gateway} on {self.bridge}")
            checkpoint("network.gateway")
            rtnl.set_up(index, self.bridge)
            checkpoint("network.up")
        except BaseException:
            rtnl.delete_link(ifname=self.bridge)
            self.host.forget(self._record_key)
            raise
        return index

    # --- containers -------------------------------------------------------------------
    def attach(self, netns: Namespace, owner: str, *, address=None, hairpin: bool = False,
               alongside: "Callable[[ipaddress.IPv4Address], object] | None" = None,
               child: "Child | None" = None) -> Endpoint:
        """Wire ``netns`` to this bridge as Docker wires a container; undo with detach().

        ``child``: a child parked in ``Child.spawn`` inside ``netns`` that was started with
        :func:`container_setup` (Docker's sysctls and ``lo``, done by the child while this
        thread allocates the address and makes the veth). It is then sent eth0's setup and
        does it in parallel with ``alongside``; a failure surfaces when it is released.
        Without one, a thread in ``netns`` does both halves.
        ``hairpin``: the bridge port may send a frame back out where it came from — what
        Docker sets on every port when its userland proxy is off, so a container reaches its
        own published port through the host address (hairpin NAT).
        ``alongside(address)`` runs in the calling thread while the container side is being
        configured (the firewall's batch overlaps it). If it raises, the attachment is undone
        and its error propagates.
        """
        if self._closed:
            raise NslabError(errno.EBADF, f"network {self.name} is closed")
        with self._lock:
            ip = self._reserved.pop(owner, None)
        if ip is None:
            ip = self.reserve(owner, address)
        interface = ipaddress.IPv4Interface(f"{ip}/{self.subnet.prefixlen}")
        host_ifname = None
        try:
            host_ifname, eth0_index = self._create_veth(netns)
            eth0 = eth0_setup(eth0_index, interface, self.gateway, announce=self.gratuitous_arp)
            if child is not None:
                child.configure(eth0)
                configured = None
            else:
                configured = netns.call_async((container_setup() + eth0).run_here, netns.description)
            try:
                if hairpin:
                    rtnl = self.host.rtnl
                    rtnl.request("brport", "set", index=rtnl.link_index(host_ifname), mode=1,
                                 obj=f"hairpin mode on bridge port {host_ifname}")
                if alongside is not None:
                    alongside(ip)
            finally:
                if configured is not None:
                    configured()
                checkpoint("endpoint.inside")
        except BaseException:
            try:
                if host_ifname:
                    try:
                        self.host.rtnl.delete_link(ifname=host_ifname)
                    finally:
                        self.host.forget(self._veth_keys.pop(host_ifname, None))
            finally:
                self.ipam.release(ip)        # even if the veth could not be deleted
            raise
        endpoint = Endpoint(self.name, host_ifname, "eth0", interface, self.gateway, netns.identity, owner)
        with self._lock:
            self.endpoints[owner] = endpoint
        return endpoint

    def _drop_ipam_state(self) -> None:
        """Remove this network's IPAM state — unless it is shared: on a host several labs use
        (one state directory), a network of the same name is one IPAM, and another live lab
        may hold addresses in it or have it open. Asked under the IPAM locks (Ipam.remove)."""
        record = self.host.record
        key = (os.path.abspath(self.host.state_dir), self.name)

        def others_use_it() -> bool:
            if record is None or not self.host.outlives_lab:
                return False
            from .records import live_ipam_networks
            return key in live_ipam_networks(record.dir, exclude=record.path)
        self.ipam.close()
        try:
            _ipam.Ipam.remove(self.host.state_dir, self.name, only_if_unused=True, wanted=others_use_it)
        finally:
            self.host.forget(self._ipam_key)

    def reserve(self, owner: str, address=None) -> ipaddress.IPv4Address:
        """Allocate ``owner``'s address ahead of :meth:`attach` (which then uses it), so the
        firewall can be programmed while the container's netns is still being made.
        :meth:`detach` releases it, attached or not."""
        if self._closed:
            raise NslabError(errno.EBADF, f"network {self.name} is closed")
        ip = self.ipam.allocate(owner, address)
        checkpoint("endpoint.address")
        with self._lock:
            self._reserved[owner] = ip
        return ip

    def _create_veth(self, netns: Namespace) -> tuple[str, int]:
        """The veth pair, host side enslaved and up, eth0 born in ``netns``: (host name, eth0's index)."""
        for _ in range(8):
            # Docker's naming: veth + 7 hex characters; a clash just means another draw.
            name = "veth" + secrets.token_hex(4)[:7]
            key = self.host.remember("link", ifname=name, master=self.bridge)
            try:
                eth0_index = self.host.rtnl.add_veth(
                    name, master=self.index, mtu=CONTAINER_MTU, peer_ifname="eth0", peer_netns=netns,
                    obj=f"veth {name} (peer eth0 in {netns.description})")
                self._veth_keys[name] = key
                checkpoint("endpoint.veth")
                return name, eth0_index
            except NslabError as exc:
                self.host.forget(key)
                if exc.errno == errno.EXFULL:
                    raise _bridge_full(self) from None
                if exc.errno != errno.EEXIST:
                    raise
        raise NslabError(errno.EEXIST, f"could not find a free veth name on {self.bridge}")

    def detach(self, owner: str) -> None:
        """Remove a container's veth (its peer goes with it) and release its address. Idempotent."""
        with self._lock:
            endpoint = self.endpoints.pop(owner, None)
            reserved = self._reserved.pop(owner, None)
        if endpoint is None:
            if reserved is not None and not self.ipam.closed:   # closed: its state is gone already
                self.ipam.release(reserved)
                checkpoint("endpoint.released")
            return
        try:
            link = self.host.rtnl.link(ifname=endpoint.host_ifname)
            # By identity: only the veth we named *and* enslaved to our bridge.
            if link is not None and link.get_attr("IFLA_MASTER") in (self.index, None):
                self.host.rtnl.request("link", "del", index=link["index"], obj=f"veth {endpoint.host_ifname}",
                                       ignore=GONE)
                checkpoint("endpoint.veth_deleted")
            self.host.forget(self._veth_keys.pop(endpoint.host_ifname, None))
        finally:
            if not self.ipam.closed:          # closed with the network: its state is gone already
                self.ipam.release(endpoint.ip)
            checkpoint("endpoint.released")

    # --- ownership ----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach every endpoint, delete the bridge, drop the IPAM state. Idempotent (one
        caller tears down, even from several threads)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[BaseException] = []
        try:
            # Every endpoint, even after one failed: each one left is a veth on the machine.
            for owner in list(self.endpoints) + list(self._reserved):
                try:
                    self.detach(owner)
                except BaseException as exc:  # noqa: BLE001 - reported after the rest
                    errors.append(exc)
        finally:
            try:
                # The bridge goes whatever happened above (its veths go with it).
                if not self.host.rtnl.closed:
                    self.host.rtnl.request("link", "del", index=self.index, obj=f"bridge {self.bridge}",
                                           ignore=GONE)
                    checkpoint("network.bridge_deleted")
                self.host.forget(self._record_key)
            finally:
                self._drop_ipam_state()
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.endpoints)} endpoints"
        return f"<BridgeNetwork {self.name} {self.bridge} {self.subnet} gw {self.gateway}: {state}>"


def container_setup() -> ChildSetup:
    """What Docker sets up inside every *private* netns it creates (bridge and none modes):
    its sysctls (docker-behaviors.md, bridge #4) and ``lo`` up. Run by the child itself
    (``Child.spawn(setup=...)``) or by :meth:`ChildSetup.run_here` on a thread inside."""
    setup = ChildSetup()
    for name, value in CONTAINER_SYSCTLS.items():
        setup.write_sysctl(name, value)
    # Looked up now, while the parent makes the veth: eth0's settings go under these later.
    # (The trampoline writes through a procfs instance of the child's own, where lookups are
    # cheap anyway; this matters where it cannot make one, in a rootless lab: spawn.c.)
    setup.warm_sysctl("net/ipv4/conf").warm_sysctl("net/ipv6/conf")
    return setup.netlink([link_up("lo")], "the container netns")


def eth0_setup(index: int, interface: ipaddress.IPv4Interface, gateway: ipaddress.IPv4Address, *,
               announce: bool) -> ChildSetup:
    """The container side of a bridge endpoint once eth0 (ifindex ``index``) exists."""
    setup = ChildSetup()
    # eth0's MAC is random (as Docker 28+), so an address reused after a container went
    # away comes back with a new MAC, and the host and the other containers would keep
    # sending to the old one for seconds. Docker 28 sends a gratuitous ARP; the kernel
    # does it for us when eth0 comes up with its address already on it (arp_notify), which
    # costs nothing, where an AF_PACKET socket's close waits an RCU grace period (~12 ms).
    if announce:
        setup.write_sysctl("net/ipv4/conf/eth0/arp_notify", "1")
    # Docker 26+ disables IPv6 on a container's interface in an IPv4-only network
    # (moby#47963). Before eth0 comes up, so it never floods link-local DAD, router
    # solicitations and MLD reports to every port of the bridge. (No IPv6 in the kernel:
    # nothing to disable.)
    setup.write_sysctl("net/ipv6/conf/eth0/disable_ipv6", "1", optional=True)
    return setup.netlink([address_add(index, interface, "eth0"), link_up("eth0"),
                          default_route_add(gateway, index)], "the container netns")


def wire_none(netns: Namespace) -> None:
    """``--network none`` for a netns no parked child of ours is in: Docker's sysctls, lo up."""
    netns.call(container_setup().run_here, netns.description)


def _random_mac() -> str:
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFE) | 0x02     # unicast, locally administered
    return ":".join(f"{b:02x}" for b in octets)


def _bridge_full(net: BridgeNetwork) -> NslabError:
    from .errors import ResourceExhaustedError
    return ResourceExhaustedError(
        errno.EXFULL, f"bridge {net.bridge} of network {net.name} is full: a Linux bridge holds at most "
        "1024 ports (BR_MAX_PORTS)", syscall="netlink add link", obj=net.bridge,
        hint="spread containers over several networks (lab.network(name)), as Docker users must")

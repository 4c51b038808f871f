"""Hosts: the network namespace that plays "the Docker host".

A :class:`SandboxHost` (the default) is a throwaway network namespace with ``lo`` up and an
uplink veth to a second namespace that plays the outside world (another machine, the
internet) — the CNI/netavark test pattern. Everything nslab does lands inside it, so the
real machine's links, routes, firewall and sysctls are never touched, and when the last
handle closes (or the controller dies) the kernel removes the lot::

      outside netns                    sandbox host netns
    ┌───────────────────┐          ┌──────────────────────────────┐
    │ eth0 198.51.100.1 ├──veth────┤ eth0 198.51.100.2            │
    └───────────────────┘          │ nslab0 172.17.0.1/16 ─ veth… │── children
                                   └──────────────────────────────┘

A :class:`CurrentHost` is the caller's own network namespace, opt-in, for engineers on a
throwaway VM who want the real thing. There nslab creates only objects it names and owns,
and restores every sysctl it changed when it closes.

The host reference is the *calling thread's* namespace when the host object is made —
never ``/proc/1``, which on many machines belongs to a supervisor (kernel-notes).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import secrets
import tempfile
import threading
from typing import Callable, TypeVar

from ._netlink import Rtnl
from .errors import InputError, NslabError, from_errno
from .namespaces import Namespace
from ._faults import checkpoint

__all__ = ["Host", "SandboxHost", "CurrentHost", "ExistingHost", "state_root", "read_sysctl", "write_sysctl"]

T = TypeVar("T")

# TEST-NET-2 (RFC 5737): documentation addresses, never routed on a real network.
OUTSIDE_SUBNET = ipaddress.IPv4Network("198.51.100.0/24")
OUTSIDE_ADDRESS = ipaddress.IPv4Interface("198.51.100.1/24")
UPLINK_ADDRESS = ipaddress.IPv4Interface("198.51.100.2/24")


def scratch_root() -> str:
    """Where a sandbox keeps its private state (IPAM files): tmpfs when there is one, since
    an allocation costs ~40 us there and ~250 us on ext4 (measured), inside a 3 ms spawn."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return os.path.join("/dev/shm", f"nslab-{os.getuid()}")
    return state_root()


def state_root() -> str:
    """Where nslab keeps records: /run/nslab as root, else the user's runtime dir. (By what
    is writable, not by euid: inside a user namespace euid is 0 but /run is not ours.)"""
    if os.geteuid() == 0 and (os.access("/run/nslab", os.W_OK) or os.access("/run", os.W_OK)):
        return "/run/nslab"
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return os.path.join(base, f"nslab-{os.getuid()}")


_SYSCTL_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def _sysctl_path(name: object) -> str:
    """``net.ipv4.ip_forward`` -> ``/proc/sys/net/ipv4/ip_forward``; anything that could
    walk elsewhere (``..``, ``/``, NUL, empty parts) is an InputError."""
    if not isinstance(name, str) or not name or len(name) > 255 \
            or not all(_SYSCTL_PART.fullmatch(part) for part in name.split(".")):
        raise InputError("sysctl", "expected a dotted name like net.ipv4.ip_forward "
                         "(letters, digits, '_' and '-' between the dots)", name)
    return "/proc/sys/" + name.replace(".", "/")


def read_sysctl(ns: Namespace, name: str) -> str:
    """Read a sysctl as seen from inside ``ns`` (net.* sysctls are per network namespace)."""
    return read_sysctl_path(ns, _sysctl_path(name))


def write_sysctl(ns: Namespace, name: str, value: str) -> None:
    write_sysctl_path(ns, _sysctl_path(name), str(value))


def read_sysctl_path(ns: Namespace, path: str) -> str:
    """Read ``/proc/sys/...`` inside ``ns``. By path, for names a dotted form cannot spell
    (an interface name with a dot in it)."""
    def read() -> str:
        with open(path) as f:
            return f.read().strip()
    try:
        return ns.call(read)
    except OSError as exc:
        raise from_errno(exc.errno or errno.EIO, "read sysctl", f"{path} in {ns.description}") from None


def write_sysctl_path(ns: Namespace, path: str, value: str, missing_ok: bool = False) -> None:
    """Write ``/proc/sys/...`` inside ``ns``; ``missing_ok``: a sysctl that is gone (its
    interface was deleted) is not an error."""
    def write() -> None:
        with open(path, "w") as f:
            f.write(value)
    try:
        ns.call(write)
    except FileNotFoundError:
        if not missing_ok:
            raise from_errno(errno.ENOENT, "write sysctl", f"{path}={value} in {ns.description}") from None
    except OSError as exc:
        raise from_errno(exc.errno or errno.EIO, "write sysctl", f"{path}={value} in {ns.description}") from None


class Host:
    """What the Lab needs of a host: its netns, an rtnetlink session, a state directory,
    and sysctl changes that are undone on close where the host outlives nslab."""

    kind = "host"

    def __init__(self, netns: Namespace, state_dir: str, *, restore_sysctls: bool):
        self.netns = netns
        self.state_dir = state_dir
        self._restore_sysctls = restore_sysctls
        self._saved_sysctls: dict[str, str] = {}
        # Leases (sysctl_leases) are held by a record of the host's own, not its lab's: a
        # host a caller passes to several labs in turn holds them across all of them.
        self._lease_record = None
        self._lease_netns: str | None = None
        self._sysctl_keys: dict[str, str] = {}
        self._lock = threading.Lock()
        self.rtnl = Rtnl(netns)
        self.record = None          # a records.LabRecord, attached by the Lab
        self._closed = False

    # --- crash safety -------------------------------------------------------------------
    # Objects in a namespace that outlives the lab (the current host) are written down
    # before they are created, so `nslab gc` can remove them after a SIGKILL. In a sandbox
    # the kernel removes them with the namespace, so nothing is written.
    outlives_lab = False

    def remember(self, kind: str, **identity) -> str | None:
        if self.outlives_lab and self.record is not None:
            return self.record.add(kind, **identity)
        return None

    def forget(self, key: str | None) -> None:
        if key is not None and self.record is not None:
            self.record.forget(key)

    # --- running things inside the host's namespace --------------------------------------
    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn`` on a throwaway thread inside the host's network namespace."""
        return self.netns.call(fn, *args, **kwargs)

    def sysctl(self, name: str) -> str:
        return read_sysctl(self.netns, name)

    def set_sysctl(self, name: str, value: str) -> None:
        """Set a sysctl in the host's namespace; the first old value is kept for restore().

        On a host that outlives nslab the change is a lease shared with every other lab on
        it (:mod:`nslab.sysctl_leases`): the last one to leave restores the old value. The
        host holds it (by a record of its own), so it lasts as long as the host, across
        every lab the host is passed to."""
        value = str(value)
        with self._lock:
            if not self._restore_sysctls:
                if read_sysctl(self.netns, name) != value:
                    write_sysctl(self.netns, name, value)
                    checkpoint("host.sysctl")
                return
            if name in self._saved_sysctls:
                return
            from . import sysctl_leases
            record = self._leases()
            # Written down first: a crash between the lease and the record must leave gc a
            # way to release it (releasing a lease we never took is a no-op).
            key = record.add("sysctl", name=name, lease_dir=self.state_dir, lease_netns=self._lease_netns,
                             holder=record.lab_id)
            try:
                old = sysctl_leases.acquire(self.netns, self.state_dir, self._lease_netns, name, value,
                                            record.lab_id)
            except BaseException:
                record.forget(key)
                raise
            if old is None:
                record.forget(key)
                return
            self._saved_sysctls[name] = old
            self._sysctl_keys[name] = key
            checkpoint("host.sysctl")

    def restore_sysctl(self, name: str) -> None:
        with self._lock:
            if name not in self._saved_sysctls:
                return
            from . import sysctl_leases
            record = self._lease_record
            sysctl_leases.release(self.netns, self.state_dir, self._lease_netns, name, record.lab_id)
            checkpoint("host.sysctl_restored")
            del self._saved_sysctls[name]
            record.forget(self._sysctl_keys.pop(name))

    def _leases(self):
        """The record this host holds its sysctl leases by (gc releases them if we die):
        made on first use, next to its lab's records, and closed with the host."""
        if self._lease_record is None:
            from .records import LabRecord
            from .sysctl_leases import netns_key
            self._lease_netns = netns_key(self.netns)
            record = LabRecord(self.record.root if self.record is not None else None,
                               lab_id="host-" + secrets.token_hex(6))
            self._lease_record = record.attach_host(self)
        return self._lease_record

    @property
    def lease_holder(self) -> str | None:
        """The id this host's sysctl leases are held by (None before its first one)."""
        return self._lease_record.lab_id if self._lease_record is not None else None

    @property
    def changed_sysctls(self) -> dict[str, str]:
        """Sysctls this host changed, with the values they had before."""
        return dict(self._saved_sysctls)

    # --- ownership ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        failed: list[BaseException] = []
        if self._restore_sysctls:
            # Every one of them, even after a failure: on a real host each one left changed
            # is a change to the machine.
            for name in list(self._saved_sysctls):
                try:
                    self.restore_sysctl(name)
                except BaseException as exc:  # noqa: BLE001 - reported after the rest
                    failed.append(exc)
            if self._lease_record is not None:
                self._lease_record.close()     # kept (unlocked) for gc if a restore failed
        self.rtnl.close()
        self.netns.close()
        if failed:
            raise failed[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SandboxHost(Host):
    """A throwaway network namespace playing the Docker host, plus a simulated outside.

    Nothing is persisted: both namespaces are pinned only by this object's fds (and by the
    processes nslab starts in them), so they vanish with it — even after a SIGKILL.
    """

    kind = "sandbox"

    def __init__(self, state_dir: str | None = None):
        """``state_dir``: the sandbox's private directory; made (and removed on close) here."""
        os.makedirs(scratch_root(), mode=0o700, exist_ok=True)
        if state_dir is None:
            state_dir = tempfile.mkdtemp(prefix="sandbox-", dir=scratch_root())
            checkpoint("sandbox.tmpdir")
        else:
            os.makedirs(state_dir, mode=0o700)
            checkpoint("sandbox.dir")
        self._created_dir = state_dir
        netns = outside = None
        try:
            netns = Namespace.create("net")
            checkpoint("sandbox.netns")
            outside = Namespace.create("net")
            checkpoint("sandbox.outside")
            super().__init__(netns, state_dir, restore_sysctls=False)
            self.outside = outside
            self.outside_rtnl = Rtnl(outside)
            self._wire_uplink()
        except BaseException:
            for obj in (getattr(self, "outside_rtnl", None), getattr(self, "rtnl", None), outside, netns):
                if obj is not None:
                    obj.close()
            self._remove_state_dir()
            raise
        self.uplink = "eth0"
        self.address = UPLINK_ADDRESS.ip
        self.outside_address = OUTSIDE_ADDRESS.ip

    def _wire_uplink(self) -> None:
        from ._netlink import address_add, default_route_add, link_index_raw, link_up, send_batch, socket_in
        # The outside end is born in the outside namespace: never moved (kernel-notes).
        self.rtnl.request("link", "add", ifname="eth0", kind="veth",
                          peer={"ifname": "eth0", "net_ns_fd": self.outside.fileno()}, obj="uplink veth eth0")
        checkpoint("sandbox.uplink")
        for ns, addr, gw in ((self.netns, UPLINK_ADDRESS, OUTSIDE_ADDRESS.ip), (self.outside, OUTSIDE_ADDRESS, None)):
            sock = socket_in(ns)
            try:
                sock.bind((0, 0))
                index = link_index_raw(sock, "eth0")
                requests = [link_up("lo"), link_up("eth0"), address_add(index, addr, "eth0")]
                if gw is not None:
                    requests.append(default_route_add(gw, index))
                send_batch(sock, requests, ns.description)
                checkpoint("sandbox.uplink_config")
            finally:
                sock.close()
        # The sandbox is a router for its bridges, as Docker makes the host one.
        self.set_sysctl("net.ipv4.ip_forward", "1")

    def prepare_forwarding(self) -> None:
        """Forwarding is on since creation: the sandbox is a router, as Docker's host is."""

    def outside_call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn`` on a thread inside the simulated outside network."""
        return self.outside.call(fn, *args, **kwargs)

    def _remove_state_dir(self) -> None:
        if self._created_dir:
            import shutil
            shutil.rmtree(self._created_dir, ignore_errors=True)
            checkpoint("sandbox.dir_removed")
            self._created_dir = None

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        finally:
            self.outside_rtnl.close()
            self.outside.close()
            self._remove_state_dir()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"netns {self.netns.inode}, outside {self.outside.inode}"
        return f"<SandboxHost {state}>"


class CurrentHost(Host):
    """The caller's own network namespace (opt-in). nslab restores the sysctls it changes.

    ``allow_forwarding``: Docker turns ``net.ipv4.ip_forward`` on; doing that on a real
    machine also changes ``accept_redirects`` and forwarding on every interface
    (reliability.md), so nslab only does it when asked, and puts it back on close.
    """

    kind = "current"
    outlives_lab = True

    def __init__(self, state_dir: str | None = None, *, allow_forwarding: bool = False):
        if not isinstance(allow_forwarding, bool):
            raise InputError("allow_forwarding", "must be True or False", allow_forwarding)
        state_dir = state_dir or os.path.join(state_root(), "host")
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        super().__init__(Namespace.current("net"), state_dir, restore_sysctls=True)
        self.allow_forwarding = allow_forwarding
        self.uplink = None
        self.address = None
        self.outside = None

    def prepare_forwarding(self) -> None:
        """Turn forwarding on if the user consented (called once the lab's record exists)."""
        if self.allow_forwarding:
            self.set_sysctl("net.ipv4.ip_forward", "1")

    def outside_call(self, fn, *args, **kwargs):
        raise NslabError(errno.EOPNOTSUPP, "the current host has no simulated outside network: "
                         "use the sandbox host (the default) for egress experiments")

    def __repr__(self) -> str:
        return f"<CurrentHost netns {self.netns.inode}{' closed' if self.closed else ''}>"


class ExistingHost(Host):
    """A network namespace someone else made (a path like /run/netns/NAME, or a handle),
    shared by several labs, possibly in several processes, through one state directory.

    Its namespace outlives every lab, so what a lab makes in it is recorded for ``gc``.
    Each lab must use its own bridge networks (names); IPAM and subnet choice are shared
    and file-locked.
    """

    kind = "existing"
    outlives_lab = True

    def __init__(self, netns: "Namespace | str", state_dir: str):
        if isinstance(netns, str):
            netns = Namespace.open(netns, "net")
        elif isinstance(netns, Namespace):
            netns = Namespace.from_fd(netns.fileno(), "net")
        else:
            raise InputError("netns", "expected a Namespace or the path of a network namespace", netns)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        super().__init__(netns, state_dir, restore_sysctls=True)
        self.uplink = self.address = self.outside = None

    def prepare_forwarding(self) -> None:
        """Left as the namespace's owner set it."""

    def outside_call(self, fn, *args, **kwargs):
        raise NslabError(errno.EOPNOTSUPP, "an existing host has no simulated outside network")

    def __repr__(self) -> str:
        return f"<ExistingHost netns {self.netns.inode}{' closed' if self.closed else ''}>"

"""The Lab: the one object a script holds. It owns a host, its networks and its containers.

    >>> from nslab import Lab
    >>> with Lab() as lab:                                   # a sandbox host: the real one is untouched
    ...     web = lab.spawn(["python3", "-m", "http.server", "80"], name="web", publish=["8080:80"])
    ...     top = lab.spawn(["sleep", "60"], mode="host")     # shares the (sandbox) host's netns
    ...     print(web.address, lab.compare(web, top).table())

Each ``spawn`` reproduces one ``docker run --network MODE``: the network work happens while
the child is parked between ``clone3`` and ``execve`` (``before_exec``), so the program
starts with its network ready, as in Docker. Teardown runs in reverse order, by identity,
and is idempotent: ``close()`` after a child was killed underneath, or after a failed step,
still removes exactly what this lab made — and nothing else.

"Container" here means a process tree in namespaces wired the way Docker wires a container;
there is no image and no root filesystem: children run the host's programs.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import secrets
import threading
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import modes as _modes
from .errors import InputError, NslabError
from .hosts import CurrentHost, Host, SandboxHost, scratch_root
from .modes import Mode, check_container_name, parse_mode
from .namespaces import KINDS, Namespace, kind_of
from .networks import DEFAULT_BRIDGE, BridgeNetwork, Endpoint, check_network_name, container_setup, wire_none
from .process import Child, caps_mask, check_spawn_args
from .records import LabRecord
from ._faults import checkpoint

__all__ = ["Lab", "Container", "check_argv", "check_env", "DEFAULT_CAP_DROP"]

# Dropped from every child unless the caller says otherwise (see Lab.spawn).
DEFAULT_CAP_DROP = ("NET_RAW",)


def check_argv(argv: object, field: str = "argv") -> list[str]:
    """A non-empty list of strings without NUL bytes (execve could not carry them)."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
        raise InputError(field, "expected a non-empty list of strings (no shell: one item per argument)",
                         argv)
    out = []
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            raise InputError(f"{field}[{i}]", "must be a string", arg)
        if "\0" in arg:
            raise InputError(f"{field}[{i}]", "contains a NUL byte", arg)
        out.append(arg)
    return out


def check_env(env: object, field: str = "env") -> dict[str, str] | None:
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise InputError(field, "expected a mapping of names to values", env)
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise InputError(field, "names are non-empty strings without '=' or NUL", key)
        if not isinstance(value, str) or "\0" in value:
            raise InputError(f"{field}[{key!r}]", "values are strings without NUL", value)
    return dict(env)


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")   # ASCII: isalnum() takes 'é'


def _check_hostname(hostname: object) -> str | None:
    if hostname is None:
        return None
    if not isinstance(hostname, str) or not _HOSTNAME_RE.fullmatch(hostname):
        raise InputError("hostname", "1-64 letters, digits, '-' or '.', not starting with '-' or '.'", hostname)
    return hostname


class Container:
    """One child started by a Lab in a network mode. Close it (or the lab) to tear it down."""

    def __init__(self, lab: "Lab", name: str, mode: Mode, child: Child, netns: Namespace,
                 endpoint: Endpoint | None, published: list, warnings_: list[str],
                 joined: "Container | None", *, id: str, hostname: str | None):
        self.lab = lab
        self.id = id                    # 64 hex, like Docker's container id
        self.hostname = hostname        # None: the name it inherited (nslab sets none unless asked)
        self.name = name
        self.mode = mode
        self.child = child
        self.netns = netns
        self.endpoint = endpoint
        self.published = published
        self.warnings = warnings_
        self.joined = joined
        self._closed = False

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def address(self):
        """The container's IPv4 address (bridge mode; container mode: its owner's while the
        owner is up — after, the shared netns has only lo and the address may be someone
        else's), or None."""
        if self.endpoint is not None:
            return self.endpoint.ip
        if self.joined is not None and not self.joined.closed:
            return self.joined.address
        return None

    @property
    def owner_alive(self) -> bool:
        """container: mode only — is the container whose netns this one joined still up?
        Docker's caveat (moby#10462): when it goes, this one keeps a netns with only lo."""
        return self.joined is None or (not self.joined.closed and self.joined.running)

    @property
    def running(self) -> bool:
        return self.child.poll() is None

    @property
    def returncode(self):
        return self.child.returncode

    def namespace(self, kind: str = "net") -> Namespace:
        """A handle on one of this container's namespaces (owned by the container)."""
        if kind_of(kind).name == "net":
            return self.netns
        return self.child.namespace(kind)

    def wait(self, timeout: float | None = None) -> int:
        return self.child.wait(timeout)

    def stop(self, timeout: float = 2.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` (``docker stop``). Network stays until close()."""
        return self.child.terminate(timeout)

    def kill(self) -> None:
        self.child.kill()

    def view(self):
        return self.lab.view(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the child, unpublish, remove the veth, release the address. Idempotent."""
        if not self._closed:
            self.lab._remove(self)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        addr = f" {self.address}" if self.address else ""
        state = "closed" if self._closed else repr(self.child).split(": ", 1)[-1].rstrip(">")
        return f"<Container {self.name} {self.mode}{addr}: {state}>"


class _Wiring:
    """The network side of one spawn: which namespaces to create and join, and the work
    done while the child is parked between clone3 and execve. ``undo()`` is idempotent.

    The container's own side (Docker's sysctls, ``lo``, then eth0) is done by the parked
    child itself, in C (``setup`` and :meth:`Child.configure`), in parallel with this
    process's share (address, veth, firewall). A child with a new *user* namespace is
    configured from here instead, by a thread inside its netns: its own writes would be
    judged against a user namespace that maps almost nothing."""

    def __init__(self, lab: "Lab", plan: dict):
        self.lab = lab
        self.plan = plan
        mode: Mode = plan["mode"]
        self.network = lab.network(mode.network) if mode.kind == "bridge" else None
        self.endpoint: Endpoint | None = None
        self.published: list = []
        self.owns_netns = mode.kind in ("bridge", "none")
        self.new = (("net",) if self.owns_netns else ()) + tuple(plan["new"])
        self.setup = container_setup() if self.owns_netns and "user" not in plan["new"] else None
        if mode.kind == "host":
            self.join, self.netns = [lab.host.netns], lab.host.netns
        elif mode.kind == "container":
            self.netns = plan["joined_netns"]       # copied by _plan while the owner was up
            self.join = [self.netns]
        else:
            self.join, self.netns = [], None
        self._published_key = None
        self._holds_address = False        # an address reserved or attached in self.network

    @property
    def meanwhile(self) -> "Callable[[], None] | None":
        """The host's share of a bridge endpoint that needs no netns (the address, the
        firewall), done while the child makes its namespaces; None where that does not apply."""
        return self._reserve_and_publish if self.network is not None and self.setup is not None else None

    def _reserve_and_publish(self) -> None:
        self._holds_address = True
        self._publish(self.network.reserve(self.lab._owner(self.plan["name"])))

    def _publish(self, address) -> None:
        # Always, even with no ports: Docker adds DROP DIRECT ACCESS for every endpoint.
        # Ours to unpublish only once it succeeded: a failed publish cleaned up after itself,
        # and the key might be another container's (unpublish is by name).
        self.published = self.lab.firewall.publish(self.plan["name"], self.network.bridge, address,
                                                   self.plan["mappings"], via=self.plan["via"])
        self._published_key = self.plan["name"]
        checkpoint("lab.published")

    @property
    def before_exec_if_needed(self) -> "Callable[[Child], None] | None":
        """before_exec for a child whose netns we wire; None for host and container: (a
        before_exec would make the spawn wait until the child has joined, for nothing)."""
        return self.before_exec if self.owns_netns else None

    def before_exec(self, child: Child) -> None:
        if not self.owns_netns:
            return
        # Our own handle: it pins the netns so the veth can be removed before the netns dies.
        self.netns = Namespace.of_pidfd(child.pidfd, "net")
        if self.network is None:
            if self.setup is None:
                wire_none(self.netns)
            checkpoint("none.lo")
            return
        self._holds_address = True
        self.endpoint = self.network.attach(
            self.netns, owner=self.lab._owner(self.plan["name"]), hairpin=self.plan["via"] == "nat",
            alongside=None if self.setup is not None else self._publish,
            child=child if self.setup is not None else None)

    def close(self) -> None:
        """For a child that never became a Container (failed spawn, finished run): undo the
        network and drop our netns handle (host mode borrows the host's)."""
        try:
            self.undo()
        finally:
            if self.netns is not None and self.plan["mode"].kind != "host":
                self.netns.close()

    def undo(self) -> None:
        name = self.plan["name"]
        try:
            if self._published_key is not None:
                self._published_key = None
                self.lab.firewall.unpublish(name)
        finally:
            if self.network is not None and self._holds_address:
                self._holds_address = False
                self.endpoint = None
                self.network.detach(self.lab._owner(name))


class Lab:
    """A host (sandbox by default), its bridge networks, firewall and containers.

    ``host``: ``"sandbox"`` (a throwaway netns; the default), ``"current"`` (the caller's own
    netns — changes the real machine: only on a throwaway VM), or a :class:`Host`.
    ``published_via``: how published ports are served: ``"docker"`` (DNAT + userland proxy,
    Docker's default), ``"nat"`` (kernel only, Docker's ``userland-proxy: false``) or
    ``"proxy"`` (userland proxy only).
    ``gratuitous_arp``: announce each bridge container's address as Docker 28+ does (see
    :class:`~nslab.networks.BridgeNetwork`); off makes spawns in a lab of hundreds cheaper.
    """

    def __init__(self, host: "str | Host" = "sandbox", *, published_via: str = "docker",
                 allow_forwarding: bool = False, strict_publish: bool = False,
                 gratuitous_arp: bool = True):
        self.published_via = check_published_via(
            published_via, host.kind if isinstance(host, Host) else str(host))
        if not isinstance(strict_publish, bool):
            raise InputError("strict_publish", "must be True or False", strict_publish)
        if not isinstance(gratuitous_arp, bool):
            raise InputError("gratuitous_arp", "must be True or False", gratuitous_arp)
        self.gratuitous_arp = gratuitous_arp
        if not (isinstance(host, Host) or host in ("sandbox", "current")):
            raise InputError("host", "expected 'sandbox', 'current' or a Host", host)
        if not isinstance(allow_forwarding, bool):
            raise InputError("allow_forwarding", "must be True or False", allow_forwarding)
        self.record = LabRecord()
        self.id = self.record.lab_id
        self._dir_key = None
        try:
            if isinstance(host, Host):
                self.host, self._owns_host = host, False
            elif host == "sandbox":
                state_dir = os.path.join(scratch_root(), f"sandbox-{self.id}")
                self._dir_key = self.record.add("dir", path=state_dir)
                self.host, self._owns_host = SandboxHost(state_dir), True
            else:
                self.host, self._owns_host = CurrentHost(allow_forwarding=allow_forwarding), True
            self.host.record = self.record.attach_host(self.host)
            self.host.prepare_forwarding()
            checkpoint("lab.host_ready")
        except BaseException:
            if getattr(self, "_owns_host", False):
                self.host.close()
            if self._dir_key is not None and not os.path.exists(self.record.entry(self._dir_key)["path"]):
                self.record.forget(self._dir_key)   # never made, or removed: nothing for gc to do
            self.record.close()
            raise
        self.strict_publish = strict_publish
        self.networks: dict[str, BridgeNetwork] = {}
        self.containers: dict[str, Container] = {}
        self._firewall = None
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self._pending: set[str] = set()        # names of containers being started (_plan)
        self._closed = False

    # --- networks -----------------------------------------------------------------------
    def network(self, name: str = _modes.DEFAULT_NETWORK, *, subnet=None) -> BridgeNetwork:
        """The bridge network ``name``, created on first use (``docker network create``).
        ``"default"`` is Docker's other name for the default bridge network."""
        self._check_open()
        if name == "default":
            name = _modes.DEFAULT_NETWORK
        if name != _modes.DEFAULT_NETWORK:
            check_network_name(name)           # before it is used as a key
        with self._lock:
            if name in self.networks:
                if subnet is not None and self.networks[name].subnet != _as_network(subnet):
                    raise InputError("subnet", f"network {name} exists with subnet {self.networks[name].subnet}",
                                     subnet)
                return self.networks[name]
            bridge = DEFAULT_BRIDGE if name == _modes.DEFAULT_NETWORK else None
            net = BridgeNetwork(self.host, name, subnet=subnet, bridge=bridge, tag=f"nslab:{self.id}",
                                gratuitous_arp=self.gratuitous_arp)
            try:
                self.firewall.add_network(net.bridge, net.subnet)
            except BaseException:
                net.close()
                raise
            self.networks[name] = net
            return net

    @property
    def firewall(self):
        """The lab's nftables table in the host netns, made when the first network is."""
        if self._firewall is None:
            from .firewall import Firewall
            self._firewall = Firewall(self.host.netns, published_via=self.published_via,
                                      table="nslab" if self.host.kind == "sandbox" and self._owns_host
                                      else f"nslab-{self.id}")
        return self._firewall

    # --- containers ---------------------------------------------------------------------
    def spawn(self, argv: Sequence[str], *, mode: "str | Mode" = "bridge", name: str | None = None,
              publish: Iterable = (), new: Iterable[str] = (), hostname: str | None = None,
              env: Mapping[str, str] | None = None, cwd: str | None = None, stdin=None, stdout=None,
              stderr=None, pass_fds: Iterable[int] = (), published_via: str | None = None,
              strict_publish: bool | None = None, cap_drop: Iterable[str] = DEFAULT_CAP_DROP) -> Container:
        """Start ``argv`` as ``docker run --network MODE`` would place it.

        The mode decides the network namespace. As Docker does, every child (host mode
        included) also gets its own UTS namespace (it keeps the host's hostname unless
        ``hostname`` is given — Docker uses the short id, which it also writes into the
        container's own /etc/hosts, a file nslab's children share with the host — or its
        owner's in ``container:`` mode) and IPC namespace. Docker also gives each container
        its own PID and mount namespaces; nslab's children run the host's programs with no
        image, so those are opt-in: ``new=("pid", "mnt")``. One consequence: closing a
        container kills the process nslab started, not processes *it* started (Docker kills
        them all with the container's pid namespace). For a program that forks (a shell
        script with ``&``, a daemon), pass ``new=("pid",)``: its processes then die with it.

        ``cap_drop``: capabilities the child loses before it execs. The default drops
        ``NET_RAW``, so a child cannot forge ARP or router advertisements to its neighbours
        on the bridge (reliability.md S5). That is stricter than Docker, which keeps NET_RAW
        (Podman drops it); ``cap_drop=()`` gives Docker's behaviour. Programs that use ICMP
        datagram sockets still ping (``ping_group_range`` allows them), but a binary carrying
        the ``cap_net_raw`` file capability — Debian's ``/usr/bin/ping`` — is refused by
        execve (EPERM, with a hint): spawn it with ``cap_drop=()``. ``publish``: Docker ``-p`` specs. Raises
        InputError for bad input, before anything in the kernel changes.
        """
        argv = check_argv(argv)
        env = check_env(env)
        caps_mask(cap_drop, "cap_drop")
        pass_fds = tuple(pass_fds) if not isinstance(pass_fds, (str, bytes)) else pass_fds   # read once
        # Every check of Child.spawn too: the wiring below makes the bridge and table first.
        executable = check_spawn_args(argv, env=env, cwd=cwd, pass_fds=pass_fds, stdin=stdin,
                                      stdout=stdout, stderr=stderr)
        plan = self._plan(mode, name, publish, new, hostname, published_via, strict_publish)
        try:
            return self._start(plan, argv, executable, env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                               stderr=stderr, pass_fds=pass_fds, cap_drop=cap_drop)
        finally:
            self._release_name(plan)

    def _start(self, plan: dict, argv, executable: bytes, *, env, cwd, stdin, stdout, stderr, pass_fds,
               cap_drop) -> Container:
        wiring = _Wiring(self, plan)
        try:
            child = Child.spawn(argv, new=wiring.new, join=wiring.join, env=env, cwd=cwd,
                                hostname=plan["hostname"], stdin=stdin, stdout=stdout, stderr=stderr,
                                pass_fds=pass_fds, before_exec=wiring.before_exec_if_needed,
                                caps_drop=cap_drop, setup=wiring.setup, meanwhile=wiring.meanwhile,
                                executable=executable)
            checkpoint("lab.spawned")
        except BaseException:
            wiring.close()
            raise
        container = Container(self, plan["name"], plan["mode"], child, wiring.netns, wiring.endpoint,
                              wiring.published, [plan["warning"]] if plan["warning"] else [], plan["joined"],
                              id=plan["id"], hostname=plan["hostname"])
        with self._lock:
            closed_meanwhile = self._closed
            if not closed_meanwhile:
                self.containers[container.name] = container
        if closed_meanwhile:
            # close() ran while this one started and could not see it: undo it here.
            with contextlib.suppress(NslabError):
                self._remove(container)
            raise NslabError(errno.EBADF, f"the lab was closed while container {plan['name']} started "
                             "(it was torn down)")
        return container

    def _release_name(self, plan: dict) -> None:
        """The name reserved by _plan is a container's now, or free again."""
        with self._lock:
            self._pending.discard(plan["name"])

    def run(self, fn: Callable[..., Any], *args: Any, mode: "str | Mode" = "bridge", name: str | None = None,
            publish: Iterable = (), new: Iterable[str] = (), hostname: str | None = None,
            timeout: float | None = 60.0, **kwargs: Any) -> Any:
        """Run a Python callable in a fresh child placed in ``mode``; return its result or
        re-raise its exception. The child is a fresh interpreter (safe with threads); its
        network is removed when it returns."""
        from .process import pickle_call
        pickle_call(fn, args, kwargs)   # InputError for a lambda, before any wiring
        plan = self._plan(mode, name, publish, new, hostname, None, None)
        try:
            return self._run(plan, fn, args, kwargs, timeout)
        finally:
            self._release_name(plan)

    def _run(self, plan: dict, fn, args, kwargs, timeout):
        from .process import call_in_child
        wiring = _Wiring(self, plan)
        try:
            return call_in_child(fn, *args, new=wiring.new, join=wiring.join, hostname=plan["hostname"],
                                 timeout=timeout, before_exec=wiring.before_exec_if_needed, setup=wiring.setup,
                                 meanwhile=wiring.meanwhile, **kwargs)
        finally:
            wiring.close()

    def _plan(self, mode, name, publish, new, hostname, published_via, strict_publish) -> dict:
        """Validate everything up front; nothing in the kernel has changed yet."""
        from .publish import check_publish_for_mode, parse_publish
        self._check_open()
        m = parse_mode(mode)
        if name is None:
            with self._lock:
                name = f"c{next(self._counter)}"
                while name in self.containers or name in self._pending:
                    name = f"c{next(self._counter)}"
        name = check_container_name(name)
        if isinstance(new, str):
            new = (new,)
        if isinstance(new, (bytes, bytearray)) or not isinstance(new, Iterable):
            raise InputError("new", "expected namespace kinds, e.g. ('pid', 'mnt')", new)
        new_kinds = []
        for k in new:
            try:
                kind = kind_of(k).name
            except InputError as exc:
                raise InputError("new", f"unknown namespace kind: {exc}", k) from None
            if kind == "net":
                raise InputError("new", "the network namespace is decided by the mode, not by new=", k)
            if kind not in new_kinds:
                new_kinds.append(kind)
        hostname = _check_hostname(hostname)
        if hostname and m.kind == "container":
            raise InputError("hostname", "conflicting options: hostname and the network mode", hostname)
        mappings = parse_publish(publish)
        if strict_publish is not None and not isinstance(strict_publish, bool):
            raise InputError("strict_publish", "must be True, False or None", strict_publish)
        strict = self.strict_publish if strict_publish is None else strict_publish
        warning = check_publish_for_mode(m.kind, mappings, strict=strict)
        via = self.published_via if published_via is None else check_published_via(published_via, self.host.kind)
        container_id = secrets.token_hex(32)
        # As Docker: a private UTS and IPC namespace for every container, host mode included
        # (Docker drops UTS only for --uts=host; a host-network container's hostname is a copy
        # of the host's, which is what a new UTS namespace starts with). So no child of a lab
        # can rename the machine. Docker names a container after its short id *and* writes
        # that name into the container's own /etc/hosts; nslab's children share the host's
        # /etc, where an unknown name sends every getfqdn() (http.server's, say) to an
        # unreachable DNS. So the private UTS keeps the inherited hostname unless one is given
        # (container: mode copies its owner's, as Docker does).
        new_kinds += [k for k in ("uts", "ipc") if k not in new_kinds]
        with self._lock:
            # Last, and under the lock: the name is held from here until the container is
            # registered or has failed (_release_name), so two spawns cannot both take it; the
            # owner of container: mode is checked and its netns handle copied while it cannot
            # close under us.
            self._check_open()
            if name in self.containers or name in self._pending:
                raise InputError("name", f"a container named {name!r} already exists in this lab "
                                 "(Docker: Conflict. The container name is already in use)", name)
            joined = joined_netns = None
            if m.kind == "container":
                joined = self.containers.get(m.container)
                if joined is None:
                    raise InputError("mode", f"no container named {m.container!r} in this lab", str(m))
                if joined.closed or not joined.running:
                    raise InputError("mode", f"cannot join network of a non running container: {m.container}",
                                     str(m))
                if hostname is None:
                    hostname = joined.hostname
                # Our own handle: the netns must stay inspectable after its owner closes
                # (Docker's caveat, moby#10462: the dependant lives on with only lo).
                joined_netns = Namespace.from_fd(joined.netns.fileno(), "net")
            self._pending.add(name)
        return {"mode": m, "name": name, "id": container_id, "new": new_kinds, "hostname": hostname,
                "mappings": mappings if m.kind == "bridge" else [], "warning": warning,
                "via": via, "joined": joined, "joined_netns": joined_netns}

    def _owner(self, name: str) -> str:
        """IPAM owner strings carry the lab id, so gc can release a dead lab's addresses."""
        return f"{self.id}/{name}"

    def _remove(self, container: Container) -> None:
        """Tear one container down: stop it, unpublish, delete its veth, release its address."""
        with self._lock:
            if container._closed:
                return
            container._closed = True
            self.containers.pop(container.name, None)
        errors: list[BaseException] = []
        # Child first (docker stop), then its rules and veth while our handle still pins the
        # netns (host sides go before their namespaces), then the handle itself.
        def remove_child() -> None:
            # docker rm -f: SIGKILL. The init of a new pid namespace ignores SIGTERM, so a
            # polite stop would cost its whole grace period; Container.stop() is the polite one.
            container.child.kill()
            container.child.close()
        for step in (remove_child,
                     lambda: self._firewall is not None and self._firewall.unpublish(container.name),
                     lambda: container.endpoint is not None and
                     self.networks[container.endpoint.network].detach(self._owner(container.name)),
                     lambda: container.mode.kind != "host" and container.netns.close()):
            try:
                step()
                checkpoint("lab.teardown_step")
            except BaseException as exc:  # noqa: BLE001 - finish teardown, then report
                errors.append(exc)
        if errors:
            raise errors[0]

    def __getitem__(self, name: str) -> Container:
        return self.containers[name]

    # --- evidence -------------------------------------------------------------------------
    def view(self, target: "Container | str" = "host"):
        """What a container (or the host) sees: namespaces, links, addresses, routes, sockets."""
        from .evidence import View
        if isinstance(target, str):
            if target == "host":
                namespaces = {k: Namespace.current(k) for k in KINDS if k != "net"}
                namespaces["net"] = self.host.netns
                try:
                    return View.gather("host", namespaces, pid=None)
                finally:
                    for k, ns in namespaces.items():
                        if k != "net":
                            ns.close()
            target = self.containers[target]
        namespaces = {}
        for k in KINDS:
            try:
                # Read from the child itself (its pidfd), not from what the lab believes, so a
                # view shows a misplaced child as misplaced.
                namespaces[k] = target.child.namespace(k)
            except NslabError:
                if k == "net":
                    namespaces[k] = target.netns  # the child is gone: its pinned netns still shows
        return View.gather(target.name, namespaces, pid=target.pid if target.running else None)

    def compare(self, a: "Container | str", b: "Container | str"):
        from .evidence import compare
        return compare(self.view(a), self.view(b))

    # --- ownership ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise NslabError(errno.EBADF, "this lab is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Tear everything down in reverse order of creation. Idempotent (also when called
        from two threads at once: one tears down); reports the first error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: list[BaseException] = []

        def attempt(fn):
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        for container in reversed(list(self.containers.values())):
            attempt(container.close)
        for network in reversed(list(self.networks.values())):
            attempt(lambda: self._firewall.remove_network(network.bridge) if self._firewall else None)
            attempt(network.close)
        if self._firewall is not None:
            attempt(self._firewall.close)
        if self._owns_host:
            attempt(self.host.close)
            checkpoint("lab.host_closed")
            if self.host.closed:
                self.record.forget(self._dir_key)
        self.record.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<Lab closed>"
        return (f"<Lab {self.host!r}: {len(self.networks)} networks, {len(self.containers)} containers, "
                f"published via {self.published_via}>")


def check_published_via(value: object, host_kind: str = "sandbox") -> str:
    from .firewall import BACKENDS
    if value not in BACKENDS:
        raise InputError("published_via", f"expected one of {', '.join(BACKENDS)}", value)
    if value == "nat" and host_kind != "sandbox":
        # Hairpin NAT sets route_localnet and bridge-nf-call-iptables in the host namespace;
        # on a real host that changes how every bridge (docker0 too) is filtered.
        raise InputError("published_via", "'nat' changes route_localnet and bridge-nf-call-iptables "
                         "in the host namespace: use it on a sandbox host only", value)
    return value  # type: ignore[return-value]


def _as_network(value):
    import ipaddress
    try:
        return ipaddress.IPv4Network(value)
    except ValueError:
        return None

"""Setup programs: the part of wiring a child that the child does itself, before it execs.

A container's own side of the network — Docker's sysctls, ``lo`` up, then eth0's address,
link and default route — must be done *inside* its netns. A Python thread that ``setns``-es
there competes for the GIL with the parent's own work (the veth, the firewall), so on two
CPUs the "parallel" halves mostly take turns. The child parked in nslab's C trampoline
(``csrc/spawn.c``) is already inside, and runs raw syscalls: it can do that work truly in
parallel, with no Python and no allocation. A :class:`ChildSetup` is the list of steps,
encoded once by Python::

    early = ChildSetup().write_sysctl("net/ipv4/ip_unprivileged_port_start", "0") \\
                        .netlink([link_up("lo")], "lo")
    child = Child.spawn(argv, new=("net",), setup=early, before_exec=wire)
    # in wire(child): create the veth, then
    child.configure(ChildSetup().netlink([address_add(...), link_up("eth0")], "eth0"))

``setup=`` runs right after the child joined its namespaces, while the parent works;
:meth:`Child.configure` sends more while it waits. A failed step kills the child and
``spawn`` raises a SpawnError naming that step (and the rtnetlink request, for a batch).

:meth:`ChildSetup.run_here` runs the same steps on the calling thread, for a namespace no
parked child of ours is in (the steps then go through Python's own syscalls).
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Sequence

from . import _native
from ._netlink import Request, encode_batch, rtnl_socket_here, send_batch
from .errors import InputError, from_errno

__all__ = ["ChildSetup"]

_lib = _native.lib
_STEP = struct.Struct("=II")          # struct nslab_setup_step: op, payload length
_NEEDED_FLAGS = 0x1 | 0x4             # NLM_F_REQUEST | NLM_F_ACK
_PROC_SYS = "/proc/sys/"


class ChildSetup:
    """An ordered list of setup steps for a child (see the module doc). Builder methods
    return ``self``; :meth:`encode` gives the bytes the trampoline reads."""

    def __init__(self) -> None:
        self._steps: list[tuple[int, bytes, str, list[str]]] = []   # op, payload, what, requests

    # --- building ------------------------------------------------------------------------
    def write_sysctl(self, name: str, value: str, *, optional: bool = False) -> "ChildSetup":
        """Write ``value`` to ``/proc/sys/<name>`` (``name`` like ``net/ipv4/ping_group_range``).
        ``optional``: a missing file (a kernel without IPv6, say) is skipped, not an error."""
        path = _sysctl_path(name)
        if not isinstance(value, str) or "\0" in value:
            raise InputError("value", "a sysctl value is a string without NUL", value)
        op = _lib.NSLAB_SETUP_WRITE_OPT if optional else _lib.NSLAB_SETUP_WRITE
        self._steps.append((op, name.encode() + b"\0" + value.encode(), f"write {path}", []))
        return self

    def warm_sysctl(self, name: str) -> "ChildSetup":
        """Look ``/proc/sys/<name>`` up without opening it (missing: fine). Why: in the
        shared procfs, the first lookup of ``net/ipv4`` or ``net/ipv6`` in a new netns compares
        against the entry of every other live netns (one shared ``/proc/sys/net`` dentry:
        ~0.3 ms at 1,000 containers). Done early, that cost overlaps the parent's work instead
        of following it. (The trampoline avoids it altogether with a procfs instance of the
        child's own where it may make one: csrc/spawn.c, ``open_proc_sys``.)"""
        path = _sysctl_path(name)
        self._steps.append((_lib.NSLAB_SETUP_TOUCH, name.encode() + b"\0", f"look up {path}", []))
        return self

    def netlink(self, requests: Sequence[Request], where: str) -> "ChildSetup":
        """One batch of rtnetlink requests (from nslab._netlink), sent in one datagram in the
        child's netns; every ack is checked."""
        requests = list(requests)
        if not requests or len(requests) > 255:
            raise InputError("requests", "a batch holds 1 to 255 requests", len(requests))
        for r in requests:
            # Every step waits for one ack per request: without NLM_F_ACK it would wait forever.
            if len(r.data) < 16 or struct.unpack_from("=H", r.data, 6)[0] & _NEEDED_FLAGS != _NEEDED_FLAGS:
                raise InputError("requests", "each request needs NLM_F_REQUEST and NLM_F_ACK", r.what)
        self._steps.append((_lib.NSLAB_SETUP_NETLINK, encode_batch(requests), f"netlink batch in {where}",
                            [r.what for r in requests]))
        return self

    # --- using ---------------------------------------------------------------------------
    def encode(self) -> bytes:
        out = bytearray()
        for op, payload, _, _ in self._steps:
            out += _STEP.pack(op, len(payload)) + payload + b"\0" * (-len(payload) % 4)
        if len(out) > _lib.NSLAB_SETUP_MAX:
            raise InputError("setup", f"at most {_lib.NSLAB_SETUP_MAX} bytes per program", len(out))
        return bytes(out)

    @property
    def steps(self) -> list[str]:
        """What each step does, in order (error messages use these)."""
        return [what for _, _, what, _ in self._steps]

    def describe(self, index: int) -> str:
        """The step (and request) a trampoline report's ``index`` names, counted from this
        program's first step."""
        step, request = index >> 8, index & 0xFF
        if not 0 <= step < len(self._steps):
            return f"setup step {step}"
        _, _, what, requests = self._steps[step]
        if request and request <= len(requests):
            return f"{what}: {requests[request - 1]}"
        return what

    def copy(self) -> "ChildSetup":
        """A program with the same steps, which later builder calls on this one do not change."""
        both = ChildSetup()
        both._steps = list(self._steps)
        return both

    def __add__(self, other: "ChildSetup") -> "ChildSetup":
        both = ChildSetup()
        both._steps = self._steps + other._steps
        return both

    def __len__(self) -> int:
        return len(self._steps)

    def run_here(self, where: str = "this netns") -> None:
        """Run the steps on the calling thread (which must already be in the target
        namespaces): the same effects and errors, through Python's own syscalls."""
        sock: socket.socket | None = None
        try:
            for op, payload, what, requests in self._steps:
                if op in (_lib.NSLAB_SETUP_WRITE, _lib.NSLAB_SETUP_WRITE_OPT):
                    name, value = payload.split(b"\0", 1)
                    path = _PROC_SYS.encode() + name
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        if op == _lib.NSLAB_SETUP_WRITE_OPT:
                            continue
                        raise from_errno(errno.ENOENT, "open", os.fsdecode(path)) from None
                    try:
                        os.write(fd, value)
                    except OSError as exc:
                        raise from_errno(exc.errno, "write", os.fsdecode(path)) from None
                    finally:
                        os.close(fd)
                elif op == _lib.NSLAB_SETUP_TOUCH:
                    try:
                        os.close(os.open(_PROC_SYS.encode() + payload.rstrip(b"\0"), os.O_PATH | os.O_CLOEXEC))
                    except OSError:
                        pass
                else:
                    if sock is None:
                        sock = rtnl_socket_here()
                    send_batch(sock, _split_batch(payload, requests), where)
        finally:
            if sock is not None:
                sock.close()

    def __repr__(self) -> str:
        return f"<ChildSetup {len(self._steps)} steps: {', '.join(self.steps)}>"


def _sysctl_path(name: object) -> str:
    if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name or ".." in name.split("/"):
        raise InputError("sysctl", "a name under /proc/sys like 'net/ipv4/ping_group_range'", name)
    return _PROC_SYS + name


def _split_batch(data: bytes, whats: list[str]) -> list[Request]:
    out, off = [], 0
    for what in whats:
        length = struct.unpack_from("=I", data, off)[0]
        out.append(Request(data[off:off + length], what))
        off += (length + 3) & ~3
    return out

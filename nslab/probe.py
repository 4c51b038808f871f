"""The datapath probe: how fast, and how slow, is the path between two network namespaces?

Four measurements, each a tight C loop (``csrc/probe.c``) that cffi runs with the GIL
released, so a client and a server can run on two threads of this process, each pinned to
its own CPU, each with a socket that lives in its own network namespace:

    >>> from nslab.probe import rr, stream, crr, udp_rr
    >>> r = rr(lab, lab, size=64, duration=2)        # TCP request/response over lab's loopback
    >>> r.latency.p50_us, r.rate_per_s
    (52.6, 18812.9)
    >>> s = stream(child, host, address="10.88.0.1")   # child -> host over veth + bridge
    >>> s.gbit_per_s, s.path.mtu
    (13.1, 1500)

``rr`` (TCP request/response: latency percentiles), ``stream`` (TCP throughput, counted by
the receiver), ``crr`` (connect/request/response/close: connections per second) and
``udp_rr`` (UDP request/response with a per-request timeout and a loss count). Each discards
a warm-up, then runs for a duration (or a count), and returns a dataclass with ``to_dict()``.

Where things run: the server's socket is made inside ``server_ns`` and the client's inside
``client_ns`` (a socket stays in the netns it was made in, for life). When the two differ the
caller says how the client reaches the server (``address=``: a container address, a
published port via ``connect_port=``); when they are equal it defaults to loopback. Every
result carries the path's facts — the netns of each socket as the kernel reports it
(SIOCGSKNS), the addresses each side sees, the route MTU and the MSS — so a report can show
the traffic went where it claims.

Pin, or the answer is a coin toss: on a 2-vCPU VM a round trip is ~12 µs when client and
server share a CPU and ~40-60 µs when they do not (waking the other, idle vCPU), and an
unpinned run lands in either mode, for sockperf as for nslab (benchmarks/RESULTS.md).
``pin="auto"`` (the default) puts the client on the first allowed CPU and the server on the
second; ``pin=(0, 0)`` measures the same-CPU case, ``pin=None`` leaves it to the scheduler.

The same loops run in a child process in any mode, argv only, JSON out::

    python -m nslab.probe server rr --port 5001          # prints a "listening" line, then the result
    python -m nslab.probe client rr --address 10.88.0.1 --port 5001 --size 64

Errors are nslab errors naming the failing call: a closed port gives
``connect(127.0.0.1:9 from net:[4026531840]) failed: Connection refused``.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Optional

from ._netlink import socket_in
from ._probe import ffi, lib
from .errors import InputError, NslabError, from_errno
from .namespaces import Namespace

__all__ = [
    "MODES", "Latency", "PathFacts", "ServerReport", "RRResult", "StreamResult", "CRRResult",
    "UDPRRResult", "ProbeServer", "run_client", "rr", "stream", "crr", "udp_rr", "pin_cpu",
    "main",
]

MODES = ("rr", "stream", "crr", "udp_rr")
DEFAULT_BUFFER = 128 * 1024         # iperf3's default TCP block, so the two compare
MAX_MESSAGE = 16 * 1024 * 1024
MAX_UDP = 65507

_NS = 1_000_000_000
_CALLS = {
    lib.NSLAB_PROBE_CALL_NONE: "probe", lib.NSLAB_PROBE_CALL_SOCKET: "socket",
    lib.NSLAB_PROBE_CALL_CONNECT: "connect", lib.NSLAB_PROBE_CALL_SEND: "send",
    lib.NSLAB_PROBE_CALL_RECV: "recv", lib.NSLAB_PROBE_CALL_ACCEPT: "accept",
    lib.NSLAB_PROBE_CALL_POLL: "ppoll", lib.NSLAB_PROBE_CALL_SETSOCKOPT: "setsockopt",
    lib.NSLAB_PROBE_CALL_CLOCK: "clock_gettime", lib.NSLAB_PROBE_CALL_SHUTDOWN: "shutdown",
    lib.NSLAB_PROBE_CALL_ADDRESS: "inet_pton",
}
_STOPPED = {0: None, 1: "stop", 2: "idle"}
# Not exported by Python's socket module; the kernel's ABI values (linux/in.h, in6.h).
_IP_MTU = 14
_IPV6_MTU = 24


# --- results -------------------------------------------------------------------------
@dataclasses.dataclass
class Latency:
    """Latency of the measured transactions in µs; percentiles by nearest rank from a
    log-linear histogram whose buckets are at most 0.8% wide."""

    min_us: float
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @classmethod
    def from_histogram(cls, hist, stats) -> "Latency":
        n = stats.transactions
        if not n:
            return cls(*([0.0] * 7))
        pct = lambda q: lib.nslab_probe_hist_percentile(hist, q, stats.min_ns, stats.max_ns) / 1e3  # noqa: E731
        return cls(stats.min_ns / 1e3, stats.sum_ns / n / 1e3, pct(50), pct(90), pct(99),
                   pct(99.9), stats.max_ns / 1e3)


@dataclasses.dataclass
class PathFacts:
    """Where a connection really runs: each end's netns (``net:[inode]``, from SIOCGSKNS on
    the socket itself), the addresses each side sees, and the route MTU and TCP MSS."""

    client_netns: Optional[str] = None       # SIOCGSKNS needs CAP_NET_ADMIN; without it,
    server_netns: Optional[str] = None       # the netns the socket was created in
    client_address: Optional[str] = None      # client's local address
    server_address: Optional[str] = None      # the address the client talks to
    client_seen_by_server: Optional[str] = None  # the peer as the server sees it (NAT shows here)
    server_local_address: Optional[str] = None   # the server's local address
    mtu: Optional[int] = None                 # IP_MTU of the client's connected socket
    mss: Optional[int] = None                 # TCP_MAXSEG of the client's socket


@dataclasses.dataclass
class ServerReport:
    """What a server loop counted."""

    mode: str
    transactions: int = 0          # requests answered (rr, crr, udp_rr)
    aborted: int = 0               # connections that closed before a full request
    bytes_sent: int = 0
    bytes_received: int = 0
    measured_bytes: int = 0        # stream: bytes in the measured phase
    measured_s: float = 0.0        # stream: length of the measured phase
    total_s: float = 0.0
    stopped: Optional[str] = None  # "stop", "idle" or None (the client hung up)
    netns: Optional[str] = None
    local_address: Optional[str] = None
    peer_address: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _ClientReport:
    stats: Any
    latency: Optional[Latency]
    path: PathFacts
    samples: Optional[list]


class _Result:
    def to_dict(self) -> dict:
        """A JSON-ready dict (the raw samples, if any, under ``samples_ns``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RRResult(_Result):
    """TCP request/response: ``transactions`` measured after the warm-up, in ``duration_s``."""

    mode: str
    request_size: int
    response_size: int
    transactions: int
    warmup_transactions: int
    duration_s: float
    rate_per_s: float
    latency: Latency
    bytes_sent: int
    bytes_received: int
    path: PathFacts
    pin: Optional[tuple]
    server: Optional[ServerReport] = None
    samples_ns: Optional[list] = None


@dataclasses.dataclass
class StreamResult(_Result):
    """TCP stream: throughput measured at the receiver, from ``warmup`` after its first
    byte to its last; ``bytes_sent`` (sender) and ``bytes_received`` (receiver) are totals
    and match for a clean transfer."""

    mode: str
    buffer_size: int
    bytes_sent: int
    bytes_received: Optional[int]
    measured_bytes: Optional[int]
    duration_s: Optional[float]
    gbit_per_s: Optional[float]
    sender_gbit_per_s: float          # bytes sent / the sender's time (includes warm-up)
    path: PathFacts
    pin: Optional[tuple]
    server: Optional[ServerReport] = None


@dataclasses.dataclass
class CRRResult(_Result):
    """TCP connect/request/response/close: one connection per transaction."""

    mode: str
    request_size: int
    response_size: int
    connections: int
    warmup_connections: int
    duration_s: float
    rate_per_s: float
    latency: Latency
    path: PathFacts
    pin: Optional[tuple]
    server: Optional[ServerReport] = None
    samples_ns: Optional[list] = None


@dataclasses.dataclass
class UDPRRResult(_Result):
    """UDP request/response: ``lost`` requests got no reply within ``timeout_s``."""

    mode: str
    request_size: int
    response_size: int
    transactions: int
    lost: int
    late: int
    loss_ratio: float
    warmup_transactions: int
    duration_s: float
    rate_per_s: float
    latency: Latency
    timeout_s: float
    path: PathFacts
    pin: Optional[tuple]
    server: Optional[ServerReport] = None
    samples_ns: Optional[list] = None


# --- small helpers -------------------------------------------------------------------
def pin_cpu(cpu: int) -> None:
    """Pin the calling thread (only it) to ``cpu``."""
    rc = lib.nslab_probe_pin_cpu(cpu)
    if rc < 0:
        raise from_errno(-rc, "sched_setaffinity", f"cpu {cpu}")


def _check_cpu(cpu: object, field: str) -> Optional[int]:
    if cpu is None:
        return None
    if not isinstance(cpu, int) or isinstance(cpu, bool) or cpu not in os.sched_getaffinity(0):
        raise InputError(field, f"not a CPU this process may run on "
                                f"({sorted(os.sched_getaffinity(0))})", cpu)
    return cpu


def _check_pin(pin: object) -> Optional[tuple]:
    """``"auto"``: client on CPU 0 and server on CPU 1 when both are ours, else unpinned."""
    if pin == "auto":
        allowed = sorted(os.sched_getaffinity(0))
        return (allowed[0], allowed[1]) if len(allowed) >= 2 else None
    if pin is None:
        return None
    if not isinstance(pin, (tuple, list)) or len(pin) != 2:
        raise InputError("pin", "expected (client_cpu, server_cpu), None or 'auto'", pin)
    return (_check_cpu(pin[0], "pin"), _check_cpu(pin[1], "pin"))


def _check_size(value: object, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(field, f"expected an integer from {low} to {high}", value)
    return value


def _check_seconds(value: object, field: str, allow_zero: bool = True) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
            or (value == 0 and not allow_zero) or value != value or value > 86400):
        raise InputError(field, "expected seconds, a number from 0 to 86400"
                         + ("" if allow_zero else " (not 0)"), value)
    return float(value)


def _family_of(address: str, field: str = "address") -> int:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise InputError(field, "expected a numeric IPv4 or IPv6 address", address) from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _ns_name(ns: Namespace) -> str:
    return f"net:[{ns.inode}]"


def _sock_netns(fd: int) -> Optional[str]:
    """``net:[inode]`` of the netns a socket lives in; None without CAP_NET_ADMIN there."""
    nsfd = lib.nslab_probe_socket_netns(fd)
    if nsfd < 0:
        return None
    try:
        return f"net:[{os.fstat(nsfd).st_ino}]"
    finally:
        os.close(nsfd)


def _fmt(addr) -> Optional[str]:
    if not addr:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except OSError:
        return None


def _client_facts(sock: socket.socket, tcp: bool) -> PathFacts:
    level, opt = ((socket.IPPROTO_IPV6, _IPV6_MTU) if sock.family == socket.AF_INET6
                  else (socket.IPPROTO_IP, _IP_MTU))
    return PathFacts(
        client_netns=_sock_netns(sock.fileno()),
        client_address=_safe(lambda: _fmt(sock.getsockname())),
        server_address=_safe(lambda: _fmt(sock.getpeername())),
        mtu=_safe(lambda: sock.getsockopt(level, opt)),
        mss=_safe(lambda: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)) if tcp else None,
    )


def _new_cfg(**fields) -> Any:
    cfg = ffi.new("struct nslab_probe_cfg *")
    cfg.stop_fd = -1
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def _ns_of(seconds: Optional[float]) -> int:
    return int(round((seconds or 0) * _NS))


def _raise_loop(rc: int, stats, what: str, obj: str) -> None:
    """Raise the error of a C loop: ``recv(rr client, 10.0.0.1:5001 from net:[...])``."""
    if rc < 0:
        call = _CALLS.get(stats.err_call, "probe")
        raise from_errno(-rc, call, f"{what}, {obj}")


def _is_current(ns: Namespace) -> bool:
    with Namespace.current("net") as here:
        return here == ns


def _socket(ns: Namespace, family: int, kind: int) -> socket.socket:
    """A socket inside ``ns``. In the calling thread's own netns it is made directly: setns
    (even into the same netns) needs CAP_SYS_ADMIN, and loopback runs need no privilege."""
    if _is_current(ns):
        return socket.socket(family, kind | socket.SOCK_CLOEXEC, 0)
    return socket_in(ns, family, kind, 0)


def _call_in(ns: Namespace, fn: Callable[[], Any], name: str) -> Any:
    """Run ``fn`` on a throwaway thread inside ``ns`` (no setns when already there)."""
    if _is_current(ns):
        return _on_thread(fn, name)(None)
    return ns.call(fn)


def _on_thread(fn: Callable[[], Any], name: str) -> Callable[[Optional[float]], Any]:
    """Start ``fn`` on a throwaway thread; the returned function joins it and returns or
    re-raises. (Throwaway, so a CPU pin or a setns dies with the thread.)"""
    box: dict = {}

    def body():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            box["error"] = exc

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()

    def join(timeout: Optional[float] = None):
        thread.join(timeout)
        if thread.is_alive():
            raise from_errno(errno.ETIMEDOUT, "join", f"probe thread {name}")
        if "error" in box:
            raise box["error"]
        return box.get("result")
    return join


# --- the server ----------------------------------------------------------------------
class ProbeServer:
    """One probe server loop on its own thread, with its socket made inside ``ns``.

    ``rr`` and ``stream`` serve one connection (until the client hangs up); ``crr`` and
    ``udp_rr`` serve until :meth:`stop` or ``idle_timeout``. A stream server is the
    receiver, so it holds the ``warmup`` that its throughput leaves out. Use it as a context
    manager::

        with ProbeServer("rr", lab, request_size=64) as srv:
            srv.start()
            ... connect a client to srv.port ...
            report = srv.wait(10)
    """

    def __init__(self, mode: str, ns: Optional[Namespace] = None, *, bind: Optional[str] = None,
                 port: int = 0, family: Optional[int] = None, request_size: int = 1,
                 response_size: Optional[int] = None, buffer_size: int = DEFAULT_BUFFER,
                 pin: Optional[int] = None, warmup: float = 0.0,
                 idle_timeout: Optional[float] = None, accept_timeout: Optional[float] = None,
                 io_timeout: float = 10.0):
        if mode not in MODES:
            raise InputError("mode", f"expected one of {', '.join(MODES)}", mode)
        self.mode = mode
        limit = MAX_UDP if mode == "udp_rr" else MAX_MESSAGE
        self.request_size = _check_size(request_size, "request_size", 1, limit)
        self.response_size = _check_size(self.request_size if response_size is None
                                         else response_size, "response_size", 1, limit)
        self.buffer_size = _check_size(buffer_size, "buffer_size", 1, MAX_MESSAGE)
        port = _check_size(port, "port", 0, 65535)
        self.pin = _check_cpu(pin, "pin")
        self.warmup = _check_seconds(warmup, "warmup")
        self.idle_timeout = _check_seconds(idle_timeout or 0, "idle_timeout")
        self.accept_timeout = _check_seconds(accept_timeout or 0, "accept_timeout")
        self.io_timeout = _check_seconds(io_timeout, "io_timeout")
        if family is None:
            family = _family_of(bind, "bind") if bind else socket.AF_INET
        bind = bind or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        if _family_of(bind, "bind") != family:
            raise InputError("bind", "address family differs from the client's address", bind)

        self._owns_ns = ns is None
        self.ns = ns if ns is not None else Namespace.current("net")
        self._sock: Optional[socket.socket] = None
        self._stop = -1
        self._join = None
        self.report: Optional[ServerReport] = None
        try:
            kind = socket.SOCK_DGRAM if mode == "udp_rr" else socket.SOCK_STREAM
            self._sock = _socket(self.ns, family, kind)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self._sock.bind((bind, port))
                if kind == socket.SOCK_STREAM:
                    self._sock.listen(128)
            except OSError as exc:
                raise from_errno(exc.errno, "bind", f"{_fmt((bind, port))} in {self.ns.description}") from None
            self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> tuple:
        """``(host, port)`` the server socket is bound to."""
        if self._sock is None:
            raise from_errno(errno.EBADF, "getsockname", f"closed probe server ({self.mode})")
        return self._sock.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def netns(self) -> Optional[str]:
        """``net:[inode]`` of the server socket: the kernel's answer (SIOCGSKNS), or without
        CAP_NET_ADMIN the namespace it was made in."""
        if self._sock is None:
            return None
        return _sock_netns(self._sock.fileno()) or _ns_name(self.ns)

    def start(self) -> "ProbeServer":
        """Start the loop on a throwaway thread (the GIL is released inside the C loop)."""
        if self._join is not None:
            raise NslabError(errno.EALREADY, f"probe server ({self.mode}) already started")
        if self._sock is None:
            raise from_errno(errno.EBADF, "start", f"closed probe server ({self.mode})")
        self._join = _on_thread(self._serve, f"nslab-probe-{self.mode}-server")
        return self

    def stop(self) -> None:
        """Ask the loop to end (it is polling the stop eventfd alongside its socket)."""
        if self._stop >= 0:
            os.eventfd_write(self._stop, 1)

    def wait(self, timeout: Optional[float] = None) -> ServerReport:
        """Wait for the loop to end; return its report or raise its error."""
        if self._join is None:
            raise NslabError(errno.EINVAL, f"probe server ({self.mode}) was not started")
        self.report = self._join(timeout)
        return self.report

    def close(self) -> None:
        """Stop the loop, wait for it briefly, release the socket and the eventfd."""
        if self._join is not None and self._stop >= 0:
            self.stop()
            try:
                self._join(max(self.io_timeout, 1.0) + 1.0)
            except BaseException:  # noqa: BLE001 - its error was the caller's to collect
                pass
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        stop, self._stop = self._stop, -1
        if stop >= 0:
            os.close(stop)
        if self._owns_ns:
            self.ns.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> "ProbeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        else:
            running = self._join is not None and self.report is None
            state = f"{_fmt(self.address)} in {_ns_name(self.ns)}, " + (
                "running" if running else "done" if self.report else "not started")
        return f"<ProbeServer {self.mode}: {state}>"

    # --- the thread ---
    def _cfg(self):
        return _new_cfg(req_size=self.request_size, resp_size=self.response_size,
                        buf_size=self.buffer_size, stop_fd=self._stop,
                        warmup_ns=_ns_of(self.warmup),
                        io_timeout_ns=_ns_of(self.io_timeout),
                        idle_timeout_ns=_ns_of(self.idle_timeout))

    def _serve(self) -> ServerReport:
        if self.pin is not None:
            pin_cpu(self.pin)
        stats = ffi.new("struct nslab_probe_stats *")
        report = ServerReport(self.mode, netns=self.netns,
                              local_address=_safe(lambda: _fmt(self._sock.getsockname())))
        where = f"{report.local_address} in {_ns_name(self.ns)}"
        lfd = self._sock.fileno()
        if self.mode in ("crr", "udp_rr"):
            loop = lib.nslab_probe_crr_server if self.mode == "crr" else lib.nslab_probe_udp_rr_server
            rc = loop(lfd, self._cfg(), stats)
            _raise_loop(rc, stats, f"{self.mode} server", where)
        else:
            fd = lib.nslab_probe_accept(lfd, self._stop, _ns_of(self.accept_timeout))
            if fd == -errno.ECANCELED:
                report.stopped = "stop"
                return report
            if fd < 0:
                self._sock.close()  # so a client waiting on the backlog hears a reset
                raise from_errno(-fd, "accept", f"{self.mode} server, {where}")
            with socket.socket(fileno=fd) as conn:
                report.netns = _sock_netns(fd) or report.netns
                report.local_address = _safe(lambda: _fmt(conn.getsockname()))
                report.peer_address = _safe(lambda: _fmt(conn.getpeername()))
                loop = lib.nslab_probe_tcp_rr_server if self.mode == "rr" else lib.nslab_probe_stream_recv
                rc = loop(fd, self._cfg(), stats)
            _raise_loop(rc, stats, f"{self.mode} server", where)
        report.transactions = stats.transactions
        report.aborted = stats.aborted
        report.bytes_sent = stats.bytes_sent
        report.bytes_received = stats.bytes_received
        report.measured_bytes = stats.measured_bytes
        report.measured_s = stats.measured_ns / _NS
        report.total_s = stats.total_ns / _NS
        report.stopped = _STOPPED.get(stats.stopped)
        return report


# --- the client ----------------------------------------------------------------------
def run_client(mode: str, address: str, port: int, *, ns: Optional[Namespace] = None,
               request_size: int = 1, response_size: Optional[int] = None,
               buffer_size: int = DEFAULT_BUFFER, duration: Optional[float] = 2.0,
               warmup: float = 0.3, count: Optional[int] = None, pin: Optional[int] = None,
               samples: int = 0, timeout: float = 10.0, udp_timeout: float = 0.1,
               stop_fd: int = -1):
    """Run one client loop against a server at ``address:port``, from inside ``ns``
    (default: the calling thread's netns). Returns the mode's result with ``server=None``.

    ``count`` replaces ``duration``: measured transactions (rr, crr, udp_rr: requests sent)
    or, for ``stream``, the exact number of bytes to send. ``samples`` keeps that many raw
    latencies (ns). Raises :class:`InputError` for bad arguments and an :class:`NslabError`
    naming the failing call (``connect``, ``recv``, ...) otherwise.
    """
    a = _check_client(mode, address, port, request_size=request_size,
                      response_size=response_size, buffer_size=buffer_size, duration=duration,
                      warmup=warmup, count=count, pin=pin, samples=samples, timeout=timeout,
                      udp_timeout=udp_timeout)
    family, request_size, response_size = a["family"], a["request_size"], a["response_size"]
    buffer_size, duration, warmup, count = a["buffer_size"], a["duration"], a["warmup"], a["count"]
    pin, samples, timeout, udp_timeout = a["pin"], a["samples"], a["timeout"], a["udp_timeout"]

    owns_ns = ns is None
    ns = ns if ns is not None else Namespace.current("net")
    target = f"{_fmt((address, port))} from {_ns_name(ns)}"
    cfg = _new_cfg(duration_ns=_ns_of(duration), warmup_ns=_ns_of(warmup), count=count or 0,
                   req_size=request_size, resp_size=response_size, buf_size=buffer_size,
                   timeout_ns=_ns_of(udp_timeout), io_timeout_ns=_ns_of(timeout), stop_fd=stop_fd)
    stats = ffi.new("struct nslab_probe_stats *")
    hist = ffi.new("uint64_t[]", lib.NSLAB_PROBE_HIST_BUCKETS) if mode != "stream" else ffi.NULL
    raw = ffi.new("uint64_t[]", samples) if samples else ffi.NULL
    try:
        if mode == "crr":
            path = _crr_facts(ns, family, address, port, timeout)

            def loop():
                if pin is not None:
                    pin_cpu(pin)
                return lib.nslab_probe_crr_client(family, address.encode(), port, cfg, stats,
                                                  hist, raw, samples)
            # The loop makes its sockets itself: its thread must be inside the client's netns.
            rc = _call_in(ns, loop, "nslab-probe-crr-client")
        else:
            kind = socket.SOCK_DGRAM if mode == "udp_rr" else socket.SOCK_STREAM
            with _socket(ns, family, kind) as sock:
                sock.settimeout(timeout)
                try:
                    sock.connect((address, port))
                except OSError as exc:
                    raise from_errno(exc.errno or errno.ETIMEDOUT, "connect", target) from None
                sock.settimeout(None)
                path = _client_facts(sock, kind == socket.SOCK_STREAM)
                path.client_netns = path.client_netns or _ns_name(ns)
                fn = {"rr": lambda: lib.nslab_probe_tcp_rr_client(sock.fileno(), cfg, stats, hist, raw, samples),
                      "stream": lambda: lib.nslab_probe_stream_send(sock.fileno(), cfg, stats),
                      "udp_rr": lambda: lib.nslab_probe_udp_rr_client(sock.fileno(), cfg, stats, hist, raw, samples),
                      }[mode]

                def loop():
                    if pin is not None:
                        pin_cpu(pin)
                    return fn()
                rc = _on_thread(loop, f"nslab-probe-{mode}-client")(None)
        _raise_loop(rc, stats, f"{mode} client", target)
    finally:
        if owns_ns:
            ns.close()
    latency = Latency.from_histogram(hist, stats) if mode != "stream" else None
    kept = [int(raw[i]) for i in range(stats.samples_stored)] if samples else None
    report = _ClientReport(stats, latency, path, kept)
    return _build(mode, report, request_size, response_size, buffer_size, udp_timeout, pin)


def _check_client(mode, address, port, *, request_size, response_size, buffer_size, duration,
                  warmup, count, pin, samples, timeout, udp_timeout) -> dict:
    """Validate a client's arguments (before anything is made); return them normalized."""
    if mode not in MODES:
        raise InputError("mode", f"expected one of {', '.join(MODES)}", mode)
    limit = MAX_UDP if mode == "udp_rr" else MAX_MESSAGE
    request_size = _check_size(request_size, "request_size", 1, limit)
    a = {
        "family": _family_of(address),
        "port": _check_size(port, "port", 1, 65535),
        "request_size": request_size,
        "response_size": _check_size(request_size if response_size is None else response_size,
                                     "response_size", 1, limit),
        "buffer_size": _check_size(buffer_size, "buffer_size", 1, MAX_MESSAGE),
        "warmup": _check_seconds(warmup, "warmup"),
        "timeout": _check_seconds(timeout, "timeout", allow_zero=False),
        "udp_timeout": _check_seconds(udp_timeout, "udp_timeout", allow_zero=False),
        "samples": _check_size(samples, "samples", 0, 100_000_000),
        "pin": _check_cpu(pin, "pin"),
        "count": None if count is None else _check_size(count, "count", 1, 2 ** 62),
        "duration": None if duration is None else _check_seconds(duration, "duration",
                                                                 allow_zero=False),
    }
    if a["count"] is not None:
        a["duration"] = None          # a count replaces the duration
    elif a["duration"] is None:
        raise InputError("duration", "give a duration or a count")
    return a


def _crr_facts(ns: Namespace, family: int, address: str, port: int, timeout: float) -> PathFacts:
    """CRR sockets live and die in C; one Python connection learns the path's facts.
    (The server counts it as aborted: it sends no request.)"""
    with _socket(ns, family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except OSError as exc:
            raise from_errno(exc.errno or errno.ETIMEDOUT, "connect",
                             f"{_fmt((address, port))} from {_ns_name(ns)}") from None
        facts = _client_facts(sock, True)
        facts.client_netns = facts.client_netns or _ns_name(ns)
        return facts


def _build(mode, c: _ClientReport, req, resp, buf, udp_timeout, pin):
    """The mode's result from the client's side alone (``server=None``)."""
    st = c.stats
    secs = st.measured_ns / _NS
    rate = st.transactions / secs if secs else 0.0
    if mode == "rr":
        return RRResult(mode, req, resp, st.transactions, st.warmup_transactions, secs, rate,
                        c.latency, st.bytes_sent, st.bytes_received, c.path, pin, None, c.samples)
    if mode == "crr":
        return CRRResult(mode, req, resp, st.transactions, st.warmup_transactions, secs, rate,
                         c.latency, c.path, pin, None, c.samples)
    if mode == "udp_rr":
        asked = st.transactions + st.lost
        return UDPRRResult(mode, req, resp, st.transactions, st.lost, st.late,
                           st.lost / asked if asked else 0.0, st.warmup_transactions, secs,
                           rate, c.latency, udp_timeout, c.path, pin, None, c.samples)
    sender = st.bytes_sent * 8 / secs / 1e9 if secs else 0.0
    return StreamResult(mode, buf, st.bytes_sent, None, None, None, None, sender, c.path, pin)


# --- both ends in this process -------------------------------------------------------
def _pair(mode: str, client_ns: Optional[Namespace], server_ns: Optional[Namespace], *,
          address: Optional[str], port: int, connect_port: Optional[int], bind: Optional[str],
          pin, request_size: int, response_size: Optional[int], buffer_size: int = DEFAULT_BUFFER,
          duration: Optional[float], warmup: float, count: Optional[int], samples: int = 0,
          timeout: float, udp_timeout: float = 0.1):
    pin = _check_pin(pin)
    owned = []
    if client_ns is None:
        client_ns = Namespace.current("net")
        owned.append(client_ns)
    if server_ns is None:
        server_ns = Namespace.current("net")
        owned.append(server_ns)
    try:
        if address is None:
            if client_ns != server_ns:
                raise InputError("address", "client and server are in different network "
                                 "namespaces: give the server's address as the client reaches it")
            address = "::1" if bind and _family_of(bind, "bind") == socket.AF_INET6 else "127.0.0.1"
        family = _family_of(address)
        # Everything is checked before the server's socket exists.
        _check_client(mode, address, connect_port or 1, request_size=request_size,
                      response_size=response_size, buffer_size=buffer_size, duration=duration,
                      warmup=warmup, count=count, pin=pin[0] if pin else None, samples=samples,
                      timeout=timeout, udp_timeout=udp_timeout)
        with ProbeServer(mode, server_ns, bind=bind, port=port, family=family,
                         request_size=request_size, response_size=response_size,
                         buffer_size=buffer_size, pin=pin[1] if pin else None,
                         warmup=warmup, accept_timeout=timeout, io_timeout=timeout) as server:
            server.start()
            try:
                client = run_client(mode, address, connect_port or server.port, ns=client_ns,
                                    request_size=request_size, response_size=response_size,
                                    buffer_size=buffer_size, duration=duration, warmup=warmup,
                                    count=count, pin=pin[0] if pin else None, samples=samples,
                                    timeout=timeout, udp_timeout=udp_timeout)
            except BaseException:
                server.stop()
                # A server that failed first explains the client's failure better.
                try:
                    server.wait(timeout + 1.0)
                except NslabError as server_error:
                    if server_error.errno not in (errno.ECANCELED,):
                        raise server_error from None
                raise
            if mode in ("crr", "udp_rr"):
                server.stop()
            report = server.wait(timeout + 1.0)
    finally:
        for ns in owned:
            ns.close()
    client.pin = pin
    return _attach(mode, client, report)


def _attach(mode, result, report: ServerReport):
    """Fill the server side into a client result."""
    result.server = report
    result.path.server_netns = report.netns
    result.path.client_seen_by_server = report.peer_address
    result.path.server_local_address = report.local_address
    if mode == "stream":
        result.bytes_received = report.bytes_received
        result.measured_bytes = report.measured_bytes
        result.duration_s = report.measured_s
        result.gbit_per_s = (report.measured_bytes * 8 / report.measured_s / 1e9
                             if report.measured_s else 0.0)
    return result


def rr(client_ns: Optional[Namespace] = None, server_ns: Optional[Namespace] = None, *,
       address: Optional[str] = None, port: int = 0, connect_port: Optional[int] = None,
       bind: Optional[str] = None, size: int = 1, response_size: Optional[int] = None,
       duration: Optional[float] = 2.0, warmup: float = 0.3, count: Optional[int] = None,
       pin="auto", samples: int = 0, timeout: float = 10.0) -> RRResult:
    """TCP request/response between a client in ``client_ns`` and a server in ``server_ns``
    (both default to the calling thread's netns; equal namespaces default to loopback).

    ``size``-byte requests, ``response_size``-byte responses (default: ``size``), one at a
    time, TCP_NODELAY. ``port`` is where the server listens (0: any), ``connect_port`` where
    the client dials (default: the same; differs behind a published port). ``pin`` is
    ``(client_cpu, server_cpu)``, ``None`` or ``"auto"``.
    """
    return _pair("rr", client_ns, server_ns, address=address, port=port,
                 connect_port=connect_port, bind=bind, pin=pin, request_size=size,
                 response_size=response_size, duration=duration, warmup=warmup, count=count,
                 samples=samples, timeout=timeout)


def stream(client_ns: Optional[Namespace] = None, server_ns: Optional[Namespace] = None, *,
           address: Optional[str] = None, port: int = 0, connect_port: Optional[int] = None,
           bind: Optional[str] = None, buffer_size: int = DEFAULT_BUFFER,
           duration: Optional[float] = 2.0, warmup: float = 0.3,
           total_bytes: Optional[int] = None, pin="auto", timeout: float = 10.0) -> StreamResult:
    """TCP bulk transfer from the client to the server in ``buffer_size`` writes.

    Runs ``warmup + duration`` seconds (or sends exactly ``total_bytes``); throughput is the
    receiver's: bytes counted from ``warmup`` after its first byte to its last.
    """
    return _pair("stream", client_ns, server_ns, address=address, port=port,
                 connect_port=connect_port, bind=bind, pin=pin, request_size=1,
                 response_size=1, buffer_size=buffer_size, duration=duration, warmup=warmup,
                 count=total_bytes, timeout=timeout)


def crr(client_ns: Optional[Namespace] = None, server_ns: Optional[Namespace] = None, *,
        address: Optional[str] = None, port: int = 0, connect_port: Optional[int] = None,
        bind: Optional[str] = None, size: int = 1, response_size: Optional[int] = None,
        duration: Optional[float] = 2.0, warmup: float = 0.3, count: Optional[int] = None,
        pin="auto", samples: int = 0, timeout: float = 10.0) -> CRRResult:
    """TCP connect/request/response/close: a new connection per transaction. The server
    closes first, so TIME_WAIT stays on its side and client ports never run out."""
    return _pair("crr", client_ns, server_ns, address=address, port=port,
                 connect_port=connect_port, bind=bind, pin=pin, request_size=size,
                 response_size=response_size, duration=duration, warmup=warmup, count=count,
                 samples=samples, timeout=timeout)


def udp_rr(client_ns: Optional[Namespace] = None, server_ns: Optional[Namespace] = None, *,
           address: Optional[str] = None, port: int = 0, connect_port: Optional[int] = None,
           bind: Optional[str] = None, size: int = 16, response_size: Optional[int] = None,
           duration: Optional[float] = 2.0, warmup: float = 0.3, count: Optional[int] = None,
           request_timeout: float = 0.1, pin="auto", samples: int = 0,
           timeout: float = 10.0) -> UDPRRResult:
    """UDP request/response; a request unanswered within ``request_timeout`` counts as
    lost. Requests of 8 bytes or more carry a sequence number (late replies are not
    mistaken for the current one)."""
    return _pair("udp_rr", client_ns, server_ns, address=address, port=port,
                 connect_port=connect_port, bind=bind, pin=pin, request_size=size,
                 response_size=response_size, duration=duration, warmup=warmup, count=count,
                 samples=samples, timeout=timeout, udp_timeout=request_timeout)


# --- python -m nslab.probe -------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nslab.probe",
                                description="nslab's datapath probe, one end per process; JSON out.")
    sub = p.add_subparsers(dest="role", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("mode", choices=MODES)
    common.add_argument("--size", type=int, default=None, help="request bytes (rr/crr 1, udp_rr 16)")
    common.add_argument("--response-size", type=int, default=None)
    common.add_argument("--buffer-size", type=int, default=DEFAULT_BUFFER)
    common.add_argument("--pin", type=int, default=None, help="CPU to pin this end to")
    common.add_argument("--timeout", type=float, default=10.0, help="I/O timeout, seconds")
    s = sub.add_parser("server", parents=[common], help="listen, print a 'listening' line, serve")
    s.add_argument("--bind", default=None)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--warmup", type=float, default=0.0,
                   help="stream: seconds after the first byte left out of the throughput")
    s.add_argument("--idle-timeout", type=float, default=None,
                   help="end when nothing arrives for this long (crr/udp_rr also end on SIGTERM)")
    c = sub.add_parser("client", parents=[common], help="run against a server, print the result")
    c.add_argument("--address", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--duration", type=float, default=2.0)
    c.add_argument("--warmup", type=float, default=0.3)
    c.add_argument("--count", type=int, default=None)
    c.add_argument("--udp-timeout", type=float, default=0.1)
    c.add_argument("--samples", type=int, default=0)
    return p


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: Optional[list] = None) -> int:
    """``python -m nslab.probe server|client MODE ...``: one end of a probe in this process
    (and so in this process's namespaces). Prints JSON lines: the server a ``listening``
    event then a ``result``; the client a ``result``; either an ``error`` (exit 1)."""
    args = _parser().parse_args(argv)
    size = args.size if args.size is not None else (16 if args.mode == "udp_rr" else 1)
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    # SIGTERM/SIGINT become a write to the stop pipe the C loops poll.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os.write(stop_w, b"x"))
    try:
        if args.role == "server":
            with ProbeServer(args.mode, bind=args.bind, port=args.port, request_size=size,
                             response_size=args.response_size, buffer_size=args.buffer_size,
                             pin=args.pin, warmup=args.warmup, idle_timeout=args.idle_timeout,
                             accept_timeout=args.idle_timeout, io_timeout=args.timeout) as srv:
                host, port = srv.address
                _emit({"event": "listening", "mode": args.mode, "address": host, "port": port,
                       "netns": srv.netns, "pid": os.getpid()})
                # Forward the stop pipe to the server's own eventfd; wait in short steps so
                # signal handlers run on this (main) thread.
                srv.start()
                while True:
                    try:
                        report = srv.wait(0.2)
                        break
                    except NslabError as exc:
                        if exc.syscall != "join":
                            raise
                        if _drained(stop_r):
                            srv.stop()
            _emit({"event": "result", "role": "server", **report.to_dict()})
        else:
            result = run_client(args.mode, args.address, args.port, request_size=size,
                                response_size=args.response_size, buffer_size=args.buffer_size,
                                duration=None if args.count else args.duration,
                                warmup=args.warmup, count=args.count, pin=args.pin,
                                samples=args.samples, timeout=args.timeout,
                                udp_timeout=args.udp_timeout, stop_fd=stop_r)
            _emit({"event": "result", "role": "client", **result.to_dict()})
        return 0
    except NslabError as exc:
        _emit({"event": "error", "errno": exc.errno, "syscall": exc.syscall, "object": exc.obj,
               "message": str(exc), "type": type(exc).__name__})
        return 1
    finally:
        os.close(stop_r)
        os.close(stop_w)


def _drained(fd: int) -> bool:
    try:
        return bool(os.read(fd, 64))
    except BlockingIOError:
        return False


if __name__ == "__main__":
    sys.exit(main())

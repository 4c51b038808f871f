"""nslab's docker-proxy: a userland forwarder from one host port to one container port.

Docker serves a published port two ways at once: kernel DNAT rules for traffic that goes
through netfilter's NAT hooks, and ``docker-proxy`` (``userland-proxy: true``, the default)
for what DNAT does not see, above all ``127.0.0.1`` from the host itself. The daemon binds
the host socket and hands the fd to the proxy (``cmd/docker-proxy/main_linux.go``); the
proxy accepts there and opens its own connection to the container, so **the container sees
the host's bridge address, not the client's** — the trade-off this module makes visible.

How nslab runs it::

    proxy = UserlandProxy.start(host_ns, listening_socket, "tcp", ("172.17.0.2", 80))
    ...                                    # the port is served by another process
    proxy.close()                          # stops it; the port is free when close() returns

One process per published port and protocol, started as ``python -m nslab.proxy`` with
argv only (no shell). It receives:

* the **already bound** listening socket (``--listen-fd``; TCP sockets already listen, so
  connections queue up in the backlog even before the proxy runs: no readiness race);
* the lab's **host network namespace**: ``nslab.process.Child.spawn(join=[host_ns])``
  starts it there, so its connections to the container are made inside the sandbox. (The
  fallback without ``nslab.process``: ``--netns-fd``, which the proxy ``setns``-es into
  before creating any socket, while it is still single-threaded);
* a **control pipe** on stdin: it exits as soon as that pipe reaches EOF, i.e. when the
  owner closes it *or dies*. ``PR_SET_PDEATHSIG(SIGKILL)`` is set as well: by nslab's
  spawn trampoline from its long-lived spawner thread (the death signal follows the
  *thread* that forked the child: kernel-notes), or in the fallback by the proxy itself
  (``--parent-pid``, checked right after, for the race where the parent died first).

It reports ``OK`` (or ``ERR <reason>``) on stdout once set up, then keeps stdout closed.

TCP is forwarded with ``splice(2)``: bytes move socket -> pipe -> socket inside the
kernel, never copied to Python (istio/ztunnel PR #170 measured 12 -> 36 Gb/s for this
change). Each direction is one thread blocked in ``os.splice`` (the GIL is released) with a
1 MiB pipe (``F_SETPIPE_SZ``). UDP keeps a flow table: one connected socket per client
address, so replies find their way back; flows idle for ``--udp-timeout`` seconds (90 s,
docker-proxy's ``UDPConnTrackTimeout``) are dropped. At start the proxy raises its soft
``RLIMIT_NOFILE`` to the hard limit (Go 1.19+ does so for docker-proxy) and caps the flow
table below that fd budget; a datagram whose flow socket cannot be made is dropped, and a
connection whose pipe or thread cannot be made is closed: the proxy itself keeps serving.

Where a TCP proxy's time goes (perf, bulk transfer): not into Python — one ``splice`` moves up
to 1 MiB, user time is ~0, and a C relay on epoll measured no faster — but into the kernel's
work for the second TCP connection, above all sending to the container, whose receive path
runs inline in the proxy's ``splice()``. Both legs use the namespace's default congestion
control, as docker-proxy's (Go's ``net.Dial``) do: with BBR and no ``fq`` qdisc on a veth or
bridge, TCP paces itself with a timer per burst, which caps every path through the bridge
(benchmarks/RESULTS.md, "Publishing", has both cases). Giving the container leg an unpaced
algorithm would make this proxy faster than Docker's: nslab does not.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

__all__ = ["UserlandProxy", "main", "PIPE_SIZE", "UDP_TIMEOUT"]

PIPE_SIZE = 1 << 20                 # the default /proc/sys/fs/pipe-max-size
UDP_TIMEOUT = 90.0                  # docker-proxy's UDPConnTrackTimeout
UDP_MAX_FLOWS = 1024                # bounds the flow table: the least recently used flow goes
FD_RESERVE = 16                     # fds kept free beyond the flow sockets (selector, stray fds)
CONNECT_TIMEOUT = 10.0
READY_TIMEOUT = 10.0
_SPLICE_FLAGS = os.SPLICE_F_MOVE   # never SPLICE_F_MORE: it corks small writes (Nagle-like stalls)


# =========================================================================================
# The owner's side
# =========================================================================================
class UserlandProxy:
    """A running proxy process for one listening socket. ``close()`` is idempotent and
    returns only once the process is gone (so the port is released)."""

    def __init__(self, proc, control_fd: int, proto: str, listen: tuple[str, int],
                 target: tuple[str, int]):
        self._proc = proc                     # nslab.process.Child, or a Popen (fallback)
        self._control_fd = control_fd
        self.pid = proc.pid
        self.proto = proto
        self.listen = listen
        self.target = target

    @classmethod
    def start(cls, host_ns, sock: socket.socket, proto: str, target: tuple[str, int], *,
              udp_timeout: float = UDP_TIMEOUT, wait: bool = True) -> "UserlandProxy":
        """Start a proxy serving ``sock`` (bound in ``host_ns``, a Namespace) for ``target``.
        With ``wait``, returns once the proxy said OK; raises SpawnError if it cannot start."""
        from .errors import SpawnError

        host, port = sock.getsockname()[:2]
        argv = [sys.executable, "-m", "nslab.proxy", "--proto", proto,
                "--listen-fd", str(sock.fileno()), "--target", f"{target[0]}:{target[1]}",
                "--udp-timeout", str(udp_timeout)]
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = _spawn(argv, host_ns, sock.fileno(), control_r)
        except OSError as exc:
            os.close(control_w)
            if isinstance(exc, SpawnError):
                raise
            raise SpawnError(exc.errno or errno.EIO, f"start userland proxy for "
                             f"{host}:{port}/{proto}: {exc}", step="exec") from None
        finally:
            os.close(control_r)
        proxy = cls(proc, control_w, proto, (host, port), target)
        if wait:
            proxy.wait_ready()
        return proxy

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the proxy reported OK; raise SpawnError (and stop it) otherwise."""
        from .errors import SpawnError

        proc = self._proc
        if proc is None or proc.stdout is None or proc.stdout.closed:
            return
        line = b""
        try:
            fd = proc.stdout.fileno()
            deadline = time.monotonic() + timeout
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            try:
                while not line.endswith(b"\n"):
                    left = deadline - time.monotonic()
                    if left <= 0 or not sel.select(left):
                        break
                    chunk = os.read(fd, 256)
                    if not chunk:
                        break
                    line += chunk
            finally:
                sel.close()
        finally:
            proc.stdout.close()
        if line.strip() != b"OK":
            reason = line.decode(errors="replace").strip() or "no answer"
            self.close()
            raise SpawnError(errno.EIO, f"userland proxy for {self.listen[0]}:{self.listen[1]}/"
                             f"{self.proto} -> {self.target[0]}:{self.target[1]} did not start: "
                             f"{reason}", step="proxy start")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the proxy and reap it. Closing the control pipe alone would let it exit on
        its own; SIGKILL makes the port free *now*, as Docker's stop of docker-proxy does."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.close(self._control_fd)
        except OSError:
            pass
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None and not proc.stdout.closed:
                proc.stdout.close()
            closer = getattr(proc, "close", None)      # a Child owns a pidfd
            if closer is not None:
                closer()

    @property
    def closed(self) -> bool:
        return self._proc is None

    def __enter__(self) -> "UserlandProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._proc is None:
            state = "closed"
        else:
            rc = self._proc.poll()
            state = f"running, pid {self.pid}" if rc is None else f"exited {rc}, pid {self.pid}"
        return (f"<UserlandProxy {self.listen[0]}:{self.listen[1]}/{self.proto} -> "
                f"{self.target[0]}:{self.target[1]}: {state}>")


def _proxy_env() -> dict:
    env = dict(os.environ)
    # The proxy imports nslab: make sure it finds this very copy, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spawn(argv: list[str], host_ns, listen_fd: int, control_r: int):
    """The one place that starts a proxy process: argv only, no shell, only the fds passed.

    With ``nslab.process.Child`` the child is cloned *into* ``host_ns`` by nslab's C
    trampoline, which also sets ``PR_SET_PDEATHSIG`` from nslab's long-lived spawner thread.
    Without it (fallback), ``subprocess.Popen`` starts it here and the proxy enters the
    namespace (``--netns-fd``) and sets the death signal itself (``--parent-pid``)."""
    try:
        from .process import PIPE, Child
    except ImportError:
        Child = None
    if Child is not None:
        return Child.spawn(argv, new=(), join=[host_ns], stdin=control_r, stdout=PIPE,
                           pass_fds=[listen_fd], env=_proxy_env(), die_with_parent=True)
    ns_fd = host_ns.fileno()
    argv = argv + ["--netns-fd", str(ns_fd), "--parent-pid", str(os.getpid())]
    return subprocess.Popen(argv, stdin=control_r, stdout=subprocess.PIPE, close_fds=True,
                            pass_fds=(listen_fd, ns_fd), env=_proxy_env())


# =========================================================================================
# The proxy process
# =========================================================================================
def _die_with_parent(parent_pid: int) -> None:
    # ctypes only here, in the proxy process: nslab's C core has no prctl shim yet.
    # TODO(nslab_prctl): switch to nslab._native once the core exports it.
    import ctypes
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent_pid:       # the parent died before prctl: nobody will signal us
        os._exit(0)


def _setns(fd: int) -> None:
    from . import _native
    _native.setns(fd, _native.CLONE_NEWNET, f"netns fd {fd}")
    os.close(fd)


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _big_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass                                  # above pipe-max-size for an unprivileged user
    return r, w


def _pump(src: socket.socket, dst: socket.socket, done: Callable[[], None]) -> None:
    """Move bytes src -> dst with splice until EOF or an error; half-close dst on EOF."""
    r = w = -1
    try:
        # Inside the try: without a pipe (EMFILE) the connection must end, not hang half-open.
        r, w = _big_pipe()
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        s_fd, d_fd = src.fileno(), dst.fileno()
        while True:
            n = os.splice(s_fd, w, size, flags=_SPLICE_FLAGS)
            if n == 0:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                break
            while n:
                n -= os.splice(r, d_fd, n, flags=_SPLICE_FLAGS)
    except OSError:
        # A reset on either side: tear both down so the other direction unblocks too.
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        done()


def _serve_tcp_conn(client: socket.socket, target: tuple[str, int]) -> None:
    client.setblocking(True)
    try:
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
    except OSError:
        client.close()                        # docker-proxy does the same: close, no RST magic
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # Go's default, docker-proxy's
    left = [2]
    lock = threading.Lock()

    def done() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            client.close()
            upstream.close()

    try:
        threading.Thread(target=_pump, args=(upstream, client, done), daemon=True).start()
    except RuntimeError:                      # "can't start new thread": drop this connection
        client.close()
        upstream.close()
        return
    _pump(client, upstream, done)


def _run_tcp(listener: socket.socket, target: tuple[str, int], sel: selectors.BaseSelector) -> None:
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "accept")
    while True:
        for key, _ in sel.select():
            if key.data == "control":
                return
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        time.sleep(0.05)      # out of fds: back off, keep the listener
                    break
                try:
                    threading.Thread(target=_serve_tcp_conn, args=(conn, target),
                                     daemon=True).start()
                except RuntimeError:          # "can't start new thread": this client only
                    conn.close()


def _raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit, as Go's ``os`` package does at start since Go
    1.19 (so docker-proxy runs with it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass                              # keep the soft limit; the flow cap follows it
    return soft


def _udp_flow_cap(fd_limit: int) -> int:
    """How many UDP flows fit in the fd budget: one socket each, beside the fds open now."""
    in_use = len(os.listdir("/proc/self/fd"))
    return max(1, min(UDP_MAX_FLOWS, fd_limit - in_use - FD_RESERVE))


def _run_udp(listener: socket.socket, target: tuple[str, int], sel: selectors.BaseSelector,
             timeout: float, max_flows: int = UDP_MAX_FLOWS) -> None:
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "listener")
    flows: dict[tuple, list] = {}             # client addr -> [socket, last activity]
    next_sweep = time.monotonic() + 1.0
    while True:
        now = time.monotonic()
        for key, _ in sel.select(max(0.0, next_sweep - now)):
            if key.data == "control":
                return
            if key.data == "listener":
                while True:
                    try:
                        data, client = listener.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    flow = flows.get(client)
                    if flow is None:
                        if len(flows) >= max_flows:
                            oldest = min(flows, key=lambda c: flows[c][1])
                            sel.unregister(flows[oldest][0])
                            flows.pop(oldest)[0].close()
                        up = None
                        try:
                            up = socket.socket(socket.AF_INET,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                            up.setblocking(False)
                            up.connect(target)
                        except OSError:
                            # EMFILE, ENETUNREACH...: drop this datagram, as docker-proxy
                            # does; the port keeps serving the flows it has.
                            if up is not None:
                                up.close()
                            continue
                        flow = flows[client] = [up, now]
                        sel.register(up, selectors.EVENT_READ, ("flow", client))
                    flow[1] = time.monotonic()
                    try:
                        flow[0].send(data)
                    except OSError:
                        pass                  # ECONNREFUSED from an earlier ICMP: drop, as UDP does
            else:
                _, client = key.data
                flow = flows.get(client)
                if flow is None:
                    continue
                while True:
                    try:
                        data = flow[0].recv(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    flow[1] = time.monotonic()
                    try:
                        listener.sendto(data, client)
                    except OSError:
                        pass
        now = time.monotonic()
        if now >= next_sweep:
            for client in [c for c, f in flows.items() if now - f[1] > timeout]:
                sel.unregister(flows[client][0])
                flows.pop(client)[0].close()
            next_sweep = now + 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nslab.proxy",
                                     description="nslab's userland proxy (one port, one protocol)")
    parser.add_argument("--proto", choices=("tcp", "udp"), required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--target", required=True, help="container ADDR:PORT")
    parser.add_argument("--netns-fd", type=int, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--udp-timeout", type=float, default=UDP_TIMEOUT)
    args = parser.parse_args(argv)
    out = sys.stdout.buffer
    try:
        if args.parent_pid is not None:
            _die_with_parent(args.parent_pid)
        # Before any socket exists, and while this process has one thread.
        if args.netns_fd is not None:
            _setns(args.netns_fd)
        kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
        listener = socket.socket(socket.AF_INET, kind, fileno=args.listen_fd)
        target = _parse_target(args.target)
        fd_limit = _raise_fd_limit()
        sel = selectors.DefaultSelector()
        # stdin is the control pipe: EOF (owner closed it, or died) means stop.
        sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
    except Exception as exc:  # noqa: BLE001 - reported to the owner, who raises SpawnError
        out.write(f"ERR {type(exc).__name__}: {exc}\n".encode())
        out.flush()
        return 1
    out.write(b"OK\n")
    out.flush()
    os.close(1)
    if args.proto == "tcp":
        _run_tcp(listener, target, sel)
    else:
        _run_udp(listener, target, sel, args.udp_timeout, _udp_flow_cap(fd_limit))
    # os._exit: pump threads may be blocked in splice; there is nothing to flush or unwind.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

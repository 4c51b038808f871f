"""The tiny programs experiments run as containers: a banner server and a client.

They are real child processes started by ``lab.spawn`` (so they sit in exactly the
namespaces the mode gives them), written against the standard library only and run with
``python -S`` (no site-packages): a start costs ~10 ms instead of an interpreter that
imports nslab. The server says on its first line whether it could bind — ``bound PID`` or
``error EADDRINUSE`` — which is how port conflicts are *observed*, not assumed. It then
answers each TCP connection with one line: its name, the address the client dialled as the
server sees it, and the client's address as the server sees it (so any translation on the
way, DNAT or a proxy, shows). With ``udp`` it also echoes one line per datagram.
"""
from __future__ import annotations

import json
import sys

from ..process import PIPE
from ._net import read_line

__all__ = ["SERVER", "CLIENT", "start_server", "run_client"]

SERVER = r"""
import errno, os, select, socket, sys
name, bind, port, proto = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as most servers do
    tcp.bind((bind, port))
    tcp.listen(64)
    socks = [tcp]
    if proto == "udp":
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((bind, port))
        socks.append(udp)
except OSError as exc:
    print("error", errno.errorcode.get(exc.errno, str(exc.errno)), flush=True)
    sys.exit(3)
print("bound", os.getpid(), flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        if s is tcp:
            conn, peer = tcp.accept()
            here = conn.getsockname()
            try:
                conn.sendall(f"{name} {here[0]}:{here[1]} {peer[0]}:{peer[1]}\n".encode())
            except OSError:
                pass
            conn.close()
        else:
            data, peer = s.recvfrom(2048)
            s.sendto(f"{name} udp {peer[0]}:{peer[1]}\n".encode(), peer)
"""

CLIENT = r"""
import errno, json, socket, sys
address, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(count):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((address, port))
        out.append(s.recv(256).decode().strip())
    except OSError as exc:
        out.append("error " + (errno.errorcode.get(exc.errno) or "ETIMEDOUT"))
    finally:
        s.close()
print(json.dumps(out), flush=True)
"""


def start_server(lab, name: str, port: int, *, mode: str = "host", bind: str = "0.0.0.0",
                 udp: bool = False, timeout: float = 5.0, **spawn_kwargs):
    """Spawn the banner server as container ``name``; return ``(container, status)`` where
    status is ``"bound"`` or the errno name the bind failed with (the child then exits)."""
    argv = [sys.executable, "-S", "-c", SERVER, name, bind, str(port), "udp" if udp else "tcp"]
    container = lab.spawn(argv, name=name, mode=mode, stdout=PIPE, **spawn_kwargs)
    line = read_line(container.child.stdout, timeout)
    if line.startswith("bound"):
        return container, "bound"
    if line.startswith("error "):
        container.wait(timeout)
        return container, line.split()[1]
    return container, f"no answer ({line!r})"


def run_client(lab, address: str, port: int, count: int = 1, *, mode: str = "host",
               timeout: float = 10.0, **spawn_kwargs) -> list[str]:
    """Run the client as a container in ``mode``: ``count`` connections to
    ``address:port``; returns one line per connection (a banner or ``error ERRNO``)."""
    argv = [sys.executable, "-S", "-c", CLIENT, address, str(port), str(count)]
    container = lab.spawn(argv, mode=mode, stdout=PIPE, **spawn_kwargs)
    try:
        out, _ = container.child.communicate(timeout=timeout)
        return json.loads(out.decode() or "[]")
    finally:
        container.close()

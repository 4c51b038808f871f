#!/usr/bin/env python3
"""Step 6: port conflicts — one port space in host mode, one per container in bridge mode,
and the conflict port mapping moves to the host port.

1. two host-mode servers on port 8000: the second bind fails with EADDRINUSE;
2. two bridge-mode servers on port 80: both bind (each namespace has its own port 80);
3. publishing them as ``-p 8080:80`` and ``-p 8081:80``: both reachable from outside;
4. publishing a third as ``-p 8080:80`` again: refused, as Docker refuses it.

Run:  sudo python3 examples/08_port_conflicts.py
"""
import socket
import sys

from nslab import Lab
from nslab.errors import PortAllocatedError
from nslab.process import PIPE

SERVER = ("import errno, socket, sys\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "try:\n"
          "    s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
          "except OSError as e:\n"
          "    print('bind failed:', errno.errorcode[e.errno], flush=True); sys.exit(1)\n"
          "print('bound', flush=True)\n"
          "while True:\n"
          "    c, _ = s.accept(); c.sendall(sys.argv[2].encode() + b'\\n'); c.close()\n")


def server(lab, name, port, **kwargs):
    c = lab.spawn([sys.executable, "-S", "-c", SERVER, str(port), name], name=name, stdout=PIPE, **kwargs)
    status = c.child.stdout.readline().decode().strip()
    print(f"  {name:<8} ({c.mode}) port {port}: {status}")
    return c, status


def from_outside(lab, port):
    """Connect from the sandbox's outside network (another machine) to the host's address."""
    with lab.host.outside_call(socket.socket, socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect((str(lab.host.address), port))
            return s.recv(100).decode().strip()
        except OSError as exc:
            return f"failed ({exc.strerror})"


def main() -> int:
    with Lab() as lab:
        print("1. docker run --network host <server :8000>, twice")
        _, first = server(lab, "metrics1", 8000, mode="host")
        _, second = server(lab, "metrics2", 8000, mode="host")
        print("2. docker run -p 8080:80 <server :80>, and -p 8081:80 <server :80>")
        _, a = server(lab, "web-a", 80, publish=["8080:80"])
        _, b = server(lab, "web-b", 80, publish=["8081:80"])
        print("3. from the outside network:")
        answers = {port: from_outside(lab, port) for port in (8000, 8080, 8081)}
        for port, answer in answers.items():
            print(f"  {lab.host.address}:{port} -> {answer}")
        print("4. docker run -p 8080:80 <server :80> once more")
        try:
            lab.spawn(["sleep", "60"], name="web-c", publish=["8080:80"])
            refused = None
            print("  accepted?!")
        except PortAllocatedError as exc:
            refused = exc
            print(f"  refused: {exc.strerror}  ({exc.hint})")
        ok = (first, second, a, b) == ("bound", "bind failed: EADDRINUSE", "bound", "bound") and refused \
            and answers[8080] == "web-a" and answers[8081] == "web-b"
    print("\nClaim C6 (host mode conflicts; mapping avoids it while host ports differ):", "seen" if ok else "NOT seen")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

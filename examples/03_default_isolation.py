#!/usr/bin/env python3
"""Step 1 of the tutorial: by default a container gets its own network namespace, its own
address and interfaces, and reaches the host and other containers through a bridge.

What this script does, in a sandbox (the machine's own network is not touched):

1. starts ``web``, a small TCP server, as ``docker run --network bridge`` would place it;
2. shows what ``web`` sees from inside: its namespace, interfaces, address, routes;
3. shows what the host sees: the bridge ``nslab0`` and a ``veth…`` enslaved to it;
4. runs a function in a *second* bridge container that connects to ``web`` and to the host.

Run:  sudo python3 examples/03_default_isolation.py
"""
import errno
import os
import socket
import sys

from nslab import Lab

SERVER = ("import socket\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 80)); s.listen()\n"
          "while True:\n"
          "    c, peer = s.accept(); c.sendall(b'hello from web\\n'); c.close()\n")


def visit(address: str, port: int) -> dict:
    """Runs inside the second container: where am I, and can I reach address:port?
    ``error`` is the errno name when the connection failed (ECONNREFUSED: a reset came back)."""
    me = os.stat("/proc/self/ns/net").st_ino
    try:
        with socket.create_connection((address, port), timeout=2) as s:
            return {"netns": me, "answer": s.recv(100).decode().strip(), "error": None}
    except OSError as exc:
        name = "ETIMEDOUT" if isinstance(exc, TimeoutError) else errno.errorcode.get(exc.errno, str(exc.errno))
        return {"netns": me, "answer": f"failed: {exc}", "error": name}


def main() -> int:
    with Lab() as lab:
        print("docker run --name web <image>    (bridge mode is the default)")
        web = lab.spawn([sys.executable, "-S", "-c", SERVER], name="web")
        host_view, web_view = lab.view("host"), lab.view(web)
        host_net, web_net = host_view.identities["net"], web_view.identities["net"]
        print(f"  host: net:[{host_net[1]}]   web: net:[{web_net[1]}]  -> "
              f"{'different namespaces' if host_net != web_net else 'the SAME namespace?!'}")

        print("\nWhat web sees from inside (its own network stack):")
        for i in web_view.interfaces:
            print(f"  interface {i.name:<6} {i.kind:<9} mtu {i.mtu}")
        for a in web_view.addresses:
            if a.family == "inet":
                print(f"  address   {a.iface:<6} {a.address}")
        for r in web_view.routes:
            if r.family == "inet":
                print(f"  route     {r.item()}")

        print("\nWhat the host sees: the virtual bridge and one veth per container:")
        for i in host_view.interfaces:
            if i.kind in ("bridge", "veth") and i.name != "eth0":
                print(f"  {i.name:<12} {i.kind:<7} {'master ' + i.master if i.master else ''}")
        print(f"  web's veth on the host: {web.endpoint.host_ifname} (its peer is web's eth0)")

        print("\nA second container connects to web, then to the host (the bridge's gateway):")
        gateway = str(web.endpoint.gateway)
        to_web = lab.run(visit, str(web.address), 80)
        print(f"  from net:[{to_web['netns']}] to web {web.address}:80 -> {to_web['answer']}")
        to_host = lab.run(visit, gateway, 22)
        if to_host["error"] is None:
            meaning = "a service on the host answered: it reached the host"
        elif to_host["error"] == "ECONNREFUSED":
            meaning = "refused: the host's stack sent a reset (nothing listens there), so the packet reached it"
        else:
            meaning = f"{to_host['error']}: no answer came back, so this run did not show the host reached"
        print(f"  from net:[{to_host['netns']}] to host {gateway}:22 -> {to_host['answer']}\n    ({meaning})")
        reached_host = to_host["error"] in (None, "ECONNREFUSED")
        ok = host_net != web_net and to_web["answer"] == "hello from web" and reached_host
    print("\nClaim C1 (own namespace, own address, a bridge to the others):", "seen" if ok else "NOT seen")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

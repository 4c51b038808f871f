#!/usr/bin/env python3
"""Step 2: what a network namespace isolates — interfaces, addresses, routing tables, ports.

Two containers on two different bridge networks (``docker network create other``), each
running a server on the *same* TCP port, 8080, at the same time. ``lab.compare`` shows
their facets side by side. Then a third process joins ``a``'s namespace
(``--network container:a``) and tries port 8080 there: inside one namespace the port is
taken (EADDRINUSE). One port number, as many port spaces as namespaces.

Run:  sudo python3 examples/04_namespaces.py
"""
import errno
import socket
import sys

from nslab import Lab
from nslab.process import PIPE

SERVER = ("import socket, time\n"
          "s = socket.socket(); s.bind(('0.0.0.0', 8080)); s.listen()\n"
          "print('listening', flush=True); time.sleep(60)\n")


def try_8080() -> str:
    """Runs inside a container: can I bind TCP port 8080 here?"""
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", 8080))
        return "bound"
    except OSError as exc:
        return errno.errorcode[exc.errno]
    finally:
        s.close()


def main() -> int:
    with Lab() as lab:
        lab.network()                                             # the default bridge (docker0)
        print("docker network create other        -> lab.network('other')")
        other = lab.network("other")
        print(f"  bridge {other.bridge}, subnet {other.subnet}, gateway {other.gateway}")
        print("docker run --name a <server on :8080>                 -> lab.spawn(..., name='a')")
        a = lab.spawn([sys.executable, "-S", "-c", SERVER], name="a", stdout=PIPE)
        print("docker run --name b --network other <server on :8080> -> lab.spawn(..., name='b', mode='other')")
        b = lab.spawn([sys.executable, "-S", "-c", SERVER], name="b", mode="other", stdout=PIPE)
        for c in (a, b):
            print(f"  {c.name}: {c.child.stdout.readline().decode().strip()} on 8080, pid {c.pid}")

        cmp = lab.compare(a, b)
        print("\nFacet by facet ('differs' = separate kernel objects with different contents):")
        for facet in ("net", "interfaces", "addresses", "routes", "listening sockets"):
            print(f"  {facet:<18} {cmp.verdict(facet)}")
        print("\nTheir routing tables:")
        for c in (a, b):
            for r in lab.view(c).routes:
                if r.family == "inet":
                    print(f"  {c.name}: {r.item()}")
        print("\nTheir listening sockets (both hold 8080 at once):")
        for c in (a, b):
            print(f"  {c.name}: {[s.item() for s in lab.view(c).listening()]}")

        print("\nA process joining a's namespace (docker run --network container:a) tries 8080:")
        inside_a = lab.run(try_8080, mode="container:a")
        print(f"  -> {inside_a}: in one namespace, one port space")
        fresh = lab.run(try_8080, mode="bridge")
        print(f"A process in a fresh bridge container tries 8080 -> {fresh}")
        ok = cmp.verdict("net") == "differs" and inside_a == "EADDRINUSE" and fresh == "bound"
    print("\nClaim C2 (namespaces isolate interfaces, addresses, routes and ports):", "seen" if ok else "NOT seen")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Step 3: host mode creates no namespace — the evidence for a bridge container and a host
container, side by side.

Two containers, both listening on a TCP port and on an abstract UNIX socket:

* ``web``, ``docker run --network bridge``: its own network namespace;
* ``top``, ``docker run --network host``: the host's network namespace, nothing new.

``lab.compare(web, top).table()`` prints every facet (namespaces, interfaces, addresses,
routes, listening sockets, hostname, sysctls) with a verdict: *shared* (one kernel object),
*same* or *differs*, and marks with ``*`` what only one side has.

Run:  sudo python3 examples/05_host_mode.py
"""
import os
import sys

from nslab import Lab

SERVER = ("import socket, sys, time\n"
          "t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "t.bind(('0.0.0.0', int(sys.argv[1]))); t.listen()\n"
          "u = socket.socket(socket.AF_UNIX); u.bind('\\0' + sys.argv[2]); u.listen()\n"
          "print('ready', flush=True); time.sleep(60)\n")


def main() -> int:
    from nslab.process import PIPE
    with Lab() as lab:
        print("docker run --name web <image>                 (bridge, listens on :80 and @web)")
        web = lab.spawn([sys.executable, "-S", "-c", SERVER, "80", "web"], name="web", stdout=PIPE)
        print("docker run --name top --network host <image>  (host, listens on :8080 and @top)")
        top = lab.spawn([sys.executable, "-S", "-c", SERVER, "8080", "top"], name="top", mode="host",
                        stdout=PIPE)
        for c in (web, top):
            assert c.child.stdout.readline().strip() == b"ready"

        print("\nThe kernel's own answer, read from /proc (not through nslab):")
        for who, pid in (("this script", os.getpid()), ("web", web.pid), ("top", top.pid)):
            print(f"  {who:<12} /proc/{pid}/ns/net -> {os.readlink(f'/proc/{pid}/ns/net')}")
        print(f"  the sandbox host's netns        -> net:[{lab.host.netns.inode}]")

        print("\nEverything each one sees, side by side:\n")
        comparison = lab.compare(web, top)
        print(comparison.table())
        print(f"\nweb vs top: shared {comparison.shared()}; differs {comparison.differs()}")
        host_vs_top = lab.compare("host", top)
        print(f"host vs top: net is {host_vs_top.verdict('net')}, interfaces {host_vs_top.verdict('interfaces')}, "
              f"listening sockets {host_vs_top.verdict('listening sockets')}")
        ok = comparison.verdict("net") == "differs" and host_vs_top.verdict("net") == "shared"
    print("\nClaims C3/C4 (host mode: no new namespace, the host's interfaces):", "seen" if ok else "NOT seen")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

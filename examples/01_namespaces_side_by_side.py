#!/usr/bin/env python3
"""Two processes in fresh network namespaces, one in the host's: their namespace identities.

A network namespace is identified by the device and inode of /proc/PID/ns/net. This script
reads them straight from /proc (not through nslab), so you can check nslab's claims:

    sudo python3 examples/01_namespaces_side_by_side.py

Without root it still works, by giving the two isolated processes a user namespace too (the
rootless way: inside it they are root, outside they are you).
"""
import os
import sys

from nslab.process import PIPE, Child


def netns_of(pid) -> str:
    """The identity of a process's network namespace, as the kernel shows it."""
    st = os.stat(f"/proc/{pid}/ns/net")
    return f"net:[{st.st_ino}] (dev {st.st_dev})"


def main() -> int:
    rootless = os.geteuid() != 0
    isolated = ("user", "net") if rootless else ("net",)
    print(f"This script (pid {os.getpid()}) is in the host's network namespace: "
          f"{netns_of('self')}")
    if rootless:
        print("Not root: the isolated children also get a user namespace.")

    print("\nStarting three `sleep 30` processes through nslab's clone trampoline:")
    print("  alpha, beta: new=('net',)  -> each in a fresh, empty network namespace "
          "(docker --network none)")
    print("  gamma:       new=()        -> stays in the host's (docker --network host)")
    alpha = Child.spawn(["sleep", "30"], new=isolated)
    beta = Child.spawn(["sleep", "30"], new=isolated)
    gamma = Child.spawn(["sleep", "30"], new=())
    with alpha, beta, gamma:
        print()
        ids = {}
        for name, child in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            ids[name] = netns_of(child.pid)
            print(f"  {name:<6} pid {child.pid:<8} {ids[name]}   {child!r}")

        host = netns_of("self")
        print("\nWhat that means:")
        print(f"  alpha and beta are in different namespaces:  {ids['alpha'] != ids['beta']}")
        print(f"  neither is the host's:                      "
              f"{host not in (ids['alpha'], ids['beta'])}")
        print(f"  gamma shares the host's:                    {ids['gamma'] == host}")

        print("\nThe interfaces alpha sees (a process joined to its namespace runs `ip -o link`):")
        join = [alpha.namespace("user"), alpha.namespace("net")] if rootless \
            else [alpha.namespace("net")]
        with Child.spawn(["ip", "-o", "link"], new=(), join=join, stdout=PIPE) as ip:
            out, _ = ip.communicate(timeout=10)
        for line in out.decode().splitlines():
            print("   ", line.split("\\")[0])

        print("\nStopping them (SIGTERM through each pidfd, reaped):")
    for child in (alpha, beta, gamma):
        print(f"  {child!r}")
    ok = ids["alpha"] != ids["beta"] and ids["gamma"] == host and host not in (
        ids["alpha"], ids["beta"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Step 7 and "Under the Hood": what the kernel holds for each mode, read with the kernel's
own tools where possible (``/proc``, ``ip``, ``nft``).

1. ``/proc/PID/ns/*`` of a bridge child and a host-mode child: which namespaces are new;
2. the host's interfaces before and after each spawn: host mode adds none, bridge adds a veth
   (and the bridge, the first time); the veth's peer is the child's ``eth0``;
3. ``ip route get`` from inside each child: the host-mode path has no bridge hop;
4. ``nft list table ip nslab``: the NAT and filter rules a published bridge port needs —
   and that host-mode traffic never meets.

Run:  sudo python3 examples/09_kernel_internals.py
"""
import os
import shutil
import subprocess
import sys

from nslab import Lab
from nslab.evidence import View


def run_in(pid, argv):
    """Run a command inside the network namespace of ``pid`` (nsenter, argv only)."""
    out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip()


def names(lab):
    return [f"{i.name}({i.kind})" for i in lab.view("host").interfaces]


def main() -> int:
    with Lab() as lab:
        steps = [("start", names(lab))]
        top = lab.spawn(["sleep", "60"], name="top", mode="host")
        steps.append(("+ host-mode child", names(lab)))
        web = lab.spawn(["sleep", "60"], name="web", publish=["8080:80"])
        steps.append(("+ bridge child", names(lab)))
        lab.spawn(["sleep", "60"], name="web2")
        steps.append(("+ second bridge child", names(lab)))

        print("1. Namespaces, as /proc shows them (same number = same namespace):")
        print(f"   {'kind':<7} {'this script':<20} {'host-mode child':<20} {'bridge child':<20}")
        for kind in ("net", "uts", "pid", "mnt", "ipc"):
            links = [os.readlink(f"/proc/{p}/ns/{kind}") for p in (os.getpid(), top.pid, web.pid)]
            print(f"   {kind:<7} {links[0]:<20} {links[1]:<20} {links[2]:<20}")
        print(f"   (the sandbox host's netns is net:[{lab.host.netns.inode}]; this script stays in the real one)")

        print("\n2. The host's interfaces after each step:")
        previous = []
        for step, now in steps:
            added = [n for n in now if n not in previous]
            print(f"   {step:<22} {' '.join(now)}" + (f"   new: {' '.join(added) or 'nothing'}" if previous else ""))
            previous = now
        host_view = View.gather("host", {"net": lab.host.netns}, peers={"web": web.netns})
        veth = next(i for i in host_view.interfaces if i.name == web.endpoint.host_ifname)
        print(f"   {veth.name}: master {veth.master}, peer {veth.peer} (the other end lives in web's netns)")

        print("\n3. The route to the outside world (198.51.100.1), asked inside each child:")
        if shutil.which("nsenter") and shutil.which("ip"):
            print(f"   host-mode child: {run_in(top.pid, ['ip', 'route', 'get', '198.51.100.1']).splitlines()[0]}")
            print(f"   bridge child:    {run_in(web.pid, ['ip', 'route', 'get', '198.51.100.1']).splitlines()[0]}")
        else:
            print("   (needs nsenter and ip)")

        print("\n4. The firewall nslab programmed for the bridge network (nft, read-only):")
        if shutil.which("nft") and shutil.which("nsenter"):
            for line in run_in(top.pid, ["nft", "list", "table", "ip", "nslab"]).splitlines():
                text = line.strip()
                if text.startswith("chain ") or "counter" in text or "vmap" in text:
                    print("   " + ("" if text.startswith("chain ") else "    ") + text.rstrip(" {"))
        else:
            print("   (nft is not installed: `apt install nftables` to see it)")
        ok = steps[1][1] == steps[0][1] and len(steps[3][1]) == len(steps[2][1]) + 1
    print("\nClaims C7/C8 (host mode: no new interface, no bridge or NAT on its path):", "seen" if ok else "NOT seen")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

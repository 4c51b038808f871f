"""What does a bridge-mode child see, next to a host-mode child? Printed side by side.

Builds, from scratch and without Docker (root needed; nothing on the real host changes):

* a sandbox "Docker host": a fresh network namespace with bridge ``nslab0`` holding the
  gateway of the subnet Docker would pick (IPAM, ``choose_subnet``);
* a **bridge child**: its own network and UTS namespaces, ``eth0`` born inside as the peer of
  a ``veth…`` enslaved to the bridge, an address from IPAM, a default route via the gateway,
  Docker's per-netns sysctls; it serves TCP :80 and an abstract UNIX socket;
* a **host child**: no namespace of its own, it runs in the sandbox host's network
  namespace (``--network host``) and serves TCP :8080 and an abstract UNIX socket.

Each child is a real process (``python3 -c ...``) started by ``subprocess`` from a throwaway
thread that entered the namespaces: a forked child inherits its thread's namespaces, so the
controlling thread never moves. Then ``View.gather`` looks at each child and ``compare``
prints what is shared and what differs. (This script will move onto the Lab API.)

Run:  sudo python3 examples/02_evidence_side_by_side.py
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile

from nslab._netlink import Rtnl
from nslab.evidence import View, compare
from nslab.ipam import Ipam, host_avoid_list, read_nameservers
from nslab.namespaces import Namespace

SERVER = r"""
import socket, sys
port, name = int(sys.argv[1]), sys.argv[2]
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port)); tcp.listen()
unix = socket.socket(socket.AF_UNIX); unix.bind("\0" + name); unix.listen()
print("ready", flush=True)
sys.stdin.read()                         # until the parent closes our stdin
"""


def start(argv, net, uts=None):
    """Popen on a thread inside ``net`` (and ``uts``): the child inherits them."""
    def spawn():
        if uts is None:
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with uts.entered():
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc = net.call(spawn)
    assert proc.stdout.readline().strip() == "ready", "child failed to start"
    return proc


def main() -> int:
    if os.geteuid() != 0:
        print("this example creates namespaces and links: run it as root", file=sys.stderr)
        return 1
    # Docker's subnet choice against the real host's on-link routes and nameservers (read only).
    with Rtnl(Namespace.current("net")) as host_rtnl:
        avoid = host_avoid_list(host_rtnl.routes(), read_nameservers())
    state_dir = tempfile.mkdtemp(prefix="nslab-example-")
    sandbox, child_net, child_uts = Namespace.create("net"), Namespace.create("net"), Namespace.create("uts")
    procs = []
    ipam = Ipam.for_network(state_dir, "nslab0", avoid)
    try:
        child_ip = ipam.allocate("bridge-child")
        prefix = ipam.subnet.prefixlen
        with Rtnl(sandbox) as rs, Rtnl(child_net) as rc:
            host_side = "veth" + secrets.token_hex(4)[:7]
            rs.request("link", "add", ifname="nslab0", kind="bridge", obj="bridge nslab0")
            bridge = rs.link_index("nslab0")
            rs.request("addr", "add", index=bridge, address=str(ipam.gateway), prefixlen=prefix,
                       obj="bridge nslab0")
            rs.request("link", "add", ifname=host_side, kind="veth", mtu=1500, obj=f"veth {host_side}",
                       peer={"ifname": "eth0", "net_ns_fd": child_net.fileno(), "mtu": 1500})
            veth = rs.link_index(host_side)
            rs.request("link", "set", index=veth, master=bridge, state="up", obj=f"veth {host_side}")
            for index in (1, bridge):
                rs.set_up(index)
            eth0 = rc.link_index("eth0")
            rc.request("addr", "add", index=eth0, address=str(child_ip), prefixlen=prefix, obj="eth0")
            rc.set_up(eth0)
            rc.set_up(1)
            rc.request("route", "add", dst="0.0.0.0/0", gateway=str(ipam.gateway), obj="default route")

        def docker_sysctls():
            for knob, value in (("ipv4/ip_unprivileged_port_start", "0"),
                                ("ipv4/ping_group_range", "0 2147483647")):
                with open(f"/proc/sys/net/{knob}", "w") as f:
                    f.write(value)
        child_net.call(docker_sysctls)
        child_uts.call(socket.sethostname, secrets.token_hex(6))      # Docker: the short id

        bridge_child = start([sys.executable, "-c", SERVER, "80", "bridge-child"], child_net, child_uts)
        host_child = start([sys.executable, "-c", SERVER, "8080", "host-child"], sandbox)
        procs += [bridge_child, host_child]

        a = View.gather("bridge child", {"net": child_net, "uts": child_uts}, pid=bridge_child.pid,
                        peers={"sandbox host": sandbox})
        b = View.gather("host child", {"net": sandbox}, pid=host_child.pid,
                        peers={"bridge child": child_net})
        print(a.table(), end="\n\n")
        print(b.table(), end="\n\n")
        print(compare(a, b).table())
        print(f"\n(gathered in {a.elapsed_ms:.1f} ms and {b.elapsed_ms:.1f} ms; "
              f"subnet {ipam.subnet} chosen as Docker would)")
        return 0
    finally:
        for proc in procs:
            proc.stdin.close()                   # the servers exit on EOF
            proc.wait(timeout=10)
            proc.stdout.close()
        ipam.close()
        Ipam.remove(state_dir, "nslab0")
        for ns in (child_uts, child_net, sandbox):   # closing the last handle frees each netns
            ns.close()
        shutil.rmtree(state_dir)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Step 5: the trade-offs — host mode's speed and convenience against its lack of walls.

Part 1, speed: nslab's datapath probe (C loops, client and server pinned to the two CPUs)
measures the same TCP traffic over three paths, in interleaved rounds: the host's loopback,
a host-mode container, and a bridge container (veth + bridge). Latency is a 1-byte
request/response round trip; throughput a bulk transfer. The ratios are this machine's.

Part 2, convenience = exposure: a service the host keeps on 127.0.0.1 is tried by a
host-mode container and by a bridge container (each measures from inside itself).

Run:  sudo python3 examples/07_tradeoffs.py
"""
import errno
import socket
import statistics
import sys

from nslab import Lab, probe
from nslab.namespaces import Namespace

ROUNDS, SECONDS = 3, 0.15


def knock(port: int) -> str:
    """Runs inside a container: connect to 127.0.0.1:port."""
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect(("127.0.0.1", port))
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
    finally:
        s.close()


def main() -> int:
    with Lab() as lab:
        web = lab.spawn(["sleep", "60"], name="web")                    # bridge
        top = lab.spawn(["sleep", "60"], name="top", mode="host")       # host
        host = lab.host.netns
        with Namespace.of_pid(web.pid, "net") as web_net, Namespace.of_pid(top.pid, "net") as top_net:
            paths = {"loopback": dict(client_ns=host, server_ns=host, address="127.0.0.1"),
                     "host mode": dict(client_ns=host, server_ns=top_net, address=str(lab.host.address)),
                     "bridge": dict(client_ns=host, server_ns=web_net, address=str(web.address))}
            lat = {p: [] for p in paths}
            gbit = {p: [] for p in paths}
            print(f"Part 1: {ROUNDS} rounds x {len(paths)} paths x (latency, throughput), {SECONDS} s each")
            for _ in range(ROUNDS):
                for name, spec in paths.items():
                    lat[name].append(probe.rr(duration=SECONDS, warmup=0.03, **spec).latency.p50_us)
                    gbit[name].append(probe.stream(duration=SECONDS, warmup=0.03, **spec).gbit_per_s)
        base_l, base_g = statistics.median(lat["loopback"]), statistics.median(gbit["loopback"])
        print(f"  {'path':<10} {'p50 latency':>12} {'ratio':>6}   {'throughput':>12} {'ratio':>6}")
        for name in paths:
            ml, mg = statistics.median(lat[name]), statistics.median(gbit[name])
            print(f"  {name:<10} {ml:9.1f} µs  x{ml / base_l:4.2f}   {mg:7.1f} Gbit/s  x{mg / base_g:4.2f}"
                  f"   (rounds: {', '.join(f'{v:.0f}' for v in lat[name])} µs)")
        print("  host mode runs the loopback path itself; bridge adds a veth pair, a bridge and MTU 1500.")

        print("\nPart 2: a service on the host's 127.0.0.1 (a database, an admin API)")
        # lab.host.call runs a function on a thread inside the host's netns: the socket is born there.
        with lab.host.call(socket.socket, socket.AF_INET, socket.SOCK_STREAM) as service:
            service.bind(("127.0.0.1", 0))
            service.listen()
            port = service.getsockname()[1]
            from_host = lab.run(knock, port, mode="host")
            from_bridge = lab.run(knock, port, mode="bridge")
        print(f"  from a host-mode container:   127.0.0.1:{port} -> {from_host}")
        print(f"  from a bridge container:      127.0.0.1:{port} -> {from_bridge}  (its own loopback)")
        ok = from_host == "connected" and from_bridge == "ECONNREFUSED"
    print("\nTrade-off: host mode is the host's own path (fast, no NAT, no mapping) and sees everything the "
          "host keeps to itself.", "" if ok else "(NOT as expected)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

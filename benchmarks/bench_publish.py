"""Published ports, side by side in one run: direct vs kernel DNAT vs nslab's userland proxy.

    sudo python3 benchmarks/bench_publish.py                  # ~1 min; prints a table
    sudo python3 benchmarks/bench_publish.py --write-results  # and the "## Publishing" section
                                                              #   of benchmarks/RESULTS.md

The sandbox (namespaces made here, nothing named, nothing left behind)::

    outside 203.0.113.2 ── uplink ── host 203.0.113.1 ── nslab0 172.17.0.1 ── c1 172.17.0.2

with one Firewall (Docker's default backend) publishing c1's server port twice:
``8080`` via ``"docker"`` (DNAT for the host's own address and the outside, the proxy for
127.0.0.1: Docker's two paths for one port) and ``8081`` via ``"proxy"`` (the proxy alone).

Paths measured, each client -> the server in c1:

=================  ==================================================================
``host direct``    host -> 172.17.0.2:5001 (the container address: no NAT, no proxy)
``host DNAT``      host -> 203.0.113.1:8080 (nat-OUTPUT DNAT)
``host proxy``     host -> 127.0.0.1:8080 (what docker-proxy serves by default)
``outside DNAT``   outside -> 203.0.113.1:8080 (nat-PREROUTING DNAT, forwarded)
``outside proxy``  outside -> 203.0.113.1:8081 (the splice proxy)
=================  ==================================================================

For each: TCP throughput (one stream) and TCP request/response latency (1 byte, ping-pong),
with ``nslab.probe`` (C loops, GIL released) when it is importable, else a plain
Python-socket harness. Nothing is pinned by default: Docker does not pin, and the proxy is a
third busy process that would otherwise share a CPU with a pinned client or server
(``--also-pinned`` adds that configuration as a second table). Rounds are interleaved (every
path once per round) so drift on a shared machine hits all paths alike; the table shows
medians over rounds and the spread. The target: proxy throughput >= 0.8x DNAT's.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from nslab._netlink import Rtnl, socket_in  # noqa: E402
from _results import RESULTS, write_section  # noqa: E402
from nslab.firewall import Firewall  # noqa: E402
from nslab.namespaces import Namespace  # noqa: E402

try:
    from nslab import probe as _probe  # the C probe (another module); optional
except ImportError:  # pragma: no cover - depends on the build
    _probe = None

HOST_UPLINK, OUTSIDE, C1, GW = "203.0.113.1", "203.0.113.2", "172.17.0.2", "172.17.0.1"
SERVER_PORT = 5001
SECTION = "## Publishing"


# --- the sandbox ---------------------------------------------------------------------------------
class Sandbox:
    def __init__(self):
        self.host = Namespace.create("net")
        self.outside = Namespace.create("net")
        self.c1 = Namespace.create("net")
        with Rtnl(self.host) as r:
            r.ipr.link("set", index=1, state="up")
            r.ipr.link("add", ifname="uplink", kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": self.outside.fileno()})
            i = r.link_index("uplink")
            r.ipr.addr("add", index=i, address=HOST_UPLINK, prefixlen=24)
            r.ipr.link("set", index=i, state="up")
            r.ipr.link("add", ifname="nslab0", kind="bridge")
            b = r.link_index("nslab0")
            r.ipr.addr("add", index=b, address=GW, prefixlen=16)
            r.ipr.link("set", index=b, state="up")
            r.ipr.link("add", ifname="vethc1", kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": self.c1.fileno()})
            v = r.link_index("vethc1")
            r.ipr.link("set", index=v, master=b)
            r.ipr.link("set", index=v, state="up")
        for ns, addr, plen, gw in ((self.outside, OUTSIDE, 24, None), (self.c1, C1, 16, GW)):
            with Rtnl(ns) as r:
                e = r.link_index("eth0")
                r.ipr.addr("add", index=e, address=addr, prefixlen=plen)
                r.ipr.link("set", index=e, state="up")
                r.ipr.link("set", index=1, state="up")
                if gw:
                    r.ipr.route("add", dst="0.0.0.0/0", gateway=gw)

        def forward():
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
        self.host.call(forward)                       # the sandbox host only

    def close(self):
        for ns in (self.host, self.outside, self.c1):
            ns.close()


# --- a plain Python harness (used when nslab.probe is not there) -----------------------------------
def _py_server(ns, mode, ready):
    lst = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", SERVER_PORT))
    lst.listen(1)
    ready.set()
    conn, _ = lst.accept()
    lst.close()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "stream":
            buf = bytearray(1 << 20)
            while conn.recv_into(buf):
                pass
        else:
            while True:
                b = conn.recv(1)
                if not b:
                    return
                conn.sendall(b)


def _py_pair(mode, client_ns, server_ns, address, port, duration):
    ready = threading.Event()
    t = threading.Thread(target=_py_server, args=(server_ns, mode, ready), daemon=True)
    t.start()
    ready.wait(5)
    s = socket_in(client_ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    s.connect((address, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        if mode == "stream":
            block = memoryview(bytearray(128 * 1024))
            sent, start = 0, time.perf_counter()
            end = start + duration
            while time.perf_counter() < end:
                s.sendall(block)
                sent += len(block)
            s.shutdown(socket.SHUT_WR)
            t.join(10)
            return {"gbit_per_s": sent * 8 / (time.perf_counter() - start) / 1e9}
        lat = []
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            t0 = time.perf_counter_ns()
            s.sendall(b"x")
            s.recv(1)
            lat.append(time.perf_counter_ns() - t0)
        lat.sort()
        return {"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
                "rate_per_s": len(lat) / duration}
    finally:
        s.close()
        t.join(10)


def measure(mode, client_ns, server_ns, address, port, duration, pin="auto"):
    if _probe is not None:
        if mode == "stream":
            r = _probe.stream(client_ns, server_ns, address=address, port=SERVER_PORT,
                              connect_port=port, duration=duration, warmup=0.3, pin=pin)
            return {"gbit_per_s": r.gbit_per_s, "seen": r.path.client_seen_by_server}
        r = _probe.rr(client_ns, server_ns, address=address, port=SERVER_PORT, connect_port=port,
                      size=1, duration=duration, warmup=0.3, pin=pin)
        return {"p50_us": r.latency.p50_us, "p99_us": r.latency.p99_us,
                "rate_per_s": r.rate_per_s, "seen": r.path.client_seen_by_server}
    return _py_pair(mode, client_ns, server_ns, address, port, duration)


# --- the run ---------------------------------------------------------------------------------------
def set_congestion(box: Sandbox, name: str | None) -> str:
    """Give every namespace of the run TCP congestion control ``name`` (None: keep what a new
    netns inherits, the host's default); return the one in force. Every throughput here
    depends on it: with BBR and no fq qdisc on a veth or bridge, TCP paces itself with a timer
    per burst, which caps one flow below what the path carries, for DNAT and direct alike."""
    def write(value):
        with open("/proc/sys/net/ipv4/tcp_congestion_control", "w") as f:
            f.write(value)

    def read():
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    if name is not None:
        for ns in (box.host, box.outside, box.c1):
            try:
                ns.call(write, name)
            except PermissionError:
                # Outside the initial netns only the algorithms of the host's
                # tcp_allowed_congestion_control may be the default (reno always is): reno is
                # loss-based and unpaced like cubic, which is what matters here.
                ns.call(write, "reno")
    return box.outside.call(read)


def run(rounds: int, duration: float, pin="auto", congestion: str | None = "cubic") -> dict:
    box = Sandbox()
    fw = Firewall(box.host)
    try:
        cc = set_congestion(box, congestion)
        fw.add_network("nslab0", "172.17.0.0/16")
        fw.publish("c1", "nslab0", C1, f"8080:{SERVER_PORT}", via="docker")
        fw.publish("c1-proxy", "nslab0", C1, f"8081:{SERVER_PORT}", via="proxy")
        paths = {
            "host direct": (box.host, C1, SERVER_PORT),
            "host DNAT": (box.host, HOST_UPLINK, 8080),
            "host proxy": (box.host, "127.0.0.1", 8080),
            "outside DNAT": (box.outside, HOST_UPLINK, 8080),
            "outside proxy": (box.outside, HOST_UPLINK, 8081),
        }
        samples: dict[str, dict[str, list]] = {p: {"stream": [], "rr": []} for p in paths}
        seen: dict[str, str] = {}
        for _ in range(rounds):
            for name, (client, addr, port) in paths.items():
                for mode in ("stream", "rr"):
                    r = measure(mode, client, box.c1, addr, port, duration, pin)
                    samples[name][mode].append(r)
                    if r.get("seen"):
                        seen[name] = r["seen"]
    finally:
        fw.close()
        box.close()
    table = {}
    for name, by_mode in samples.items():
        gbit = [r["gbit_per_s"] for r in by_mode["stream"]]
        p50 = [r["p50_us"] for r in by_mode["rr"]]
        p99 = [r["p99_us"] for r in by_mode["rr"]]
        table[name] = {"gbit_per_s": statistics.median(gbit), "gbit_min": min(gbit),
                       "gbit_max": max(gbit), "rr_p50_us": statistics.median(p50),
                       "rr_p99_us": statistics.median(p99),
                       "seen_by_server": (seen.get(name) or "?").rsplit(":", 1)[0]}
    def paired(a: str, b: str, mode: str, key: str) -> dict:
        # Ratio per round (the two measured back to back), then the median over rounds:
        # steadier than a ratio of medians on a shared, noisy machine.
        per_round = [x[key] / y[key] for x, y in zip(samples[a][mode], samples[b][mode])]
        return {"median": statistics.median(per_round), "min": min(per_round),
                "max": max(per_round)}
    ratios = {
        "host: proxy / DNAT throughput": paired("host proxy", "host DNAT", "stream", "gbit_per_s"),
        "outside: proxy / DNAT throughput": paired("outside proxy", "outside DNAT", "stream",
                                                   "gbit_per_s"),
        "host: DNAT / direct throughput": paired("host DNAT", "host direct", "stream", "gbit_per_s"),
        "host: proxy / DNAT RR p50 latency": paired("host proxy", "host DNAT", "rr", "p50_us"),
        "outside: proxy / DNAT RR p50 latency": paired("outside proxy", "outside DNAT", "rr", "p50_us"),
        "host: DNAT / direct RR p50 latency": paired("host DNAT", "host direct", "rr", "p50_us"),
    }
    return {"paths": table, "ratios": ratios, "rounds": rounds, "duration_s": duration, "pin": pin,
            "harness": ("nslab.probe (C), " + ("client and server pinned to different CPUs"
                                               if pin else "no CPU pinning"))
                       if _probe is not None else "python sockets",
            "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "congestion_control": cc, "congestion_is_hosts": congestion is None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def markdown(res: dict) -> str:
    lines = [SECTION, "",
             f"`sudo python3 benchmarks/bench_publish.py` — {res['date']}, kernel {res['kernel']}, "
             f"{res['cpus']} CPUs, Python {res['python']}, harness: {res['harness']}, "
             f"TCP congestion control {res['congestion_control']} in every namespace "
             f"({'this machine’s default' if res['congestion_is_hosts'] else 'set by the benchmark' + (': Debian’s and Ubuntu’s default' if res['congestion_control'] == 'cubic' else ', loss-based and unpaced like Debian’s and Ubuntu’s default cubic, which this host allows no namespace but its own to pick')}), "
             f"{res['rounds']} interleaved rounds of {res['duration_s']} s per path and test "
             "(medians; throughput range in brackets).", "",
             "| path | TCP stream Gbit/s | RR p50 µs | RR p99 µs | server sees |",
             "|---|---|---|---|---|"]
    for name, r in res["paths"].items():
        lines.append(f"| {name} | {r['gbit_per_s']:.2f} [{r['gbit_min']:.2f}–{r['gbit_max']:.2f}] | "
                     f"{r['rr_p50_us']:.1f} | {r['rr_p99_us']:.1f} | {r['seen_by_server']} |")
    lines += ["", "| ratio (paired per round) | median | range |", "|---|---|---|"]
    for name, v in res["ratios"].items():
        lines.append(f"| {name} | {v['median']:.2f} | {v['min']:.2f}–{v['max']:.2f} |")
    target = min(res["ratios"]["host: proxy / DNAT throughput"]["median"],
                 res["ratios"]["outside: proxy / DNAT throughput"]["median"])
    lines += ["", f"Target proxy throughput >= 0.8x DNAT: **{'met' if target >= 0.8 else 'NOT met'}** "
              f"(worst median ratio {target:.2f}). The proxy path shows the host's bridge address to the "
              "server (source hidden); DNAT keeps the client's.", ""]
    if res["pin"] is None:
        # From this run's numbers: which way the proxy went, and how far the rounds spread.
        spread = max((v["max"] - v["min"]) / 2 for v in res["ratios"].values())
        lines += [f"Reading it: in this run the proxy {'cost' if target < 1 else 'did not cost'} "
                  f"throughput against DNAT (worst median ratio {target:.2f}), and the paired ratios "
                  f"spread by up to ±{spread:.2f} between rounds: compare medians, and rerun. "
                  "(Background, not measured here: DNAT rewrites the packets of one TCP connection; "
                  "the proxy terminates TCP twice, so even with splice it spends more kernel CPU per "
                  "byte, and on 2 CPUs its busy thread competes with client and server.)", ""]
    return "\n".join(lines)



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    ap.add_argument("--also-pinned", action="store_true",
                    help="also run with client and server pinned to different CPUs (the proxy "
                         "is never pinned, so on 2 CPUs it shares one with a pinned busy thread)")
    ap.add_argument("--congestion", default="cubic",
                    help="TCP congestion control in every namespace of the run (default cubic, "
                         "Debian's and Ubuntu's default, else reno where a namespace may not pick "
                         "cubic; 'host': keep this machine's)")
    ap.add_argument("--also-host-congestion", action="store_true",
                    help="also run pinned with this machine's default congestion control")
    ap.add_argument("--write-results", action="store_true",
                    help=f"update the '{SECTION}' section of {RESULTS}")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces and nftables): run with sudo", file=sys.stderr)
        return 2
    congestion = None if args.congestion == "host" else args.congestion
    res = run(args.rounds, args.duration, None, congestion)
    text = markdown(res)
    results = [res]
    more = []
    if args.also_pinned:
        more.append(("auto", congestion))
    if args.also_host_congestion:
        more.append(("auto", None))
    for pin, cc in more:
        again = run(args.rounds, args.duration, pin, cc)
        results.append(again)
        text += "\n" + "\n".join(markdown(again).splitlines()[2:]) + "\n"
    def worst(r):
        return min(r["ratios"]["host: proxy / DNAT throughput"]["median"],
                   r["ratios"]["outside: proxy / DNAT throughput"]["median"])
    summary = "; ".join(f"{r['congestion_control']}, {'pinned' if r['pin'] else 'unpinned'}: "
                        f"{worst(r):.2f}" for r in results)
    paced = [r for r in results if r["congestion_control"] == "bbr"]
    if paced:
        # Against a run pinned the same way, where there is one: pinning moves throughput too.
        unpaced = [r for r in results if r["congestion_control"] != "bbr"]
        base = next((r for r in unpaced if r["pin"] == paced[0]["pin"]), unpaced[0] if unpaced else paced[0])
        summary += (". With BBR every flow here is held back by its pacing (no fq qdisc on a veth "
                    "or bridge, so TCP paces itself with a timer per burst: host direct "
                    f"{paced[0]['paths']['host direct']['gbit_per_s']:.1f} Gbit/s, against "
                    f"{base['paths']['host direct']['gbit_per_s']:.1f} with "
                    f"{base['congestion_control']}, {'pinned' if base['pin'] else 'unpinned'}), "
                    "and the proxy carries two paced "
                    "connections to DNAT's one. nslab's proxy keeps the namespace's default on "
                    "both, as docker-proxy does")
    text = text.replace(SECTION + "\n", f"{SECTION}\n\nWorst median proxy/DNAT throughput ratio per "
                        f"run (target >= 0.8): {summary}.\n", 1)
    print(json.dumps(results, indent=1) if args.json else text)
    if args.write_results:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""How fast a child is *ready* in each network mode, and how that scales to 1,000 children.

Ready = exec'd, with (bridge mode) eth0 addressed and routed inside and the host side
enslaved to the bridge. All in one run, interleaved, on one sandbox host:

* nslab bridge / none / container / host spawns (``Lab.spawn`` returns when the child has
  exec'd: the trampoline's error pipe reached EOF);
* the same bridge wiring as the sequence of ``ip`` commands an engineer would type
  (netns add, veth with the peer born in the netns, master + up, lo up, eth0 up, address,
  default route, then ``ip netns exec NS true``) — the baseline the ratio is against — and,
  as a second baseline, those plus the ``sysctl`` and ``nft`` commands that reach the same end
  state as nslab's spawn (Docker's sysctls, IPv6 off and arp_notify on eth0, the endpoint's
  DROP DIRECT ACCESS rule);
* scale: 1,000 bridge children on one sandbox host, each proved reachable (a TCP connect
  to a closed port answered by RST means the child's kernel answered), per-child setup cost
  at 1,000 vs at 10, controller memory per child, and nothing left after teardown.

Usage: ``sudo python3 benchmarks/bench_lab.py [--rounds 60] [--scale 1000] [--write-results]``
"""
from __future__ import annotations

import argparse
import errno
import os
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nslab import Lab  # noqa: E402
from _results import machine_line, write_section  # noqa: E402
from nslab.namespaces import Namespace, remove_persisted  # noqa: E402



def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def ms(v):
    return f"{v * 1000:.2f}"


def signed_ms(v):
    return f"{v * 1000:+.2f}"



class IpSequence:
    """The baseline: the same bridge wiring done with iproute2 commands (argv lists)."""

    def __init__(self, lab: Lab):
        self.run_dir_existed = os.path.isdir("/run/netns")
        self.host_name = "nslabbench-" + secrets.token_hex(3)
        lab.host.netns.persist(self.host_name)
        self.net = lab.network()
        self.ips = iter(range(200, 250))
        self.n = 0
        # A table of the baseline's own in the sandbox host (nslab's is owned by its socket).
        self.table = "nslabbench"
        self.ip("netns", "exec", self.host_name, "nft", "add", "table", "ip", self.table)
        self.ip("netns", "exec", self.host_name, "nft", "add", "chain", "ip", self.table, "prerouting",
                "{ type filter hook prerouting priority raw; }")

    def ip(self, *args):
        subprocess.run(["ip", *args], check=True)

    def once(self, same_end_state: bool = False) -> float:
        """One child wired by commands; with ``same_end_state``, also what nslab's bridge
        spawn does beyond the bare wiring: Docker's per-netns sysctls, eth0's (IPv6 off,
        arp_notify) and the endpoint's "DROP DIRECT ACCESS" nftables rule — one `sysctl` and
        one `nft` command more."""
        self.n += 1
        child = f"nslabbench-c{self.n}-{secrets.token_hex(2)}"
        veth = "vethb" + secrets.token_hex(3)[:5]
        ip = self.net.subnet.network_address + 60000 + self.n
        addr = f"{ip}/{self.net.subnet.prefixlen}"
        t0 = time.perf_counter()
        self.ip("netns", "add", child)
        # The same end state also means nslab's veth attributes (Docker's txqueuelen 0, one
        # queue each way); the bare wiring takes the defaults, as an engineer would.
        queues = ("txqueuelen", "0", "numtxqueues", "1", "numrxqueues", "1") if same_end_state else ()
        self.ip("-n", self.host_name, "link", "add", veth, "mtu", "1500", *queues, "type", "veth",
                "peer", "name", "eth0", "mtu", "1500", *queues, "netns", child)
        if same_end_state:
            self.ip("netns", "exec", self.host_name, "nft", "add", "rule", "ip", self.table, "prerouting",
                    "ip", "daddr", str(ip), "iifname", "!=", self.net.bridge, "drop")
        self.ip("-n", self.host_name, "link", "set", veth, "master", self.net.bridge, "up")
        if same_end_state:
            self.ip("netns", "exec", child, "sysctl", "-q", "-w", "net.ipv4.ip_unprivileged_port_start=0",
                    "net.ipv4.ping_group_range=0 2147483647", "net.ipv6.conf.eth0.disable_ipv6=1",
                    "net.ipv4.conf.eth0.arp_notify=1")
        self.ip("-n", child, "link", "set", "lo", "up")
        self.ip("-n", child, "link", "set", "eth0", "up")
        self.ip("-n", child, "addr", "add", addr, "dev", "eth0")
        self.ip("-n", child, "route", "add", "default", "via", str(self.net.gateway))
        self.ip("netns", "exec", child, "true")
        elapsed = time.perf_counter() - t0
        self.ip("-n", self.host_name, "link", "del", veth)
        self.ip("netns", "del", child)
        if same_end_state:
            self.ip("netns", "exec", self.host_name, "nft", "flush", "chain", "ip", self.table, "prerouting")
        return elapsed

    def close(self):
        # (The table would go with the sandbox netns anyway; by name, as it was made.)
        subprocess.run(["ip", "netns", "exec", self.host_name, "nft", "delete", "table", "ip", self.table],
                       check=False, capture_output=True)
        remove_persisted(self.host_name, missing_ok=True)
        if not self.run_dir_existed and os.path.isdir("/run/netns") and not os.listdir("/run/netns"):
            # iproute2 made /run/netns a shared bind mount of itself: undo exactly that.
            from nslab import _native
            try:
                _native.umount2("/run/netns", _native.MNT_DETACH)
            except OSError:
                pass
            os.rmdir("/run/netns")


def bench_ready(rounds: int, batch: int = 5) -> dict:
    """Spawn ``batch`` children per mode (each timed), then tear the batch down: creation is
    measured without a netns teardown racing it. "bridge under churn" closes each child right
    before the next spawn, so the kernel's asynchronous netns cleanup (cleanup_net, under
    rtnl_lock: performance.md) competes with the next veth creation."""
    samples = {"bridge": [], "none": [], "container": [], "host": [], "bridge under churn": [],
               "ip commands": [], "ip + sysctl + nft": []}
    with Lab() as lab:
        lab.spawn(["sleep", "600"], name="owner")  # the container: mode target
        ipseq = IpSequence(lab)
        try:
            for _ in range(3):   # warm-up: imports, first bridge, caches
                lab.spawn(["true"]).close()
            modes = ["bridge", "none", "container:owner", "host"]
            for i in range(rounds):
                # Rotated: each batch's teardown races the next batch's spawns, not always
                # the same mode's.
                for mode in modes[i % 4:] + modes[:i % 4]:
                    made = []
                    for _ in range(batch):
                        t0 = time.perf_counter()
                        made.append(lab.spawn(["true"], mode=mode))
                        samples[mode.split(":")[0]].append(time.perf_counter() - t0)
                    for c in made:
                        c.close()
                t0 = time.perf_counter()
                c = lab.spawn(["true"])
                samples["bridge under churn"].append(time.perf_counter() - t0)
                c.close()
                if i % 2 == 0:   # the ip sequence is ~10x slower: fewer samples suffice
                    samples["ip commands"].append(ipseq.once())
                    samples["ip + sysctl + nft"].append(ipseq.once(same_end_state=True))
        finally:
            ipseq.close()
    return samples


def arp_table_fulls() -> int:
    """The kernel's count of failed neighbour allocations (the ARP table at gc_thresh3), summed
    over CPUs. The table is global: it counts for every namespace (read from ours)."""
    with open("/proc/net/stat/arp_cache") as f:
        rows = f.read().split("\n")
    col = rows[0].split().index("table_fulls")
    return sum(int(r.split()[col], 16) for r in rows[1:] if r.strip())


def kernel_costs(lab, rounds: int = 20) -> dict:
    """The two kernel operations of a spawn that Docker's layout makes O(ports/rules), timed
    alone: a veth onto the bridge (peer born in a fresh netns) and one endpoint's firewall
    batch (DROP DIRECT ACCESS in raw PREROUTING; nf_tables validates the table on commit)."""
    net = lab.networks["bridge"]
    rtnl = lab.host.rtnl
    veth, nft = [], []
    for i in range(rounds):
        ns = Namespace.create("net")
        try:
            name = "vethk" + secrets.token_hex(3)[:5]
            t0 = time.perf_counter()
            rtnl.add_veth(name, master=net.index, mtu=1500, peer_ifname="eth0", peer_netns=ns, obj=name)
            veth.append(time.perf_counter() - t0)
            rtnl.delete_link(ifname=name)
        finally:
            ns.close()
        ip = net.subnet.broadcast_address - 2 - i
        t0 = time.perf_counter()
        lab.firewall.publish(f"kernel-cost-{i}", net.bridge, ip, [])
        nft.append(time.perf_counter() - t0)
        lab.firewall.unpublish(f"kernel-cost-{i}")
    return {"veth": statistics.median(veth), "nft": statistics.median(nft)}


def cpu_busy_fraction(interval: float = 0.5) -> float:
    """The machine's busy share of all CPUs over ``interval`` (from /proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]          # total, idle + iowait
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_until_quiet(limit: float = 120.0, busy: float = 0.10) -> float:
    """Wait until the machine is quiet: twice in a row under ``busy``. The kernel frees a
    closed lab's namespaces later, in its own workers (cleanup_net): after 1,000 children
    that runs for tens of seconds, and a scale run started meanwhile would time its first
    children against it. Returns the seconds waited."""
    t0 = time.monotonic()
    calm = 0
    while calm < 2 and time.monotonic() - t0 < limit:
        calm = calm + 1 if cpu_busy_fraction() < busy else 0
    return time.monotonic() - t0


def bench_scale(n: int, gratuitous_arp: bool = True, window: int = 20) -> dict:
    per_child = []
    waited = wait_until_quiet()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Lab(gratuitous_arp=gratuitous_arp) as lab:
        lab.spawn(["true"]).close()
        containers = []
        kernel_early = None
        for i in range(n):
            if i == window:
                # After the first window, not inside it: its netns and veth churn (and the
                # kernel's asynchronous netns cleanup) must not slow the children it measures.
                kernel_early = kernel_costs(lab)
                time.sleep(1.0)
            t0 = time.perf_counter()
            containers.append(lab.spawn(["sleep", "600"]))
            per_child.append(time.perf_counter() - t0)
        setup_total = sum(per_child)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kernel_late = kernel_costs(lab)

        def probe(addresses):
            unanswered = []
            for addr in addresses:
                s = socket.socket()
                s.settimeout(1.0)
                try:
                    s.connect((str(addr), 9))
                except ConnectionRefusedError:
                    pass                   # RST: the child's own kernel answered
                except OSError:
                    unanswered.append(addr)
                finally:
                    s.close()
            return unanswered
        fulls0 = arp_table_fulls()
        t0 = time.perf_counter()
        missed = lab.host.call(probe, [c.address for c in containers])
        probe_time = time.perf_counter() - t0
        fulls1 = arp_table_fulls()
        # A neighbour entry younger than 5 s is never reclaimed by the forced gc: wait that
        # long, then ask the ones that did not answer again, one by one; up to three times,
        # while each pass gets answers (each frees table entries for the next).
        missed_again, retries = missed, 0
        while missed_again and retries < 3:
            time.sleep(6.0)
            before, missed_again = len(missed_again), lab.host.call(probe, missed_again)
            retries += 1
            if len(missed_again) == before:
                break
        host_ns = lab.host.netns
        t0 = time.perf_counter()
        for c in containers:
            c.close()
        teardown = time.perf_counter() - t0
        from nslab._netlink import Rtnl
        with Rtnl(Namespace.from_fd(host_ns.fileno())) as rtnl:
            left = [l.get_attr("IFLA_IFNAME") for l in rtnl.links() if l.get_attr("IFLA_IFNAME").startswith("veth")]
    first = statistics.median(per_child[:window])
    last = statistics.median(per_child[-window:])
    return {"n": n, "gratuitous_arp": gratuitous_arp, "setup_total": setup_total, "window": window,
            "first": first, "last": last, "ratio": last / first,
            "answered": n - len(missed), "answered_after_retry": n - len(missed_again), "retries": retries,
            "arp_table_fulls": fulls1 - fulls0, "probe_time": probe_time,
            "kernel_early": kernel_early, "kernel_late": kernel_late,
            "teardown": teardown, "veths_left": len(left), "waited": waited,
            "rss_per_child_kb": (rss1 - rss0) / n}


def _gc_thresh3() -> str:
    try:
        with open("/proc/sys/net/ipv4/neigh/default/gc_thresh3") as f:
            return f.read().strip()
    except OSError:
        return "?"


def report(ready: dict, scales: list, machine: str) -> str:
    base = statistics.median(ready["ip commands"])
    lines = ["## Lab: child ready per mode", "", f"Machine: {machine}.", "",
             "| mode | median ms | p99 ms | ratio to the `ip` sequence | samples |",
             "|---|---|---|---|---|"]
    for mode, vals in ready.items():
        med = statistics.median(vals)
        lines.append(f"| {mode} | {ms(med)} | {ms(pct(vals, 0.99))} | {med / base:.3f} | {len(vals)} |")
    bridge = statistics.median(ready["bridge"])
    same = statistics.median(ready["ip + sysctl + nft"])
    lines += ["", f"Targets: bridge median ≤ 3 ms → **{ms(bridge)} ms** "
              f"({'met' if bridge <= 0.003 else 'not met'}); ≤ 0.15 × the `ip` sequence (the 8 "
              f"commands of the bare wiring) → **{bridge / base:.3f}×** "
              f"({'met' if bridge / base <= 0.15 else 'not met'}). Against the commands that reach "
              f"the same end state as nslab's bridge spawn (those 8, plus one `sysctl` for Docker's "
              f"and eth0's sysctls and one `nft` for the endpoint's DROP DIRECT ACCESS rule): "
              f"**{bridge / same:.3f}×**."]
    for sc in scales:
        garp = "on (Docker 28+)" if sc["gratuitous_arp"] else "off"
        ke, kl = sc["kernel_early"], sc["kernel_late"]
        w = sc["window"]
        lines += ["", f"### Scale: {sc['n']} bridge children on one sandbox host, gratuitous ARP {garp}", "",
                  f"- started on a quiet machine (waited {sc['waited']:.0f} s for CPU use under 10%: the "
                  f"kernel frees closed namespaces later, in its own workers)",
                  f"- setup {sc['setup_total']:.2f} s in all; per child {ms(sc['first'])} ms "
                  f"(median of children 1-{w}) vs {ms(sc['last'])} ms (the last {w}): "
                  f"**{sc['ratio']:.2f}×** (target ≤ 1.5×)",
                  f"- the kernel's share of that growth, each operation timed alone at ~20 and at "
                  f"{sc['n']} children: a veth onto the bridge {ms(ke['veth'])} → {ms(kl['veth'])} ms, "
                  f"one endpoint's nftables batch {ms(ke['nft'])} → {ms(kl['nft'])} ms "
                  f"({signed_ms(kl['veth'] - ke['veth'] + kl['nft'] - ke['nft'])} ms of the "
                  f"{signed_ms(sc['last'] - sc['first'])} ms per child); the rest of a spawn (nslab's "
                  f"Python, the child's own setup, the exec; estimated as the total minus those two) "
                  f"{ms(sc['first'] - ke['veth'] - ke['nft'])} → {ms(sc['last'] - kl['veth'] - kl['nft'])} ms: "
                  f"**{(sc['last'] - kl['veth'] - kl['nft']) / (sc['first'] - ke['veth'] - ke['nft']):.2f}×**",
                  f"- reachable from the host (RST from the child's kernel): **{sc['answered']}/{sc['n']}** "
                  f"at the first try ({sc['probe_time']:.1f} s, 1 s timeout each), "
                  f"**{sc['answered_after_retry']}/{sc['n']}** after asking the silent ones again "
                  f"({sc['retries']} pass{'es' if sc['retries'] != 1 else ''}, 6 s apart"
                  f"{'' if sc['retries'] else ': none was silent'}). "
                  f"The kernel's ARP table counted **{sc['arp_table_fulls']}** failed "
                  f"allocations (`table_fulls`, /proc/net/stat/arp_cache) during the first pass: it "
                  f"is one table for all namespaces, capped at gc_thresh3 = {_gc_thresh3()} entries, "
                  f"and reclaims none younger than 5 s; {sc['n']} children resolving the gateway "
                  f"plus the host resolving each of them need about {2 * sc['n']}",
                  f"- teardown {sc['teardown']:.2f} s; veths left on the bridge: **{sc['veths_left']}**",
                  f"- controller memory (max RSS growth) per child: {sc['rss_per_child_kb']:.1f} KiB"]
    return "\n".join(lines) + "\n"



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--scale", type=int, default=1000, help="children in the scale run (0: skip)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (it creates namespaces and links, inside a sandbox host)", file=sys.stderr)
        return errno.EPERM
    machine = machine_line()              # its load average is the one *before* the run
    ready = bench_ready(args.rounds)
    scales = [bench_scale(args.scale, garp) for garp in (True, False)] if args.scale else []
    text = report(ready, scales, machine)
    print(text)
    if args.write_results:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

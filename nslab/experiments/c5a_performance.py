"""C5a — host mode has lower latency and overhead (Step 5).

Measured with nslab's datapath probe (C loops, client and server pinned to different CPUs)
on five paths, in the same run, in interleaved rounds (so a noisy moment hurts every path
alike):

============================  ==============================================================
``loopback``                  a host process to a host process over 127.0.0.1 (the reference)
``host mode``                 the host to a host-mode container, at the host's address
``bridge``                    the host to a bridge container at its address (veth + bridge)
``published (DNAT)``          the host's address, published port 8080 -> DNAT -> container:80
``published (proxy)``         127.0.0.1:8080 -> nslab's userland proxy -> container:80
============================  ==============================================================

Per path: TCP request/response latency (1 byte each way; p50, p90, p99 per round) and TCP
throughput (receiver-counted). Each is reported as a ratio to loopback, with the spread over
the rounds. The verdict compares host mode with bridge, round by round (a paired test: a
gain counts only if it shows in most rounds and is more than a few percent), because on a
shared 2-core VM a few percent of latency is within the noise — and the numbers are this
machine's, not a law.
"""
from __future__ import annotations

import statistics
import time

from .. import probe
from ..errors import NslabError
from ..namespaces import Namespace
from ._base import DOES_NOT_HOLD, ExperimentError, label, nuance, proc_netns

ID = "C5a"
CLAIM = "Host mode has lower latency and overhead"
SABOTAGE = "host-in-own-netns"
PATHS = ("loopback", "host mode", "bridge", "published (DNAT)", "published (proxy)")


def _measure(kind: str, duration: float, spec: dict) -> dict:
    warmup = max(0.01, duration / 4)
    if kind == "rr":
        r = probe.rr(duration=duration, warmup=warmup, timeout=3.0, **spec)
        return {"p50_us": r.latency.p50_us, "p90_us": r.latency.p90_us, "p99_us": r.latency.p99_us,
                "transactions": r.transactions, "path": _path(r.path)}
    s = probe.stream(duration=duration, warmup=warmup, timeout=3.0, **spec)
    return {"gbit_per_s": s.gbit_per_s, "path": _path(s.path)}


def _path(p) -> dict:
    return {"client_netns": p.client_netns, "server_netns": p.server_netns,
            "server_address": p.server_address, "server_saw_client_as": p.client_seen_by_server,
            "mtu": p.mtu, "mss": p.mss}


def _summary(rounds: list[dict]) -> dict:
    p50 = [r["rr"]["p50_us"] for r in rounds if "rr" in r]
    p99 = [r["rr"]["p99_us"] for r in rounds if "rr" in r]
    gbit = [r["stream"]["gbit_per_s"] for r in rounds if "stream" in r]
    out = {}
    if p50:
        out["latency_us"] = {"p50": round(statistics.median(p50), 2), "min_p50": round(min(p50), 2),
                             "max_p50": round(max(p50), 2), "p99": round(statistics.median(p99), 2)}
    if gbit:
        out["gbit_per_s"] = {"median": round(statistics.median(gbit), 3), "min": round(min(gbit), 3),
                             "max": round(max(gbit), 3)}
    return out


def run(ctx):
    started = time.monotonic()
    d, rounds = ctx.perf_seconds, ctx.perf_rounds
    with ctx.lab() as lab:
        web = lab.spawn(["sleep", "60"], name="web", publish=["8080:80"])
        top = lab.spawn(["sleep", "60"], name="top", mode="host")
        host = lab.host.netns
        host_addr = str(lab.host.address)
        with Namespace.of_pid(web.pid, "net") as web_net, Namespace.of_pid(top.pid, "net") as top_net:
            specs = {
                "loopback": dict(client_ns=host, server_ns=host, address="127.0.0.1"),
                "host mode": dict(client_ns=host, server_ns=top_net, address=str(top.address or host_addr)),
                "bridge": dict(client_ns=host, server_ns=web_net, address=str(web.address)),
                "published (DNAT)": dict(client_ns=host, server_ns=web_net, address=host_addr, port=80,
                                         connect_port=8080),
                "published (proxy)": dict(client_ns=host, server_ns=web_net, address="127.0.0.1", port=80,
                                          connect_port=8080),
            }
            data: dict[str, list] = {p: [] for p in PATHS}
            errors: dict[str, str] = {}
            for _ in range(rounds):
                for name in PATHS:
                    if name in errors:
                        continue
                    entry = {}
                    try:
                        entry["rr"] = _measure("rr", d, specs[name])
                        entry["stream"] = _measure("stream", d, specs[name])
                    except NslabError as exc:
                        errors[name] = str(exc)
                        continue
                    data[name].append(entry)
        host_net, top_net_id = list(host.identity), proc_netns(top)

    for needed in ("loopback", "bridge"):
        if needed in errors:
            raise ExperimentError(f"the {needed} path could not be measured: {errors[needed]}")
    summary = {name: _summary(data[name]) for name in PATHS}
    loop = summary["loopback"]
    for name in PATHS:
        s = summary[name]
        if "latency_us" in s:
            s["latency_ratio"] = round(s["latency_us"]["p50"] / loop["latency_us"]["p50"], 3)
        if "gbit_per_s" in s:
            s["throughput_ratio"] = round(s["gbit_per_s"]["median"] / loop["gbit_per_s"]["median"], 3)
        s["error"] = errors.get(name)
        s["facts"] = data[name][0]["rr"]["path"] if data[name] else None
        s["rounds"] = [{"p50_us": r["rr"]["p50_us"], "gbit_per_s": round(r["stream"]["gbit_per_s"], 3)}
                       for r in data[name]]
    evidence = {"rounds": rounds, "seconds_per_measurement": d, "paths": summary,
                "host": {"netns": host_net}, "host_mode_child": {"pid": top.pid, "netns": top_net_id},
                "bridge_child": {"pid": web.pid, "address": str(web.address) if web.address else None},
                "published": {"host_port": 8080, "container_port": 80}}

    bridge = summary["bridge"]
    if "host mode" in errors:
        verdict = f"{DOES_NOT_HOLD} (the host-mode path could not be measured: {errors['host mode']})"
        explanation = (f"The host-mode container's server could not be reached at {host_addr}: "
                       f"{errors['host mode']}. A container that is really in the host's network namespace "
                       f"({label(host_net)}) would be; this one is in {label(top_net_id)}. Loopback ran at "
                       f"{loop['latency_us']['p50']} µs and bridge at {bridge['latency_us']['p50']} µs per round trip.")
        key = f"host-mode path failed: {errors['host mode'][:60]}"
        return ctx.result(ID, CLAIM, verdict, evidence, explanation, key, started)

    hm = summary["host mode"]
    pairs = list(zip(data["host mode"], data["bridge"]))
    lat_wins = sum(1 for h, b in pairs if b["rr"]["p50_us"] > h["rr"]["p50_us"])
    tput_wins = sum(1 for h, b in pairs if h["stream"]["gbit_per_s"] > b["stream"]["gbit_per_s"])
    lat_gain = bridge["latency_us"]["p50"] / hm["latency_us"]["p50"] - 1
    tput_gain = hm["gbit_per_s"]["median"] / bridge["gbit_per_s"]["median"]
    n = len(pairs)
    # A gain counts when it shows in most rounds (a paired sign test) and is not tiny.
    lat_sig = n > 0 and lat_wins * 2 > n and lat_gain >= 0.03
    tput_sig = n > 0 and tput_wins * 2 > n and tput_gain >= 1.1
    evidence["host_vs_bridge"] = {"rounds": n, "bridge_slower_in": lat_wins, "host_faster_in": tput_wins,
                                  "latency_gain": round(lat_gain, 3), "throughput_gain": round(tput_gain, 3)}
    numbers = (f"vs loopback, host mode ×{hm['latency_ratio']:.2f} latency and ×{hm['throughput_ratio']:.2f} "
               f"throughput; bridge ×{bridge['latency_ratio']:.2f} and ×{bridge['throughput_ratio']:.2f}")
    if lat_sig and tput_sig:
        verdict = nuance(f"both gains measured, but the ratios are this machine's ({numbers})")
    elif tput_sig:
        verdict = nuance(f"less overhead (host mode {tput_gain:.1f}× bridge throughput), but no latency gain "
                         f"beyond this machine's noise (bridge p50 {lat_gain:+.0%} vs host mode; slower in "
                         f"{lat_wins} of {n} rounds)")
    elif lat_sig:
        verdict = nuance(f"lower latency (bridge {lat_gain:+.0%}, slower in {lat_wins} of {n} rounds), but no "
                         f"throughput gain beyond the noise (×{tput_gain:.2f}, in {tput_wins} of {n} rounds)")
    else:
        verdict = (f"{DOES_NOT_HOLD} (no gain over bridge in most rounds: bridge latency {lat_gain:+.0%}, "
                   f"host-mode throughput ×{tput_gain:.2f})")
    lines = []
    for name in PATHS:
        s = summary[name]
        if s.get("error"):
            lines.append(f"{name} could not be measured ({s['error']})")
        else:
            lines.append(f"{name} {s['latency_us']['p50']:.0f} µs (×{s['latency_ratio']:.2f}) and "
                         f"{s['gbit_per_s']['median']:.1f} Gbit/s (×{s['throughput_ratio']:.2f})")
    mtu = (bridge.get("facts") or {}).get("mtu")
    explanation = (
        f"Over {n} interleaved rounds of {d:g} s per measurement, the median round-trip latency and throughput were: "
        + "; ".join(lines) + ". "
        f"Host mode runs in the host's own namespace ({label(host_net)}), so its path is the loopback path: its "
        f"ratios sit near 1. The bridge path crosses a veth pair and the bridge"
        f"{f' with an MTU of {mtu} instead of loopback’s 65536' if mtu else ''}, which costs throughput above all; "
        f"bridge was slower than host mode in {lat_wins} of {n} rounds for latency, and host mode faster in "
        f"{tput_wins} of {n} for throughput. Published ports add DNAT, or a userland proxy that copies every byte "
        f"through a second connection. These ratios describe this machine in this run; rerun to see the spread.")
    key = (f"p50 loopback {loop['latency_us']['p50']:.0f} µs, host ×{hm['latency_ratio']:.2f}, bridge "
           f"×{bridge['latency_ratio']:.2f}; Gbit/s host ×{hm['throughput_ratio']:.2f}, bridge "
           f"×{bridge['throughput_ratio']:.2f}")
    return ctx.result(ID, CLAIM, verdict, evidence, explanation, key, started)

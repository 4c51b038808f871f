"""M2 — the myth "host mode works the same on Docker Desktop for Mac/Windows" (Myth Busters).

Docker Desktop runs the Docker host inside a VM. nslab builds the same nesting with its
sandbox: the *outside* namespace plays the laptop (macOS, with its own 127.0.0.1), the
sandbox host's namespace plays the VM, and a host-mode container shares the VM's network —
not the laptop's::

    laptop (outside netns, 198.51.100.1) ──veth── VM (sandbox netns, 198.51.100.2) ── host-mode container

Measured: a host-mode server (TCP and UDP port 8080) reached inside the VM (control) and from
the laptop at the laptop's own ``localhost:8080`` — what a Mac user types. Then Docker
Desktop 4.34+'s opt-in host networking, reproduced: a userspace forwarder in the laptop
(nslab's userland proxy, one per protocol, as vpnkit does it) relays ``localhost:8080`` into
the VM. A forwarded connection counts only if the container's own banner comes back (the
proxy accepts before it dials the VM, so a bare ``connect()`` proves nothing), and the
client address the container saw is read from that banner.

Two more results are properties of this model, not measurements of Docker Desktop: a packet
of another IP protocol (253, "for experiments", RFC 3692) sent to the laptop's 127.0.0.1
cannot leave the laptop's network namespace (loopback never does), while the same packet
sent to the VM's address arrives; and a container cannot bind the laptop's address (it is
not an address of the VM). They are the model's counterparts of Docker Desktop's documented
limits (TCP/UDP only, no binding host IPs: docker-behaviors.md), which nslab does not
measure. One thing is specific to this lab: here the laptop can route to the VM's address
directly; Docker Desktop's VM sits behind NAT and is not reachable that way.
"""
from __future__ import annotations

import select
import socket
import time

from .._netlink import socket_in
from ..errors import NslabError
from ..proxy import UserlandProxy
from ._base import DOES_NOT_HOLD, Checks, errname, label, nuance, proc_netns
from ._net import connect_from, udp_from
from ._programs import start_server

ID = "M2"
CLAIM = ("Myth: host mode works the same on Docker Desktop for Mac/Windows — false: the Docker host is a VM, "
         "so the laptop's network is not the container's")
SABOTAGE = "desktop-without-vm"
PORT = 8080
PROTO = 253                       # IANA: "use for experimentation and testing" (RFC 3692)


def _raw_reaches(sender_ns, receiver_ns, address: str, timeout: float = 0.2) -> dict:
    """Send one IP-protocol-253 packet from sender_ns to ``address``; did receiver_ns see it?"""
    rx = socket_in(receiver_ns, socket.AF_INET, socket.SOCK_RAW, PROTO)
    tx = socket_in(sender_ns, socket.AF_INET, socket.SOCK_RAW, PROTO)
    with rx, tx:
        marker = f"nslab-m2-{time.monotonic_ns()}".encode()
        try:
            tx.sendto(marker, (address, 0))
        except OSError as exc:
            return {"to": address, "received": False, "error": errname(exc)}
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and select.select([rx], [], [], left)[0]:
            if marker in rx.recv(2048):
                return {"to": address, "received": True}
        return {"to": address, "received": False}


def _served(result: dict, field: str) -> bool:
    """Did the container's own server answer? (Its banner or UDP reply starts with its name.)"""
    return bool(result.get("ok")) and (result.get(field) or "").split(" ", 1)[0] == "web"


def _said(result: dict, field: str) -> str:
    """What came back instead of the container's answer, for the explanation."""
    if not result.get("ok"):
        return result.get("error", "?")
    return f"connected, but got {result.get(field)!r} instead of the container's answer"


def _forwarder(laptop, kind: int, vm_address: str, proto: str, upstream_port: int = PORT) -> tuple:
    """Bind laptop's 127.0.0.1:PORT and start a forwarder to the VM's ``upstream_port``;
    ``(proxy, socket, None)`` or ``(None, None, error)``."""
    sock = socket_in(laptop, socket.AF_INET, kind, 0)
    try:
        sock.bind(("127.0.0.1", PORT))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        return UserlandProxy.start(laptop, sock, proto, (vm_address, upstream_port), wait=False), sock, None
    except (OSError, NslabError) as exc:
        sock.close()
        return None, None, errname(exc)


def run(ctx):
    started = time.monotonic()
    with ctx.lab() as lab:
        vm = lab.host.netns
        without_vm = "desktop-without-vm" in ctx.sabotage
        laptop = vm if without_vm else lab.host.outside
        vm_addr = str(lab.host.address)
        laptop_addr = vm_addr if without_vm else str(lab.host.outside_address)
        web, bind = start_server(lab, "web", PORT, mode="host", udp=True)
        in_vm = connect_from(vm, "127.0.0.1", PORT)
        plain = {"tcp": connect_from(laptop, "127.0.0.1", PORT),
                 "udp": udp_from(laptop, "127.0.0.1", PORT, timeout=0.3)}
        via_vm_address = connect_from(laptop, vm_addr, PORT)
        binder, bind_laptop = start_server(lab, "binder", PORT + 1, mode="host", bind=laptop_addr)

        # Docker Desktop 4.34+ (opt-in): a userspace forwarder in the laptop, TCP and UDP only.
        tcp_fwd, tcp_sock, tcp_err = _forwarder(laptop, socket.SOCK_STREAM, vm_addr, "tcp")
        udp_fwd, udp_sock, udp_err = _forwarder(laptop, socket.SOCK_DGRAM, vm_addr, "udp")
        try:
            for proxy in (tcp_fwd, udp_fwd):
                if proxy is not None:
                    proxy.wait_ready()
            forwarded = {"tcp": connect_from(laptop, "127.0.0.1", PORT) if tcp_fwd else
                         {"ok": False, "error": f"forwarder could not start: {tcp_err}"},
                         "udp": udp_from(laptop, "127.0.0.1", PORT) if udp_fwd else
                         {"ok": False, "error": f"forwarder could not start: {udp_err}"}}
            raw_localhost = _raw_reaches(laptop, vm, "127.0.0.1")
            raw_vm = _raw_reaches(laptop, vm, vm_addr)
        finally:
            for proxy, sock in ((tcp_fwd, tcp_sock), (udp_fwd, udp_sock)):
                if proxy is not None:
                    proxy.close()
                if sock is not None:
                    sock.close()
        web_net, vm_net, laptop_net = proc_netns(web), list(vm.identity), list(laptop.identity)

    checks = Checks()
    checks.add("control: the service answers inside the VM", _served(in_vm, "banner"),
               in_vm.get("banner") or in_vm.get("error", ""))
    checks.add("the laptop's localhost does not reach it", not plain["tcp"]["ok"] and not plain["udp"]["ok"],
               f"tcp {plain['tcp'].get('banner') or plain['tcp'].get('error')}, "
               f"udp {plain['udp'].get('reply') or plain['udp'].get('error')}")
    tcp_fwd_ok, udp_fwd_ok = _served(forwarded["tcp"], "banner"), _served(forwarded["udp"], "reply")
    opt_in = tcp_fwd_ok and udp_fwd_ok
    # Who the container saw: the last field of its banner ("web HERE PEER"), against the
    # laptop client's own address (the local end of its connection to localhost).
    seen_as = forwarded["tcp"]["banner"].split()[-1] if tcp_fwd_ok else None
    client = forwarded["tcp"].get("local")
    raw_limited = raw_vm["received"] and not raw_localhost["received"]
    bind_limited = bind_laptop == "EADDRNOTAVAIL"
    evidence = {"laptop": {"netns": laptop_net, "address": laptop_addr},
                "vm": {"netns": vm_net, "address": vm_addr},
                "container": {"pid": web.pid, "netns": web_net, "bind": bind},
                "inside_vm": in_vm, "laptop_localhost": plain, "laptop_to_vm_address": via_vm_address,
                "bind_laptop_address": bind_laptop,
                "opt_in_forwarder": {"tcp": forwarded["tcp"], "udp": forwarded["udp"],
                                     "tcp_served_by_container": tcp_fwd_ok, "udp_served_by_container": udp_fwd_ok,
                                     "laptop_client": client, "container_saw_client_as": seen_as},
                "other_protocol": {"to_laptop_localhost": raw_localhost, "to_vm_address": raw_vm},
                "checks": checks.to_list()}
    if not checks.ok:
        verdict = checks.verdict()
    elif opt_in:
        limits = []
        if raw_limited:
            limits.append(f"an IP-protocol-{PROTO} packet sent to the laptop's 127.0.0.1 stayed in the laptop's "
                          "namespace, as loopback traffic always does, so only what the forwarder relays gets "
                          "through")
        if bind_limited:
            limits.append(f"a container binding the laptop's address {laptop_addr} got EADDRNOTAVAIL")
        verdict = nuance("Docker Desktop 4.34+ opt-in host networking forwards TCP and UDP from the laptop "
                         "through a userspace forwarder (both reached the container's service here)"
                         + ("; in this model " + "; and ".join(limits) if limits else ""))
    else:
        verdict = nuance("host mode did not reach the laptop, but this run could not show Docker Desktop 4.34+'s "
                         f"forwarder reaching the container (tcp: {_said(forwarded['tcp'], 'banner')}; "
                         f"udp: {_said(forwarded['udp'], 'reply')})")
    if tcp_fwd_ok:
        seen_host, client_host = seen_as.rsplit(":", 1)[0], (client or "").rsplit(":", 1)[0]
        if seen_as == client:
            who = "the laptop's client itself"
        elif seen_host == laptop_addr:
            who = f"the laptop's address {laptop_addr}: the forwarder's own connection, not the client at {client}"
        else:
            who = f"not the client at {client} ({client_host} on the laptop)"
        seen = f"; the container saw its client as {seen_as}, {who}"
    else:
        seen = ""
    explanation = (
        f"The host-mode server runs in {label(web_net)}, the VM's namespace ({label(vm_net)}); the laptop is "
        f"{label(laptop_net)}{' — the same namespace: there is no VM in this setup' if laptop_net == vm_net else ''}. "
        f"Inside the VM, localhost:{PORT} {'answered (' + in_vm['banner'] + ')' if in_vm['ok'] else 'failed: ' + in_vm.get('error', '')}. "
        f"On the laptop, localhost:{PORT} over TCP "
        f"{'answered' if plain['tcp']['ok'] else 'got ' + plain['tcp']['error']} and over UDP "
        f"{'answered' if plain['udp']['ok'] else 'got ' + plain['udp'].get('error', '') + ' (no reply)'}: "
        + ("the container shares the VM's network, not the laptop's. " if not plain["tcp"]["ok"]
           else "host mode behaved exactly as on Linux. ")
        + (f"(In this lab the laptop can also route to the VM's address {vm_addr}: "
           f"{'it answered' if _served(via_vm_address, 'banner') else via_vm_address.get('error') or 'no banner'}; "
           "background, not measured: Docker Desktop's VM is not routable from the Mac.) ")
        + f"With a userspace forwarder on the laptop — Docker Desktop 4.34+'s opt-in host networking — TCP "
        f"{'reached the container (' + forwarded['tcp']['banner'] + ')' if tcp_fwd_ok else 'did not reach it: ' + _said(forwarded['tcp'], 'banner')}"
        f" and UDP {'reached it (' + forwarded['udp']['reply'] + ')' if udp_fwd_ok else 'did not reach it: ' + _said(forwarded['udp'], 'reply')}"
        f"{seen}. In this model (not a measurement of Docker Desktop), a protocol-{PROTO} packet to the laptop's "
        f"127.0.0.1 {'reached' if raw_localhost['received'] else 'did not reach'} the VM"
        + (" — loopback traffic never leaves its network namespace, so only what a forwarder relays gets through"
           if not raw_localhost["received"] else "")
        + f" (sent to the VM's address it {'did' if raw_vm['received'] else 'did not'}), and a container binding the "
        f"laptop's address {laptop_addr} got {bind_laptop if bind_laptop != 'bound' else 'it (no VM in between)'}. "
        "Docker Desktop documents the matching limits of its forwarder (TCP and UDP only; containers cannot bind "
        "host IPs) — background, not measured here.")
    key = (f"laptop localhost:{PORT} {plain['tcp'].get('error') or 'reached'}; in VM "
           f"{'ok' if _served(in_vm, 'banner') else in_vm.get('error') or 'no banner'}; 4.34+ forwarder tcp "
           f"{'ok' if tcp_fwd_ok else 'x'}/udp {'ok' if udp_fwd_ok else 'x'}, "
           f"proto {PROTO} to laptop 127.0.0.1 {'not ' if not raw_localhost['received'] else ''}in VM")
    if verdict.startswith(DOES_NOT_HOLD) and not in_vm["ok"]:
        key = f"the host-mode service did not answer inside the VM either ({in_vm.get('error')})"
    return ctx.result(ID, CLAIM, verdict, evidence, explanation, key, started)

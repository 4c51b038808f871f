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
the VM. And its limits, measured: a packet of another IP protocol (253, "for experiments",
RFC 3692) sent to the laptop's localhost never reaches the VM, while the same packet sent to
the VM's address does; and a container cannot bind the laptop's address (it is not an
address of the VM). One thing is specific to this lab: here the laptop can route to the
VM's address directly; Docker Desktop's VM sits behind NAT and is not reachable that way.
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


def _forwarder(laptop, kind: int, vm_address: str, proto: str) -> tuple:
    """Bind laptop's 127.0.0.1:PORT and start a forwarder to the VM; (proxy, None) or (None, error)."""
    sock = socket_in(laptop, socket.AF_INET, kind, 0)
    try:
        sock.bind(("127.0.0.1", PORT))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        return UserlandProxy.start(laptop, sock, proto, (vm_address, PORT), wait=False), sock, None
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
    checks.add("control: the service answers inside the VM", in_vm["ok"], in_vm.get("banner") or in_vm.get("error", ""))
    checks.add("the laptop's localhost does not reach it", not plain["tcp"]["ok"] and not plain["udp"]["ok"],
               f"tcp {plain['tcp'].get('error', 'reached')}, udp {plain['udp'].get('error', 'reached')}")
    opt_in = forwarded["tcp"]["ok"] and forwarded["udp"]["ok"]
    raw_limited = raw_vm["received"] and not raw_localhost["received"]
    bind_limited = bind_laptop == "EADDRNOTAVAIL"
    evidence = {"laptop": {"netns": laptop_net, "address": laptop_addr},
                "vm": {"netns": vm_net, "address": vm_addr},
                "container": {"pid": web.pid, "netns": web_net, "bind": bind},
                "inside_vm": in_vm, "laptop_localhost": plain, "laptop_to_vm_address": via_vm_address,
                "bind_laptop_address": bind_laptop,
                "opt_in_forwarder": {"tcp": forwarded["tcp"], "udp": forwarded["udp"]},
                "other_protocol": {"to_laptop_localhost": raw_localhost, "to_vm_address": raw_vm},
                "checks": checks.to_list()}
    if not checks.ok:
        verdict = checks.verdict()
    elif opt_in:
        limits = []
        if raw_limited:
            limits.append(f"IP protocol {PROTO} sent to the laptop's localhost never reached the VM")
        if bind_limited:
            limits.append(f"binding the laptop's address {laptop_addr} failed with EADDRNOTAVAIL")
        verdict = nuance("Docker Desktop 4.34+ opt-in host networking forwards TCP and UDP from the laptop "
                         "through a userspace forwarder (both reached the container here)"
                         + ("; its limits showed: " + "; ".join(limits) if limits else ""))
    else:
        verdict = "holds"
    explanation = (
        f"The host-mode server runs in {label(web_net)}, the VM's namespace ({label(vm_net)}); the laptop is "
        f"{label(laptop_net)}{' — the same namespace: there is no VM in this setup' if laptop_net == vm_net else ''}. "
        f"Inside the VM, localhost:{PORT} {'answered' if in_vm['ok'] else 'failed: ' + in_vm.get('error', '')}. "
        f"On the laptop, localhost:{PORT} over TCP "
        f"{'answered' if plain['tcp']['ok'] else 'got ' + plain['tcp']['error']} and over UDP "
        f"{'answered' if plain['udp']['ok'] else 'got ' + plain['udp'].get('error', '') + ' (no reply)'}: "
        + ("the container shares the VM's network, not the laptop's. " if not plain["tcp"]["ok"]
           else "host mode behaved exactly as on Linux. ")
        + (f"(In this lab the laptop can also route to the VM's address {vm_addr}: "
           f"{'it answered' if via_vm_address['ok'] else via_vm_address.get('error')}; Docker Desktop's VM is not "
           f"routable from the Mac.) ")
        + f"With a userspace forwarder on the laptop — Docker Desktop 4.34+'s opt-in host networking — TCP "
        f"{'reached the container (' + forwarded['tcp']['banner'] + ')' if forwarded['tcp']['ok'] else 'failed: ' + forwarded['tcp'].get('error', '')}"
        f" and UDP {'reached it (' + forwarded['udp']['reply'] + ')' if forwarded['udp']['ok'] else 'failed: ' + forwarded['udp'].get('error', '')}; "
        f"the container sees the forwarder's address, not the laptop's client. Its limits: a protocol-{PROTO} packet "
        f"to the laptop's localhost {'reached' if raw_localhost['received'] else 'did not reach'} the VM (sent to the "
        f"VM's address it {'did' if raw_vm['received'] else 'did not'}), and a container binding the laptop's address "
        f"{laptop_addr} got {bind_laptop if bind_laptop != 'bound' else 'it (no VM in between)'}.")
    key = (f"laptop localhost:{PORT} {plain['tcp'].get('error') or 'reached'}; in VM "
           f"{'ok' if in_vm['ok'] else in_vm.get('error')}; 4.34+ forwarder tcp "
           f"{'ok' if forwarded['tcp']['ok'] else 'x'}/udp {'ok' if forwarded['udp']['ok'] else 'x'}, "
           f"proto {PROTO} {'not ' if not raw_localhost['received'] else ''}forwarded")
    if verdict.startswith(DOES_NOT_HOLD) and not in_vm["ok"]:
        key = f"the host-mode service did not answer inside the VM either ({in_vm.get('error')})"
    return ctx.result(ID, CLAIM, verdict, evidence, explanation, key, started)

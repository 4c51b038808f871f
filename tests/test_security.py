"""The security experiments S1-S7 of reliability.md, each next to a deliberately vulnerable
control that shows the check can fail.

S1 abstract UNIX sockets are per netns: only host-mode children reach the host's.
S2 no fd of the controller reaches a child unless passed.
S3 a root child in none mode has no inherited namespace fd to setns into.
S4 a port published on 127.0.0.1 cannot be reached by a neighbour on the bridge.
S5 bridges do not accept router advertisements; children cannot open packet sockets
   (CAP_NET_RAW dropped) unless asked.
S6 names with shell metacharacters are refused or passed literally; no shell ever runs.
S7 a delayed stop never signals a process that reused an exited child's pid.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from nslab import InputError, Lab
from nslab._netlink import Rtnl, socket_in
from nslab.hosts import read_sysctl
from nslab.process import PIPE, Child

pytestmark = pytest.mark.root
PY = sys.executable


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab


def run_py(lab, code: str, mode: str, **kw) -> str:
    """Run a small Python program as a lab child in ``mode``; its stdout."""
    c = lab.spawn([PY, "-S", "-c", code], mode=mode, stdout=PIPE, **kw)
    try:
        out, _ = c.child.communicate(timeout=20)
        return out.decode().strip()
    finally:
        c.close()


# --- S1 -----------------------------------------------------------------------------------
def test_s1_abstract_unix_socket_reaches_host_mode_only(lab):
    """S1: an abstract listener in the host netns is reached from host mode (the control) and refused from bridge, none and container:bridge."""
    name = b"\0nslab-s1-" + os.urandom(4).hex().encode()
    srv = socket_in(lab.host.netns, socket.AF_UNIX, socket.SOCK_STREAM, 0)
    srv.bind(name)
    srv.listen(8)
    code = ("import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(%r)\n    print('connected')\n"
            "except ConnectionRefusedError:\n    print('refused')" % name)
    try:
        owner = lab.spawn(["sleep", "60"], name="s1-owner")
        results = {mode: run_py(lab, code, mode) for mode in ("host", "bridge", "none", "container:s1-owner")}
        owner.close()
    finally:
        srv.close()
    assert results == {"host": "connected", "bridge": "refused", "none": "refused",
                       "container:s1-owner": "refused"}


def _abstract_sockets_of(pid: int) -> list[str]:
    """Abstract (@-named) UNIX sockets among the fds of ``pid``, read in its own netns."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    with open(f"/proc/{pid}/net/unix") as f:
        for row in f.read().splitlines()[1:]:
            parts = row.split()
            if len(parts) >= 8 and parts[6] in inodes and parts[7].startswith("@"):
                found.append(parts[7])
    return found


def test_s1_nslab_control_sockets_are_not_abstract(lab):
    """S1: nslab's controller and its proxies hold no abstract UNIX socket (control: the checker sees one we make)."""
    c = lab.spawn(["sleep", "60"], name="s1-pub", publish=["127.0.0.1::80"])
    try:
        proxies = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_proxy_of(int(p), os.getpid())]
        assert proxies, "a published port runs a proxy"
        for pid in proxies + [os.getpid()]:
            assert _abstract_sockets_of(pid) == [], pid
    finally:
        c.close()
    control = socket.socket(socket.AF_UNIX)
    control.bind(b"\0nslab-s1-control-" + os.urandom(4).hex().encode())
    try:
        assert _abstract_sockets_of(os.getpid())
    finally:
        control.close()


def _is_proxy_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return False
    return b"nslab.proxy" in cmd and ppid == parent


# --- S2 -----------------------------------------------------------------------------------
@pytest.fixture
def leaky_fds():
    """A non-CLOEXEC directory fd, netns fd and netlink socket in the controller."""
    d = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    n = os.open("/proc/self/ns/net", os.O_RDONLY)
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    for fd in (d, n, s.fileno()):
        os.set_inheritable(fd, True)
    yield [d, n, s.fileno()]
    os.close(d)
    os.close(n)
    s.close()


def child_fds(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


@pytest.mark.parametrize("mode", ["bridge", "host", "none", "container:s2-owner"])
def test_s2_no_leaked_fd_reaches_a_child(lab, leaky_fds, mode):
    """S2: inheritable dir, netns and netlink fds of the controller never reach a child: its fds are exactly 0, 1, 2."""
    owner = lab.spawn(["sleep", "60"], name="s2-owner") if mode.startswith("container") else None
    c = lab.spawn(["sleep", "60"], mode=mode, name="s2")
    try:
        assert child_fds(c.pid) == {0, 1, 2}
    finally:
        c.close()
        if owner:
            owner.close()


def test_s2_control_passed_and_unprotected_fds_are_seen(lab, leaky_fds):
    """S2 control: an fd passed on purpose shows up in the child, and a plain fork/exec without close_fds leaks all three."""
    c = lab.spawn(["sleep", "60"], name="s2-pass", pass_fds=[leaky_fds[0]])
    try:
        assert child_fds(c.pid) == {0, 1, 2, leaky_fds[0]}
    finally:
        c.close()
    p = subprocess.Popen(["sleep", "60"], close_fds=False)
    try:
        assert set(leaky_fds) <= child_fds(p.pid)
    finally:
        p.kill()
        p.wait()


# --- S3 -----------------------------------------------------------------------------------
SETNS_PROBE = """
import ctypes, os, json
libc = ctypes.CDLL(None, use_errno=True)
before = os.readlink('/proc/self/ns/net')
ok = [fd for fd in range(3, 256) if libc.setns(fd, 0x40000000) == 0]
print(json.dumps({'ok': ok, 'moved': os.readlink('/proc/self/ns/net') != before}))
"""


def test_s3_none_mode_root_child_cannot_setns_out(lab):
    """S3: a root child in none mode tries setns(CLONE_NEWNET) on every fd: none works, it stays isolated."""
    result = json.loads(run_py(lab, SETNS_PROBE, "none"))
    assert result == {"ok": [], "moved": False}


def test_s3_control_a_passed_netns_fd_lets_it_escape(lab):
    """S3 control: given the host's netns fd on purpose, the same probe does escape (so the probe works)."""
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        result = json.loads(run_py(lab, SETNS_PROBE, "none", pass_fds=[fd]))
    finally:
        os.close(fd)
    assert result == {"ok": [fd], "moved": True}


# --- S4 -----------------------------------------------------------------------------------
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _syn(src_mac, dst_mac, src_ip, dst_ip, sport, dport) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0x1234, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src_ip) + socket.inet_aton(dst_ip) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, socket.inet_aton(src_ip),
                     socket.inet_aton(dst_ip))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00" + ip + tcp


def _synack_seen(ns, frame: bytes, sport: int, timeout: float = 2.0) -> bool:
    """Send ``frame`` out of eth0 in ``ns`` (a raw packet, as an attacker on the bridge would) and
    watch eth0 for a SYN-ACK to ``sport``."""
    def inside() -> bool:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        try:
            s.bind(("eth0", 0))
            s.send(frame)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not select.select([s], [], [], left)[0]:
                    break
                pkt = s.recv(2048)
                ihl = (pkt[14] & 0x0F) * 4
                if pkt[23] != 6:
                    continue
                tcp = pkt[14 + ihl:]
                dport, flags = struct.unpack("!H", tcp[2:4])[0], tcp[13]
                if dport == sport and flags & 0x12 == 0x12:
                    return True
            return False
        finally:
            s.close()
    return ns.call(inside)


SERVER = ("import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 80))\ns.listen(64)\nprint('up', flush=True)\nimport time\ntime.sleep(120)")


def test_s4_localhost_publish_unreachable_from_bridge_neighbour(lab):
    """S4: a SYN to 127.0.0.1:<published port> sent by a bridge neighbour gets no answer, route_localnet stays 0
    (control: the same crafted SYN to the server's own address is answered)."""
    srv = lab.spawn([PY, "-S", "-c", SERVER], name="s4-srv", publish=["127.0.0.1:18080:80"], stdout=PIPE)
    nb = lab.spawn(["sleep", "60"], name="s4-nb")
    try:
        assert srv.child.stdout.readline() == b"up\n"
        bridge = lab.networks["bridge"].bridge
        with Rtnl(lab.host.netns) as r:
            gw_mac = r.link(ifname=bridge).get_attr("IFLA_ADDRESS")
        with Rtnl(nb.netns) as r:
            nb_mac = r.link(ifname="eth0").get_attr("IFLA_ADDRESS")
        nb_ip = str(nb.address)
        attack = _syn(nb_mac, gw_mac, nb_ip, "127.0.0.1", 40001, 18080)
        assert not _synack_seen(nb.netns, attack, 40001)
        for name in (f"net.ipv4.conf.{bridge}.route_localnet", "net.ipv4.conf.all.route_localnet"):
            assert read_sysctl(lab.host.netns, name) == "0"
        # Control: same machinery, a destination the neighbour may reach (ICC on one bridge).
        control = _syn(nb_mac, gw_mac, nb_ip, str(srv.address), 40002, 80)
        assert _synack_seen(nb.netns, control, 40002)
    finally:
        srv.close()
        nb.close()


def test_s4_localhost_publish_unreachable_from_outside():
    """S4 (moby#45610): a machine on the host's uplink sending to 127.0.0.1:<port> gets no answer, though DNAT
    applies there; control: the same packet to the host's uplink address and a 0.0.0.0-published port is answered."""
    with Lab() as lab:      # its own: a reused container address would meet a stale ARP entry (see test_lifecycle)
        _s4_outside(lab)


def _s4_outside(lab):
    srv = lab.spawn([PY, "-S", "-c", SERVER], name="s4-out", publish=["127.0.0.1:18090:80", "18091:80"],
                    stdout=PIPE)
    try:
        assert srv.child.stdout.readline() == b"up\n"
        with Rtnl(lab.host.netns) as r:
            host_mac = r.link(ifname="eth0").get_attr("IFLA_ADDRESS")
        with Rtnl(lab.host.outside) as r:
            out_mac = r.link(ifname="eth0").get_attr("IFLA_ADDRESS")
        me, host = str(lab.host.outside_address), str(lab.host.address)
        assert not _synack_seen(lab.host.outside, _syn(out_mac, host_mac, me, "127.0.0.1", 40003, 18090), 40003)
        assert _synack_seen(lab.host.outside, _syn(out_mac, host_mac, me, host, 40004, 18091), 40004)
    finally:
        srv.close()


# --- S5 -----------------------------------------------------------------------------------
PACKET_PROBE = """
import socket
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    print('opened')
except PermissionError:
    print('EPERM')
"""


def test_s5_bridge_refuses_router_advertisements(lab):
    """S5: every bridge nslab makes has accept_ra=0, so a child cannot reconfigure the host with a forged RA."""
    lab.network("s5net")
    for net in lab.networks.values():
        assert read_sysctl(lab.host.netns, f"net.ipv6.conf.{net.bridge}.accept_ra") == "0"


@pytest.mark.parametrize("mode", ["bridge", "none", "host", "container:s5-owner"])
def test_s5_children_cannot_open_packet_sockets_by_default(lab, mode):
    """S5: with nslab's default capabilities a child cannot open an AF_PACKET raw socket (no ARP/RA forging)."""
    owner = lab.spawn(["sleep", "60"], name="s5-owner") if mode.startswith("container") else None
    try:
        assert run_py(lab, PACKET_PROBE, mode) == "EPERM"
    finally:
        if owner:
            owner.close()


def test_s5_control_asked_for_net_raw_it_is_there(lab):
    """S5 control (the vulnerable configuration, Docker's default): with cap_drop=() the same probe opens one."""
    assert run_py(lab, PACKET_PROBE, "bridge", cap_drop=()) == "opened"


def test_s5_control_probe_sees_a_missing_capability():
    """S5 control: the probe reports EPERM when the capability is really missing (a child in its own user namespace)."""
    c = Child.spawn([PY, "-S", "-c", PACKET_PROBE], new=("user",), stdout=PIPE)
    out, _ = c.communicate(timeout=20)
    c.close()
    assert out.decode().strip() == "EPERM"


# --- S6 -----------------------------------------------------------------------------------
def test_s6_shell_metacharacters_refused_or_literal(lab, monkeypatch, tmp_path):
    """S6: names with shell syntax are refused with InputError, argv passes them literally, and no shell runs."""
    from test_malformed_input import ShellWatch
    canary = tmp_path / "pwned"
    evil = [f"x;touch {canary}", f"y$(touch {canary})", f"`touch {canary}`", "a|b", "a&&b"]
    with ShellWatch(monkeypatch) as watch:
        for name in evil:
            for call in (lambda: lab.spawn(["true"], name=name), lambda: lab.network(name),
                         lambda: lab.spawn(["true"], hostname=name), lambda: lab.spawn(["true"], mode=name),
                         lambda: lab.spawn(["true"], mode=f"container:{name}")):
                with pytest.raises(InputError):
                    call()
        c = lab.spawn(["printf", "%s|", *evil], mode="none", name="s6", stdout=PIPE)
        out, _ = c.child.communicate(timeout=10)
        c.close()
    assert out.decode() == "".join(f"{e}|" for e in evil)
    assert not canary.exists()
    assert watch.shells == [] and watch.programs == ["printf"]


# --- S7 -----------------------------------------------------------------------------------
PID_REUSE = r"""
import json, os, signal, subprocess, time
from nslab.process import Child
out = {}
a = Child.spawn(["sleep", "60"], new=())
pid = a.pid
a.kill()
# Someone reaps it behind nslab's back (a SIGCHLD handler, waitpid(-1)): its pid is free.
while True:
    p, _ = os.waitpid(-1, 0)
    if p == pid:
        break
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
b = subprocess.Popen(["sleep", "60"])
out["reused"] = b.pid == pid
# The delayed stop, through nslab: the pidfd still names the dead process.
out["signalled"] = [a.send_signal(signal.SIGTERM), a.kill()]
time.sleep(0.2)
out["stranger_alive_after_nslab"] = b.poll() is None
# The vulnerable control: the same stop by raw pid.
os.kill(pid, signal.SIGKILL)
b.wait()
out["stranger_killed_by_raw_pid"] = b.returncode == -signal.SIGKILL
print(json.dumps(out), flush=True)
"""


def test_s7_delayed_stop_never_hits_a_reused_pid():
    """S7: after an exited child's pid is reused (forced with ns_last_pid in a fresh pid namespace), nslab's stop
    signals nobody and the stranger lives; the raw-pid control kills the stranger."""
    c = Child.spawn([PY, "-c", PID_REUSE], new=("pid", "mnt"), stdout=PIPE, stderr=PIPE)
    out, err = c.communicate(timeout=60)
    c.close()
    result = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else err.decode()
    assert result == {"reused": True, "signalled": [False, False], "stranger_alive_after_nslab": True,
                      "stranger_killed_by_raw_pid": True}, result


def test_s7_lab_stop_after_exit_is_harmless(lab):
    """S7 at the lab level: stop() and kill() of a container whose child already exited return without signalling."""
    c = lab.spawn(["true"], mode="none", name="s7")
    assert c.wait(10) == 0
    assert c.child.send_signal(signal.SIGTERM) is False
    assert c.stop() == 0
    c.kill()
    c.close()

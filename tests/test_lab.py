"""The four network modes against real kernel state, inside a sandbox host (root tier)."""
import errno
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from nslab import InputError, Lab
from nslab._netlink import Rtnl, socket_in
from nslab.hosts import read_sysctl
from nslab.namespaces import Namespace



@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


def links(ns):
    """{name: link message} of a namespace, read through rtnetlink."""
    with Rtnl(Namespace.from_fd(ns.fileno())) as rtnl:
        return {l.get_attr("IFLA_IFNAME"): l for l in rtnl.links()}


def proc_identity(pid, kind="net"):
    st = os.stat(f"/proc/{pid}/ns/{kind}")
    return (st.st_dev, st.st_ino)


def connect_from(ns, address, port=9, timeout=3.0):
    """Connect from inside ``ns``; returns 'open', 'refused' (RST: the peer's kernel answered)
    or the errno name of the failure."""
    s = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    s.settimeout(timeout)
    try:
        s.connect((str(address), port))
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()


@pytest.mark.root
def test_bridge_child_is_wired_like_docker(lab):
    """A bridge child has its own netns with lo+eth0, an address from 172.17/16, a default route
    via the gateway, Docker's sysctls, and a veth<7 hex> host side enslaved to nslab0."""
    c = lab.spawn(["sleep", "30"])
    assert proc_identity(c.pid) == c.netns.identity != lab.host.netns.identity
    inside = links(c.netns)
    assert set(inside) == {"lo", "eth0"}
    eth0 = inside["eth0"]
    assert eth0.get_attr("IFLA_MTU") == 1500 and eth0["flags"] & 1
    assert inside["lo"]["flags"] & 1
    net = lab.networks["bridge"]
    assert net.bridge == "nslab0" and net.subnet == ipaddress.IPv4Network("172.17.0.0/16")
    assert c.address == ipaddress.IPv4Address("172.17.0.2")
    with Rtnl(Namespace.from_fd(c.netns.fileno())) as rtnl:
        addrs = {(a.get_attr("IFA_LOCAL"), a["prefixlen"]) for a in rtnl.addresses()}
        default = [r for r in rtnl.routes() if r["dst_len"] == 0]
    assert ("172.17.0.2", 16) in addrs
    assert default and default[0].get_attr("RTA_GATEWAY") == "172.17.0.1"
    assert read_sysctl(c.netns, "net.ipv4.ip_unprivileged_port_start") == "0"
    assert read_sysctl(c.netns, "net.ipv4.ping_group_range").split() == ["0", "2147483647"]
    host = links(lab.host.netns)
    veth = host[c.endpoint.host_ifname]
    assert re.fullmatch(r"veth[0-9a-f]{7}", c.endpoint.host_ifname)
    assert veth.get_attr("IFLA_MASTER") == host["nslab0"]["index"]
    assert veth.get_attr("IFLA_MTU") == 1500
    # Docker's txqueuelen 0 on both ends; one queue each way (the count a veth uses anyway).
    for end in (veth, eth0):
        assert end.get_attr("IFLA_TXQLEN") == 0
        assert (end.get_attr("IFLA_NUM_TX_QUEUES"), end.get_attr("IFLA_NUM_RX_QUEUES")) == (1, 1)
    # The peer of the host side is eth0 in the child: the veth's IFLA_LINK is eth0's index.
    assert veth.get_attr("IFLA_LINK") == eth0["index"]
    assert read_sysctl(lab.host.netns, "net.ipv6.conf.nslab0.accept_ra") == "0"
    assert read_sysctl(lab.host.netns, "net.ipv4.ip_forward") == "1"


@pytest.mark.root
@pytest.mark.parametrize("new", [(), ("user",)], ids=["by the child", "from the parent"])
def test_bridge_child_is_wired_before_its_program_runs(lab, new):
    """The child's first act sees its network complete: eth0 addressed, up, routed, IPv6 off,
    announced (arp_notify), Docker's sysctls. Both ways of configuring it: by the parked child itself (C), and — for a
    child in its own user namespace — by a thread of ours inside its netns."""
    probe = ("import json, subprocess\n"
             "print(json.dumps({'addr': subprocess.run(['ip', '-j', 'addr', 'show', 'eth0'], "
             "capture_output=True, text=True).stdout, 'route': subprocess.run(['ip', '-j', 'route'], "
             "capture_output=True, text=True).stdout, 'v6': open('/proc/sys/net/ipv6/conf/eth0/disable_ipv6').read(), "
             "'port': open('/proc/sys/net/ipv4/ip_unprivileged_port_start').read(), "
             "'arp_notify': open('/proc/sys/net/ipv4/conf/eth0/arp_notify').read()}))")
    c = lab.spawn([sys.executable, "-c", probe], new=new, stdout=subprocess.PIPE)
    seen = json.loads(c.child.stdout.read())
    assert c.wait() == 0
    addr = json.loads(seen["addr"])[0]
    assert "UP" in addr["flags"] and addr["mtu"] == 1500
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"] if a["family"] == "inet"] == [(str(c.address), 16)]
    routes = json.loads(seen["route"])
    assert {"dst": "default", "gateway": "172.17.0.1", "dev": "eth0"}.items() <= routes[0].items()
    assert seen["v6"].strip() == "1" and seen["port"].strip() == "0"
    assert seen["arp_notify"].strip() == "1"      # the kernel's gratuitous ARP when eth0 comes up


@pytest.mark.root
def test_bridge_children_reach_each_other_and_the_gateway(lab):
    """Two bridge children and the gateway answer each other (RST from a closed port)."""
    a = lab.spawn(["sleep", "30"])
    b = lab.spawn(["sleep", "30"])
    assert connect_from(a.netns, b.address) == "refused"
    assert connect_from(b.netns, a.address) == "refused"
    assert connect_from(a.netns, lab.networks["bridge"].gateway) == "refused"


@pytest.mark.root
def test_two_children_bind_the_same_port(lab):
    """Separate namespaces have separate port spaces: both bind :80 (C2)."""
    a, b = lab.spawn(["sleep", "30"]), lab.spawn(["sleep", "30"])
    socks = []
    for c in (a, b):
        s = socket_in(c.netns, socket.AF_INET, socket.SOCK_STREAM, 0)
        s.bind(("0.0.0.0", 80))
        socks.append(s)
    for s in socks:
        s.close()


@pytest.mark.root
def test_none_child_has_only_lo_up_and_reaches_nothing(lab):
    """none: a fresh netns with only lo, and lo is up; no route anywhere else."""
    c = lab.spawn(["sleep", "30"], mode="none")
    inside = links(c.netns)
    assert set(inside) == {"lo"} and inside["lo"]["flags"] & 1
    assert c.netns.identity == proc_identity(c.pid) != lab.host.netns.identity
    assert connect_from(c.netns, lab.host.address) == "ENETUNREACH"
    assert connect_from(c.netns, "127.0.0.1") == "refused"


@pytest.mark.root
def test_host_child_shares_the_host_netns_and_view(lab):
    """host: no new netns; the child's view of interfaces equals the host's."""
    c = lab.spawn(["sleep", "30"], mode="host")
    assert proc_identity(c.pid) == lab.host.netns.identity
    assert lab.compare("host", c).verdict("net") == "shared"
    assert lab.compare("host", c).verdict("interfaces") in ("same", "shared")


@pytest.mark.root
def test_host_child_creates_no_interface(lab):
    """A host-mode child adds no link to the host; a bridge child adds exactly one veth."""
    lab.network()
    before = set(links(lab.host.netns))
    lab.spawn(["sleep", "30"], mode="host")
    assert set(links(lab.host.netns)) == before
    b = lab.spawn(["sleep", "30"])
    assert set(links(lab.host.netns)) - before == {b.endpoint.host_ifname}


@pytest.mark.root
def test_container_mode_shares_the_owner_netns(lab):
    """container:X joins X's netns; when X goes, the dependant is told (no hang), and
    joining a stopped container is refused."""
    owner = lab.spawn(["sleep", "30"], name="owner")
    dep = lab.spawn(["sleep", "30"], mode="container:owner")
    assert proc_identity(dep.pid) == proc_identity(owner.pid)
    assert dep.address == owner.address and dep.owner_alive
    owner.close()
    assert not dep.owner_alive
    # Docker's caveat: the dependant keeps a netns whose eth0 went with its owner's endpoint.
    assert set(links(dep.netns)) == {"lo"}
    with pytest.raises(InputError, match="owner"):
        lab.spawn(["true"], mode="container:owner")


@pytest.mark.root
def test_container_mode_rejects_publish_and_hostname(lab):
    """Docker's conflicting-options errors for container: mode, before anything starts."""
    lab.spawn(["sleep", "30"], name="owner")
    with pytest.raises(InputError, match="conflicting options: port publishing"):
        lab.spawn(["true"], mode="container:owner", publish=["8080:80"])
    with pytest.raises(InputError, match="conflicting options: hostname"):
        lab.spawn(["true"], mode="container:owner", hostname="x")


@pytest.mark.root
def test_two_bridge_networks_are_isolated(lab):
    """Like Docker's, two bridge networks cannot reach each other; each reaches its own."""
    a = lab.spawn(["sleep", "30"])
    b = lab.spawn(["sleep", "30"], mode="other")
    assert lab.networks["other"].subnet == ipaddress.IPv4Network("172.18.0.0/16")
    assert connect_from(a.netns, b.address, timeout=0.5) in ("timeout", "EHOSTUNREACH", "ECONNREFUSED")
    assert connect_from(b.netns, a.address, timeout=0.5) in ("timeout", "EHOSTUNREACH", "ECONNREFUSED")
    c = lab.spawn(["sleep", "30"], mode="other")
    assert connect_from(b.netns, c.address) == "refused"


@pytest.mark.root
def test_subnet_skips_pools_on_host_routes(lab):
    """A docker0 on the host (an on-link 172.17/16 route) pushes nslab's pool to 172.18/16."""
    lab.host.rtnl.request("link", "add", ifname="docker0", kind="bridge", obj="fake docker0")
    idx = lab.host.rtnl.link_index("docker0")
    lab.host.rtnl.request("addr", "add", index=idx, address="172.17.0.1", prefixlen=16, obj="docker0 addr")
    lab.host.rtnl.set_up(idx)
    assert lab.network().subnet == ipaddress.IPv4Network("172.18.0.0/16")


@pytest.mark.root
def test_close_removes_veth_and_releases_the_address(lab):
    """Closing a child removes its host-side veth and frees its address for the next one."""
    c = lab.spawn(["sleep", "30"])
    name, addr = c.endpoint.host_ifname, c.address
    c.close()
    c.close()  # idempotent
    assert name not in links(lab.host.netns)
    assert lab.spawn(["sleep", "30"]).address == addr


@pytest.mark.root
def test_teardown_after_child_killed_underneath(lab):
    """A child SIGKILLed behind the lab's back still tears down cleanly."""
    c = lab.spawn(["sleep", "30"])
    os.kill(c.pid, 9)
    c.wait(5)
    name = c.endpoint.host_ifname
    c.close()
    assert name not in links(lab.host.netns)


def my_netns():
    st = os.stat("/proc/self/ns/net")
    return (st.st_dev, st.st_ino)


@pytest.mark.root
def test_run_a_callable_in_each_mode(lab):
    """lab.run returns the child's result: its netns identity differs or not per mode."""
    assert lab.run(my_netns, mode="host") == lab.host.netns.identity
    assert lab.run(my_netns, mode="bridge") != lab.host.netns.identity
    assert lab.run(my_netns, mode="none") != lab.host.netns.identity
    with pytest.raises(ZeroDivisionError):
        lab.run(divmod, 1, 0)
    with pytest.raises(InputError, match="fn"):
        lab.run(lambda: 1)
    assert lab.networks["bridge"].endpoints == {}


@pytest.mark.root
def test_publish_is_discarded_in_host_mode(lab):
    """Docker's exact warning; the child still starts."""
    with pytest.warns(UserWarning, match="Published ports are discarded when using host network mode"):
        c = lab.spawn(["sleep", "30"], mode="host", publish=["8080:80"])
    assert c.published == [] and c.warnings


@pytest.mark.root
@pytest.mark.parametrize("kwargs, field", [
    ({"mode": "bridgee:x"}, "mode"),
    ({"mode": "container:"}, "mode"),
    ({"mode": "container:no such"}, "mode"),
    ({"mode": "container:ghost"}, "mode"),
    ({"mode": 7}, "mode"),
    ({"name": "a/b"}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"hostname": "-bad"}, "hostname"),
    ({"new": ("net",)}, "new"),
    ({"new": ("bogus",)}, "namespace kind"),
    ({"publish": ["99999:80"]}, "publish"),
])
def test_bad_input_changes_nothing(lab, kwargs, field):
    """Each bad argument is an InputError naming the field, before any link appears."""
    lab.network()
    before = set(links(lab.host.netns))
    with pytest.raises(InputError) as info:
        lab.spawn(["sleep", "1"], **kwargs)
    assert field in str(info.value)
    assert set(links(lab.host.netns)) == before


@pytest.mark.root
@pytest.mark.parametrize("subnet", ["172.20.0.1/16", "10.0.0.0/31", "198.51.100.0/25", "fd00::/64", "nonsense"])
def test_bad_subnet_is_refused_before_any_change(lab, subnet):
    """Host bits, too small, overlapping the host's routes, not IPv4: InputError('subnet')."""
    before = set(links(lab.host.netns))
    with pytest.raises(InputError, match="subnet"):
        lab.network("n1", subnet=subnet)
    assert set(links(lab.host.netns)) == before


@pytest.mark.root
@pytest.mark.parametrize("argv", [[], "sleep 1", ["sleep", "1\0"], [b"sleep"], None])
def test_bad_argv_is_refused(lab, argv):
    """argv is a non-empty list of str without NUL: no shell, ever."""
    with pytest.raises(InputError, match="argv"):
        lab.spawn(argv)


@pytest.mark.root
def test_lab_close_is_idempotent_and_leaves_no_state_dir():
    """Closing twice is fine; the sandbox's private state dir is gone afterwards."""
    lab = Lab()
    c = lab.spawn(["sleep", "30"])
    state_dir = lab.host.state_dir
    assert os.path.isdir(state_dir)
    lab.close()
    lab.close()
    assert not os.path.exists(state_dir)
    assert c.closed and c.child.returncode is not None
    assert not os.path.exists(lab.record.path)


ROOTLESS_SCRIPT = """
import socket, sys, time
import nslab
with nslab.Lab() as lab:
    web = lab.spawn([sys.executable, "-m", "http.server", "80"], publish=["8080:80"], stdout=-3, stderr=-3)
    top = lab.spawn(["sleep", "5"], mode="host")
    assert lab.compare(web, top).verdict("net") == "differs"
    def get():
        for _ in range(50):
            try:
                s = socket.create_connection((str(lab.host.address), 8080), timeout=2)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        return s.recv(12)
    print(lab.host.outside_call(get).decode())
"""


@pytest.mark.userns
def test_rootless_lab_in_a_user_namespace():
    """Inside `unshare -Urn` a whole lab works: bridge, host mode, and a published port
    reached from the simulated outside."""
    import subprocess
    import sys
    out = subprocess.run(["unshare", "-Urn", sys.executable, "-c", ROOTLESS_SCRIPT],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.0 200")


@pytest.mark.root
def test_nat_backend_is_refused_on_the_current_host():
    """published_via='nat' changes host-netns sysctls: refused outside a sandbox, before anything."""
    with pytest.raises(InputError, match="published_via"):
        Lab(host="current", published_via="nat")


@pytest.mark.root
def test_nat_backend_sets_hairpin_on_the_bridge_port(lab):
    """With Docker's userland proxy off, every bridge port is in hairpin mode."""
    c = lab.spawn(["sleep", "30"], publish=["8080:80"], published_via="nat")
    d = lab.spawn(["sleep", "30"])
    def mode(container):
        index = lab.host.rtnl.link_index(container.endpoint.host_ifname)
        info = lab.host.rtnl.ipr.brport("show", index=index)[0].get_attr("IFLA_PROTINFO")
        return dict(info["attrs"]).get("IFLA_BRPORT_MODE")
    assert mode(c) == 1 and mode(d) == 0


def caps_of(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":\t", 1) for line in f if line.startswith("Cap"))
    return {k: int(v, 16) for k, v in fields.items()}


@pytest.mark.root
def test_children_lose_net_raw_unless_asked(lab):
    """By default a child has no CAP_NET_RAW (no ARP/RA forging); cap_drop=() keeps Docker's set."""
    strict = lab.spawn(["sleep", "30"])
    docker_like = lab.spawn(["sleep", "30"], cap_drop=())
    NET_RAW = 1 << 13
    assert not caps_of(strict.pid)["CapBnd"] & NET_RAW and not caps_of(strict.pid)["CapEff"] & NET_RAW
    assert caps_of(docker_like.pid)["CapEff"] & NET_RAW
    with pytest.raises(InputError, match="cap_drop"):
        lab.spawn(["true"], cap_drop=("NET_RAWR",))


@pytest.mark.root
def test_none_child_gets_dockers_private_netns_sysctls(lab):
    """none is a private netns too: Docker's sysctls are set there as in bridge mode."""
    c = lab.spawn(["sleep", "30"], mode="none")
    assert read_sysctl(c.netns, "net.ipv4.ip_unprivileged_port_start") == "0"
    assert read_sysctl(c.netns, "net.ipv4.ping_group_range").split() == ["0", "2147483647"]


@pytest.mark.root
def test_a_dropped_file_capability_is_named_in_the_error(lab):
    """Debian's ping carries cap_net_raw: with the default cap_drop, execve is refused and
    the hint says which capability and how to keep it."""
    import shutil
    import subprocess
    ping = shutil.which("ping")
    if not ping or "cap_net_raw" not in subprocess.run(["getcap", ping], capture_output=True,
                                                       text=True).stdout:
        pytest.skip("no ping with the cap_net_raw file capability here")
    from nslab.process import SpawnPermissionError
    with pytest.raises(SpawnPermissionError, match="NET_RAW.*cap_drop=\\(\\)"):
        lab.spawn([ping, "-c1", "127.0.0.1"])


@pytest.mark.root
def test_close_from_two_threads_tears_down_once():
    """Two threads closing one lab at once: no error, nothing left, the bridge deleted once."""
    import threading
    lab = Lab()
    c = lab.spawn(["sleep", "30"])
    host_ns = Namespace.from_fd(lab.host.netns.fileno())
    errors, barrier = [], threading.Barrier(2)

    def closer():
        barrier.wait()
        try:
            lab.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
    run_together(closer, closer)
    try:
        assert errors == [] and lab.closed and c.closed
    finally:
        host_ns.close()


# --- found in review: names, races, input, container: owners, host-mode namespaces -----------
@pytest.mark.root
def test_two_spawns_of_one_name_leave_the_winner_intact(lab):
    """Two threads start a container named 'web' at once: one gets Docker's name conflict,
    and the other's published port, DROP DIRECT ACCESS rule and address are left alone."""
    import threading
    from nslab.errors import NslabError
    for round_ in range(4):
        barrier, results = threading.Barrier(2), []

        def start():
            barrier.wait()
            try:
                results.append(lab.spawn(["sleep", "30"], name="web", publish=["8080:80"]))
            except NslabError as exc:
                results.append(exc)
        run_together(start, start)
        [web] = [r for r in results if not isinstance(r, Exception)]
        [lost] = [r for r in results if isinstance(r, Exception)]
        assert isinstance(lost, InputError) and lost.field == "name" and "already in use" in str(lost)
        pub = lab.firewall.publication("web")
        assert pub is not None and [m.host_port for m in pub.mappings] == [8080]
        assert connect_from(lab.host.netns, web.address, 9) == "refused"      # its veth is up
        assert lab.networks["bridge"].ipam.owner_of(web.address) == lab._owner("web")
        web.close()


@pytest.mark.root
def test_a_lab_closed_while_a_container_starts_leaves_nothing_running(monkeypatch):
    """close() runs between the child's start and its registration: the spawn tears the
    container down and says so, instead of leaving a process the closed lab forgot."""
    import nslab.lab as lab_module
    from nslab.errors import NslabError
    started, real_spawn = [], lab_module.Child.spawn

    class ClosingChild(lab_module.Child):
        @classmethod
        def spawn(cls, *args, **kwargs):
            child = real_spawn(*args, **kwargs)
            started.append(child.pid)
            lab.close()
            return child
    with Lab() as lab:
        monkeypatch.setattr(lab_module, "Child", ClosingChild)
        with pytest.raises(NslabError) as info:
            lab.spawn(["sleep", "30"], mode="none")
        assert info.value.errno == errno.EBADF and "closed while" in str(info.value)
    assert started and not os.path.exists(f"/proc/{started[0]}")


@pytest.mark.root
@pytest.mark.parametrize("bad", [{"cwd": 12}, {"pass_fds": [-5]}, {"stdout": "bogus"},
                                 {"env": {"A=B": "1"}}])
def test_bad_spawn_arguments_fail_before_the_bridge_exists(bad):
    """Every argument Child.spawn would refuse is refused by Lab.spawn before the first
    bridge and the nftables table are made."""
    with Lab() as lab:
        with pytest.raises(InputError) as info:
            lab.spawn(["true"], **bad)
        assert info.value.field.split("[")[0] in bad
        assert lab.networks == {} and lab._firewall is None
        assert "nslab0" not in links(lab.host.netns)


@pytest.mark.root
def test_container_mode_has_no_address_once_its_owner_is_gone(lab):
    """After its owner closes, a container: dependant reports no address (its netns has only
    lo, and the owner's address may be handed to someone else)."""
    owner = lab.spawn(["sleep", "30"], name="owner")
    dep = lab.spawn(["sleep", "30"], mode="container:owner")
    assert dep.address == owner.address
    owner.close()
    assert dep.address is None and not dep.owner_alive
    newcomer = lab.spawn(["sleep", "30"])
    assert newcomer.address is not None and str(newcomer.address) not in repr(dep)


@pytest.mark.root
def test_host_mode_children_get_their_own_uts_and_ipc_namespaces(lab):
    """As Docker (which drops UTS only for --uts=host): a host-network child shares the
    host's netns but not its UTS or IPC namespace, so it cannot rename the machine."""
    c = lab.spawn(["sleep", "30"], mode="host")
    assert proc_identity(c.pid, "net") == lab.host.netns.identity
    for kind in ("uts", "ipc"):
        assert proc_identity(c.pid, kind) != proc_identity(os.getpid(), kind)
    out = subprocess.run(["nsenter", "-t", str(c.pid), "-u", "hostname"], capture_output=True, text=True)
    assert out.stdout.strip() == socket.gethostname()     # a copy of the host's name


@pytest.mark.root
def test_a_failed_endpoint_removal_does_not_stop_the_network_teardown(lab, monkeypatch):
    """BridgeNetwork.close tries every endpoint and deletes the bridge even if one detach
    fails, then reports that failure."""
    from nslab.errors import NslabError
    a, b = lab.spawn(["sleep", "30"]), lab.spawn(["sleep", "30"])
    net = lab.networks["bridge"]
    real_detach, calls = net.detach, []

    def detach(owner):
        calls.append(owner)
        if len(calls) == 1:
            raise NslabError(errno.EIO, "simulated failure")
        return real_detach(owner)
    monkeypatch.setattr(net, "detach", detach)
    a.child.kill()
    b.child.kill()
    with pytest.raises(NslabError):
        net.close()
    assert len(calls) == 2 and "nslab0" not in links(lab.host.netns)


@pytest.mark.root
def test_with_a_pid_namespace_a_containers_own_children_die_with_it(lab):
    """The documented way to have a forking program's processes go with its container:
    new=('pid',) (as Docker's pid namespace does)."""
    c = lab.spawn(["sh", "-c", "sleep 300 & wait"], new=("pid",), stdout=subprocess.PIPE)
    deadline = time.monotonic() + 5
    grand = []
    while not grand and time.monotonic() < deadline:
        grand = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == c.pid]
    assert grand, "the shell never started its sleep"
    c.close()
    time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in grand)


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.root
def test_default_is_the_default_bridge_and_bad_kinds_name_new(lab):
    assert lab.network("default") is lab.network()
    with pytest.raises(InputError) as info:
        lab.spawn(["true"], new=["bogus"])
    assert info.value.field == "new"


def run_together(*fns):
    """Run each function on a thread of its own; return when all are done."""
    import threading
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.root
def test_a_lab_leaving_a_shared_host_keeps_the_other_labs_ipam(tmp_path):
    """Two labs on one shared host both use a network named 'app' (one IPAM state): the
    first to close must not remove it under the second, which keeps its address and can
    allocate more; the last one out removes it."""
    from nslab.hosts import ExistingHost
    from nslab.ipam import Ipam
    with Namespace.create("net") as ns:
        state = str(tmp_path / "state")
        first = Lab(ExistingHost(ns, state))
        second = Lab(ExistingHost(ns, state))
        try:
            first.network("app")
            c = second.spawn(["sleep", "30"], mode="app")
            first.close()
            assert "app" in Ipam.held_subnets(state)
            net = second.networks["app"]
            assert net.ipam.owner_of(c.address) == second._owner(c.name)
            assert net.reserve("later") is not None
        finally:
            first.close()
            second.close()
            first.host.close()
            second.host.close()
        assert "app" not in Ipam.held_subnets(state)


@pytest.mark.root
def test_a_lab_that_fails_to_start_leaves_no_record(monkeypatch, tmp_path):
    """Lab() failing before its sandbox exists leaves no record behind for gc or the leak
    report to call orphaned (it made nothing)."""
    import nslab.lab as lab_module
    from nslab.records import labs_dir

    def refuse(state_dir):
        raise PermissionError(1, "simulated: not root")
    monkeypatch.setattr(lab_module, "SandboxHost", refuse)
    before = set(os.listdir(labs_dir()))
    with pytest.raises(PermissionError):
        Lab()
    assert set(os.listdir(labs_dir())) == before


@pytest.mark.root
def test_pass_fds_may_be_any_iterable(lab):
    """pass_fds given as a generator reaches the child (it is read once, not once per check)."""
    r, w = os.pipe()
    try:
        c = lab.spawn([sys.executable, "-c", f"import os; os.write({w}, b'hi\\n')"], mode="none",
                      pass_fds=(fd for fd in [w]))
        assert c.wait() == 0
        os.close(w)
        w = -1
        assert os.read(r, 10) == b"hi\n"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)

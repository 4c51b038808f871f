"""Setup programs run by the parked child (nslab.child_setup), the ``meanwhile`` overlap, and
the hand-encoded rtnetlink requests they carry.

What the child did is read back independently of nslab: ``/proc/PID/...`` and ``ip``.
"""
import errno
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from nslab import _native
from nslab._netlink import Rtnl, address_add, default_route_add, link_up
from nslab.child_setup import ChildSetup
from nslab.errors import InputError, NslabError, SpawnError
from nslab.namespaces import Namespace
from nslab.networks import CONTAINER_SYSCTLS, container_setup, eth0_setup
from nslab.process import PIPE, Child, SpawnFileNotFoundError

from test_process import SPAWN_PATHS, ns_id

lib = _native.lib


# --- the hand encoders give pyroute2's bytes ---------------------------------------------
def _pyroute2_bytes(msg, msg_type, flags):
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
    msg.encode()
    return bytes(msg.data)


ifnames = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=15)


@settings(max_examples=200, deadline=None)
@given(name=ifnames, mtu=st.one_of(st.none(), st.integers(68, 65535)))
def test_link_up_encodes_like_pyroute2(name, mtu):
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    msg = ifinfmsg()
    msg["flags"] = msg["change"] = 1
    msg["attrs"] = [("IFLA_IFNAME", name)] + ([("IFLA_MTU", mtu)] if mtu else [])
    assert link_up(name, mtu).data == _pyroute2_bytes(msg, 16, 0)


@settings(max_examples=200, deadline=None)
@given(ip=st.integers(1, 2**32 - 2), prefix=st.integers(1, 31), index=st.integers(1, 2**31 - 1))
def test_address_and_route_encode_like_pyroute2(ip, prefix, index):
    from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    iface = ipaddress.IPv4Interface((ip, prefix))
    msg = ifaddrmsg()
    msg["family"], msg["prefixlen"], msg["index"] = socket.AF_INET, prefix, index
    msg["attrs"] = [("IFA_LOCAL", str(iface.ip)), ("IFA_ADDRESS", str(iface.ip)),
                    ("IFA_BROADCAST", str(iface.network.broadcast_address))]
    assert address_add(index, iface).data == _pyroute2_bytes(msg, 20, NLM_F_CREATE | NLM_F_EXCL)
    msg = rtmsg()
    msg.update(family=socket.AF_INET, dst_len=0, table=254, proto=3, scope=0, type=1)
    msg["attrs"] = [("RTA_GATEWAY", str(iface.ip)), ("RTA_OIF", index)]
    assert default_route_add(iface.ip, index).data == _pyroute2_bytes(msg, 24, NLM_F_CREATE | NLM_F_REPLACE)


# --- building programs: bad input before anything runs -----------------------------------
@pytest.mark.parametrize("name", ["", "/proc/sys/net", "net/../../etc/passwd", "net/ipv4\0x", 7])
def test_bad_sysctl_name_is_input_error(name):
    with pytest.raises(InputError) as info:
        ChildSetup().write_sysctl(name, "1")
    assert info.value.field == "sysctl"


def test_bad_sysctl_value_and_batch_size_are_input_errors():
    with pytest.raises(InputError):
        ChildSetup().write_sysctl("net/ipv4/ip_forward", "1\0")
    with pytest.raises(InputError):
        ChildSetup().netlink([], "nowhere")
    with pytest.raises(InputError):
        ChildSetup().netlink([link_up("lo")] * 256, "too many")


def test_program_size_is_bounded():
    big = ChildSetup()
    for i in range(200):
        big.write_sysctl("net/ipv4/" + "x" * 40, "1")
    with pytest.raises(InputError):
        big.encode()


def test_configure_outside_before_exec_is_refused():
    with Child.spawn(["sleep", "30"], new=()) as child:
        with pytest.raises(NslabError) as info:
            child.configure(ChildSetup())
        assert info.value.errno == errno.EINVAL and "before_exec" in str(info.value)


# --- what the child does -----------------------------------------------------------------
READ_BACK = ("import json, os, socket\n"
             "print(json.dumps({k: open('/proc/sys/' + k).read().strip() for k in %r} | "
             "{'lo': open('/sys/class/net/lo/operstate').read().strip(), "
             "'lo_flags': int(open('/sys/class/net/lo/flags').read(), 16)}))")


@pytest.mark.root
@pytest.mark.parametrize("path", ["clone_vm", "fork_clone3"])
def test_setup_and_configure_run_in_the_child_before_exec(path):
    """The early program and one sent from before_exec both ran, in the child's own netns,
    before its program started (it reads their results as its first act)."""
    names = list(CONTAINER_SYSCTLS) + ["net/ipv4/conf/lo/arp_notify"]
    late = ChildSetup().write_sysctl("net/ipv4/conf/lo/arp_notify", "1")
    child = Child.spawn([sys.executable, "-c", READ_BACK % names], new=("net",), stdout=PIPE,
                        setup=container_setup(), before_exec=lambda c: c.configure(late),
                        _trampoline_flags=SPAWN_PATHS[path])
    with child:
        seen = json.loads(child.stdout.read())
        assert child.wait() == 0
    assert {k: seen[k].split() for k in CONTAINER_SYSCTLS} == {k: v.split() for k, v in CONTAINER_SYSCTLS.items()}
    assert seen["net/ipv4/conf/lo/arp_notify"] == "1"
    assert seen["lo_flags"] & 1                          # IFF_UP
    # ...and only there: our own netns keeps its values.
    with open("/proc/sys/net/ipv4/conf/lo/arp_notify") as f:
        assert f.read().strip() == "0"


@pytest.mark.root
def test_failed_netlink_request_is_named():
    """The kernel refused the second request of a batch: the error says which one."""
    setup = ChildSetup().netlink([link_up("lo"), link_up("nosuchlink0")], "the child's netns")
    with pytest.raises(SpawnError) as info:
        Child.spawn(["true"], new=("net",), setup=setup)
    assert info.value.errno == errno.ENODEV
    assert info.value.step == "netlink batch in the child's netns: set link nosuchlink0 up"
    assert info.value.syscall == "setup"


@pytest.mark.root
def test_failed_late_step_is_named_with_its_number_across_programs():
    """Steps are numbered across the early program and each configure(): the report names
    the right one, here the second step of the second program."""
    late = ChildSetup().write_sysctl("net/ipv4/conf/lo/arp_notify", "1") \
                       .write_sysctl("net/ipv4/conf/nosuchlink0/arp_notify", "1")
    with pytest.raises(SpawnFileNotFoundError) as info:
        Child.spawn(["true"], new=("net",), setup=container_setup(),
                    before_exec=lambda c: c.configure(late))
    assert info.value.step == "write /proc/sys/net/ipv4/conf/nosuchlink0/arp_notify"


@pytest.mark.root
def test_optional_write_skips_a_missing_file_and_warm_never_fails():
    setup = ChildSetup().write_sysctl("net/ipv6/conf/nosuchlink0/disable_ipv6", "1", optional=True) \
                        .warm_sysctl("net/nosuchdir")
    with Child.spawn(["true"], new=("net",), setup=setup) as child:
        assert child.wait() == 0


@pytest.mark.root
def test_run_here_has_the_childs_effects_and_errors():
    """The Python executor (for children in their own user namespace) does the same."""
    ns = Namespace.create("net")
    try:
        ns.call(container_setup().run_here)
        with Rtnl(ns) as rtnl:
            assert rtnl.link(ifname="lo")["flags"] & 1
        for name, value in CONTAINER_SYSCTLS.items():
            got = ns.call(lambda n=name: open("/proc/sys/" + n).read())
            assert got.split() == value.split()
        with pytest.raises(NslabError) as info:
            ns.call(ChildSetup().netlink([link_up("nosuchlink0")], "test").run_here, "test")
        assert info.value.errno == errno.ENODEV and "nosuchlink0" in str(info.value)
    finally:
        ns.close()


@pytest.mark.root
def test_eth0_setup_configures_a_veth_peer_from_the_child():
    """The bridge endpoint's second half, done by the child: address, up, default route."""
    host = Namespace.create("net")
    try:
        with Rtnl(host) as rtnl:
            def wire(child):
                netns = Namespace.of_pidfd(child.pidfd, "net")
                try:
                    index = rtnl.add_veth("vethtest", master=0, mtu=1500, peer_ifname="eth0",
                                          peer_netns=netns, obj="test veth")
                finally:
                    netns.close()
                child.configure(eth0_setup(index, ipaddress.IPv4Interface("10.77.0.2/24"),
                                           ipaddress.IPv4Address("10.77.0.1"), announce=True))
            child = Child.spawn(["ip", "-j", "-d", "route", "show", "default"], new=("net",),
                                setup=container_setup(), before_exec=wire, stdout=PIPE)
            with child:
                routes = json.loads(child.stdout.read())
                assert child.wait() == 0
            assert routes[0]["gateway"] == "10.77.0.1" and routes[0]["dev"] == "eth0"
    finally:
        host.close()


# --- meanwhile: the child makes its namespaces while the parent works ---------------------
@pytest.mark.root
@pytest.mark.parametrize("path", ["clone_vm", "fork_clone3"])
def test_meanwhile_runs_while_the_child_makes_its_namespaces(path):
    """With meanwhile, net/uts/ipc are the child's own (new, not ours) by the time
    before_exec sees it, and meanwhile ran before before_exec."""
    order = []
    mine = {k: ns_id(os.getpid(), k) for k in ("net", "uts", "ipc")}

    def before(child):
        order.append("before_exec")
        order.append({k: ns_id(child.pid, k) for k in ("net", "uts", "ipc")})
    with Child.spawn(["sleep", "30"], new=("net", "uts", "ipc"), meanwhile=lambda: order.append("meanwhile"),
                     before_exec=before, _trampoline_flags=SPAWN_PATHS[path]) as child:
        assert order[:2] == ["meanwhile", "before_exec"]
        for kind in ("net", "uts", "ipc"):
            assert order[2][kind] != mine[kind]
            assert ns_id(child.pid, kind) == order[2][kind]


@pytest.mark.root
def test_meanwhile_failure_kills_the_child():
    seen = {}

    def boom():
        raise KeyError("meanwhile failed")
    with pytest.raises(KeyError):
        Child.spawn(["sleep", "30"], new=("net",), meanwhile=boom,
                    before_exec=lambda c: seen.setdefault("child", c))
    assert not seen                                  # before_exec never ran


def test_unshare_refused_in_the_child_is_reported_as_its_step():
    """Without CAP_SYS_ADMIN the child's own unshare fails: the error names that step (EPERM).
    (As root, setpriv drops every capability first.)"""
    code = ("import sys; from nslab.process import Child; from nslab.errors import SpawnError\n"
            "try:\n"
            "    Child.spawn(['true'], new=('net',), meanwhile=lambda: None)\n"
            "except SpawnError as e:\n"
            "    print(e.errno, e.syscall, e.step)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's capabilities")
        argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] + argv
    out = subprocess.run(argv, capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.stdout.split()[:2] == [str(errno.EPERM), "unshare"], out.stdout + out.stderr

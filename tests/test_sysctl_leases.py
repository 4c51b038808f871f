"""Sysctl changes on a host that outlives nslab are leases: two labs on one host that both
need ``ip_forward`` on leave it on until the last of them is done, and gc releases the lease
of a lab that died. Played on a throwaway netns standing in for the host (root)."""
import errno

import pytest

from nslab import sysctl_leases
from nslab.errors import NslabError
from nslab.hosts import ExistingHost, read_sysctl, write_sysctl
from nslab.namespaces import Namespace
from nslab.records import LabRecord, gc

from test_records import dead_record, fake_host

pytestmark = pytest.mark.root
NAME = "net.ipv4.ip_forward"


@pytest.fixture
def host_ns():
    ns = Namespace.create("net")
    write_sysctl(ns, NAME, "0")
    yield ns
    ns.close()


def test_the_last_lab_to_leave_restores(host_ns, tmp_path):
    state = str(tmp_path / "state")
    a, b = ExistingHost(host_ns, state), ExistingHost(host_ns, state)
    try:
        a.set_sysctl(NAME, "1")
        b.set_sysctl(NAME, "1")
        assert read_sysctl(host_ns, NAME) == "1"
        a.close()
        assert read_sysctl(host_ns, NAME) == "1"          # b still needs it
        assert len(sysctl_leases.holders(state, NAME)) == 1
    finally:
        b.close()
    assert read_sysctl(host_ns, NAME) == "0"
    assert sysctl_leases.holders(state, NAME) == []


def test_a_value_found_set_is_neither_held_nor_restored(host_ns, tmp_path):
    write_sysctl(host_ns, NAME, "1")
    h = ExistingHost(host_ns, str(tmp_path))
    h.set_sysctl(NAME, "1")
    assert h.changed_sysctls == {} and sysctl_leases.holders(str(tmp_path), NAME) == []
    h.close()
    assert read_sysctl(host_ns, NAME) == "1"


def test_a_conflicting_value_is_refused_naming_the_holder(host_ns, tmp_path):
    a, b = ExistingHost(host_ns, str(tmp_path)), ExistingHost(host_ns, str(tmp_path))
    try:
        a.set_sysctl(NAME, "1")
        with pytest.raises(NslabError) as info:
            b.set_sysctl(NAME, "0")
        assert info.value.errno == errno.EBUSY and a._holder() in str(info.value)
        assert read_sysctl(host_ns, NAME) == "1" and b.changed_sysctls == {}
    finally:
        a.close()
        b.close()
    assert read_sysctl(host_ns, NAME) == "0"


def test_gc_releases_a_dead_labs_lease_and_restores_only_when_it_was_last(host_ns, tmp_path):
    state = str(tmp_path / "state")
    live = ExistingHost(host_ns, state)
    live.record = LabRecord(str(tmp_path))
    try:
        live.set_sysctl(NAME, "1")
        # A lab that took the same lease and died (SIGKILL: its record stays, unlocked).
        sysctl_leases.acquire(host_ns, state, NAME, "1", "deadlab")
        dead_record(tmp_path, ("sysctl", {"name": NAME, "lease_dir": state, "holder": "deadlab"}),
                    host=fake_host(host_ns))
        report = gc(str(tmp_path))
        assert not report.errors and len(report.labs_collected) == 1
        assert read_sysctl(host_ns, NAME) == "1"          # the live lab still holds it
        assert sysctl_leases.holders(state, NAME) == [live._holder()]
    finally:
        live.close()
        live.record.close()
    assert read_sysctl(host_ns, NAME) == "0"
    # And the other way round: the live one leaves first, the dead one's gc restores.
    sysctl_leases.acquire(host_ns, state, NAME, "1", "deadlab2")
    dead_record(tmp_path, ("sysctl", {"name": NAME, "lease_dir": state, "holder": "deadlab2"}),
                host=fake_host(host_ns))
    report = gc(str(tmp_path))
    assert not report.errors and any("restored to '0'" in r for r in report.removed), report
    assert read_sysctl(host_ns, NAME) == "0"
    assert gc(str(tmp_path)).noop

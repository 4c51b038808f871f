"""Sysctl changes on a host that outlives nslab are leases: two labs on one host that both
need ``ip_forward`` on leave it on until the last of them is done, and gc releases the lease
of a lab that died. Played on a throwaway netns standing in for the host (root)."""
import errno
import json
import os

import pytest

from nslab import sysctl_leases
from nslab.errors import NslabError
from nslab.hosts import ExistingHost, read_sysctl, write_sysctl
from nslab.namespaces import Namespace
from nslab.records import LabRecord, gc

from test_records import dead_record, fake_host

pytestmark = pytest.mark.root
NAME = "net.ipv4.ip_forward"
KEY = sysctl_leases.netns_key


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
        assert sysctl_leases.holders(state, KEY(host_ns), NAME) == [b.lease_holder]
    finally:
        b.close()
    assert read_sysctl(host_ns, NAME) == "0"
    assert sysctl_leases.holders(state, KEY(host_ns), NAME) == []
    assert os.listdir(state) == []                      # no lease file left behind


def test_a_value_found_set_is_neither_held_nor_restored(host_ns, tmp_path):
    write_sysctl(host_ns, NAME, "1")
    h = ExistingHost(host_ns, str(tmp_path))
    h.set_sysctl(NAME, "1")
    assert h.changed_sysctls == {} and sysctl_leases.holders(str(tmp_path), KEY(host_ns), NAME) == []
    h.close()
    assert read_sysctl(host_ns, NAME) == "1"


def test_a_conflicting_value_is_refused_naming_the_holder(host_ns, tmp_path):
    a, b = ExistingHost(host_ns, str(tmp_path)), ExistingHost(host_ns, str(tmp_path))
    try:
        a.set_sysctl(NAME, "1")
        with pytest.raises(NslabError) as info:
            b.set_sysctl(NAME, "0")
        assert info.value.errno == errno.EBUSY and a.lease_holder in str(info.value)
        assert read_sysctl(host_ns, NAME) == "1" and b.changed_sysctls == {}
    finally:
        a.close()
        b.close()
    assert read_sysctl(host_ns, NAME) == "0"


def test_gc_releases_a_dead_labs_lease_and_restores_only_when_it_was_last(host_ns, tmp_path):
    state, key = str(tmp_path / "state"), KEY(host_ns)
    live = ExistingHost(host_ns, state)
    live.record = LabRecord(str(tmp_path))
    try:
        live.set_sysctl(NAME, "1")
        # A holder that took the same lease and died (SIGKILL: its record stays, unlocked).
        sysctl_leases.acquire(host_ns, state, key, NAME, "1", "deadlab")
        dead_record(tmp_path, ("sysctl", {"name": NAME, "lease_dir": state, "lease_netns": key,
                                          "holder": "deadlab"}), host=fake_host(host_ns))
        report = gc(str(tmp_path))
        assert not report.errors and len(report.labs_collected) == 1
        assert read_sysctl(host_ns, NAME) == "1"          # the live host still holds it
        assert sysctl_leases.holders(state, key, NAME) == [live.lease_holder]
    finally:
        live.close()
        live.record.close()
    assert read_sysctl(host_ns, NAME) == "0"
    # And the other way round: the live one leaves first, the dead one's gc restores.
    sysctl_leases.acquire(host_ns, state, key, NAME, "1", "deadlab2")
    dead_record(tmp_path, ("sysctl", {"name": NAME, "lease_dir": state, "lease_netns": key,
                                      "holder": "deadlab2"}), host=fake_host(host_ns))
    report = gc(str(tmp_path))
    assert not report.errors and any("restored to '0'" in r for r in report.removed), report
    assert read_sysctl(host_ns, NAME) == "0"
    assert gc(str(tmp_path)).noop


def test_the_lease_names_its_holder_before_the_sysctl_changes(host_ns, tmp_path, monkeypatch):
    """Write-ahead: when the sysctl is written the lease already names the holder, so a holder
    killed right then leaves gc something to release, never a change nobody holds; a failed
    write leaves neither the change nor the lease."""
    import nslab.hosts as hosts
    state, key = str(tmp_path), KEY(host_ns)
    seen, real_write = [], hosts.write_sysctl

    def write(ns, name, value):
        # Read the file as it is (our own acquire holds the directory's lock meanwhile).
        [lease] = [f for f in os.listdir(state) if f.endswith(f"{name}.json")]
        with open(os.path.join(state, lease)) as f:
            seen.append(json.load(f)["holders"])
        real_write(ns, name, value)
    monkeypatch.setattr(hosts, "write_sysctl", write)
    assert sysctl_leases.acquire(host_ns, state, key, NAME, "1", "me") == "0"
    assert seen == [["me"]]

    def refused(ns, name, value):
        raise NslabError(errno.EACCES, "write refused")
    monkeypatch.setattr(hosts, "write_sysctl", refused)
    write_sysctl(host_ns, NAME, "0")
    with pytest.raises(NslabError):
        sysctl_leases.acquire(host_ns, str(tmp_path / "other"), key, NAME, "1", "you")
    assert sysctl_leases.holders(str(tmp_path / "other"), key, NAME) == []


def test_an_unwritable_lease_is_an_error_before_the_sysctl_changes(host_ns, tmp_path, monkeypatch):
    """A state directory that refuses the lease (read-only, full) fails the change with an
    NslabError naming the lease, and leaves the sysctl as it was."""
    def replace(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(sysctl_leases.os, "replace", replace)
    h = ExistingHost(host_ns, str(tmp_path / "state"))
    h.record = LabRecord(str(tmp_path))
    try:
        with pytest.raises(NslabError) as info:
            h.set_sysctl(NAME, "1")
        assert info.value.errno == errno.EROFS and "sysctl lease" in str(info.value)
        assert read_sysctl(host_ns, NAME) == "0" and h.changed_sysctls == {}
        assert not [f for f in os.listdir(tmp_path / "state") if f.endswith(".tmp")]
    finally:
        h.close()
        h.record.close()
    assert gc(str(tmp_path)).noop


def test_a_host_holds_its_leases_across_the_labs_it_serves(host_ns, tmp_path):
    """A host passed to one lab, then another: the first lab's record closing (or gc) does
    not take the host's change away; the host's own close restores it."""
    h = ExistingHost(host_ns, str(tmp_path / "state"))
    first = LabRecord(str(tmp_path))
    h.record = first.attach_host(h)
    try:
        h.set_sysctl(NAME, "1")
        first.close()
        h.record = LabRecord(str(tmp_path)).attach_host(h)
        assert gc(str(tmp_path)).noop
        assert read_sysctl(host_ns, NAME) == "1" and h.changed_sysctls == {NAME: "0"}
    finally:
        h.close()
        h.record.close()
    assert read_sysctl(host_ns, NAME) == "0"
    assert gc(str(tmp_path)).noop


def test_two_namespaces_sharing_a_state_directory_keep_separate_leases(host_ns, tmp_path):
    state = str(tmp_path / "state")
    other = Namespace.create("net")
    write_sysctl(other, NAME, "0")
    a, b = ExistingHost(host_ns, state), ExistingHost(other, state)
    try:
        a.set_sysctl(NAME, "1")
        b.set_sysctl(NAME, "1")
        assert a.changed_sysctls == b.changed_sysctls == {NAME: "0"}      # each held its own
        a.close()
        assert read_sysctl(host_ns, NAME) == "0" and read_sysctl(other, NAME) == "1"
        b.close()
        assert read_sysctl(other, NAME) == "0"
    finally:
        a.close()
        b.close()
        other.close()


def test_gc_lets_go_of_the_lease_of_a_namespace_that_is_gone(tmp_path):
    """The namespace died with the change in it: gc drops the holder (writes nothing), so a
    lease file does not outlive it."""
    state = str(tmp_path / "state")
    ns = Namespace.create("net")
    key = KEY(ns)
    write_sysctl(ns, NAME, "0")
    sysctl_leases.acquire(ns, state, key, NAME, "1", "deadlab")
    dead_record(tmp_path, ("sysctl", {"name": NAME, "lease_dir": state, "lease_netns": key,
                                      "holder": "deadlab"}), host=fake_host(ns))
    ns.close()
    report = gc(str(tmp_path))
    assert not report.errors and any("let go" in r for r in report.removed), report
    assert sysctl_leases.holders(state, key, NAME) == [] and os.listdir(state) == []

"""Records, gc and the leak report: the journal format, locking, identity checks, and gc
running next to live labs."""
from __future__ import annotations

import json
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import types

import pytest

from nslab import _faults, records
from nslab.errors import NslabError
from nslab.records import LabRecord, gc, leak_report, parse_record, read_record

ROOT = os.geteuid() == 0


def rec_files(root) -> list[str]:
    d = os.path.join(root, "labs")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def dead_record(root, *entries, host=None) -> str:
    """A record whose lab is dead: written, then its lock dropped (what a SIGKILL does)."""
    rec = LabRecord(str(root))
    if host is not None:
        rec.attach_host(host)
    for kind, identity in entries:
        rec.add(kind, **identity)
    os.close(rec._fd)          # the kernel drops the flock; nothing else is cleaned up
    rec._fd = -1
    return rec.lab_id


# --- the journal --------------------------------------------------------------------------
def test_record_lifecycle_leaves_no_file(tmp_path):
    """add then forget then close: the record file goes, since the lab left nothing."""
    rec = LabRecord(str(tmp_path))
    key = rec.add("dir", path="/nonexistent/x")
    assert os.path.exists(rec.path)
    assert read_record(rec.path)["entries"] == {key: {"kind": "dir", "path": "/nonexistent/x"}}
    rec.forget(key)
    assert read_record(rec.path)["entries"] == {}
    rec.close()
    rec.close()                 # idempotent
    assert not os.path.exists(rec.path)
    assert "closed" in repr(rec)


def test_close_with_entries_keeps_the_record_for_gc(tmp_path):
    """A lab that could not remove something leaves its record, unlocked, and gc collects it."""
    victim = tmp_path / "victim"
    victim.mkdir()
    rec = LabRecord(str(tmp_path))
    rec.add("dir", path=str(victim))
    rec.close()
    assert os.path.exists(rec.path)
    report = gc(str(tmp_path))
    assert report.labs_collected == [rec.lab_id] and not report.errors
    assert not victim.exists() and not os.path.exists(rec.path)
    assert gc(str(tmp_path)).noop


def test_gc_never_touches_a_locked_record(tmp_path):
    """A live lab's record is locked: gc lists it as alive and leaves its objects alone."""
    victim = tmp_path / "alive"
    victim.mkdir()
    rec = LabRecord(str(tmp_path))
    rec.add("dir", path=str(victim))
    report = gc(str(tmp_path))
    assert report.labs_alive == [rec.lab_id] and report.noop
    assert victim.exists()
    rec.close()
    assert gc(str(tmp_path)).labs_collected == [rec.lab_id]


def test_torn_last_line_is_ignored():
    """A write torn by SIGKILL loses only its own line: the entries before it replay."""
    raw = (b'{"v":2,"lab":"x","pid":1}\n{"add":"dir-1","e":{"kind":"dir","path":"/a"}}\n'
           b'{"add":"link-2","e":{"kind":"link","ifname":"br-1"}}\n{"forget":"dir-1"}\n{"add":"li')
    rec = parse_record(raw, "x")
    assert rec["torn"] and rec["entries"] == {"link-2": {"kind": "link", "ifname": "br-1"}}


def test_a_torn_line_in_the_middle_loses_only_itself():
    """A write cut short (a full filesystem) is ended with a newline by the writer, which
    goes on: the lines after it still replay."""
    raw = (b'{"v":2,"lab":"x","pid":1}\n{"add":"dir-1","e":{"kind":"di\n'
           b'{"add":"link-2","e":{"kind":"link","ifname":"br-1"}}\n')
    rec = parse_record(raw, "x")
    assert rec["torn"] and rec["entries"] == {"link-2": {"kind": "link", "ifname": "br-1"}}


def test_a_short_write_fails_the_step_and_keeps_the_journal_readable(tmp_path, monkeypatch):
    """A short write(2) of an entry is an error (the object is then not made), and the next
    entries land on lines of their own."""
    import nslab.records as records
    rec = LabRecord(str(tmp_path))
    real_write = os.write
    cut = {"once": True}

    def short_write(fd, data):
        if cut["once"] and fd == rec._fd and b"link-1" in data:
            cut["once"] = False
            return real_write(fd, data[:10])
        return real_write(fd, data)
    monkeypatch.setattr(records.os, "write", short_write)
    with pytest.raises(NslabError) as info:
        rec.add("link", ifname="br-a")
    assert info.value.errno == errno.ENOSPC and rec.path in str(info.value)
    rec.add("link", ifname="br-b")
    with open(rec.path, "rb") as f:
        replay = parse_record(f.read(), rec.lab_id)
    assert [e["ifname"] for e in replay["entries"].values()] == ["br-b"]
    monkeypatch.undo()
    for key in list(replay["entries"]):
        rec.forget(key)
    rec.close()


def test_legacy_single_object_record_is_read(tmp_path):
    """Records written before the journal format (one JSON object) are still collected."""
    d = tmp_path / "labs"
    d.mkdir()
    victim = tmp_path / "old"
    victim.mkdir()
    (d / "abcdef012345.json").write_text(json.dumps(
        {"version": 1, "lab": "abcdef012345", "pid": 1, "entries": {"dir-1": {"kind": "dir", "path": str(victim)}}},
        indent=1))
    report = gc(str(tmp_path))
    assert report.labs_collected == ["abcdef012345"] and not victim.exists()


def test_compaction_keeps_entries_and_the_lock(tmp_path):
    """Thousands of add/forget pairs keep the journal small, the live entries intact and the lab locked."""
    rec = LabRecord(str(tmp_path))
    keep = rec.add("dir", path="/keep")
    for i in range(2000):
        key = rec.add("link", ifname=f"veth{i:07x}", master="br-x")
        # on disk at once, even when this very add compacted the journal
        assert key in read_record(rec.path)["entries"]
        rec.forget(key)
    assert os.path.getsize(rec.path) < 64 * 1024
    assert list(read_record(rec.path)["entries"]) == [keep]
    assert gc(str(tmp_path)).labs_alive == [rec.lab_id]
    assert [n for n in rec_files(tmp_path) if n.startswith(".")] == []
    rec.forget(keep)
    rec.close()
    assert rec_files(tmp_path) == []


def test_record_fd_is_not_inherited(tmp_path):
    """The lock fd is CLOEXEC: a child outliving its lab must not keep the lab looking alive."""
    rec = LabRecord(str(tmp_path))
    rec.add("dir", path="/x")
    child = subprocess.Popen(["sleep", "5"], close_fds=False)
    try:
        targets = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
        assert rec.path not in targets
        os.close(rec._fd)
        rec._fd = -1
        assert gc(str(tmp_path)).labs_collected == [rec.lab_id]
    finally:
        child.kill()
        child.wait()


def test_gc_racing_record_creation_never_collects_a_live_lab(tmp_path):
    """Records appear already locked (O_TMPFILE + linkat): gc hammering meanwhile never takes a live one."""
    stop = threading.Event()
    collected: list[str] = []

    def hammer():
        while not stop.is_set():
            collected.extend(gc(str(tmp_path)).labs_collected)
    t = threading.Thread(target=hammer)
    t.start()
    try:
        recs = []
        for _ in range(200):
            r = LabRecord(str(tmp_path))
            r.add("dir", path="/nonexistent")
            recs.append(r)
    finally:
        stop.set()
        t.join()
    assert collected == []
    assert all(os.path.exists(r.path) for r in recs)
    for r in recs:
        r.close()
    assert len(gc(str(tmp_path)).labs_collected) == 200


def test_two_gcs_at_once_collect_each_lab_once(tmp_path):
    """Concurrent gc runs split the dead labs between them: each collected exactly once, no errors."""
    dirs = []
    for i in range(40):
        d = tmp_path / f"d{i}"
        d.mkdir()
        dirs.append(d)
        dead_record(tmp_path, ("dir", {"path": str(d)}))
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(gc(str(tmp_path)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    collected = [lab for r in reports for lab in r.labs_collected]
    assert len(collected) == len(set(collected)) == 40
    assert not any(r.errors for r in reports)
    assert not any(d.exists() for d in dirs)


def test_unknown_entry_kind_is_reported_not_dropped(tmp_path):
    """An entry gc cannot undo keeps the record (and says why): nothing is silently forgotten."""
    lab = dead_record(tmp_path, ("teleporter", {"id": 1}))
    report = gc(str(tmp_path))
    assert report.errors and "teleporter" in report.errors[0] and lab not in report.labs_collected
    assert rec_files(tmp_path)


# --- fault injection ----------------------------------------------------------------------
def test_checkpoint_is_cheap_when_unarmed():
    """An unarmed checkpoint costs well under a microsecond: it can sit after every kernel step."""
    _faults.configure(None)
    t0 = time.perf_counter()
    for _ in range(100_000):
        _faults.checkpoint("x")
    assert (time.perf_counter() - t0) / 100_000 < 1e-6


def test_checkpoint_kills_at_the_nth_hit_and_is_consumed(tmp_path):
    """NSLAB_CRASH_AT=name:2 SIGKILLs at the second hit, and the variable is not passed on to children."""
    code = ("import os, sys; from nslab import _faults; print(os.environ.get('NSLAB_CRASH_AT'), flush=True); "
            "_faults.checkpoint('a'); _faults.checkpoint('b'); print('after first', flush=True); "
            "_faults.checkpoint('b'); print('survived', flush=True)")
    log = tmp_path / "log"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, NSLAB_CRASH_AT="b:2", NSLAB_CHECKPOINT_LOG=str(log)))
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.split("\n")[:2] == ["None", "after first"]
    assert log.read_text().split() == ["a", "b", "b"]
    with pytest.raises(ValueError):
        _faults.configure("x:0")


# --- identity: links, sysctls, namespaces (root) --------------------------------------------
@pytest.fixture
def shared(tmp_path):
    from _controller import SharedHost
    host = SharedHost(str(tmp_path))
    yield host
    host.close()


def fake_host(ns, kind="existing"):
    return types.SimpleNamespace(netns=ns, kind=kind)


@pytest.mark.root
def test_gc_removes_links_by_identity_in_the_recorded_netns(tmp_path, shared):
    """gc deletes the dead lab's bridge in *its* netns, not a same-named link elsewhere, and not an impostor."""
    from nslab._netlink import Rtnl
    from nslab.namespaces import Namespace
    with Rtnl(shared.ns) as r:
        r.request("link", "add", ifname="br-ours", kind="bridge", obj="br-ours")
        r.request("link", "set", index=r.link_index("br-ours"), ifalias="nslab:x:net", obj="br-ours")
        r.request("link", "add", ifname="br-theirs", kind="bridge", obj="br-theirs")
        r.request("link", "set", index=r.link_index("br-theirs"), ifalias="someone else", obj="x")
        r.request("link", "add", ifname="br-mac", kind="bridge", address="02:00:00:00:00:01", obj="x")
        r.request("link", "add", ifname="br-mac2", kind="bridge", address="02:00:00:00:00:02", obj="x")
        r.request("link", "add", ifname="vethours", kind="veth", peer="vethpeer", master=r.link_index("br-ours"),
                  obj="x")
        r.request("link", "add", ifname="vethfree", kind="veth", peer="vethpeer2", obj="x")
    with Namespace.create("net") as decoy, Rtnl(decoy) as r:
        r.request("link", "add", ifname="br-ours", kind="bridge", obj="decoy")
        r.request("link", "set", index=r.link_index("br-ours"), ifalias="nslab:x:net", obj="br-ours")
        dead_record(tmp_path,
                    ("link", {"ifname": "br-ours", "alias": "nslab:x:net"}),
                    ("link", {"ifname": "br-theirs", "alias": "nslab:x:net2"}),
                    ("link", {"ifname": "br-mac", "alias": "nslab:x:n3", "address": "02:00:00:00:00:01"}),
                    ("link", {"ifname": "br-mac2", "alias": "nslab:x:n4", "address": "02:00:00:00:00:99"}),
                    ("link", {"ifname": "vethours", "master": "br-ours"}),
                    ("link", {"ifname": "vethfree", "master": "br-ours"}),
                    host=fake_host(shared.ns))
        report = gc(str(tmp_path))
        assert not report.errors, report
        left = {n for n, *_ in shared.state()["links"]}
        # ours (tagged, or untagged with our MAC, or enslaved to ours) went; impostors stayed
        assert left == {"lo", "br-theirs", "br-mac2", "vethfree", "vethpeer2"}
        with Rtnl(decoy) as r:
            assert r.link_index("br-ours") is not None      # same name, other netns: untouched


@pytest.mark.root
def test_sysctl_restored_in_the_recorded_netns_only(tmp_path, shared):
    """A dead lab's sysctl is put back in its host netns, found by identity — the caller's stays as it is."""
    from nslab.hosts import read_sysctl, write_sysctl
    from nslab.namespaces import Namespace
    name = "net.ipv4.conf.default.rp_filter"
    old = read_sysctl(shared.ns, name)
    new = "2" if old != "2" else "1"
    write_sysctl(shared.ns, name, new)
    with Namespace.current("net") as me:
        mine = read_sysctl(me, name)
        dead_record(tmp_path, ("sysctl", {"name": name, "old": old}), host=fake_host(shared.ns))
        assert not gc(str(tmp_path)).errors
        assert read_sysctl(shared.ns, name) == old
        assert read_sysctl(me, name) == mine


@pytest.mark.root
def test_entries_of_a_vanished_netns_are_dropped(tmp_path):
    """If the recorded host netns is gone, so is all it held: gc collects the lab without touching the caller's netns."""
    from nslab.namespaces import Namespace
    with Namespace.create("net") as ns:
        host = fake_host(ns)
        lab = dead_record(tmp_path, ("link", {"ifname": "lo", "alias": "x"}),
                          ("sysctl", {"name": "net.ipv4.ip_forward", "old": "1"}), host=host)
    report = gc(str(tmp_path))
    assert report.labs_collected == [lab] and not report.removed and not report.errors


@pytest.mark.root
def test_netns_name_removed_only_if_still_ours(tmp_path):
    """A persisted name is unmounted by gc when it still holds the recorded namespace, left when reused."""
    from nslab.namespaces import Namespace
    run_dir = str(tmp_path / "netns")
    with Namespace.create("net") as a, Namespace.create("net") as b:
        a.persist("mine", run_dir)
        b.persist("reused", run_dir)
        dead_record(tmp_path, ("netns-name", {"name": "mine", "run_dir": run_dir, "dev": a.identity[0],
                                              "ino": a.identity[1]}),
                    ("netns-name", {"name": "reused", "run_dir": run_dir, "dev": a.identity[0],
                                    "ino": a.identity[1]}))
    assert not gc(str(tmp_path)).errors
    assert sorted(os.listdir(run_dir)) == ["reused"]
    from nslab.namespaces import remove_persisted
    remove_persisted("reused", run_dir)


@pytest.mark.root
def test_ipam_gc_keeps_live_labs_reservations(tmp_path, shared):
    """gc releases a dead lab's addresses, keeps a live lab's, and drops network state only when nobody holds it."""
    from nslab.ipam import Ipam
    st = shared.state_dir
    with Ipam.for_network(st, "shared") as ipam:
        ipam.allocate("deadlab/a")
        ipam.allocate("livelab/b")
    with Ipam.for_network(st, "solo") as ipam:
        ipam.allocate("deadlab/c")
    live = LabRecord(str(tmp_path), lab_id="livelab")
    live.add("ipam", state_dir=st, network="shared")
    with open(os.path.join(tmp_path, "labs", "deadlab.jsonl"), "w") as f:
        f.write('{"v":2,"lab":"deadlab","pid":1}\n')
        for i, net in enumerate(("shared", "solo")):
            f.write(json.dumps({"add": f"ipam-{i}", "e": {"kind": "ipam", "state_dir": st, "network": net}}) + "\n")
    report = gc(str(tmp_path))
    assert report.labs_collected == ["deadlab"] and not report.errors
    assert shared.ipam_files() == ["shared.json"]
    with Ipam.for_network(st, "shared") as ipam:
        assert list(ipam.allocations().values()) == ["livelab/b"]
    live.close()


@pytest.mark.root
def test_gc_while_a_lab_lives_next_door(tmp_path, shared):
    """gc run while a live lab (another process) shares the host netns: the dead lab's bridge goes, the live lab keeps
    its bridge, veths, addresses, children and record — and still works and closes clean afterwards."""
    from _controller import Run
    dead = Run(str(tmp_path), "lifecycle", "--host", "existing", "--netns", shared.path, "--state",
               shared.state_dir, "--network", "deadnet", crash_at="lab.spawned:1")
    live = Run(str(tmp_path), "threads", "--host", "existing", "--netns", shared.path, "--state",
               shared.state_dir, "--network", "livenet", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert dead.wait() == -signal.SIGKILL
        live.proc.stdin.write(b"go 4\n")
        live.proc.stdin.flush()
        made = json.loads(live.proc.stdout.readline())
        assert all("error" not in m for m in made), made
        before = shared.state()
        live_links = {n for n, *_ in before["links"] if n != "lo"}
        report = gc(str(tmp_path))
        assert len(report.labs_collected) == 1 and len(report.labs_alive) == 1 and not report.errors
        after = shared.state()
        links = {n for n, *_ in after["links"]}
        assert {m["veth"] for m in made} <= links
        dead_bridges = live_links - links
        assert len(dead_bridges) == 1 and all(b.startswith("br-") for b in dead_bridges)
        assert after["addresses"] == [a for a in before["addresses"] if a[0] not in dead_bridges]
        assert shared.ipam_files() == ["livenet.json"]
        assert all(os.path.exists(f"/proc/{m['pid']}") for m in made)
        live.proc.stdin.write(b"go 2\nclose\nexit\n")
        live.proc.stdin.flush()
        again = json.loads(live.proc.stdout.readline())
        assert all("error" not in m for m in again), again
        assert live.wait() == 0, live.stderr()
        assert [n for n, *_ in shared.state()["links"]] == ["lo"]
        assert shared.ipam_files() == [] and rec_files(tmp_path) == []
    finally:
        dead.close()
        live.close()


@pytest.mark.root
def test_gc_leaves_a_live_sandbox_lab_alone(tmp_path, monkeypatch):
    """gc (API and `nslab gc`) while a sandbox lab of this very process runs: its state dir, child and record
    survive, the lab keeps working, and closes to 0 residue."""
    from nslab import Lab
    from nslab.hosts import scratch_root
    monkeypatch.setenv("NSLAB_RECORDS_DIR", str(tmp_path / "labs"))
    with Lab() as lab:
        c = lab.spawn(["sleep", "60"], name="c")
        state = os.path.join(scratch_root(), f"sandbox-{lab.id}")
        report = gc()
        cli = subprocess.run([sys.executable, "-m", "nslab.records_cli", "gc", "--json"], capture_output=True,
                             text=True, env=dict(os.environ))
        assert report.labs_alive == [lab.id] and report.noop
        assert cli.returncode == 0 and json.loads(cli.stdout)["labs_alive"] == [lab.id]
        assert os.path.isdir(state) and c.running and os.path.exists(lab.record.path)
        assert lab.spawn(["sleep", "60"], name="d").address is not None
    assert not os.path.exists(state) and rec_files(tmp_path) == []


# --- the leak report and the CLI ------------------------------------------------------------
@pytest.mark.root
def test_leak_report_names_owner_and_orphans(tmp_path, shared):
    """leaks lists live and dead labs, their tagged links (in a persisted netns), and exits 1 while something is orphaned."""
    from nslab._netlink import Rtnl
    with Rtnl(shared.ns) as r:
        r.request("link", "add", ifname="br-leak", kind="bridge", obj="x")
        r.request("link", "set", index=r.link_index("br-leak"), ifalias="nslab:deadbeef0001:n", obj="x")
    live = LabRecord(str(tmp_path))
    with open(os.path.join(tmp_path, "labs", "deadbeef0001.jsonl"), "w") as f:
        f.write('{"v":2,"lab":"deadbeef0001","pid":1}\n')
        f.write(json.dumps({"host": records._host_identity(fake_host(shared.ns))}) + "\n")
        f.write(json.dumps({"add": "link-1", "e": {"kind": "link", "ifname": "br-leak",
                                                     "alias": "nslab:deadbeef0001:n"}}) + "\n")
    report = leak_report(str(tmp_path))
    state = {lab["lab"]: lab["alive"] for lab in report["labs"]}
    assert state == {live.lab_id: True, "deadbeef0001": False}
    [link] = [x for x in report["tagged_links"] if x["ifname"] == "br-leak"]
    assert link["lab"] == "deadbeef0001" and link["state"] == "orphaned" and link["netns"] == shared.path
    # The CLI (machine-wide sections may list other people's labs: only ours is asserted on)
    cli = [sys.executable, "-m", "nslab.records_cli"]
    out = subprocess.run(cli + ["leaks", "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "lab deadbeef0001" in out.stdout and "br-leak" in out.stdout
    assert f"lab {live.lab_id} (unknown host) pid {os.getpid()}: alive" in out.stdout
    out = subprocess.run(cli + ["gc", "--json", "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["labs_collected"] == ["deadbeef0001"]
    live.close()
    out = subprocess.run(cli + ["leaks", "--root", str(tmp_path), "--json"], capture_output=True, text=True)
    after = json.loads(out.stdout)
    assert after["labs"] == [] and not [x for x in after["tagged_links"] if x["ifname"] == "br-leak"]
    assert "br-leak" not in {n for n, *_ in shared.state()["links"]}


def test_leaks_exit_status(monkeypatch, capsys):
    """nslab leaks exits 1 when anything is orphaned and 0 when all is owned: usable as a CI gate."""
    from nslab import records_cli
    clean = {"records_dir": "/x", "labs": [{"lab": "a", "alive": True, "pid": 1, "host": "sandbox", "entries": []}],
             "tagged_links": [], "state_dirs": [], "netns_names": [], "nft_tables": [], "processes": []}
    monkeypatch.setattr(records_cli, "leak_report", lambda root: clean)
    assert records_cli.main(["leaks"]) == 0 and "nothing orphaned" in capsys.readouterr().out
    for key, item in (("labs", {"lab": "b", "alive": False, "pid": 2, "host": "current", "entries": []}),
                      ("state_dirs", {"path": "/dev/shm/x/sandbox-1", "lab": None, "state": "unrecorded"}),
                      ("nft_tables", {"table": "nslab", "owner_flag": False, "state": "unowned"}),
                      ("processes", {"pid": 3, "ppid": 1, "cmdline": "python3 -m nslab.proxy", "state": "orphaned"})):
        dirty = {**clean, key: clean[key] + [item]}
        monkeypatch.setattr(records_cli, "leak_report", lambda root, d=dirty: d)
        assert records_cli.main(["leaks"]) == 1, key
        assert "1 orphaned object(s)" in capsys.readouterr().out


def test_leak_report_flags_unrecorded_sandbox_dirs(tmp_path, monkeypatch):
    """A sandbox state dir no record accounts for is reported as unrecorded, one a live record names as alive."""
    import nslab.hosts
    monkeypatch.setattr(nslab.hosts, "scratch_root", lambda: str(tmp_path / "scratch"))
    (tmp_path / "scratch" / "sandbox-stray").mkdir(parents=True)
    (tmp_path / "scratch" / "sandbox-owned").mkdir()
    rec = LabRecord(str(tmp_path))
    rec.add("dir", path=str(tmp_path / "scratch" / "sandbox-owned"))
    dirs = {os.path.basename(x["path"]): x["state"] for x in leak_report(str(tmp_path))["state_dirs"]}
    assert dirs == {"sandbox-stray": "unrecorded", "sandbox-owned": "alive"}
    rec.close()


@pytest.mark.root
def test_gc_removes_a_dead_labs_persisted_netns_name_by_identity(tmp_path):
    """A /run/netns name a dead lab mounted (the bench's, for reference tools) goes with gc;
    a name that now holds another namespace is left alone."""
    from nslab.namespaces import Namespace, remove_persisted
    run_dir = str(tmp_path / "netns")
    with Namespace.create("net") as ours, Namespace.create("net") as theirs:
        ours.persist("nslab-gc-ours", run_dir)
        theirs.persist("nslab-gc-theirs", run_dir)
        try:
            dev, ino = ours.identity
            dead_record(tmp_path, ("netns-name", {"name": "nslab-gc-ours", "run_dir": run_dir,
                                                  "dev": dev, "ino": ino}),
                        ("netns-name", {"name": "nslab-gc-theirs", "run_dir": run_dir,
                                        "dev": dev, "ino": ino}))
            report = gc(str(tmp_path))
            assert not report.errors
            assert not os.path.exists(os.path.join(run_dir, "nslab-gc-ours"))
            assert os.path.exists(os.path.join(run_dir, "nslab-gc-theirs"))
        finally:
            remove_persisted("nslab-gc-ours", run_dir, missing_ok=True)
            remove_persisted("nslab-gc-theirs", run_dir, missing_ok=True)

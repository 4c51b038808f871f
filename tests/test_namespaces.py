"""Namespace handles against the kernel: identities checked with os.stat on /proc/*/ns/*,
fresh namespaces, per-thread entering, and `ip netns` interop of persisted namespaces.

Opening our own namespaces needs no privilege; creating, entering and persisting do (root).
"""
import errno
import os
import subprocess
import threading
import time
import uuid

import pytest

from nslab import _native
from nslab.errors import InputError, NslabError
from nslab.namespaces import KINDS, NETNS_RUN_DIR, Namespace, remove_persisted

ALL_KINDS = sorted(KINDS)
THREAD_KINDS = ["cgroup", "ipc", "net", "uts"]


def stat_id(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def thread_net_ids():
    """{tid: identity of its netns} for every thread of this process, read from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = stat_id(f"/proc/self/task/{tid}/ns/net")
        except FileNotFoundError:
            pass  # the thread exited while we looked
    return out


def ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


# --- opening ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_open_each_kind_matches_proc(kind):
    """current/of_pid/open give the namespace os.stat sees at /proc/self/ns/KIND, with the
    kind asked of the kernel when not given."""
    expected = stat_id(f"/proc/self/ns/{kind}")
    with Namespace.current(kind) as cur, Namespace.of_pid(os.getpid(), kind) as by_pid, \
            Namespace.open(f"/proc/self/ns/{kind}") as by_path:
        assert cur.identity == by_pid.identity == by_path.identity == expected
        assert by_path.kind is KINDS[kind]
        assert cur == by_pid and hash(cur) == hash(by_pid)
        assert cur.inode == expected[1]


def test_of_pidfd_matches_proc():
    """of_pidfd gives a child's namespace, and refuses once the process is gone."""
    proc = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        with Namespace.of_pidfd(pidfd, "net") as ns:
            assert ns.identity == stat_id(f"/proc/{proc.pid}/ns/net")
        proc.kill()
        proc.wait()
        with pytest.raises(ProcessLookupError):
            Namespace.of_pidfd(pidfd, "net")
    finally:
        os.close(pidfd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_open_wrong_kind_and_missing():
    """Opening a file as the wrong kind is an InputError; a missing path FileNotFoundError;
    neither leaves an fd behind."""
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(InputError):
        Namespace.open("/proc/self/ns/uts", "net")
    with pytest.raises(FileNotFoundError):
        Namespace.open("/proc/self/ns/nope")
    assert set(os.listdir("/proc/self/fd")) == before


def test_close_is_idempotent_and_fileno_after_close_is_ebadf():
    """close() twice is fine; fileno() after close raises EBADF naming the handle."""
    ns = Namespace.current("net")
    ns.close()
    ns.close()
    assert ns.closed and "closed" in repr(ns)
    with pytest.raises(OSError) as info:
        ns.fileno()
    assert info.value.errno == errno.EBADF


# --- creating -----------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_create_gives_a_new_namespace(kind):
    """Namespace.create makes a namespace different from ours, pinned by the handle, without
    moving the calling thread."""
    ours = stat_id(f"/proc/thread-self/ns/{kind}")
    with Namespace.create(kind) as ns:
        assert ns.identity != ours
        assert ns.kind is KINDS[kind]
        assert stat_id(f"/proc/self/fd/{ns.fileno()}") == ns.identity
        assert stat_id(f"/proc/thread-self/ns/{kind}") == ours


@pytest.mark.parametrize("kind", ["mnt", "pid", "user", "time"])
def test_create_process_only_kind_is_refused(kind):
    """Kinds a thread cannot hold alone are refused with an InputError (use a child)."""
    with pytest.raises(InputError):
        Namespace.create(kind)


# --- entering -----------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_entered_moves_this_thread_and_restores_on_exception(kind):
    """Inside entered() this thread is in the namespace; an exception in the block still
    brings it back."""
    ours = stat_id(f"/proc/thread-self/ns/{kind}")
    with Namespace.create(kind) as ns:
        with pytest.raises(RuntimeError):
            with ns.entered():
                assert stat_id(f"/proc/thread-self/ns/{kind}") == ns.identity
                raise RuntimeError("boom")
        assert stat_id(f"/proc/thread-self/ns/{kind}") == ours


def all_threads_back_in(host, timeout=2.0):
    """True once every thread is in `host`. Throwaway threads (Namespace.create, ns.call) may
    linger in /proc for a moment after join() returned, still in their namespace."""
    deadline = time.monotonic() + timeout
    while set(thread_net_ids().values()) != {host}:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.root
def test_entered_never_moves_other_threads():
    """While one thread is inside entered(), the process's other threads stay in the host
    netns (checked via /proc/self/task/TID/ns/net), and all are back afterwards."""
    host = stat_id("/proc/thread-self/ns/net")
    release = threading.Event()
    started = threading.Barrier(4)
    tids = []

    def idle():
        tids.append(threading.get_native_id())
        started.wait()
        release.wait(10)

    threads = [threading.Thread(target=idle) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait()
    me = _native.gettid()
    try:
        with Namespace.create("net") as ns:
            with ns.entered():
                ids = thread_net_ids()
                assert ids[me] == ns.identity
                assert [ids[tid] for tid in tids] == [host] * 3, ids
            ids = thread_net_ids()
            assert [ids[tid] for tid in tids + [me]] == [host] * 4
            # call() runs on a throwaway thread: the caller never moves either.
            assert ns.call(lambda: stat_id("/proc/thread-self/ns/net")) == ns.identity
            assert stat_id("/proc/thread-self/ns/net") == host
    finally:
        release.set()
        for t in threads:
            t.join()
    assert all_threads_back_in(host), thread_net_ids()


@pytest.mark.parametrize("kind", ["mnt", "user", "pid", "time"])
def test_entered_refuses_process_only_kinds(kind):
    """entered() refuses kinds a thread of a threaded process cannot enter, before any setns."""
    with Namespace.current(kind) as ns:
        with pytest.raises(InputError):
            with ns.entered():
                pass


@pytest.mark.root
def test_call_reraises_and_restores():
    """ns.call re-raises the function's exception here; the thread it used is gone."""
    with Namespace.create("net") as ns:
        with pytest.raises(ZeroDivisionError):
            ns.call(lambda: 1 / 0)
    assert all_threads_back_in(stat_id("/proc/thread-self/ns/net")), thread_net_ids()


# --- persisting like `ip netns add` -------------------------------------------------------
@pytest.fixture
def netns_name():
    name = f"nslab-test-{uuid.uuid4().hex[:10]}"
    yield name
    remove_persisted(name, missing_ok=True)
    assert not os.path.exists(os.path.join(NETNS_RUN_DIR, name))


@pytest.mark.root
def test_persist_interops_with_ip_netns(netns_name):
    """A persisted netns is listed by `ip netns`, entered by `ip netns exec` (same inode), and
    outlives our handle; remove_persisted makes it vanish from both."""
    ns = Namespace.create("net")
    inode = ns.inode
    path = ns.persist(netns_name)
    assert path == os.path.join(NETNS_RUN_DIR, netns_name)
    assert stat_id(path) == ns.identity
    ns.close()
    listed = ip("netns", "list")
    assert listed.returncode == 0 and netns_name in listed.stdout.split()
    inside = ip("netns", "exec", netns_name, "readlink", "/proc/self/ns/net")
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == f"net:[{inode}]"
    links = ip("netns", "exec", netns_name, "ip", "-o", "link")
    assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]
    with Namespace.open(path, "net") as again:
        assert again.inode == inode
    remove_persisted(netns_name)
    assert netns_name not in ip("netns", "list").stdout.split()
    assert not os.path.exists(path)


@pytest.mark.root
def test_persist_existing_name_and_remove_missing(netns_name):
    """Persisting under a taken name is FileExistsError; removing a missing name is
    FileNotFoundError unless missing_ok."""
    with Namespace.create("net") as a, Namespace.create("net") as b:
        a.persist(netns_name)
        with pytest.raises(FileExistsError):
            b.persist(netns_name)
    remove_persisted(netns_name)
    with pytest.raises(FileNotFoundError):
        remove_persisted(netns_name)
    remove_persisted(netns_name, missing_ok=True)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x;id", "y$(id)", "-lead", "a" * 65,
                                  "sp ace", None, 7])
def test_persist_rejects_bad_names(name):
    """Names a shell or a path could misread are InputErrors, before anything is mounted."""
    with Namespace.current("net") as ns:
        with pytest.raises(InputError):
            ns.persist(name)
        with pytest.raises(InputError):
            remove_persisted(name)


@pytest.mark.root
def test_owner_parent_and_owner_uid_follow_the_user_namespace_tree():
    """A child in a new user+net namespace: its netns is owned by its userns, whose parent is
    our userns; the creator's uid is ours. Checked against /proc independently."""
    from nslab.process import Child
    with Child.spawn(["sleep", "30"], new=("user", "net")) as child:
        netns = Namespace.of_pid(child.pid, "net")
        userns = Namespace.of_pid(child.pid, "user")
        mine = Namespace.current("user")
        try:
            with netns.owner() as owner, userns.parent() as parent:
                assert owner == userns and owner.identity == stat_id(f"/proc/{child.pid}/ns/user")
                assert parent == mine
            assert userns.owner_uid() == os.geteuid()
        finally:
            for ns in (netns, userns, mine):
                ns.close()


def test_parent_of_the_top_user_namespace_is_refused():
    """NS_GET_PARENT at the top of the tree (or of what we may see) is an error naming it."""
    top = Namespace.current("user")
    try:
        while True:
            try:
                nxt = top.parent()
            except NslabError as exc:
                assert exc.errno in (errno.EPERM, errno.ENOENT) and "NS_GET_PARENT" in str(exc)
                break
            top.close()
            top = nxt
    finally:
        top.close()


def test_owner_of_a_net_namespace_is_a_user_namespace():
    with Namespace.current("net") as net, net.owner() as owner, Namespace.current("user") as mine:
        assert owner.kind.name == "user" and owner == mine
        with pytest.raises(NslabError):
            net.owner_uid()                         # only user namespaces have an owner uid

"""The unprivileged tier of the native layer: errno -> exception mapping, pickling of nslab
errors, the namespace kind table, and errors at the C boundary (EBADF, EINVAL, ENOTTY).

Nothing here needs root or changes the kernel's state.
"""
import errno
import os
import pickle
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nslab import _native, errors
from nslab.errors import (InputError, NslabBusyError, NslabChildProcessError, NslabError,
                          NslabFileExistsError, NslabFileNotFoundError, NslabPermissionError,
                          NslabProcessLookupError, NslabTimeoutError, PortAllocatedError,
                          ResourceExhaustedError, SpawnError, from_errno, from_netlink)
from nslab.namespaces import KINDS, NamespaceKind, kind_of
from nslab.process import SpawnFileNotFoundError, SpawnPermissionError

lib = _native.lib
ALL_ERRNOS = sorted(errno.errorcode)

EXPECTED = [
    (errno.EPERM, NslabPermissionError, PermissionError),
    (errno.EACCES, NslabPermissionError, PermissionError),
    (errno.ENOENT, NslabFileNotFoundError, FileNotFoundError),
    (errno.EEXIST, NslabFileExistsError, FileExistsError),
    (errno.ESRCH, NslabProcessLookupError, ProcessLookupError),
    (errno.ETIMEDOUT, NslabTimeoutError, TimeoutError),
    (errno.ECHILD, NslabChildProcessError, ChildProcessError),
    (errno.EBUSY, NslabBusyError, OSError),
    (errno.EXFULL, ResourceExhaustedError, OSError),
    (errno.EINVAL, NslabError, OSError),
]


def fields(exc):
    return (type(exc), exc.errno, exc.strerror, str(exc), exc.__dict__)


# --- errno -> class -----------------------------------------------------------------------
@pytest.mark.parametrize("err, cls, builtin", EXPECTED)
def test_errno_maps_to_class_and_builtin(err, cls, builtin):
    """Each errno gets its nslab class, which also is the matching builtin (except works)."""
    exc = from_errno(err, "setns", "netns /run/netns/x")
    assert type(exc) is cls
    assert isinstance(exc, builtin) and isinstance(exc, NslabError) and isinstance(exc, OSError)
    assert exc.errno == err
    with pytest.raises(builtin):
        raise exc


def test_negative_errno_is_accepted():
    """C shims return -errno; from_errno takes either sign."""
    assert from_errno(-errno.ENOENT, "open").errno == errno.ENOENT


def test_message_names_syscall_and_object():
    """The message reads `syscall(object) failed: strerror`."""
    exc = from_errno(errno.ENOENT, "open", "namespace /proc/4242/ns/net")
    assert exc.strerror == "open(namespace /proc/4242/ns/net) failed: No such file or directory"
    assert (exc.syscall, exc.obj) == ("open", "namespace /proc/4242/ns/net")
    assert str(exc).startswith("[Errno 2] open(")


def test_eperm_hint_depends_on_who_we_are(monkeypatch):
    """EPERM as non-root says to use root; as root it blames a security module or a missing
    capability; an AppArmor userns restriction is named when the sysctl says so."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(errors, "_read_sysctl", lambda path: None)
    assert "needs root" in str(from_errno(errno.EPERM, "unshare"))
    monkeypatch.setattr(errors, "_read_sysctl",
                        lambda path: "1" if "apparmor" in path else None)
    assert "apparmor_restrict_unprivileged_userns" in str(from_errno(errno.EPERM, "unshare"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert "running as root" in str(from_errno(errno.EACCES, "open"))
    assert from_errno(errno.EINVAL, "setns").hint is None


def test_from_netlink_translates_code():
    """A NetlinkError-like object becomes the nslab error for its code, naming the request."""
    class FakeNetlinkError(Exception):
        code = errno.EEXIST
    exc = from_netlink(FakeNetlinkError(), "RTM_NEWLINK", "veth0")
    assert isinstance(exc, FileExistsError) and "netlink RTM_NEWLINK(veth0)" in str(exc)


# --- pickling -----------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [
    from_errno(errno.EPERM, "setns", "netns x", hint="be root"),
    from_errno(errno.EINVAL, "mount", None),
    InputError("hostname", "too long", "x" * 70),
    SpawnError(errno.EBADF, "setns(net fd 9) failed", step="setns(net fd 9)", syscall="setns"),
    SpawnPermissionError(errno.EACCES, "execve(/x) failed", step="execve(/x)"),
    SpawnFileNotFoundError(errno.ENOENT, "execve(/x) failed", step="execve(/x)"),
    PortAllocatedError("port 8080 is already allocated", holder="pid 42"),
    NslabTimeoutError(errno.ETIMEDOUT, "wait timed out", syscall="waitid"),
], ids=lambda e: type(e).__name__)
def test_errors_pickle_round_trip(exc):
    """Every nslab error survives pickling with its class, errno, message and context (so it
    can cross from a child process)."""
    back = pickle.loads(pickle.dumps(exc))
    assert fields(back) == fields(exc)
    assert isinstance(back, NslabError)


# --- properties over every errno ----------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(err=st.sampled_from(ALL_ERRNOS), syscall=st.text(min_size=1, max_size=20),
       obj=st.one_of(st.none(), st.text(max_size=40)))
def test_from_errno_property(err, syscall, obj):
    """For any errno: an NslabError with that errno, naming the syscall and object, whose
    builtin bases (if any) are the one Python itself picks for that errno or its parents
    (ConnectionError for ECONNREFUSED), and which pickles."""
    exc = from_errno(err, syscall, obj)
    assert isinstance(exc, NslabError) and exc.errno == err
    assert exc.strerror.startswith(syscall)
    if obj:
        assert f"({obj})" in exc.strerror
    python_pick = type(OSError(err, "x"))
    for base in type(exc).__mro__:
        if issubclass(base, OSError) and base.__module__ == "builtins" and base is not OSError:
            assert issubclass(python_pick, base), (err, base, python_pick)
    assert fields(pickle.loads(pickle.dumps(exc))) == fields(exc)


@settings(max_examples=100, deadline=None)
@given(err=st.integers(min_value=1, max_value=4095))
def test_from_errno_accepts_unknown_errnos(err):
    """Errnos the platform has no name for still give an NslabError, never a crash."""
    exc = from_errno(-err, "ioctl", "fd 3")
    assert exc.errno == err and isinstance(exc, NslabError)


# --- the kind table -----------------------------------------------------------------------
CLONE_FLAGS = {"mnt": 0x00020000, "cgroup": 0x02000000, "uts": 0x04000000, "ipc": 0x08000000,
               "user": 0x10000000, "pid": 0x20000000, "net": 0x40000000, "time": 0x00000080}


def test_kind_table_has_all_eight_with_kernel_flags():
    """The table has the eight kinds, each with the kernel's CLONE_NEW* value and a file under
    /proc/self/ns."""
    assert {k: v.flag for k, v in KINDS.items()} == CLONE_FLAGS
    assert set(KINDS) <= set(os.listdir("/proc/self/ns"))
    assert {k for k, v in KINDS.items() if v.per_thread} == {"net", "uts", "ipc", "cgroup"}
    assert len({v.pidfd_ioctl for v in KINDS.values()}) == 8


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_of_round_trips(name):
    """kind_of accepts a name, a flag or a kind and always gives the same row."""
    k = KINDS[name]
    assert kind_of(name) is k and kind_of(k.flag) is k and kind_of(k) is k
    assert isinstance(k, NamespaceKind) and repr(k) == f"<NamespaceKind {name}>"


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(st.text(max_size=10).filter(lambda s: s not in KINDS),
                       st.integers().filter(lambda i: i not in CLONE_FLAGS.values()),
                       st.booleans(), st.none(), st.floats()))
def test_kind_of_rejects_anything_else(value):
    """Anything that is not a kind name, CLONE_NEW* flag or kind is an InputError."""
    with pytest.raises(InputError) as info:
        kind_of(value)
    assert info.value.field == "namespace kind" and isinstance(info.value, ValueError)


# --- the C boundary -----------------------------------------------------------------------
@pytest.fixture
def regular_fd():
    with tempfile.TemporaryFile() as f:
        yield f.fileno()


def test_setns_bad_fd_is_ebadf():
    """setns on fd -1 returns -EBADF from C and raises an error naming setns and the fd."""
    assert lib.nslab_setns(-1, 0) == -errno.EBADF
    with pytest.raises(NslabError) as info:
        _native.setns(-1)
    assert info.value.errno == errno.EBADF and "setns(fd -1)" in str(info.value)


def test_setns_on_regular_file_is_einval(regular_fd):
    """setns on a file that is not a namespace returns -EINVAL."""
    assert lib.nslab_setns(regular_fd, 0) == -errno.EINVAL


def test_ns_ioctl_on_regular_file_is_enotty(regular_fd):
    """An nsfs ioctl on a regular file is ENOTTY; NS_GET_OWNER_UID too."""
    assert lib.nslab_ns_ioctl(regular_fd, lib.NSLAB_NS_GET_NSTYPE) == -errno.ENOTTY
    with pytest.raises(NslabError) as info:
        _native.ns_get_owner_uid(regular_fd)
    assert info.value.errno == errno.ENOTTY


def test_ns_ioctls_on_own_namespaces():
    """NS_GET_NSTYPE names our own namespaces' kinds; NS_GET_OWNER_UID is EINVAL on a netns."""
    for name, kind in KINDS.items():
        fd = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert lib.nslab_ns_ioctl(fd, lib.NSLAB_NS_GET_NSTYPE) == kind.flag
        finally:
            os.close(fd)
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        uid = _native.ffi.new("unsigned int *")
        assert lib.nslab_ns_get_owner_uid(fd, uid) == -errno.EINVAL
    finally:
        os.close(fd)


def test_pidfd_open_einval_and_esrch():
    """pidfd_open rejects pid -1 and unknown flags (EINVAL) and a free pid (ESRCH)."""
    assert lib.nslab_pidfd_open(-1, 0) == -errno.EINVAL
    assert lib.nslab_pidfd_open(os.getpid(), 0x7FFF0000) == -errno.EINVAL
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with pytest.raises(ProcessLookupError):
        _native.pidfd_open(pid_max + 1 if pid_max < 2**22 else 2**22 + 1)


def test_unshare_invalid_flags_is_einval():
    """unshare with a flag that is not an unshare flag fails with EINVAL and changes nothing."""
    before = os.readlink("/proc/thread-self/ns/net")
    with pytest.raises(NslabError) as info:
        _native.unshare(0x00004000)  # CLONE_VFORK: not an unshare flag
    assert info.value.errno == errno.EINVAL and "unshare" in str(info.value)
    assert os.readlink("/proc/thread-self/ns/net") == before


def test_spawn_rejects_too_many_fds_in_c():
    """The trampoline refuses more fds than it can track, before cloning (-EINVAL)."""
    a = _native.ffi.new("struct nslab_spawn_args *")
    a.n_keep = lib.NSLAB_SPAWN_MAX_FDS
    a.cgroup_fd = -1
    a.stdio = [-1, -1, -1]
    r = _native.ffi.new("struct nslab_spawn_result *")
    assert lib.nslab_spawn(a, r) == -errno.EINVAL
    assert lib.nslab_spawn_via_spawner(a, r) == -errno.EINVAL

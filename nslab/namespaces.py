"""Namespaces as Python objects: open one, ask what it is, enter it on one thread, pin it.

A :class:`Namespace` owns an open nsfs file descriptor. Holding the fd keeps the namespace
alive, and makes its identity meaningful: the kernel reuses inode numbers once a namespace
dies, so an identity is only worth comparing while something pins it.

    >>> host = Namespace.current("net")
    >>> lab = Namespace.create("net")          # a fresh, empty netns, pinned by its fd
    >>> host == lab
    False
    >>> with lab.entered():                     # this thread only; always restored
    ...     socket.socket()                     # a socket that lives in `lab` for good
    >>> lab.persist("demo")                    # now `ip netns exec demo ...` works on it

``setns`` moves only the calling thread (kernel-notes: threads started later inherit it),
so nslab never leaves a long-lived thread in another namespace: :meth:`Namespace.entered`
restores in ``finally``, and :meth:`Namespace.call` runs a function on a throwaway thread.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import signal
import threading
from typing import Callable, Iterator, TypeVar

from . import _native
from ._names import check_name
from .errors import InputError, NslabError, from_errno
from ._faults import checkpoint

__all__ = ["NamespaceKind", "KINDS", "kind_of", "Namespace", "remove_persisted", "NETNS_RUN_DIR"]

T = TypeVar("T")
NETNS_RUN_DIR = "/run/netns"


@dataclasses.dataclass(frozen=True)
class NamespaceKind:
    """One row of the namespace table (util-linux keeps the same table in unshare.c)."""

    name: str            # the file name under /proc/PID/ns/
    flag: int            # CLONE_NEW*
    pidfd_ioctl: int     # PIDFD_GET_*_NAMESPACE (Linux 6.11+)
    per_thread: bool     # can one thread of a multithreaded process setns into it?

    def __repr__(self) -> str:
        return f"<NamespaceKind {self.name}>"


# Mount, user, pid and time namespaces cannot be entered by one thread of a threaded process
# (setns: EINVAL), or only affect children: nslab enters those in a child process instead.
KINDS: dict[str, NamespaceKind] = {k.name: k for k in (
    NamespaceKind("net", _native.CLONE_NEWNET, _native.lib.NSLAB_PIDFD_GET_NET_NAMESPACE, True),
    NamespaceKind("uts", _native.CLONE_NEWUTS, _native.lib.NSLAB_PIDFD_GET_UTS_NAMESPACE, True),
    NamespaceKind("ipc", _native.CLONE_NEWIPC, _native.lib.NSLAB_PIDFD_GET_IPC_NAMESPACE, True),
    NamespaceKind("mnt", _native.CLONE_NEWNS, _native.lib.NSLAB_PIDFD_GET_MNT_NAMESPACE, False),
    NamespaceKind("pid", _native.CLONE_NEWPID, _native.lib.NSLAB_PIDFD_GET_PID_NAMESPACE, False),
    NamespaceKind("user", _native.CLONE_NEWUSER, _native.lib.NSLAB_PIDFD_GET_USER_NAMESPACE, False),
    NamespaceKind("cgroup", _native.CLONE_NEWCGROUP, _native.lib.NSLAB_PIDFD_GET_CGROUP_NAMESPACE, True),
    NamespaceKind("time", _native.CLONE_NEWTIME, _native.lib.NSLAB_PIDFD_GET_TIME_NAMESPACE, False),
)}
_BY_FLAG = {k.flag: k for k in KINDS.values()}


def kind_of(value: "str | int | NamespaceKind") -> NamespaceKind:
    """Look a kind up by name (``"net"``), CLONE_NEW* flag, or pass one through."""
    if isinstance(value, NamespaceKind):
        return value
    if isinstance(value, str) and value in KINDS:
        return KINDS[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in _BY_FLAG:
        return _BY_FLAG[value]
    raise InputError("namespace kind", f"expected one of {', '.join(KINDS)} or a CLONE_NEW* flag",
                     value)


def _check_persist_name(name: object) -> str:
    return check_name(name, "netns name")


class Namespace:
    """An open handle to one namespace. Owns its fd; ``close()`` is idempotent."""

    __slots__ = ("_fd", "kind", "description", "_identity", "__weakref__")

    def __init__(self, fd: int, kind: "NamespaceKind | str | None" = None, description: str = ""):
        """Take ownership of ``fd``; the kind is asked of the kernel when not given."""
        self._fd = fd
        try:
            actual = kind_of(_native.ns_ioctl(fd, _native.lib.NSLAB_NS_GET_NSTYPE,
                                              "NS_GET_NSTYPE", description or f"fd {fd}"))
            if kind is not None and kind_of(kind) != actual:
                raise InputError("namespace kind", f"{description or f'fd {fd}'} is a {actual.name} "
                                 f"namespace, not {kind_of(kind).name}")
            self.kind = actual
            st = os.fstat(fd)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        self.description = description or f"{self.kind.name}:[{self._identity[1]}]"

    # --- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, kind: "NamespaceKind | str | None" = None) -> "Namespace":
        """Open a namespace file: ``/proc/PID/ns/net``, ``/run/netns/NAME``, a bind mount."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_errno(exc.errno, "open", f"namespace {path}") from None
        return cls(fd, kind, path)

    @classmethod
    def current(cls, kind: "NamespaceKind | str" = "net") -> "Namespace":
        """The calling *thread's* namespace of ``kind`` (not the process's main thread's)."""
        k = kind_of(kind)
        return cls.open(f"/proc/thread-self/ns/{k.name}", k)

    @classmethod
    def of_pid(cls, pid: int, kind: "NamespaceKind | str" = "net") -> "Namespace":
        """A process's namespace through /proc. Racy against PID reuse: prefer :meth:`of_pidfd`."""
        k = kind_of(kind)
        return cls.open(f"/proc/{int(pid)}/ns/{k.name}", k)

    @classmethod
    def of_pidfd(cls, pidfd: int, kind: "NamespaceKind | str" = "net") -> "Namespace":
        """A process's namespace through its pidfd: the ioctl on 6.11+, else /proc, checked."""
        k = kind_of(kind)
        if _pidfd_ioctl_supported():
            try:
                fd = _native.ns_ioctl(pidfd, k.pidfd_ioctl, f"PIDFD_GET_{k.name.upper()}_NAMESPACE",
                                      f"pidfd {pidfd}")
                return cls(fd, k, f"{k.name} namespace of pidfd {pidfd}")
            except NslabError as exc:
                if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                # Only a kernel without the ioctls (before 6.11: ENOTTY on a real pidfd) turns
                # the fast path off for good; a bad fd or a kind this kernel lacks does not.
                if exc.errno == errno.ENOTTY and _pid_of_pidfd(pidfd) > 0:
                    _PIDFD_IOCTL[0] = False
        pid = _pid_of_pidfd(pidfd)
        ns = cls.of_pid(pid, k)
        try:
            # The pid may have been reused between fdinfo and open: the pidfd tells.
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            ns.close()
            raise from_errno(errno.ESRCH, "pidfd_send_signal", f"pidfd {pidfd} (pid {pid})") from None
        except BaseException:
            ns.close()                  # (EPERM, say): not left for the garbage collector
            raise
        return ns

    @classmethod
    def from_fd(cls, fd: int, kind: "NamespaceKind | str | None" = None) -> "Namespace":
        """A handle on a duplicate of ``fd``; the caller keeps its own fd."""
        return cls(os.dup(fd), kind, f"fd {fd}")

    @classmethod
    def create(cls, kind: "NamespaceKind | str" = "net") -> "Namespace":
        """A new, empty namespace, pinned only by the returned handle (no process, no mount).

        A throwaway thread unshares and opens its own namespace file, then exits: the calling
        thread never moves. Only kinds a single thread can have (net, uts, ipc, cgroup).
        """
        k = kind_of(kind)
        if not k.per_thread:
            raise InputError("namespace kind", f"a {k.name} namespace needs a process to hold it: "
                             "start a child with it instead", k.name)

        def make() -> int:
            _native.unshare(k.flag, f"new {k.name} namespace")
            return os.open(f"/proc/thread-self/ns/{k.name}", os.O_RDONLY | os.O_CLOEXEC)

        fd = _run_on_thread(make)
        return cls(fd, k)

    # --- identity -----------------------------------------------------------------------
    @property
    def identity(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the nsfs file: equal identities mean the same namespace."""
        return self._identity

    @property
    def inode(self) -> int:
        return self._identity[1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Namespace):
            return NotImplemented
        return self.kind == other.kind and self._identity == other._identity

    def __hash__(self) -> int:
        return hash((self.kind.name, self._identity))

    def owner(self) -> "Namespace":
        """The user namespace that owns this one (NS_GET_USERNS)."""
        fd = _native.ns_ioctl(self.fileno(), _native.lib.NSLAB_NS_GET_USERNS, "NS_GET_USERNS",
                              self.description)
        return Namespace(fd, "user", f"owner of {self.description}")

    def parent(self) -> "Namespace":
        """The parent of a user or pid namespace (NS_GET_PARENT; EPERM at the top)."""
        fd = _native.ns_ioctl(self.fileno(), _native.lib.NSLAB_NS_GET_PARENT, "NS_GET_PARENT",
                              self.description)
        return Namespace(fd, self.kind, f"parent of {self.description}")

    def owner_uid(self) -> int:
        """The uid that created a user namespace (NS_GET_OWNER_UID)."""
        return _native.ns_get_owner_uid(self.fileno(), self.description)

    # --- using it -----------------------------------------------------------------------
    @contextlib.contextmanager
    def entered(self, *, leaving_thread: bool = False) -> Iterator["Namespace"]:
        """Move the calling thread into this namespace for the block; always moves it back.

        Other threads never move. Only for kinds a thread can enter alone (net, uts, ipc,
        cgroup); the block must not start threads that outlive it (they inherit it).
        ``leaving_thread``: the thread ends right after the block (a :meth:`call` body), so
        an EPERM on the way back is harmless — in a rootless lab (``unshare -Urn``) going
        back into a namespace the initial user namespace owns (the inherited uts) is refused.
        """
        self._check_thread_kind()
        saved = Namespace.current(self.kind)
        if saved == self:
            # Already there: no setns, which would need CAP_SYS_ADMIN over the namespace's
            # owner even to "enter" our own (it fails in a rootless lab's inherited uts ns).
            saved.close()
            yield self
            return
        try:
            _native.setns(self.fileno(), self.kind.flag, self.description)
            try:
                yield self
            finally:
                try:
                    _native.setns(saved.fileno(), self.kind.flag, f"back to {saved.description}")
                except NslabError as exc:
                    if not (leaving_thread and exc.errno == errno.EPERM):
                        raise
        finally:
            saved.close()

    def enter_for_rest_of_thread(self) -> None:
        """Move the calling thread here for good. Only for a throwaway thread that ends right
        after (inside a :meth:`call` body, say), where there is nothing to go back to."""
        self._check_thread_kind()
        if threading.current_thread() is threading.main_thread():
            raise NslabError(errno.EINVAL, "enter_for_rest_of_thread() on the main thread would "
                             "move it for good: use entered() or call()")
        with Namespace.current(self.kind) as here:
            if here != self:
                _native.setns(self.fileno(), self.kind.flag, self.description)

    def _check_thread_kind(self) -> None:
        if not self.kind.per_thread:
            raise InputError("namespace kind", f"a thread of a threaded process cannot enter a "
                             f"{self.kind.name} namespace (setns: EINVAL); run a child in it",
                             self.kind.name)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn`` on a throwaway thread inside this namespace; return or re-raise its result."""
        return _run_on_thread(self._throwaway(fn, args, kwargs))

    def _throwaway(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> Callable[[], T]:
        """The body of a throwaway thread: enter, run, go back (see ``leaving_thread``)."""
        self._check_thread_kind()      # here, before a thread is started just to fail

        def inside() -> T:
            with self.entered(leaving_thread=True):
                return fn(*args, **kwargs)
        return inside

    def call_async(self, fn: Callable[..., T], *args, **kwargs) -> Callable[[], T]:
        """Start ``fn`` on a throwaway thread inside this namespace; returns a function that
        waits for it and returns (or re-raises) its result. Lets the caller overlap kernel
        work in two namespaces (the GIL is released during syscalls)."""
        return _start_thread(self._throwaway(fn, args, kwargs))

    # --- persisting, the way `ip netns add` does ----------------------------------------
    def persist(self, name: str, run_dir: str = NETNS_RUN_DIR) -> str:
        """Bind-mount this namespace at ``run_dir/name`` so it outlives its fd and processes.

        With the default ``/run/netns`` this is exactly iproute2's layout: ``ip netns list``
        shows it and ``ip netns exec NAME`` enters it. Undo with :func:`remove_persisted`.
        """
        name = _check_persist_name(name)
        path = os.path.join(run_dir, name)
        made_dir = not os.path.isdir(run_dir)
        os.makedirs(run_dir, mode=0o755, exist_ok=True)
        with _locked(run_dir):
            if run_dir == NETNS_RUN_DIR:
                _note_run_dir(made_dir, _make_shared_mount(run_dir))
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
                checkpoint("netns.name_file")
            except FileExistsError:
                raise from_errno(errno.EEXIST, "open(O_CREAT|O_EXCL)", f"netns name {path}",
                                 hint="pick another name, or remove_persisted() the old one") from None
            mounted = False
            try:
                _native.mount(f"/proc/self/fd/{self.fileno()}", path, None, _native.MS_BIND)
                mounted = True
                checkpoint("netns.persisted")
            except BaseException:
                if mounted:          # interrupted after the mount: a mount point cannot be unlinked
                    _native.umount2(path, _native.MNT_DETACH)
                os.unlink(path)
                raise
        return path

    # --- ownership ----------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise from_errno(errno.EBADF, "fileno", f"closed handle to {self.description}")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Namespace {self.kind.name}:[{self._identity[1]}] {self.description!r} {state}>"


def remove_persisted(name: str, run_dir: str = NETNS_RUN_DIR, missing_ok: bool = False) -> None:
    """Undo :meth:`Namespace.persist` (``ip netns del``): lazy unmount, then unlink."""
    name = _check_persist_name(name)
    path = os.path.join(run_dir, name)
    try:
        _native.umount2(path, _native.MNT_DETACH)
        checkpoint("netns.unmounted")
    except NslabError as exc:
        # EINVAL: not a mount point (a half-made entry); ENOENT: already gone.
        if exc.errno == errno.ENOENT and missing_ok:
            return
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise from_errno(errno.ENOENT, "unlink", f"netns name {path}") from None
    if run_dir == NETNS_RUN_DIR:
        _undo_run_dir_if_ours(run_dir)


# --- helpers ------------------------------------------------------------------------------
_PIDFD_IOCTL = [None]


def _pidfd_ioctl_supported() -> bool:
    return _PIDFD_IOCTL[0] is not False


def _pid_of_pidfd(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                if pid <= 0:
                    raise from_errno(errno.ESRCH, "pidfd fdinfo", f"pidfd {pidfd} (process exited)")
                return pid
    raise from_errno(errno.EBADF, "pidfd fdinfo", f"fd {pidfd} is not a pidfd")


def _run_on_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new thread and return its result or re-raise its exception here."""
    return _start_thread(fn)()


def _start_thread(fn: Callable[[], T]) -> Callable[[], T]:
    """Start ``fn`` on a new thread; the returned function joins it and returns or re-raises."""
    box: dict[str, object] = {}

    def body():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="nslab-ns", daemon=True)
    t.start()

    def join() -> T:
        t.join()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["result"]  # type: ignore[return-value]
    return join


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_shared_mount(run_dir: str) -> bool:
    """What ip netns does: make run_dir a shared mount so netns mounts propagate to other
    mount namespaces; if it is not a mount point yet (EINVAL), bind it onto itself first.
    Returns True if it made that self-bind."""
    try:
        _native.mount("none", run_dir, None, _native.MS_SHARED | _native.MS_REC)
        return False
    except NslabError as exc:
        if exc.errno != errno.EINVAL:
            raise
        _native.mount(run_dir, run_dir, "none", _native.MS_BIND | _native.MS_REC)
        _native.mount("none", run_dir, None, _native.MS_SHARED | _native.MS_REC)
        return True


# iproute2 leaves /run/netns (and its self-bind mount) behind after the last `ip netns del`.
# nslab leaves the machine as it found it: if it made them, it removes them with the last
# name. What it made is noted outside /run/netns (a file inside would show as a netns).
_RUN_DIR_MARK = "/run/nslab/made-run-netns"


def _note_run_dir(made_dir: bool, made_bind: bool) -> None:
    if not (made_dir or made_bind) or os.path.exists(_RUN_DIR_MARK):
        return
    os.makedirs(os.path.dirname(_RUN_DIR_MARK), mode=0o700, exist_ok=True)
    with open(_RUN_DIR_MARK, "w") as f:
        f.write(("dir " if made_dir else "") + ("bind" if made_bind else ""))


def _undo_run_dir_if_ours(run_dir: str) -> None:
    """With the last name gone, remove the self-bind and the directory nslab made."""
    try:
        with open(_RUN_DIR_MARK) as f:
            made = f.read().split()
    except FileNotFoundError:
        return
    with _locked(run_dir):
        if os.listdir(run_dir):
            return
        if "bind" in made:
            _native.umount2(run_dir, _native.MNT_DETACH)
        if "dir" in made:
            os.rmdir(run_dir)
        os.unlink(_RUN_DIR_MARK)


"""Child processes in namespaces, owned through a pidfd.

Start a program in fresh namespaces, or in ones you already hold, and own it through its
pidfd, so nothing ever signals or reaps a stranger that inherited a recycled PID::

    >>> from nslab.process import Child, PIPE
    >>> with Child.spawn(["ip", "-o", "link"], new=("net",), stdout=PIPE) as child:
    ...     out, _ = child.communicate(timeout=5)
    >>> out                                    # a fresh netns has only its loopback
    b'1: lo: <LOOPBACK> mtu 65536 ...'
    >>> child
    <Child ['ip', '-o', 'link']: exited 0, pid 4242>

``new`` names the namespace kinds the clone creates; ``join`` lists :class:`Namespace`
handles the child enters before it execs (a user namespace first). Between the clone and the
exec the child waits, and ``before_exec(child)`` runs *here*, in the caller: that is where
the network layer moves a veth into ``child.namespace("net")`` or writes routes, so the
program starts with its network already in place. If ``before_exec`` raises, the child is
killed and reaped and the exception propagates.

No Python runs in the child: the clone, the namespace dance and the exec are C
(``csrc/spawn.c``), and a failure comes back as a :class:`~nslab.errors.SpawnError` that
names the step::

    >>> Child.spawn(["/nonexistent"])
    SpawnFileNotFoundError: [Errno 2] execve(/nonexistent) failed in the child of
    ['/nonexistent']: No such file or directory

Running a *Python function* in fresh namespaces is :func:`call_in_child`: it starts a new
interpreter through the same trampoline (never a fork of this one, so it is safe while this
process has threads), sends it the pickled call, and returns the result or re-raises the
exception here, with the remote traceback attached::

    >>> import socket
    >>> call_in_child(socket.if_nameindex, new=("net",))
    [(1, 'lo')]

Parent death: with ``die_with_parent=True`` (the default) the child gets SIGKILL when this
process dies. ``PR_SET_PDEATHSIG`` fires when the *thread* that cloned exits, so nslab clones
from one long-lived C thread of its own (the "spawner"), whichever thread asks: a child
started from a short-lived worker thread survives that thread and still dies with the process.

stdin/stdout/stderr take ``None`` (inherit), an fd, a file object, :data:`PIPE` (then
``child.stdin``/``child.stdout``/``child.stderr`` is a binary file), :data:`DEVNULL`, and for
stderr :data:`STDOUT` -- the same constants as :mod:`subprocess`.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

from . import _native
from .errors import (InputError, NslabError, NslabTimeoutError, SpawnError, from_errno,
                     privilege_hint)
from .namespaces import KINDS, Namespace, NamespaceKind, kind_of

if TYPE_CHECKING:                 # not at run time: `import nslab.process` stays free of pyroute2
    from .child_setup import ChildSetup

__all__ = ["Child", "UserMap", "call_in_child", "PIPE", "DEVNULL", "STDOUT",
           "SpawnPermissionError", "SpawnFileNotFoundError", "RemoteTraceback",
           "ChildDiedError", "JOIN_ORDER"]

T = TypeVar("T")
ffi, lib = _native.ffi, _native.lib

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT

# The order namespaces are joined in, as nsenter does: user first, because it grants the
# capabilities the other setns calls are checked against; mnt late, as it changes the root.
JOIN_ORDER = ("user", "cgroup", "ipc", "uts", "net", "mnt", "time")


class SpawnPermissionError(SpawnError, PermissionError):
    """A step of the child failed with EPERM or EACCES."""


class SpawnFileNotFoundError(SpawnError, FileNotFoundError):
    """A step of the child failed with ENOENT (a missing program or directory)."""


class ChildDiedError(NslabError):
    """The child running a callable exited without sending back a result."""


class RemoteTraceback(Exception):
    """Carries the child's formatted traceback; set as ``__cause__`` of a re-raised error."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


_STEP_SYSCALLS = {
    lib.NSLAB_STEP_PDEATHSIG: "prctl",
    lib.NSLAB_STEP_SIGMASK: "sigprocmask",
    lib.NSLAB_STEP_CLOSE_FDS: "close_range",
    lib.NSLAB_STEP_SETNS: "setns",
    lib.NSLAB_STEP_SYNC: "read",
    lib.NSLAB_STEP_HOSTNAME: "sethostname",
    lib.NSLAB_STEP_CHDIR: "chdir",
    lib.NSLAB_STEP_DUP2: "dup2",
    lib.NSLAB_STEP_CLOEXEC: "fcntl",
    lib.NSLAB_STEP_EXECVE: "execve",
    lib.NSLAB_STEP_SIGNALS: "sigaction",
    lib.NSLAB_STEP_CAPS: "prctl(PR_CAPBSET_DROP)/capset",
    lib.NSLAB_STEP_SETUP: "setup",
    lib.NSLAB_STEP_UNSHARE: "unshare",
}

# Namespaces a (single-threaded) child can unshare for itself, even sharing our memory.
_UNSHARED_BY_CHILD = ("net", "uts", "ipc")

# capabilities(7) by name, for caps_drop= (the kernel's numbering: linux/capability.h).
CAPABILITIES = {name: number for number, name in enumerate((
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"))}


def caps_mask(names: Iterable[str], field: str = "caps_drop") -> int:
    """``("NET_RAW", "CAP_SYS_ADMIN")`` -> a bit mask; unknown names are an InputError."""
    if isinstance(names, str):
        names = (names,)
    mask = 0
    for name in names:
        key = name.upper().removeprefix("CAP_") if isinstance(name, str) else None
        if key not in CAPABILITIES:
            raise InputError(field, "not a capability name (capabilities(7), e.g. NET_RAW)", name)
        mask |= 1 << CAPABILITIES[key]
    return mask


@dataclasses.dataclass(frozen=True)
class UserMap:
    """uid/gid maps for a child with a new user namespace: ``(inside, outside, count)`` lines.

    The default maps root inside to whoever we are outside, the one mapping an unprivileged
    process may write (user_namespaces(7)); ``setgroups`` is written before ``gid_map``.
    """

    uid: tuple[tuple[int, int, int], ...]
    gid: tuple[tuple[int, int, int], ...]
    setgroups: str = "deny"

    @classmethod
    def root(cls) -> "UserMap":
        return cls(((0, os.geteuid(), 1),), ((0, os.getegid(), 1),))

    def validate(self) -> "UserMap":
        for name, lines in (("uid", self.uid), ("gid", self.gid)):
            if not lines or any(len(line) != 3 or any(not isinstance(v, int) or v < 0 for v in line)
                                or line[2] == 0 for line in lines):
                raise InputError(f"user_map.{name}", "expected (inside, outside, count) lines "
                                 "of non-negative ints with count >= 1", lines)
        if self.setgroups not in ("deny", "allow"):
            raise InputError("user_map.setgroups", "expected 'deny' or 'allow'", self.setgroups)
        return self


class Child:
    """A process started by nslab, owned through its pidfd. Use :meth:`spawn` to make one.

    ``returncode`` is None while it runs, the exit status after it exited, or ``-signal`` if a
    signal killed it (as in :mod:`subprocess`). ``close()`` stops it (SIGTERM, then SIGKILL),
    reaps it and closes every fd and namespace handle it owns; it is idempotent.
    """

    def __init__(self, pid: int, pidfd: int, argv: Sequence[str]):
        """Take ownership of ``pidfd``, the pidfd of our unreaped child ``pid``."""
        self.pid = pid
        self._pidfd = pidfd
        self.argv = list(argv)
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        self._namespaces: dict[str, Namespace] = {}
        self._lock = threading.Lock()  # orders reaping, signalling and closing the pidfd
        self._parked = None            # the trampoline's handle while spawn() holds the child
        self._setup = None             # every setup program sent, for naming a failed step

    # --- starting ----------------------------------------------------------------------
    @classmethod
    def spawn(cls, argv: Sequence["str | bytes | os.PathLike"], *,
              new: Iterable["str | NamespaceKind"] = ("net",),
              join: "Iterable[Namespace] | Mapping[str, Namespace]" = (),
              env: "Mapping[str, str] | None" = None,
              cwd: "str | os.PathLike | None" = None,
              hostname: str | None = None,
              stdin: Any = None, stdout: Any = None, stderr: Any = None,
              pass_fds: Iterable[int] = (),
              die_with_parent: bool = True,
              before_exec: "Callable[[Child], None] | None" = None,
              user_map: "UserMap | None" = None,
              cgroup: "str | int | None" = None,
              caps_drop: Iterable[str] = (),
              setup: "ChildSetup | None" = None,
              meanwhile: "Callable[[], None] | None" = None,
              executable: "str | bytes | None" = None,
              _trampoline_flags: int = 0) -> "Child":
        """Start ``argv`` in the namespaces ``new`` creates and ``join`` enters.

        ``argv[0]`` is looked up in ``PATH`` (of ``env``, else ours) here, in the parent's
        mount namespace, unless it contains a ``/`` or ``executable`` (a path) is given. ``hostname`` needs a new or joined uts
        namespace (so it can never rename the host). ``pass_fds`` survive with their numbers;
        every other fd except 0-2 is closed in the child, inheritable or not. ``cgroup`` (a
        cgroup v2 directory or an fd of one) starts the child in that cgroup. ``caps_drop``
        (names like ``"NET_RAW"``) leaves those capabilities out of the child's bounding,
        effective, permitted and inheritable sets before it execs. ``setup`` (a
        :class:`~nslab.child_setup.ChildSetup`) is run by the child itself once it is in its
        namespaces, while ``before_exec`` runs here; ``before_exec`` may send it more with
        :meth:`configure`. ``meanwhile()`` runs here right after the clone, while the child
        makes its new net, uts and ipc namespaces itself (``unshare``, ~0.5-1 ms of kernel
        work that would otherwise hold up the clone); it must not touch the child, whose
        namespaces exist only once ``before_exec`` is called.

        Raises :class:`~nslab.errors.InputError` on bad arguments (nothing started),
        :class:`~nslab.errors.SpawnError` (or its ``Spawn*Error`` subclasses) naming the
        failed step, or whatever ``before_exec`` raised (the child is then killed and reaped).
        """
        argv_b = _check_argv(argv)
        drop_mask = caps_mask(caps_drop)
        kinds = _check_new(new)
        joins = _check_join(join, kinds)
        env_b = _env_list(env)
        path = _resolve_program(argv_b[0], env) if executable is None else _check_path(executable, "executable")
        if hostname is not None:
            if not isinstance(hostname, str) or not 0 < len(hostname.encode()) <= 64:
                raise InputError("hostname", "must be 1-64 bytes", hostname)
            if "uts" not in kinds and not any(ns.kind.name == "uts" for ns in joins):
                raise InputError("hostname", "needs new=('uts', ...) or a joined uts namespace, "
                                 "or it would rename the host", hostname)
        keep = _check_pass_fds(pass_fds)
        if "user" in kinds:
            user_map = (user_map or UserMap.root()).validate()
            if setup is not None:
                # It would run before we have written the uid/gid maps, judged against a user
                # namespace that maps nobody: configure() it from before_exec instead.
                raise InputError("setup", "cannot run in a new user namespace before its maps exist: "
                                 "send it with child.configure() from before_exec", setup)
        elif user_map is not None:
            raise InputError("user_map", "only applies with new=('user', ...)", user_map)
        cwd_b = _check_cwd(cwd)

        # C-side arguments. `keep_alive` holds every cdata until the child has exec'd: the
        # child reads them (in CLONE_VM mode straight from our memory).
        keep_alive: list = []

        def cstr(b: bytes):
            p = ffi.new("char[]", b)
            keep_alive.append(p)
            return p

        def cstr_array(items: list[bytes]):
            # One buffer for all strings, then pointers into it: two allocations, not n.
            buf = cstr(b"\0".join(items) + b"\0")
            ptrs, off = [], 0
            for x in items:
                ptrs.append(buf + off)
                off += len(x) + 1
            arr = ffi.new("char *[]", ptrs + [ffi.NULL])
            keep_alive.append(arr)
            return arr

        a = ffi.new("struct nslab_spawn_args *")
        a.path = cstr(path)
        a.argv = cstr_array(argv_b)
        a.envp = cstr_array(env_b)
        # With `meanwhile`, the kinds a process may unshare alone are the child's own job.
        deferred = [k for k in kinds if meanwhile is not None and k in _UNSHARED_BY_CHILD]
        a.clone_flags = sum(KINDS[k].flag for k in kinds if k not in deferred)
        a.unshare_flags = sum(KINDS[k].flag for k in deferred)
        a.pdeathsig = signal.SIGKILL if die_with_parent else 0
        a.flags = _trampoline_flags
        a.caps_drop = drop_mask
        if setup is not None:
            program = setup.encode()
            a.setup, a.setup_len = cstr(program), len(program)
        else:
            a.setup, a.setup_len = ffi.NULL, 0
        join_fds = ffi.new("int[]", [ns.fileno() for ns in joins] or [0])
        join_types = ffi.new("int[]", [ns.kind.flag for ns in joins] or [0])
        keep_arr = ffi.new("int[]", keep or [0])
        keep_alive += [join_fds, join_types, keep_arr]
        a.join_fds, a.join_types, a.n_join = join_fds, join_types, len(joins)
        a.keep_fds, a.n_keep = keep_arr, len(keep)
        a.cwd = cstr(cwd_b) if cwd_b is not None else ffi.NULL
        if hostname is not None:
            a.hostname, a.hostname_len = cstr(hostname.encode()), len(hostname.encode())
        else:
            a.hostname, a.hostname_len = ffi.NULL, 0

        opened: list[int] = []    # fds we opened for the child (its ends): closed after clone
        parent_ends: list = []    # our ends of PIPEs: (attribute, fd, mode)
        cgroup_fd = -1
        r = ffi.new("struct nslab_spawn_result *")
        r.pid, r.pidfd, r.sync_fd, r.err_fd = 0, -1, -1, -1
        try:
            if cgroup is not None:
                cgroup_fd = _open_cgroup(cgroup)
                if isinstance(cgroup, (str, bytes, os.PathLike)):
                    opened.append(cgroup_fd)
            a.cgroup_fd = cgroup_fd
            a.stdio = _stdio_fds(stdin, stdout, stderr, opened, parent_ends)
            # The spawner thread outlives every caller (PDEATHSIG), and costs ~10 us.
            clone = lib.nslab_spawn_via_spawner if die_with_parent else lib.nslab_spawn
            rc = clone(a, r)
        except BaseException:
            # A signal that arrived during the clone is raised as it returns, with the child
            # made: it must not stay parked (nor read our freed arguments) — abort it.
            if r.pid > 0 and r.pidfd >= 0:
                lib.nslab_spawn_abort(r, ffi.NULL)
                _reap_and_close(r.pidfd)
            for _, fd, _ in parent_ends:
                os.close(fd)
            raise
        finally:
            for fd in opened:
                os.close(fd)
        if rc < 0:
            for _, fd, _ in parent_ends:
                os.close(fd)
            raise _clone_error(-rc, argv_b, kinds, cgroup)

        # From here the child exists, blocked on the sync socket: whatever goes wrong (even a
        # KeyboardInterrupt) must abort it, so nothing is left waiting forever.
        child = cls(r.pid, r.pidfd, [os.fsdecode(x) for x in argv_b])
        child._parked = r
        child._setup = setup.copy() if setup is not None else None   # as encoded, for error reports
        try:
            while parent_ends:
                attr, fd, mode = parent_ends.pop(0)   # ours alone now: closed once, below or by f
                f = None
                try:
                    f = open(fd, mode)
                    setattr(child, attr, f)
                except BaseException:
                    if f is None:
                        os.close(fd)
                    raise
            if "user" in kinds:
                _write_user_maps(child.pid, user_map)
            if meanwhile is not None:
                meanwhile()
            if deferred or (joins and before_exec is not None):
                # (before_exec may look at the child's namespaces: they must be its own by then)
                rc = lib.nslab_spawn_wait_ready(r)
                if rc < 0 and rc != -errno.EPIPE:
                    raise from_errno(-rc, "read", f"sync socket of pid {child.pid}")
                if rc == -errno.EPIPE:   # it failed a step: the abort below reports which
                    raise SpawnError(errno.ECHILD, f"the child of {child.argv!r} died before it "
                                     "had its namespaces", step="sync", syscall="read",
                                     obj=f"pid {child.pid}")
            if before_exec is not None:
                before_exec(child)
            rep = ffi.new("struct nslab_spawn_report *")
            child._parked = None
            released = lib.nslab_spawn_release(r, rep)
        except BaseException as exc:
            child._parked = None
            rep = ffi.new("struct nslab_spawn_report *")
            failed_first = lib.nslab_spawn_abort(r, rep) == 1
            for _, fd, _ in parent_ends:
                os.close(fd)
            child._discard()
            if failed_first and isinstance(exc, Exception):
                # What the parent tripped over (the child already gone) is a consequence:
                # report the child's own failed step, with the parent's error as context.
                raise _step_error(rep, path, argv_b, joins, cwd_b, hostname, drop_mask,
                                  child._setup) from exc
            raise
        if released == 0:
            return child
        child._discard()
        if released == 1:
            raise _step_error(rep, path, argv_b, joins, cwd_b, hostname, drop_mask, child._setup)
        if released == 2:
            raise SpawnError(errno.ECHILD, f"the child of {child.argv!r} died before it was "
                             f"released ({child._describe()})", step="sync", syscall="send",
                             obj=f"pid {child.pid}")
        raise from_errno(-released, "read", f"error pipe of the child of {child.argv!r}")

    def configure(self, setup: "ChildSetup") -> None:
        """Send a child still parked in :meth:`spawn` (i.e. from ``before_exec``) one more
        setup program; it runs it while this thread goes on. A failed step surfaces when
        the child is released: ``spawn`` raises a SpawnError naming it."""
        r = self._parked
        if r is None:
            raise NslabError(errno.EINVAL, f"{self!r} is not waiting to be configured: "
                             "configure() works only from before_exec")
        program = setup.encode()
        rc = lib.nslab_spawn_configure(r, program, len(program))
        if rc == -errno.EPIPE:
            return              # the child is gone; the release reports why
        if rc < 0:
            raise from_errno(-rc, "send", f"setup program to pid {self.pid}")
        self._setup = setup.copy() if self._setup is None else self._setup + setup

    def _discard(self) -> None:
        """Kill, reap and close a child that never became the caller's (spawn failed)."""
        try:
            self.kill()
            self.wait()
        except NslabError:
            pass
        finally:
            self.close()

    # --- state ---------------------------------------------------------------------------
    @property
    def pidfd(self) -> int:
        if self._pidfd < 0:
            raise from_errno(errno.EBADF, "pidfd", f"closed {self!r}")
        return self._pidfd

    @property
    def closed(self) -> bool:
        return self._pidfd < 0

    def namespace(self, kind: "str | NamespaceKind" = "net") -> Namespace:
        """The child's namespace of ``kind`` (through its pidfd). Owned and closed by the Child:
        do not close it yourself; open your own with ``Namespace.of_pidfd`` to keep one."""
        k = kind_of(kind)
        ns = self._namespaces.get(k.name)
        if ns is None or ns.closed:
            ns = self._namespaces[k.name] = Namespace.of_pidfd(self.pidfd, k)
        return ns

    def _set_status(self, info: "os.waitid_result") -> None:
        if info.si_code == os.CLD_EXITED:
            self.returncode = info.si_status
        else:  # CLD_KILLED, CLD_DUMPED
            self.returncode = -info.si_status

    def _reap(self, block: bool) -> int | None:
        with self._lock:
            if self.returncode is not None or self._pidfd < 0:
                return self.returncode
            try:
                info = os.waitid(os.P_PIDFD, self._pidfd,
                                 os.WEXITED | (0 if block else os.WNOHANG))
            except ChildProcessError:
                raise from_errno(errno.ECHILD, "waitid", f"pid {self.pid}",
                                 hint="someone else reaped it (a SIGCHLD handler or "
                                      "os.waitpid(-1)?)") from None
            if info is not None:
                self._set_status(info)
            return self.returncode

    def poll(self) -> int | None:
        """Reap the child if it has exited; return ``returncode`` (None while running)."""
        return self._reap(block=False)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit and reap it. Raises NslabTimeoutError after ``timeout``."""
        if self.returncode is not None:
            return self.returncode
        # Wait on the pidfd (readable once the process exited), not in waitid: a blocking
        # waitid would hold the lock that send_signal and close need from other threads.
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))):
            raise NslabTimeoutError(errno.ETIMEDOUT, f"{self!r} still running after "
                                    f"{timeout} s", syscall="waitid", obj=f"pid {self.pid}")
        rc = self._reap(block=True)
        if rc is None:  # closed meanwhile by another thread
            raise from_errno(errno.EBADF, "waitid", f"closed {self!r}")
        return rc

    def send_signal(self, sig: int) -> bool:
        """Signal the child through its pidfd. Returns False, and does nothing, once the child
        has exited or been reaped: a pidfd can only ever reach this one process."""
        with self._lock:
            if self.returncode is not None or self._pidfd < 0:
                return False
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                return False  # exited; not reaped yet
            return True

    def kill(self) -> bool:
        """SIGKILL (does not wait)."""
        return self.send_signal(signal.SIGKILL)

    def terminate(self, timeout: float = 2.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; reap and return ``returncode``.

        The init of a new pid namespace ignores SIGTERM unless it handles it: expect the
        timeout, or use :meth:`kill`."""
        if self.returncode is None and self.send_signal(signal.SIGTERM):
            try:
                return self.wait(timeout)
            except NslabTimeoutError:
                pass
        self.kill()
        return self.wait()

    def communicate(self, input: bytes | None = None,
                    timeout: float | None = None) -> tuple[bytes | None, bytes | None]:
        """Feed ``input`` to a PIPE stdin, read PIPE stdout/stderr to EOF, wait for exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = _exchange(self.stdin, input or b"", [f for f in (self.stdout, self.stderr) if f],
                        deadline, f"{self!r}")
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return (out.get(self.stdout) if self.stdout else None,
                out.get(self.stderr) if self.stderr else None)

    # --- ownership -----------------------------------------------------------------------
    def close(self) -> None:
        """Stop (SIGTERM, then SIGKILL) and reap the child if needed; close what it owns."""
        if self._pidfd < 0:
            return
        try:
            if self.returncode is None and self.poll() is None:
                self.terminate()
        except NslabError:
            pass  # reaped by someone else: nothing left to stop
        finally:
            for f in (self.stdin, self.stdout, self.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
            for ns in self._namespaces.values():
                ns.close()
            self._namespaces.clear()
            with self._lock:
                fd, self._pidfd = self._pidfd, -1
                if fd >= 0:
                    os.close(fd)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_pidfd", -1) >= 0:
            warnings.warn(f"{self!r} was never closed; killing it", ResourceWarning, 2)
            try:
                self.kill()
                self.wait()
            except Exception:  # noqa: BLE001 - nothing to report to in a finalizer
                pass
            self.close()

    def _describe(self) -> str:
        rc = self.returncode
        if rc is None:
            return "running" if self._pidfd >= 0 else "closed"
        if rc >= 0:
            return f"exited {rc}"
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"

    def __repr__(self) -> str:
        return f"<Child {self.argv!r}: {self._describe()}, pid {self.pid}>"


# --- running a Python callable in a fresh child -------------------------------------------
def pickle_call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> bytes:
    """Pickle a call for a fresh interpreter, or raise InputError naming ``fn``.

    ``fn`` travels by reference (module + qualified name), so lambdas and nested functions
    cannot: the same rule as multiprocessing's ``spawn`` start method.
    """
    try:
        return pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise InputError("fn", "the callable and its arguments must be picklable: use a function "
                         f"defined at the top level of a module ({exc})",
                         getattr(fn, "__qualname__", fn)) from None


def call_in_child(fn: Callable[..., T], *args: Any,
                  new: Iterable["str | NamespaceKind"] = ("net",),
                  join: "Iterable[Namespace] | Mapping[str, Namespace]" = (),
                  hostname: str | None = None,
                  timeout: float | None = None,
                  before_exec: "Callable[[Child], None] | None" = None,
                  env: "Mapping[str, str] | None" = None,
                  cwd: "str | os.PathLike | None" = None,
                  user_map: "UserMap | None" = None,
                  setup: "ChildSetup | None" = None,
                  meanwhile: "Callable[[], None] | None" = None,
                  **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a new Python interpreter inside the given namespaces;
    return its result or re-raise its exception here (its traceback text as ``__cause__``).

    The child is a fresh ``sys.executable -P .../nslab/_callable_runner.py`` started through
    the same trampoline as :meth:`Child.spawn` -- never a fork of this process, so this is
    safe while this process has threads. ``fn``, its arguments and its result travel pickled over
    two pipes. A function defined in ``__main__`` works as with multiprocessing's ``spawn``
    start method: the child re-imports the main module as ``__mp_main__`` (guard its top-level
    code with ``if __name__ == "__main__":``). Keyword arguments named like this function's
    own parameters must be passed through ``functools.partial``.

    Costs a Python start-up (tens of ms; see benchmarks/RESULTS.md). Raises
    :class:`NslabTimeoutError` after ``timeout`` (the child is killed), :class:`ChildDiedError`
    if the child exits without a result, and the spawn errors of :meth:`Child.spawn`.
    """
    runner = sys.modules.get("nslab._callable_runner")
    if runner is not None and getattr(runner, "PREPARING", False):
        raise RuntimeError("call_in_child() was called while the child was importing the main "
                           "module: guard the caller with `if __name__ == '__main__':`")
    deadline = None if timeout is None else time.monotonic() + timeout
    payload = pickle_call(fn, args, kwargs)
    prep = _preparation_data(needs_main=b"__main__" in payload)
    message = pickle.dumps(prep, protocol=pickle.HIGHEST_PROTOCOL) + payload

    to_child_r, to_child_w = os.pipe2(os.O_CLOEXEC)
    from_child_r, from_child_w = os.pipe2(os.O_CLOEXEC)
    child = None
    try:
        argv = [sys.executable, *subprocess._args_from_interpreter_flags(),  # noqa: SLF001
                *_RUNNER_ISOLATION, _RUNNER, str(to_child_r), str(from_child_w)]
        child = Child.spawn(argv, new=new, join=join, hostname=hostname, env=env, cwd=cwd,
                            pass_fds=(to_child_r, from_child_w), before_exec=before_exec,
                            user_map=user_map, setup=setup, meanwhile=meanwhile)
        os.close(to_child_r)
        os.close(from_child_w)
        to_child_r = from_child_w = -1
        with open(to_child_w, "wb", buffering=0, closefd=False) as w, \
                open(from_child_r, "rb", buffering=0, closefd=False) as r:
            out = _exchange(w, message, [r], deadline, f"{child!r}")[r]
        try:
            child.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except NslabTimeoutError:
            raise NslabTimeoutError(errno.ETIMEDOUT, f"{fn!r} in {child!r} did not finish "
                                    f"in {timeout} s", syscall="waitid",
                                    obj=f"pid {child.pid}") from None
    finally:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            if fd >= 0:
                os.close(fd)
        if child is not None:
            if child.returncode is None:
                child.kill()
            child.close()
    if not out:
        raise ChildDiedError(errno.ECHILD, f"the child running {fn!r} ({child!r}) exited "
                             "without a result (its stderr says why)",
                             syscall="read", obj=f"pid {child.pid}")
    try:
        ok, value, tb = pickle.loads(out)
    except Exception as exc:  # noqa: BLE001 - e.g. a class the child had and we do not
        raise ChildDiedError(errno.EPROTO, f"the reply of the child running {fn!r} could not "
                             f"be unpickled here: {exc!r}", syscall="read",
                             obj=f"pid {child.pid}") from exc
    if ok:
        return value
    if tb:
        value.__cause__ = RemoteTraceback(tb)
        try:
            value.remote_traceback = tb
        except AttributeError:
            pass
    raise value


# The runner runs as a script, not `-m nslab._callable_runner`: -m would import the nslab
# package first (pyroute2 and all, ~0.25 s), which the callable may not need at all. -P (3.11+)
# keeps the script's directory out of sys.path, so nslab's modules cannot shadow others; older
# Pythons get -I. The runner then installs the caller's sys.path.
_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_callable_runner.py")
_RUNNER_ISOLATION = ("-P",) if sys.version_info >= (3, 11) else ("-I",)


def _preparation_data(needs_main: bool) -> dict:
    """What multiprocessing's spawn start method sends a child (spawn.get_preparation_data),
    minus the start method: asking multiprocessing for it would fix the caller's default
    context as a side effect. The main module travels only when the pickle refers to it."""
    import multiprocessing.process as mp_process
    sys_path = [mp_process.ORIGINAL_DIR if p == "" else p for p in sys.path]
    data: dict = {"sys_path": sys_path, "sys_argv": list(sys.argv),
                  "orig_dir": mp_process.ORIGINAL_DIR}
    if needs_main:
        main = sys.modules["__main__"]
        name = getattr(getattr(main, "__spec__", None), "name", None)
        if name is not None:
            data["init_main_from_name"] = name
        elif getattr(main, "__file__", None):
            path = main.__file__
            if not os.path.isabs(path) and mp_process.ORIGINAL_DIR is not None:
                path = os.path.join(mp_process.ORIGINAL_DIR, path)
            data["init_main_from_path"] = os.path.normpath(path)
    return data


# --- helpers ------------------------------------------------------------------------------
def _exchange(writer, data: bytes, readers: list, deadline: float | None,
              what: str) -> dict:
    """Write ``data`` to ``writer`` and read every reader to EOF, without deadlocking on full
    pipes (as subprocess.communicate does), until ``deadline``."""
    out: dict = {r: [] for r in readers}
    with selectors.DefaultSelector() as sel:
        view = memoryview(data)
        if writer is not None:
            writer.flush()
            if view:
                sel.register(writer, selectors.EVENT_WRITE)
            else:
                writer.close()
        for r in readers:
            sel.register(r, selectors.EVENT_READ)
        while sel.get_map():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise NslabTimeoutError(errno.ETIMEDOUT, f"{what} did not finish in time",
                                        syscall="poll", obj=what)
            for key, _ in sel.select(remaining):
                f = key.fileobj
                if f is writer:
                    try:
                        n = os.write(writer.fileno(), view[:select.PIPE_BUF])
                    except BrokenPipeError:
                        n, view = 0, view[:0]
                    view = view[n:]
                    if not view:
                        sel.unregister(writer)
                        writer.close()
                else:
                    chunk = os.read(f.fileno(), 65536)
                    if chunk:
                        out[f].append(chunk)
                    else:
                        sel.unregister(f)
    return {r: b"".join(chunks) for r, chunks in out.items()}


def _check_argv(argv) -> list[bytes]:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
        raise InputError("argv", "expected a non-empty list of strings (no shell is used)", argv)
    out = []
    for item in argv:
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise InputError("argv", "items must be str, bytes or path-like", item)
        b = os.fsencode(item)
        if b"\0" in b:
            raise InputError("argv", "contains a NUL byte", item)
        out.append(b)
    if not out[0]:
        raise InputError("argv", "the program name is empty", argv)
    return out


def _check_new(new) -> list[str]:
    if isinstance(new, (str, bytes)):
        raise InputError("new", "expected an iterable of kind names, like ('net',)", new)
    kinds = []
    for item in new:
        k = kind_of(item).name
        if k not in kinds:
            kinds.append(k)
    return kinds


def _check_join(join, kinds: list[str]) -> list[Namespace]:
    items = list(join.values()) if isinstance(join, Mapping) else list(join)
    seen: dict[str, Namespace] = {}
    for ns in items:
        if not isinstance(ns, Namespace):
            raise InputError("join", "expected Namespace handles", ns)
        if ns.closed:
            raise InputError("join", "the namespace handle is closed", ns)
        k = ns.kind.name
        if k == "pid":
            raise InputError("join", "joining a pid namespace moves only the child's own "
                             "children, not the program: start a process inside it instead", ns)
        if k in seen:
            raise InputError("join", f"two {k} namespaces to join", ns)
        if k in kinds:
            raise InputError("join", f"{k} is both created (new) and joined", ns)
        seen[k] = ns
    if isinstance(join, Mapping):
        for key, ns in join.items():
            if kind_of(key) != ns.kind:
                raise InputError("join", f"key {key!r} holds a {ns.kind.name} namespace", ns)
    return [seen[k] for k in JOIN_ORDER if k in seen]


def _check_path(value, field: str) -> bytes:
    """A non-empty path without NUL (C would silently cut it there), as bytes."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise InputError(field, "expected a path", value)
    raw = os.fsencode(value)
    if not raw or b"\0" in raw:
        raise InputError(field, "a path is non-empty and has no NUL byte", value)
    return raw


def _check_cwd(cwd) -> bytes | None:
    """``cwd`` as bytes, or None for the parent's."""
    return None if cwd is None else _check_path(cwd, "cwd")


def _check_pass_fds(pass_fds) -> list[int]:
    if isinstance(pass_fds, (str, bytes)) or not hasattr(pass_fds, "__iter__"):
        raise InputError("pass_fds", "expected an iterable of fds", pass_fds)
    fds = list(pass_fds)
    for fd in fds:
        if not isinstance(fd, int) or isinstance(fd, bool) or not 3 <= fd < 2**31:
            raise InputError("pass_fds", "expected fds >= 3 (0-2 are stdin/stdout/stderr)", fd)
    fds = sorted(set(fds))
    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            raise InputError("pass_fds", "not an open file descriptor", fd) from None
    if len(fds) > lib.NSLAB_SPAWN_MAX_FDS - 16:
        raise InputError("pass_fds", f"at most {lib.NSLAB_SPAWN_MAX_FDS - 16} fds", len(fds))
    return fds


def _reap_and_close(pidfd: int) -> None:
    """Reap a child we killed (aborted in spawn) and close its pidfd."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except ChildProcessError:
        pass
    finally:
        os.close(pidfd)


def _env_list(env) -> list[bytes]:
    if env is None:  # the kernel gave us these: no NUL, no empty names to check for
        return [k + b"=" + v for k, v in os.environb.items()]
    out = []
    for k, v in env.items():
        kb, vb = os.fsencode(k), os.fsencode(v)
        if not kb or b"=" in kb or b"\0" in kb or b"\0" in vb:
            raise InputError("env", "names must be non-empty without '=' or NUL; values "
                             "without NUL", k)
        out.append(kb + b"=" + vb)
    return out


def _resolve_program(name: bytes, env) -> bytes:
    """execvp's PATH search, done here so the C side only ever calls execve."""
    if b"/" in name:
        return name
    path = (env.get("PATH") if env is not None else os.environ.get("PATH")) or os.defpath
    for d in os.fsencode(path).split(b":"):
        candidate = os.path.join(d or b".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    shown = os.fsdecode(name)
    raise SpawnFileNotFoundError(errno.ENOENT, f"execve({shown}) failed: {shown!r} is not an "
                                 f"executable in PATH ({path})", step=f"execve({shown})",
                                 syscall="execve", obj=shown)


def _open_cgroup(cgroup) -> int:
    if isinstance(cgroup, int) and not isinstance(cgroup, bool):
        return cgroup
    try:
        return os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_errno(exc.errno, "open", f"cgroup {os.fsdecode(cgroup)}") from None


def check_spawn_args(argv, *, env=None, cwd=None, pass_fds=(), stdin=None, stdout=None,
                     stderr=None) -> bytes:
    """The checks :meth:`Child.spawn` makes of its arguments, with nothing opened or started:
    for a caller (the Lab) that wires things before it spawns, so bad input fails first.
    Returns the program's path (``executable=`` for spawn, which then skips the PATH walk)."""
    argv_b = _check_argv(argv)
    if env is not None:
        _env_list(env)
    path = _resolve_program(argv_b[0], env)
    _check_cwd(cwd)
    _check_pass_fds(pass_fds)
    for slot, spec, attr in ((0, stdin, "stdin"), (1, stdout, "stdout"), (2, stderr, "stderr")):
        if not _stdio_spec_ok(slot, spec):
            raise InputError(attr, "expected None, an fd, a file object, PIPE, DEVNULL"
                             + (" or STDOUT" if slot == 2 else ""), spec)
    return path


def _stdio_spec_ok(slot: int, spec) -> bool:
    if spec is None or hasattr(spec, "fileno"):
        return True
    if not isinstance(spec, int) or isinstance(spec, bool):
        return False
    return spec in (PIPE, DEVNULL) or spec >= 0 or (slot == 2 and spec == STDOUT)


def _stdio_fds(stdin, stdout, stderr, opened: list[int], parent_ends: list) -> list[int]:
    """Turn the three stdio specs into fds for the child; pipes' other ends go to parent_ends."""
    fds = [-1, -1, -1]
    for slot, spec, attr in ((0, stdin, "stdin"), (1, stdout, "stdout"), (2, stderr, "stderr")):
        if spec is None:
            continue
        if spec == STDOUT and isinstance(spec, int) and slot == 2:
            fds[2] = fds[1] if fds[1] >= 0 else 1
        elif spec is PIPE or (isinstance(spec, int) and spec == PIPE):
            r, w = os.pipe2(os.O_CLOEXEC)
            child_end, parent_end = (r, w) if slot == 0 else (w, r)
            opened.append(child_end)
            parent_ends.append((attr, parent_end, "wb" if slot == 0 else "rb"))
            fds[slot] = child_end
        elif isinstance(spec, int) and spec == DEVNULL:
            fd = os.open(os.devnull, (os.O_RDONLY if slot == 0 else os.O_WRONLY) | os.O_CLOEXEC)
            opened.append(fd)
            fds[slot] = fd
        elif isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0:
            fds[slot] = spec
        elif hasattr(spec, "fileno"):
            if hasattr(spec, "flush"):
                spec.flush()
            fds[slot] = spec.fileno()
        else:
            raise InputError(attr, "expected None, an fd, a file object, PIPE, DEVNULL"
                             + (" or STDOUT" if slot == 2 else ""), spec)
    return fds


def _write_user_maps(pid: int, user_map: UserMap) -> None:
    """uid_map, then setgroups, then gid_map: each in one write(), as the kernel requires."""
    for name, text in (("uid_map", _map_text(user_map.uid)),
                       ("setgroups", user_map.setgroups),
                       ("gid_map", _map_text(user_map.gid))):
        path = f"/proc/{pid}/{name}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise from_errno(exc.errno, "write", f"{path} ({text.strip()!r})") from None


def _map_text(lines) -> str:
    return "".join(f"{i} {o} {n}\n" for i, o, n in lines)


def _clone_error(err: int, argv: list[bytes], kinds: list[str], cgroup) -> NslabError:
    what = f"new namespaces {', '.join(kinds)}" if kinds else "no new namespaces"
    if cgroup is not None:
        what += f", into cgroup {cgroup if isinstance(cgroup, int) else os.fsdecode(cgroup)}"
    hint = None
    if err == errno.ENOSPC:
        hint = "a namespace count limit was hit (see /proc/sys/user/max_*_namespaces)"
    elif cgroup is not None and err in (errno.EBADF, errno.EOPNOTSUPP, errno.EBUSY):
        hint = ("CLONE_INTO_CGROUP needs a cgroup v2 directory that may hold processes "
                "(a leaf, or a domain without controllers in subtree_control)")
    return from_errno(err, "clone", f"{os.fsdecode(argv[0])} with {what}", hint)


def _step_error(rep, path: bytes, argv: list[bytes], joins: list[Namespace],
                cwd: bytes | None, hostname: str | None, caps_dropped: int = 0,
                setup: "ChildSetup | None" = None) -> SpawnError:
    step_id, err, index = rep.step, rep.err, rep.index
    syscall = _STEP_SYSCALLS.get(step_id, f"step {step_id}")
    if step_id == lib.NSLAB_STEP_SETUP:
        step = obj = setup.describe(index) if setup is not None else f"setup step {index >> 8}"
    elif step_id == lib.NSLAB_STEP_UNSHARE:
        step, obj = "unshare(the child's new namespaces)", None
    elif step_id == lib.NSLAB_STEP_SETNS and 0 <= index < len(joins):
        ns = joins[index]
        step, obj = f"setns({ns.kind.name} fd {ns.fileno()})", ns.description
    elif step_id == lib.NSLAB_STEP_EXECVE:
        step, obj = f"execve({os.fsdecode(path)})", os.fsdecode(path)
    elif step_id == lib.NSLAB_STEP_CHDIR:
        step, obj = f"chdir({os.fsdecode(cwd or b'')})", os.fsdecode(cwd or b"")
    elif step_id == lib.NSLAB_STEP_HOSTNAME:
        step, obj = f"sethostname({hostname})", hostname
    elif step_id == lib.NSLAB_STEP_DUP2:
        step, obj = f"dup2(-> fd {index})", f"fd {index}"
    elif step_id == lib.NSLAB_STEP_CLOEXEC:
        step, obj = f"fcntl(fd {index}, F_SETFD)", f"fd {index}"
    elif step_id == lib.NSLAB_STEP_SIGNALS:
        step, obj = f"sigaction(signal {index})", f"signal {index}"
    else:
        step, obj = f"{syscall}()", None
    hint = privilege_hint() if err in (errno.EPERM, errno.EACCES) else None
    if step_id == lib.NSLAB_STEP_EXECVE and err == errno.EPERM and caps_dropped:
        # execve refuses a program whose file capabilities (ping's cap_net_raw=ep, on Debian)
        # are not all in the bounding set the child was left with.
        dropped = [n for n, bit in CAPABILITIES.items() if caps_dropped >> bit & 1]
        hint = (f"the program likely has file capabilities ({', '.join(dropped)} among them?) that "
                f"this child no longer has (caps_drop/cap_drop): spawn it with cap_drop=()")
    if step_id == lib.NSLAB_STEP_SETNS and err == errno.EINVAL:
        hint = ("setns refuses the namespace the child is already in, and a kind it cannot "
                "enter from here")
    cls = {errno.EPERM: SpawnPermissionError, errno.EACCES: SpawnPermissionError,
           errno.ENOENT: SpawnFileNotFoundError}.get(err, SpawnError)
    message = (f"{step} failed in the child of {[os.fsdecode(x) for x in argv]!r}: "
               f"{os.strerror(err)}")
    return cls(err, message, step=step, syscall=syscall, obj=obj, hint=hint)

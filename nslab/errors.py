"""nslab's exceptions: one base, rooted in ``OSError``, with subclasses that also inherit
the matching builtin, so ``except PermissionError`` catches nslab's too.

Every message names the failing syscall (or netlink request) and the object it acted on,
and, where the cause is likely the environment, says what to do::

    >>> raise from_errno(errno.EPERM, "setns", "netns /proc/4242/ns/net")
    NslabPermissionError: [Errno 1] setns(netns /proc/4242/ns/net) failed: Operation not
    permitted (hint: nslab needs root, or a user namespace: run with sudo)

Input errors (``InputError``) are raised before anything in the kernel changes; they name
the field and the reason.
"""
from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "NslabError", "InputError", "NslabPermissionError", "NslabFileNotFoundError",
    "NslabFileExistsError", "NslabProcessLookupError", "NslabTimeoutError",
    "NslabChildProcessError", "NslabBusyError", "NslabConnectionRefusedError", "ResourceExhaustedError", "SpawnError",
    "PortAllocatedError", "from_errno", "from_netlink", "privilege_hint",
]


class NslabError(OSError):
    """Base of every nslab error. ``syscall`` and ``obj`` say what failed on what."""

    def __init__(self, err: int, message: str, *, syscall: str | None = None,
                 obj: str | None = None, hint: str | None = None):
        super().__init__(err, message)
        self.syscall = syscall
        self.obj = obj
        self.hint = hint

    def __str__(self) -> str:
        text = f"[Errno {self.errno}] {self.strerror}" if self.errno else str(self.strerror)
        return f"{text} (hint: {self.hint})" if self.hint else text

    def __reduce__(self):
        # OSError pickles through args only; keep the keyword-only context too.
        return (_rebuild, (type(self), self.errno, self.strerror, self.__dict__.copy()))


def _rebuild(cls, err, message, state):
    exc = cls.__new__(cls, err, message)
    OSError.__init__(exc, err, message)
    exc.__dict__.update(state)
    return exc


class NslabPermissionError(NslabError, PermissionError):
    """EPERM / EACCES: usually missing root or a restricted user namespace."""


class NslabFileNotFoundError(NslabError, FileNotFoundError):
    """ENOENT: the namespace, process, link or file is not there."""


class NslabFileExistsError(NslabError, FileExistsError):
    """EEXIST: a name nslab wanted is taken."""


class NslabProcessLookupError(NslabError, ProcessLookupError):
    """ESRCH: the process is gone."""


class NslabTimeoutError(NslabError, TimeoutError):
    """A wait ran out of time."""


class NslabChildProcessError(NslabError, ChildProcessError):
    """ECHILD: the child was already reaped."""


class NslabConnectionRefusedError(NslabError, ConnectionRefusedError):
    """ECONNREFUSED: nothing listens there (an RST came back)."""


class NslabBusyError(NslabError):
    """EBUSY: the object is in use (a mount point with another mount on it, say)."""


class ResourceExhaustedError(NslabError):
    """A pool ran out: addresses in a subnet, ports on a bridge (EXFULL), subnets in the pools."""


class PortAllocatedError(NslabError):
    """A host port is already published (Docker's allocator: ``port is already allocated``) or
    bound by another process (Docker: ``failed to bind host port ...: address already in use``)."""

    def __init__(self, message: str, *, holder: str | None = None, **kwargs):
        super().__init__(_errno.EADDRINUSE, message, **kwargs)
        self.holder = holder


class SpawnError(NslabError):
    """A child could not be started; ``step`` says which step of the trampoline failed."""

    def __init__(self, err: int, message: str, *, step: str | None = None, **kwargs):
        super().__init__(err, message, **kwargs)
        self.step = step


class InputError(NslabError, ValueError):
    """Bad input, caught before anything in the kernel changed. ``field`` names it."""

    def __init__(self, field: str, reason: str, value: object = None):
        shown = f" (got {value!r})" if value is not None else ""
        super().__init__(_errno.EINVAL, f"invalid {field}: {reason}{shown}")
        self.field = field
        self.reason = reason
        self.value = value


_BY_ERRNO = {
    _errno.EPERM: NslabPermissionError,
    _errno.EACCES: NslabPermissionError,
    _errno.ENOENT: NslabFileNotFoundError,
    _errno.EEXIST: NslabFileExistsError,
    _errno.ESRCH: NslabProcessLookupError,
    _errno.ETIMEDOUT: NslabTimeoutError,
    _errno.ECHILD: NslabChildProcessError,
    _errno.EBUSY: NslabBusyError,
    _errno.ECONNREFUSED: NslabConnectionRefusedError,
    _errno.EXFULL: ResourceExhaustedError,
}


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def privilege_hint() -> str:
    """What to do when the kernel said EPERM: depends on who we are and what the host allows."""
    if os.geteuid() == 0:
        return ("running as root, so a security module or a missing capability refused it "
                "(inside a container? it needs CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return ("nslab needs root: run with sudo. Running rootless (unshare -Urn) is blocked "
                "here: AppArmor restricts unprivileged user namespaces (Ubuntu 24.04 default; "
                "`sysctl kernel.apparmor_restrict_unprivileged_userns` shows 1, and "
                "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` lifts it)")
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return ("nslab needs root: run with sudo, or enable unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1) and run rootless: "
                "unshare -Urn python3 your_script.py")
    return ("nslab needs root: run with sudo, or rootless inside a user and network namespace "
            "of your own: unshare -Urn python3 your_script.py")


def from_errno(err: int, syscall: str, obj: str | None = None, hint: str | None = None) -> NslabError:
    """Build the nslab exception for a failed ``syscall`` on ``obj`` (``err`` may be negative)."""
    err = abs(err)
    if hint is None and err in (_errno.EPERM, _errno.EACCES):
        hint = privilege_hint()
    cls = _BY_ERRNO.get(err, NslabError)
    target = f"({obj})" if obj else ""
    message = f"{syscall}{target} failed: {os.strerror(err)}"
    return cls(err, message, syscall=syscall, obj=obj, hint=hint)


def from_netlink(exc: BaseException, request: str, obj: str | None = None,
                 hint: str | None = None) -> NslabError:
    """Translate pyroute2's ``NetlinkError`` (not an OSError) at nslab's boundary."""
    code = getattr(exc, "code", None) or _errno.EIO
    return from_errno(code, f"netlink {request}", obj, hint)

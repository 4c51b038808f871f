"""The one module that imports nslab's compiled extension and turns -errno into exceptions.

Every wrapper takes the object it acts on as a readable description, so an error can say
``setns(netns /run/netns/x) failed: ...`` rather than just an errno.
"""
from __future__ import annotations

from ._core import ffi, lib  # noqa: F401  (ffi is used by spawn and tests)
from .errors import from_errno

CLONE_NEWNS = lib.NSLAB_CLONE_NEWNS
CLONE_NEWUTS = lib.NSLAB_CLONE_NEWUTS
CLONE_NEWIPC = lib.NSLAB_CLONE_NEWIPC
CLONE_NEWUSER = lib.NSLAB_CLONE_NEWUSER
CLONE_NEWPID = lib.NSLAB_CLONE_NEWPID
CLONE_NEWNET = lib.NSLAB_CLONE_NEWNET
CLONE_NEWCGROUP = lib.NSLAB_CLONE_NEWCGROUP
CLONE_NEWTIME = lib.NSLAB_CLONE_NEWTIME

MS_BIND = lib.NSLAB_MS_BIND
MS_REC = lib.NSLAB_MS_REC
MS_SHARED = lib.NSLAB_MS_SHARED
MNT_DETACH = lib.NSLAB_MNT_DETACH


def _check(rc: int, syscall: str, obj: str | None) -> int:
    if rc < 0:
        raise from_errno(-rc, syscall, obj)
    return rc


def unshare(flags: int, obj: str | None = None) -> None:
    """unshare(2) for the calling thread (net, uts, ipc) or process (the rest)."""
    _check(lib.nslab_unshare(flags), "unshare", obj or f"flags={flags:#x}")


def setns(fd: int, nstype: int = 0, obj: str | None = None) -> None:
    """setns(2) by nsfs fd (nstype 0 = any kind) or by pidfd (nstype = mask of CLONE_NEW*)."""
    _check(lib.nslab_setns(fd, nstype), "setns", obj or f"fd {fd}")


def pidfd_open(pid: int, obj: str | None = None) -> int:
    return _check(lib.nslab_pidfd_open(pid, 0), "pidfd_open", obj or f"pid {pid}")


def ns_ioctl(fd: int, request: int, name: str, obj: str | None = None) -> int:
    """An nsfs or pidfs ioctl that returns an fd or a value; ``name`` goes into the message."""
    return _check(lib.nslab_ns_ioctl(fd, request), f"ioctl {name}", obj or f"fd {fd}")


def ns_get_owner_uid(fd: int, obj: str | None = None) -> int:
    uid = ffi.new("unsigned int *")
    _check(lib.nslab_ns_get_owner_uid(fd, uid), "ioctl NS_GET_OWNER_UID", obj or f"fd {fd}")
    return int(uid[0])


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    enc = lambda s: ffi.NULL if s is None else s.encode()  # noqa: E731
    rc = lib.nslab_mount(enc(source), enc(target), enc(fstype), flags, enc(data))
    _check(rc, "mount", f"{source or fstype or 'none'} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(lib.nslab_umount2(target.encode(), flags), "umount2", target)


def gettid() -> int:
    return lib.nslab_gettid()

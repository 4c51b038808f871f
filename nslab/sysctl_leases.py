"""Shared sysctl changes on a host that outlives nslab: restored when the *last* user is done.

Two labs on the current host both turn ``net.ipv4.ip_forward`` on. If each restored what it
found, the first to close would switch forwarding off under the second (and the second,
having found it on, would never switch it back off). So a change is a *lease* kept in the
host's shared state directory: the first holder writes down the value it found, later ones
add themselves, and whoever leaves last puts the old value back. Holders are ids of records
(records.py), so ``nslab gc`` can release the lease of a holder that died::

    key = netns_key(ns)
    old = acquire(ns, state_dir, key, "net.ipv4.ip_forward", "1", holder=record_id)  # "0": changed
    ...
    release(ns, state_dir, key, "net.ipv4.ip_forward", holder=record_id)   # last one: back to "0"

A lease is one file per (network namespace, sysctl), read and written only under an
``flock`` of the state directory, so holders in several processes agree. It is written
*ahead*: the lease names its new holder before the sysctl is written, so a holder killed in
between leaves a lease gc can release (writing back the old value, which is harmless),
never a changed sysctl that nobody holds. It is removed after its last holder has written the
old value back. The namespace is part of the file name (its cookie, never reused while the
machine is up), so two namespaces sharing a state directory never share a lease.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import Iterator

from .errors import NslabError, from_errno

__all__ = ["netns_key", "acquire", "release", "holders"]


def netns_key(ns) -> str:
    """What names ``ns`` in lease file names: its netns cookie (Linux 5.14+), else its nsfs
    device and inode."""
    from .records import netns_cookie
    cookie = netns_cookie(ns)
    if cookie is not None:
        return f"c{cookie:x}"
    dev, ino = ns.identity
    return f"i{dev:x}-{ino:x}"


class _Lease:
    """The lease of one sysctl in one netns, read under the state directory's lock."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise NslabError(getattr(exc, "errno", None) or errno.EIO,
                             f"unreadable sysctl lease {path}: {exc}") from None
        if data and not (isinstance(data, dict) and isinstance(data.get("old"), str)
                         and isinstance(data.get("value"), str) and isinstance(data.get("holders"), list)
                         and all(isinstance(h, str) for h in data["holders"])):
            raise NslabError(errno.EBADMSG, f"sysctl lease {path} is not a lease "
                             "({old, value, holders}): remove it by hand once no lab runs")
        self.data: dict = data

    def save(self) -> None:
        """Write the lease now (atomically), or remove its file if it is empty."""
        if not self.data:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise from_errno(exc.errno or errno.EIO, "write", f"sysctl lease {self.path}",
                             hint="the host's state directory must be writable") from None


@contextlib.contextmanager
def _lease(state_dir: str, key: str, name: str) -> Iterator[_Lease]:
    """The lease of ``name`` in the netns ``key``, locked for the block. The lock is an flock
    of the state directory itself, which outlives every lease."""
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        lock = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_errno(exc.errno or errno.EIO, "open", f"sysctl lease directory {state_dir}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prefix = f"{key}-" if key else ""
        yield _Lease(os.path.join(state_dir, f"sysctl-lease-{prefix}{name}.json"))
    finally:
        os.close(lock)


def acquire(ns, state_dir: str, key: str, name: str, value: str, holder: str) -> str | None:
    """Make ``name`` read ``value`` in ``ns`` (whose :func:`netns_key` is ``key``) on behalf of
    ``holder``. Returns the value to restore when the last holder leaves, or None if it
    already read ``value`` and nobody holds it (then nothing changed and nothing is held)."""
    from .hosts import read_sysctl, write_sysctl
    with _lease(state_dir, key, name) as lease:
        data = lease.data
        if not data:
            old = read_sysctl(ns, name)
            if old == value:
                return None
            data.update(old=old, value=value, holders=[])
        elif data["value"] != value:
            raise from_errno(errno.EBUSY, "sysctl lease", f"{name}: held at {data['value']!r} by "
                             f"{', '.join(data['holders'])}, not {value!r}",
                             hint="another lab on this host needs the other value: close it first")
        joined = holder not in data["holders"]
        if joined:
            data["holders"].append(holder)
            lease.save()                       # ahead of the write (see the module doc)
        try:
            if read_sysctl(ns, name) != value:
                write_sysctl(ns, name, value)
        except BaseException:
            if joined:                         # we hold nothing after all
                data["holders"].remove(holder)
                if not data["holders"]:
                    data.clear()
                lease.save()
            raise
        return data["old"]


def release(ns, state_dir: str, key: str, name: str, holder: str, *, write: bool = True) -> str | None:
    """``holder`` is done with ``name``. Returns the value written back if it was the last
    holder (else None: the others still need the change). Idempotent. ``write=False`` (gc,
    for a namespace that is gone): drop the holder, write nothing."""
    from .hosts import write_sysctl
    with _lease(state_dir, key, name) as lease:
        data = lease.data
        if not data or holder not in data["holders"]:
            return None
        if data["holders"] != [holder]:
            data["holders"].remove(holder)
            lease.save()
            return None
        old = data["old"]
        if write:
            write_sysctl(ns, name, old)        # still named in the lease if this fails or we die
        data.clear()
        lease.save()
        return old if write else None


def holders(state_dir: str, key: str, name: str) -> list[str]:
    """Who holds ``name`` in the netns ``key`` now (for reports and tests)."""
    with _lease(state_dir, key, name) as lease:
        return list(lease.data.get("holders", []))

"""Shared sysctl changes on a host that outlives nslab: restored when the *last* user is done.

Two labs on the current host both turn ``net.ipv4.ip_forward`` on. If each restored what it
found, the first to close would switch forwarding off under the second (and the second,
having found it on, would never switch it back off). So a change is a *lease* kept in the
host's shared state directory: the first holder writes down the value it found, later ones
add themselves, and whoever leaves last puts the old value back. Holders are lab ids, so
``nslab gc`` can release the lease of a lab that died (records.py)::

    old = acquire(ns, state_dir, "net.ipv4.ip_forward", "1", holder=lab_id)   # "0": we changed it
    ...
    release(ns, state_dir, "net.ipv4.ip_forward", holder=lab_id)              # last one: back to "0"

A lease file is only read and written under an ``flock`` of the state directory, so labs in
several processes agree; it is removed when its last holder leaves.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import Iterator

from .errors import NslabError, from_errno

__all__ = ["acquire", "release", "holders"]

@contextlib.contextmanager
def _lease(state_dir: str, name: str) -> Iterator[dict]:
    """The lease of ``name`` (``{}`` if none), locked; what the block leaves in it is saved
    (an empty dict removes the file, so a host nobody holds anything on has no lease file).
    The lock is an flock of the state directory itself, which outlives every lease."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, f"sysctl-lease-{name}.json")
    lock = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise NslabError(getattr(exc, "errno", None) or errno.EIO,
                             f"unreadable sysctl lease {path}: {exc}") from None
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            if data:
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    finally:
        os.close(lock)


def acquire(ns, state_dir: str, name: str, value: str, holder: str) -> str | None:
    """Make ``name`` read ``value`` in ``ns`` on behalf of ``holder``. Returns the value to
    restore when the last holder leaves, or None if it already read ``value`` and nobody holds
    it (then nothing changed and nothing is held)."""
    from .hosts import read_sysctl, write_sysctl
    with _lease(state_dir, name) as lease:
        if not lease:
            old = read_sysctl(ns, name)
            if old == value:
                return None
            lease.update(old=old, value=value, holders=[holder])
        elif lease["value"] != value:
            raise from_errno(errno.EBUSY, "sysctl lease", f"{name}: held at {lease['value']!r} by "
                             f"{', '.join(lease['holders'])}, not {value!r}",
                             hint="another lab on this host needs the other value: close it first")
        elif holder not in lease["holders"]:
            lease["holders"].append(holder)
        if read_sysctl(ns, name) != value:
            write_sysctl(ns, name, value)
        return lease["old"]


def release(ns, state_dir: str, name: str, holder: str) -> str | None:
    """``holder`` is done with ``name``. Returns the value written back if it was the last
    holder (else None: the others still need the change). Idempotent."""
    from .hosts import write_sysctl
    with _lease(state_dir, name) as lease:
        if not lease or holder not in lease["holders"]:
            return None
        lease["holders"].remove(holder)
        if lease["holders"]:
            return None
        old = lease["old"]
        write_sysctl(ns, name, old)
        lease.clear()
        return old


def holders(state_dir: str, name: str) -> list[str]:
    """Who holds ``name`` now (for reports and tests)."""
    with _lease(state_dir, name) as lease:
        return list(lease.get("holders", []))

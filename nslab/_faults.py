"""Fault injection: named checkpoints where a test can have the controller SIGKILLed.

nslab calls ``checkpoint("network.bridge")`` right after each step that changes the kernel
(a link added, a rule committed, a directory made). Normally that is a no-op costing one
global lookup. The crash tests start a controller with::

    NSLAB_CRASH_AT=network.bridge        # die at the first time this checkpoint is reached
    NSLAB_CRASH_AT=endpoint.veth:3       # ... at the third time

and the process SIGKILLs itself right there — the worst moment for a lab to die, with the
kernel object made and nothing after it done. Then ``nslab gc`` must leave 0 residue.

To find out which checkpoints a scenario passes, set ``NSLAB_CHECKPOINT_LOG=/path``: each
checkpoint reached appends its name as one line (``O_APPEND``: safe from many threads).

Both variables are *consumed* at import: removed from ``os.environ``, so the children and
proxies a lab starts (which may import nslab too) never crash or log in its place.
"""
from __future__ import annotations

import os
import signal
import threading

__all__ = ["checkpoint", "configure", "ENV_CRASH", "ENV_LOG"]

ENV_CRASH = "NSLAB_CRASH_AT"
ENV_LOG = "NSLAB_CHECKPOINT_LOG"

_target: tuple[str, int] | None = None      # (name, nth hit) to die at
_log_fd = -1
_hits: dict[str, int] = {}
_lock = threading.Lock()


def _parse(spec: str) -> tuple[str, int]:
    name, _, nth = spec.partition(":")
    if not name:
        raise ValueError(f"{ENV_CRASH}: expected NAME or NAME:N, got {spec!r}")
    count = int(nth) if nth else 1
    if count < 1:
        raise ValueError(f"{ENV_CRASH}: N counts from 1, got {spec!r}")
    return name, count


def configure(crash_at: str | None = None, log_path: str | None = None) -> None:
    """Arm (or disarm, with None) this process's checkpoints; resets the hit counts."""
    global _target, _log_fd
    with _lock:
        _target = _parse(crash_at) if crash_at else None
        if _log_fd >= 0:
            os.close(_log_fd)
            _log_fd = -1
        if log_path:
            _log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _hits.clear()


def checkpoint(name: str) -> None:
    """A kernel-mutating step just finished. No-op unless this process was armed."""
    if _target is None and _log_fd < 0:
        return
    with _lock:
        hit = _hits[name] = _hits.get(name, 0) + 1
        if _log_fd >= 0:
            os.write(_log_fd, f"{name}\n".encode())
        if _target is not None and _target == (name, hit):
            # SIGKILL: no finally, no atexit, no flush — exactly what a crash looks like.
            os.kill(os.getpid(), signal.SIGKILL)


configure(os.environ.pop(ENV_CRASH, None), os.environ.pop(ENV_LOG, None))

"""Functions a child runs on itself through ``lab.run(fn, mode=...)``: the child measures its
own world, from inside, with nothing but the standard library.

They must be importable by name (``lab.run`` pickles them by reference) and return plain
data. What they read is what a program in that container would see: ``/proc/self/ns/net``
is the kernel's answer for the calling process, ``socket.if_nameindex()`` is what
``ip link`` lists, and a ``connect`` is a connect from the container.
"""
from __future__ import annotations

import errno
import os
import socket

__all__ = ["whoami", "whoami_and_read", "reach"]


def _ns(kind: str) -> list[int]:
    st = os.stat(f"/proc/self/ns/{kind}")
    return [st.st_dev, st.st_ino]


def whoami() -> dict:
    """This process as it sees itself: pid, hostname, namespaces, interfaces (``ip link``)."""
    return {"pid": os.getpid(), "hostname": socket.gethostname(),
            "ns": {k: _ns(k) for k in ("net", "pid", "mnt", "uts")},
            "interfaces": [[index, name] for index, name in socket.if_nameindex()]}


def whoami_and_read(path: str) -> dict:
    """:func:`whoami`, plus what this process finds at ``path``: ``{"exists", "content"}``
    (the first 200 characters). Tells whether a file of the host's is visible from here."""
    me = whoami()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            me["file"] = {"path": path, "exists": True, "content": f.read(200)}
    except OSError as exc:
        me["file"] = {"path": path, "exists": False,
                      "error": errno.errorcode.get(exc.errno, str(exc.errno))}
    return me


def reach(targets: list, timeout: float = 1.0) -> dict:
    """Try each target from here: ``("tcp", addr, port)`` or ``("unix", "@name" or path)``.

    Returns ``{"me": whoami(), "results": [{"target", "ok", "error"|"banner"}]}``.
    """
    results = []
    for target in targets:
        kind = target[0]
        family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
        shown = f"{target[1]}:{target[2]}" if kind == "tcp" else target[1]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            if kind == "tcp":
                s.connect((target[1], target[2]))
            else:
                path = target[1]
                s.connect("\0" + path[1:] if path.startswith("@") else path)
            banner = s.recv(256).decode(errors="replace").strip()
            results.append({"target": f"{kind} {shown}", "ok": True, "banner": banner})
        except OSError as exc:
            name = "ETIMEDOUT" if isinstance(exc, TimeoutError) else errno.errorcode.get(exc.errno, str(exc))
            results.append({"target": f"{kind} {shown}", "ok": False, "error": name})
        finally:
            s.close()
    return {"me": whoami(), "results": results}

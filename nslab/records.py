"""Crash-safe records of what a lab made, and the garbage collector that reads them.

Most of what a sandboxed lab creates is owned by the kernel and dies with the controller:
its namespaces are pinned only by fds and member processes, children and proxies get
SIGKILL through ``PR_SET_PDEATHSIG``, and everything inside a dead netns goes with it.
What can outlive a SIGKILLed controller is written down *before* it is created, in one
record file per lab under ``state_root()/labs/``:

* links in a namespace that outlives the lab (the current host): bridge and veth names;
* sysctls changed in such a namespace, with their old values;
* directories (a sandbox's private state dir, with its IPAM files);
* IPAM reservations in a shared state dir (owner strings start with the lab id);
* names persisted under /run/netns.

A live lab holds an exclusive ``flock`` on its record for its whole life. The kernel drops
that lock when the process dies, however it dies, so ``gc`` knows a lab is dead exactly when
it can take the lock — no pid files, no PID-reuse race — and it never touches a live lab.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import secrets
import shutil
import threading
from typing import Any

from .errors import NslabError

__all__ = ["LabRecord", "gc", "GcReport", "leak_report", "labs_dir"]

_VERSION = 1


def labs_dir(root: str | None = None) -> str:
    from .hosts import state_root
    return os.path.join(root or state_root(), "labs")


class LabRecord:
    """The write-ahead record of one lab. Entries are written before the kernel object exists."""

    def __init__(self, root: str | None = None, lab_id: str | None = None):
        self.lab_id = lab_id or secrets.token_hex(6)
        directory = labs_dir(root)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"{self.lab_id}.json")
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._counter = 0
        # O_CLOEXEC: children must not inherit the lock, or a lab would look alive after death.
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._write()

    def add(self, kind: str, **identity: Any) -> str:
        """Record an object about to be created; returns the key to forget it by."""
        with self._lock:
            self._counter += 1
            key = f"{kind}-{self._counter}"
            self._entries[key] = {"kind": kind, **identity}
            self._write()
            return key

    def forget(self, key: str | None) -> None:
        """The object is gone (removed by the lab): drop its entry."""
        if key is None:
            return
        with self._lock:
            if self._entries.pop(key, None) is not None and self._fd >= 0:
                self._write()

    def _write(self) -> None:
        data = json.dumps({"version": _VERSION, "lab": self.lab_id, "pid": os.getpid(),
                           "entries": self._entries}, indent=1).encode()
        # Rewrite in place (the lock is on this inode, so no rename); a reader holding no lock
        # only sees it once the writer is dead, after the last complete write.
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return dict(self._entries)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Release the record. If every entry was forgotten the lab left nothing and the file
        goes; otherwise it stays, unlocked, for ``gc`` to collect what remains."""
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            if not self._entries:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            os.close(fd)

    def __repr__(self) -> str:
        return f"<LabRecord {self.lab_id} {len(self._entries)} entries{' closed' if self.closed else ''}>"


@dataclasses.dataclass
class GcReport:
    """What one ``gc`` run found and removed."""
    labs_collected: list[str] = dataclasses.field(default_factory=list)
    labs_alive: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"collected {len(self.labs_collected)} dead lab(s), left {len(self.labs_alive)} live one(s)"]
        lines += [f"  removed {item}" for item in self.removed]
        lines += [f"  error: {item}" for item in self.errors]
        return "\n".join(lines)


def _try_lock(path: str) -> int | None:
    """An fd holding the record's lock if its lab is dead, else None (the lab is alive)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def gc(root: str | None = None) -> GcReport:
    """Remove everything dead labs left behind, by their records. Idempotent; a live lab's
    objects are never touched (its record is locked)."""
    report = GcReport()
    directory = labs_dir(root)
    if not os.path.isdir(directory):
        return report
    for fname in sorted(os.listdir(directory)):
        if not fname.endswith(".json"):
            continue
        path = os.path.join(directory, fname)
        fd = _try_lock(path)
        if fd is None:
            if os.path.exists(path):
                report.labs_alive.append(fname[:-5])
            continue
        try:
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                raw = f.read()
            record = json.loads(raw) if raw.strip() else {"lab": fname[:-5], "entries": {}}
            failed = _collect(record, report)
            if not failed:
                os.unlink(path)
                report.labs_collected.append(record.get("lab", fname[:-5]))
        except (ValueError, OSError) as exc:
            report.errors.append(f"{path}: {exc}")
        finally:
            os.close(fd)
    return report


def _collect(record: dict, report: GcReport) -> bool:
    """Undo a dead lab's entries, newest first. Returns True if something could not be undone."""
    failed = False
    lab = record.get("lab", "?")
    for key, entry in reversed(list(record.get("entries", {}).items())):
        try:
            what = _undo(lab, entry)
            if what:
                report.removed.append(what)
        except (OSError, NslabError) as exc:
            failed = True
            report.errors.append(f"lab {lab} {key}: {exc}")
    return failed


def _undo(lab: str, entry: dict) -> str | None:
    kind = entry["kind"]
    if kind == "dir":
        if os.path.isdir(entry["path"]):
            shutil.rmtree(entry["path"])
            return f"directory {entry['path']}"
        return None
    if kind == "link":
        return _undo_link(entry)
    if kind == "sysctl":
        from .hosts import write_sysctl
        from .namespaces import Namespace
        with Namespace.current("net") as ns:
            write_sysctl(ns, entry["name"], entry["old"])
        return f"sysctl {entry['name']} restored to {entry['old']!r}"
    if kind == "ipam":
        from .ipam import Ipam
        if not os.path.isdir(entry["state_dir"]):
            return None
        prefix = f"{lab}/"
        released = []
        try:
            with Ipam(entry["state_dir"], entry["network"], entry["subnet"]) as ipam:
                released = ipam.release_where(lambda _addr, owner: owner.startswith(prefix))
        except NslabError as exc:
            if exc.errno != errno.ENOENT:
                raise
        return f"{len(released)} address(es) of network {entry['network']}" if released else None
    if kind == "netns-name":
        from .namespaces import remove_persisted
        remove_persisted(entry["name"], entry.get("run_dir", "/run/netns"), missing_ok=True)
        return f"netns name {entry['name']}"
    raise NslabError(errno.EINVAL, f"unknown record entry kind {kind!r}")


def _undo_link(entry: dict) -> str | None:
    """Delete a link the dead lab made in the current netns, by identity: its recorded name
    *and* its tag (a bridge's alias) or its master (a veth on the lab's bridge)."""
    from ._netlink import GONE, Rtnl
    from .namespaces import Namespace
    with Namespace.current("net") as ns, Rtnl(ns) as rtnl:
        link = rtnl.link(ifname=entry["ifname"])
        if link is None:
            return None
        alias = link.get_attr("IFLA_IFALIAS")
        if entry.get("alias") and alias != entry["alias"]:
            return None     # same name, not ours: leave it
        if entry.get("master"):
            master = link.get_attr("IFLA_MASTER")
            master_link = rtnl.link(index=master) if master else None
            if master_link is None or master_link.get_attr("IFLA_IFNAME") != entry["master"]:
                return None
        rtnl.request("link", "del", index=link["index"], obj=f"link {entry['ifname']}", ignore=GONE)
        return f"link {entry['ifname']}"


def leak_report(root: str | None = None) -> dict:
    """What nslab objects exist on this machine, which lab owns each, which are orphaned."""
    from ._netlink import Rtnl
    from .namespaces import Namespace
    out: dict[str, Any] = {"labs": [], "tagged_links": [], "netns_names": []}
    directory = labs_dir(root)
    if os.path.isdir(directory):
        for fname in sorted(os.listdir(directory)):
            if not fname.endswith(".json"):
                continue
            path = os.path.join(directory, fname)
            fd = _try_lock(path)
            alive = fd is None
            try:
                with open(path) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                record = {"entries": {}}
            finally:
                if fd is not None:
                    os.close(fd)
            out["labs"].append({"lab": fname[:-5], "alive": alive, "pid": record.get("pid"),
                                "entries": list(record.get("entries", {}).values())})
    with Namespace.current("net") as ns, Rtnl(ns) as rtnl:
        for link in rtnl.links():
            alias = link.get_attr("IFLA_IFALIAS") or ""
            if alias.startswith("nslab:"):
                out["tagged_links"].append({"ifname": link.get_attr("IFLA_IFNAME"), "alias": alias})
    return out


def orphaned(report: dict) -> list[dict]:
    """The dead labs of a leak report: what ``gc`` would collect."""
    return [lab for lab in report["labs"] if not lab["alive"]]

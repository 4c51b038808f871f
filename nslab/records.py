"""Crash-safe records of what a lab made, the garbage collector that reads them, and the
leak report.

Most of what a sandboxed lab creates is owned by the kernel and dies with the controller:
its namespaces are pinned only by fds and member processes, children and proxies get
SIGKILL through ``PR_SET_PDEATHSIG``, the nftables table has the ``owner`` flag (it dies
with the netlink socket that made it), held ports die with their sockets, and everything
inside a dead netns goes with it. What can outlive a SIGKILLed controller is written down
*before* it is created, in one record per lab under ``labs_dir()``:

* links in a namespace that outlives the lab (the current host, an existing one): bridge
  and veth names, with the tag (bridge alias) or master that proves they are the lab's;
* sysctls changed in such a namespace, with their old values;
* directories (a sandbox's private state dir, with its IPAM files);
* IPAM reservations in a shared state dir (owner strings start with the lab id);
* names persisted under /run/netns.

A record is a journal (JSON lines): a header, then ``add``/``forget`` lines, each one
``write(2)`` with ``O_APPEND``. A SIGKILL can at worst tear the last line, and a torn
``add`` means the object was never created (its line is written first); a torn ``forget``
means ``gc`` undoes something already gone, which every undo tolerates. So no kill, at any
instant, loses an object::

    >>> rec = LabRecord()                              # appears already locked (O_TMPFILE + link)
    >>> key = rec.add("link", ifname="br-1a2b", alias="nslab:1a2b:web")   # before creating it
    >>> rec.forget(key)                                # after removing it
    >>> rec.close()                                    # nothing left: the record goes

A live lab holds an exclusive ``flock`` on its record for its whole life. The kernel drops
that lock when the process dies, however it dies, so ``gc`` knows a lab is dead exactly when
it can take the lock — no pid files, no PID-reuse race — and it never touches a live lab.

Objects in a namespace other than the caller's are found again by the namespace's identity:
the record keeps its nsfs ``(dev, inode)`` and its netns cookie (``SO_NETNS_COOKIE``, never
reused), and ``gc`` looks for it among bind mounts, ``/run/netns`` and live processes. If
it is gone, so is everything that was in it.

Tests and tools can point all of this somewhere else with ``NSLAB_RECORDS_DIR``.
"""
from __future__ import annotations

import dataclasses
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import threading
import time
from typing import Any, Iterator

from ._faults import checkpoint
from .errors import NslabError, from_errno

__all__ = ["LabRecord", "gc", "GcReport", "leak_report", "orphaned", "labs_dir", "read_record",
           "ENV_RECORDS_DIR"]

_VERSION = 2
_SUFFIX = ".jsonl"
ENV_RECORDS_DIR = "NSLAB_RECORDS_DIR"
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)     # Linux 5.14+
_COMPACT_MIN_LINES = 256


def labs_dir(root: str | None = None) -> str:
    """Where records live: ``root/labs``, else ``$NSLAB_RECORDS_DIR``, else ``state_root()/labs``."""
    if root:
        return os.path.join(root, "labs")
    override = os.environ.get(ENV_RECORDS_DIR)
    if override:
        return override
    from .hosts import state_root
    return os.path.join(state_root(), "labs")


# --- identity of a namespace ---------------------------------------------------------------
def netns_cookie(ns) -> int | None:
    """The netns cookie of ``ns`` (a :class:`~nslab.namespaces.Namespace`): 64 bits, never
    reused while the machine is up, unlike inode numbers. None before Linux 5.14."""
    from ._netlink import socket_in
    try:
        sock = socket_in(ns, socket.AF_UNIX, socket.SOCK_DGRAM, 0)
    except OSError:
        return None
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None
    finally:
        sock.close()


def _host_identity(host) -> dict[str, Any]:
    ns = host.netns
    path = getattr(ns, "description", "")
    info: dict[str, Any] = {"kind": getattr(host, "kind", "host"), "dev": ns.identity[0],
                            "ino": ns.identity[1], "cookie": netns_cookie(ns)}
    # A path is only a hint for gc (identity decides): keep one another process could open.
    if isinstance(path, str) and path.startswith("/") and not path.startswith("/proc/"):
        info["path"] = path
    return info


def _nsfs_mounts() -> list[str]:
    """Mount points of nsfs files (``ip netns add``, ``Namespace.persist``, any bind mount)."""
    points = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "nsfs":
                    points.append(_unescape(left.split(" ")[4]))
    except OSError:
        pass
    return points


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and path[i + 1:i + 4].isdigit() and len(path[i + 1:i + 4]) == 3:
            out.append(chr(int(path[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def _candidate_paths(info: dict) -> Iterator[str]:
    """Where a netns can be opened from, cheapest first: the recorded path, the caller's,
    every nsfs mount, every process's, and last every nsfs fd any process holds."""
    if info.get("path"):
        yield info["path"]
    yield "/proc/thread-self/ns/net"
    yield from _nsfs_mounts()
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        yield f"/proc/{pid}/ns/net"
    want = f"net:[{info.get('ino')}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                    yield f"/proc/{pid}/fd/{fd}"
            except OSError:
                continue


def find_netns(info: dict):
    """An open :class:`~nslab.namespaces.Namespace` with the recorded identity, or None if
    that namespace no longer exists anywhere this process can see."""
    from .namespaces import Namespace
    want = (info.get("dev"), info.get("ino"))
    seen = set()
    for path in _candidate_paths(info):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != want or path in seen:
            continue
        seen.add(path)
        try:
            ns = Namespace.open(path, "net")
        except NslabError:
            continue
        if ns.identity == want and (info.get("cookie") is None or netns_cookie(ns) == info["cookie"]):
            return ns
        ns.close()       # same inode number, another namespace: the recorded one is gone
    return None


# --- the record ---------------------------------------------------------------------------
class LabRecord:
    """The write-ahead record of one lab. Entries are written before the kernel object exists.

    ``add(kind, **identity)`` before creating, ``forget(key)`` after removing; ``close()``
    removes the file when nothing is left (else leaves it, unlocked, for ``gc``).
    Thread-safe. The file is locked before it has a name, so ``gc`` never sees it unlocked
    while its lab lives.
    """

    def __init__(self, root: str | None = None, lab_id: str | None = None):
        self.lab_id = lab_id or secrets.token_hex(6)
        self.root = root
        self.dir = labs_dir(root)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(self.dir, f"{self.lab_id}{_SUFFIX}")
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}
        self._header: dict[str, Any] = {"v": _VERSION, "lab": self.lab_id, "pid": os.getpid(),
                                        "start": _start_time(os.getpid()), "created": time.time(),
                                        "argv": _cmdline(os.getpid())[:200]}
        self._host: dict[str, Any] | None = None
        self._counter = 0
        self._lines = 0
        self._fd = -1
        self._fd = self._new_file(self.path, replace=False)
        checkpoint("record.created")

    # --- writing ------------------------------------------------------------------------
    def _snapshot_lines(self) -> bytes:
        lines = [self._header]
        if self._host is not None:
            lines.append({"host": self._host})
        lines += [{"add": k, "e": e} for k, e in self._entries.items()]
        return b"".join(_line(x) for x in lines)

    def _new_file(self, path: str, replace: bool) -> int:
        """A locked file with the current snapshot, then given its name: ``path`` never
        exists unlocked while we live. (Without O_TMPFILE, a dot-named file gc treats as a
        record is made first: a gc in the instant before its flock would take it, and the
        rename below then fails — loudly, before any object exists.)"""
        data = self._snapshot_lines()
        try:
            fd = os.open(self.dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            tmp = None
        except OSError:
            tmp = os.path.join(self.dir, f".{self.lab_id}.{secrets.token_hex(3)}{_SUFFIX}")
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # O_CLOEXEC: children must not inherit the lock, or a lab would look alive after death.
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_whole(fd, data, self.path)       # a short snapshot must not replace the journal
            # From now on only appends: every later write(2) lands whole at the end.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
            if tmp is None:
                if replace:
                    tmp = os.path.join(self.dir, f".{self.lab_id}.{secrets.token_hex(3)}{_SUFFIX}")
                _link_fd(fd, tmp or path)
            if tmp is not None:
                os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            if tmp is not None:
                _unlink(tmp)
            raise
        self._lines = data.count(b"\n")
        return fd

    def _append(self, obj: dict) -> None:
        if self._fd < 0:
            raise NslabError(errno.EBADF, f"record of lab {self.lab_id} is closed")
        line = _line(obj)
        try:
            _write_whole(self._fd, line, self.path)   # one O_APPEND write(2): never interleaved
        except NslabError:
            # A torn line (a full /run, say): end it, so the next record starts on its own
            # line, and fail the step that needed this one written first.
            with contextlib.suppress(OSError):
                os.write(self._fd, b"\n")
            raise
        self._lines += 1
        if self._lines > _COMPACT_MIN_LINES and self._lines > 4 * (len(self._entries) + 2):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal as its live entries (a new inode, locked, renamed over)."""
        old = self._fd
        self._fd = self._new_file(self.path, replace=True)
        os.close(old)

    def attach_host(self, host) -> "LabRecord":
        """Write down which network namespace ``host`` is, so gc finds it again by identity.
        Returns self (``host.record = record.attach_host(host)``)."""
        with self._lock:
            self._host = _host_identity(host)
            self._append({"host": self._host})
        return self

    def add(self, kind: str, **identity: Any) -> str:
        """Record an object about to be created; returns the key to forget it by."""
        with self._lock:
            self._counter += 1
            key = f"{kind}-{self._counter}"
            entry = {"kind": kind, **identity}
            # In the table first: if this append compacts the journal, the snapshot has it.
            self._entries[key] = entry
            try:
                self._append({"add": key, "e": entry})
            except BaseException:
                del self._entries[key]
                raise
            return key

    def entry(self, key: str) -> dict[str, Any]:
        """The identity recorded under ``key`` (a copy)."""
        with self._lock:
            return dict(self._entries[key])

    def forget(self, key: str | None) -> None:
        """The object is gone (removed by the lab): drop its entry."""
        if key is None:
            return
        with self._lock:
            if self._entries.pop(key, None) is not None and self._fd >= 0:
                self._append({"forget": key})

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return dict(self._entries)

    @property
    def host(self) -> dict[str, Any] | None:
        return self._host

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
                _unlink(self.path)
            os.close(fd)

    def __enter__(self) -> "LabRecord":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<LabRecord {self.lab_id} {len(self._entries)} entries{state} {self.path}>"


def _link_fd(fd: int, path: str) -> None:
    """Give an O_TMPFILE file a name: linkat(AT_SYMLINK_FOLLOW) on its /proc/self/fd link.
    (``os.link`` only uses linkat when given a dir fd; plain link(2) would try to link the
    magic symlink itself: EXDEV.)"""
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (with the pid: which process it was)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# --- reading ------------------------------------------------------------------------------
def _write_whole(fd: int, data: bytes, path: str) -> None:
    """One write(2) of all of ``data``; a short or failed one is an error naming the record."""
    try:
        n = os.write(fd, data)
    except OSError as exc:
        raise from_errno(exc.errno or errno.EIO, "write", f"lab record {path}",
                         hint="is the state directory's filesystem full?") from None
    if n != len(data):
        raise from_errno(errno.ENOSPC, "write", f"lab record {path} ({n} of {len(data)} bytes)",
                         hint="is the state directory's filesystem full?")


def parse_record(raw: bytes, lab: str) -> dict[str, Any]:
    """Replay a journal: ``{"lab", "pid", "host", "entries": {key: entry}}`` in creation
    order. A torn last line (the writer was killed mid-write) is ignored."""
    record: dict[str, Any] = {"lab": lab, "pid": None, "host": None, "entries": {}, "torn": False}
    if raw.lstrip().startswith(b"{\n") or raw.lstrip().startswith(b'{"version"'):
        try:
            old = json.loads(raw)
            if isinstance(old, dict) and "entries" in old and "version" in old:
                record.update(lab=old.get("lab", lab), pid=old.get("pid"), entries=dict(old["entries"]))
                return record
        except ValueError:
            pass
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        # A torn line is one whose write failed: the step it was written for never happened
        # (write-ahead). Skip it, and keep reading what was written after it.
        try:
            obj = json.loads(line)
        except ValueError:
            record["torn"] = True
            continue
        if not isinstance(obj, dict):
            record["torn"] = True
            continue
        if "v" in obj:
            record.update({k: obj.get(k) for k in ("pid", "start", "created", "argv")})
            record["lab"] = obj.get("lab", lab)
        elif "host" in obj:
            record["host"] = obj["host"]
        elif "add" in obj:
            record["entries"][obj["add"]] = obj["e"]
        elif "forget" in obj:
            record["entries"].pop(obj["forget"], None)
    return record


def read_record(path: str) -> dict[str, Any]:
    """Parse the record at ``path`` (without locking it)."""
    with open(path, "rb") as f:
        return parse_record(f.read(), _lab_of(path))


def _lab_of(path: str) -> str:
    name = os.path.basename(path).rsplit(".", 1)[0]
    return name.lstrip(".").split(".")[0]


def _record_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    # ".json": a single-object record from before the journal format (version 1).
    return [os.path.join(directory, n) for n in names if n.endswith((_SUFFIX, ".json"))]


def _try_lock(path: str) -> int | None:
    """An fd holding the record's lock if its lab is dead, else None (alive, or gone)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Still the file at `path`? (gc ran meanwhile, or the lab compacted its journal.)
        st, now = os.fstat(fd), os.stat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


def _is_alive(path: str) -> bool | None:
    """True while a lab holds the record's lock, False if dead, None if the file went."""
    fd = _try_lock(path)
    if fd is not None:
        os.close(fd)
        return False
    return True if os.path.exists(path) else None


# --- the garbage collector ----------------------------------------------------------------
@dataclasses.dataclass
class GcReport:
    """What one ``gc`` run found and removed."""
    labs_collected: list[str] = dataclasses.field(default_factory=list)
    labs_alive: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def noop(self) -> bool:
        """Nothing was found to collect (what a second gc must report)."""
        return not (self.labs_collected or self.removed or self.errors)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"collected {len(self.labs_collected)} dead lab(s), left {len(self.labs_alive)} live one(s)"]
        lines += [f"  removed {item}" for item in self.removed]
        lines += [f"  error: {item}" for item in self.errors]
        return "\n".join(lines)


def gc(root: str | None = None) -> GcReport:
    """Remove everything dead labs left behind, by their records. Idempotent; a live lab's
    objects are never touched (its record is locked, and shared IPAM state it names stays)."""
    report = GcReport()
    directory = labs_dir(root)
    for path in _record_files(directory):
        lab = _lab_of(path)
        fd = _try_lock(path)
        if fd is None:
            if os.path.exists(path):
                report.labs_alive.append(lab)
            continue
        try:
            with open(f"/proc/self/fd/{fd}", "rb") as f:
                record = parse_record(f.read(), lab)
            failed = _collect(record, report, directory, path)
            if not failed:
                os.unlink(path)
                if record["lab"] not in report.labs_collected:
                    report.labs_collected.append(record["lab"])
        except (ValueError, OSError) as exc:
            report.errors.append(f"{path}: {exc}")
        finally:
            os.close(fd)
    return report


_NETNS_KINDS = ("link", "sysctl")


def _collect(record: dict, report: GcReport, directory: str, path: str) -> bool:
    """Undo a dead lab's entries, newest first. Returns True if something could not be undone."""
    failed = False
    lab = record.get("lab", "?")
    entries = list(record.get("entries", {}).items())
    ns = None
    ns_gone = False
    if any(e.get("kind") in _NETNS_KINDS for _, e in entries):
        if record.get("host"):
            ns = find_netns(record["host"])
            ns_gone = ns is None
        else:
            from .namespaces import Namespace      # a record without a host: the caller's netns
            ns = Namespace.current("net")
    try:
        for key, entry in reversed(entries):
            try:
                if entry.get("kind") in _NETNS_KINDS and ns_gone and "lease_dir" not in entry:
                    continue      # its namespace is gone, and everything in it went too
                what = _undo(lab, entry, None if ns_gone else ns, directory, path)
                if what:
                    report.removed.append(f"lab {lab}: {what}")
                checkpoint("gc.undo")
            except (OSError, NslabError, KeyError, TypeError, ValueError) as exc:
                failed = True
                report.errors.append(f"lab {lab} {key}: {exc}")
    finally:
        if ns is not None:
            ns.close()
    return failed


def _undo(lab: str, entry: dict, ns, directory: str, path: str) -> str | None:
    kind = entry["kind"]
    if kind == "dir":
        if os.path.isdir(entry["path"]):
            shutil.rmtree(entry["path"])
            return f"directory {entry['path']}"
        return None
    if kind == "link":
        return _undo_link(entry, ns)
    if kind == "sysctl" and "lease_dir" in entry:
        from .sysctl_leases import release
        if ns is None:         # the namespace is gone, and the change with it: just let go
            release(None, entry["lease_dir"], entry.get("lease_netns") or "", entry["name"], entry["holder"],
                    write=False)
            return f"sysctl {entry['name']}: lease of a namespace that is gone let go"
        old = release(ns, entry["lease_dir"], entry.get("lease_netns") or "", entry["name"], entry["holder"])
        return None if old is None else f"sysctl {entry['name']} restored to {old!r} (its last holder)"
    if kind == "sysctl":
        from .hosts import read_sysctl, write_sysctl
        try:
            if read_sysctl(ns, entry["name"]) == entry["old"]:
                return None
        except NslabError as exc:
            if exc.errno == errno.ENOENT:
                return None        # a per-link sysctl whose link is gone
            raise
        write_sysctl(ns, entry["name"], entry["old"])
        return f"sysctl {entry['name']} restored to {entry['old']!r}"
    if kind == "ipam":
        return _undo_ipam(lab, entry, directory, path)
    if kind == "netns-name":
        from .namespaces import remove_persisted
        run_dir = entry.get("run_dir", "/run/netns")
        where = os.path.join(run_dir, entry["name"])
        if not os.path.lexists(where):
            return None
        if entry.get("ino") is not None and where in _nsfs_mounts():
            st = os.stat(where)
            if (st.st_dev, st.st_ino) != (entry.get("dev"), entry["ino"]):
                return None       # the name now holds another namespace: not ours
        remove_persisted(entry["name"], run_dir, missing_ok=True)
        return f"netns name {where}"
    raise NslabError(errno.EINVAL, f"unknown record entry kind {kind!r}")


def _undo_link(entry: dict, ns) -> str | None:
    """Delete a link the dead lab made in its host netns, by identity: its recorded name
    *and* its tag (a bridge's alias) or its master (a veth on the lab's bridge)."""
    from ._netlink import GONE, Rtnl
    with Rtnl(ns) as rtnl:
        link = rtnl.link(ifname=entry["ifname"])
        if link is None:
            return None
        alias = link.get_attr("IFLA_IFALIAS")
        if entry.get("alias") and alias != entry["alias"]:
            # A bridge is tagged right after it is made (the kernel ignores IFLA_IFALIAS on
            # creation): untagged, it is ours only if it still has the random MAC we gave it.
            if alias or not entry.get("address") or link.get_attr("IFLA_ADDRESS") != entry["address"]:
                return None     # same name, not ours: leave it
        if entry.get("master"):
            master = link.get_attr("IFLA_MASTER")
            master_link = rtnl.link(index=master) if master else None
            if master_link is None or master_link.get_attr("IFLA_IFNAME") != entry["master"]:
                return None
        rtnl.request("link", "del", index=link["index"], obj=f"link {entry['ifname']}", ignore=GONE)
        return f"link {entry['ifname']}"


def live_ipam_networks(directory: str, exclude: str | None = None) -> set[tuple[str, str]]:
    """(state_dir, network) of every IPAM entry of a live lab whose record is in
    ``directory``: the IPAM state nobody may remove. ``exclude``: a record path to leave out
    (the dead record gc holds locked, which would look alive; or the caller's own)."""
    return _live_ipam_networks(directory, exclude)


def _live_ipam_networks(directory: str, collecting: str | None) -> set[tuple[str, str]]:
    held = set()
    for path in _record_files(directory):
        if path != collecting and _is_alive(path):
            try:
                record = read_record(path)
            except OSError:
                continue
            for entry in record["entries"].values():
                if entry.get("kind") == "ipam":
                    held.add((os.path.abspath(entry["state_dir"]), entry["network"]))
    return held


def _undo_ipam(lab: str, entry: dict, directory: str, collecting: str) -> str | None:
    """Release what the dead lab held in a shared IPAM; forget the network's state too if
    nobody holds anything in it any more and no live lab names it."""
    from .ipam import Ipam
    state_dir, network = entry["state_dir"], entry["network"]
    if not os.path.isdir(state_dir):
        return None
    held = Ipam.held_subnets(state_dir)
    if network not in held:
        return None
    prefix = f"{lab}/"
    try:
        with Ipam(state_dir, network, held[network]) as ipam:
            released = ipam.release_where(lambda _addr, owner: owner.startswith(prefix))
            remaining = ipam.allocations()
    except NslabError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    parts = [f"{len(released)} address(es) of network {network}"] if released else []
    if not remaining:
        # Asked again under the IPAM locks: a live lab may have just started using it.
        key = (os.path.abspath(state_dir), network)
        if Ipam.remove(state_dir, network, only_if_unused=True,
                       wanted=lambda: key in _live_ipam_networks(directory, collecting)):
            parts.append(f"IPAM state of network {network} ({held[network]})")
    return ", ".join(parts) or None


# --- the leak report ----------------------------------------------------------------------
def leak_report(root: str | None = None) -> dict:
    """What nslab objects exist on this machine, which lab owns each, which are orphaned.

    ``labs``: every record, alive or dead (a dead one is what ``gc`` collects);
    ``tagged_links``: links whose alias carries nslab's tag, in the caller's netns and every
    persisted one, with the owning lab and its state; ``state_dirs``: sandbox directories
    and whether a record accounts for them; ``netns_names``: names nslab persisted;
    ``nft_tables``: nslab tables in the caller's netns; ``processes``: nslab's proxies and
    callable runners, and whether their parent still lives.
    """
    directory = labs_dir(root)
    labs = []
    for path in _record_files(directory):
        alive = _is_alive(path)
        if alive is None:
            continue
        try:
            record = read_record(path)
        except OSError:
            record = parse_record(b"", _lab_of(path))
        labs.append({"lab": record["lab"], "alive": alive, "pid": record.get("pid"),
                     "argv": record.get("argv"), "host": _host_kind(record),
                     "path": path, "entries": list(record["entries"].values())})
    state = {lab["lab"]: lab["alive"] for lab in labs}

    def owner_state(lab_id: str | None) -> str:
        if lab_id is None:
            return "unknown"
        if lab_id not in state:
            return "orphaned (no record)"
        return "alive" if state[lab_id] else "orphaned"

    out: dict[str, Any] = {"records_dir": directory, "labs": labs, "tagged_links": _tagged_links(owner_state),
                           "state_dirs": [], "netns_names": [], "nft_tables": _nft_tables(),
                           "processes": _nslab_processes()}
    recorded_dirs = {e["path"]: lab["lab"] for lab in labs for e in lab["entries"] if e.get("kind") == "dir"}
    from .hosts import scratch_root
    base = scratch_root()
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(base, name)
        if not (name.startswith("sandbox-") and os.path.isdir(path)):
            continue
        lab_id = recorded_dirs.get(path)
        out["state_dirs"].append({"path": path, "lab": lab_id,
                                  "state": owner_state(lab_id) if lab_id else "unrecorded"})
    for lab in labs:
        for e in lab["entries"]:
            if e.get("kind") == "netns-name":
                path = os.path.join(e.get("run_dir", "/run/netns"), e["name"])
                if os.path.lexists(path):
                    out["netns_names"].append({"path": path, "lab": lab["lab"],
                                               "state": owner_state(lab["lab"])})
    return out


def _host_kind(record: dict) -> str:
    if record.get("host"):
        return record["host"].get("kind", "?")
    if any(e.get("kind") == "dir" for e in record["entries"].values()):
        return "sandbox"
    return "unknown"


def _tagged_links(owner_state) -> list[dict]:
    """Links tagged ``nslab:<lab>:<network>`` in the caller's netns and every persisted one."""
    from ._netlink import Rtnl
    from .namespaces import Namespace
    found = []
    seen = set()
    for path in ["/proc/thread-self/ns/net", *_nsfs_mounts()]:
        try:
            ns = Namespace.open(path)
        except (NslabError, OSError):
            continue
        try:
            if ns.kind.name != "net" or ns.identity in seen:
                continue
            seen.add(ns.identity)
            where = "current netns" if path.startswith("/proc/") else path
            with Rtnl(ns) as rtnl:
                links = list(rtnl.links())
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
            for link in links:
                alias = link.get_attr("IFLA_IFALIAS") or ""
                if not alias.startswith("nslab:"):
                    continue
                parts = alias.split(":")
                lab_id = parts[1] if len(parts) >= 3 else None
                ports = [names[l["index"]] for l in links if l.get_attr("IFLA_MASTER") == link["index"]]
                found.append({"ifname": link.get_attr("IFLA_IFNAME"), "alias": alias, "netns": where,
                              "lab": lab_id, "state": owner_state(lab_id), "ports": ports})
        except NslabError:
            continue
        finally:
            ns.close()
    return found


def _nft_tables() -> list[dict]:
    """nslab's tables in the caller's netns. One with the owner flag dies with its process
    (never orphaned); one without it (``Firewall(owner=False)``) may be."""
    try:
        from pyroute2.nftables.main import NFTables
        nft = NFTables()
    except Exception:  # noqa: BLE001 - no nfnetlink here: nothing to report
        return []
    try:
        tables = []
        for t in nft.get_tables():
            name = t.get_attr("NFTA_TABLE_NAME") or ""
            if name == "nslab" or name.startswith("nslab-"):
                owned = bool((t.get_attr("NFTA_TABLE_FLAGS") or 0) & 0x2)
                tables.append({"table": name, "family": t["nfgen_family"], "owner_flag": owned,
                               "state": "alive (owned by a live socket)" if owned else "unowned (may be orphaned)"})
        return tables
    except Exception:  # noqa: BLE001
        return []
    finally:
        nft.close()


def _nslab_processes() -> list[dict]:
    procs = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        cmd = _cmdline(int(pid))
        if "nslab.proxy" not in cmd and "nslab._callable_runner" not in cmd:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs.append({"pid": int(pid), "ppid": ppid, "cmdline": cmd[:200],
                      "state": "orphaned" if ppid == 1 else "alive"})
    return procs


def orphaned(report: dict) -> list[dict]:
    """The dead labs of a leak report: what ``gc`` would collect."""
    return [lab for lab in report["labs"] if not lab["alive"]]

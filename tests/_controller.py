"""The controller process the crash, concurrency and hygiene tests run, and kill.

    python3 tests/_controller.py lifecycle --host sandbox [--netns PATH --state DIR] [--sleep PROG]
    python3 tests/_controller.py burst --host existing --netns PATH --state DIR --seed N
    python3 tests/_controller.py threads --netns PATH --state DIR --network NAME
    python3 tests/_controller.py hygiene --cycles N --nofile 256

It is an ordinary nslab user: everything it makes it makes through the public API. The
tests arm it with ``NSLAB_CRASH_AT`` (nslab._faults) or SIGKILL it from outside, then check
with ``nslab.gc`` that nothing is left. Progress goes to ``--status FILE`` as JSON lines
(written and flushed as they happen, so a killed controller's last words survive).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import threading
import time

import nslab
from nslab.hosts import ExistingHost
from nslab.records import netns_cookie

_status = None


def say(**event) -> None:
    """One JSON line to the status file, flushed: the test reads it even after SIGKILL."""
    if _status is not None:
        os.write(_status, (json.dumps(event) + "\n").encode())


def make_lab(args) -> nslab.Lab:
    if args.host == "sandbox":
        lab = nslab.Lab()
    elif args.host == "current":
        lab = nslab.Lab("current")
    else:
        lab = nslab.Lab(host=ExistingHost(args.netns, args.state))
    say(lab=lab.id, host=args.host, cookie=netns_cookie(lab.host.netns))
    return lab


def report(c) -> None:
    """A child made: its pid, its netns inode and its published port, for the checks."""
    say(child=c.pid, cookie=netns_cookie(c.netns) if c.netns is not None else None,
        port=c.published[0].host_port if c.published else None)


def lifecycle(args) -> None:
    """Every mode once, published and not, torn down piece by piece and then as a whole."""
    sleep = [args.sleep, "3600"]
    lab = make_lab(args)
    net = args.network
    if args.host == "current":
        lab.network(net)
        c = lab.spawn(sleep, mode=net, name="a")
        report(c)
        c.close()
        lab.close()
        say(done=True)
        return
    a = lab.spawn(sleep, mode=net, name="a", publish=["127.0.0.1::80"])
    report(a)
    b = lab.spawn(sleep, mode="host", name="b")
    report(b)
    c = lab.spawn(sleep, mode="none", name="c")
    report(c)
    d = lab.spawn(sleep, mode="container:a", name="d")
    report(d)
    e = lab.spawn(sleep, mode=net, name="e")
    report(e)
    for x in (d, c, b):
        x.close()
    e.kill()
    a.close()
    f = lab.spawn(sleep, mode=net, name="f")
    report(f)
    lab.close()
    say(done=True)


def burst(args) -> None:
    """Create/publish/destroy at random until killed; every child and port is reported."""
    rng = random.Random(args.seed)
    sleep = [args.sleep, "3600"]
    lab = make_lab(args)
    live = []
    n = 0
    while True:
        if len(live) < 2 or (len(live) < 6 and rng.random() < 0.6):
            n += 1
            publish = ["127.0.0.1::80"] if rng.random() < 0.3 else []
            mode = rng.choice([args.network, args.network, "none", "host"])
            if mode in ("none", "host"):
                publish = []
            c = lab.spawn(sleep, mode=mode, name=f"c{n}", publish=publish)
            report(c)
            live.append(c)
        else:
            c = live.pop(rng.randrange(len(live)))
            c.close()


def threads(args) -> None:
    """Rounds of concurrent bridge spawns, driven over stdin: 'go N', 'close', 'exit'."""
    sleep = [args.sleep, "3600"]
    lab = make_lab(args)
    net = lab.network(args.network)
    say(bridge=net.bridge, subnet=str(net.subnet))
    containers = []
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "go":
            count = int(cmd[1])
            barrier = threading.Barrier(count)
            results: list = [None] * count

            def one(i: int) -> None:
                barrier.wait()
                try:
                    c = lab.spawn(sleep, mode=args.network, name=f"{args.network}-{i}-{len(containers)}")
                    results[i] = c
                except BaseException as exc:  # noqa: BLE001 - reported to the test
                    results[i] = exc
            workers = [threading.Thread(target=one, args=(i,)) for i in range(count)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            out = []
            for r in results:
                if isinstance(r, BaseException):
                    out.append({"error": f"{type(r).__name__}: {r}", "errno": getattr(r, "errno", None)})
                    continue
                containers.append(r)
                out.append({"name": r.name, "ip": str(r.address), "veth": r.endpoint.host_ifname,
                            "mac": _mac_in(r), "pid": r.pid})
            print(json.dumps(out), flush=True)
        elif cmd[0] == "close":
            for c in containers:
                c.close()
            containers.clear()
            print(json.dumps({"closed": True}), flush=True)
        elif cmd[0] == "exit":
            break
    lab.close()


def _mac_in(container) -> str:
    from nslab._netlink import Rtnl
    with Rtnl(container.netns) as rtnl:
        return rtnl.link(ifname="eth0").get_attr("IFLA_ADDRESS")


def hygiene(args) -> None:
    """Create/destroy cycles under a lowered fd limit; report fds, RSS, threads' netns, zombies."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.nofile, hard), hard))
    host_ns = os.readlink("/proc/self/ns/net")
    sleep = [args.sleep, "3600"]
    samples = []
    strays: list[str] = []

    def check(step: str) -> None:
        for tid in os.listdir("/proc/self/task"):
            try:
                ns = os.readlink(f"/proc/self/task/{tid}/ns/net")
            except FileNotFoundError:
                continue          # a throwaway thread that just ended
            if ns != host_ns:
                strays.append(f"{step}: thread {tid} in {ns}")

    zombies = 0
    leaked: list = []
    for cycle in range(args.cycles):
        with nslab.Lab() as lab:
            if args.control:
                # The deliberately broken controller: an fd kept per cycle, a thread left in a
                # lab's netns, a child never reaped. The checks must see all three.
                leaked.append(os.open("/dev/null", os.O_RDONLY))
                if cycle == 0:
                    parked = threading.Event()
                    entered = lab.host.netns.entered       # kept referenced: never restored

                    def park(cm=[]):                      # noqa: B006 - holds the context manager
                        cm.append(entered())
                        cm[0].__enter__()
                        parked.wait()
                    threading.Thread(target=park, daemon=True).start()
                    leaked.append(__import__("subprocess").Popen(["true"]))
            check("Lab()")
            lab.spawn(sleep, name="a")
            check("spawn bridge")
            b = lab.spawn(sleep, mode="none", name="b")
            check("spawn none")
            lab.spawn(sleep, mode="container:a", name="c")
            check("spawn container")
            if cycle % 4 == 0:
                d = lab.spawn(sleep, mode="host", name="d")
                d.kill()
                d.close()
                check("host spawn+kill+close")
            b.close()
            check("close none")
        check("Lab.close")
        zombies += _zombie_children()
        if cycle in (args.warmup - 1, args.cycles - 1) or cycle % 64 == 0:
            samples.append({"cycle": cycle, "fds": len(os.listdir("/proc/self/fd")), "rss": _rss(),
                            "threads": len(os.listdir("/proc/self/task"))})
    print(json.dumps({"samples": samples, "strays": strays[:20], "stray_count": len(strays),
                      "zombies": zombies, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}),
          flush=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _zombie_children() -> int:
    """Children of this process that exited and were never reaped."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = f.read().split()
        except FileNotFoundError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        count += 1
            except FileNotFoundError:
                pass
    return count


# --- the test side: running a controller and looking for what it left ----------------------
# (Imported by the tests; kept here so the scenarios and the checks read side by side.)
import contextlib  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

HERE = os.path.abspath(__file__)
UNIFIED = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"


class Run:
    """One controller process, in its own cgroup (so the test sees every descendant, zombie
    or not), with its own records directory and a marker program name for its children."""

    def __init__(self, tmp: str, scenario: str, *extra: str, crash_at: str | None = None,
                 log: str | None = None, stdin=None, stdout=None):
        self.tmp = tmp
        self.token = secrets.token_hex(4)
        self.records = os.path.join(tmp, "labs")
        self.status = os.path.join(tmp, f"status-{self.token}.jsonl")
        # Children run a symlink to sleep whose name is the marker: it is their comm, which
        # even a zombie keeps, so "no process and no zombie left" can be checked by name.
        self.marker = f"nsm{self.token}"
        self.sleep = os.path.join(tmp, self.marker)
        if not os.path.lexists(self.sleep):
            os.symlink(shutil.which("sleep"), self.sleep)
        self.cgroup = os.path.join(UNIFIED, f"nslab-test-{self.token}")
        os.mkdir(self.cgroup)
        env = dict(os.environ, NSLAB_RECORDS_DIR=self.records, PYTHONDONTWRITEBYTECODE="1")
        env.pop("NSLAB_CRASH_AT", None)
        if crash_at:
            env["NSLAB_CRASH_AT"] = crash_at
        if log:
            env["NSLAB_CHECKPOINT_LOG"] = log
        argv = [sys.executable, HERE, scenario, "--status", self.status, "--sleep", self.sleep,
                "--cgroup", os.path.join(self.cgroup, "cgroup.procs"), *extra]
        self.proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=stdout,
                                     stderr=subprocess.PIPE)

    def wait(self, timeout: float = 60) -> int:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""

    def events(self) -> list[dict]:
        try:
            with open(self.status, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def lab_ids(self) -> set[str]:
        ids = {e["lab"] for e in self.events() if "lab" in e}
        if os.path.isdir(self.records):
            ids |= {n.lstrip(".").split(".")[0] for n in os.listdir(self.records)}
        return ids

    def procs(self) -> list[int]:
        """Processes still in the controller's cgroup."""
        with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def wait_empty(self, timeout: float = 2.0) -> list[int]:
        """Wait until every descendant is gone; returns the survivors after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.procs()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.01)

    def zombies_and_strays(self, timeout: float = 2.0) -> list[str]:
        """Processes anywhere running our marker program, still there after ``timeout``:
        alive ones, and zombies whose parent is not pid 1. (An orphaned zombie belongs to
        pid 1, which reaps it when it gets to it — ~1.5 s on this VM's init; a zombie held
        by any other parent is a parent that does not reap.)"""
        deadline = time.monotonic() + timeout
        while True:
            found = [p for p in self._marked() if not p.endswith("state Z ppid 1")]
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def netns_cookies(self) -> set[int]:
        """Cookies (never reused, unlike inode numbers) of every netns the controller made or used."""
        return {e["cookie"] for e in self.events() if e.get("cookie")}

    def _marked(self) -> list[str]:
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
            if comm == self.marker[:15]:
                fields = stat.rsplit(b")", 1)[1].split()
                found.append(f"pid {pid} state {fields[0].decode()} ppid {fields[1].decode()}")
        return found

    def close(self) -> None:
        """Kill whatever is left (a failed test must not leak either) and drop the cgroup."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        with contextlib.suppress(OSError):
            with open(os.path.join(self.cgroup, "cgroup.kill"), "w") as f:
                f.write("1")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.cgroup)
                break
            except OSError:
                time.sleep(0.02)


def answers(ns, port: int, timeout: float = 1.0) -> bool:
    """Does something in netns ``ns`` accept a TCP connection on 127.0.0.1:``port``?"""
    import socket
    from nslab._netlink import socket_in
    s = socket_in(ns, socket.AF_INET, socket.SOCK_STREAM, 0)
    s.settimeout(timeout)
    try:
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def netns_state(ns) -> dict:
    """What a network namespace holds, stably comparable: links (name, kind, alias, master),
    addresses, routes, nft tables, listening/bound sockets and its net sysctls."""
    from pyroute2.nftables.main import NFTables

    from nslab._netlink import Rtnl
    with Rtnl(ns) as rtnl:
        links = list(rtnl.links())
        names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in links}
        state = {
            "links": sorted((l.get_attr("IFLA_IFNAME"), _kind(l), l.get_attr("IFLA_IFALIAS") or "",
                             names.get(l.get_attr("IFLA_MASTER"), "")) for l in links),
            "addresses": sorted((names.get(a["index"], "?"), a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                                for a in rtnl.addresses()),
            "routes": sorted((r.get_attr("RTA_DST") or "default", r["dst_len"],
                              names.get(r.get_attr("RTA_OIF"), "")) for r in rtnl.routes()),
        }

    def inside() -> dict:
        nft = NFTables()
        try:
            tables = sorted((t["nfgen_family"], t.get_attr("NFTA_TABLE_NAME")) for t in nft.get_tables())
        finally:
            nft.close()
        sockets = []
        for proto in ("tcp", "udp", "tcp6", "udp6", "unix"):
            with contextlib.suppress(FileNotFoundError):
                with open(f"/proc/thread-self/net/{proto}") as f:
                    rows = f.read().splitlines()[1:]
                if proto == "unix":
                    sockets += [f"unix {r.split()[-1]}" for r in rows if len(r.split()) > 7]
                else:
                    sockets += [f"{proto} {r.split()[1]} {r.split()[3]}" for r in rows]
        sysctls = {}
        for top in ("/proc/sys/net/ipv4", "/proc/sys/net/ipv4/conf/all", "/proc/sys/net/ipv4/conf/default",
                    "/proc/sys/net/ipv6/conf/all", "/proc/sys/net/ipv6/conf/default", "/proc/sys/net/core",
                    "/proc/sys/net/bridge"):
            if not os.path.isdir(top):
                continue
            for name in sorted(os.listdir(top)):
                path = os.path.join(top, name)
                if os.path.isfile(path) and "stat" not in name:
                    with contextlib.suppress(OSError):
                        with open(path) as f:
                            sysctls[path] = f.read().strip()
        return {"nft": tables, "sockets": sorted(sockets), "sysctls": sysctls}
    state.update(ns.call(inside))
    return state


def _kind(link) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


def diff_state(before: dict, after: dict) -> list[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b == a:
            continue
        if isinstance(b, dict) and isinstance(a, dict):
            problems.append(f"{key}: " + ", ".join(f"{k}: {b.get(k)!r} -> {a.get(k)!r}"
                                                   for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)))
        else:
            problems.append(f"{key}: +{sorted(set(map(str, a)) - set(map(str, b)))} "
                            f"-{sorted(set(map(str, b)) - set(map(str, a)))}")
    return problems


def nsfs_mounts() -> list[tuple[str, str]]:
    """(namespace, mount point) of every nsfs mount: ``ip netns add`` and friends."""
    with open("/proc/self/mountinfo") as f:
        return sorted(tuple(line.split(" - ")[0].split()[3:5]) for line in f if " - nsfs " in line)


def pinned_by_mounts(cookies: set[int], before: list) -> list[str]:
    """nsfs mounts made since ``before`` that pin one of these namespaces (by cookie: inode
    numbers are reused at once, and other people's labs come and go meanwhile). Processes
    pinning them are what the cgroup check is for."""
    from nslab.namespaces import Namespace
    found = []
    for ns, point in set(nsfs_mounts()) - set(before):
        if not ns.startswith("net:["):
            continue
        try:
            handle = Namespace.open(point, "net")
        except OSError:
            continue
        with handle:
            if netns_cookie(handle) in cookies:
                found.append(point)
    return found


class SharedHost:
    """A network namespace playing an existing host several labs share: created here,
    persisted into a private run dir (never /run/netns), with its state dir."""

    def __init__(self, tmp: str):
        from nslab.namespaces import Namespace
        self.tmp = tmp
        self.run_dir = os.path.join(tmp, "netns")
        self.state_dir = os.path.join(tmp, "state")
        self.name = f"h{secrets.token_hex(4)}"
        with Namespace.create("net") as ns:
            self.path = ns.persist(self.name, self.run_dir)
        self.ns = Namespace.open(self.path, "net")
        from nslab._netlink import link_up, send_batch, socket_in
        sock = socket_in(self.ns)          # lo up, as on any real host
        try:
            sock.bind((0, 0))
            send_batch(sock, [link_up("lo")], self.path)
        finally:
            sock.close()

    def state(self) -> dict:
        return netns_state(self.ns)

    def ipam_files(self) -> list[str]:
        d = os.path.join(self.state_dir, "ipam")
        return sorted(n for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []

    def close(self) -> None:
        from nslab.namespaces import remove_persisted
        self.ns.close()
        remove_persisted(self.name, self.run_dir, missing_ok=True)


def main() -> None:
    global _status
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["lifecycle", "burst", "threads", "hygiene"])
    p.add_argument("--host", default="sandbox", choices=["sandbox", "existing", "current"])
    p.add_argument("--netns")
    p.add_argument("--state")
    p.add_argument("--network", default="bridge")
    p.add_argument("--sleep", default="sleep")
    p.add_argument("--status")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--nofile", type=int, default=256)
    p.add_argument("--control", action="store_true", help="hygiene: leak on purpose (the control)")
    p.add_argument("--cgroup", help="cgroup.procs to join first (so the test sees every descendant)")
    args = p.parse_args()
    if args.cgroup:
        with open(args.cgroup, "w") as f:
            f.write(str(os.getpid()))
    if args.status:
        _status = os.open(args.status, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    say(pid=os.getpid())
    {"lifecycle": lifecycle, "burst": burst, "threads": threads, "hygiene": hygiene}[args.scenario](args)


if __name__ == "__main__":
    main()

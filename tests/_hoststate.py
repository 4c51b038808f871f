"""A snapshot of the real host's network state, to prove the suite leaves it unchanged.

Read-only: it runs `ip -j` and `nft -j` with argv lists and reads /proc; it changes nothing.
Volatile fields (counters, timers, lifetimes) are dropped so two snapshots of an untouched
host compare equal.
"""
import json
import os
import shutil
import subprocess

_VOLATILE = {"stats", "stats64", "valid_life_time", "preferred_life_time", "expires", "used",
             "updated", "lastuse", "handle", "counter"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _ip(*args):
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return _strip(json.loads(out or "[]"))


# Per-interface directories are added for the interfaces that exist (lo, eth0...).
_SYSCTL_DIRS = ["/proc/sys/net/ipv4", "/proc/sys/net/ipv6/conf/all", "/proc/sys/net/ipv6/conf/default",
                "/proc/sys/net/ipv4/conf/all", "/proc/sys/net/ipv4/conf/default", "/proc/sys/net/core",
                "/proc/sys/net/bridge", "/proc/sys/net/netfilter"]


def _sysctls():
    values = {}
    dirs = list(_SYSCTL_DIRS)
    for family in ("ipv4", "ipv6"):
        conf = f"/proc/sys/net/{family}/conf"
        if os.path.isdir(conf):
            dirs += [os.path.join(conf, d) for d in sorted(os.listdir(conf)) if d not in ("all", "default")]
    for top in dirs:
        if not os.path.isdir(top):
            continue
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if os.path.isfile(path) and os.access(path, os.R_OK) and "stat" not in name \
                    and not name.endswith("_count"):   # counters move with any traffic
                try:
                    with open(path) as f:
                        values[path] = f.read().strip()
                except OSError:
                    pass
    return values


def _mounts():
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:5]) for line in f if "/run" in line or " nsfs " in line)


def snapshot() -> dict:
    state = {
        "links": _ip("link", "show"),
        "addresses": _ip("addr", "show"),
        "routes": _ip("route", "show", "table", "all"),
        "routes6": _ip("-6", "route", "show", "table", "all"),
        "rules": _ip("rule", "show"),
        "rules6": _ip("-6", "rule", "show"),
        "sysctls": _sysctls(),
        "mounts": _mounts(),
        "netns": sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else None,
    }
    if shutil.which("nft"):
        out = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True).stdout
        state["nft"] = _strip(json.loads(out)) if out else None
    return state


def diff(before: dict, after: dict) -> list[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            if isinstance(before.get(key), dict) and isinstance(after.get(key), dict):
                changed = sorted(k for k in set(before[key]) | set(after[key])
                                 if before[key].get(k) != after[key].get(k))
                problems.append(f"{key}: {changed[:10]}")
            else:
                problems.append(f"{key}: {str(before.get(key))[:300]} -> {str(after.get(key))[:300]}")
    return problems

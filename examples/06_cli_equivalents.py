#!/usr/bin/env python3
"""Step 4: the Docker CLI, call by call — each nslab call next to the ``docker run`` line it
reproduces, and what it produced.

Every spawn below is printed as the ``docker`` command it corresponds to, then the
container's mode, network namespace, address, kept port mappings and any warning or error —
including the ones Docker gives: ports discarded in host mode (a warning), ports refused in
container mode (an error), a host port published twice (an error).

One difference shows in the lines: an nslab child shares the host's PID namespace and its
filesystem unless ``new=`` asks for its own (it runs the host's programs; there is no image),
hence ``--pid host`` where Docker would isolate by default. UTS is not such a difference:
Docker gives every container its own UTS (and IPC) namespace, host mode included, and so does
nslab. Each line shows the UTS namespace the child is really in, read from
``/proc/PID/ns/uts``, and says so if it is the host's.

Run:  sudo python3 examples/06_cli_equivalents.py
"""
import os
import sys
import warnings

from nslab import Lab
from nslab.errors import NslabError
from nslab.publish import format_publish, parse_publish


def docker_line(name, mode, publish=(), new=(), hostname=None) -> str:
    """The docker run command an nslab spawn stands for."""
    parts = ["docker run -d", f"--name {name}"]
    if mode != "bridge":
        parts.append(f"--network {mode}")
    if hostname:
        parts.append(f"--hostname {hostname}")
    for m in parse_publish(publish):
        parts.append(f"-p {format_publish(m).removesuffix('/tcp')}")
    # nslab children share the host's PID namespace (and its filesystem) unless new= asks
    # for their own; Docker gives each container its own by default. UTS and IPC are private
    # in both, so no --uts/--ipc flag.
    if "pid" not in new:
        parts.append("--pid host")
    return " ".join(parts + ["<image> sleep 60"])


def show(lab, name, mode="bridge", publish=(), new=(), hostname=None) -> bool:
    print(f"$ {docker_line(name, mode, publish, new, hostname)}")
    call = f"lab.spawn(['sleep', '60'], name={name!r}, mode={mode!r}"
    call += f", publish={list(publish)!r}" if publish else ""
    call += f", new={tuple(new)!r}" if new else ""
    call += f", hostname={hostname!r}" if hostname else ""
    print(f"  nslab: {call})")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c = lab.spawn(["sleep", "60"], name=name, mode=mode, publish=publish, new=new, hostname=hostname)
    except NslabError as exc:
        print(f"  -> refused: {exc.strerror}\n")
        return False
    netns = os.readlink(f"/proc/{c.pid}/ns/net")
    same = " (the host's)" if netns == f"net:[{lab.host.netns.inode}]" else ""
    uts = os.readlink(f"/proc/{c.pid}/ns/uts")
    uts_note = " (the host's: docker --uts host)" if uts == os.readlink("/proc/self/ns/uts") else ""
    print(f"  -> {c!r}")
    print(f"     netns {netns}{same}, uts {uts}{uts_note}, address {c.address or '-'}, "
          f"published {[format_publish(m) for m in c.published] or '-'}")
    for w in caught:
        print(f"     WARNING: {w.message}")
    print()
    return True


def main() -> int:
    with Lab() as lab:
        print(f"(a sandbox Docker host: net:[{lab.host.netns.inode}], address {lab.host.address})\n")
        results = [
            show(lab, "web", publish=["8080:80"]),
            show(lab, "api", publish=["127.0.0.1:9000:9000", "5353:53/udp"]),
            show(lab, "top", mode="host"),
            show(lab, "agent", mode="host", publish=["9100:9100"]),
            show(lab, "offline", mode="none"),
            show(lab, "sidecar", mode="container:web"),
            show(lab, "sidecar2", mode="container:web", publish=["81:81"]),
            show(lab, "web2", publish=["8080:80"]),
            show(lab, "box", new=("pid", "mnt", "uts"), hostname="box"),
        ]
        print("$ docker network create backend")
        backend = lab.network("backend")
        print(f"  nslab: lab.network('backend')\n  -> bridge {backend.bridge}, subnet {backend.subnet}\n")
        results.append(show(lab, "db", mode="backend"))
    expected = [True, True, True, True, True, True, False, False, True, True]
    print("as Docker would have it:", "yes" if results == expected else f"NO: {results}")
    return 0 if results == expected else 1


if __name__ == "__main__":
    sys.exit(main())

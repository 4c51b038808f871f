"""What every benchmark script shares: the results file and the machine line.

Each script owns one ``## Heading`` section of RESULTS.md and replaces only that, in place,
re-reading the file under a lock right before the write (several may run at once).
"""
from __future__ import annotations

import fcntl
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from nslab.bench import machine_facts  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def machine_line() -> str:
    """CPU, cores, kernel, Python, date and load: recorded with every result."""
    f = machine_facts()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{f['cpu']}, {f['cores']} cores; Linux {f['kernel']}; Python {f['python']}; {f['date']}; "
            f"load average before the run {load} (a shared machine: compare ratios, not absolute times)")


def write_section(text: str, path: pathlib.Path = RESULTS) -> None:
    """Replace (or append) the section whose heading is ``text``'s first line."""
    heading = text.splitlines()[0].rstrip()
    if not heading.startswith("## "):
        raise ValueError(f"a results section starts with '## ', not {heading!r}")
    path.touch(exist_ok=True)
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        old = f.read()
        start = old.find(heading + "\n")
        block = text.rstrip("\n") + "\n"
        if start < 0:
            new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
        else:
            nxt = old.find("\n## ", start + len(heading))
            new = old[:start] + block + ("" if nxt < 0 else "\n" + old[nxt + 1:])
        f.seek(0)
        f.write(new)
        f.truncate()

"""nslab: Docker's network modes (host, bridge, none, container:X), reproduced from the
syscalls up, so every claim about them can be run and measured.

    >>> import nslab
    >>> with nslab.Lab() as lab:                       # a sandbox host; the real one is untouched
    ...     web = lab.spawn(["sleep", "60"], name="web")                 # --network bridge
    ...     top = lab.spawn(["sleep", "60"], mode="host")                # --network host
    ...     print(lab.compare(web, top).table())

The layers, bottom up: :mod:`nslab.namespaces` (nsfs handles), :mod:`nslab.process`
(the clone3 trampoline), :mod:`nslab.hosts` / :mod:`nslab.networks` / :mod:`nslab.firewall`
(Docker's wiring), :mod:`nslab.lab` (what a script holds), :mod:`nslab.evidence` (what a
namespace sees), :mod:`nslab.experiments` (the seed's claims, measured).
"""
from .errors import InputError, NslabError, PortAllocatedError, ResourceExhaustedError, SpawnError
from .lab import Container, Lab
from .namespaces import KINDS, Namespace
from .process import Child, call_in_child
from .publish import PortMapping, parse_publish
from .records import gc, leak_report

__version__ = "0.1.0"
__all__ = ["Lab", "Container", "Namespace", "KINDS", "Child", "call_in_child", "PortMapping",
           "parse_publish", "gc", "leak_report", "NslabError", "InputError", "SpawnError",
           "PortAllocatedError", "ResourceExhaustedError", "__version__"]

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

__version__ = "0.1.0"

# Lazy: `import nslab.process` (and every child of call_in_child) must not pay for pyroute2
# and the whole lab (~0.27 s) when it needs none of it.
_LAZY = {
    "Lab": "lab", "Container": "lab", "Namespace": "namespaces", "KINDS": "namespaces",
    "Child": "process", "call_in_child": "process", "PortMapping": "publish",
    "parse_publish": "publish", "gc": "records", "leak_report": "records",
}
__all__ = sorted(_LAZY) + ["NslabError", "InputError", "SpawnError", "PortAllocatedError",
                           "ResourceExhaustedError", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nslab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""Network modes, spelled as Docker's ``--network`` spells them.

==========================  ===============================================================
``"bridge"``                a fresh netns on the default bridge network (``nslab0``)
``"NAME"``                  a fresh netns on the bridge network NAME (``lab.network(NAME)``)
``"host"``                  no new netns: the child shares the host's
``"none"``                  a fresh netns with only ``lo``, up
``"container:OTHER"``       joins OTHER's netns (OTHER: a container name in the same lab)
==========================  ===============================================================

Parsing is pure: a bad mode is an :class:`~nslab.errors.InputError` before anything in the
kernel changes.
"""
from __future__ import annotations

import dataclasses

from ._names import SAFE_NAME, check_name
from .errors import InputError

__all__ = ["Mode", "parse_mode", "check_container_name", "DEFAULT_NETWORK"]

DEFAULT_NETWORK = "bridge"


def check_container_name(name: object, field: str = "container name") -> str:
    """Docker's container-name rule (``[a-zA-Z0-9][a-zA-Z0-9_.-]+``), at most 64 characters."""
    return check_name(name, field)


@dataclasses.dataclass(frozen=True)
class Mode:
    """A parsed network mode. ``kind`` is bridge, host, none or container."""

    kind: str
    network: str | None = None       # bridge: the network's name
    container: str | None = None     # container: the name of the one whose netns is joined

    @property
    def new_netns(self) -> bool:
        return self.kind in ("bridge", "none")

    def __str__(self) -> str:
        if self.kind == "bridge":
            return self.network or DEFAULT_NETWORK
        if self.kind == "container":
            return f"container:{self.container}"
        return self.kind


def parse_mode(value: object) -> Mode:
    """Parse a ``--network`` value: bridge, host, none, container:NAME, or a network name."""
    if isinstance(value, Mode):
        return value
    if not isinstance(value, str):
        raise InputError("mode", "expected 'bridge', 'host', 'none', 'container:<name>' or a network name",
                         value)
    if value in ("host", "none"):
        return Mode(value)
    if value.startswith("container:"):
        ref = value[len("container:"):]
        if not ref:
            raise InputError("mode", "container: needs the name of a running container", value)
        return Mode("container", container=check_container_name(ref, "mode (container reference)"))
    if value == DEFAULT_NETWORK or value == "default":
        return Mode("bridge", network=DEFAULT_NETWORK)
    if ":" in value:
        raise InputError("mode", "unknown network mode (did you mean container:<name>?)", value)
    if not SAFE_NAME.fullmatch(value):
        raise InputError("mode", "not a network mode nor a valid network name", value)
    return Mode("bridge", network=value)

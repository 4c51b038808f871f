"""Port publishing specs in Docker's syntax, parsed strictly into :class:`PortMapping` values.

Pure parsing: nothing here touches the kernel. One ``PortMapping`` is one host port (or a
pool to pick it from) forwarded to one container port::

    >>> parse_publish("8080:80")
    [PortMapping(container_port=80, proto='tcp', host_port=8080, host_ip=None)]
    >>> parse_publish("127.0.0.1:5353:53/udp")
    [PortMapping(container_port=53, proto='udp', host_port=5353, host_ip=IPv4Address('127.0.0.1'))]
    >>> [format_publish(m) for m in parse_publish("8000-8001:80-81")]
    ['8000:80/tcp', '8001:81/tcp']
    >>> parse_publish("80")          # Docker's `-p 80`: the host port is picked at publish time
    [PortMapping(container_port=80, proto='tcp', host_port=None, host_ip=None)]
    >>> parse_publish("8080:80/sctp")
    InputError: [Errno 22] invalid publish: protocol 'sctp' ... (got '8080:80/sctp')

The syntax is Docker's ``-p``: ``[ip:][hostPort:]containerPort[/tcp|udp]`` where both ports
may be ranges ``a-b``. Equal-length ranges map pairwise. A host range with a single
container port (``8000-8010:80``) is Docker's "range to one port": *one* mapping whose
host port is the first free port of the range, chosen at publish time; nslab keeps it as
``host_port=8000, host_port_end=8010`` and resolves it the same way. Also accepted: a
``PortMapping``, an ``int`` (a container port), a dict (nslab's field names, or Compose's
long syntax ``target``/``published``/``protocol``/``host_ip``), ``None`` (nothing), and a
list/tuple/set/generator of those.

Strict and total: anything else raises :class:`~nslab.errors.InputError` with
``field="publish"``, naming the offending spec. Deliberate differences from Docker:
IPv6 host addresses and ``sctp`` are refused (nslab publishes IPv4 TCP/UDP only); a
trailing ``/`` (``80/``, which Docker reads as tcp) and an empty address (``::80``) are
refused as typos rather than guessed at. ``0.0.0.0`` and host port ``0`` mean "any", as
in Docker, and are normalised to ``None``.

:func:`check_publish_for_mode` holds Docker's rules for the modes that cannot publish.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import warnings
from typing import Any, Iterable

from .errors import InputError

__all__ = ["PortMapping", "parse_publish", "format_publish", "check_publish_for_mode",
           "PublishDiscardedWarning", "HOST_MODE_WARNING", "CONTAINER_MODE_ERROR", "PROTOS"]

PROTOS = ("tcp", "udp")
# Docker's exact wording (daemon/daemon_unix.go, daemon/internal/runconfig/hostconfig.go).
HOST_MODE_WARNING = "Published ports are discarded when using host network mode"
CONTAINER_MODE_ERROR = "conflicting options: port publishing and the container type network mode"

_FIELD = "publish"
_PORT = re.compile(r"[0-9]{1,5}\Z")            # ASCII digits only: int() also takes "٨٠" and " 8"
_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")


def _bad(reason: str, spec: Any) -> InputError:
    return InputError(_FIELD, reason, spec if spec is not None else "None")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PortMapping:
    """One published port: ``host_ip:host_port`` on the host -> ``container_port`` in the child.

    ``host_port=None`` picks a free port from the host namespace's ephemeral range when
    published; ``host_port_end`` (with ``host_port``) picks the first free port of
    ``host_port..host_port_end`` (Docker's ``8000-8010:80``). ``host_ip=None`` means every
    address (``0.0.0.0``). A str ``host_ip`` is converted. Invalid values raise InputError.
    """

    container_port: int
    proto: str = "tcp"
    host_port: int | None = None
    host_ip: ipaddress.IPv4Address | None = None
    host_port_end: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.container_port) or not 1 <= self.container_port <= 65535:
            raise _bad(f"container port must be an int in 1-65535, not {self.container_port!r}",
                       _shown(self))
        if self.proto not in PROTOS:
            raise _bad(f"protocol {self.proto!r} is not supported: use 'tcp' or 'udp'", _shown(self))
        if self.host_port is not None and (not _is_int(self.host_port)
                                           or not 1 <= self.host_port <= 65535):
            raise _bad(f"host port must be an int in 1-65535 or None, not {self.host_port!r}",
                       _shown(self))
        if self.host_port_end is not None:
            if self.host_port is None:
                raise _bad("host_port_end needs host_port (the start of the host port range)",
                           _shown(self))
            if not _is_int(self.host_port_end) or not self.host_port < self.host_port_end <= 65535:
                raise _bad(f"host_port_end must be an int above host_port {self.host_port} "
                           f"and at most 65535, not {self.host_port_end!r}", _shown(self))
        ip = self.host_ip
        if ip is not None:
            if isinstance(ip, str):
                ip = _parse_ip(ip, ip)
            elif isinstance(ip, ipaddress.IPv6Address):
                raise _bad("IPv6 host addresses are not supported: nslab publishes IPv4 only",
                           _shown(self))
            elif not isinstance(ip, ipaddress.IPv4Address):
                raise _bad(f"host_ip must be an IPv4 address or None, not {type(ip).__name__}",
                           _shown(self))
            if ip is not None and ip.is_unspecified:
                ip = None
            object.__setattr__(self, "host_ip", ip)

    @property
    def any_address(self) -> bool:
        """True when published on every host address (``0.0.0.0``)."""
        return self.host_ip is None

    @property
    def bind_ip(self) -> str:
        """The address the host socket binds: ``0.0.0.0`` or ``host_ip``."""
        return "0.0.0.0" if self.host_ip is None else str(self.host_ip)

    def __str__(self) -> str:
        return format_publish(self)

    def __repr__(self) -> str:
        # The range end only when set, so the common case reads like the docs.
        end = f", host_port_end={self.host_port_end}" if self.host_port_end is not None else ""
        return (f"PortMapping(container_port={self.container_port}, proto={self.proto!r}, "
                f"host_port={self.host_port}, host_ip={self.host_ip!r}{end})")


def _shown(m: PortMapping) -> str:
    # Repr for errors raised while the object is half-built (no format_publish on bad values).
    return (f"PortMapping(container_port={m.container_port!r}, proto={m.proto!r}, "
            f"host_port={m.host_port!r}, host_ip={m.host_ip!r}, host_port_end={m.host_port_end!r})")


def format_publish(m: PortMapping) -> str:
    """The Docker spelling of one mapping; ``parse_publish`` reads it back to ``[m]``."""
    if not isinstance(m, PortMapping):
        raise _bad(f"format_publish takes a PortMapping, not {type(m).__name__}", m)
    host = "" if m.host_port is None else str(m.host_port)
    if m.host_port_end is not None:
        host += f"-{m.host_port_end}"
    head = f"{m.host_ip}:{host}:" if m.host_ip is not None else (f"{host}:" if host else "")
    return f"{head}{m.container_port}/{m.proto}"


def parse_publish(spec: Any) -> list[PortMapping]:
    """Every :class:`PortMapping` a publish spec stands for (see the module docstring).

    Raises InputError(field="publish") naming the spec for anything malformed.
    """
    if spec is None:
        return []
    if isinstance(spec, (str, PortMapping, dict)) or _is_int(spec):
        return _parse_one(spec)
    if isinstance(spec, (bytes, bytearray, memoryview)):
        raise _bad("publish specs are str, not bytes: decode it first", spec)
    if isinstance(spec, (list, tuple, set, frozenset)) or _is_iterator(spec):
        out: list[PortMapping] = []
        for index, item in enumerate(list(spec)):
            if not (isinstance(item, (str, PortMapping, dict)) or _is_int(item)):
                raise _bad(f"item {index} is a {type(item).__name__}: each item must be a str, "
                           "int, dict or PortMapping (no nested lists)", item)
            out.extend(_parse_one(item))
        return out
    raise _bad(f"a publish spec is a str like '8080:80/tcp', an int, a dict, a PortMapping or "
               f"a list of those, not {type(spec).__name__}", spec)


def _is_iterator(value: Any) -> bool:
    return hasattr(value, "__next__") and hasattr(value, "__iter__")


def _parse_one(spec: Any) -> list[PortMapping]:
    if isinstance(spec, PortMapping):
        return [spec]
    if _is_int(spec):
        if not 1 <= spec <= 65535:
            raise _bad(f"container port {spec} is out of range 1-65535", spec)
        return [PortMapping(spec)]
    if isinstance(spec, dict):
        return _parse_dict(spec)
    return _parse_str(spec)


_NSLAB_KEYS = {"container_port", "proto", "host_port", "host_ip", "host_port_end"}
_COMPOSE_KEYS = {"target", "published", "protocol", "host_ip", "mode", "name", "app_protocol"}


def _parse_dict(spec: dict) -> list[PortMapping]:
    keys = set(spec)
    if not all(isinstance(k, str) for k in keys):
        raise _bad("dict keys must be str", spec)
    if "container_port" in keys:
        unknown = keys - _NSLAB_KEYS
        if unknown:
            raise _bad(f"unknown key(s) {sorted(unknown)}; expected {sorted(_NSLAB_KEYS)}", spec)
        try:
            return [PortMapping(**spec)]
        except InputError as exc:
            raise _bad(exc.reason, spec) from None
    if "target" in keys:
        # Compose's long syntax: {target: 80, published: "8080", protocol: tcp, host_ip: ...}
        unknown = keys - _COMPOSE_KEYS
        if unknown:
            raise _bad(f"unknown key(s) {sorted(unknown)} in a Compose-style port", spec)
        if spec.get("mode", "ingress") not in ("ingress", "host"):
            raise _bad(f"mode {spec['mode']!r}: Compose knows 'ingress' and 'host'", spec)
        target, published = spec["target"], spec.get("published")
        proto = spec.get("protocol", "tcp")
        if not (_is_int(target) or isinstance(target, str)):
            raise _bad(f"target must be an int or str, not {type(target).__name__}", spec)
        if not (published is None or _is_int(published) or isinstance(published, str)):
            raise _bad(f"published must be an int or str, not {type(published).__name__}", spec)
        if not isinstance(proto, str):
            raise _bad(f"protocol must be a str, not {type(proto).__name__}", spec)
        host_ip = spec.get("host_ip")
        if host_ip is not None and not isinstance(host_ip, str):
            raise _bad(f"host_ip must be a str, not {type(host_ip).__name__}", spec)
        text = f"{target}/{proto}"
        if published is not None and published != "":
            text = f"{published}:{text}"
            if host_ip:
                text = f"{host_ip}:{text}"
        elif host_ip:
            text = f"{host_ip}::{text}"
        try:
            return _parse_str(text)
        except InputError as exc:
            raise _bad(exc.reason, spec) from None
    raise _bad("a dict spec needs 'container_port' (nslab) or 'target' (Compose)", spec)


def _parse_str(spec: str) -> list[PortMapping]:
    if not spec:
        raise _bad("empty spec: expected [ip:][hostPort:]containerPort[/tcp|udp]", spec)
    if spec != spec.strip() or any(c.isspace() for c in spec):
        raise _bad("whitespace is not allowed in a publish spec", spec)
    if not spec.isascii():
        raise _bad("non-ASCII characters in a publish spec", spec)
    if spec.startswith("["):
        raise _bad("IPv6 host addresses are not supported: nslab publishes IPv4 only", spec)

    body, slash, proto = spec.partition("/")
    if slash:
        if not proto:
            raise _bad("missing protocol after '/': write '/tcp' or '/udp', or nothing", spec)
        if "/" in proto:
            raise _bad("more than one '/' in the spec", spec)
        proto = proto.lower()
        if proto not in PROTOS:
            what = "not supported by nslab" if proto == "sctp" else "unknown"
            raise _bad(f"protocol {proto!r} is {what}: use tcp or udp", spec)
    else:
        proto = "tcp"

    parts = body.split(":")
    if len(parts) == 1:
        ip_text, host_text, cont_text = None, "", parts[0]
    elif len(parts) == 2:
        ip_text, host_text, cont_text = None, parts[0], parts[1]
    elif len(parts) == 3:
        ip_text, host_text, cont_text = parts
        if not ip_text:
            raise _bad("empty host address before '::': omit it, or write 0.0.0.0", spec)
    else:
        raise _bad("too many ':' (IPv6 host addresses are not supported; the form is "
                   "[ip:][hostPort:]containerPort[/proto])", spec)

    if not cont_text:
        raise _bad("no container port", spec)
    c_start, c_end = _parse_range(cont_text, "container port", spec, allow_zero=False)
    host_ip = _parse_ip(ip_text, spec) if ip_text is not None else None

    if not host_text:
        return [PortMapping(p, proto, None, host_ip) for p in range(c_start, c_end + 1)]
    h_start, h_end = _parse_range(host_text, "host port", spec, allow_zero=True)
    if h_start == 0:
        # Docker: host port 0 = "pick one"; only as a single port.
        if c_start != c_end:
            raise _bad("host port 0 with a container port range: omit the host port instead", spec)
        return [PortMapping(c_start, proto, None, host_ip)]
    if c_start == c_end:
        end = h_end if h_end != h_start else None
        return [PortMapping(c_start, proto, h_start, host_ip, end)]
    if h_end - h_start != c_end - c_start:
        raise _bad(f"host range {host_text} and container range {cont_text} differ in length "
                   "(a host range may map to a single container port, or to a range of the "
                   "same length)", spec)
    return [PortMapping(c, proto, h, host_ip)
            for c, h in zip(range(c_start, c_end + 1), range(h_start, h_end + 1))]


def _parse_range(text: str, what: str, spec: str, allow_zero: bool) -> tuple[int, int]:
    m = _RANGE.match(text)
    if not m:
        raise _bad(f"{what} {text!r} is not a number or a range like 8000-8010", spec)
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) is not None else start
    low = 0 if allow_zero and m.group(2) is None else 1
    for value in (start, end):
        if not low <= value <= 65535:
            raise _bad(f"{what} {value} is out of range 1-65535", spec)
    if end < start:
        raise _bad(f"{what} range {text} ends before it starts", spec)
    return start, end


def _parse_ip(text: str, spec: Any) -> ipaddress.IPv4Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise _bad(f"host address {text!r} is not an IPv4 address", spec) from None
    if ip.version != 4:
        raise _bad("IPv6 host addresses are not supported: nslab publishes IPv4 only", spec)
    return None if ip.is_unspecified else ip


# --- Docker's rules for the modes that cannot publish ---------------------------------------------
class PublishDiscardedWarning(UserWarning):
    """Published ports were dropped because the child shares the host's network (host mode)."""


def check_publish_for_mode(mode: str, mappings: Iterable[PortMapping] | None,
                           strict: bool = False) -> str | None:
    """Apply Docker's rules for publishing in ``mode``; return the warning text, if any.

    * ``host``: Docker starts the container and discards the ports with the warning
      ``Published ports are discarded when using host network mode`` (moby#35500): this
      returns that text and emits a :class:`PublishDiscardedWarning`. ``strict=True``
      raises InputError instead (what moby#40608 asked for).
    * ``container`` / ``container:NAME``: InputError with Docker's wording
      ``conflicting options: port publishing and the container type network mode``.
    * other modes: nothing to say (None).
    """
    mappings = list(mappings or ())
    if not isinstance(mode, str):
        raise InputError("mode", "a network mode is a str", mode)
    if not mappings:
        return None
    if mode == "host":
        if strict:
            raise InputError(_FIELD, f"{HOST_MODE_WARNING} (strict mode refuses them)",
                             [format_publish(m) for m in mappings])
        warnings.warn(PublishDiscardedWarning(HOST_MODE_WARNING), stacklevel=2)
        return HOST_MODE_WARNING
    if mode == "container" or mode.startswith("container:"):
        raise InputError(_FIELD, CONTAINER_MODE_ERROR, [format_publish(m) for m in mappings])
    return None

"""The one rule for names a user gives nslab: containers, networks, persisted namespaces and
IPAM state files. 1-64 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or
digit — Docker's container-name rule with a length limit, safe as a file name, and nothing a
shell could misread (the kernel itself accepts names like ``x;id``: reliability.md)."""
from __future__ import annotations

import re

from .errors import InputError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SAFE_NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_name(value: object, field: str) -> str:
    """``value`` if it is a safe name, else an InputError naming ``field``. Whole-string
    match: a trailing newline is not a name."""
    if not isinstance(value, str):
        raise InputError(field, "must be a string", value)
    if not SAFE_NAME.fullmatch(value):
        raise InputError(field, SAFE_NAME_RULE, value)
    return value

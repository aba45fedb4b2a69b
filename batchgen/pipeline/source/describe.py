"""How values and exceptions are named in one-line error messages."""
from __future__ import annotations

from typing import Any


def kind_of(v: Any) -> str:
    """'a boolean', 'a list', 'a mapping', 'a str', ...: what a value is, for a message."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return "a " + type(v).__name__


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__

"""ConfigError and the pieces of its one-line messages: where a key was set, what a value is."""
from __future__ import annotations

import difflib
import os
from typing import Any, Iterable


class ConfigError(ValueError):
    """A problem in the job file or its inputs, found before the model loads. str() is one line."""


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of: {', '.join(options)})"


def type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return f"the string '{one_line(v)}'" if len(v) < 40 else "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


class Ctx:
    """Where errors point: the job file and line, or the --set argument that set the key."""

    def __init__(self, where: str, origins: dict[str, str] | None = None,
                 base_dir: str | os.PathLike[str] = ".") -> None:
        self.where, self.base_dir = where, base_dir
        self.origins = origins or {}  # "section.key" (or a section --set created) -> the --set argument

    def loc(self, key: str, line: int | None) -> str:
        origin = self.origins.get(key.split("[", 1)[0])
        if origin is not None:
            return f"--set {one_line(origin)}"
        return f"{self.where}:{line}" if line else self.where

    def err(self, key: str, msg: str, line: int | None) -> ConfigError:
        return ConfigError(f"{self.loc(key, line)}: {key}: {msg}")

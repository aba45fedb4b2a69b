"""YAML that remembers where each key was: a SafeLoader whose mappings keep each key's line (and
each plain scalar's text, so a string key keeps `012345` as written) and refuse duplicate keys."""
from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError


class LinedDict(dict):
    """A YAML mapping plus `lines` (key -> 1-based line) and `texts` (key -> a plain scalar as written)."""

    def __init__(self, data: dict, lines: dict, texts: dict | None = None) -> None:
        super().__init__(data)
        self.lines = lines
        self.texts = texts or {}


class LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps each mapping key's line (and each plain scalar's text) and refuses
    duplicate keys."""


def _construct_mapping(loader: LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    texts: dict[Any, str] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
            texts[key] = value_node.value  # revision: 012345 is the int 5349 to YAML, the text to a string key
    return LinedDict(out, lines, texts)


LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_load(text: str, where: str) -> Any:
    """Parse a job file's text; a syntax error is a one-line ConfigError naming `where` and the line."""
    try:
        return yaml.load(text, Loader=LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = e.problem or e.context or "invalid YAML"
        ctx = f" ({e.context})" if e.context and e.problem else ""
        raise ConfigError(f"{where}{line}: YAML syntax error: {problem}{ctx}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: YAML syntax error: {e}") from None

"""--set section.key=value: overrides applied to the parsed YAML before it is checked."""
from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError, one_line
from .rules import Rule
from .sections import key_rule


def override_value(raw: str, rule: Rule | None) -> Any:
    """A --set value: YAML when it is a plain scalar (0.5, true, null, 'quoted'), or a [list] /
    {mapping} written as such for a key that takes one; otherwise the text as given, so that
    prompt.template=Q: {x} or a template '{prompt}' stays a string instead of becoming a mapping."""
    text = raw.strip()
    if not text:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return raw
    kind = rule.kind if rule is not None else None
    if isinstance(value, (list, dict)):
        wanted = (list,) if kind in ("strlist", "intlist") else (list, dict) if kind == "any" else ()
        return value if isinstance(value, wanted) and text[0] in "[{" else raw
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return raw  # a YAML date or timestamp: the text is what was meant
    if kind == "str" and value is not None and not isinstance(value, str):
        return raw  # --set input.revision=012345 is that text, not the octal int 5349
    return value


def apply_overrides(data: Any, overrides: list[str], where: str) -> dict[str, str]:
    """Apply --set section.key=value overrides to the raw mapping, in place (values: see
    override_value). Returns "section.key" (and any section a --set created) -> its argument."""
    origins: dict[str, str] = {}
    if not overrides or not isinstance(data, dict):
        return origins
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {one_line(item)}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        # a key inside a mapping key (sampling.from_columns.temperature) has no rule of its own
        rule = key_rule(parts[0]) if len(parts) > 2 else key_rule(".".join(parts))
        value = override_value(raw, rule)
        node = data
        for depth, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
                origins.setdefault(".".join(parts[:depth + 1]), item)
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {one_line(item)}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
        origins[".".join(parts)] = item
    return origins

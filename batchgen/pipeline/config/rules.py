"""What a job-file key may hold: one `Rule` per dataclass field, kept in the field's metadata.

The sections (sections.py) declare each key once: type, default, rule and description together,
via `setting(...)`. The checker (values.py) and --set (overrides.py) read the rule back with
`rule_of(field)`; nothing keeps a second table of keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

# The engine's own argument rules (torch-free: validation.py imports torch only inside its device
# and dtype checks), so the job file can't accept what the engine would reject after the model loaded.
from ...engine import validation as engine_rules

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # every int lands in JSON, Parquet or a tensor
INT32_MAX = engine_rules.INT32_MAX  # token counts index int32 device tensors
TOKENS: dict[str, Any] = dict(min=1, max=INT32_MAX)  # a count of tokens (or sequences)

RULE = "batchgen.rule"  # the metadata key


class _Unset:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Unset()  # the default of a key the job file must give

KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "strlist": "a list of strings",
    "intlist": "a list of integers",
    "auto_bool": "auto, true or false",
    "device": "a device name",
    "mapping": "a mapping",
    "schema": "a JSON schema (a mapping, or the path of a .json file)",
    "workers": "a positive integer or all",
}


@dataclass(frozen=True)
class Rule:
    """kind: one of KIND_WORDS or "any". Ranges the engine itself checks (top_k, n, stop,
    stop_token_ids, block_size, ...) are checked with the engine's code (engine_args.py), not
    repeated here. Ints without min/max get the int64 range; floats must be finite."""

    kind: str
    doc: str = ""
    nullable: bool = False  # null is a value
    null_default: bool = False  # null means the default ([] or {})
    scalar_ok: bool = False  # a list key also takes one string
    non_empty: bool = False  # a string key refuses ""
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False, "")}


def setting(default: Any = REQUIRED, *, kind: str, doc: str, factory: Callable[[], Any] | None = None,
            choices: Any = None, **limits: Any) -> Any:
    """A section field with its rule and description: `temperature: float = setting(0.7, kind="float", min=0.0,
    doc=...)`. `factory` builds a mutable default ([] or {})."""
    meta = {RULE: Rule(kind=kind, doc=doc, choices=tuple(choices) if choices is not None else None, **limits)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata[RULE]

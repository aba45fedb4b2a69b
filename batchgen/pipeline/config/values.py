"""One key's value against its Rule (rules.py): the type, the range, the choices; returns the value
as the JobConfig keeps it (a string key keeps `012345` as written, a schema path becomes the schema)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import Ctx, did_you_mean, type_name
from .rules import INT64_MAX, INT64_MIN, KIND_WORDS, Rule

# the devices the engine runs on (engine.py: cpu or cuda); torch.device would take more (mps, xpu, meta)
DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
DEVICE_WORDS = "auto, cpu, cuda or cuda:N"
_INT = Rule(kind="int")  # a list item of an intlist key
MAX_WORKERS = 1024  # engine.data_parallel: processes on one machine (more is surely a slip)


def check_value(ctx: Ctx, key: str, value: Any, rule: Rule, line: int | None, text: str | None = None) -> Any:
    """One key's value against its rule; `text` is the value as written (plain YAML scalars)."""
    kind = rule.kind
    if value is None:
        if rule.nullable or rule.null_default:
            return None
        raise ctx.err(key, f"must be {KIND_WORDS.get(kind, kind)}, got null", line)
    if kind == "any":
        return value
    if kind == "device":
        return check_device(ctx, key, value, line)
    if kind == "mapping":
        if not isinstance(value, dict):
            raise ctx.err(key, f"must be a mapping, got {type_name(value)}", line)
        return plain(value)
    if kind == "schema":
        return check_schema(ctx, key, value, line)
    if kind == "str":
        return check_str(ctx, key, value, rule, line, text)
    if kind == "auto_bool":
        if isinstance(value, bool) or value == "auto":
            return value
        raise ctx.err(key, f"must be auto, true or false, got {type_name(value)}", line)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ctx.err(key, f"must be true or false, got {type_name(value)}", line)
        return value
    if kind in ("int", "float"):
        return check_number(ctx, key, value, rule, line)
    if kind == "workers":
        return check_workers(ctx, key, value, line)
    if kind in ("strlist", "intlist"):
        return check_list(ctx, key, value, rule, line)
    raise AssertionError(kind)


def check_str(ctx: Ctx, key: str, value: Any, rule: Rule, line: int | None, text: str | None) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.err(key, f"must be a string, got {type_name(value)}", line)
    if not isinstance(value, str):
        # e.g. config: 2023 or revision: 012345 parsed as a number: keep the text as written
        value = text if text is not None else str(value)
    if rule.choices is not None and value not in rule.choices:
        raise ctx.err(key, f"'{value}' is not allowed{did_you_mean(value, rule.choices)}", line)
    if value == "" and rule.non_empty:
        raise ctx.err(key, "must not be empty", line)
    return value


def check_number(ctx: Ctx, key: str, value: Any, rule: Rule, line: int | None) -> Any:
    kind = rule.kind
    ok = isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        ok = ok or isinstance(value, float)
    if not ok:
        raise ctx.err(key, f"must be {KIND_WORDS[kind]}, got {type_name(value)}", line)
    if kind == "float":
        try:
            value = float(value)
        except OverflowError:  # an int too big for a float
            value = math.inf
        if not math.isfinite(value):  # NaN passes every < and >, so it must be caught by name
            raise ctx.err(key, f"must be a finite number, got {value}", line)
    lo, hi = rule.min, rule.max
    if kind == "int":  # every int lands in JSON, Parquet or a tensor: int64 at most
        lo = INT64_MIN if lo is None else lo
        hi = INT64_MAX if hi is None else hi
    if lo is not None and (value < lo or (rule.min_exclusive and value == lo)):
        op = ">" if rule.min_exclusive else ">="
        raise ctx.err(key, f"must be {op} {lo}, got {value}", line)
    if hi is not None and value > hi:
        raise ctx.err(key, f"must be <= {hi}, got {value}", line)
    return value


def check_workers(ctx: Ctx, key: str, value: Any, line: int | None) -> int | str:
    """A count of worker processes: an integer >= 1 (at most MAX_WORKERS), or "all"."""
    if value == "all":
        return "all"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.err(key, f"must be {KIND_WORDS['workers']}, got {type_name(value)}", line)
    if not 1 <= value <= MAX_WORKERS:
        raise ctx.err(key, f"must be {KIND_WORDS['workers']} (1 to {MAX_WORKERS}), got {value}", line)
    return value


def check_list(ctx: Ctx, key: str, value: Any, rule: Rule, line: int | None) -> list:
    kind = rule.kind
    if isinstance(value, str) and rule.scalar_ok:
        value = [value]
    if not isinstance(value, list):
        raise ctx.err(key, f"must be {KIND_WORDS[kind]}, got {type_name(value)}", line)
    for i, item in enumerate(value):
        if kind == "strlist" and not isinstance(item, str):
            hint = " (YAML reads yes/no/on/off/true/false as booleans: quote it)" if isinstance(item, bool) else ""
            raise ctx.err(f"{key}[{i}]", f"must be a string, got {type_name(item)}{hint}", line)
        if kind == "intlist":
            check_number(ctx, f"{key}[{i}]", item, _INT, line)
    return list(value)


def check_device(ctx: Ctx, key: str, value: Any, line: int | None) -> str:
    if not isinstance(value, str):
        raise ctx.err(key, f"must be {DEVICE_WORDS}, got {type_name(value)}", line)
    if DEVICE_RE.fullmatch(value):
        return value
    hint = " (did you mean 'cuda'?)" if value.lower().startswith(("gpu", "cuda", "nvidia")) else ""
    raise ctx.err(key, f"'{value}' is not a device batchgen runs on: {DEVICE_WORDS}{hint}", line)


def plain(value: Any) -> Any:
    """A YAML mapping (our line-keeping subclass) as plain dicts and lists: JSON-able, comparable."""
    return json.loads(json.dumps(value, default=str))


def check_schema(ctx: Ctx, key: str, value: Any, line: int | None) -> dict:
    """A JSON schema given inline, or the path of a .json file holding one (read now: the job's fingerprint
    then covers the schema's content, not its file name)."""
    if isinstance(value, dict):
        return plain(value)
    if not isinstance(value, str):
        raise ctx.err(key, f"must be {KIND_WORDS['schema']}, got {type_name(value)}", line)
    path = Path(value) if os.path.isabs(value) else Path(ctx.base_dir) / value
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise ctx.err(key, f"can't read the schema file {value}: {e.strerror or e}", line) from None
    except ValueError as e:
        raise ctx.err(key, f"the schema file {value} is not valid JSON: {e}", line) from None
    if not isinstance(schema, dict):
        raise ctx.err(key, f"the schema file {value} must hold a JSON object, got {type_name(schema)}", line)
    return schema

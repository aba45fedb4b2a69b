"""Does the input fit the job: the columns it reads, their types, and per-row value checks
(ids that can't name a row, values nested too deeply or holding non-text)."""
from __future__ import annotations

import difflib
import math
from typing import Any

import pyarrow as pa

from ..config import ConfigError, JobConfig, template_fields
from .describe import kind_of

# Values of the job's columns nested deeper than this are error rows: deeper values risk Python's
# recursion limit wherever they are copied, encoded or written later.
MAX_DEPTH = 64


def where(cfg: JobConfig, key: str) -> str:
    """The job file location of `key`, for a message (the file itself when unknown)."""
    at = getattr(cfg, "where", None)
    return at(key) if callable(at) else str(cfg.source_path or "job file")


def needed_columns(cfg: JobConfig) -> list[str]:
    """Input columns the job reads, in a stable order."""
    cols: list[str] = []
    pr = cfg.prompt
    for c in ([pr.column] if pr.column else []) + ([pr.messages_column] if pr.messages_column else []):
        cols.append(c)
    if pr.template:
        cols += template_fields(pr.template)
    if cfg.input.id_column:
        cols.append(cfg.input.id_column)
    cols += list(cfg.input.columns)
    # per-row sampling values (sampling.from_columns, json_schema_column): read like any other column
    cols += list(cfg.sampling.from_columns.values())
    if cfg.sampling.json_schema_column:
        cols.append(cfg.sampling.json_schema_column)
    seen: list[str] = []
    for c in cols:
        if c not in seen:
            seen.append(c)
    return seen


def _named_columns(cfg: JobConfig) -> list[tuple[str, str]]:
    """(job file key, column) of every column the job names that must exist in the input."""
    checks: list[tuple[str, str]] = []
    pr = cfg.prompt
    if pr.column:
        checks.append(("prompt.column", pr.column))
    if pr.messages_column:
        checks.append(("prompt.messages_column", pr.messages_column))
    if pr.template:
        checks += [("prompt.template", c) for c in template_fields(pr.template)]
    if cfg.input.id_column:
        checks.append(("input.id_column", cfg.input.id_column))
    checks += [("input.columns", c) for c in cfg.input.columns]
    return checks


def check_columns(cfg: JobConfig, available: list[str], where: str) -> None:
    """Every column the job names must exist in the input; list the ones that do."""
    avail = list(available)
    for key, col in _named_columns(cfg):
        if col not in avail:
            close = difflib.get_close_matches(col, avail, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            shown = ", ".join(avail[:50]) + (" ..." if len(avail) > 50 else "")
            raise ConfigError(
                f"{cfg.source_path}: {key}: column '{col}' is not in {where}{hint}; available columns: {shown or '(none)'}"
            )


def check_id_type(cfg: JobConfig, t: pa.DataType | None, where_: str) -> None:
    """An id names one row: a list, struct or map column can't be one (ConfigError)."""
    if t is None or not cfg.input.id_column:
        return
    if pa.types.is_dictionary(t):
        t = t.value_type
    nested = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
              or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_union(t))
    if nested:
        raise ConfigError(f"{where(cfg, 'input.id_column')}: input.id_column: column '{cfg.input.id_column}' holds "
                          f"{t} values in {where_}; an id must be a string or a number")


def infer_type(values: list[Any]) -> pa.DataType:
    """The arrow type of a column from sample values (string when unknown or all null)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return pa.string()
    try:
        t = pa.array(vals).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return pa.string()
    if pa.types.is_null(t):
        return pa.string()
    return t


def same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Types that give the same output column (an all-null column of one file fits any type)."""
    strings = (pa.string(), pa.large_string())
    return a == b or pa.types.is_null(a) or pa.types.is_null(b) or (a in strings and b in strings)


def _typed_id_problem(value: Any, t: pa.DataType) -> str | None:
    """id_problem for a scalar value and a non-string column type."""
    if pa.types.is_integer(t):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"is {kind_of(value)} ({value!r}), but this input's ids are {t}"
        bits = t.bit_width
        lo, hi = (0, 2**bits - 1) if pa.types.is_unsigned_integer(t) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return None if lo <= value <= hi else f"{value} is out of the range of {t}"
    if pa.types.is_floating(t):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"is {kind_of(value)} ({value!r}), but this input's ids are {t}"
    try:
        pa.array([value], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return f"is {kind_of(value)} ({value!r}), but this input's ids are {t}"
    return None


def id_problem(value: Any, t: pa.DataType | None) -> str | None:
    """Why `value` can't be the id of a row in an id column of type `t` (None: it can).
    The output's id column has that type, so a value it can't hold would be lost there."""
    if value is None:
        return "is null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}"
    if isinstance(value, (list, tuple, dict)):
        return f"is {kind_of(value)}, not a string or a number"
    if t is None or pa.types.is_string(t) or pa.types.is_large_string(t):
        return None  # strings; a number is written as its text
    return _typed_id_problem(value, t)


def value_problem(col: str, value: Any, surrogates: bool = True) -> str | None:
    """Why a value can't travel through the job (None: it can): nested deeper than MAX_DEPTH, or
    a string with an unpaired UTF-16 surrogate (from a JSON \\ud800 escape), which is not text:
    the tokenizer and Parquet (UTF-8) can't take it."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if surrogates and not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return f"column '{col}' holds an unpaired surrogate (\\u{ord(v[e.start]):04x}), which is not text"
            continue
        if isinstance(v, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                return f"column '{col}' is nested deeper than {MAX_DEPTH} levels"
            items = v.values() if isinstance(v, dict) else v
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)  # keys are strings too
            stack.extend((x, depth + 1) for x in items)
    return None

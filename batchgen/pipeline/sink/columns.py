"""The output row schema's one owner: the columns every shard has, how a value is kept in its
column, and the counters of a row's samples."""
from __future__ import annotations

import base64
import json
from typing import Any

import pyarrow as pa

from ..files import OutputError
from .layout import META_KEY

_ARROW_REFUSALS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
                   OverflowError)


TOP_LOGPROB = pa.struct([pa.field("id", pa.int64()), pa.field("logprob", pa.float32())])
KEY = ("id", "sample_index")  # (id, sample_index) names one output row
GENERATED = (("completion", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
             ("completion_tokens", pa.int32()), ("error", pa.string()))
OPTIONAL = {"reasoning": pa.string(), "logprobs": pa.list_(pa.float32()),  # the columns a job may ask for
            "top_logprobs": pa.list_(pa.list_(TOP_LOGPROB))}
OWN_COLUMNS = KEY + tuple(n for n, _ in GENERATED) + tuple(OPTIONAL)  # every column not copied from the input


def output_schema(id_type: pa.DataType, copied: list[tuple[str, pa.DataType]], optional: list[str] = ()) -> pa.Schema:
    """The output's columns: id, sample_index, the copied ones, the generation's, then the optional
    ones the job asked for (in OPTIONAL's order)."""
    fields_ = [pa.field("id", id_type), pa.field("sample_index", pa.int32())]
    fields_ += [pa.field(n, t) for n, t in copied]
    fields_ += [pa.field(n, t) for n, t in GENERATED]
    fields_ += [pa.field(n, t) for n, t in OPTIONAL.items() if n in optional]
    return pa.schema(fields_)


def output_row(row_id: Any, sample_index: int, copied: dict[str, Any], completion: str | None,
               finish_reason: str | None, prompt_tokens: int | None, completion_tokens: int, error: str | None,
               **optional: Any) -> dict[str, Any]:
    """One output row as the shard writer takes it (an optional column left out is null)."""
    return {"id": row_id, "sample_index": sample_index, **copied, "completion": completion,
            "finish_reason": finish_reason, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "error": error, **optional}


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(s: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s)))


def _is_stringy(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def stringify(v: Any) -> str:
    """A value as it is kept in a string column: strings as they are, anything else as JSON."""
    return v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)


def column_value(v: Any, t: pa.DataType) -> tuple[bool, Any]:
    """(fits, value as written) of one value for a column of type t: a string column keeps any
    value (as JSON text); other types must hold it as it is. Never turns a value into null."""
    if v is None:
        return True, None
    if _is_stringy(t):
        return True, stringify(v)
    if isinstance(v, bool) and not pa.types.is_boolean(t):
        return False, v  # JSON true is not the integer 1
    try:
        pa.array([v], type=t)
    except _ARROW_REFUSALS:
        return False, v
    return True, v


def column_array(values: list[Any], t: pa.DataType, name: str) -> pa.Array:
    """One column of a shard; raises OutputError (a bug: values are checked before generation)."""
    try:
        if not _is_stringy(t):
            return pa.array(values, type=t)
        return pa.array([None if v is None else stringify(v) for v in values], type=t)
    except _ARROW_REFUSALS:
        pass
    bad = next(v for v in values if not column_value(v, t)[0])
    # the job checks every value before a row is generated: reaching this is a bug, never a null
    raise OutputError(f"column '{name}': value {bad!r} does not fit its type {t}; nothing was written")


def rows_table(schema: pa.Schema, rows: list[dict], meta: dict) -> pa.Table:
    """A shard's table: `rows` in `schema`'s columns, `meta` as its footer."""
    cols = {f.name: column_array([r.get(f.name) for r in rows], f.type, f.name) for f in schema}
    with_meta = schema.with_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    return pa.Table.from_pydict(cols, schema=with_meta)


def row_stats(groups: list[list[dict]]) -> dict[str, int]:
    """The counters of input rows' output rows (one list of samples per input row), as the run
    loop counts them: prompt tokens only for rows with a sample that did not fail."""
    errors = error_rows = ptoks = ctoks = incomplete = 0
    for rows in groups:
        incomplete += sum(r.get("finish_reason") == "length" for r in rows)
        bad = sum(r.get("error") is not None for r in rows)
        errors += bad
        error_rows += int(bad > 0)
        ok = next((r for r in rows if r.get("error") is None), None)
        ptoks += int((ok or {}).get("prompt_tokens") or 0)
        ctoks += sum(int(r.get("completion_tokens") or 0) for r in rows)
    return {"errors": errors, "error_rows": error_rows, "prompt_tokens": ptoks, "completion_tokens": ctoks,
            "incomplete": incomplete}

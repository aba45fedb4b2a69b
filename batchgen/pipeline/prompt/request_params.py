"""One input row's SamplingParams: the job's sampling section, the row's own values where
`sampling.from_columns` or `sampling.json_schema_column` say so, and the reasoning section's end
where the output splits reasoning off. A bad per-row value fails that row only (RowParamsError,
whose message names the column), never the job.
"""
from __future__ import annotations

import json
from typing import Any

from ..config import JobConfig, sampling_kwargs
from .reasoning import DEFAULT_TAGS


class RowParamsError(ValueError):
    """A row's own sampling value is unusable: the row becomes an error row with this message."""


def _constraint(cfg: JobConfig, row: dict[str, Any] | None) -> dict[str, Any]:
    s = cfg.sampling
    if s.json_schema_column is not None:
        col = s.json_schema_column
        value = (row or {}).get(col)
        if value is None:
            raise RowParamsError(f"column '{col}' (sampling.json_schema_column) is null")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise RowParamsError(f"column '{col}' (sampling.json_schema_column) is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise RowParamsError(f"column '{col}' (sampling.json_schema_column) must hold a JSON schema object, "
                                 f"got {type(value).__name__}")
        return {"json_schema": value}
    kw: dict[str, Any] = {}
    for k in ("json_schema", "regex", "choice", "grammar"):
        if getattr(s, k) is not None:
            kw[k] = getattr(s, k)
    if s.json_object:
        kw["json_object"] = True
    return kw


def request_params(cfg: JobConfig, seed: int, row: dict[str, Any] | None = None) -> Any:
    """SamplingParams for one row (seed: the row's own, a hash of (sampling.seed, id))."""
    from ...engine.request import SamplingParams  # lazily: the engine package imports torch

    s = cfg.sampling
    kw: dict[str, Any] = {**sampling_kwargs(s), "seed": seed}  # the section's fields SamplingParams takes
    overridden: dict[str, str] = {}
    for key, col in s.from_columns.items():
        value = (row or {}).get(col)
        if value is not None:  # null: the job's own value
            kw[key], overridden[key] = value, col
    constraint = _constraint(cfg, row)
    kw.update(constraint)
    if constraint and cfg.output.reasoning == "split":
        kw["reasoning_end"] = (cfg.output.reasoning_tags or DEFAULT_TAGS)[1]
    try:
        return SamplingParams(**kw)
    except ValueError as e:  # the engine's message names the field; say which column it came from
        msg = str(e)
        field = next((k for k in overridden if f"SamplingParams.{k}" in msg or f"{k}=" in msg), None)
        if field is None and not overridden:
            raise  # the job's own values: validated when the job loaded, so this is not the row's fault
        where = f"column '{overridden[field]}' (sampling.from_columns.{field})" if field else "a per-row value"
        raise RowParamsError(f"{where}: {msg}") from None

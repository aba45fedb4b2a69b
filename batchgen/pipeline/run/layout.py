"""What this job's output looks like: its schema, its manifest, the footer every shard carries."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from ..files import now_iso
from ..sink.columns import schema_to_b64
from ..sink.layout import FORMAT_VERSION
from ..sink.manifest import source_sha
from ..config import JobConfig, job_fingerprint, job_identity
from ..sink.columns import output_schema
from ..source.base import Source

def version() -> str:
    try:
        from importlib.metadata import version as package_version

        return package_version("batchgen")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "0+unknown"


def optional_columns(cfg: JobConfig) -> list[str]:
    """Output columns the job asked for beyond the fixed ones: reasoning, logprobs, top_logprobs."""
    asked = {"reasoning": cfg.output.reasoning, "logprobs": cfg.sampling.logprobs,
             "top_logprobs": cfg.sampling.top_logprobs}
    return [name for name, on in asked.items() if on]


def id_column_type(source: Source, id_column: str | None) -> pa.DataType:
    """The output's id type: int64 for row positions, else the input's type of input.id_column
    (the source makes a row whose id that type can't hold an error row, so no id is lost as null)
    when it is a number or a string, widened so that the id a row without one gets from its
    position fits (int64, float64; uint64 as text); another type (dates, bytes...) is kept as text."""
    if not id_column:
        return pa.int64()
    t = source.types.get(id_column)
    if t is None:
        return pa.string()
    if pa.types.is_integer(t):  # int64 holds any narrower int and the negative ids rows get from positions
        return pa.string() if t == pa.uint64() else pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return pa.large_string() if pa.types.is_large_string(t) else pa.string()


def position_id(id_type: pa.DataType, index: int) -> Any:
    """The id of a row that has none (null, or a line that could not be read), from its index in
    the input: unique, and never a real id's look-alike by accident."""
    if pa.types.is_integer(id_type) or pa.types.is_floating(id_type):
        return -(index + 1)
    return f"__batchgen_row_{index}"


def schema(cfg: JobConfig, source: Source) -> pa.Schema:
    copied = [(c, source.types.get(c, pa.string())) for c in cfg.input.columns]
    copied = [(c, pa.string() if pa.types.is_null(t) else t) for c, t in copied]
    return output_schema(id_column_type(source, cfg.input.id_column), copied, optional_columns(cfg))


def manifest(cfg: JobConfig, source: Source, num_tasks: int) -> dict:
    """What binds an output directory to one job: a later run resumes it only when these agree."""
    return {
        "format": FORMAT_VERSION,
        "fingerprint": job_fingerprint(cfg),
        "identity": job_identity(cfg),
        "num_tasks": num_tasks,
        "source": source.identity(),
        "schema": schema_to_b64(schema(cfg, source)),
        "job_file": cfg.source_path,
        "config": cfg.to_dict(),
        "created": now_iso(),
        "batchgen_version": version(),
    }


def footer(cfg: JobConfig, source: Source) -> dict:
    """The metadata every shard carries: enough to tell which job and settings wrote it."""
    d = cfg.to_dict()
    return {
        "format": FORMAT_VERSION,
        "fingerprint": job_fingerprint(cfg),
        "source_sha": source_sha(source.identity()),
        "model": {"path": cfg.model.path, "dtype": cfg.model.dtype},
        "sampling": json.loads(json.dumps(d["sampling"])),
        "prompt": d["prompt"],
        "batchgen_version": version(),
    }

"""Per-row SamplingParams: the job's section, from_columns, json_schema_column, reasoning_end."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from batchgen.pipeline.config import load_job
from batchgen.pipeline.prompt.request_params import RowParamsError, request_params


def job(tmp_path: Path, sampling: str, output: str = "") -> object:
    (tmp_path / "data.jsonl").write_text(json.dumps({"q": "hi"}) + "\n")
    (tmp_path / "job.yaml").write_text(textwrap.dedent(f"""\
        model: {{path: m}}
        input: {{files: [data.jsonl]}}
        prompt: {{column: q}}
        sampling: {sampling}
        output: {{path: out{output}}}
        """))
    return load_job(tmp_path / "job.yaml")


def test_job_values_and_row_overrides(tmp_path: Path) -> None:
    cfg = job(tmp_path, "{temperature: 0.5, max_new_tokens: 20, top_logprobs: 2, from_columns: {temperature: t, max_new_tokens: m}}")
    p = request_params(cfg, 7, {"t": 1.2, "m": 5})
    assert (p.temperature, p.max_new_tokens, p.seed, p.top_logprobs) == (1.2, 5, 7, 2)
    p = request_params(cfg, 7, {"t": None})  # null or missing: the job's value
    assert (p.temperature, p.max_new_tokens) == (0.5, 20)
    with pytest.raises(RowParamsError, match=r"column 't' \(sampling.from_columns.temperature\).*finite"):
        request_params(cfg, 7, {"t": float("nan")})
    with pytest.raises(RowParamsError, match=r"column 'm' \(sampling.from_columns.max_new_tokens\)"):
        request_params(cfg, 7, {"m": "lots"})


def test_schema_column(tmp_path: Path) -> None:
    cfg = job(tmp_path, "{json_schema_column: s}")
    schema = {"type": "object", "required": ["a"]}
    assert request_params(cfg, 1, {"s": json.dumps(schema)}).json_schema == schema
    assert request_params(cfg, 1, {"s": schema}).json_schema == schema
    for bad, words in ((None, "is null"), ("{oops", "not valid JSON"), ("[1]", "JSON schema object")):
        with pytest.raises(RowParamsError, match=words):
            request_params(cfg, 1, {"s": bad})


def test_constraint_and_reasoning_end(tmp_path: Path) -> None:
    p = request_params(job(tmp_path, "{regex: '[0-9]+'}"), 1)
    assert p.regex == "[0-9]+" and p.reasoning_end is None
    p = request_params(job(tmp_path, "{choice: [a, b]}", ", reasoning: split"), 1)
    assert p.choice == ["a", "b"] and p.reasoning_end == "</think>"
    p = request_params(job(tmp_path, "{json_object: true}", ", reasoning: split, reasoning_tags: ['[R]', '[/R]']"), 1)
    assert p.json_object and p.reasoning_end == "[/R]"
    assert request_params(job(tmp_path, "{temperature: 0.1}", ", reasoning: split"), 1).reasoning_end is None

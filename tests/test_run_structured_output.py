"""Structured output, logprobs, reasoning and per-row settings through `batchgen run`.

SmolLM2-135M-Instruct in real `batchgen run` processes with a job-level JSON schema, per-row schemas, a
regex, a choice and a Lark grammar: every completion that finished "stop" validates. The tiny checkpoint, in process, for the extra columns
(logprobs, top_logprobs, reasoning), sampling.from_columns and bad per-row values as error rows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}$"},
                                           "age": {"type": "integer", "minimum": 1, "maximum": 99},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "minItems": 1, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}


def read_rows(out: Path) -> list[dict]:
    import pyarrow.dataset as pads

    ds = pads.dataset(str(out), format="parquet", ignore_prefixes=[".", "_", "README"])  # the card is no shard
    return sorted(ds.to_table().to_pylist(),
                  key=lambda r: (r["id"], r["sample_index"]))


def run_cli(job: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(job), "--progress", "off", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)


@pytest.mark.slow
def test_smollm2_job_schema_and_per_row_schemas_validate(tmp_path: Path, smollm2_dir: Path) -> None:
    (tmp_path / "person.json").write_text(json.dumps(PERSON))
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"q": f"Invent a person (number {i}) as JSON.", "schema": json.dumps(PERSON if i % 2 else CITY)}) + "\n")
    common = (f"model: {{path: {smollm2_dir}}}\ninput: {{files: [in.jsonl]}}\nprompt: {{column: q}}\n"
              "engine: {device: cpu, max_num_seqs: 4, kv_cache_tokens: 4096, max_model_len: 1024}\n")
    (tmp_path / "a.yaml").write_text(common + "output: {path: out-a, dataset_card: true}\n"
                                     "sampling: {json_schema: person.json, max_new_tokens: 64, temperature: 0.7, n: 2}\n")
    (tmp_path / "b.yaml").write_text(common + "output: {path: out-b}\n"
                                     "sampling: {json_schema_column: schema, max_new_tokens: 64, temperature: 0}\n")
    for job in ("a.yaml", "b.yaml"):
        r = run_cli(tmp_path / job)
        assert r.returncode == 0, r.stderr[-3000:]
    rows_a, rows_b = read_rows(tmp_path / "out-a"), read_rows(tmp_path / "out-b")
    done = [r for r in rows_a if r["finish_reason"] == "stop"]
    assert len(rows_a) == 8 and len(done) >= 4, [(r["finish_reason"], r["completion"]) for r in rows_a]
    for r in done:
        jsonschema.validate(json.loads(r["completion"]), PERSON)
    summary = json.loads((tmp_path / "out-a/.batchgen/summary.json").read_text())
    assert summary["constrained_samples"] == 8 and summary["incomplete_samples"] == 8 - len(done)
    assert (tmp_path / "out-a/README.md").read_text().startswith("---\nconfigs:")  # the dataset card
    for r in rows_b:
        assert r["error"] is None
        if r["finish_reason"] == "stop":
            jsonschema.validate(json.loads(r["completion"]), PERSON if r["id"] % 2 else CITY)
    assert sum(r["finish_reason"] == "stop" for r in rows_b) >= 2


@pytest.mark.slow
def test_smollm2_job_regex_choice_and_grammar_validate(tmp_path: Path, smollm2_dir: Path) -> None:
    """sampling.regex, sampling.choice and sampling.grammar (Lark) in real `batchgen run` processes on
    SmolLM2-135M-Instruct: every completion that finished "stop" is in the language asked for."""
    import re

    grammar = 'start: "[" num ("," num)* "]"\nnum: /[0-9]{1,3}/'
    kinds = {  # the job's constraint, what the prompt asks for, the same language as a Python regex
        "regex": ("regex: '[0-9]{4}-[0-9]{2}-[0-9]{2}'", "today's date", r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
        "choice": ("choice: [positive, negative, neutral]", "the sentiment of 'what a lovely day'",
                   r"positive|negative|neutral"),
        "grammar": (f"grammar: {json.dumps(grammar)}", "three small numbers as a list", r"\[[0-9]{1,3}(,[0-9]{1,3})*\]"),
    }
    for name, (line, what, language) in kinds.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(3):
                f.write(json.dumps({"q": f"Question {i}: {what}? Answer briefly."}) + "\n")
        (tmp_path / f"{name}.yaml").write_text(
            f"model: {{path: {smollm2_dir}}}\ninput: {{files: [{name}.jsonl]}}\nprompt: {{column: q}}\n"
            "engine: {device: cpu, max_num_seqs: 4, kv_cache_tokens: 4096, max_model_len: 1024}\n"
            f"output: {{path: out-{name}}}\nsampling: {{{line}, max_new_tokens: 24, temperature: 0.8, n: 2}}\n")
        r = run_cli(tmp_path / f"{name}.yaml")
        assert r.returncode == 0, r.stderr[-3000:]
        rows = read_rows(tmp_path / f"out-{name}")
        done = [row["completion"] for row in rows if row["finish_reason"] == "stop"]
        assert len(rows) == 6 and all(row["error"] is None for row in rows)
        assert len(done) >= 3, (name, [(row["finish_reason"], row["completion"]) for row in rows])
        assert all(re.fullmatch(language, t) for t in done), (name, done)


def test_extra_columns_per_row_values_and_reasoning(tmp_path: Path, tiny_checkpoint) -> None:
    """logprobs / top_logprobs columns, a reasoning column split at the tags, from_columns values per row
    (null: the job's own), and a bad per-row value as an error row naming its column."""
    from batchgen.pipeline.config import load_job
    from batchgen.pipeline.run.job import Job

    rows = [{"q": "alpha beta", "budget": 3, "temp": None}, {"q": "gamma", "budget": 6, "temp": 0.0},
            {"q": "delta", "budget": "many", "temp": None}, {"q": "eps", "budget": None, "temp": None}]
    with open(tmp_path / "in.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (tmp_path / "model").symlink_to(tiny_checkpoint("llama"))
    (tmp_path / "job.yaml").write_text(textwrap.dedent("""\
        model: {path: model}
        input: {files: [in.jsonl]}
        prompt: {column: q, chat_template: false}
        sampling: {max_new_tokens: 5, temperature: 0, ignore_eos: true, logprobs: true, top_logprobs: 3,
                   from_columns: {max_new_tokens: budget, temperature: temp}}
        output: {path: out, reasoning: split, reasoning_tags: ['a', 'b']}
        engine: {device: cpu, max_num_seqs: 4, kv_cache_tokens: 2048}
        """))
    assert Job(load_job(tmp_path / "job.yaml"), progress="off").run() == 0
    out = read_rows(tmp_path / "out")
    assert [r["completion_tokens"] for r in out] == [3, 6, 0, 5]  # budget per row; null: the job's 5
    bad = out[2]
    assert bad["finish_reason"] == "error" and "column 'budget' (sampling.from_columns.max_new_tokens)" in bad["error"]
    for r in (out[0], out[1], out[3]):
        assert len(r["logprobs"]) == r["completion_tokens"] and all(lp <= 1e-6 for lp in r["logprobs"])
        assert len(r["top_logprobs"]) == r["completion_tokens"]
        assert all(len(pos) == 3 and pos[0]["logprob"] >= pos[1]["logprob"] for pos in r["top_logprobs"])
        assert abs(r["top_logprobs"][0][0]["logprob"] - r["logprobs"][0]) < 1e-5  # greedy: the top one
    # the same job without the split: its completions, split at the tags, are exactly the two columns above
    from batchgen.pipeline.prompt.reasoning import split_reasoning

    text = (tmp_path / "job.yaml").read_text().replace("path: out, reasoning: split, reasoning_tags: ['a', 'b']",
                                                       "path: raw")
    (tmp_path / "raw.yaml").write_text(text)
    assert Job(load_job(tmp_path / "raw.yaml"), progress="off").run() == 0
    raw = read_rows(tmp_path / "raw")
    assert "reasoning" not in raw[0]
    for r, w in zip(out, raw):
        if r["error"] is None:
            assert (r["reasoning"], r["completion"]) == split_reasoning(w["completion"], ("a", "b"))
    assert any(r["reasoning"] is not None for r in out), "no completion had a reasoning section to split"

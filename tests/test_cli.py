"""The CLI stays importable and fast (no torch / engine import), and its arguments."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.slurm.array_task import task_from_env

ROOT = Path(__file__).resolve().parents[1]


def test_cli_import_is_light() -> None:
    code = ("import sys, batchgen.cli\nfrom click.testing import CliRunner\n"
            "assert CliRunner().invoke(batchgen.cli.cli, ['--help']).exit_code == 0\n"
            "print([m for m in ('torch', 'transformers', 'datasets', 'batchgen.engine.engine') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_help_lists_run_and_other_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "run" in r.stdout
    r = CliRunner().invoke(cli, ["run", "--help"])
    assert r.exit_code == 0
    for opt in ("--dry-run", "--overwrite", "--task-id", "--num-tasks", "--set", "--progress"):
        assert opt in r.output


def test_task_options_are_checked(tmp_path: Path) -> None:
    job = tmp_path / "j.yaml"
    job.write_text("model: {path: x}\ninput: {files: [a.jsonl]}\nprompt: {column: p}\noutput: {path: o}\n")
    r = CliRunner().invoke(cli, ["run", str(job), "--task-id", "3", "--num-tasks", "2"])
    assert r.exit_code == 2 and "error: --task-id 3 is out of range" in r.output
    r = CliRunner().invoke(cli, ["run", str(job), "--num-tasks", "0"])
    assert r.exit_code == 2 and "--num-tasks must be >= 1" in r.output
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "no such job file" in r.output


def test_task_defaults_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(k, raising=False)
    assert task_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert task_from_env() == (2, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    assert task_from_env() == (1, 4)


def test_retry_errors_flag_regenerates_error_rows(tmp_path: Path, tiny_checkpoint) -> None:
    """`batchgen run --retry-errors` in a real process: rows that failed on a too-small KV cache are generated
    again with a bigger one, and the output then holds each (row, sample) once, none failed."""
    import json

    import pyarrow.dataset as pads

    (tmp_path / "model").symlink_to(tiny_checkpoint("llama"))
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"p": "word " * (3 if i % 2 else 40)}) + "\n")
    (tmp_path / "job.yaml").write_text(
        "model: {path: model}\ninput: {files: [in.jsonl]}\nprompt: {column: p, chat_template: false}\n"
        "sampling: {max_new_tokens: 4, temperature: 0}\noutput: {path: out}\n"
        "engine: {device: cpu, kv_cache_tokens: 32, max_num_seqs: 4}\n")

    def run(*extra: str) -> subprocess.CompletedProcess:
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(tmp_path / "job.yaml"), "--progress",
                               "off", *extra], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)

    def errors() -> list:
        t = pads.dataset(str(tmp_path / "out"), format="parquet").to_table(columns=["id", "error"]).to_pylist()
        assert len(t) == 6 and len({r["id"] for r in t}) == 6
        return sorted(r["id"] for r in t if r["error"])

    r = run()
    assert r.returncode == 0, r.stderr[-2000:]
    assert errors() == [0, 2, 4]
    r = run("--retry-errors", "--set", "engine.kv_cache_tokens=4096")
    assert r.returncode == 0, r.stderr[-2000:]
    assert errors() == []

"""The stop-and-requeue path of an array task, on the real run loop (batchgen.job.Job) with a
fake engine (no model, no cluster): USR1 mid-run -> commit -> `scontrol requeue <job>_<task>`
exactly once -> exit 138; TERM -> commit, no self-requeue -> exit 143; the restarted task
resumes, and the union of all tasks' shards is exactly input x n."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen import slurm
from batchgen.config import load_job
from batchgen.engine.request import CompletionOutput, GenerationRequest, RequestOutput
from batchgen.job import Job
from batchgen.status import read_progress, summarize

N_ROWS, N_SAMPLES, N_TASKS = 30, 2, 3


@pytest.fixture(scope="module")
def tok() -> Any:
    from conftest import build_tokenizer

    return build_tokenizer()


class SignallingEngine:
    """Yields one output per request; after `signal_after` outputs it sends `signum` to this
    process (the handler runs in the main thread, like a signal from Slurm)."""

    def __init__(self, tokenizer: Any, signum: int | None = None, signal_after: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 512
        self.signum, self.signal_after = signum, signal_after
        self.stats = {"gpu_busy_fraction": None}

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestOutput]:
        done = 0
        for r in requests:
            n = r.params.n
            yield RequestOutput(r.request_id, list(r.prompt),
                                [CompletionOutput(j, [7, 8, 9], f"c{r.request_id}-{j}", "length") for j in range(n)])
            done += 1
            if self.signum is not None and done == self.signal_after:
                os.kill(os.getpid(), self.signum)

    def close(self) -> None:
        pass


def make_job(tmp: Path) -> Path:
    pq.write_table(pa.Table.from_pylist([{"rid": f"r{i:03d}", "prompt": f"question {i}"} for i in range(N_ROWS)]),
                   tmp / "in.parquet")
    job = tmp / "job.yaml"
    job.write_text(
        "model:\n  path: unused\n"
        "input:\n  files: [in.parquet]\n  id_column: rid\n"
        "prompt:\n  column: prompt\n  chat_template: false\n"
        f"sampling:\n  max_new_tokens: 4\n  n: {N_SAMPLES}\n"
        "output:\n  path: out\n  rows_per_shard: 4\n  stop_grace_seconds: 0\n"
    )
    return job


def fake_scontrol(tmp: Path, monkeypatch) -> Path:
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp}/scontrol.calls\n')
    (bindir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return tmp / "scontrol.calls"


def run_task(job_file: Path, tok: Any, task: int, engine: Any, env: dict, **kw: Any) -> tuple[int, Job]:
    if kw.get("engine_factory"):
        job = Job(load_job(job_file), task_id=task, num_tasks=N_TASKS, tokenizer=tok, progress="off", **kw)
    else:
        job = Job(load_job(job_file), task_id=task, num_tasks=N_TASKS, engine=engine, tokenizer=tok, progress="off")
    slurm.attach_to_job(job, env)
    try:
        return job.run(), job
    finally:
        slurm.restore_signals()


def all_output(out: Path) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    for p in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(p, columns=["id", "sample_index"])
        keys += list(zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist()))
    return keys


def test_usr1_commits_requeues_once_and_resumes(tmp_path, tok, monkeypatch):
    job_file = make_job(tmp_path)
    calls = fake_scontrol(tmp_path, monkeypatch)
    env = {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "43"}

    # task 1 gets USR1 after 5 rows
    code, job = run_task(job_file, tok, 1, SignallingEngine(tok, signal.SIGUSR1, 5), env)
    assert code == 128 + signal.SIGUSR1 and job.stopped_by == signal.SIGUSR1
    assert calls.read_text() == "requeue 41_1\n"  # once, after the final commit
    (p1,) = [p for p in read_progress(tmp_path / "out") if p.task_id == 1]
    assert p1.state == "stopped" and 5 <= p1.rows_done < 10
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # restore_signals()

    # task 2 gets TERM (preemption / scontrol requeue by someone else): no self-requeue
    code, job = run_task(job_file, tok, 2, SignallingEngine(tok, signal.SIGTERM, 3), env | {"SLURM_ARRAY_TASK_ID": "2"})
    assert code == 128 + signal.SIGTERM
    assert calls.read_text() == "requeue 41_1\n"

    # task 0 runs through; then tasks 1 and 2 restart (SLURM_RESTART_COUNT=1) and resume
    assert run_task(job_file, tok, 0, SignallingEngine(tok), env | {"SLURM_ARRAY_TASK_ID": "0"})[0] == 0
    s = summarize(read_progress(tmp_path / "out"))
    assert not s.complete
    for t in (1, 2):
        code, _ = run_task(job_file, tok, t, SignallingEngine(tok), env | {"SLURM_ARRAY_TASK_ID": str(t),
                                                                           "SLURM_RESTART_COUNT": "1"})
        assert code == 0
    keys = all_output(tmp_path / "out")
    assert len(keys) == len(set(keys)) == N_ROWS * N_SAMPLES
    assert set(keys) == {(f"r{i:03d}", j) for i in range(N_ROWS) for j in range(N_SAMPLES)}
    s = summarize(read_progress(tmp_path / "out"))
    assert s.complete and s.rows_done == N_ROWS and s.num_tasks == N_TASKS
    assert calls.read_text() == "requeue 41_1\n"


def test_signal_while_the_model_loads_stops_and_requeues(tmp_path, tok, monkeypatch):
    """USR1 before the generation loop (Job's own handlers are not installed yet): the task
    must not die of USR1's default action; it stops, commits nothing, requeues, exits 138."""
    job_file = make_job(tmp_path)
    calls = fake_scontrol(tmp_path, monkeypatch)
    env = {"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "0"}

    def slow_load(cfg):
        os.kill(os.getpid(), signal.SIGUSR1)  # the time-limit warning, mid-load
        return SignallingEngine(tok)

    code, job = run_task(job_file, tok, 0, None, env, engine_factory=slow_load)
    assert code == 128 + signal.SIGUSR1 and job.stopped_by == signal.SIGUSR1
    assert calls.read_text() == "requeue 9_0\n"
    assert all_output(tmp_path / "out") == []
    # and a TERM during the final commit / after the requeue is harmless once attached
    code, job = run_task(job_file, tok, 0, SignallingEngine(tok, signal.SIGTERM, 2), env)
    assert code == 128 + signal.SIGTERM
    code, _ = run_task(job_file, tok, 0, SignallingEngine(tok), env | {"SLURM_RESTART_COUNT": "2"})
    assert code == 0
    keys = all_output(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 10 * N_SAMPLES

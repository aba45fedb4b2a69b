"""The stop-and-requeue path of an array task, on the real run loop (batchgen.pipeline.run.job.Job) and the
real engine on a tiny random-weight checkpoint (no cluster: a stub scontrol): USR1 mid-run ->
commit -> `scontrol requeue <job>_<task>` exactly once -> exit 138; TERM -> commit, no
self-requeue -> exit 143; the restarted task resumes, and the union of all tasks' shards is
exactly input x n, with the same completions as an uninterrupted single-task run."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from engine_tap import EngineTap

from batchgen import slurm
from batchgen.pipeline.config import load_job
from batchgen.engine.engine import Engine
from batchgen.engine.request import GenerationRequest, RequestOutput
from batchgen.pipeline.run.job import Job
from batchgen.pipeline.run.engine_setup import make_engine
from batchgen.slurm.status import read_progress
from batchgen.slurm.status_view import summarize

N_ROWS, N_SAMPLES, N_TASKS = 30, 2, 3
# a few rows at a time: outputs arrive over many steps
ENGINE = dict(device="cpu", max_num_seqs=4, max_batch_tokens=256)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("smollm2")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[Engine]:
    """Shared by the runs that end with the engine drained (run to the end). A signal with
    stop_grace_seconds 0 abandons in-flight rows inside the engine: those runs get their own."""
    eng = Engine.from_pretrained(str(checkpoint), dtype="float32", **ENGINE)
    yield eng
    assert not eng.scheduler.has_work(), "a run left work in the shared engine"
    eng.close()


def Signalling(engine: Engine, signum: int | None = None, signal_after: int = 0) -> EngineTap:
    """The real engine; once `signal_after` outputs reached the job it sends `signum` to this
    process (the handler runs in the main thread, like a signal from Slurm)."""
    def send(k: int) -> None:
        if signum is not None and k == signal_after:
            os.kill(os.getpid(), signum)

    return EngineTap(engine, on_output=send)


def own_engine(job_file: Path, signum: int, signal_after: int) -> EngineTap:
    """A fresh engine, loaded the way the job loads one (make_engine from the job file)."""
    return Signalling(make_engine(load_job(job_file)), signum, signal_after)


def make_job(tmp: Path, checkpoint: Path, out: str = "out") -> Path:
    if not (tmp / "in.parquet").exists():
        pq.write_table(pa.Table.from_pylist([{"rid": f"r{i:03d}", "prompt": f"question {i}"} for i in range(N_ROWS)]),
                       tmp / "in.parquet")
    job = tmp / f"{out}.yaml"
    job.write_text(
        f"model:\n  path: {checkpoint}\n  dtype: float32\n"
        "input:\n  files: [in.parquet]\n  id_column: rid\n"
        "prompt:\n  column: prompt\n  chat_template: false\n"
        f"sampling:\n  max_new_tokens: 4\n  n: {N_SAMPLES}\n"
        f"output:\n  path: {out}\n  rows_per_shard: 4\n  stop_grace_seconds: 0\n"
        "engine: {" + ", ".join(f"{k}: {v}" for k, v in ENGINE.items()) + "}\n"
    )
    return job


def fake_scontrol(tmp: Path, monkeypatch) -> Path:
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp}/scontrol.calls\n')
    (bindir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return tmp / "scontrol.calls"


def run_task(job_file: Path, task: int, engine: Any, env: dict, **kw: Any) -> tuple[int, Job]:
    """engine None: the job loads its own (engine_factory in kw, else make_engine)."""
    job = Job(load_job(job_file), task_id=task, num_tasks=N_TASKS, engine=engine, progress="off", **kw)
    slurm.attach_to_job(job, env)
    try:
        return job.run(), job
    finally:
        slurm.restore_signals()


def all_output(out: Path) -> list[tuple[str, int]]:
    return list(completions(out))


def completions(out: Path) -> dict[tuple[str, int], tuple]:
    """(id, sample_index) -> (completion, finish_reason, completion_tokens); asserts no key twice."""
    got: dict[tuple[str, int], tuple] = {}
    for p in sorted(out.glob("part-*.parquet")):
        for r in pq.read_table(p).to_pylist():
            k = (r["id"], r["sample_index"])
            assert k not in got, f"{k} written twice"
            got[k] = (r["completion"], r["finish_reason"], r["completion_tokens"])
    return got


def reference(tmp: Path, checkpoint: Path, engine: Engine) -> dict[tuple[str, int], tuple]:
    """The same job, uninterrupted, as one task."""
    ref = make_job(tmp, checkpoint, "ref")
    assert Job(load_job(ref), engine=engine, progress="off").run() == 0
    return completions(tmp / "ref")


def test_usr1_commits_requeues_once_and_resumes(tmp_path, checkpoint, engine, monkeypatch):
    job_file = make_job(tmp_path, checkpoint)
    calls = fake_scontrol(tmp_path, monkeypatch)
    env = {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "43"}

    # task 1 gets USR1 after 5 rows
    code, job = run_task(job_file, 1, own_engine(job_file, signal.SIGUSR1, 5), env)
    assert code == 128 + signal.SIGUSR1 and job.stopped_by == signal.SIGUSR1
    assert calls.read_text() == "requeue 41_1\n"  # once, after the final commit
    assert job.rows_committed_this_run >= 5
    (p1,) = [p for p in read_progress(tmp_path / "out") if p.task_id == 1]
    assert p1.state == "stopped" and 5 <= p1.rows_done < 10
    assert len(all_output(tmp_path / "out")) == p1.rows_done * N_SAMPLES
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # restore_signals()

    # task 2 gets TERM (preemption / scontrol requeue by someone else): no self-requeue
    code, job = run_task(job_file, 2, own_engine(job_file, signal.SIGTERM, 3), env | {"SLURM_ARRAY_TASK_ID": "2"})
    assert code == 128 + signal.SIGTERM
    assert calls.read_text() == "requeue 41_1\n"

    # task 0 runs through; then tasks 1 and 2 restart (SLURM_RESTART_COUNT=1) and resume
    assert run_task(job_file, 0, Signalling(engine), env | {"SLURM_ARRAY_TASK_ID": "0"})[0] == 0
    s = summarize(read_progress(tmp_path / "out"))
    assert not s.complete
    for t in (1, 2):
        code, _ = run_task(job_file, t, Signalling(engine), env | {"SLURM_ARRAY_TASK_ID": str(t),
                                                                   "SLURM_RESTART_COUNT": "1"})
        assert code == 0
    keys = all_output(tmp_path / "out")
    assert len(keys) == len(set(keys)) == N_ROWS * N_SAMPLES
    assert set(keys) == {(f"r{i:03d}", j) for i in range(N_ROWS) for j in range(N_SAMPLES)}
    # stopped, resumed and split over tasks: the same completions as one uninterrupted run
    assert completions(tmp_path / "out") == reference(tmp_path, checkpoint, engine)
    s = summarize(read_progress(tmp_path / "out"))
    assert s.complete and s.rows_done == N_ROWS and s.num_tasks == N_TASKS
    assert calls.read_text() == "requeue 41_1\n"


def test_signal_while_the_model_loads_stops_and_requeues(tmp_path, checkpoint, engine, monkeypatch, capsys):
    """USR1 before the generation loop (Job's own handlers are not installed yet): the task
    must not die of USR1's default action; it stops, commits nothing, requeues, exits 138."""
    job_file = make_job(tmp_path, checkpoint)
    calls = fake_scontrol(tmp_path, monkeypatch)
    env = {"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "0"}
    loaded = []

    def slow_load(cfg):
        os.kill(os.getpid(), signal.SIGUSR1)  # the time-limit warning, mid-load
        loaded.append(make_engine(cfg))
        return loaded[-1]

    code, job = run_task(job_file, 0, None, env, engine_factory=slow_load)
    assert code == 128 + signal.SIGUSR1 and job.stopped_by == signal.SIGUSR1
    assert len(loaded) == 1 and loaded[0].stats.requests == 0  # the model loaded, nothing was admitted
    assert calls.read_text() == "requeue 9_0\n"
    assert all_output(tmp_path / "out") == []
    # the restarted task is warned mid-load again: nothing committed twice in a row -> no requeue loop
    code, job = run_task(job_file, 0, None, env | {"SLURM_RESTART_COUNT": "1"}, engine_factory=slow_load)
    assert code == 128 + signal.SIGUSR1 and job.rows_committed_this_run == 0
    assert calls.read_text() == "requeue 9_0\n"
    assert "not requeueing 9_0: restart 1 committed no rows" in capsys.readouterr().err
    # and a TERM during the final commit / after the requeue is harmless once attached
    code, job = run_task(job_file, 0, own_engine(job_file, signal.SIGTERM, 2), env)
    assert code == 128 + signal.SIGTERM
    code, _ = run_task(job_file, 0, Signalling(engine), env | {"SLURM_RESTART_COUNT": "2"})
    assert code == 0
    keys = all_output(tmp_path / "out")
    assert len(keys) == len(set(keys)) == 10 * N_SAMPLES
    ref = reference(tmp_path, checkpoint, engine)
    assert completions(tmp_path / "out") == {k: v for k, v in ref.items() if k in set(keys)}

"""Data parallel without running a model: the plan (workers, devices, tasks), the refusals (one line,
exit 2, nothing written), the progress summed from TaskProgress files and ledgers, the one-stop-per-
signal rule of a worker, and the job identity that data_parallel does not touch. The runs themselves
are tests/test_data_parallel.py."""
from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.pipeline.config import ConfigError, job_fingerprint, job_identity, load_job
from batchgen.pipeline.parallel import aggregate, plan
from batchgen.pipeline.parallel.plan import Slot, parse_workers, plan_run
from batchgen.pipeline.parallel.workers import WorkerArgs, worker_env
from batchgen.pipeline.run.stopping import StopControl
from batchgen.pipeline.sink.ledger import LedgerFile, ShardRecord
from batchgen.pipeline.task_progress import TaskProgress

JOB = """\
model: {path: some-model}
input: {files: [data.jsonl]}
prompt: {column: prompt}
output: {path: out}
engine: {device: cpu}
"""


def write_job(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"hi {i}"}) + "\n" for i in range(8)))
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(JOB) + extra)
    return job


def cfg_of(tmp_path: Path, extra: str = "", overrides: list[str] | None = None):
    return load_job(write_job(tmp_path, extra), overrides or [])


def existing_output(tmp_path: Path, cfg, num_tasks: int) -> Path:
    """An output of this job with `num_tasks` tasks and committed rows (a ledger line)."""
    out = tmp_path / "out" / ".batchgen"
    (out / "ledger").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"fingerprint": job_fingerprint(cfg), "num_tasks": num_tasks,
                                                   "identity": job_identity(cfg)}))
    (out / "ledger" / "task-00000.jsonl").write_text("{}\n")
    return out.parent


# ------------------------------------------------------------------------- values
@pytest.mark.parametrize("text, value", [("2", 2), (" 4 ", 4), ("all", "all"), ("ALL", "all")])
def test_parse_workers(text, value):
    assert parse_workers(text) == value


@pytest.mark.parametrize("text, msg", [("0", "got 0"), ("-1", "got -1"), ("x", "got the string 'x'"),
                                       ("1.5", "got the string '1.5'"), ("2000", "1 to 1024")])
def test_parse_workers_refuses(text, msg):
    with pytest.raises(ConfigError, match="must be a positive integer or all") as e:
        parse_workers(text)
    assert str(e.value).startswith(f"--data-parallel {text}: engine.data_parallel: ") and msg in str(e.value)


def test_the_key_and_its_refusals(tmp_path):
    assert cfg_of(tmp_path).engine.data_parallel == 1
    assert cfg_of(tmp_path, overrides=["engine.data_parallel=all"]).engine.data_parallel == "all"
    assert cfg_of(tmp_path, overrides=["engine.data_parallel=3"]).engine.data_parallel == 3
    job = write_job(tmp_path)
    job.write_text(job.read_text().replace("engine: {device: cpu}", "engine: {device: cpu, data_parallel: 0}"))
    with pytest.raises(ConfigError, match=r"job.yaml:5: engine.data_parallel: must be a positive integer or all"):
        load_job(job)
    for bad in ("true", "2.0", "[2]", "some"):
        with pytest.raises(ConfigError, match=r"--set engine.data_parallel=.*: engine.data_parallel: must be"):
            cfg_of(tmp_path, overrides=[f"engine.data_parallel={bad}"])


@pytest.mark.parametrize("args", [["--data-parallel", "0"], ["--data-parallel", "two"],
                                  ["--set", "engine.data_parallel=-2"], ["--data-parallel", "2", "--dry-run"]])
def test_cli_refuses_bad_values_in_one_line_writing_nothing(tmp_path, args):
    job = write_job(tmp_path)
    if "--dry-run" in args:  # a bad value in the job file, with a good flag: the file is still checked
        job.write_text(job.read_text().replace("engine: {device: cpu}", "engine: {device: cpu, data_parallel: x}"))
    r = CliRunner().invoke(cli, ["run", str(job), *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "engine.data_parallel" in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_data_parallel_is_not_part_of_the_job(tmp_path):
    """How the job runs, not what it computes: a job run with 2 workers is resumed by 1, and back."""
    a, b = cfg_of(tmp_path), cfg_of(tmp_path, overrides=["engine.data_parallel=4"])
    assert job_fingerprint(a) == job_fingerprint(b) and job_identity(a) == job_identity(b)


# ------------------------------------------------------------------------- the plan
def test_plan_on_the_cpu_splits_the_cores(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path)
    monkeypatch.setattr(plan, "usable_cpus", lambda: [0, 1, 2, 3, 4])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(plan, "cpu_threads", lambda requested=None: 5)
    p = plan_run(cfg, 2, (0, 1), own_share=False)
    assert p is not None and not p.inline and p.tasks == [0, 1] and p.num_tasks == 2
    assert [s.cpus for s in p.slots] == [(0, 1), (2, 3, 4)] and [s.threads for s in p.slots] == [2, 3]
    assert all(s.device == "cpu" and s.gpu == "" for s in p.slots)  # no GPU is visible to a CPU worker
    assert "2 worker processes, tasks 0-1 of 2" in p.describe() and "worker 1: cpu, cores 2-4, 3 threads" in p.describe()
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the scheduler's count is split, not the cores'
    assert [s.threads for s in plan_run(cfg, 2, (0, 1), own_share=False).slots] == [2, 2]
    assert plan_run(cfg, "all", (0, 1), own_share=False) is None  # all on the CPU: one process
    assert plan_run(cfg, 1, (0, 1), own_share=False) is None
    many = plan_run(cfg, 8, (0, 1), own_share=False)
    assert many.workers == 8 and all(s.cpus is None and s.threads == 1 for s in many.slots)
    assert "8 CPU workers on 5 core(s)" in many.notes[0]


def test_plan_splits_this_tasks_share(tmp_path):
    """Task 1 of 3 (a Slurm array task, or --task-id/--num-tasks) with 2 workers: tasks 2 and 3 of 6."""
    p = plan_run(cfg_of(tmp_path), 2, (1, 3), own_share=True)
    assert p.tasks == [2, 3] and p.num_tasks == 6 and p.share == (1, 3)
    assert plan_run(cfg_of(tmp_path), 1, (1, 3), own_share=True) is None  # a plain task


def test_plan_keeps_the_outputs_task_count(tmp_path):
    cfg = cfg_of(tmp_path)
    existing_output(tmp_path, cfg, 4)
    one = plan_run(cfg, 1, (0, 1), own_share=False)  # a plain rerun of a 4-task output: its tasks, one at a time
    assert one.tasks == [0, 1, 2, 3] and one.num_tasks == 4 and one.workers == 1
    assert "has 4 tasks (fixed when it was started): they run 1 at a time" in one.notes[0]
    two = plan_run(cfg, 2, (0, 1), own_share=False)
    assert two.tasks == [0, 1, 2, 3] and two.workers == 2 and "queued" in two.describe()
    assert plan_run(cfg, 8, (0, 1), own_share=False).workers == 4  # no more workers than tasks
    assert plan_run(cfg, 2, (1, 2), own_share=True).tasks == [2, 3]  # 2 x 2 = 4: as it was started
    with pytest.raises(ConfigError, match="written by 4 task"):
        plan_run(cfg, 3, (0, 2), own_share=True)  # a share of its own can't re-split it
    fresh = plan_run(cfg, 2, (0, 1), own_share=False, overwrite=True)  # --overwrite: a new output
    assert fresh.tasks == [0, 1] and fresh.num_tasks == 2


def test_plan_refuses_another_jobs_output_before_any_worker(tmp_path):
    cfg = cfg_of(tmp_path)
    existing_output(tmp_path, cfg, 2)
    other = cfg_of(tmp_path, overrides=["sampling.temperature=0.1"])
    with pytest.raises(ConfigError, match=r"holds a different job \(changed: sampling.temperature 0.7 -> 0.1\)"):
        plan_run(other, 2, (0, 1), own_share=False)
    assert plan_run(other, 1, (0, 1), own_share=False) is None  # a plain run says it itself, as before


def test_plan_on_gpus(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path, overrides=["engine.device=auto"])
    monkeypatch.setattr(plan, "uses_cuda", lambda cfg: True)
    monkeypatch.setattr(plan, "visible_gpus", lambda: ["3", "5", "7"])
    monkeypatch.setattr(plan, "cpu_threads", lambda requested=None: 12)
    p = plan_run(cfg, "all", (0, 1), own_share=False)
    assert [s.gpu for s in p.slots] == ["3", "5", "7"] and [s.threads for s in p.slots] == [4, 4, 4]
    assert "worker 2: GPU 7, 4 threads" in p.describe()
    assert [s.gpu for s in plan_run(cfg, 2, (0, 1), own_share=False).slots] == ["3", "5"]
    with pytest.raises(ConfigError, match=r"engine.data_parallel: 4 needs 4 GPU\(s\), one per worker, but 3 are"):
        plan_run(cfg, 4, (0, 1), own_share=False)
    pinned = cfg_of(tmp_path, overrides=["engine.device=cuda:1"])
    with pytest.raises(ConfigError, match="engine.device: cuda:1 names one GPU"):
        plan_run(pinned, 2, (0, 1), own_share=False)
    assert plan_run(pinned, "all", (0, 1), own_share=False) is None


def test_plan_gives_each_worker_its_tensor_parallel_gpus(tmp_path, monkeypatch):
    """data_parallel x tensor_parallel on one node: 4 visible GPUs, tensor_parallel 2 -> 2 workers of 2 GPUs."""
    cfg = cfg_of(tmp_path, overrides=["engine.device=auto", "engine.tensor_parallel=2"])
    monkeypatch.setattr(plan, "uses_cuda", lambda cfg: True)
    monkeypatch.setattr(plan, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(plan, "cpu_threads", lambda requested=None: 8)
    p = plan_run(cfg, "all", (0, 1), own_share=False)
    assert [s.gpu for s in p.slots] == ["0,1", "2,3"] and "worker 1: GPUs 2,3" in p.describe()
    with pytest.raises(ConfigError, match=r"data_parallel: 3 needs 6 GPU\(s\), 2 per worker \(engine.tensor_parallel\)"):
        plan_run(cfg, 3, (0, 1), own_share=False)


def test_submit_runs_one_worker_per_tensor_parallel_group(tmp_path):
    from batchgen.slurm.submit import SubmitOptions, data_parallel_of

    cfg = cfg_of(tmp_path, overrides=["engine.device=auto", "engine.tensor_parallel=2"])
    assert data_parallel_of(cfg, SubmitOptions(tasks=1, gpus_per_task=8)) == 4
    with pytest.raises(click.UsageError, match="needs 6 GPUs per task"):
        data_parallel_of(cfg, SubmitOptions(tasks=1, gpus_per_task=4, data_parallel=3))


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert plan.visible_gpus({}) == ["0", "1"]
    assert plan.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}) == ["GPU-aa", "GPU-bb"]
    assert plan.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,-1,5"}) == ["4"]  # CUDA stops at an invalid entry
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan.visible_gpus({"CUDA_VISIBLE_DEVICES": "0"}) == []


def test_worker_command_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    argv = WorkerArgs("job.yaml", ["sampling.n=2"], overwrite=True, log_interval=5).argv(3, 4)
    assert argv[1:] == ["-m", "batchgen.cli", "run", str(Path("job.yaml").resolve()), "--task-id", "3",
                        "--num-tasks", "4", "--worker", "--progress", "log", "--log-interval", "5",
                        "--set", "sampling.n=2", "--overwrite"]
    env = worker_env(Slot(1, "cuda", "2", None, 8))
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["OMP_NUM_THREADS"] == "8"
    assert env["PYTHONPATH"].split(":")[0] == str(Path(plan.__file__).resolve().parents[3])  # the same batchgen
    assert worker_env(Slot(0, "cpu", "", (0,), 1))["CUDA_VISIBLE_DEVICES"] == ""


# ------------------------------------------------------------------------- progress, summed
def write_progress(out: Path, **fields) -> None:
    TaskProgress.now(**fields).write(out / ".batchgen" / "progress" / f"task-{fields['task_id']:05d}.json")


def test_totals_from_task_progress_files(tmp_path):
    out = tmp_path / "out"
    write_progress(out, task_id=0, num_tasks=3, state="running", rows_done=5, rows_total=10, output_tokens=50,
                   errors=1, shards=2, tok_s=100.0, pid=111)
    write_progress(out, task_id=1, num_tasks=3, state="done", rows_done=10, rows_total=10, output_tokens=80, shards=3,
                   tok_s=40.0, pid=222)
    progress = aggregate.read_tasks(out, [0, 1, 2])
    assert progress[2] is None
    t = aggregate.totals(progress, running={0: 111, 2: 333})
    assert (t.rows_done, t.rows_total, t.output_tokens, t.errors, t.shards) == (15, None, 130, 1, 5)
    assert t.tok_s == 100.0 and t.generating == 1  # a done task adds no rate
    assert t.state_line() == "1 running, 1 starting, 1 done"
    write_progress(out, task_id=2, num_tasks=3, state="loading", rows_total=10, pid=333)
    t = aggregate.totals(aggregate.read_tasks(out, [0, 1, 2]), running={0: 111, 2: 333})
    assert t.rows_total == 30 and t.state_line() == "1 running, 1 loading, 1 done"
    # an earlier run's file (another pid) is not the new worker's; a running file without a worker is stopped
    t = aggregate.totals(aggregate.read_tasks(out, [0, 1, 2]), running={0: 999})
    assert t.tok_s == 0 and t.state_line() == "1 starting, 1 done, 1 stopped"
    # a total counted under another input.limit is not this run's
    assert aggregate.totals(aggregate.read_tasks(out, [0, 1, 2]), running={}, limit=5).rows_total is None


def test_combined_summary_from_summaries_and_ledgers(tmp_path):
    out = tmp_path / "out"
    done = {"rows": 10, "samples": 20, "errors": 2, "error_rows": 1, "prompt_tokens": 100, "output_tokens": 300,
            "wall_s": 4.0, "total_wall_s": 5.0, "output_tok_s": 75.0, "gpu_busy_pct": None, "shards": 3}
    write_progress(out, task_id=0, num_tasks=2, state="done", rows_done=10, summary=done)
    write_progress(out, task_id=1, num_tasks=2, state="running", rows_done=4, total_wall_s=2.0, tok_s=30.0,
                   run_started_unix=100.0, updated_unix=103.0)
    led = LedgerFile(out, out / ".batchgen/ledger/task-00001.jsonl")
    led.append(ShardRecord(name="part-t00001-000000.parquet", task=1, seq=0, rows=4, samples=8, prompt_tokens=40,
                           completion_tokens=90, errors=0))
    led.close()
    d = aggregate.combined_summary(out, [0, 1], cost_per_hour=2.0, wall_s=9.0)
    assert (d["rows"], d["samples"], d["errors"], d["prompt_tokens"], d["output_tokens"]) == (14, 28, 2, 140, 390)
    assert d["done_tasks"] == 1 and d["shards"] == 4 and d["wall_s"] == 9.0 and d["total_wall_s"] == 7.0
    assert d["usd_total"] == pytest.approx(2.0 * 7.0 / 3600, rel=1e-3)
    from batchgen.pipeline.run.summary import format_summary

    assert "rows            14 (28 samples)" in format_summary(d)


def test_progress_learns_its_total_and_shows_the_workers():
    import io

    from batchgen.pipeline.progress import Progress

    s = io.StringIO()
    p = Progress(None, 0, mode="log", log_every=1e9, stream=s, label="2 workers")
    p.set_total(40)
    p.suffix = "2 running"
    p.update(10)
    assert p.line().startswith("2 workers: 10/40 rows (25.0%)") and p.line().endswith("[2 running]")


# ------------------------------------------------------------------------- the worker's stop
def test_a_copy_of_the_stop_signal_is_the_same_stop():
    """Inside Slurm, TERM reaches the worker and its supervisor forwards it too: one graceful stop.
    A second, different stop signal (the supervisor's escalation) makes it hard."""
    stop = StopControl(10.0, lambda m: None)
    stop.same_signal_window_s = 2.0
    stop.request("stopped by SIGTERM", exit_code=143, signum=signal.SIGTERM)
    stop.request("stopped by SIGTERM", exit_code=143, signum=signal.SIGTERM)
    assert stop.requested.is_set() and not stop.hard.is_set() and stop.exit_code == 143
    stop.request("stopped by SIGINT", exit_code=130, signum=signal.SIGINT)
    assert stop.hard.is_set() and stop.exit_code == 143
    plain = StopControl(10.0, lambda m: None)  # not a worker: every signal counts, as before
    plain.request("x", signum=signal.SIGTERM)
    plain.request("x", signum=signal.SIGTERM)
    assert plain.hard.is_set()


# ------------------------------------------------------------------------- the exit code of the whole
@pytest.mark.parametrize("codes, stopped, expect", [
    ([0, 0], None, 0),
    ([0, -signal.SIGKILL], None, 1),  # a worker killed: failed, whatever the others did
    ([143, -signal.SIGKILL], "stopped by SIGTERM", 1),
    ([0, 1], None, 1),
    ([2, 2], None, 2),  # refused: the job's or the output's fault
    ([0, 2], None, 2),
    ([143, 0], "stopped by SIGTERM", 143),  # stopped by the supervisor's signal: its code
    ([138, 138], "stopped by SIGUSR1", 138),
    ([143, 0], None, 143),  # a worker stopped by a TERM of its own: resumable, not done
])
def test_exit_code_of_the_whole(tmp_path, codes, stopped, expect):
    from batchgen.pipeline.parallel.report import Report
    from batchgen.pipeline.parallel.supervisor import Supervisor
    from batchgen.pipeline.parallel.workers import Worker

    cfg = cfg_of(tmp_path)
    slots = [Slot(i, "cpu", "") for i in range(len(codes))]
    sup = Supervisor(cfg, plan.Plan(slots, list(range(len(codes))), len(codes)), WorkerArgs("job.yaml"))
    sup.stop_signals[signal.SIGUSR1] = 138
    sup.workers = [Worker(i, slots[i], tmp_path / f"{i}.log", returncode=rc) for i, rc in enumerate(codes)]
    sup.queue = []
    if stopped:
        sup.stop_reason, sup.stop_code = stopped, int(stopped.endswith("USR1")) * 138 or 143
    assert Report(sup, 1.0).code() == expect
    sup.workers = sup.workers[:1]
    sup.queue = [1]  # a task never started (the run stopped first): not done
    assert Report(sup, 1.0).code() != 0


def test_a_task_log_past_its_bound_is_kept_once_and_started_again(tmp_path, monkeypatch):
    """workers.open_log: every run appends to OUT/.batchgen/logs/task-NNNNN.log; one past LOG_KEEP_BYTES moves to
    .log.1 (the older .log.1 goes) before the next run writes, so a task's logs stay bounded; a link by the kept
    name is refused, its target untouched."""
    import os

    from batchgen.pipeline.files import LinkError
    from batchgen.pipeline.parallel import workers

    monkeypatch.setattr(workers, "LOG_KEEP_BYTES", 100)
    log = workers.log_path(tmp_path, 3)

    def append(text: str) -> None:
        fd = workers.open_log(tmp_path, 3)
        os.write(fd, text.encode())
        os.close(fd)

    append("a" * 60)
    append("b" * 60)  # 60 bytes at the start: appended
    assert log.read_text() == "a" * 60 + "b" * 60
    append("c")  # 120 bytes at the start: kept as .1, a new log begins
    assert (log.parent / "task-00003.log.1").read_text() == "a" * 60 + "b" * 60 and log.read_text() == "c"
    log.write_text("d" * 200)
    append("e")
    assert (log.parent / "task-00003.log.1").read_text() == "d" * 200 and log.read_text() == "e"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    (log.parent / "task-00003.log.1").unlink()
    (log.parent / "task-00003.log.1").symlink_to(victim)
    log.write_text("f" * 200)
    with pytest.raises(LinkError):
        workers.open_log(tmp_path, 3)
    assert victim.read_text() == "keep\n" and log.read_text() == "f" * 200

"""Data parallel end to end on the CPU (how CI tests it): `batchgen run` with engine.data_parallel /
--data-parallel as a real subprocess, its workers real `batchgen run` processes on a tiny real
checkpoint; one worker SIGKILLed mid-run, the supervisor SIGTERMed; every rerun resumes, and the
output holds every (row, sample) once, with the completions of a plain single-process run (each
row's seed is a hash of (seed, id): the split does not change a text).

Kills and signals are sent on observed progress (a worker's own committed shards, its pid from its
progress file), never after a sleep sized for one machine."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 60  # x 2 samples x up to 32 tokens: seconds per worker even on a fast core

pytestmark = pytest.mark.slow

JOB = """\
model: {{path: model}}
input:
  files: [prompts.jsonl]
prompt:
  column: prompt
sampling: {{max_new_tokens: 32, temperature: 0.9, top_p: 0.95, n: 2, seed: 7}}
output: {{path: {out}, rows_per_shard: 2, flush_seconds: 0.05, stop_grace_seconds: 10}}
engine: {{device: cpu, max_num_seqs: 4, max_batch_tokens: 256{extra}}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Any) -> Path:
    d = tmp_path_factory.mktemp("dp")
    rng = random.Random(3)
    words = "sea sky wind robot paint poem fox dog capital France code list count".split()
    with open(d / "prompts.jsonl", "w") as f:
        for _ in range(N_ROWS):
            f.write(json.dumps({"prompt": "Write about " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 20)))})
                    + "\n")
        f.write('{"prompt": null}\n')  # an error row goes through the workers too
    (d / "model").symlink_to(tiny_checkpoint("smollm2"))
    return d


def job_file(d: Path, out: str, extra: str = "") -> Path:
    p = d / f"{out}.yaml"
    p.write_text(JOB.format(out=out, extra=extra))
    return p


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # one thread per worker: the float order of the reference
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def start(job: Path, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchgen.cli", "run", str(job), "--progress", "log",
                             "--log-interval", "1", *args], cwd=str(job.parent), env=env(),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def run(job: Path, log: Path, *args: str) -> int:
    return start(job, log, *args).wait(timeout=600)


def read(out: Path) -> dict[tuple, dict]:
    import pyarrow.dataset as pds

    rows = pds.dataset(str(out), format="parquet").to_table().to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (row, sample) is in the output twice"
    return {k: r for k, r in zip(keys, rows)}


def progress(out: Path, task: int) -> dict:
    try:
        return json.loads((out / f".batchgen/progress/task-{task:05d}.json").read_text())
    except (OSError, ValueError):
        return {}


def alive(pid: int) -> bool:
    """pid runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def committed_by(out: Path, task: int, pid: int) -> int:
    """Rows task `task` committed in the run of process `pid` (0 until that process wrote its file)."""
    p = progress(out, task)
    return int(p.get("rows_done", 0)) if p.get("pid") == pid and p.get("state") == "running" else 0


def freeze_both_mid_run(out: Path, p: subprocess.Popen, log: Path) -> dict[int, int]:
    """The two workers' pids, each frozen (SIGSTOP) as soon as it has committed 2 rows in this run: a worker
    that started seconds before the other cannot finish its share first, however the machine schedules
    them (on a loaded 2-core box it did). The caller stops the supervisor, then continue_workers()."""
    pids: dict[int, int] = {}
    frozen: set[int] = set()

    def both_frozen() -> bool:
        for t in (0, 1):
            prog = progress(out, t)
            if prog.get("pid"):
                pids[t] = int(prog["pid"])
            if t in pids and t not in frozen and committed_by(out, t, pids[t]) >= 2:
                os.kill(pids[t], signal.SIGSTOP)
                frozen.add(t)
        return len(frozen) == 2

    try:
        reached = wait_for(both_frozen, p, log)
    finally:  # never leave a worker stopped behind a failed wait
        if len(frozen) < 2:
            continue_workers({t: pids[t] for t in frozen})
    assert reached, log.read_text()[-3000:]
    return pids


def continue_workers(pids: dict[int, int]) -> None:
    for pid in pids.values():
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict[tuple, dict]:
    """A plain run: one process, one task."""
    assert run(job_file(workdir, "ref"), workdir / "ref.log") == 0, (workdir / "ref.log").read_text()[-3000:]
    ref = read(workdir / "ref")
    assert set(ref) == {(i, s) for i in range(N_ROWS + 1) for s in range(2)}
    return ref


def same(a: dict[tuple, dict], b: dict[tuple, dict]) -> None:
    assert set(a) == set(b)
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"{len(diff)} rows differ, e.g. {a[diff[0]]} vs {b[diff[0]]}"


def test_config_key_runs_two_workers_exactly_once(workdir: Path, reference: dict[tuple, dict]) -> None:
    job = job_file(workdir, "key", extra=", data_parallel: 2")
    log = workdir / "key.log"
    assert run(job, log) == 0, log.read_text()[-3000:]
    out = workdir / "key"
    same(read(out), reference)
    text = log.read_text()
    assert "data parallel: 2 worker processes, tasks 0-1 of 2" in text and "done: all 2 tasks" in text
    assert "rows            61 (122 samples)" in text  # one summary for the whole
    assert json.loads((out / ".batchgen/manifest.json").read_text())["num_tasks"] == 2
    for t in (0, 1):  # each worker: its own task, its own log, one thread, one core
        assert progress(out, t)["state"] == "done"
        wlog = (out / f".batchgen/logs/task-{t:05d}.log").read_text()
        assert f"task {t} of 2, worker {t} (cpu, cores {t}, 1 thread)" in wlog and f"task {t}: done." in wlog
    summary = json.loads((out / ".batchgen/summary.json").read_text())
    assert summary["rows"] == N_ROWS + 1 and summary["samples"] == 2 * (N_ROWS + 1) and summary["num_tasks"] == 2
    # a finished output: the same command says so and does nothing
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(job)], cwd=str(workdir), env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done: all 2 tasks" in r.stderr, r.stderr[-3000:]


def test_kill9_of_one_worker_is_reported_and_resumed(workdir: Path, reference: dict[tuple, dict]) -> None:
    job = job_file(workdir, "killed")
    out, log = workdir / "killed", workdir / "killed.log"
    p = start(job, log, "--data-parallel", "2")
    # task 1's worker: its pid from its progress file, killed once it committed rows of its own
    pid: list[int] = []

    def task1_committed() -> bool:
        prog = progress(out, 1)
        if prog.get("state") == "running" and prog.get("pid"):
            pid[:] = [int(prog["pid"])]
            return committed_by(out, 1, pid[0]) >= 2
        return False

    assert wait_for(task1_committed, p, log), log.read_text()[-3000:]
    os.kill(pid[0], signal.SIGKILL)
    assert p.wait(timeout=600) == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert "task 1 failed (killed by SIGKILL)" in text and "task-00001.log" in text, text[-3000:]
    assert "task 0: done" in text and "1 of 2 tasks done" in text
    assert "run the same command to resume" in text.strip().splitlines()[-1]
    assert progress(out, 0)["state"] == "done"  # the other worker ran to the end
    saved = progress(out, 1)["rows_done"]
    part = read(out)
    assert 2 <= saved < progress(out, 1)["rows_total"] and len(part) < len(reference)
    for k, r in part.items():  # what is committed is final
        assert r == reference[k]

    # rerun: only the killed task's rows are generated
    assert run(job, log, "--data-parallel", "2") == 0, log.read_text()[-3000:]
    same(read(out), reference)
    wlog0 = (out / ".batchgen/logs/task-00000.log").read_text()
    assert wlog0.strip().splitlines()[-1].startswith("nothing to do:")
    assert "resuming" in (out / ".batchgen/logs/task-00001.log").read_text()


def test_sigterm_stops_every_worker_and_one_worker_resumes(workdir: Path, reference: dict[tuple, dict]) -> None:
    job = job_file(workdir, "term")
    out, log = workdir / "term", workdir / "term.log"
    p = start(job, log, "--data-parallel", "2")
    pids = freeze_both_mid_run(out, p, log)
    p.send_signal(signal.SIGTERM)
    # the supervisor forwards it to both (pending while they are stopped), then they go on and see it
    try:
        forwarded = wait_for(lambda: "stopping 2 worker(s)" in log.read_text(errors="replace"), p, log)
    finally:
        continue_workers(pids)
    assert forwarded, log.read_text()[-3000:]
    assert p.wait(timeout=600) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "stopped by SIGTERM: stopping 2 worker(s)" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM") and "run the same command to resume" in last, last
    for t in (0, 1):  # each worker stopped gracefully on one forwarded signal (143), committing what was done
        assert progress(out, t)["state"] in ("stopped", "done"), progress(out, t)
    assert sum(progress(out, t)["rows_done"] for t in (0, 1)) * 2 == len(read(out))

    # resumed by one worker: the output keeps its 2 tasks, run one after another
    assert run(job, log, "--data-parallel", "1") == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "has 2 tasks (fixed when it was started): they run 1 at a time" in text
    same(read(out), reference)


def test_a_killed_supervisor_stops_its_workers_gracefully(workdir: Path, reference: dict[tuple, dict]) -> None:
    """kill -9 of the supervisor: its workers are told (PR_SET_PDEATHSIG: TERM), commit and stop; no
    orphan runs on. The same command resumes."""
    import time

    job = job_file(workdir, "orphans")
    out, log = workdir / "orphans", workdir / "orphans.log"
    p = start(job, log, "--data-parallel", "2")
    pids = freeze_both_mid_run(out, p, log)
    p.kill()
    assert p.wait() == -signal.SIGKILL
    continue_workers(pids)  # their PR_SET_PDEATHSIG TERM waited while they were stopped
    deadline = time.monotonic() + 300  # only catches a hang: they stop within their grace
    while any(alive(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, "a worker ran on after its supervisor died"
        time.sleep(0.05)
    for t in (0, 1):
        assert progress(out, t)["state"] in ("stopped", "done"), progress(out, t)
    wlogs = [(out / f".batchgen/logs/task-{t:05d}.log").read_text() for t in (0, 1)]
    assert any("stopped by SIGTERM" in w for w in wlogs), wlogs
    assert run(job, log, "--data-parallel", "2") == 0, log.read_text()[-3000:]
    same(read(out), reference)

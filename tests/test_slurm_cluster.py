"""End-to-end tests on a real single-node Slurm cluster (tests/slurm_cluster.py).

Skipped, with the reason, where Slurm is not installed (CI installs it with
.ci/slurm-setup.sh and sets BATCHGEN_REQUIRE_SLURM=1 so that a missing Slurm fails).
"""
from __future__ import annotations

import time

try:
    from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
except ImportError:  # tests/ imported as a package
    from tests.slurm_cluster import slurm_cluster  # noqa: F401


def test_cluster_runs_an_array(slurm_cluster, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    job = slurm_cluster.sbatch(
        "--array=0-3", "-o", f"{out}/%A_%a.log",
        "--wrap", "echo task=$SLURM_ARRAY_TASK_ID count=$SLURM_ARRAY_TASK_COUNT restart=${SLURM_RESTART_COUNT:-0}",
    )
    states = slurm_cluster.wait_for_jobs([job], timeout=60)
    assert sorted(states.values()) == ["COMPLETED"] * 4, states
    lines = sorted(p.read_text().strip() for p in out.glob("*.log"))
    assert lines == [f"task={i} count=4 restart=0" for i in range(4)]


# --------------------------------------------------------------------------------------------
# the real thing: batchgen submit -> array of 4 CPU tasks -> requeue two of them mid-run
# --------------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_ROWS, N_SAMPLES, N_TASKS = 64, 2, 4


def batchgen_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "batchgen"  # the venv's console script
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "batchgen.cli"]


def _progress(out: Path) -> dict[int, dict]:
    d = out / ".batchgen" / "progress"
    res = {}
    for p in d.glob("task-*.json") if d.is_dir() else []:
        try:
            data = json.loads(p.read_text())
        except ValueError:  # being replaced right now
            continue
        res[int(data.get("task_id", p.stem.split("-")[1]))] = data
    return res


@pytest.mark.slurm
@pytest.mark.slow
def test_array_job_requeued_mid_run_is_exact(slurm_cluster, tiny_checkpoint, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ckpt = tiny_checkpoint("llama")
    rows = [{"rid": f"r{i:03d}", "prompt": f"Question {i}: what is {i} plus {i}?"} for i in range(N_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=8)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model:\n  path: {ckpt}\n"
        "input:\n  files: [in.parquet]\n  id_column: rid\n"
        "prompt:\n  column: prompt\n  chat_template: false\n"
        f"sampling:\n  max_new_tokens: 16\n  temperature: 0.8\n  n: {N_SAMPLES}\n  seed: 1\n  ignore_eos: true\n"
        "output:\n  path: out\n  rows_per_shard: 4\n  flush_seconds: 1\n  stop_grace_seconds: 2\n"
        "engine:\n  device: cpu\n  max_num_seqs: 2\n  cuda_graphs: false\n  overlap: false\n"
    )
    env = dict(slurm_cluster.env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    # dry run first: the script, and nothing submitted
    dry = subprocess.run([*batchgen_cmd(), "submit", str(job), "--tasks", str(N_TASKS), "--gpus-per-task", "0",
                          "--dry-run"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert f"#SBATCH --array=0-{N_TASKS - 1}" in dry.stdout and not slurm_cluster.job_ids()

    r = subprocess.run([*batchgen_cmd(), "submit", str(job), "--tasks", str(N_TASKS), "--gpus-per-task", "0",
                        "--cpus-per-task", "1", "--grace", "30"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), r.stdout

    # once tasks 1 and 2 have committed a shard and are still running: USR1 to task 1 (the
    # time-limit warning: it requeues itself), `scontrol requeue` of task 2 (TERM from Slurm)
    signalled: dict[int, int] = {}
    deadline = time.monotonic() + 150
    while len(signalled) < 2:
        assert time.monotonic() < deadline, f"tasks never got going: {_progress(out)}\n{slurm_cluster.logs()}"
        prog = _progress(out)
        for t in (1, 2):
            p = prog.get(t, {})
            if t not in signalled and p.get("state") == "running" and 2 <= p.get("rows_done", 0) < p.get("rows_total", 0):
                if t == 1:
                    slurm_cluster.run("timeout", "15", "scancel", "--signal=USR1", "--batch", f"{job_id}_1", check=False)
                else:
                    slurm_cluster.run("scontrol", "requeue", f"{job_id}_2")
                signalled[t] = p["rows_done"]
        time.sleep(0.1)

    mid = subprocess.run([*batchgen_cmd(), "status", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert mid.returncode == 1, mid.stdout + mid.stderr  # not complete yet

    states = slurm_cluster.wait_for_jobs([job_id], timeout=240)
    logs = {t: (out / ".batchgen" / "slurm" / "logs" / f"{job_id}_{t}.log") for t in range(N_TASKS)}
    all_logs = "\n".join(f"--- task {t}\n{p.read_text() if p.exists() else '(no log)'}" for t, p in logs.items())
    assert sorted(states.values()) == ["COMPLETED"] * N_TASKS, f"{states}\n{all_logs}"
    restarts = {int(rec["ArrayTaskId"]): int(rec.get("Restarts", 0)) for rec in slurm_cluster.job_info(job_id)}
    assert restarts == {0: 0, 1: 1, 2: 1, 3: 0}, f"{restarts}\n{all_logs}"
    # the first runs of tasks 1 and 2 really were stopped mid-run and committed first
    log1, log2 = logs[1].read_text(), logs[2].read_text()
    assert "stopped by SIGUSR1" in log1 and f"requeued {job_id}_1" in log1, log1
    assert "stopped by SIGTERM" in log2, log2
    assert "restart 1" in log1 and "restart 1" in log2
    assert "resuming" in log1 and "resuming" in log2

    # the union of all shards is exactly input x n; each task wrote only its own files
    keys: list[tuple[str, int]] = []
    for p in sorted(out.glob("*.parquet")):
        assert p.name.startswith("part-t") and int(p.name[6:11]) in range(N_TASKS), p.name
        meta = json.loads(pq.read_schema(p).metadata[b"batchgen"])
        assert meta["task"] == int(p.name[6:11])
        t = pq.read_table(p, columns=["id", "sample_index"])
        keys += list(zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert set(keys) == {(r["rid"], j) for r in rows for j in range(N_SAMPLES)}
    assert not list(out.glob(".*.tmp"))

    st = subprocess.run([*batchgen_cmd(), "status", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"{N_TASKS}/{N_TASKS} complete" in st.stdout and f"{N_ROWS}/{N_ROWS}" in st.stdout

    # and it loads as one dataset (the .batchgen/ bookkeeping is hidden)
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert ds.num_rows == N_ROWS * N_SAMPLES

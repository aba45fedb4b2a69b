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
    states = slurm_cluster.wait_for_jobs([job], timeout=300)
    assert sorted(states.values()) == ["COMPLETED"] * 4, states
    lines = sorted(p.read_text().strip() for p in out.glob("*.log"))
    assert lines == [f"task={i} count=4 restart=0" for i in range(4)]


# --------------------------------------------------------------------------------------------
# the real thing: batchgen submit -> array of 4 CPU tasks -> requeue two of them mid-run
# --------------------------------------------------------------------------------------------
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

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


def _poll(cond: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait for an observed condition; the timeout only catches a hang."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not seen in {timeout:.0f} s")
        time.sleep(0.005)


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, T stopped, Z...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _signal_pending(pid: int, signum: int) -> bool:
    """signum is pending for pid (its thread's or the process's pending set)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    mask = 0
    for ln in lines:
        if ln.startswith(("SigPnd:", "ShdPnd:")):
            mask |= int(ln.split()[1], 16)
    return bool(mask >> (signum - 1) & 1)


@contextlib.contextmanager
def _frozen(pid: int) -> Iterator[None]:
    """pid stopped (SIGSTOP) for the body, continued after: a task seen mid-run can't run on to
    the end of its part between being seen and being signalled, however fast the machine."""
    os.kill(pid, signal.SIGSTOP)
    try:
        _poll(lambda: _proc_state(pid) in ("T", "t", None), 60, f"pid {pid} stopped")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _until_pending(pid: int, signum: int) -> None:
    """Inside _frozen, after asking Slurm for a signal: wait until it is pending (or something else
    continued pid, e.g. Slurm's SIGCONT before its SIGTERM, or it is gone), so that the signal is
    the first thing the task sees when it runs again."""
    _poll(lambda: _signal_pending(pid, signum) or _proc_state(pid) not in ("T", "t"), 60,
          f"signal {signum} reaching pid {pid}")


def test_frozen_signal_lands_before_the_process_runs_on(tmp_path):
    """The helpers above, without Slurm: a process counting to a file is frozen, signalled,
    continued; it counts nothing while frozen and its handler runs before it counts on."""
    code = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "f, tmp, got = Path(sys.argv[1]), Path(sys.argv[1] + '.tmp'), Path(sys.argv[2])\n"
        "n = 0\n"
        "def h(s, fr): got.write_text(str(n)); sys.exit(7)\n"
        "signal.signal(signal.SIGUSR1, h)\n"
        "while True:\n"
        "    n += 1\n"
        "    tmp.write_text(str(n))\n"
        "    os.replace(tmp, f)\n"
        "    time.sleep(0.001)\n"
    )
    f, got = tmp_path / "count", tmp_path / "got"
    p = subprocess.Popen([sys.executable, "-c", code, str(f), str(got)])
    try:
        _poll(f.exists, 120, "the counter started")
        seen: list[int] = []

        def send() -> None:
            seen.append(int(f.read_text()))
            time.sleep(0.2)  # a slow scancel: the frozen process must not move meanwhile
            seen.append(int(f.read_text()))
            os.kill(p.pid, signal.SIGUSR1)

        with _frozen(p.pid):
            send()
            _until_pending(p.pid, signal.SIGUSR1)
            assert _proc_state(p.pid) == "T" and _signal_pending(p.pid, signal.SIGUSR1)
        assert p.wait(timeout=60) == 7
        # nothing counted while frozen; the handler ran at once (at most the count in hand)
        assert seen[0] == seen[1] and seen[0] <= int(got.read_text()) <= seen[0] + 1, (seen, got.read_text())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _mid_run(p: dict, rows_left: int = 1) -> bool:
    """Running, at least 2 rows committed and `rows_left` still to commit."""
    return p.get("state") == "running" and 2 <= p.get("rows_done", 0) <= p.get("rows_total", 0) - rows_left


# a stopping worker finishes its in-flight rows (engine, read-ahead, unflushed shard: 3 seen on CI) within
# the grace period; signalled with fewer rows than this left, it could finish the task instead of stopping
ROWS_LEFT_TO_STOP = 6


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
    # time-limit warning: it requeues itself), `scontrol requeue` of task 2 (TERM from Slurm).
    # Each is frozen (its pid from its progress file; same host) from the moment it is seen
    # mid-run until the signal is pending, so it can't finish its part first on a fast machine.
    signalled: dict[int, int] = {}
    deadline = time.monotonic() + 300
    while len(signalled) < 2:
        assert time.monotonic() < deadline, f"tasks never got going: {_progress(out)}\n{slurm_cluster.logs()}"
        prog = _progress(out)
        for t in (1, 2):
            p = prog.get(t, {})
            if t in signalled or not _mid_run(p, ROWS_LEFT_TO_STOP) or not p.get("pid"):
                continue
            pid = int(p["pid"])
            if t == 1:
                send = lambda: slurm_cluster.run("timeout", "15", "scancel", "--signal=USR1", "--batch",  # noqa: E731
                                                 f"{job_id}_1", check=False)
                signum = signal.SIGUSR1
            else:
                send = lambda: slurm_cluster.run("scontrol", "requeue", f"{job_id}_2")  # noqa: E731
                signum = signal.SIGTERM
            try:
                with _frozen(pid):
                    now = _progress(out).get(t, {})  # it can't change while frozen
                    if not _mid_run(now, ROWS_LEFT_TO_STOP) or now.get("pid") != p["pid"]:
                        continue
                    send()
                    _until_pending(pid, signum)
            except ProcessLookupError:  # it exited between the read and the freeze
                continue
            signalled[t] = now["rows_done"]
        time.sleep(0.02)

    mid = subprocess.run([*batchgen_cmd(), "status", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert mid.returncode == 1, mid.stdout + mid.stderr  # not complete yet

    states = slurm_cluster.wait_for_jobs([job_id], timeout=600)
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


# --------------------------------------------------------------------------------------------
# data parallel inside each array task: 2 tasks x 2 workers = 4 tasks of one output; USR1 to one
# array task mid-run reaches its supervisor (the batch shell), which stops both its workers and
# requeues the array task once; the restarted task resumes its two tasks
# --------------------------------------------------------------------------------------------
# the signal needs both tasks of the array task mid-run at once: rows three times the other tests' length
# keep that window open for seconds, whatever skew the two workers start with
DP_NEW_TOKENS = 48


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slurm
@pytest.mark.slow
def test_array_tasks_run_data_parallel_and_requeue_as_one(slurm_cluster, tiny_checkpoint, tmp_path):
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
        f"sampling:\n  max_new_tokens: {DP_NEW_TOKENS}\n  temperature: 0.8\n  n: {N_SAMPLES}\n  seed: 1\n  ignore_eos: true\n"
        "output:\n  path: out\n  rows_per_shard: 2\n  flush_seconds: 1\n  stop_grace_seconds: 2\n"
        "engine:\n  device: cpu\n  max_num_seqs: 2\n  cuda_graphs: false\n  overlap: false\n"
    )
    env = dict(slurm_cluster.env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([*batchgen_cmd(), "submit", str(job), "--tasks", "2", "--gpus-per-task", "0",
                        "--data-parallel", "2", "--cpus-per-task", "2", "--grace", "30"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 workers each" in r.stderr
    job_id = r.stdout.strip().splitlines()[-1]

    # array task 1 runs tasks 2 and 3 of 4: once both are mid-run, freeze them and their supervisor, ask
    # Slurm for USR1 (to the batch shell: the supervisor), let the supervisor forward it, then go on
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, f"tasks never got going: {_progress(out)}\n{slurm_cluster.logs()}"
        prog = _progress(out)
        if all(_mid_run(prog.get(t, {})) and prog[t].get("pid") for t in (2, 3)):
            workers = [int(prog[t]["pid"]) for t in (2, 3)]
            try:
                sup = _parent(workers[0])
                with contextlib.ExitStack() as frozen:
                    for pid in workers:
                        frozen.enter_context(_frozen(pid))
                    now = _progress(out)
                    if not all(_mid_run(now.get(t, {})) for t in (2, 3)):
                        continue
                    with _frozen(sup):
                        slurm_cluster.run("timeout", "15", "scancel", "--signal=USR1", "--batch", f"{job_id}_1",
                                          check=False)
                        _until_pending(sup, signal.SIGUSR1)
                    for pid in workers:  # the supervisor runs, forwards, and the workers see it first
                        _until_pending(pid, signal.SIGUSR1)
            except (ProcessLookupError, FileNotFoundError):
                continue
            break
        time.sleep(0.02)

    states = slurm_cluster.wait_for_jobs([job_id], timeout=600)
    logs = {t: (out / ".batchgen" / "slurm" / "logs" / f"{job_id}_{t}.log") for t in range(2)}
    all_logs = "\n".join(f"--- task {t}\n{p.read_text() if p.exists() else '(no log)'}" for t, p in logs.items())
    assert sorted(states.values()) == ["COMPLETED"] * 2, f"{states}\n{all_logs}"
    restarts = {int(rec["ArrayTaskId"]): int(rec.get("Restarts", 0)) for rec in slurm_cluster.job_info(job_id)}
    assert restarts == {0: 0, 1: 1}, f"{restarts}\n{all_logs}"
    log1 = logs[1].read_text()
    assert "data parallel: 2 worker processes, tasks 2-3 of 4" in log1, log1
    assert "stopped by SIGUSR1: stopping 2 worker(s)" in log1 and f"requeued {job_id}_1" in log1, log1
    assert log1.count(f"requeued {job_id}_1") == 1, log1  # once, by the supervisor: never by a worker
    assert "restart 1" in log1 and "done: all 2 tasks" in log1
    for t in (2, 3):
        wlog = (out / ".batchgen" / "logs" / f"task-{t:05d}.log").read_text()
        assert "requeued" not in wlog, wlog  # the supervisor requeues, never a worker
        # each worker stops mid-task and resumes; one whose in-flight rows were its task's last finishes the
        # task within the grace period instead, which is correct too (seen on CI with 16-token rows: the
        # signal came with 3 rows left)
        resumed = "stopped by SIGUSR1" in wlog and "resuming" in wlog
        finished_in_grace = "stopping: finishing" in wlog and "nothing to do" in wlog
        assert resumed or finished_in_grace, wlog

    keys: list[tuple[str, int]] = []
    for p in sorted(out.glob("*.parquet")):
        t = pq.read_table(p, columns=["id", "sample_index"])
        keys += list(zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist()))
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert set(keys) == {(r["rid"], j) for r in rows for j in range(N_SAMPLES)}
    st = subprocess.run([*batchgen_cmd(), "status", str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "4/4 complete" in st.stdout, st.stdout + st.stderr

"""Unit tests of batchgen.slurm.status and status_view: `batchgen status` on progress files
(TaskProgress) written as the run loop writes them; dead tasks; --verify."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.pipeline.task_progress import TaskProgress, process_identity
from batchgen.slurm.status import read_progress, status_command
from batchgen.slurm.status_view import render_table, summarize

# ------------------------------------------------------------------------- status
def write_progress(out: Path, tasks: list[dict]) -> None:
    """Each task's progress file as the run loop writes it: a TaskProgress's asdict (the field
    names checked: a misspelled one is a TypeError)."""
    d = out / ".batchgen" / "progress"
    d.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        (d / f"task-{t['task_id']:05d}.json").write_text(json.dumps(asdict(TaskProgress(**t))))


def run_status(out: Path, *args: str):
    return CliRunner().invoke(status_command, [str(out), *args], catch_exceptions=False)


def test_status_all_complete(tmp_path):
    now = time.time()
    write_progress(tmp_path, [
        dict(task_id=i, num_tasks=3, state="done", rows_done=10, rows_total=10, shards=2,
             output_tokens=160, tok_s=0.0, updated_unix=now - 5) for i in range(3)])
    r = run_status(tmp_path)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["task", "state", "rows"]
    assert len([ln for ln in lines if ln.split() and ln.split()[0].isdigit()]) == 3
    total = lines[-1]
    assert total.startswith("total") and "3/3 complete" in total and "30/30 (100%)" in total
    assert "480" in total and "ETA done" in total
    assert " 6 " in total  # shards


def test_status_partial_eta_and_missing_task(tmp_path):
    now = time.time()
    write_progress(tmp_path, [
        dict(task_id=0, num_tasks=3, state="done", rows_done=100, rows_total=100, shards=1,
             output_tokens=1000, updated_unix=now),
        dict(task_id=1, num_tasks=3, state="running", rows_done=50, rows_total=100, shards=1,
             output_tokens=500, tok_s=10.0, updated_unix=now),  # 1 row/s
    ])
    r = run_status(tmp_path)
    assert r.exit_code == 1
    assert "pending" in r.output  # task 2 has no file yet
    s = summarize(read_progress(tmp_path), now=now)
    assert s.num_tasks == 3 and s.missing == [2] and not s.complete
    assert s.rows_total is None and s.eta_s is None  # task 2's total is unknown
    # once task 2 reports its total, the ETA is remaining rows / row rate
    write_progress(tmp_path, [dict(task_id=2, num_tasks=3, state="running", rows_done=0, rows_total=100,
                                   tok_s=10.0, output_tokens=0, updated_unix=now)])
    s = summarize(read_progress(tmp_path), now=now)
    assert s.rows_total == 300 and s.eta_s == pytest.approx(150 / 1.0)
    assert "ETA 2m30s" in render_table(s, now=now)


def test_status_stale_failed_and_unreadable(tmp_path):
    now = time.time()
    write_progress(tmp_path, [
        dict(task_id=0, num_tasks=2, state="running", rows_done=1, rows_total=4, updated_unix=now - 3600),
        dict(task_id=1, num_tasks=2, state="failed", rows_done=0, rows_total=4, updated_unix=now),
    ])
    r = run_status(tmp_path)
    assert r.exit_code == 1 and "(stale)" in r.output and "failed" in r.output
    (tmp_path / ".batchgen" / "progress" / "task-00001.json").write_text("{not json")
    r = run_status(tmp_path)
    assert r.exit_code == 1 and "unreadable" in r.output


def test_status_expected_tasks_and_json(tmp_path):
    write_progress(tmp_path, [dict(task_id=0, state="done", rows_done=3, rows_total=3)])
    assert run_status(tmp_path).exit_code == 0  # one task, none declared: complete
    r = run_status(tmp_path, "--tasks", "2")
    assert r.exit_code == 1
    r = run_status(tmp_path, "--json")
    data = json.loads(r.output)
    assert data["complete"] and data["rows_done"] == 3


def test_status_empty_and_missing_dir(tmp_path):
    r = run_status(tmp_path)
    assert r.exit_code == 1 and "no progress" in r.output
    r = CliRunner().invoke(status_command, [str(tmp_path / "nope")])
    assert r.exit_code != 0


# ------------------------------------------------------------------------- dead tasks (issue 11, case 13)
def _task_row(output: str, task: int) -> list[str]:
    return next(ln.split() for ln in output.splitlines() if ln.split()[:1] == [str(task)])


def test_status_shows_a_task_killed_with_sigkill_as_stopped(tmp_path):
    """A real process writes its progress file as the run loop does, then dies by SIGKILL: status
    says stopped at once (no rate, no ETA), as a zombie and once reaped, not running for 10 minutes."""
    path = tmp_path / ".batchgen" / "progress" / "task-00000.json"
    path.parent.mkdir(parents=True)
    code = ("import time\nfrom batchgen.pipeline.task_progress import write_task_progress\n"
            f"write_task_progress({str(path)!r}, task_id=0, num_tasks=1, state='running', rows_done=5, "
            "rows_total=100, output_tokens=500, tok_s=50.0)\nprint('written', flush=True)\ntime.sleep(300)\n")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert p.stdout.readline().strip() == "written"
        r = run_status(tmp_path)
        assert _task_row(r.output, 0)[1] == "running" and "ETA 3m10s" in r.output  # 0.5 rows/s, 95 left
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _proc_state(p.pid) not in ("Z", None) and time.monotonic() < deadline:
            time.sleep(0.01)  # the kill is asynchronous: wait until the kernel has it dead (unreaped)
        for reaped in (False, True):
            if reaped:
                p.wait(timeout=30)
            r = run_status(tmp_path)
            row = _task_row(r.output, 0)
            assert row[1] == "stopped" and row[-3] == "-", r.output  # no tok/s ("0s ago" is two words)
            assert "ETA ?" in r.output and r.exit_code == 1
            assert (f"task 0 stopped: its process (pid {p.pid} on {socket.gethostname()}) is gone without saying why "
                    "(killed?); rerun (or resubmit) to resume") in r.output
        data = json.loads(run_status(tmp_path, "--json").output)
        assert data["tasks"][0]["state"] == "stopped" and data["eta_s"] is None
    finally:
        p.kill()
        p.wait()


def _proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()[0]


def test_status_is_not_fooled_by_a_reused_pid(tmp_path):
    me = process_identity()
    if me["pid_start"] is None:
        pytest.skip("no /proc here")
    base = dict(task_id=0, num_tasks=1, state="running", rows_done=1, rows_total=4, tok_s=2.0, output_tokens=4,
                updated_unix=time.time())
    cases = [
        (me, "running"),  # this very process: alive
        (me | {"pid_start": me["pid_start"] + 1}, "stopped"),  # same pid, another process's start time
        (me | {"boot_id": "another-boot"}, "stopped"),  # written before the machine restarted
        (me | {"host": "elsewhere", "pid_start": 1}, "running"),  # another host: only staleness tells
        ({k: v for k, v in me.items() if k not in ("pid_start", "boot_id")}, "running"),  # an older file
    ]
    for ident, want in cases:
        write_progress(tmp_path, [base | ident])
        (t,) = read_progress(tmp_path)
        assert t.state == want, (ident, t)


def test_status_shows_why_a_task_failed_or_stopped(tmp_path):
    now = time.time()
    write_progress(tmp_path, [
        dict(task_id=0, num_tasks=3, state="failed", rows_done=2, rows_total=4, updated_unix=now,
             error="RuntimeError: CUDA error: out of memory"),
        dict(task_id=1, num_tasks=3, state="stopped", rows_done=2, rows_total=4, updated_unix=now,
             reason="stopped by SIGTERM"),
        dict(task_id=2, num_tasks=3, state="done", rows_done=4, rows_total=4, updated_unix=now),
    ])
    r = run_status(tmp_path)
    assert "task 0 failed: RuntimeError: CUDA error: out of memory" in r.output
    assert "task 1 stopped: stopped by SIGTERM" in r.output and "task 2" not in r.output
    assert json.loads(run_status(tmp_path, "--json").output)["tasks"][0]["note"].startswith("RuntimeError")


# ------------------------------------------------------------------------- status --verify
def test_status_verify_prints_each_problem(tmp_path, monkeypatch):
    from batchgen.pipeline.sink import verify as verifier

    write_progress(tmp_path, [dict(task_id=0, state="done", rows_done=3, rows_total=3)])
    found = {"problems": ["part-t00000-000001.parquet: row id 7 is also in part-t00000-000000.parquet",
                          "part-t00000-000002.parquet: can't be read:\nbad footer"]}
    monkeypatch.setattr(verifier, "verify_output", lambda out: list(found["problems"]))
    r = run_status(tmp_path, "--verify")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[-2:] == ["problem: part-t00000-000001.parquet: row id 7 is also in part-t00000-000000.parquet",
                          "problem: part-t00000-000002.parquet: can't be read: bad footer"]
    assert "verify: 2 problem(s)" in r.stderr
    assert json.loads(run_status(tmp_path, "--verify", "--json").stdout)["problems"][1].endswith("bad footer")
    found["problems"] = []
    r = run_status(tmp_path, "--verify")
    assert r.exit_code == 0 and "no problems" in r.stderr and "problem:" not in r.stdout


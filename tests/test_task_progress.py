"""The progress contract (batchgen.pipeline.task_progress): what the run loop writes is a
TaskProgress's asdict, read back into the same dataclass by `batchgen status`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.pipeline.task_progress import (
    PROGRESS_DIR, ProgressFileError, TaskProgress, process_identity, write_task_progress,
)
from batchgen.slurm.status import read_progress, status_command

ROOT = Path(__file__).resolve().parents[1]

# what the run loop passes to write_task_progress today (batchgen/pipeline/run/task_file.py and
# its "nothing to do" record), beside what TaskProgress.now fills in
WRITER_FIELDS = dict(task_id=1, num_tasks=2, state="running", rows_done=5, rows_total=10, limit=None, shards=1,
                     output_tokens=500, errors=1, tok_s=12.5, run_started_unix=1.7e9, total_wall_s=3.25,
                     fingerprint="abc123", summary=None, reason=None, error=None)


def progress_path(out: Path, task: int = 0) -> Path:
    return out / PROGRESS_DIR / f"task-{task:05d}.json"


def test_written_progress_reads_back_equal(tmp_path: Path) -> None:
    p = TaskProgress.now(**WRITER_FIELDS | {"summary": {"rows": 5, "cost_per_hour": None}})
    path = progress_path(tmp_path, 1)
    p.write(path)
    assert json.loads(path.read_text()) == asdict(p)  # the file is the asdict, every field named
    assert TaskProgress.read(path) == p
    assert TaskProgress.from_dict(asdict(p)) == p


def test_now_fills_in_the_time_and_the_writer() -> None:
    p = TaskProgress.now(task_id=0, state="loading")
    me = process_identity()
    assert (p.pid, p.host, p.pid_start, p.boot_id) == (me["pid"], me["host"], me["pid_start"], me["boot_id"])
    assert p.pid == os.getpid() and p.host == socket.gethostname()
    assert p.updated_unix is not None and p.updated_at
    assert p.writer_gone() is None  # this very process
    assert TaskProgress.now(task_id=0, pid=1234).pid == 1234  # the fields given win


def test_write_task_progress_is_the_dataclass(tmp_path: Path) -> None:
    path = progress_path(tmp_path)
    write_task_progress(path, **WRITER_FIELDS)
    data = json.loads(path.read_text())
    assert set(data) == {f.name for f in fields(TaskProgress)}
    assert {k: data[k] for k in WRITER_FIELDS} == WRITER_FIELDS
    with pytest.raises(TypeError, match="rows"):
        write_task_progress(path, task_id=0, state="running", rows=3)  # a misspelled field is an error
    assert json.loads(path.read_text()) == data  # and nothing was written


def test_read_takes_the_names_only() -> None:
    p = TaskProgress.from_dict({"task_id": 3, "state": "done", "rows_done": 4, "written_by": "a newer batchgen"})
    assert (p.task_id, p.state, p.rows_done, p.num_tasks, p.tok_s) == (3, "done", 4, None, None)
    # the old alternate spellings are not read
    p = TaskProgress.from_dict({"task_id": 0, "status": "complete", "rows": 9, "tok_per_s": 2.0})
    assert (p.state, p.rows_done, p.tok_s) == ("pending", 0, None)
    assert TaskProgress.from_dict({"task_id": 0, "tok_s": 3}).tok_s == 3  # an int is a float's value


@pytest.mark.parametrize("data, why", [
    ([1, 2], "not a JSON object but list"),
    ({"state": "done"}, "no task_id"),
    ({"task_id": "0"}, "task_id is str '0', not int"),
    ({"task_id": 0, "rows_done": True}, "rows_done is bool True, not int"),
    ({"task_id": 0, "tok_s": "fast"}, "tok_s is str 'fast', not float or null"),
    ({"task_id": 0, "summary": [1]}, "summary is list [1], not dict or null"),
])
def test_a_file_of_the_wrong_shape_is_a_clear_problem(tmp_path: Path, data: object, why: str) -> None:
    with pytest.raises(ProgressFileError) as e:
        TaskProgress.from_dict(data)
    assert str(e.value) == why
    path = progress_path(tmp_path, 4)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    (t,) = read_progress(tmp_path)
    assert (t.task_id, t.state, t.note) == (4, "unreadable", f"task-00004.json: {why}")
    r = CliRunner().invoke(status_command, [str(tmp_path)])
    assert r.exit_code == 1 and f"task 4 unreadable: task-00004.json: {why}" in r.output


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ProgressFileError, match="missing"):
        TaskProgress.read(progress_path(tmp_path))
    path = progress_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"task_id": 0, "sta')
    with pytest.raises(ProgressFileError, match="unreadable"):
        TaskProgress.read(path)


def test_status_reads_what_write_task_progress_wrote(tmp_path: Path) -> None:
    """`batchgen status` (the CLI, by its module path) on files written by the run loop's call."""
    for t in range(2):
        write_task_progress(progress_path(tmp_path, t), **WRITER_FIELDS | dict(
            task_id=t, state="done", rows_done=10, output_tokens=100, shards=2, tok_s=None))
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "status", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["complete"] and data["num_tasks"] == 2 and data["rows_done"] == 20 and data["rows_total"] == 20
    assert [(t["task_id"], t["state"], t["shards"], t["output_tokens"]) for t in data["tasks"]] == [
        (0, "done", 2, 100), (1, "done", 2, 100)]
    # a task that stopped says why; one running (this process) shows its rate
    write_task_progress(progress_path(tmp_path, 1), **WRITER_FIELDS | dict(state="stopped", reason="stopped by SIGUSR1"))
    r = CliRunner().invoke(status_command, [str(tmp_path)])
    assert r.exit_code == 1 and "task 1 stopped: stopped by SIGUSR1" in r.output
    write_task_progress(progress_path(tmp_path, 1), **WRITER_FIELDS)
    (_, t1) = read_progress(tmp_path)
    assert t1.state == "running" and t1.tok_s == 12.5 and t1.progress == TaskProgress.read(progress_path(tmp_path, 1))

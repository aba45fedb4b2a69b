"""`batchgen status OUT`: per-task progress of a (possibly array) run, totals and an ETA.

Reads OUT/.batchgen/progress/task-*.json (TaskProgress files, written by the run loop) and the
task count from OUT/.batchgen/manifest.json. Exit code 0 when every task is complete, 1
otherwise (a task missing, pending, running, stopped, failed or unreadable).

A task whose file says running but whose process is gone (kill -9, OOM killer, node reboot)
is shown as stopped as soon as that can be known: on the same host, by its pid, and by the
pid's start time and the boot id the file records, so that a reused pid is not taken for it
(TaskProgress.writer_gone). On other hosts it is flagged stale after status_view.STALE_AFTER_S
without an update.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..pipeline.task_progress import PROGRESS_DIR, ProgressFileError, TaskProgress
from ..pipeline.files import META_DIR, read_json
from .status_view import TaskStatus, render_table, summarize, summary_json


def read_task(path: Path) -> TaskStatus:
    """One progress file as status shows it; a file that is not a TaskProgress is 'unreadable', with why."""
    try:
        p = TaskProgress.read(path)
    except ProgressFileError as e:
        digits = "".join(c for c in path.stem if c.isdigit())
        return TaskStatus(TaskProgress(task_id=int(digits or 0)), state="unreadable", note=f"{path.name}: {e}",
                          path=path)
    why = p.error or p.reason
    t = TaskStatus(p, state=p.state, note=why.splitlines()[0] if why else None, path=path, updated=p.updated_unix)
    if t.updated is None:
        try:
            t.updated = path.stat().st_mtime
        except OSError:
            pass
    if t.running:
        gone = p.writer_gone()
        if gone is not None:
            t.state, t.note = "stopped", f"{gone}; rerun (or resubmit) to resume"
    return t


def read_progress(out: Path) -> list[TaskStatus]:
    """Every task's progress under OUT, sorted by task id."""
    d = Path(out) / PROGRESS_DIR
    if not d.is_dir():
        return []
    return sorted((read_task(p) for p in sorted(d.glob("task-*.json"))), key=lambda t: t.task_id)


def manifest_num_tasks(out: Path) -> int | None:
    """The task count the output was started with (OUT/.batchgen/manifest.json), if any."""
    data = read_json(Path(out) / META_DIR / "manifest.json")
    n = data.get("num_tasks") if isinstance(data, dict) else None
    return n if isinstance(n, int) and n > 0 else None


def verify(out: Path) -> list[str]:
    """Problems that verify_output finds in OUT (shards, ledger, manifest), one line each."""
    from ..pipeline.sink import verify as verifier  # pyarrow: only for --verify

    return [" ".join(str(p).split()) for p in verifier.verify_output(Path(out))]


@click.command("status")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tasks", "num_tasks", type=int, default=None,
              help="Expected number of tasks (default: as recorded in the progress files).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the table.")
@click.option("--verify", "check", is_flag=True,
              help="Also check the committed output itself (every shard readable, every row once); "
                   "one line per problem, exit 1 if any.")
def status_command(out: Path, num_tasks: int | None, as_json: bool, check: bool) -> None:
    """Progress of the run writing to OUT: a row per task, totals and an ETA.

    Exit code 0 when every task is complete (and, with --verify, the output has no problem), 1 otherwise.
    """
    if not out.is_dir():
        raise click.ClickException(f"{out}: no such output directory")
    problems = verify(out) if check else []
    tasks = read_progress(out)
    expected = num_tasks or manifest_num_tasks(out)
    if not tasks and not expected:
        click.echo(f"{out}: no progress yet ({out / PROGRESS_DIR} is empty or missing)", err=True)
        _report_problems(out, problems, check)
        sys.exit(1)
    s = summarize(tasks, expected)
    if as_json:
        data = summary_json(s)
        if check:
            data["problems"] = problems
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_table(s))
    _report_problems(out, problems if not as_json else [], check, len(problems))
    sys.exit(0 if s.complete and not problems else 1)


def _report_problems(out: Path, problems: list[str], check: bool, count: int | None = None) -> None:
    """One stdout line per problem, then a count on stderr (stdout stays the table or the JSON)."""
    for p in problems:
        click.echo(f"problem: {p}")
    n = len(problems) if count is None else count
    if check:
        click.echo(f"verify: {n} problem(s) in {out}" if n else f"verify: {out}: no problems", err=True)

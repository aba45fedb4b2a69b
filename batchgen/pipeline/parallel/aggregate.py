"""The workers' progress, read from what they write anyway (no other channel): each task's
TaskProgress file for the live view, its ledger (the checkpoint) for the final counts; summed
into one view of the run and one summary."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..sink.ledger import Ledger, LedgerFile
from ..sink.paths import OutputPaths
from ..task_progress import ProgressFileError, TaskProgress
from ..run.summary import combine_summaries


def read_tasks(out: Path, tasks: Iterable[int]) -> dict[int, TaskProgress | None]:
    """Each task's progress file as read now (None: none yet, or unreadable: it is only progress)."""
    paths = OutputPaths(out)
    got: dict[int, TaskProgress | None] = {}
    for t in tasks:
        try:
            got[t] = TaskProgress.read(paths.progress_path(t))
        except ProgressFileError:
            got[t] = None
    return got


@dataclass
class Totals:
    """The tasks' progress summed: rows and tokens are the output's (committed), tok_s the sum of the
    live rates of the tasks that are generating now."""

    rows_done: int = 0
    rows_total: int | None = 0  # None while a task's size is not known (no file yet, or unknown length)
    output_tokens: int = 0
    errors: int = 0
    shards: int = 0
    tok_s: float = 0.0
    states: dict[str, int] = field(default_factory=dict)

    @property
    def generating(self) -> int:
        return self.states.get("running", 0)

    def state_line(self) -> str:
        order = ["running", "loading", "starting", "done", "stopped", "failed", "pending"]
        named = sorted(self.states.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0]))
        return ", ".join(f"{n} {s}" for s, n in named if n)


def totals(progress: dict[int, TaskProgress | None], running: dict[int, int | None] | None = None,
           limit: int | None = None) -> Totals:
    """Sum the tasks' files. `running`: task -> pid of its worker alive now; a file that says loading
    or running but was written by another process (an earlier run's, killed) is "starting" while
    the task's new worker has not written yet, "stopped" when the task has none, and adds no rate.
    `limit`: input.limit of this run (a task's total counts the rows under it; a file from a run with
    another limit has another total)."""
    t = Totals()
    for task, p in progress.items():
        if p is None:
            t.rows_total = None
            state = "starting" if running is not None and task in running else "pending"
            t.states[state] = t.states.get(state, 0) + 1
            continue
        state = p.state
        if running is not None and state in ("loading", "running"):
            if task not in running:
                state = "stopped"
            elif p.pid is not None and running[task] is not None and p.pid != running[task]:
                state = "starting"
        t.states[state] = t.states.get(state, 0) + 1
        t.rows_done += p.rows_done
        t.output_tokens += p.output_tokens
        t.errors += p.errors
        t.shards += p.shards
        if state == "running" and p.tok_s:
            t.tok_s += p.tok_s
        if p.rows_total is None or t.rows_total is None or p.limit != limit:
            t.rows_total = None
        else:
            t.rows_total += p.rows_total
    return t


def ledger_counts(out: Path, task: int) -> dict[str, int]:
    """A task's committed counts from its ledger (read only; what is in force: latest record per shard)."""
    paths = OutputPaths(out)
    try:
        recs = LedgerFile(paths.path, paths.ledger_path(task)).read(strict=False) or []
    except Exception:  # noqa: BLE001 - a link or an unreadable file: the worker's own run says so
        recs = []
    led = Ledger.from_records(recs)
    return {"rows": led.rows, "samples": led.samples, "errors": led.errors, "error_rows": led.error_rows,
            "prompt_tokens": led.prompt_tokens, "output_tokens": led.completion_tokens, "shards": len(led.records)}


def task_summary(out: Path, task: int, p: TaskProgress | None) -> dict[str, Any]:
    """A task's summary: its own when it is done, else its ledger's counts and its file's pace."""
    if p is not None and p.state == "done" and p.summary:
        return dict(p.summary)
    d: dict[str, Any] = ledger_counts(out, task)
    if p is not None:
        if p.run_started_unix is not None and p.updated_unix is not None:
            d["wall_s"] = max(0.0, p.updated_unix - p.run_started_unix)
        d["total_wall_s"] = p.total_wall_s
        d["output_tok_s"] = p.tok_s
    return d


def combined_summary(out: Path, tasks: Iterable[int], cost_per_hour: float | None,
                     wall_s: float | None = None) -> dict[str, Any]:
    """The run's summary over `tasks` (run/summary.combine_summaries: counts add up, tok/s too)."""
    tasks = list(tasks)
    progress = read_tasks(out, tasks)
    d = combine_summaries([task_summary(out, t, progress[t]) for t in tasks], cost_per_hour)
    if wall_s is not None:
        d["wall_s"] = round(wall_s, 3)
    d["done_tasks"] = sum(1 for p in progress.values() if p is not None and p.state == "done")
    return d

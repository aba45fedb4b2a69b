"""What `batchgen status` makes of the tasks' progress: a row per task, the totals and an ETA,
as a table or as JSON."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..pipeline.task_progress import TaskProgress

DONE_STATE = "done"
RUNNING_STATES = ("loading", "running")  # the writer's states while its process works
STALE_AFTER_S = 600  # a "running" task whose file has not changed for this long is flagged


@dataclass
class TaskStatus:
    """One task as status shows it: its progress file as read, and the reader's view of it.
    state is the file's, or "stopped" when its process is known to be gone, or "unreadable"."""

    progress: TaskProgress
    state: str
    note: str | None = None  # why it stopped, failed or can't be read
    path: Path | None = None
    updated: float | None = None  # unix time of the last write

    @property
    def task_id(self) -> int:
        return self.progress.task_id

    @property
    def num_tasks(self) -> int | None:
        return self.progress.num_tasks

    @property
    def rows_done(self) -> int:
        return self.progress.rows_done

    @property
    def rows_total(self) -> int | None:
        return self.progress.rows_total

    @property
    def shards(self) -> int:
        return self.progress.shards

    @property
    def output_tokens(self) -> int:
        return self.progress.output_tokens

    @property
    def tok_s(self) -> float | None:
        return self.progress.tok_s

    @property
    def complete(self) -> bool:
        return self.state == DONE_STATE

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


@dataclass
class Summary:
    tasks: list[TaskStatus]
    num_tasks: int
    missing: list[int]
    rows_done: int
    rows_total: int | None
    shards: int
    output_tokens: int
    tok_per_s: float
    eta_s: float | None
    complete: bool


def summarize(tasks: list[TaskStatus], num_tasks: int | None = None, now: float | None = None) -> Summary:
    now = time.time() if now is None else now
    declared = {t.num_tasks for t in tasks if t.num_tasks}
    n = num_tasks or (max(declared) if declared else 0) or (max((t.task_id for t in tasks), default=-1) + 1)
    by_id = {t.task_id: t for t in tasks}
    missing = [i for i in range(n) if i not in by_id]
    rows_done = sum(t.rows_done for t in tasks)
    totals_known = not missing and all(t.rows_total is not None for t in tasks)
    rows_total = sum(t.rows_total for t in tasks) if totals_known else None  # type: ignore[misc]
    live = [t for t in tasks if t.running and not _stale(t, now)]
    complete = n > 0 and not missing and all(t.complete for t in by_id.values()) and len(by_id) >= n
    eta = None
    if complete:
        eta = 0.0
    elif rows_total is not None and live:
        rate = sum(_rows_rate(t) or 0.0 for t in live)
        if rate > 0:
            eta = (rows_total - rows_done) / rate
    return Summary(tasks=tasks, num_tasks=n, missing=missing, rows_done=rows_done, rows_total=rows_total,
                   shards=sum(t.shards for t in tasks), output_tokens=sum(t.output_tokens for t in tasks),
                   tok_per_s=sum(t.tok_s or 0.0 for t in live), eta_s=eta, complete=complete)


def _rows_rate(t: TaskStatus) -> float | None:
    if t.tok_s and t.output_tokens and t.rows_done:
        return t.tok_s * t.rows_done / t.output_tokens  # tokens/s over tokens per row
    return None


def _stale(t: TaskStatus, now: float) -> bool:
    return t.updated is not None and now - t.updated > STALE_AFTER_S


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
def _fmt_int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _fmt_rate(x: float | None) -> str:
    return "-" if not x else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def fmt_duration(s: float | None) -> str:
    if s is None or math.isnan(s) or math.isinf(s):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _fmt_rows(done: int, total: int | None) -> str:
    if total is None:
        return f"{done:,}/?"
    pct = 100.0 * done / total if total else 100.0
    return f"{done:,}/{total:,} ({pct:.0f}%)"


def _fmt_updated(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    return f"{fmt_duration(max(0.0, now - t))} ago"


def _table_rows(s: Summary, now: float) -> list[tuple[str, ...]]:
    """A row per task (a missing one pending), then the totals."""
    rows: list[tuple[str, ...]] = []
    by_id = {t.task_id: t for t in s.tasks}
    for i in sorted(set(by_id) | set(s.missing)):
        t = by_id.get(i)
        if t is None:
            rows.append((str(i), "pending", "-", "-", "-", "-", "-"))
            continue
        state = t.state + (" (stale)" if t.running and _stale(t, now) else "")
        rows.append((str(i), state, _fmt_rows(t.rows_done, t.rows_total), str(t.shards),
                     _fmt_int(t.output_tokens), _fmt_rate(t.tok_s if t.running else None),
                     _fmt_updated(t.updated, now)))
    done = sum(1 for t in s.tasks if t.complete)
    rows.append(("total", f"{done}/{s.num_tasks} complete", _fmt_rows(s.rows_done, s.rows_total), str(s.shards),
                 _fmt_int(s.output_tokens), _fmt_rate(s.tok_per_s),
                 "ETA " + ("done" if s.complete else fmt_duration(s.eta_s))))
    return rows


def render_table(s: Summary, now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ("task", "state", "rows", "shards", "out tokens", "tok/s", "updated")
    rows = _table_rows(s, now)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = {2, 3, 4, 5}

    def line(r: Iterable[str]) -> str:
        return "  ".join(v.rjust(w) if c in right else v.ljust(w) for c, (v, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(header)]
    out += [line(r) for r in rows[:-1]]
    out.append("  ".join("-" * w for w in widths))
    out.append(line(rows[-1]))
    out += [f"task {t.task_id} {t.state}: {t.note}" for t in s.tasks if t.note and not t.running and not t.complete]
    return "\n".join(out)


def summary_json(s: Summary) -> dict:
    return {
        "num_tasks": s.num_tasks, "complete": s.complete, "missing_tasks": s.missing,
        "rows_done": s.rows_done, "rows_total": s.rows_total, "shards": s.shards,
        "output_tokens": s.output_tokens, "tok_per_s": s.tok_per_s, "eta_s": s.eta_s,
        "tasks": [{"task_id": t.task_id, "state": t.state, "rows_done": t.rows_done, "rows_total": t.rows_total,
                   "shards": t.shards, "output_tokens": t.output_tokens, "tok_per_s": t.tok_s,
                   "updated": t.updated, "note": t.note} for t in s.tasks],
    }

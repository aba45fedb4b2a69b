"""`batchgen status OUT`: per-task progress of a (possibly array) run, totals and an ETA.

Reads OUT/.batchgen/progress/task-*.json (written by the run loop) and the task count from
OUT/.batchgen/manifest.json. Exit code 0 when every task is
complete, 1 otherwise (a task missing, pending, running, stopped or failed).

A task whose file says running but whose process is gone (kill -9, OOM killer, node reboot)
is shown as stopped as soon as that can be known: on the same host, by its pid, and by the
pid's start time and the boot id the file records, so that a reused pid is not taken for it.
On other hosts it is flagged stale after STALE_AFTER_S without an update.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import click

META_DIR = ".batchgen"  # batchgen.sink.META_DIR
PROGRESS_DIR = f"{META_DIR}/progress"
LEGACY_PROGRESS_DIRS = ("_progress",)
COMPLETE_STATES = {"complete", "completed", "done", "finished"}
RUNNING_STATES = {"running", "started", "loading", "starting", "stopping"}
FAILED_STATES = {"failed", "error"}
STALE_AFTER_S = 600  # a "running" task whose file has not changed for this long is flagged


@dataclass
class TaskProgress:
    task_id: int
    num_tasks: int | None = None
    state: str = "pending"
    rows_done: int = 0
    rows_total: int | None = None
    shards: int = 0
    output_tokens: int = 0
    tok_per_s: float | None = None
    rows_per_s: float | None = None
    updated: float | None = None  # unix time
    path: Path | None = None
    raw: dict = field(default_factory=dict)
    note: str | None = None  # why it stopped or failed, when known

    @property
    def complete(self) -> bool:
        return self.state in COMPLETE_STATES

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


def _first(d: dict, *keys, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _as_time(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        t = _dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.astimezone()
    return t.timestamp()


def _as_int(v: Any, default: int | None = 0) -> int | None:
    if v is None:
        return default
    if isinstance(v, (list, tuple, dict)):
        return len(v)
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def parse_progress(data: dict, path: Path | None = None) -> TaskProgress:
    """One progress file -> TaskProgress. Tolerates the key spellings of progress.py's versions."""
    task = _as_int(_first(data, "task_id", "task"), None)
    if task is None and path is not None:
        digits = "".join(c for c in path.stem if c.isdigit())
        task = int(digits) if digits else 0
    updated = _as_time(_first(data, "updated_unix", "updated_at", "last_update", "updated", "time"))
    if updated is None and path is not None:
        try:
            updated = path.stat().st_mtime
        except OSError:
            pass
    tok_s = _first(data, "tok_per_s", "tokens_per_s", "output_tok_per_s", "tok_s")
    rows_s = _first(data, "rows_per_s")
    note = _first(data, "error", "reason")
    return TaskProgress(
        task_id=int(task or 0),
        num_tasks=_as_int(_first(data, "num_tasks", "tasks"), None),
        state=str(_first(data, "state", "status", default="running")).lower(),
        rows_done=_as_int(_first(data, "rows_done", "rows", "done")) or 0,
        rows_total=_as_int(_first(data, "rows_total", "total_rows", "total"), None),
        shards=_as_int(_first(data, "shards", "num_shards", "shard_count")) or 0,
        output_tokens=_as_int(_first(data, "output_tokens", "tokens_out")) or 0,
        tok_per_s=float(tok_s) if tok_s is not None else None,
        rows_per_s=float(rows_s) if rows_s is not None else None,
        updated=updated,
        path=path,
        raw=data,
        note=str(note).splitlines()[0] if note else None,
    )


# ---------------------------------------------------------------------------------------
# is the task's process still there?
# ---------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None (no such process, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and ')'


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc field 22): with the pid
    it names one process, since a pid is reused once its process is gone."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_gone(data: dict) -> str | None:
    """Why the process a progress file names is certainly not running any more, or None when it
    may be (it is, another host's, or the file does not say which process wrote it)."""
    pid, host = data.get("pid"), data.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return None
    gone = f"its process (pid {pid} on {host}) is gone without saying why (killed?)"
    if data.get("boot_id") and boot_id() and data["boot_id"] != boot_id():
        return f"its process (pid {pid} on {host}) was lost when the machine restarted"
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return gone
        if e.errno != errno.EPERM:  # EPERM: the pid exists (another user's): look closer below
            return None
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return gone
    started = data.get("pid_start")
    if isinstance(started, int) and fields is not None and process_start_ticks(pid) not in (None, started):
        return gone  # the pid now belongs to another process
    return None


def _mark_dead(t: TaskProgress) -> TaskProgress:
    if t.running:
        why = process_gone(t.raw)
        if why is not None:
            t.state, t.note = "stopped", f"{why}; rerun (or resubmit) to resume"
    return t


def read_progress(out: Path) -> list[TaskProgress]:
    """Every task's progress under OUT (sorted by task id); unreadable files become 'unreadable'."""
    d = Path(out) / PROGRESS_DIR
    for legacy in LEGACY_PROGRESS_DIRS:
        if not d.is_dir() and (Path(out) / legacy).is_dir():
            d = Path(out) / legacy
    if not d.is_dir():
        return []
    tasks = []
    for p in sorted(d.glob("task-*.json")):
        try:
            data = json.loads(p.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            tasks.append(_mark_dead(parse_progress(data, p)))
        except (OSError, ValueError) as e:
            digits = "".join(c for c in p.stem if c.isdigit())
            tasks.append(TaskProgress(task_id=int(digits or 0), state="unreadable", path=p, raw={"error": str(e)}))
    return sorted(tasks, key=lambda t: t.task_id)


def manifest_num_tasks(out: Path) -> int | None:
    """The task count the output was started with (OUT/.batchgen/manifest.json), if any."""
    try:
        data = json.loads((Path(out) / META_DIR / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    n = data.get("num_tasks") if isinstance(data, dict) else None
    return n if isinstance(n, int) and n > 0 else None


@dataclass
class Summary:
    tasks: list[TaskProgress]
    num_tasks: int
    missing: list[int]
    rows_done: int
    rows_total: int | None
    shards: int
    output_tokens: int
    tok_per_s: float
    eta_s: float | None
    complete: bool


def summarize(tasks: list[TaskProgress], num_tasks: int | None = None, now: float | None = None) -> Summary:
    now = time.time() if now is None else now
    declared = {t.num_tasks for t in tasks if t.num_tasks}
    n = num_tasks or (max(declared) if declared else 0) or (max((t.task_id for t in tasks), default=-1) + 1)
    by_id = {t.task_id: t for t in tasks}
    missing = [i for i in range(n) if i not in by_id]
    rows_done = sum(t.rows_done for t in tasks)
    totals_known = not missing and all(t.rows_total is not None for t in tasks)
    rows_total = sum(t.rows_total for t in tasks) if totals_known else None  # type: ignore[misc]
    live = [t for t in tasks if t.running and not _stale(t, now)]
    tok_s = sum(t.tok_per_s or 0.0 for t in live)
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
                   tok_per_s=tok_s, eta_s=eta, complete=complete)


def _rows_rate(t: TaskProgress) -> float | None:
    if t.rows_per_s:
        return t.rows_per_s
    if t.tok_per_s and t.output_tokens and t.rows_done:
        return t.tok_per_s * t.rows_done / t.output_tokens  # tokens/s over tokens per row
    return None


def _stale(t: TaskProgress, now: float) -> bool:
    return t.updated is not None and now - t.updated > STALE_AFTER_S


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


def render_table(s: Summary, now: float | None = None) -> str:
    now = time.time() if now is None else now
    header = ("task", "state", "rows", "shards", "out tokens", "tok/s", "updated")
    rows: list[tuple[str, ...]] = []
    by_id = {t.task_id: t for t in s.tasks}
    for i in sorted(set(by_id) | set(s.missing)):
        t = by_id.get(i)
        if t is None:
            rows.append((str(i), "pending", "-", "-", "-", "-", "-"))
            continue
        state = t.state + (" (stale)" if t.running and _stale(t, now) else "")
        rows.append((str(i), state, _fmt_rows(t.rows_done, t.rows_total), str(t.shards),
                     _fmt_int(t.output_tokens), _fmt_rate(t.tok_per_s if t.running else None),
                     _fmt_updated(t.updated, now)))
    done = sum(1 for t in s.tasks if t.complete)
    rows.append(("total", f"{done}/{s.num_tasks} complete", _fmt_rows(s.rows_done, s.rows_total), str(s.shards),
                 _fmt_int(s.output_tokens), _fmt_rate(s.tok_per_s),
                 "ETA " + ("done" if s.complete else fmt_duration(s.eta_s))))
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
                   "shards": t.shards, "output_tokens": t.output_tokens, "tok_per_s": t.tok_per_s,
                   "updated": t.updated, "note": t.note} for t in s.tasks],
    }


def verify(out: Path) -> list[str] | None:
    """Problems that batchgen.sink.verify_output finds in OUT (shards, ledger, manifest), one line
    each; None when this version of batchgen has no verifier."""
    try:
        from .sink import verify_output  # loaded only for --verify: pyarrow
    except ImportError:
        return None
    return [" ".join(str(p).split()) for p in verify_output(Path(out))]


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
    if problems is None:
        click.echo("error: --verify: this batchgen has no output verifier (batchgen.sink.verify_output); "
                   "upgrade batchgen to check the output", err=True)
        sys.exit(2)
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

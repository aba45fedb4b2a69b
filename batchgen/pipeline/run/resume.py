"""Where a task starts: what its ledger says is done, which error rows --retry-errors redoes, and
whether anything is left at all."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..task_progress import ProgressFileError, TaskProgress
from ..config import JobConfig
from ..sink.intervals import IntervalSet
from ..sink.ledger import Ledger
from ..sink.output_dir import OutputDir


@dataclass
class Resume:
    skip: IntervalSet  # positions not to generate (done, less the rows being retried)
    retry: dict[int, str] = field(default_factory=dict)  # --retry-errors: position -> the shard holding it
    prev_wall_s: float = 0.0  # wall time of every earlier run of this task (what the cost adds up)
    nothing_to_do: bool = False
    recorded_done: bool = False  # the last run's progress file already says done

    def announce(self, od: OutputDir, led: Ledger, source: Any, removed: int, say: Callable[[str], None]) -> None:
        if self.retry:
            say(f"retrying {len(self.retry):,} error row(s) of {od.path}: their new rows replace the old ones in the "
                f"{len(set(self.retry.values()))} shard(s) that hold them")
        elif led.rows:
            left = f" of {source.total:,}" if source.total is not None else ""
            say(f"resuming {od.path}: {led.rows:,} rows{left} already done in {len(led.shards)} shards"
                + (f" (removed {removed} unfinished temp shard(s))" if removed else ""))


def plan_resume(cfg: JobConfig, od: OutputDir, source: Any, led: Ledger, *, retry_errors: bool,
                say: Callable[[str], None]) -> Resume:
    prev = read_previous_progress(od, say)
    retry = retry_set(led, say) if retry_errors else {}
    skip = led.done.minus(IntervalSet.from_points(retry)) if retry else led.done
    plan = Resume(skip, retry, prev.total_wall_s if prev is not None else 0.0)
    plan.recorded_done = prev is not None and prev.state == "done"
    if not retry:
        if source.total is not None:
            plan.nothing_to_do = skip.covers(source.total)
        else:  # a stream of unknown length: done when the last run said so, under the same limit
            plan.nothing_to_do = plan.recorded_done and prev.limit == cfg.input.limit
    return plan


def read_previous_progress(od: OutputDir, say: Callable[[str], None]) -> TaskProgress | None:
    """The previous run's progress file: advisory (the ledger is the checkpoint), so one that
    is unreadable is said and rewritten, never fatal."""
    try:
        return TaskProgress.read(od.progress_path())
    except ProgressFileError as e:
        why = str(e)
        if why != "missing":
            why = why if why.startswith("unreadable") else f"unreadable ({why})"
            say(f"warning: {od.progress_path()} is {why}; it only reports progress (the shards and "
                f"{od.ledger_path()} are the checkpoint), so it is written again")
        return None


def retry_set(led: Ledger, say: Callable[[str], None]) -> dict[int, str]:
    """--retry-errors: position -> shard of every error row that can be replaced in place."""
    retry: dict[int, str] = {}
    old = 0
    for rec in led.records.values():
        if rec.error_rows and rec.layout != "sorted":
            old += rec.error_rows  # rows of a shard of batchgen < 2 can't be found by position
            continue
        for p in IntervalSet(rec.error_positions).points():
            retry[p] = rec.name
    if old:
        say(f"warning: {old:,} error row(s) are in shards written by an older batchgen, which don't record "
            "where each row is: they can't be retried in place and are kept")
    return retry

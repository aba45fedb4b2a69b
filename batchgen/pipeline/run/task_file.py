"""This task's progress file (OUT/.batchgen/progress/task-N.json), rewritten as the run goes.

Advisory: the ledger is the checkpoint. A write that fails is said once and the run goes on; a
link where the file should be is refused (never written through)."""
from __future__ import annotations

import time
from typing import Any

from ..progress import Progress
from ..task_progress import write_task_progress
from ..sink.ledger import Ledger
from ..files import LinkError, WriteError
from ..sink.output_dir import OutputDir


class TaskFile:
    def __init__(self, od: OutputDir, led: Ledger, *, task_id: int, num_tasks: int, rows_total: int | None,
                 limit: int | None, fingerprint: str, prev_wall_s: float, t_start: float, say: Any) -> None:
        self.od, self.led = od, led
        self.task_id, self.num_tasks, self.rows_total, self.limit = task_id, num_tasks, rows_total, limit
        self.fingerprint, self.prev_wall_s, self.say = fingerprint, prev_wall_s, say
        self.t_start = t_start  # when this run started (monotonic)
        self.prog: Progress | None = None  # set once generation starts: tok/s
        self._warned = False

    def wall_s(self) -> float:
        return time.monotonic() - self.t_start

    def write(self, state: str, **fields: Any) -> None:
        prog, led = self.prog, self.led
        run_tokens = prog.out_tokens if prog is not None else 0
        try:
            write_task_progress(
                self.od.progress_path(), task_id=self.task_id, num_tasks=self.num_tasks, state=state,
                rows_done=led.rows, rows_total=self.rows_total, limit=self.limit, shards=len(led.records),
                output_tokens=led.completion_tokens, errors=led.errors,
                tok_s=round(prog.tok_s, 2) if prog is not None and run_tokens else None,
                run_started_unix=time.time() - self.wall_s(),
                total_wall_s=round(self.prev_wall_s + self.wall_s(), 3), fingerprint=self.fingerprint, **fields,
            )
        except LinkError:
            raise
        except WriteError as e:  # progress is advisory: a commit that can't be made stops the job
            if not self._warned:
                self._warned = True
                self.say(f"warning: {e}")

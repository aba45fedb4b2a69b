"""The one progress bar (or log line) of a data-parallel run, drawn from the workers' progress
files: rows and tokens committed (their ledgers' counts), tok/s the sum of the rates of the
workers generating now, and how many workers are in each state."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

from ..progress import Progress
from .aggregate import Totals, read_tasks, totals


class CombinedView:
    def __init__(self, out: Path, tasks: list[int], *, limit: int | None, mode: str, log_every: float,
                 stream: TextIO, label: str, tokens_per_row: float | None = None) -> None:
        self.out, self.tasks, self.limit = out, tasks, limit
        self.first = totals(read_tasks(out, tasks), running={}, limit=limit)  # what earlier runs committed
        self.last = self.first
        self.prog = Progress(self.first.rows_total, self.first.rows_done, mode=mode, log_every=log_every,
                             stream=stream, label=label, tokens_per_row=tokens_per_row)
        self.generating = False  # once a worker generates: the clock of tok/s starts
        self._sampled = 0.0  # tokens sampled this run, integrated from the workers' live rates
        self._t_last = time.monotonic()
        self._gen_first: float | None = None  # when a worker was first seen generating, and last seen
        self._gen_last: float | None = None

    def update(self, running: dict[int, int | None]) -> Totals:
        """Read the files again and redraw (the bar at once, a log line when one is due). `running`:
        task -> pid of its live worker."""
        cur = totals(read_tasks(self.out, self.tasks), running=running, limit=self.limit)
        now = time.monotonic()
        if cur.rows_total is not None and cur.rows_total != self.prog.total:
            self.prog.set_total(cur.rows_total)
        if cur.generating:
            self._gen_first = self._gen_first if self._gen_first is not None else now
            self._gen_last = now
        if not self.generating and cur.generating:
            self.generating = True
            self.prog.start_clock()
        elif self.generating:
            self._sampled += cur.tok_s * (now - self._t_last)
            self.prog.set_generated(int(self._sampled))
        self._t_last = now
        self.prog.suffix = cur.state_line()
        self.prog.update(max(cur.rows_done - self.last.rows_done, 0), max(cur.output_tokens - self.last.output_tokens, 0),
                         max(cur.errors - self.last.errors, 0))
        self.last = cur
        return cur

    @property
    def generation_s(self) -> float | None:
        """Seconds from the first worker seen generating to the last one seen (None: none was)."""
        if self._gen_first is None or self._gen_last is None:
            return None
        return max(self._gen_last - self._gen_first, 1e-3)

    def run_output_tokens(self) -> int:
        """Output tokens committed by this run's workers."""
        return max(self.last.output_tokens - self.first.output_tokens, 0)

    def rows_this_run(self) -> int:
        return max(self.last.rows_done - self.first.rows_done, 0)

    def message(self, msg: str) -> None:
        self.prog.message(msg)

    def urgent(self, msg: str) -> None:
        self.prog.urgent(msg)

    def close(self) -> None:
        self.prog.close()

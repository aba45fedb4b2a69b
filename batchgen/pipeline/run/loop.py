"""The run loop: top up the engine with valid requests, step, turn outputs into rows, commit when
due, check for a stop. Everything that touches files happens here, between engine steps (while
the GPU runs the step that engine.step() launched), never inside the engine."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..progress import Progress
from ..sink.shard_writer import ShardWriter
from .intake import Intake
from .rows import RowBatch, RowShape, sample_rows
from .stopping import HardStop, StopControl

PROGRESS_FILE_EVERY_S = 10.0  # the progress file is also rewritten at every commit


@dataclass
class LoopEnd:
    complete: bool  # every row of the task's share came back
    abandoned: int  # rows in flight when a hard stop abandoned them (redone on the next run)
    fatal: str | None = None  # a too-long prompt under on_too_long: error


class RunLoop:
    def __init__(self, engine: Any, intake: Intake, writer: ShardWriter, prog: Progress, stop: StopControl,
                 shape: RowShape, progress_file: Callable[[str], None]) -> None:
        self.engine, self.intake, self.writer, self.prog = engine, intake, writer, prog
        self.stop, self.shape, self.progress_file = stop, shape, progress_file
        self.in_flight = 0
        # rows held by the engine: a full batch running and two more waiting, so a finished row's slot is
        # refilled at once (tokenizing a batch of rows takes longer than a step)
        self.lookahead = 3 * int(getattr(engine, "max_num_seqs", 8) or 8)
        self.fatal: str | None = None
        self.abandoned = 0  # rows dropped when the loop failed
        self._last_progress_file = time.monotonic()

    def run(self) -> LoopEnd:
        self.stop.in_flight = lambda: self.in_flight
        try:
            while self._turn():
                pass
        except HardStop:
            pass
        except BaseException:
            with contextlib.suppress(Exception):  # the failure is what to report, not a second one
                self.abandoned = self._abandon()  # the engine must not keep this run's rows
            raise
        finally:
            self.stop.in_engine = False
        abandoned = self._abandon() if self.in_flight else 0
        complete = self.intake.exhausted and not self.in_flight and not abandoned and self.fatal is None
        return LoopEnd(complete, abandoned, self.fatal)

    def _turn(self) -> bool:
        """One turn; False once there is nothing left to do."""
        if self.stop.notice is not None:  # the signal handler could not print it
            self.prog.message(self.stop.notice)
            self.stop.notice = None
        self._top_up()
        if self.stop.hard.is_set() or self.stop.past_deadline():
            self.stop.hard.set()
            return False
        if not self.engine.has_unfinished():
            return not (self.intake.exhausted or self.stop.requested.is_set())
        self.stop.in_engine = True
        outputs = self.engine.step()
        self.stop.in_engine = False
        for out in outputs:
            self.in_flight -= 1
            self._add(sample_rows(self.shape, out.request_id, out))
        self._commit_if_due()
        return True

    def _top_up(self) -> None:
        """Admit rows until the engine has `lookahead` waiting (rows that can't be generated go
        straight to the sink as error rows)."""
        while not (self.stop.requested.is_set() or self.intake.exhausted) and self.in_flight < self.lookahead:
            got = self.intake.take(self.lookahead - self.in_flight)
            for batch in got.errors:
                self._add(batch)
            if got.requests:
                self.engine.add(got.requests)
                self.in_flight += len(got.requests)
            if got.fatal:
                self.fatal = got.fatal
                self.stop.request("a prompt is too long")
            self._commit_if_due()

    def _add(self, batch: RowBatch) -> None:
        self.writer.add(batch.position, batch.rows, batch.counts)
        self.prog.update(1, batch.completion_tokens, int(batch.errors > 0))

    def _commit_if_due(self) -> None:
        if self.writer.due():
            self.writer.flush()
            self.progress_file("running")
            self._last_progress_file = time.monotonic()
        elif time.monotonic() - self._last_progress_file > PROGRESS_FILE_EVERY_S:
            self.progress_file("running")
            self._last_progress_file = time.monotonic()

    def _abandon(self) -> int:
        """Drop the rows the engine holds (a hard stop, a failure): they are generated again on the next run."""
        n, self.in_flight = self.in_flight, 0
        abort = getattr(self.engine, "abort", None)
        if abort is not None:
            abort()
        return n

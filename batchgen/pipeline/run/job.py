"""One task of a job, start to end: open the input and the output, resume or finish, load the
model, run the loop, leave a summary.

    job = Job(cfg, task_id=0, num_tasks=1)
    code = job.run()          # exit code: 0 done (or already done), 1 failed, 2 refused,
                              # 128+signal when stopped by a signal (130 SIGINT, 143 SIGTERM)

Graceful stop, from a signal handler or another thread: `job.request_stop(reason, exit_code=...)`
stops admitting new rows, lets in-flight rows finish for up to output.stop_grace_seconds, commits
every completed row to a shard and makes run() return `exit_code`. A second request (or the
grace deadline) abandons the in-flight rows (they are redone on the next run). `job.stop_signals`
(default {SIGTERM: 143, SIGINT: 130}) maps the signals run() handles to exit codes; add one
before run() (e.g. `job.stop_signals[signal.SIGUSR1] = 99`) to get the same graceful stop.
After run(), `job.stopped_by` is the signal number (or None) and `job.stop_reason` the text.
`job.on_stop` callbacks run after the final flush of a stopped run.

`Job(cfg, retry_errors=True)` generates the output's error rows again: each one's new rows
replace its old ones in the shard that holds them (rewritten atomically), so every (row, sample)
stays in the output exactly once.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, TextIO

import pyarrow as pa

from ..files import write_json_atomic
from ..sink.columns import schema_from_b64
from ..config import JobConfig, job_fingerprint, output_dir
from ..sink.intervals import IntervalSet
from ..sink.output_dir import OutputDir
from ..files import WriteError
from ..source import open_source
from . import layout
from .finish import Finisher, summarize
from .resume import Resume, plan_resume
from .session import Generation
from .stopping import EXIT_FAILED, EXIT_OK, StopControl
from .task_file import TaskFile


class Job:
    def __init__(
        self,
        cfg: JobConfig,
        *,
        task_id: int = 0,
        num_tasks: int = 1,
        overwrite: bool = False,
        progress: str = "auto",
        log_every: float = 30.0,
        engine: Any = None,
        engine_factory: Callable[[JobConfig], Any] | None = None,
        tokenizer: Any = None,
        stream: TextIO | None = None,
        retry_errors: bool = False,
    ) -> None:
        self.cfg = cfg
        self.task_id, self.num_tasks = task_id, num_tasks
        self.overwrite, self.retry_errors = overwrite, retry_errors
        self.progress_mode, self.log_every = progress, log_every
        self.engine, self.engine_factory, self.tokenizer = engine, engine_factory, tokenizer
        self.out = stream or sys.stderr
        self.stop = StopControl(cfg.output.stop_grace_seconds, self.say)
        self.on_stop: list[Callable[[Job], None]] = []
        self.summary: dict | None = None
        self.error: str | None = None  # after run(): why it failed (None: it did not)
        self.progress: Any = None  # the run's Progress (rows, tok/s, ETA), once generation started
        self.rows_committed_this_run = 0  # rows in the shards this run committed (slurm: no requeue without progress)
        self.tokenize_batch = 64  # rows rendered and tokenized together

    # ------------------------------------------------------------------ stopping
    @property
    def stop_signals(self) -> dict[int, int]:
        return self.stop.signals

    @property
    def stop_reason(self) -> str | None:
        return self.stop.reason

    @property
    def stopped_by(self) -> int | None:
        return self.stop.signum

    def request_stop(self, reason: str, *, exit_code: int = EXIT_FAILED, hard: bool = False,
                     signum: int | None = None) -> None:
        """Stop admitting rows, finish or abandon in-flight ones, flush, return exit_code.
        Safe from signal handlers and other threads; a second call makes the stop hard."""
        self.stop.request(reason, exit_code=exit_code, hard=hard, signum=signum)

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        import time

        t_start = time.monotonic()
        source = open_source(self.cfg, self.task_id, self.num_tasks)  # ConfigError: files, columns
        od = OutputDir(output_dir(self.cfg), self.task_id, self.num_tasks)
        try:
            od.lock()  # before prepare: --overwrite must not clear a running task's output
            manifest = od.prepare(layout.manifest(self.cfg, source, self.num_tasks), overwrite=self.overwrite,
                                  say=self.say)
            schema = schema_from_b64(manifest["schema"])
            return self._run_locked(source, od, schema, t_start)
        except WriteError as e:  # before any row: the disk is full, a file can't be written
            self.say(f"error: {e}; nothing more was written: fix that, then run the same command to resume")
            return EXIT_FAILED
        finally:
            od.unlock()

    def _run_locked(self, source: Any, od: OutputDir, schema: pa.Schema, t_start: float) -> int:
        fp = job_fingerprint(self.cfg)
        led, removed = od.open_ledger(fp, say=self.say)
        plan = plan_resume(self.cfg, od, source, led, retry_errors=self.retry_errors, say=self.say)
        task_file = TaskFile(od, led, task_id=self.task_id, num_tasks=self.num_tasks, rows_total=source.total,
                             limit=self.cfg.input.limit, fingerprint=fp, prev_wall_s=plan.prev_wall_s,
                             t_start=t_start, say=self.say)
        finisher = Finisher(self.cfg, self.task_id, self.num_tasks, od, self.say)
        if plan.nothing_to_do:
            return self._nothing_to_do(plan, source, od, led, task_file, finisher)
        plan.announce(od, led, source, removed, self.say)
        gen = Generation(self, source, od, schema, led, plan, task_file, finisher)
        return gen.run()

    def _nothing_to_do(self, plan: Resume, source: Any, od: OutputDir, led: Any, task_file: TaskFile,
                       finisher: Finisher) -> int:
        if not plan.recorded_done:  # killed after its last commit: record it
            summ = summarize(self.cfg, self.task_id, self.num_tasks, od, source, led, "done", plan.prev_wall_s)
            task_file.write("done", summary=summ)
            write_json_atomic(od.summary_path(), summ)
            if self.num_tasks > 1:
                finisher.combine()
        if self.retry_errors:
            hint = "; no error rows to retry"
        elif led.error_rows:
            hint = f"; {led.error_rows:,} of them failed: rerun with --retry-errors to generate those again"
        else:
            hint = ""
        self.say(f"nothing to do: {od.path} is complete ({led.rows:,} rows, {led.samples:,} output rows "
                 f"in {len(led.shards)} shards{', task ' + str(self.task_id) if self.num_tasks > 1 else ''}){hint}")
        return EXIT_OK


__all__ = ["Job", "IntervalSet"]

"""The supervisor of a data-parallel run: one `batchgen run --worker` process per slot, each a task of
the same output (the plain task partition, ledger and resume: N tasks exactly once), one combined
view, one summary, one exit code.

    sup = Supervisor(cfg, plan, WorkerArgs(job_file, overrides))
    code = sup.run()   # 0 every task done; 1 a worker failed or died; 2 refused; 128+signal stopped

A worker that dies (any exit but 0, or a signal) is reported with its status, its log's path and
the log's last lines; the others run on and their rows commit (queued tasks still start), and the
run exits non-zero: the same command resumes, redoing only the unfinished tasks' rows.

Stopping: SIGINT / SIGTERM (and whatever `stop_signals` maps, e.g. USR1 inside Slurm) are forwarded
once to every worker, which stops admitting rows, commits and exits; no queued task starts. A
second signal forwards an escalation (another stop signal: a worker takes it as its second, a hard
stop). The supervisor waits for every worker and exits 128 + the first signal. `request_stop`,
`stop_signals`, `on_stop`, `stopped_by` and `rows_committed_this_run` are those of a Job, so the
Slurm wing attaches to a supervisor as to a Job (USR1: stop, then requeue the array task once).
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable, TextIO

from ..config import JobConfig, output_dir
from ..files import OutputError
from .plan import Plan, Slot
from .report import EXIT_USAGE, Report, error_line
from .view import CombinedView
from .workers import Worker, WorkerArgs, describe_worker, start_worker

POLL_S = 0.2  # how often the workers and their progress files are looked at
ESCALATE = {signal.SIGTERM: signal.SIGINT, signal.SIGINT: signal.SIGTERM}  # a second stop, told apart from a copy


class Supervisor:
    def __init__(self, cfg: JobConfig, plan: Plan, args: WorkerArgs, *, progress: str = "auto",
                 log_every: float = 30.0, stream: TextIO | None = None) -> None:
        self.cfg, self.plan, self.args = cfg, plan, args
        self.out = output_dir(cfg)
        self.stream = stream or sys.stderr
        self.progress_mode, self.log_every = progress, log_every
        self.stop_signals: dict[int, int] = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
        self.on_stop: list[Callable[[Any], None]] = []
        self.stop_reason: str | None = None
        self.stopped_by: int | None = None
        self.stop_code = 1
        self._first = signal.SIGTERM  # the signal the workers were sent first
        self.hard = False
        self.rows_committed_this_run = 0
        self.workers: list[Worker] = []  # every worker started, in start order
        self.queue = list(plan.tasks)  # tasks not started yet
        self.free: list[Slot] = list(plan.slots)
        self.start_error: str | None = None
        self.view: CombinedView | None = None

    # ------------------------------------------------------------------ stopping
    def say(self, msg: str) -> None:
        if self.view is not None:
            self.view.message(msg)
        else:
            print(msg, file=self.stream, flush=True)

    def running(self) -> list[Worker]:
        return [w for w in self.workers if w.running]

    def live_pids(self) -> dict[int, int | None]:
        return {w.task: w.pid for w in self.running()}

    def request_stop(self, reason: str, *, exit_code: int = 1, hard: bool = False, signum: int | None = None) -> None:
        """Forward a stop to every worker (safe in a signal handler); a second request escalates."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_code, self.stopped_by = reason, exit_code, signum
            self._first = signum if signum in self.stop_signals else signal.SIGTERM
            n = len(self.running())
            self._urgent(f"{reason}: stopping {n} worker(s): each commits its complete rows and exits"
                         + ("; press Ctrl-C again to stop them now" if n else ""))
            for w in self.running():
                w.send(self._first)
            if not hard:
                return
        if not self.hard:
            self.hard = True
            esc = ESCALATE.get(self._first, signal.SIGTERM)
            self._urgent("stopping now: the workers' in-flight rows are generated again on the next run")
            for w in self.running():
                w.send(esc)

    def _urgent(self, msg: str) -> None:
        try:
            if self.view is not None:
                self.view.urgent(msg)
            else:
                print(msg, file=self.stream, flush=True)
        except (RuntimeError, OSError, ValueError):
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request_stop(f"stopped by {signal.Signals(signum).name}",
                          exit_code=self.stop_signals.get(signum, 128 + signum), signum=signum,
                          hard=self.stop_reason is not None)

    def _install(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for s in self.stop_signals:
            try:
                old[s] = signal.signal(s, self._on_signal)
            except (ValueError, OSError):
                pass
        return old

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        t0 = time.monotonic()
        old = self._install()
        try:
            for note in self.plan.notes:
                self.say(note)
            self.say(self.plan.describe())
            self.view = CombinedView(self.out, self.plan.tasks, limit=self.cfg.input.limit, mode=self.progress_mode,
                                     log_every=self.log_every, stream=self.stream,
                                     label=f"{self.plan.workers} worker{'s' if self.plan.workers != 1 else ''}",
                                     tokens_per_row=self.cfg.sampling.n * self.cfg.sampling.max_new_tokens)
            try:
                self._loop()
            finally:
                self.view.update(self.live_pids())
                self.view.close()
            self.rows_committed_this_run = self.view.rows_this_run()
            report = Report(self, time.monotonic() - t0)
            code = report.finish()
            if self.stop_reason is not None:
                self._stop_callbacks()
            return code
        finally:
            for s, h in old.items():
                try:
                    signal.signal(s, h)
                except (ValueError, OSError):
                    pass

    def _loop(self) -> None:
        assert self.view is not None
        while True:
            for w in self.running():
                if w.poll() is not None:
                    self._ended(w)
            if self.stop_reason is None:
                self._start_queued()
            live = self.running()
            if not live:
                return
            self.view.update(self.live_pids())
            time.sleep(POLL_S)

    def _start_queued(self) -> None:
        while self.queue and self.free and self.stop_reason is None:
            task, slot = self.queue.pop(0), self.free.pop(0)
            try:
                w = start_worker(self.out, task, self.plan.num_tasks, slot, self.args)
            except (OutputError, OSError) as e:
                self.start_error = f"task {task}'s worker could not start: {e}"
                self.say(f"error: {self.start_error}")
                self.request_stop(self.start_error, exit_code=1)
                return
            self.workers.append(w)
            self.say(f"started {describe_worker(w)}; log: {w.log}")

    def _ended(self, w: Worker) -> None:
        self.free.append(w.slot)
        self.free.sort(key=lambda s: s.index)
        rc = w.returncode
        if rc == 0:
            self.say(f"task {w.task}: done")
            return
        if rc == EXIT_USAGE:  # refused: the job's or the output's fault, said in one line
            why = error_line(w) or next(iter(w.tail(1)), "(its log is empty)")
            self.say(f"task {w.task} refused (exit 2): {why}; log: {w.log}")
            return
        if self.stop_reason is not None and rc == 128 + (w.signals_sent[0] if w.signals_sent else 0):
            self.say(f"task {w.task}: stopped ({w.exit_text()}); its committed rows are kept")
            return
        self.say(Report.failure_block(w))

    def _stop_callbacks(self) -> None:
        for cb in self.on_stop:
            try:
                cb(self)
            except Exception as e:  # noqa: BLE001
                self.say(f"warning: stop callback failed: {e}")

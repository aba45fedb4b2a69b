"""Stopping a run: graceful first (finish in-flight rows for up to the grace period), hard on a
second request or at the deadline (in-flight rows are abandoned and redone on the next run).

A request may come from a signal handler or another thread. A hard stop leaves the engine at once
by raising HardStop in the main thread, but only while the loop is inside an engine step (never
in the middle of a commit).
"""
from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class HardStop(BaseException):
    """Raised in the main thread by a signal handler to leave engine.step() at once."""


class StopControl:
    def __init__(self, grace_s: float, say: Callable[[str], None]) -> None:
        self.grace_s = grace_s
        self.say = say
        self.signals: dict[int, int] = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
        self.requested = threading.Event()
        self.hard = threading.Event()
        self.reason: str | None = None
        self.signum: int | None = None
        self.exit_code = EXIT_FAILED
        self.deadline: float | None = None
        self.in_engine = False  # the loop is inside engine.step(): a hard stop may raise there
        self.in_flight: Callable[[], int] = lambda: 0  # rows the engine holds (for the notice)
        self.urgent: Callable[[str], None] | None = None  # prints from a signal handler (Progress.urgent)
        self.notice: str | None = None  # a notice the signal handler could not print: the loop prints it
        # a data-parallel worker: the same signal again within this many seconds is the same stop (Slurm
        # signals every process of the task and the supervisor forwards it too); 0: every signal counts
        self.same_signal_window_s = 0.0
        self._requested_at = 0.0

    def request(self, reason: str, *, exit_code: int = EXIT_FAILED, hard: bool = False,
                signum: int | None = None) -> None:
        """Stop admitting rows, finish or abandon in-flight ones; a second request makes the stop hard."""
        if self.is_repeat(signum):
            return
        if self.requested.is_set():
            hard = True
        else:
            self.reason, self.signum, self.exit_code = reason, signum, exit_code
            self._requested_at = time.monotonic()
            self.deadline = self._requested_at + self.grace_s
            self.requested.set()
        if hard:
            self.hard.set()

    def is_repeat(self, signum: int | None) -> bool:
        """Whether `signum` is a copy of the signal that started the stop (within same_signal_window_s)."""
        return (signum is not None and self.requested.is_set() and signum == self.signum
                and time.monotonic() - self._requested_at < self.same_signal_window_s)

    def past_deadline(self) -> bool:
        return self.requested.is_set() and self.deadline is not None and time.monotonic() > self.deadline

    # ------------------------------------------------------------------ signals
    def install(self) -> dict[int, Any]:
        """Handle the stop signals (and SIGALRM, the grace timer); returns the old handlers."""
        old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for s in list(self.signals) + [signal.SIGALRM]:
            try:
                old[s] = signal.signal(s, self._on_alarm if s == signal.SIGALRM else self._on_signal)
            except (ValueError, OSError):
                pass
        return old

    def restore(self, old: dict[int, Any]) -> None:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        except (ValueError, OSError):
            pass
        for s, h in old.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.is_repeat(signum):
            return
        first = not self.requested.is_set()
        self.request(f"stopped by {signal.Signals(signum).name}", exit_code=self.signals.get(signum, 128 + signum),
                     signum=signum)
        if first:
            self._notice()
        if first and self.grace_s > 0:
            try:
                signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            except (ValueError, OSError):
                pass
        if not first or self.grace_s <= 0:
            self._go_hard()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        self._go_hard()

    def _go_hard(self) -> None:
        self.hard.set()
        if self.in_engine:
            raise HardStop()

    def _notice(self) -> None:
        """Say at once what the stop does (a row can take the whole grace period to come back, and
        nothing else is printed meanwhile). From a signal handler: Progress.urgent writes without
        re-entering the stream's writer; without one, a print that would is left to the loop."""
        n = self.in_flight()
        if self.grace_s > 0 and n:
            msg = f"stopping: finishing {n} in-flight rows (up to {self.grace_s:g} s); press Ctrl-C again to stop now"
        elif n:
            msg = f"stopping now: {n} in-flight rows are generated again on the next run"
        else:
            msg = "stopping: committing what is done"
        try:
            (self.urgent or self.say)(msg)
        except (RuntimeError, OSError, ValueError):
            self.notice = msg

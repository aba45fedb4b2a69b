"""The worker's side of data parallel (`batchgen run --worker`, started by the supervisor)."""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from .workers import SUPERVISOR_ENV

SAME_SIGNAL_WINDOW_S = 2.0  # a repeat of the stop signal within this is the same stop, not a second one
_PR_SET_PDEATHSIG = 1


def become_worker(job: Any) -> None:
    """Make `job` (a Job, its stop signals handled) a supervised worker: one stop per signal however
    many copies arrive at once, and a graceful stop (TERM) when the supervisor dies, even by kill -9."""
    job.stop.same_signal_window_s = SAME_SIGNAL_WINDOW_S
    parent = os.environ.get(SUPERVISOR_ENV, "")
    with contextlib.suppress(Exception):  # Linux only; elsewhere the worker simply runs on
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if parent.isdigit() and os.getppid() != int(parent):  # it died before prctl: stop now
        os.kill(os.getpid(), signal.SIGTERM)

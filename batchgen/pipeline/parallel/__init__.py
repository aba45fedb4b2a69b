"""Data parallel: `engine.data_parallel: N` (or `all`), `batchgen run --data-parallel N`.

One supervisor process starts N `batchgen run --worker` processes, one per GPU (its own
CUDA_VISIBLE_DEVICES) or, on the CPU, one per share of the cores; each runs a task of the same
output with the plain task partition, so the output, its ledgers and resume are exactly those of
N tasks (every (row, sample) once). The supervisor reads the progress files the workers write
anyway, shows one bar, prints one summary and exits with the code of the whole.

    plan.py         how many workers, which devices, which tasks of how many (refusals: ConfigError)
    workers.py      one worker subprocess: its command line, environment, log file, exit status
    worker_side.py  what `--worker` changes in the worker (signal copies, the supervisor's death)
    aggregate.py    the tasks' progress files and ledgers summed
    view.py         the one progress bar / log line
    report.py       how it ended: the summary, the unfinished tasks, the exit code
    supervisor.py   Supervisor: start, watch, forward stops, report
"""
from __future__ import annotations

from .plan import Plan, Slot, parse_workers, plan_run, requested_workers
from .supervisor import Supervisor
from .worker_side import become_worker
from .workers import WorkerArgs

__all__ = ["Plan", "Slot", "Supervisor", "WorkerArgs", "become_worker", "parse_workers", "plan_run",
           "requested_workers"]

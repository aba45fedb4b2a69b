"""Shim for the issue-12 move: removed by the integrator."""
from __future__ import annotations

import os

from .pipeline.run.dry_run import dry_run  # noqa: F401
from .pipeline.run.engine_setup import make_engine  # noqa: F401
from .pipeline.run.job import Job  # noqa: F401
from .pipeline.run.stopping import EXIT_FAILED, EXIT_OK, EXIT_USAGE  # noqa: F401
from .request_params import request_params as _request_params
from .sink import IntervalSet, OutputError  # noqa: F401


def sampling_params(cfg, seed, row=None):  # type: ignore[no-untyped-def]
    return _request_params(cfg, seed, row)


def task_from_env() -> tuple[int, int]:
    """(task_id, num_tasks) from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else (0, 1).
    Array ids are made 0-based with SLURM_ARRAY_TASK_MIN."""
    tid = os.environ.get("SLURM_ARRAY_TASK_ID")
    cnt = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if tid is None or cnt is None:
        return 0, 1
    try:
        t, n = int(tid), int(cnt)
        t -= int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
    except ValueError:
        return 0, 1
    return t, n

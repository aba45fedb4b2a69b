"""Which task of a Slurm array this process is."""
from __future__ import annotations

import os
from collections.abc import Mapping


def task_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(task_id, num_tasks) from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else (0, 1).
    Array ids are made 0-based with SLURM_ARRAY_TASK_MIN."""
    env = os.environ if environ is None else environ
    tid, cnt = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
    if tid is None or cnt is None:
        return 0, 1
    try:
        return int(tid) - int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0), int(cnt)
    except ValueError:
        return 0, 1

"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.task_progress import PROGRESS_DIR, TaskProgress, boot_id, process_start_ticks  # noqa: F401
from .slurm.status import manifest_num_tasks, read_progress, read_task, status_command, verify  # noqa: F401
from .slurm.status_view import (  # noqa: F401
    STALE_AFTER_S, Summary, TaskStatus, fmt_duration, render_table, summarize, summary_json,
)

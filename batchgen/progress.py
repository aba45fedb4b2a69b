"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.progress import Progress, _fmt_dur  # noqa: F401
from .pipeline.task_progress import process_identity, write_task_progress  # noqa: F401
from .pipeline.run.summary import combine_summaries, format_summary, summary_dict  # noqa: E402,F401

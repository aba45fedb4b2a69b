"""Rows in: Hugging Face datasets, Parquet and JSONL files; stable ids; the task partition; the
input's identity (what a resumed run checks has not changed).

A source yields `SourceRow(position, index, values, error, origin)` for the rows of one task,
streaming (memory does not grow with the input):
- `index` is the row's position in the whole input in source order (files sorted by path; it is
  the default id, unique across the input, also for rows that could not be read);
- `position` is its position in this task's partition (0, 1, 2, ...), stable across restarts and
  across changes of input.limit: the output ledger records which positions are done, and
  `rows(start=k)` skips the first k cheaply (Parquet row groups and datasets are skipped
  without reading them).
- `values` holds only the columns the job needs. A row that can't be used (a malformed or
  over-long JSONL line, a value nested too deeply, an id that is null, NaN, a list...) has
  `error` (the reason, one line naming file and line), `origin` (a RowOrigin: file or dataset,
  row and line) and no values.

Modules, in the order a row meets them: files (expanding input.files, stat, content hash),
lines / jsonl / parquet (reading), dataset_load / dataset_source (datasets), checks (columns,
ids, values), partition (this task's share), identity (what a resume compares), file_source.

Identity (`Source.identity()`, stored in the output's manifest; `identity_change(old, new)`
compares): see identity.py. A file is read only up to the size it had at start-up, so rows
appended while a job runs are left for the next run.
"""
from __future__ import annotations

from ..config import ConfigError, JobConfig
from .base import InputError, RowOrigin, Source, SourceRow
from .dataset_source import DatasetSource
from .file_source import FileSource
from .identity import identity_change

__all__ = ["DatasetSource", "FileSource", "InputError", "RowOrigin", "Source", "SourceRow", "identity_change",
           "open_source"]


def open_source(cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> Source:
    """The source of this task's rows; checks files and columns (ConfigError)."""
    if not 0 <= task_id < num_tasks:
        raise ConfigError(f"task id {task_id} is out of range for {num_tasks} task(s)")
    src: Source
    if cfg.input.files is not None:
        src = FileSource(cfg, task_id, num_tasks)
    else:
        src = DatasetSource(cfg, task_id, num_tasks)
    src.check()
    return src

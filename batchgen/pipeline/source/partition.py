"""This task's share of the input (`task_id` of `num_tasks`): deterministic, stable across
restarts, and computed from the whole input, never from input.limit (the limit keeps the rows
whose index is below it, so raising it only adds positions at the end of each task's part).

- files, at least as many files as tasks: whole files, balanced by size (largest first onto the
  least loaded task);
- files, fewer files than tasks: contiguous row ranges of the whole input;
- a dataset with a known length: contiguous row ranges; a streaming dataset of unknown length:
  rows whose index % num_tasks == task_id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .files import InputFile


class Segment(NamedTuple):
    """Rows of one file that belong to this task."""

    file: int  # index into the source's files
    first: int  # first row in the file
    end: int | None  # end row in the file (None: to its end)
    index: int  # index of the first row in the whole input (-1: counted while reading)


@dataclass
class FilePlan:
    mode: str  # "whole" (one task), "files" (whole files per task) or "ranges" (row ranges)
    segments: list[Segment] = field(default_factory=list)  # in increasing index order
    owners: list[int] | None = None  # "files": the task of each file
    rows: int | None = None  # "ranges": rows of the whole input
    total: int | None = None  # rows of this task (after input.limit)


def balance(sizes: list[int], paths: list[str], num_tasks: int) -> list[int]:
    """The task of each file: largest first onto the least loaded task."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], paths[i]))
    load = [0] * num_tasks
    owner = [0] * len(sizes)
    for i in order:
        t = min(range(num_tasks), key=lambda k: (load[k], k))
        owner[i] = t
        load[t] += max(sizes[i], 1)
    return owner


def plan_files(files: list[InputFile], task_id: int, num_tasks: int, limit: int | None) -> FilePlan:
    """This task's segments, from the whole input (never from input.limit)."""
    if num_tasks == 1:
        plan = FilePlan("whole", _whole_files(files, list(range(len(files)))))
    elif len(files) >= num_tasks:
        owners = balance([f.size for f in files], [f.path for f in files], num_tasks)
        plan = FilePlan("files", _whole_files(files, [i for i in range(len(files)) if owners[i] == task_id]), owners)
    else:
        return _row_ranges(files, task_id, num_tasks, limit)
    plan.total = _segments_total(files, plan.segments, limit)
    return plan


def _whole_files(files: list[InputFile], mine: list[int]) -> list[Segment]:
    # the global index of a file's first row needs the counts of the files before it,
    # unless this task reads every file in order (num_tasks == 1): then it's counted lazily.
    lazy = len(mine) == len(files)
    segments = []
    off = 0
    mine_set = set(mine)
    for i, f in enumerate(files):
        if i in mine_set:
            segments.append(Segment(i, 0, None, -1 if lazy else off))
        if not lazy:
            off += f.count()
    return segments


def _row_ranges(files: list[InputFile], task_id: int, num_tasks: int, limit: int | None) -> FilePlan:
    total = sum(f.count() for f in files)
    lo, hi = task_id * total // num_tasks, (task_id + 1) * total // num_tasks
    plan = FilePlan("ranges", rows=total)
    off = 0
    for i, f in enumerate(files):
        n = f.count()
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            plan.segments.append(Segment(i, a - off, b - off, a))
        off += n
    # the limit keeps rows with index < limit: a prefix of this task's range
    plan.total = hi - lo if limit is None else max(0, min(hi, limit) - lo)
    return plan


def _segments_total(files: list[InputFile], segments: list[Segment], limit: int | None) -> int:
    total = 0
    off = 0
    mine = {s.file for s in segments}
    for i, f in enumerate(files):
        n = f.count()
        if i in mine:
            b = off + n if limit is None else min(off + n, limit)
            total += max(0, b - off)
        off += n
    return total


def dataset_range(n: int, task_id: int, num_tasks: int, limit: int | None) -> tuple[int, int, int]:
    """(first, end before the limit, end) of this task's contiguous rows of a dataset of n rows."""
    lo, hi = task_id * n // num_tasks, (task_id + 1) * n // num_tasks
    # the limit keeps rows with index < limit: a prefix of this task's range
    return lo, hi, hi if limit is None else max(lo, min(hi, limit))


def modulo_total(n: int | None, task_id: int, num_tasks: int, limit: int | None) -> int | None:
    """Rows of this task when it reads the rows whose index % num_tasks == task_id (None: unknown)."""
    if n is not None and limit is not None:
        n = min(n, limit)
    elif limit is not None:
        n = limit
    return None if n is None else max(0, (n - task_id + num_tasks - 1) // num_tasks)

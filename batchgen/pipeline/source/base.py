"""The row contract every source yields, and the Source base class.

A source yields `SourceRow`s for the rows of one task, streaming (memory does not grow with the
input); see the package docstring for what `position` and `index` mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from ..config import ConfigError, JobConfig
from .checks import id_problem


class InputError(ConfigError):
    """An input file or dataset that can't be read, found at start-up or while reading. str() is
    one line naming the file; rows already committed stay."""


@dataclass(frozen=True)
class RowOrigin:
    """Where a row is in the input: `source` is the file (relative to the job file's directory) or
    the dataset, `row` the 0-based row within it, `line` the 1-based line of a JSONL file."""

    source: str
    row: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source} row {self.row}"


@dataclass(frozen=True)
class RowError:
    """What a reader yields instead of a row's values when the row can't be used."""

    reason: str  # one line naming file and line (or dataset and row)
    origin: RowOrigin


# a reader's output for one row: its values (only the job's columns), or why it can't be used
RowRead = dict[str, Any] | RowError


@dataclass(frozen=True)
class SourceRow:
    """One row of a task. `values` holds only the columns the job needs; a row that can't be used
    (malformed or over-long line, a value nested too deeply, an unusable id...) has `error` (one
    line naming file and line), `origin` (where it is) and no values."""

    position: int  # in this task's partition: 0, 1, 2, ... (what the output's ledger records)
    index: int  # in the whole input, in source order: the default id, unique across the input
    values: dict[str, Any]
    error: str | None = None
    origin: RowOrigin | None = None  # set for error rows

    @classmethod
    def of(cls, position: int, index: int, read: RowRead) -> SourceRow:
        if isinstance(read, RowError):
            return cls(position, index, {}, read.reason, read.origin)
        return cls(position, index, read)


class Source:
    """Base of FileSource and DatasetSource: see the package docstring."""

    cfg: JobConfig
    columns: list[str]  # every column the input has
    types: dict[str, pa.DataType]  # arrow types of the copied and id columns
    total: int | None  # rows in this task's partition (after input.limit), when known
    description: str

    def rows(self, start: int = 0) -> Iterator[SourceRow]:
        """This task's rows from position `start` on (the first `start` are skipped cheaply)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the rows and their positions depend on (checked again on resume with identity_change)."""
        return {}

    def check(self) -> None:
        """ConfigError when the job's columns don't fit the input."""

    def _id_checked(self, row: RowRead, origin: RowOrigin) -> RowRead:
        """The row, or an error when its id can't be one (null, NaN, a list, a value the id
        column's type can't hold: written, it would be null or lost)."""
        col = self.cfg.input.id_column
        if col is None or isinstance(row, RowError):
            return row
        problem = id_problem(row.get(col), self.types.get(col))
        if problem is None:
            return row
        return RowError(f"{origin}: id column '{col}' {problem}", origin)

"""Source rows -> work for the engine: a batch of rows rendered and tokenized at a time.

A row that can't be generated (unreadable, too long, a value its column can't hold, a bad
per-row sampling value) becomes error rows here; the run loop commits them like any others.
"""
from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ..config import JobConfig
from ..prompt.builder import Prompt, PromptBuilder
from ..prompt.seeds import row_seed
from ..prompt.request_params import RowParamsError, request_params
from ..files import OutputError
from ..sink.columns import column_value
from .layout import position_id
from .rows import RowBatch, RowShape, error_rows
from .work import WorkItem


@dataclass
class Admitted:
    """One batch of rows: requests for the engine, error rows for the sink, or a fatal problem."""

    requests: list[Any] = field(default_factory=list)  # GenerationRequests, each with its WorkItem as request_id
    errors: list[RowBatch] = field(default_factory=list)
    fatal: str | None = None  # on_too_long: error met a too-long prompt: the job stops


class Intake:
    """Rows are rendered and tokenized `batch` at a time (the tokenizer is much faster in batches) and
    handed out as the engine has room; a stop leaves the ones not handed out unread, as it were."""

    def __init__(self, cfg: JobConfig, rows: Iterator[Any], builder: PromptBuilder, schema: pa.Schema,
                 shape: RowShape, batch: int = 64) -> None:
        self.cfg, self.builder, self.schema, self.shape, self.batch = cfg, builder, schema, shape, batch
        self._rows = rows
        self._source_done = False
        self._ready: deque[Any] = deque()  # admitted, not handed out: GenerationRequests and RowBatches

    @property
    def exhausted(self) -> bool:
        """Every row of this task's share was handed out."""
        return self._source_done and not self._ready

    def take(self, max_requests: int) -> Admitted:
        """Up to `max_requests` requests, in input order, with the error rows met on the way."""
        got = Admitted()
        while len(got.requests) < max_requests and got.fatal is None:
            if not self._ready:
                if self._source_done:
                    break
                self._admit_next()
                continue
            item = self._ready.popleft()
            if isinstance(item, RowBatch):
                got.errors.append(item)
            elif isinstance(item, str):
                got.fatal = item
            else:
                got.requests.append(item)
        return got

    def _admit_next(self) -> None:
        """The next `batch` rows of the source, admitted (fewer at its end)."""
        from ...engine.request import GenerationRequest

        chunk = list(itertools.islice(self._rows, self.batch))
        self._source_done = len(chunk) < self.batch
        for row, p in zip(chunk, self._prompts(chunk)):
            item, err = self._item(row, p)
            if p.fatal:
                self._ready.append(f"row id={item.row_id!r}: prompt too long: {p.error} (on_too_long: error); "
                                   "the job stops")
                self._source_done = True
                return
            if err is None:
                try:
                    params = request_params(self.cfg, item.seed, row.values)
                except RowParamsError as e:  # a bad per-row sampling value fails its row only
                    err = str(e)
            if err is not None:
                self._ready.append(error_rows(self.shape, item, err))
            else:
                self._ready.append(GenerationRequest(prompt=p.token_ids, params=params, request_id=item))

    def _prompts(self, chunk: list[Any]) -> list[Prompt]:
        """Every readable row's prompt, rendered and tokenized together; an unreadable row's is its error."""
        readable = [r for r in chunk if r.error is None]
        built = iter(self.builder.build_many([r.values for r in readable]) if readable else [])
        return [Prompt(None, error=r.error) if r.error is not None else next(built) for r in chunk]

    def _item(self, row: Any, p: Prompt) -> tuple[WorkItem, str | None]:
        """The row's work item and the reason it can't be generated (None: it can)."""
        rid, copied, err = self.row_values(row)
        id_col = self.cfg.input.id_column
        seed_id = row.values.get(id_col) if id_col else row.index
        item = WorkItem(row.position, rid, copied, p.n_tokens, row_seed(self.cfg.sampling.seed, seed_id))
        return item, p.error or err

    def row_values(self, row: Any) -> tuple[Any, dict, str | None]:
        """(id, copied columns, error) of one input row as the output holds them. An id is never
        null: a row without a usable one (not readable, a null id, an id its column can't hold:
        an error row) gets one from its position in the input, so (id, sample_index) stays
        unique; a copied value its column can't hold makes the row an error row that says so."""
        id_col = self.cfg.input.id_column
        raw = row.values.get(id_col) if id_col else row.index
        id_type = self.schema.field("id").type
        err = None
        fits, rid = column_value(raw, id_type)
        if raw is None or not fits:  # a row that could not be read, a null id, an id of another type
            ok, rid = column_value(position_id(id_type, row.index), id_type)
            if not ok:  # an id column typed by an older batchgen (e.g. int32): never write a null instead
                raise OutputError(f"row {row.index} has no usable id, and this output's id column ({id_type}, set by "
                                  "an older batchgen) can't hold one made from its position: write to a new output.path")
            if row.error is None:
                err = (f"id column '{id_col}' " + ("is null" if raw is None else
                       f"value {_short(raw)} does not fit the output's id column ({id_type})")
                       + f"; the row's id {rid!r} is made from its position in the input")
        copied: dict[str, Any] = {}
        for c in self.cfg.input.columns:
            t = self.schema.field(c).type
            fits, v = column_value(row.values.get(c), t)
            copied[c] = v if fits else None
            if not fits and err is None:
                err = (f"input.columns '{c}': value {_short(row.values.get(c))} does not fit the column's type {t} "
                       "(taken from the first rows of the input); the row was not generated")
        return rid, copied, err


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."

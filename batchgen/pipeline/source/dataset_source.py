"""DatasetSource: the rows of a Hugging Face dataset (input.dataset), this task's share of them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from ..config import JobConfig
from .base import RowOrigin, Source, SourceRow
from .checks import check_columns, check_id_type, infer_type, needed_columns
from .dataset_load import import_datasets, load, saved_files
from .files import content_hash
from .identity import IDENTITY_VERSION
from .partition import dataset_range, modulo_total

BATCH = 1024  # rows per batch read from a map-style dataset


class DatasetSource(Source):
    """A local save_to_disk directory, a local dataset directory/files, or a hub id."""

    def __init__(self, cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> None:
        self.cfg = cfg
        self.need = needed_columns(cfg)
        self.limit = cfg.input.limit
        self.task_id, self.num_tasks = task_id, num_tasks
        self.description = cfg.input.dataset or ""
        ds_lib = import_datasets(cfg)
        ds, self.saved_dir = load(cfg, ds_lib)
        self.iterable = isinstance(ds, ds_lib.IterableDataset)
        inp = cfg.input
        feats = getattr(ds, "features", None)
        if feats is not None:
            self.columns = list(feats.keys())
            schema = feats.arrow_schema
            arrow = {n: schema.field(n).type for n in schema.names}
        else:  # streaming with unknown features: peek at the first rows
            first = list(ds.take(100))
            self.columns = list(first[0].keys()) if first else []
            arrow = {c: infer_type([r.get(c) for r in first]) for c in self.columns}
        self.types = {}
        for c in ([inp.id_column] if inp.id_column else []) + list(inp.columns):
            self.types[c] = arrow.get(c, pa.string())
        self.ds = ds
        self._plan(task_id, num_tasks)

    def _stream_length(self) -> int | None:
        """Rows of a streaming dataset's split when its info says (None: unknown)."""
        ds = self.ds
        try:
            info = ds.info.splits.get(self.cfg.input.split or "train") if ds.info and ds.info.splits else None
            return info.num_examples if info is not None and info.num_examples else None
        except Exception:  # noqa: BLE001
            return None

    def _plan(self, task_id: int, num_tasks: int) -> None:
        """Row ranges of the whole dataset, or every N-th row of a stream (never from input.limit)."""
        if self.iterable:
            self.rows_in_input = self._stream_length()
            self.total = modulo_total(self.rows_in_input, task_id, num_tasks, self.limit)
        else:
            self.rows_in_input = len(self.ds)
            self.lo, self.hi, self.end = dataset_range(self.rows_in_input, task_id, num_tasks, self.limit)
            self.total = self.end - self.lo

    def check(self) -> None:
        check_columns(self.cfg, self.columns, f"dataset {self.description}")
        check_id_type(self.cfg, self.types.get(self.cfg.input.id_column or ""), f"dataset {self.description}")

    def identity(self) -> dict[str, Any]:
        inp = self.cfg.input
        ident: dict[str, Any] = {"version": IDENTITY_VERSION, "dataset": self.description, "split": inp.split,
                                 "rows": self.rows_in_input}
        fp = getattr(self.ds, "_fingerprint", None)
        if isinstance(fp, str):
            ident["fingerprint"] = fp  # datasets' hash of its data (save_to_disk) or of its builder config and files
        ident["files"] = self._data_files()
        ident["partition"] = {"mode": "whole" if self.num_tasks == 1 else ("modulo" if self.iterable else "ranges")}
        return ident

    def _data_files(self) -> list[dict[str, Any]]:
        """The files behind the dataset: a saved dataset's arrow files (size and content hash);
        a stream's files (local: size, time, content hash; remote: the URL, which holds the
        resolved revision)."""
        if self.saved_dir is not None:
            return [_saved_entry(self.saved_dir, name) for name in saved_files(self.saved_dir) or []]
        if not self.iterable:
            return []  # a map-style dataset from load_dataset: its fingerprint covers its files
        try:  # datasets keeps a stream's files here (not public API: best effort)
            files = list(self.ds._ex_iterable.kwargs.get("original_files") or [])
        except Exception:  # noqa: BLE001
            files = []
        return [_stream_entry(str(u)) for u in files[:10000]]

    # ------------------------------------------------------------------ reading
    def _values(self, row: Any, j: int | None, need: list[str], missing: list[str]) -> dict[str, Any]:
        r = {c: row.get(c) for c in need} if j is None else {c: row[c][j] for c in need}
        for c in missing:
            r[c] = None
        return r

    def rows(self, start: int = 0) -> Iterator[SourceRow]:
        need = [c for c in self.need if c in self.columns]
        missing = [c for c in self.need if c not in self.columns]
        if self.iterable:
            yield from self._stream_rows(start, need, missing)
        else:
            yield from self._range_rows(start, need, missing)

    def _stream_rows(self, start: int, need: list[str], missing: list[str]) -> Iterator[SourceRow]:
        """Every num_tasks-th row from task_id on (a stream can only be skipped, not indexed)."""
        ds = self.ds
        if self.limit is not None:
            ds = ds.take(self.limit)
        t, N = self.task_id, self.num_tasks
        first_global = t + start * N
        if first_global:
            ds = ds.skip(first_global)
        try:
            ds = ds.select_columns(need)
        except Exception:  # noqa: BLE001 - older datasets / unknown features
            pass
        pos, g = start, first_global
        for i, row in enumerate(ds):
            if i % N == 0:
                r = self._values(row, None, need, missing)
                yield SourceRow.of(pos, g, self._id_checked(r, RowOrigin(self.description, g)))
                pos += 1
            g += 1

    def _range_rows(self, start: int, need: list[str], missing: list[str]) -> Iterator[SourceRow]:
        a = self.lo + start
        if a >= self.end:
            return
        ds = self.ds.select_columns(need).select(range(a, self.end))
        pos, g = start, a
        for batch in ds.iter(batch_size=BATCH):
            n = len(next(iter(batch.values()))) if batch else 0
            for j in range(n):
                r = self._values(batch, j, need, missing)
                yield SourceRow.of(pos, g, self._id_checked(r, RowOrigin(self.description, g)))
                pos += 1
                g += 1


def _saved_entry(d: Path, name: str) -> dict[str, Any]:
    p = d / name
    size = p.stat().st_size
    return {"path": name, "size": size, "sha": content_hash(str(p), size)}


def _stream_entry(u: str) -> dict[str, Any]:
    if os.path.isfile(u):
        st = os.stat(u)
        return {"path": u, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha": content_hash(u, st.st_size)}
    return {"path": u}

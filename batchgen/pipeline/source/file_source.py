"""FileSource: the rows of JSONL and Parquet files (input.files), this task's segments of them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Generator, Iterator

from ..config import ConfigError, JobConfig
from .base import InputError, RowRead, Source, SourceRow
from .checks import check_columns, check_id_type, infer_type, needed_columns, where
from .files import InputFile, content_hash, expand_files
from .identity import IDENTITY_VERSION
from .jsonl import probe_jsonl, read_jsonl
from .parquet import ParquetReader, check_parquet_schemas, inspect_parquet
from .partition import Segment, plan_files


class FileSource(Source):
    def __init__(self, cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> None:
        self.cfg = cfg
        self.files = expand_files(cfg)
        self.need = needed_columns(cfg)
        self.limit = cfg.input.limit
        self.num_tasks = num_tasks
        self.root = str(Path(cfg.base_dir).resolve())
        self._parquet = ParquetReader(self.need, self._id_checked)
        sample = self._inspect()
        first = self.files[0]
        arrow = {n: first.schema.field(n).type for n in first.schema.names} if first.schema is not None else {}
        self.types = {}
        for c in ([cfg.input.id_column] if cfg.input.id_column else []) + list(cfg.input.columns):
            self.types[c] = arrow[c] if c in arrow else infer_type([r.get(c) for r in sample])
        self.description = f"{len(self.files)} file(s)" if len(self.files) > 1 else first.path
        try:  # counting rows reads whole files: a bad one shows here
            plan = plan_files(self.files, task_id, num_tasks, self.limit)
        except InputError as e:
            raise InputError(f"{where(cfg, 'input.files')}: {e}") from None
        self.mode, self.segments, self.owners = plan.mode, plan.segments, plan.owners
        self.rows_in_input, self.total = plan.rows, plan.total

    def _inspect(self) -> list[dict]:
        """Read what is cheap of every file before the model loads: Parquet footers (row counts,
        schemas), the first lines of JSONL files, content hashes. InputError names a file that
        can't be read; ConfigError an input with no rows. Returns the first JSONL file's rows."""
        sample: list[dict] = []
        rows_seen = 0
        at = where(self.cfg, "input.files")
        for i, f in enumerate(self.files):
            try:
                if f.kind == "parquet":
                    inspect_parquet(f)
                    rows_seen += f.count()
                else:
                    f.sha = content_hash(f.path, f.size)
                    keys, rows, seen = probe_jsonl(f)
                    rows_seen += seen
                    if i == 0:
                        self.columns, sample = keys, rows
            except InputError as e:
                raise InputError(f"{at}: {e}") from None
            except OSError as e:
                raise InputError(f"{at}: input file {f.rel}: can't be read: {e}") from None
        first = self.files[0]
        if first.schema is not None:
            self.columns = list(first.schema.names)
        if rows_seen == 0:
            raise ConfigError(f"{at}: input.files: the input holds no rows "
                              f"({len(self.files)} empty file(s), e.g. {first.rel})")
        return sample

    def check(self) -> None:
        first = self.files[0]
        check_columns(self.cfg, self.columns, f"input file {first.path}")
        check_id_type(self.cfg, self.types.get(self.cfg.input.id_column or ""), f"input file {first.rel}")
        check_parquet_schemas(self.cfg, self.files, self.need, self.types)

    def identity(self) -> dict[str, Any]:
        part: dict[str, Any] = {"mode": self.mode}
        if self.owners is not None:
            part["owners"] = self.owners
        if self.mode == "ranges":
            part["rows"] = self.rows_in_input
        return {"version": IDENTITY_VERSION, "root": self.root, "files": [f.entry() for f in self.files],
                "partition": part}

    # ------------------------------------------------------------------ reading
    def rows(self, start: int = 0) -> Iterator[SourceRow]:
        pos = 0
        running = 0  # global index of the next file's first row (lazy offsets: every file, in order)
        for seg in self.segments:
            f = self.files[seg.file]
            goff = running if seg.index < 0 else seg.index
            known = self._rows_from(f, seg)  # rows the file holds from seg.first (None: not counted)
            seg_len = known
            if self.limit is not None:
                room = self.limit - goff
                if room <= 0:
                    return  # segments are in increasing global order
                seg_len = room if seg_len is None else min(seg_len, room)
            skip = max(0, start - pos)
            if skip and seg_len is None:
                seg_len = f.count() - seg.first
            if seg_len is not None and skip >= seg_len:  # all done already: don't open the file
                pos += seg_len
                running = goff + f.count() - seg.first
                continue
            count = None if seg_len is None else seg_len - skip
            pos += skip
            k = yield from self._read_segment(f, seg.first + skip, count, pos, goff + skip)
            if count is not None and k < count and known is not None:
                raise InputError(f"input file {f.rel}: {k:,} rows where {count:,} were expected from row "
                                 f"{seg.first + skip:,} (it changed while the job was running)")
            pos += k
            running = goff + skip + k

    @staticmethod
    def _rows_from(f: InputFile, seg: Segment) -> int | None:
        if seg.end is not None:
            return seg.end - seg.first
        if f.kind == "parquet" or f._count is not None:
            return f.count() - seg.first
        return None

    def _read_segment(self, f: InputFile, first: int, count: int | None, pos: int,
                      index: int) -> Generator[SourceRow, None, int]:
        """Rows first .. first+count of a file as SourceRows from `pos`/`index` on; returns how many."""
        self._check_unchanged(f)
        reads: Iterator[RowRead] = (self._parquet.read(f, first, count) if f.kind == "parquet"
                                    else read_jsonl(f, self.need, first, count, self._id_checked))
        k = 0
        for read in reads:
            yield SourceRow.of(pos + k, index + k, read)
            k += 1
        return k

    def _check_unchanged(self, f: InputFile) -> None:
        """Before reading a file: it is still what start-up saw (hours may have passed). A JSONL
        file may have grown: only the part that existed at start-up is read."""
        try:
            st = os.stat(f.path)
        except OSError as e:
            raise InputError(f"input file {f.rel}: can't be read any more: {e.strerror}") from None
        if (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns):
            return
        grown_jsonl = f.kind == "jsonl" and not f.path.lower().endswith(".gz") and st.st_size > f.size
        if not grown_jsonl or content_hash(f.path, f.size) != f.sha:
            raise InputError(f"input file {f.rel} changed while the job was running (size {f.size:,} -> "
                             f"{st.st_size:,} bytes); its rows would not be the ones the job started with")

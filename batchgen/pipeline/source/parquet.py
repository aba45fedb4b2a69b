"""Parquet files: the footer read at start-up (schema, row groups, a hash of it), the schema
check across files, and reading rows a row group at a time."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Generator, Iterator

import pyarrow as pa

from ..config import ConfigError, JobConfig
from .base import InputError, RowError, RowOrigin, RowRead
from .checks import same_type, where
from .describe import first_line
from .files import InputFile, parquet_footer

BATCH = 1024  # rows per arrow batch read


def inspect_parquet(f: InputFile) -> None:
    """Fill in a Parquet file's hash (of its footer), schema, row groups and row count."""
    import pyarrow.parquet as pq

    footer = parquet_footer(f.path, f.size, f.rel)
    f.sha = hashlib.blake2b(f.size.to_bytes(8, "little") + footer, digest_size=16).hexdigest()
    try:
        md = pq.read_metadata(f.path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a corrupt footer
        raise InputError(f"input file {f.rel}: can't read its Parquet footer: {first_line(e)}") from None
    f.schema = md.schema.to_arrow_schema()
    f.group_rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    f._count = md.num_rows


def check_parquet_schemas(cfg: JobConfig, files: list[InputFile], need: list[str],
                          types: dict[str, pa.DataType]) -> None:
    """Every Parquet file has the job's columns, and the id and copied columns have the first
    file's types (the output's columns have those types: other values would be lost). A column
    all null in the first file takes its type from the first file where it is not (in `types`)."""
    typed = ([cfg.input.id_column] if cfg.input.id_column else []) + list(cfg.input.columns)
    ref = dict(types)
    ref_file: dict[str, str] = {c: files[0].rel for c in ref}
    for f in files:
        if f.schema is None:
            continue
        names = f.schema.names
        for c in need:
            if c not in names:
                raise ConfigError(f"{where(cfg, 'input.files')}: input file {f.rel} has no column '{c}' "
                                  f"(the job reads it; {f.rel} has: {', '.join(names[:20])})")
        for c in typed:
            t = f.schema.field(c).type
            if pa.types.is_null(ref[c]) and not pa.types.is_null(t):
                ref[c], ref_file[c] = t, f.rel
                types[c] = t  # all null in the first file: the output column takes this type
            elif not same_type(ref[c], t):
                raise ConfigError(f"{where(cfg, 'input.files')}: column '{c}' is {t} in {f.rel} but "
                                  f"{ref[c]} in {ref_file[c]}; the output column needs one type")


class ParquetReader:
    """Rows of Parquet files with the job's columns; `id_checked` turns a row with an unusable
    id into a RowError."""

    def __init__(self, need: list[str], id_checked: Callable[[RowRead, RowOrigin], RowRead]) -> None:
        self.need = need
        self.id_checked = id_checked

    def read(self, f: InputFile, first: int, count: int | None) -> Iterator[RowRead]:
        """Rows first .. first+count of a Parquet file, a row group at a time. A row group that
        can't be read (twice) becomes error rows, one per row (the footer says how many); a row
        that can't be converted, one error row."""
        end = sum(f.group_rows) if count is None else min(sum(f.group_rows), first + count)
        names = set(f.schema.names) if f.schema is not None else set()
        cols = [c for c in self.need if c in names]
        off = 0
        pf = None  # the open file, kept across row groups (opened again after a failure)
        for g, n in enumerate(f.group_rows):
            lo, hi = max(first - off, 0), min(end - off, n)  # rows of this group wanted
            if hi > lo:
                pf = yield from self._group_with_retry(f, pf, g, off, cols, lo, hi)
            off += n
            if off >= end:
                return

    def _group_with_retry(self, f: InputFile, pf: Any, g: int, off: int, cols: list[str], lo: int,
                          hi: int) -> Generator[RowRead, None, Any]:
        """Rows lo .. hi of row group g (tried twice); returns the open file for the next group."""
        import pyarrow.parquet as pq

        done = lo
        for attempt in range(2):
            try:
                pf = pf or pq.ParquetFile(f.path)  # opened again for the retry
                for r in self._group_rows(f, pf, g, off, cols, done, hi):
                    yield r
                    done += 1
                return pf
            except Exception as e:  # noqa: BLE001 - pyarrow: OSError, ArrowInvalid, ... for bad data
                pf = None
                if attempt == 1:
                    why = f"row group {g} can't be read: {type(e).__name__}: {first_line(e)}"
                    for k in range(done, hi):
                        yield RowError(f"{f.rel} row {off + k}: {why}", RowOrigin(f.rel, off + k))
        return None

    def _group_rows(self, f: InputFile, pf: Any, g: int, off: int, cols: list[str], lo: int, hi: int) -> Iterator[RowRead]:
        cur = 0
        for batch in pf.iter_batches(batch_size=BATCH, row_groups=[g], columns=cols, use_threads=False):
            bn = batch.num_rows
            a, b = max(lo - cur, 0), min(hi - cur, bn)
            if b > a:
                yield from self._batch_rows(f, batch.slice(a, b - a), off + cur + a)
            cur += bn
            if cur >= hi:
                return

    def _batch_rows(self, f: InputFile, part: Any, row0: int) -> Iterator[RowRead]:
        """The rows of an arrow batch slice whose first row is row `row0` of the file."""
        try:
            rows: list[RowRead] = part.to_pylist()
        except Exception:  # noqa: BLE001 - e.g. invalid UTF-8 in a string: find the rows
            rows = [self._convert_one(part, j, f, row0 + j) for j in range(part.num_rows)]
        for j, r in enumerate(rows):
            if not isinstance(r, RowError):
                for c in self.need:
                    r.setdefault(c, None)
                r = self.id_checked(r, RowOrigin(f.rel, row0 + j))
            yield r

    @staticmethod
    def _convert_one(batch: Any, j: int, f: InputFile, row: int) -> RowRead:
        try:
            return batch.slice(j, 1).to_pylist()[0]
        except Exception as e:  # noqa: BLE001
            o = RowOrigin(f.rel, row)
            return RowError(f"{o}: can't be read: {type(e).__name__}: {first_line(e)}", o)

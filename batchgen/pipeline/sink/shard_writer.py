"""ShardWriter: buffers a task's finished rows and commits them as shards, each by the steps in
the package docstring, keeping the task's Ledger current; with --retry-errors it rewrites the
shards that hold the retried rows in place."""
from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import OutputError, check_no_links, discard, fsync_dir, now_iso, open_new, replace_into, write_error
from .columns import row_stats, rows_table
from .intervals import IntervalSet
from .layout import META_KEY, shard_name
from .ledger import Ledger, ShardRecord
from .paths import OutputPaths
from .shard_file import HashingWriter

Record = tuple[int, list[dict], dict]  # (position, its output rows, its counters)


class ShardWriter:
    """Buffers completed rows and commits them as shards; the run loop calls it (one thread).

    `ledger` is the task's verified Ledger; it is kept current (commits and rewrites are put
    into it). `retry` maps positions being generated again (--retry-errors) to the shard that
    holds them: their rows replace the old ones by a rewrite of that shard."""

    def __init__(
        self,
        out: OutputPaths,
        schema: pa.Schema,
        footer: dict,
        *,
        rows_per_shard: int,
        compression: str,
        flush_seconds: float,
        next_seq: int = 0,
        ledger: Ledger | None = None,
        retry: dict[int, str] | None = None,
    ) -> None:
        self.out = out
        self.schema = schema
        self.footer = footer
        self.rows_per_shard = rows_per_shard
        self.compression = None if compression == "none" else compression
        self.flush_seconds = flush_seconds
        self.ledger = ledger if ledger is not None else Ledger(next_seq=next_seq)
        self._rows_at_start = self.ledger.rows
        self.seq = max(next_seq, self.ledger.next_seq)
        self._records: list[Record] = []
        self._samples = 0
        self._retry = dict(retry or {})
        self._wanted: dict[str, int] = {}  # shard -> its positions still to come back
        for shard in self._retry.values():
            self._wanted[shard] = self._wanted.get(shard, 0) + 1
        self._replaced: dict[str, dict[int, list[dict]]] = {}  # shard -> position -> new rows
        self._replaced_samples = 0
        self._last_flush = time.monotonic()
        self.rewritten = 0  # input rows replaced in place by this run (--retry-errors)
        self.busy = False  # inside a commit: signal handlers must not raise here

    @property
    def rows_committed(self) -> int:
        """Input rows this run committed, from the ledger: the rows it holds now less those it held
        when the run started, plus the rows --retry-errors replaced in place (counted before)."""
        return self.ledger.rows - self._rows_at_start + self.rewritten

    def add(self, pos: int, rows: list[dict], stats: dict) -> None:
        """One input row's output rows (all its samples) and its counters:
        stats = {error_rows, errors, prompt_tokens, completion_tokens}."""
        shard = self._retry.get(pos)
        if shard is not None:
            self._replaced.setdefault(shard, {})[pos] = rows
            self._replaced_samples += len(rows)
            return
        self._records.append((pos, rows, stats))  # one append: a record is in the buffer whole or not at all
        self._samples += len(rows)

    @property
    def pending(self) -> int:
        return self._samples + self._replaced_samples

    def due(self) -> bool:
        if not self._records and not self._replaced:
            return False
        return (self.pending >= self.rows_per_shard or time.monotonic() - self._last_flush >= self.flush_seconds
                or any(self._complete(s) for s in self._replaced))

    def discard(self) -> int:
        """Drop every buffered row (a commit can't be made: they are generated again). Returns
        how many input rows were dropped."""
        n = len(self._records) + sum(len(v) for v in self._replaced.values())
        self._records.clear()
        self._replaced.clear()
        self._samples = self._replaced_samples = 0
        return n

    def flush(self, *, all_rows: bool = True) -> dict | None:
        """Commit the buffered rows (in shards of at most rows_per_shard rows, whole input rows)
        and the rewrites of retried rows. Returns the footer of the last shard committed, or None."""
        last = None
        while self._records:
            take, n = self._next_shard_size()
            if not all_rows and n < self.rows_per_shard:
                break
            batch = self._records[:take]
            del self._records[:take]
            self._samples -= n
            seq = self.seq
            self.seq += 1
            self.busy = True
            try:
                last = self._commit(batch, seq)
            finally:
                self.busy = False
        self._flush_rewrites(all_rows)
        self._last_flush = time.monotonic()
        return last

    def _next_shard_size(self) -> tuple[int, int]:
        """(input rows, output rows) of the next shard: whole input rows, at most rows_per_shard
        output rows (at least one input row)."""
        take, n = 0, 0
        for _, rows, _ in self._records:
            if take and n + len(rows) > self.rows_per_shard:
                break
            take += 1
            n += len(rows)
        return take, n

    def _commit(self, batch: list[Record], seq: int) -> dict:
        batch = sorted(batch, key=lambda r: r[0])  # position order: a rewrite finds a row's samples by position
        rows = [r for _, rs, _ in batch for r in rs]
        meta = self._footer_of(batch, rows, seq)
        name = shard_name(self.out.task_id, seq)
        if os.path.lexists(self.out.path / name):
            raise OutputError(f"shard {self.out.path / name} already exists; it is never rewritten")
        self._write(name, rows_table(self.schema, rows, meta), meta, "commit")
        meta["name"] = name
        return meta

    def _footer_of(self, batch: list[Record], rows: list[dict], seq: int) -> dict:
        """The footer metadata of a new shard of `batch` (sorted by position)."""
        meta = dict(self.footer)
        meta.update(
            task=self.out.task_id,
            seq=seq,
            num_tasks=self.out.num_tasks,
            generation=self.out.generation,
            layout="sorted",
            page_checksums=True,
            positions=IntervalSet.from_points(p for p, _, _ in batch).ranges(),
            error_positions=IntervalSet.from_points(
                p for p, rs, _ in batch if any(r.get("error") is not None for r in rs)).ranges(),
            rows=len(batch),
            samples=len(rows),
            errors=sum(int(s.get("errors", 0)) for _, _, s in batch),
            error_rows=sum(int(s.get("error_rows", 0)) for _, _, s in batch),
            prompt_tokens=sum(int(s.get("prompt_tokens", 0)) for _, _, s in batch),
            completion_tokens=sum(int(s.get("completion_tokens", 0)) for _, _, s in batch),
            incomplete=sum(r.get("finish_reason") == "length" for r in rows),
            created=now_iso(),
        )
        return meta

    def _write(self, name: str, table: pa.Table, meta: dict, kind: str) -> None:
        """tmp (hashed while written) -> fsync -> ledger record -> rename -> fsync the directory."""
        out = self.out
        out.check_generation(out.generation)
        final, tmp = out.path / name, out.path / f".{name}.tmp"
        check_no_links(out.path, final)
        lf = out.ledger_file()
        try:
            with open_new(out.path, tmp) as fh:
                hw = HashingWriter(fh)
                pq.write_table(table, hw, compression=self.compression, row_group_size=max(table.num_rows, 1),
                               write_page_checksum=True)
                fh.flush()
                os.fsync(fh.fileno())
            rec = _record_of(out, name, meta, kind, hw)
            lf.append(rec)
            try:
                replace_into(out.path, tmp, final)
            except BaseException:
                lf.undo_last()
                raise
        except OSError as e:
            discard(tmp)
            raise write_error(e, tmp) from None
        except BaseException:
            discard(tmp)
            raise
        fsync_dir(out.path)
        self.ledger.put(rec)

    # --retry-errors: replace rows in the shards that hold them
    def _complete(self, shard: str) -> bool:
        return len(self._replaced.get(shard, {})) >= self._wanted.get(shard, 0)

    def _flush_rewrites(self, all_rows: bool) -> None:
        ready = [s for s in self._replaced if all_rows or self._complete(s)]
        jobs = [(s, self._replaced.pop(s)) for s in ready]
        self._replaced_samples -= sum(len(r) for _, new in jobs for r in new.values())
        for shard, new in jobs:
            self.busy = True
            try:
                self._rewrite(shard, new)
            finally:
                self.busy = False
            for p in new:
                self._retry.pop(p, None)
            self._wanted[shard] -= len(new)

    def _rewrite(self, name: str, new: dict[int, list[dict]]) -> None:
        rec = self.ledger.records[name]
        path = self.out.path / name
        table = pq.read_table(path)
        old = table.to_pylist()
        positions = list(IntervalSet(rec.positions).points())
        per = rec.samples // max(rec.rows, 1)
        if len(old) != len(positions) * per:
            raise OutputError(f"{path} holds {len(old)} rows, its record says {len(positions)} x {per}: not rewritten")
        groups = {p: old[i * per:(i + 1) * per] for i, p in enumerate(positions)}
        for p, rows in new.items():
            groups[p] = rows
        rows = [r for p in positions for r in groups[p]]
        meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        meta.update(row_stats([groups[p] for p in positions]))
        meta.update(
            generation=self.out.generation,
            error_positions=IntervalSet.from_points(
                p for p in positions if any(r.get("error") is not None for r in groups[p])).ranges(),
            page_checksums=True,
            rewritten=now_iso(),
        )
        fresh = rows_table(self.schema, rows, meta)
        now = fresh.to_pylist()
        changed = sum(now[i * per:(i + 1) * per] != old[i * per:(i + 1) * per] for i in range(len(positions)))
        if not changed:
            return  # the rows came back the same (an input error): nothing to replace
        self._write(name, fresh, meta, "rewrite")
        self.rewritten += changed


def _record_of(out: OutputPaths, name: str, meta: dict, kind: str, hw: HashingWriter) -> ShardRecord:
    """The ledger record of shard `name`, just written through `hw`, with footer `meta`."""
    return ShardRecord(
        name, out.task_id, int(meta["seq"]), kind=kind, generation=out.generation,
        positions=meta["positions"], error_positions=meta["error_positions"], rows=int(meta["rows"]),
        samples=int(meta["samples"]), errors=int(meta["errors"]), error_rows=int(meta["error_rows"]),
        prompt_tokens=int(meta["prompt_tokens"]), completion_tokens=int(meta["completion_tokens"]),
        incomplete=int(meta.get("incomplete", 0)), bytes=hw.n, sha256=hw.h.hexdigest(), created=now_iso())

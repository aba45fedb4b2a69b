"""A task's ledger: one ShardRecord a line in OUT/.batchgen/ledger/task-NNNNN.jsonl (LedgerFile),
and the shards it trusts with their counters kept current (Ledger): the one source of a task's
progress counts."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from ..files import OutputError, fsync_dir, is_link, link_error, make_dirs, open_regular, write_error
from .intervals import IntervalSet, fmt_range
from .layout import SHARD_RE


@dataclass
class ShardRecord:
    """One line of a task's ledger: a shard it committed ("commit"), rewrote in place ("rewrite",
    --retry-errors) or stopped trusting ("retire": missing or corrupt; its rows are made again).
    A shard's latest record is the one in force."""

    name: str
    task: int
    seq: int
    kind: str = "commit"
    generation: str = ""
    positions: list[list[int]] = field(default_factory=list)
    error_positions: list[list[int]] = field(default_factory=list)
    rows: int = 0  # input rows
    samples: int = 0  # output rows
    errors: int = 0  # output rows with error set
    error_rows: int = 0  # input rows with an error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    incomplete: int = 0  # output rows cut by max_new_tokens (finish_reason "length")
    bytes: int = 0
    sha256: str = ""
    layout: str = "sorted"  # rows in position order, samples // rows per position ("": older batchgen)
    created: str = ""
    note: str = ""

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_dict(cls, d: Any) -> "ShardRecord":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not SHARD_RE.match(d["name"]):
            raise ValueError("not a shard record")
        known = {f.name: f for f in fields(cls)}
        rec = cls(**{k: v for k, v in d.items() if k in known})
        for f in fields(cls):
            v = getattr(rec, f.name)
            want = {"int": int, "str": str}.get(str(f.type))
            if want is not None and (not isinstance(v, want) or isinstance(v, bool)):
                raise ValueError(f"field {f.name}: {v!r}")
            if f.name in ("positions", "error_positions") and not (isinstance(v, list) and all(
                    isinstance(x, list) and len(x) == 2 and all(type(y) is int and y >= 0 for y in x) for x in v)):
                raise ValueError(f"field {f.name}: not a list of [start, end] ranges")
        return rec


class LedgerFile:
    """OUT/.batchgen/ledger/task-NNNNN.jsonl: append-only, one ShardRecord a line, fsynced. A torn
    last line (a crash mid-append) is not a record: it is ignored, and cut off before appending."""

    def __init__(self, root: Path, path: Path) -> None:
        self.root, self.path = root, path
        self._fd: int | None = None
        self._undo: int | None = None

    def read(self, *, strict: bool = True) -> list[ShardRecord] | None:
        """The records, or None when there is no ledger. strict: a bad line (other than a torn
        last one) raises OutputError naming it; otherwise it is skipped."""
        if is_link(self.path):
            raise link_error(self.path)
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            lines = f.read().split(b"\n")
        out = []
        for i, line in enumerate(lines[:-1]):  # lines[-1]: empty, or a torn last line
            if not line.strip():
                continue
            try:
                out.append(ShardRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError) as e:
                if strict:
                    raise OutputError(
                        f"{self.path}:{i + 1}: not a ledger record ({str(e)[:80]}); the ledger is batchgen's "
                        "checkpoint and is only appended to: restore it, or move it away and rerun to rebuild it "
                        "from the shards' footers") from None
        return out

    def _open(self) -> int:
        if self._fd is None:
            make_dirs(self.root, self.path.parent)
            try:
                self._fd = open_regular(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise link_error(self.path) from None
                raise write_error(e, self.path) from None
            size = os.lseek(self._fd, 0, os.SEEK_END)
            if size and os.pread(self._fd, 1, size - 1) != b"\n":
                os.ftruncate(self._fd, _after_last_newline(self._fd, size))  # a torn last line: not a record
        return self._fd

    def append(self, rec: ShardRecord) -> None:
        """Append and fsync one record; on failure the file is cut back to where it was."""
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        data = memoryview(rec.to_line())
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise write_error(e, self.path) from None
        if start == 0:
            fsync_dir(self.path.parent)
        self._undo = start

    def undo_last(self) -> None:
        """Take back the last append (its shard's rename failed)."""
        if self._fd is not None and self._undo is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._undo)
                os.fsync(self._fd)
            self._undo = None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _after_last_newline(fd: int, size: int) -> int:
    """The offset just past the last newline in the first `size` bytes of fd (0 if none)."""
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


COUNTERS = ("rows", "samples", "errors", "error_rows", "prompt_tokens", "completion_tokens", "incomplete")


@dataclass
class Ledger:
    """The shards one task trusts (their latest records) and the next sequence number."""

    records: dict[str, ShardRecord] = field(default_factory=dict)
    next_seq: int = 0
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @classmethod
    def from_records(cls, recs: Iterable[ShardRecord]) -> "Ledger":
        led = cls()
        for r in recs:
            led.put(r)
        return led

    def put(self, rec: ShardRecord) -> None:
        """A record in force from now on (totals kept current: progress reads them often)."""
        old = self.records.pop(rec.name, None)
        if old is not None:
            for k in COUNTERS:
                self.totals[k] -= int(getattr(old, k))
        if rec.kind != "retire":
            self.records[rec.name] = rec
            for k in COUNTERS:
                self.totals[k] += int(getattr(rec, k))
        self.next_seq = max(self.next_seq, rec.seq + 1)

    @property
    def done(self) -> IntervalSet:
        return IntervalSet(x for r in self.records.values() for x in r.positions)

    @property
    def shards(self) -> list[str]:
        return sorted(self.records)

    rows = property(lambda self: self.totals["rows"])
    samples = property(lambda self: self.totals["samples"])
    errors = property(lambda self: self.totals["errors"])
    error_rows = property(lambda self: self.totals["error_rows"])
    prompt_tokens = property(lambda self: self.totals["prompt_tokens"])
    completion_tokens = property(lambda self: self.totals["completion_tokens"])

    def first_overlap(self) -> str | None:
        """'positions a-b are in both X and Y' for the first position held twice, else None."""
        return first_overlap((r.positions, r.name) for r in self.records.values())


def first_overlap(held: Iterable[tuple[list[list[int]], str]]) -> str | None:
    """The first position in the ranges of two names, as 'positions a-b are in both X and Y'
    (one sort of every range: a task may have many shards)."""
    spans = sorted((int(a), int(b), name) for ranges, name in held for a, b in ranges if a < b)
    end, owner = -1, ""
    for a, b, name in spans:
        if a < end:
            return f"positions {fmt_range([a, min(b, end)])} are in both {owner} and {name}"
        if b > end:
            end, owner = b, name
    return None

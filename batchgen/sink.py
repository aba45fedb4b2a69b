"""Rows out: sharded Parquet, committed atomically; each task's ledger lists what it committed.

Layout of an output directory (everything but the shards is hidden, so
`datasets.load_dataset("parquet", data_dir=OUT)` and `pyarrow.dataset.dataset(OUT)` read only
the shards):

    OUT/part-t00000-000000.parquet          shards: task 0, sequence 0, ...
    OUT/.part-t00000-000001.parquet.tmp     a shard being written
    OUT/.batchgen/manifest.json             the job: fingerprint, config, schema, num_tasks, generation
    OUT/.batchgen/ledger/task-00000.jsonl   task 0's committed shards, one ShardRecord a line (append-only)
    OUT/.batchgen/progress/task-00000.json  per-task state, rows done, shards, tokens, tok/s
    OUT/.batchgen/summary.json              the summary of the finished job (per task: summary-t00000.json)
    OUT/.batchgen/locks/                    task-00000.lock: one process per task; output.lock: held
                                            shared by every run, exclusive to replace the output
    OUT/.batchgen/quarantine/               shards that failed verification, moved out of the dataset

A shard is committed by: write `.part-...tmp` (its sha256 computed while writing) -> fsync ->
append its ShardRecord to the task's ledger -> fsync -> rename to `part-...parquet` -> fsync the
directory. The ledger is the checkpoint: a run trusts only the shards its ledger lists, at the
recorded size and sha256 (checked on every start); a recorded shard whose rename did not happen
is renamed from its temp file. `--retry-errors` rewrites a shard in place by the same steps (a
"rewrite" record, then a rename over the old file: readers see the old or the new shard whole).

Nothing is written, truncated, renamed onto or deleted through a symbolic link inside OUT (OUT
itself may be one): every such path is checked with lstat and files are opened with O_NOFOLLOW.
"""
from __future__ import annotations

import base64
import bisect
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import socket
import stat
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

META_DIR = ".batchgen"
META_KEY = b"batchgen"
SHARD_RE = re.compile(r"^part-t(\d{5})-(\d{6})\.parquet$")
TMP_RE = re.compile(r"^\.part-t(\d{5})-(\d{6})\.parquet\.tmp$")
FORMAT_VERSION = 2  # 2: per-task ledgers, generation, sorted shards with page checksums
LEDGER_DIR, PROGRESS_DIR, LOCK_DIR, QUARANTINE_DIR = "ledger", "progress", "locks", "quarantine"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}

# batchgen's own files under OUT/.batchgen, by folder: the only ones clear() deletes there
_OWN_META = {
    "": re.compile(r"^(manifest\.json(\.corrupt)?|summary(-t\d{5})?\.json"
                   r"|\.(manifest|summary(-t\d{5})?)(\.json)?\.\d+\.tmp)$"),
    PROGRESS_DIR: re.compile(r"^\.?task-\d{5}\.json(\.\d+\.tmp)?$"),
    LEDGER_DIR: re.compile(r"^task-\d{5}\.jsonl$"),
    QUARANTINE_DIR: re.compile(r"^part-t\d{5}-\d{6}\.parquet(\.\d+)?$"),
}


class OutputError(RuntimeError):
    """The output directory can't be used as asked (another job's output, a running task...)."""


class LinkError(OutputError):
    """A path batchgen would write, truncate, rename onto or delete is a symbolic link."""


class WriteError(OutputError):
    """Writing batchgen's files failed (the file system said no)."""


class DiskFullError(WriteError):
    """No space left (ENOSPC, EDQUOT) or a file size limit (EFBIG)."""


def shard_name(task: int, seq: int) -> str:
    return f"part-t{task:05d}-{seq:06d}.parquet"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def fsync_dir(path: str | os.PathLike[str]) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- never through a link
def _is_link(p: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(p).st_mode)
    except OSError:
        return False


def link_error(p: Path) -> LinkError:
    return LinkError(f"{p} is a symbolic link; batchgen never writes, truncates or deletes through a link in "
                     "its output: replace the link with a real directory or file, or choose another output.path")


def write_error(e: OSError, path: Path) -> WriteError:
    if e.errno in _FULL:
        return DiskFullError(f"no space left writing {path} ({e.strerror or e}: the disk is full, or a quota or "
                             "file size limit was reached)")
    return WriteError(f"can't write {path}: {e.strerror or e}")


def check_no_links(root: Path, path: Path) -> None:
    """Raise LinkError when `path` or a directory between `root` (exclusive) and it is a symbolic
    link. Stops at the first component that does not exist (it will be created, not followed)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        root, rel = path.parent, Path(path.name)
    cur = root
    for part in rel.parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise link_error(cur)


def make_dirs(root: Path, path: Path) -> None:
    """mkdir -p `path` below `root`, refusing a link or a non-directory on the way. `root` (OUT)
    is created as given: the user may point it anywhere, links included."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        cur = root
        for part in path.relative_to(root).parts:
            cur = cur / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(cur)
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                raise link_error(cur)
            if not stat.S_ISDIR(st.st_mode):
                raise OutputError(f"{cur} is not a directory; batchgen keeps its own files there: move it away")
    except OSError as e:
        raise write_error(e, path) from None


def open_new(root: Path, path: Path) -> BinaryIO:
    """Open a temp file of batchgen's for writing: created here, never a link (O_EXCL|O_NOFOLLOW).
    A stale one of the same name (from a crash) is replaced."""
    check_no_links(root, path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        if _is_link(path):
            raise link_error(path) from None
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "wb")


def replace_into(root: Path, src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`, never onto a link (the link would go, its target would not change:
    still not what the user set up)."""
    check_no_links(root, dst)
    os.replace(src, dst)


def _discard(path: Path) -> None:
    """Remove a temp file this process created (a link is never one: left alone)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


def _meta_root(path: Path) -> Path:
    """OUT for a path under OUT/.batchgen (links are checked from there down), else its folder."""
    parts = path.parts[:-1]
    if META_DIR in parts:
        i = len(parts) - 1 - parts[::-1].index(META_DIR)
        return Path(*parts[:i]) if i else Path(".")
    return path.parent


def write_json_atomic(path: Path, data: Any, root: Path | None = None) -> None:
    """Write JSON to `path` by a temp file and a rename; no component under OUT may be a link.
    Raises DiskFullError / WriteError (the temp file removed) when the file system refuses."""
    path = Path(path)
    root = root if root is not None else _meta_root(path)
    make_dirs(root, path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    blob = (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode()
    try:
        with open_new(root, tmp) as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        replace_into(root, tmp, path)
    except OSError as e:
        _discard(tmp)
        raise write_error(e, path) from None
    except BaseException:
        _discard(tmp)
        raise


def read_json(path: Path) -> Any:
    """The JSON at `path`, or None when it is missing or unreadable."""
    return read_json_checked(path)[0]


def read_json_checked(path: Path) -> tuple[Any, str | None]:
    """(data, None), or (None, why): "missing", or "unreadable (reason)"."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, "a symbolic link" if e.errno == errno.ELOOP else f"unreadable ({e.strerror or e})"
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read().decode("utf-8")), None
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"


def repeated_ids(shards: list[Path], examples: int = 3) -> tuple[int, list[Any]]:
    """Ids written by more than one input row (a row's first sample counts): (how many ids, a few
    of them). Reads only the id column, vectorised."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not shards:
        return 0, []
    ids = pds.dataset([str(p) for p in shards], format="parquet").to_table(
        columns=["id"], filter=pc.field("sample_index") == 0).column("id")
    counts = pc.value_counts(pc.drop_null(ids))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(repeated), repeated.slice(0, examples).to_pylist()


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a regular file, read without following a link."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    h = hashlib.sha256()
    n = 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through (the shard's sha256 without a re-read)."""

    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self.f.write(mv)
        self.h.update(mv)
        self.n += len(mv)
        return len(mv)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        self.f.flush()


# --------------------------------------------------------------------------- the done-set
class IntervalSet:
    """A set of non-negative ints as sorted, merged half-open ranges [a, b)."""

    def __init__(self, ranges: Iterable[Iterable[int]] = ()) -> None:
        self.r: list[list[int]] = []
        for a, b in sorted((int(x[0]), int(x[1])) for x in ranges):
            self._append(a, b)

    def _append(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.r and a <= self.r[-1][1]:
            self.r[-1][1] = max(self.r[-1][1], b)
        else:
            self.r.append([a, b])

    @classmethod
    def from_points(cls, points: Iterable[int]) -> "IntervalSet":
        s = cls()
        for p in sorted(points):
            s._append(p, p + 1)
        return s

    def update(self, other: "IntervalSet") -> None:
        merged = sorted(self.r + other.r)
        self.r = []
        for a, b in merged:
            self._append(a, b)

    def minus(self, other: "IntervalSet") -> "IntervalSet":
        """The points of self not in other."""
        out = IntervalSet()
        for a, b in self.r:
            for c, d in other.r:
                if d <= a or c >= b:
                    continue
                out._append(a, min(b, c))
                a = max(a, d)
            out._append(a, b)
        return out

    def overlap(self, other: "IntervalSet") -> list[int] | None:
        """The first range [a, b) in both sets, or None."""
        i = j = 0
        while i < len(self.r) and j < len(other.r):
            a, b = max(self.r[i][0], other.r[j][0]), min(self.r[i][1], other.r[j][1])
            if a < b:
                return [a, b]
            if self.r[i][1] < other.r[j][1]:
                i += 1
            else:
                j += 1
        return None

    def points(self) -> Iterator[int]:
        for a, b in self.r:
            yield from range(a, b)

    def __contains__(self, p: int) -> bool:
        i = bisect.bisect_right(self.r, [p, float("inf")]) - 1
        return i >= 0 and self.r[i][0] <= p < self.r[i][1]

    def __len__(self) -> int:
        return sum(b - a for a, b in self.r)

    def prefix_end(self) -> int:
        """k such that 0..k-1 are all in the set."""
        return self.r[0][1] if self.r and self.r[0][0] == 0 else 0

    def covers(self, n: int) -> bool:
        return self.prefix_end() >= n

    def ranges(self) -> list[list[int]]:
        return [list(x) for x in self.r]


def _fmt_range(r: list[int]) -> str:
    return str(r[0]) if r[1] == r[0] + 1 else f"{r[0]}-{r[1] - 1}"


# --------------------------------------------------------------------------- output schema and values
OUTPUT_FIXED = ["completion", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


def output_schema(id_type: pa.DataType, copied: list[tuple[str, pa.DataType]],
                  extra: list[pa.Field] | None = None) -> pa.Schema:
    """The output's columns: id, sample_index, the copied ones, the generation's, then `extra` (what the job asked
    for: reasoning, logprobs, top_logprobs)."""
    fields_ = [pa.field("id", id_type), pa.field("sample_index", pa.int32())]
    fields_ += [pa.field(n, t) for n, t in copied]
    fields_ += [
        pa.field("completion", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields_ + list(extra or ()))


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(s: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s)))


def _is_stringy(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def stringify(v: Any) -> str:
    """A value as it is kept in a string column: strings as they are, anything else as JSON."""
    return v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)


def column_value(v: Any, t: pa.DataType) -> tuple[bool, Any]:
    """(fits, value as written) of one value for a column of type t: a string column keeps any
    value (as JSON text); other types must hold it as it is. Never turns a value into null."""
    if v is None:
        return True, None
    if _is_stringy(t):
        return True, stringify(v)
    if isinstance(v, bool) and not pa.types.is_boolean(t):
        return False, v  # JSON true is not the integer 1
    try:
        pa.array([v], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
        return False, v
    return True, v


def _column(values: list[Any], t: pa.DataType, name: str) -> pa.Array:
    try:
        if not _is_stringy(t):
            return pa.array(values, type=t)
        return pa.array([None if v is None else stringify(v) for v in values], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError, OverflowError):
        pass
    bad = next(v for v in values if not column_value(v, t)[0])
    # the job checks every value before a row is generated: reaching this is a bug, never a null
    raise OutputError(f"column '{name}': value {bad!r} does not fit its type {t}; nothing was written")


# --------------------------------------------------------------------------- the ledger
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
        if _is_link(self.path):
            raise link_error(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
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
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
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


@dataclass
class Ledger:
    """The shards one task trusts (their latest records) and the next sequence number."""

    records: dict[str, ShardRecord] = field(default_factory=dict)
    next_seq: int = 0
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0))

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
            for k in _COUNTERS:
                self.totals[k] -= int(getattr(old, k))
        if rec.kind != "retire":
            self.records[rec.name] = rec
            for k in _COUNTERS:
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


_COUNTERS = ("rows", "samples", "errors", "error_rows", "prompt_tokens", "completion_tokens", "incomplete")


def first_overlap(held: Iterable[tuple[list[list[int]], str]]) -> str | None:
    """The first position in the ranges of two names, as 'positions a-b are in both X and Y'
    (one sort of every range: a task may have many shards)."""
    spans = sorted((int(a), int(b), name) for ranges, name in held for a, b in ranges if a < b)
    end, owner = -1, ""
    for a, b, name in spans:
        if a < end:
            return f"positions {_fmt_range([a, min(b, end)])} are in both {owner} and {name}"
        if b > end:
            end, owner = b, name
    return None


def read_shard_meta(path: str | os.PathLike[str]) -> dict:
    md = pq.read_schema(path).metadata or {}
    raw = md.get(META_KEY)
    if raw is None:
        raise OutputError(f"{path} is not a batchgen shard (no batchgen metadata)")
    return json.loads(raw)


def row_stats(groups: list[list[dict]]) -> dict[str, int]:
    """The counters of input rows' output rows (one list of samples per input row), as the run
    loop counts them: prompt tokens only for rows with a sample that did not fail."""
    errors = error_rows = ptoks = ctoks = incomplete = 0
    for rows in groups:
        incomplete += sum(r.get("finish_reason") == "length" for r in rows)
        bad = sum(r.get("error") is not None for r in rows)
        errors += bad
        error_rows += int(bad > 0)
        ok = next((r for r in rows if r.get("error") is None), None)
        ptoks += int((ok or {}).get("prompt_tokens") or 0)
        ctoks += sum(int(r.get("completion_tokens") or 0) for r in rows)
    return {"errors": errors, "error_rows": error_rows, "prompt_tokens": ptoks, "completion_tokens": ctoks,
            "incomplete": incomplete}


# --------------------------------------------------------------------------- the output directory
class OutputDir:
    def __init__(self, path: str | os.PathLike[str], task_id: int = 0, num_tasks: int = 1) -> None:
        self.path = Path(path)
        self.meta = self.path / META_DIR
        self.task_id = task_id
        self.num_tasks = num_tasks
        self.generation = ""
        self._lock_fd: int | None = None
        self._share_fd: int | None = None
        self._ledger: LedgerFile | None = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.unlock()

    # paths
    @property
    def manifest_path(self) -> Path:
        return self.meta / "manifest.json"

    def progress_path(self, task: int | None = None) -> Path:
        return self.meta / PROGRESS_DIR / f"task-{self.task_id if task is None else task:05d}.json"

    def summary_path(self, task: int | None = None) -> Path:
        if self.num_tasks == 1:
            return self.meta / "summary.json"
        return self.meta / f"summary-t{self.task_id if task is None else task:05d}.json"

    def ledger_path(self, task: int | None = None) -> Path:
        return self.meta / LEDGER_DIR / f"task-{self.task_id if task is None else task:05d}.jsonl"

    def ledger_file(self, task: int | None = None) -> LedgerFile:
        if task is None or task == self.task_id:
            if self._ledger is None:
                self._ledger = LedgerFile(self.path, self.ledger_path())
            return self._ledger
        return LedgerFile(self.path, self.ledger_path(task))

    def shard_files(self, task: int | None = None) -> list[Path]:
        if not self.path.is_dir():
            return []
        out = []
        for n in sorted(os.listdir(self.path)):
            m = SHARD_RE.match(n)
            if m and (task is None or int(m.group(1)) == task):
                out.append(self.path / n)
        return out

    def manifest(self) -> dict | None:
        data = read_json(self.manifest_path)
        return data if isinstance(data, dict) else None

    def read_manifest(self) -> tuple[dict | None, str | None]:
        """(manifest, None), or (None, why): "missing", "unreadable (...)", "a symbolic link"."""
        if _is_link(self.meta):
            raise link_error(self.meta)
        data, why = read_json_checked(self.manifest_path)
        if why is None and not isinstance(data, dict):
            return None, "unreadable (not a JSON object)"
        if why == "a symbolic link":
            raise link_error(self.manifest_path)
        return data, why

    def has_committed_rows(self) -> bool:
        """Whether any task committed a shard here (a shard file, or a ledger with records)."""
        if self.shard_files():
            return True
        d = self.meta / LEDGER_DIR
        try:
            return any(os.lstat(d / n).st_size > 0 for n in os.listdir(d) if _OWN_META[LEDGER_DIR].match(n))
        except OSError:
            return False

    # setup
    def prepare(self, manifest: dict, overwrite: bool = False, say: Callable[[str], None] | None = None) -> dict:
        """Create the manifest, or check that the existing one is this job's; then hold the output
        lock shared for as long as this object is locked (until unlock()). Returns the manifest in
        force. A different job's manifest is replaced only when no task of it is running, and
        only with `overwrite` once it has committed rows (a manifest without rows binds nothing)."""
        make_dirs(self.path, self.meta)
        say = say or (lambda m: None)
        # one task at a time: with --overwrite, a task that read the old manifest must not clear
        # what a faster task already wrote under the new one (it sees the new manifest instead)
        with self._exclusive("prepare.lock"):
            m = self._prepare(dict(manifest), overwrite, say)
            self.generation = str(m.get("generation") or "")
            self._hold_shared()
            return m

    def _prepare(self, new: dict, overwrite: bool, say: Callable[[str], None]) -> dict:
        existing, why = self.read_manifest()
        committed = self.has_committed_rows()
        if existing is not None:
            problem = manifest_mismatch(existing, new)
            if problem is None:
                return existing
            if committed and not overwrite:
                raise OutputError(f"output {self.path} holds a different job ({problem}); pass --overwrite to "
                                  "replace it (its shards are deleted), or choose another output.path")
            self._replace_output()
            if not committed:
                say(f"note: {self.path} held a job that committed no rows ({problem}); replacing it")
        elif self.shard_files():  # rows are here: only their own footers may say whose they are
            rebuilt = self._manifest_from_shards(new, why or "missing")
            if rebuilt is not None:
                say(f"note: {self.manifest_path} was {why}; rebuilt it from the shards' footers (this job, "
                    f"{rebuilt['num_tasks']} task(s))")
                if why != "missing":
                    replace_into(self.path, self.manifest_path, self.meta / "manifest.json.corrupt")
                return self._write_manifest(rebuilt)
            if not overwrite:
                mf = f"no {META_DIR}/manifest.json" if why == "missing" else f"its {META_DIR}/manifest.json is {why}"
                raise OutputError(
                    f"output {self.path} holds part-*.parquet shards that are not this job's, and {mf}; "
                    "pass --overwrite to replace them (they are deleted), or choose another output.path")
            self._replace_output()
        elif why != "missing" or committed:  # no shard left: a manifest or ledger without rows binds nothing
            self._replace_output()
            say(f"note: {self.manifest_path} was {why} and no shard is here; starting the output again")
        new.setdefault("format", FORMAT_VERSION)
        new["generation"] = uuid.uuid4().hex  # this output's identity: a commit checks it is still in force
        return self._write_manifest(new)

    def _write_manifest(self, manifest: dict) -> dict:
        make_dirs(self.path, self.meta)
        tmp = self.meta / f".manifest.json.{os.getpid()}.tmp"
        try:
            with open_new(self.path, tmp) as f:
                f.write((json.dumps(manifest, indent=2, default=str) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            check_no_links(self.path, self.manifest_path)
            try:
                os.link(tmp, self.manifest_path)  # atomic create: a task on a file system without locks may race us
            except FileExistsError:
                existing = self.manifest() or {}
                problem = manifest_mismatch(existing, manifest)
                if problem is not None:
                    raise OutputError(f"output {self.path} was just created by a different job ({problem})") from None
                return existing
            except OSError as e:
                if e.errno in _FULL:
                    raise
                os.replace(tmp, self.manifest_path)  # no hard links here: plain rename (same content)
        except OSError as e:
            raise write_error(e, self.manifest_path) from None
        finally:
            _discard(tmp)
        fsync_dir(self.meta)
        return manifest

    def _manifest_from_shards(self, new: dict, why: str) -> dict | None:
        """The manifest of this output rebuilt from its shards' footers when they are all this
        job's, with this task count, of one generation; None when they are another job's. Raises
        OutputError with what to do when it can't be told safely."""
        metas = []
        for p in self.shard_files():
            if _is_link(p):
                raise link_error(p)
            try:
                metas.append(read_shard_meta(p))
            except Exception:  # noqa: BLE001 - not batchgen's, or unreadable: not this job's shards
                return None
        if any(m.get("fingerprint") != new.get("fingerprint") for m in metas):
            return None
        where = f"{self.manifest_path} is {why}"
        if any("num_tasks" not in m or "generation" not in m for m in metas):
            raise OutputError(f"{where}, and the shards (written by an older batchgen) don't record their task count, "
                              "so it can't be rebuilt safely: restore it from a backup, or move the shards out of "
                              f"{self.path} to start over")
        counts = {m["num_tasks"] for m in metas}
        gens = {m["generation"] for m in metas}
        if counts != {new.get("num_tasks")}:
            raise OutputError(f"{where}; its shards were written with {sorted(counts)} task(s), this run has "
                              f"{new.get('num_tasks')}: rerun with the same --num-tasks (the manifest is rebuilt)")
        if len(gens) > 1:
            raise OutputError(f"{where}, and its shards come from {len(gens)} different runs of this path: move the "
                              f"shards out of {self.path} (or restore the manifest from a backup)")
        src = source_sha(new.get("source"))
        if any(m.get("source_sha") not in (None, src) for m in metas):
            raise OutputError(f"{where}, and the input changed since the shards were written: restore the input (or "
                              "the manifest from a backup)")
        return {**new, "format": FORMAT_VERSION, "generation": gens.pop(), "rebuilt": now_iso()}

    def _replace_output(self) -> None:
        """Clear the output for another job: only while no task of it runs (an exclusive hold of
        the output lock that every run holds shared), else refused naming the running tasks."""
        import fcntl

        fd = self._lock_file("output.lock")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                running = self.running_tasks()
                raise OutputError(
                    f"output {self.path} is in use: {', '.join(running) if running else 'another batchgen process'} "
                    "is running there, and a task writing the old job's shards would go on doing so: stop it or "
                    "let it finish, then rerun") from None
            except OSError:
                pass  # no locks on this file system: commits still check the manifest's generation
            self.clear()
        finally:
            os.close(fd)

    def running_tasks(self) -> list[str]:
        """'task N (pid P on host)' for every other task whose lock is held now."""
        import fcntl

        d = self.meta / LOCK_DIR
        out = []
        try:
            names = sorted(os.listdir(d))
        except OSError:
            return out
        for n in names:
            m = re.match(r"^task-(\d{5})\.lock$", n)
            if not m or int(m.group(1)) == self.task_id and self._lock_fd is not None:
                continue
            try:
                fd = os.open(d / n, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                who = os.read(fd, 200).decode(errors="replace").strip()
                out.append(f"task {int(m.group(1))}" + (f" ({who})" if who else ""))
            except OSError:
                pass
            finally:
                os.close(fd)
        return out

    def clear(self) -> None:
        """Remove what batchgen wrote here: shards, temp shards and its own files under .batchgen
        (by name); never another file, never a directory, never through a link (refused before
        anything is deleted)."""
        if not self.path.is_dir():
            return
        victims = [self.path / n for n in os.listdir(self.path) if SHARD_RE.match(n) or TMP_RE.match(n)]
        if _is_link(self.meta):
            raise link_error(self.meta)
        for sub, rx in _OWN_META.items():
            d = self.meta / sub if sub else self.meta
            if _is_link(d):
                raise link_error(d)
            if d.is_dir():
                victims += [d / n for n in os.listdir(d) if rx.match(n)]
        for v in victims:
            st = os.lstat(v)
            if stat.S_ISLNK(st.st_mode):
                raise link_error(v)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{v} is not a regular file (batchgen writes only files by that name): move it away")
        victims.sort(key=lambda v: v == self.manifest_path)  # the manifest last: a clear cut short is redone
        for v in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(v)
        fsync_dir(self.path)
        fsync_dir(self.meta)

    def _lock_file(self, name: str) -> int:
        """An open descriptor of OUT/.batchgen/locks/<name> (clear() leaves that folder alone)."""
        d = self.meta / LOCK_DIR
        make_dirs(self.path, d)
        p = d / name
        try:
            return os.open(p, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise link_error(p) from None
            raise write_error(e, p) from None

    @contextlib.contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock on OUT/.batchgen/locks/<name> (waits for other processes)."""
        import fcntl

        fd = self._lock_file(name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # file system without locks: go on unlocked
            yield
        finally:
            os.close(fd)  # releases the lock

    def _hold_shared(self) -> None:
        import fcntl

        if self._share_fd is not None:
            return
        fd = self._lock_file("output.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never long: exclusive holders hold prepare.lock, as we do
        except OSError:
            pass
        self._share_fd = fd

    def lock(self) -> None:
        """One process per task; raises OutputError when another one holds it."""
        import fcntl

        fd = self._lock_file(f"task-{self.task_id:05d}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.read(fd, 200).decode(errors="replace").strip()
            except OSError:
                who = ""
            os.close(fd)
            raise OutputError(
                f"task {self.task_id} of {self.path} is already running ({who or 'another process'})"
            ) from None
        except OSError:
            pass  # file system without locks: go on unlocked
        os.ftruncate(fd, 0)  # O_NOFOLLOW: this is the lock file itself, never a link's target
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the task lock, the shared output lock and the ledger."""
        if self._ledger is not None:
            self._ledger.close()
        for attr in ("_share_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def check_generation(self, generation: str) -> None:
        """Refuse to commit into an output that was cleared or replaced since this run started."""
        m = self.manifest()
        if m is None or str(m.get("generation") or "") != generation:
            raise OutputError(
                f"output {self.path} was replaced while this task ran (its manifest "
                + ("is gone" if m is None else "belongs to another run now") + ": --overwrite from another process "
                "on a file system without locks?); nothing more is written there: rerun this task to start over")

    # the ledger
    def clean_tmp(self) -> int:
        """Delete this task's uncommitted temp shards (from a crash). Returns how many."""
        n = 0
        if not self.path.is_dir():
            return 0
        for name in os.listdir(self.path):
            m = TMP_RE.match(name)
            if m and int(m.group(1)) == self.task_id:
                p = self.path / name
                if _is_link(p):
                    raise link_error(p)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    n += 1
        return n

    def open_ledger(self, fingerprint: str, say: Callable[[str], None] | None = None) -> tuple[Ledger, int]:
        """This task's ledger, verified: every shard it lists is there at its recorded size and
        sha256 (an interrupted rename is finished; a corrupt shard is moved to .batchgen/quarantine/
        and a missing one retired, their rows to be generated again, each said in one line), and
        no shard of this task or of a task id past num_tasks is there without a record (refused:
        load_dataset would read it). Without a ledger it is rebuilt from the shards' footers.
        Returns (ledger, temp shards removed). Call after prepare()."""
        say = say or (lambda m: None)
        lf = self.ledger_file()
        recs = lf.read()
        if recs is None:
            recs = self._records_from_footers(fingerprint, say)
            for r in recs:
                lf.append(r)
            if recs:
                say(f"note: {lf.path} was missing; rebuilt it from the footers of {len(recs)} shard(s)")
        led = Ledger.from_records(recs)
        stale = [r for r in led.records.values() if r.generation != self.generation]
        if stale:
            raise OutputError(f"{lf.path} lists {stale[0].name} of an earlier output at this path (generation "
                              f"{stale[0].generation or 'none'}): move the ledger away and rerun (it is rebuilt from "
                              "the shards' footers)")
        history: dict[str, list[ShardRecord]] = {}
        for r in recs:
            history.setdefault(r.name, []).append(r)
        for rec in sorted(led.records.values(), key=lambda r: r.seq):
            self._verify(rec, history[rec.name], led, lf, say)
        removed = self.clean_tmp()
        overlap = led.first_overlap()
        if overlap:
            raise OutputError(f"{lf.path}: {overlap}; move one of them out of {self.path} and its record out of the "
                              "ledger (or move the ledger away to rebuild it from the footers)")
        self._refuse_foreign(led)
        for p in self.shard_files(self.task_id):
            led.next_seq = max(led.next_seq, int(SHARD_RE.match(p.name).group(2)) + 1)  # type: ignore[union-attr]
        return led, removed

    def _verify(self, rec: ShardRecord, history: list[ShardRecord], led: Ledger, lf: LedgerFile,
                say: Callable[[str], None]) -> None:
        final = self.path / rec.name
        if _is_link(final):
            raise link_error(final)
        try:
            got: tuple[int, str] | None = file_digest(final)
        except FileNotFoundError:
            got = None
        except OSError as e:
            raise OutputError(f"{final} can't be read to verify it ({e.strerror or e}): fix that and rerun") from None
        if got == (rec.bytes, rec.sha256):
            return
        tmp = self.path / f".{rec.name}.tmp"
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(tmp).st_mode) and file_digest(tmp) == (rec.bytes, rec.sha256):
                try:
                    replace_into(self.path, tmp, final)  # recorded, then interrupted before its rename
                except OSError as e:
                    raise write_error(e, final) from None
                fsync_dir(self.path)
                return
        earlier = next((h for h in reversed(history[:-1]) if h.kind != "retire" and (h.bytes, h.sha256) == got), None)
        if earlier is not None:  # a rewrite whose temp file is gone: the shard is as it was before it
            kept = ShardRecord(**{**asdict(earlier), "created": now_iso(), "note": "a rewrite was lost; kept as before"})
            lf.append(kept)
            led.put(kept)
            return
        if got is None:
            what = f"is listed in {lf.path} but missing"
        else:
            what = (f"is {got[0]:,} bytes, {rec.bytes:,} when committed" if got[0] != rec.bytes
                    else "does not match its sha256 in the ledger (corrupted since it was committed)")
            self._quarantine(final)
            what += f"; moved it to {self.meta / QUARANTINE_DIR}/"
        lf.append(ShardRecord(rec.name, rec.task, rec.seq, kind="retire", generation=rec.generation,
                              created=now_iso(), note=what))
        led.put(ShardRecord(rec.name, rec.task, rec.seq, kind="retire"))
        say(f"warning: {final} {what}; its {rec.rows:,} row(s) will be generated again")

    def _quarantine(self, p: Path) -> None:
        q = self.meta / QUARANTINE_DIR
        make_dirs(self.path, q)
        dst = q / p.name
        if os.path.lexists(dst):
            dst = q / f"{p.name}.{time.time_ns()}"
        check_no_links(self.path, dst)
        try:
            os.rename(p, dst)
        except OSError as e:
            raise write_error(e, dst) from None
        fsync_dir(self.path)
        fsync_dir(q)

    def _refuse_foreign(self, led: Ledger) -> None:
        for p in self.shard_files():
            t = int(SHARD_RE.match(p.name).group(1))  # type: ignore[union-attr]
            if _is_link(p):
                raise link_error(p)
            if t >= self.num_tasks:
                raise OutputError(f"{p} is a shard of task {t}, but this output has {self.num_tasks} task(s) "
                                  f"(ids 0..{self.num_tasks - 1}); load_dataset would read it as part of this output: "
                                  f"move it out of {self.path} and rerun")
            if t == self.task_id and p.name not in led.records:
                raise OutputError(f"{p} is not in task {t}'s ledger ({self.ledger_path()}): batchgen did not commit it "
                                  "here (a copy, or a file of another output?), and load_dataset would read it as part "
                                  f"of this output: move it out of {self.path} and rerun")

    def _records_from_footers(self, fingerprint: str, say: Callable[[str], None]) -> list[ShardRecord]:
        """Ledger records for this task's shards from their footers (a ledger that is missing: an
        output of an older batchgen, or deleted). Refuses what the footers show is not this task's
        commit: another name, task, job or generation, or positions another shard holds."""
        recs: list[ShardRecord] = []
        for p in self.shard_files(self.task_id):
            if _is_link(p):
                raise link_error(p)
            seq = int(SHARD_RE.match(p.name).group(2))  # type: ignore[union-attr]
            try:
                meta = read_shard_meta(p)
            except Exception as e:  # noqa: BLE001
                raise OutputError(f"{p} can't be read ({e}); move it out of {self.path} and rerun: its rows "
                                  "are generated again") from None
            move = f"move it out of {self.path} and rerun"
            if meta.get("task") != self.task_id or meta.get("seq") != seq:
                raise OutputError(f"{p}'s footer says it is shard {meta.get('seq')} of task {meta.get('task')}: a copy "
                                  f"under another name? {move}")
            if meta.get("fingerprint") != fingerprint:
                raise OutputError(f"{p} was written by a different job; {move}")
            gen = str(meta.get("generation") or "")
            if gen != self.generation or meta.get("num_tasks", self.num_tasks) != self.num_tasks:
                raise OutputError(f"{p} was written by an earlier output at this path; {move}")
            pos = IntervalSet(meta.get("positions", []))
            if meta.get("page_checksums"):
                try:
                    pq.read_table(p, page_checksum_verification=True)
                except Exception as e:  # noqa: BLE001
                    self._quarantine(p)
                    say(f"warning: {p} is corrupt ({e}); moved it to {self.meta / QUARANTINE_DIR}/ and its rows "
                        "will be generated again")
                    continue
            size, sha = file_digest(p)
            recs.append(ShardRecord(
                p.name, self.task_id, seq, generation=gen, positions=pos.ranges(),
                error_positions=meta.get("error_positions", []) if meta.get("layout") == "sorted" else [],
                rows=int(meta.get("rows", 0)), samples=int(meta.get("samples", 0)), errors=int(meta.get("errors", 0)),
                error_rows=int(meta.get("error_rows", 0)), prompt_tokens=int(meta.get("prompt_tokens", 0)),
                completion_tokens=int(meta.get("completion_tokens", 0)), incomplete=int(meta.get("incomplete", 0)),
                bytes=size, sha256=sha,
                layout=str(meta.get("layout", "")), created=str(meta.get("created", "")), note="from its footer"))
        overlap = first_overlap((r.positions, r.name) for r in recs)
        if overlap:
            raise OutputError(f"{self.path}: {overlap} (a duplicate?): move one of them out of {self.path} and rerun")
        return recs


def source_sha(source: Any) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_mismatch(old: dict, new: dict) -> str | None:
    """Why an output written under `old` can't be resumed by the job described by `new`, or None."""
    if old.get("fingerprint") == new.get("fingerprint"):
        if old.get("num_tasks") != new.get("num_tasks"):
            return (f"it was written with {old.get('num_tasks')} task(s), this run has {new.get('num_tasks')}; "
                    "rerun with the same --num-tasks")
        from .sources import identity_change  # sizes, times, content hashes; safe appends pass

        change = identity_change(old.get("source") or {}, new.get("source") or {})
        if change:
            return f"its input changed since it was started: {change}"
        return None
    changed = _diff(old.get("identity", {}), new.get("identity", {}))
    if changed:
        return "changed: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
    return "its fingerprint differs"


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if a != b:
        return [f"{prefix} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 80 else prefix]
    return []


# --------------------------------------------------------------------------- the shard writer
Record = tuple[int, list[dict], dict]  # (position, its output rows, its counters)


class ShardWriter:
    """Buffers completed rows and commits them as shards. Thread-safe: add() may be called from
    the engine's request-feeding thread (rows that fail before the engine) and the main loop.

    `ledger` is the task's verified Ledger; it is kept current (commits and rewrites are put
    into it). `retry` maps positions being generated again (--retry-errors) to the shard that
    holds them: their rows replace the old ones by a rewrite of that shard."""

    def __init__(
        self,
        out: OutputDir,
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
        self.seq = max(next_seq, self.ledger.next_seq)
        self._records: list[Record] = []
        self._samples = 0
        self._retry = dict(retry or {})
        self._wanted: dict[str, int] = {}  # shard -> its positions still to come back
        for shard in self._retry.values():
            self._wanted[shard] = self._wanted.get(shard, 0) + 1
        self._replaced: dict[str, dict[int, list[dict]]] = {}  # shard -> position -> new rows
        self._replaced_samples = 0
        self._lock = threading.RLock()
        self._last_flush = time.monotonic()
        self.committed: list[dict] = []  # footer metadata of shards committed by this run
        self.rewritten = 0  # input rows replaced in place by this run (--retry-errors)
        self.busy = False  # inside a commit: signal handlers must not raise here

    def add(self, pos: int, rows: list[dict], stats: dict) -> None:
        """One input row's output rows (all its samples) and its counters:
        stats = {error_rows, errors, prompt_tokens, completion_tokens}."""
        with self._lock:
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
        with self._lock:
            if not self._records and not self._replaced:
                return False
            return (self.pending >= self.rows_per_shard or time.monotonic() - self._last_flush >= self.flush_seconds
                    or any(self._complete(s) for s in self._replaced))

    def discard(self) -> int:
        """Drop every buffered row (a commit can't be made: they are generated again). Returns
        how many input rows were dropped."""
        with self._lock:
            n = len(self._records) + sum(len(v) for v in self._replaced.values())
            self._records.clear()
            self._replaced.clear()
            self._samples = self._replaced_samples = 0
            return n

    def flush(self, *, all_rows: bool = True) -> dict | None:
        """Commit the buffered rows (in shards of at most rows_per_shard rows, whole input rows)
        and the rewrites of retried rows. Returns the footer of the last shard committed, or None."""
        last = None
        while True:
            with self._lock:
                if not self._records:
                    break
                take, n = 0, 0
                for _, rows, _ in self._records:
                    if take and n + len(rows) > self.rows_per_shard:
                        break
                    take += 1
                    n += len(rows)
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

    def _commit(self, batch: list[Record], seq: int) -> dict:
        batch = sorted(batch, key=lambda r: r[0])  # position order: a rewrite finds a row's samples by position
        rows = [r for _, rs, _ in batch for r in rs]
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
        name = shard_name(self.out.task_id, seq)
        if os.path.lexists(self.out.path / name):
            raise OutputError(f"shard {self.out.path / name} already exists; it is never rewritten")
        self._write(name, self._table(rows, meta), meta, "commit")
        meta["name"] = name
        self.committed.append(meta)
        return meta

    def _table(self, rows: list[dict], meta: dict) -> pa.Table:
        cols = {f.name: _column([r.get(f.name) for r in rows], f.type, f.name) for f in self.schema}
        schema = self.schema.with_metadata({META_KEY: json.dumps(meta, default=str).encode()})
        return pa.Table.from_pydict(cols, schema=schema)

    def _write(self, name: str, table: pa.Table, meta: dict, kind: str) -> None:
        """tmp (hashed while written) -> fsync -> ledger record -> rename -> fsync the directory."""
        out = self.out
        out.check_generation(out.generation)
        final, tmp = out.path / name, out.path / f".{name}.tmp"
        check_no_links(out.path, final)
        lf = out.ledger_file()
        try:
            with open_new(out.path, tmp) as fh:
                hw = _HashingWriter(fh)
                pq.write_table(table, hw, compression=self.compression, row_group_size=max(table.num_rows, 1),
                               write_page_checksum=True)
                fh.flush()
                os.fsync(fh.fileno())
            rec = ShardRecord(
                name, out.task_id, int(meta["seq"]), kind=kind, generation=out.generation,
                positions=meta["positions"], error_positions=meta["error_positions"], rows=int(meta["rows"]),
                samples=int(meta["samples"]), errors=int(meta["errors"]), error_rows=int(meta["error_rows"]),
                prompt_tokens=int(meta["prompt_tokens"]), completion_tokens=int(meta["completion_tokens"]),
                incomplete=int(meta.get("incomplete", 0)), bytes=hw.n, sha256=hw.h.hexdigest(), created=now_iso())
            lf.append(rec)
            try:
                replace_into(out.path, tmp, final)
            except BaseException:
                lf.undo_last()
                raise
        except OSError as e:
            _discard(tmp)
            raise write_error(e, tmp) from None
        except BaseException:
            _discard(tmp)
            raise
        fsync_dir(out.path)
        self.ledger.put(rec)

    # --retry-errors: replace rows in the shards that hold them
    def _complete(self, shard: str) -> bool:
        return len(self._replaced.get(shard, {})) >= self._wanted.get(shard, 0)

    def _flush_rewrites(self, all_rows: bool) -> None:
        with self._lock:
            ready = [s for s in self._replaced if all_rows or self._complete(s)]
            jobs = [(s, self._replaced.pop(s)) for s in ready]
            self._replaced_samples -= sum(len(r) for _, new in jobs for r in new.values())
        for shard, new in jobs:
            self.busy = True
            try:
                self._rewrite(shard, new)
            finally:
                self.busy = False
            with self._lock:
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
        fresh = self._table(rows, meta)
        now = fresh.to_pylist()
        changed = sum(now[i * per:(i + 1) * per] != old[i * per:(i + 1) * per] for i in range(len(positions)))
        if not changed:
            return  # the rows came back the same (an input error): nothing to replace
        self._write(name, fresh, meta, "rewrite")
        self.rewritten += changed


# --------------------------------------------------------------------------- verification
def verify_output(out_dir: Path) -> list[str]:
    """Check an output directory against its manifest and its tasks' ledgers; one line per
    problem (none: every shard there is one a task committed, whole, each position once).
    Reads every shard once (sha256). For `batchgen status --verify`."""
    out = Path(out_dir)
    od = OutputDir(out)
    problems: list[str] = []
    try:
        manifest, why = od.read_manifest()
    except LinkError as e:
        return [str(e)]
    if manifest is None:
        problems.append(f"{od.manifest_path} is {why}")
    names = [p.name for p in od.shard_files()]
    tasks_seen = {int(SHARD_RE.match(n).group(1)) for n in names}  # type: ignore[union-attr]
    num_tasks = manifest.get("num_tasks") if manifest else None
    if not isinstance(num_tasks, int) or num_tasks < 1:
        num_tasks = max(tasks_seen, default=-1) + 1
    generation = str((manifest or {}).get("generation") or "")
    known: dict[str, str] = {}  # shard -> the task ledger listing it
    for t in range(num_tasks):
        lf = LedgerFile(out, od.ledger_path(t))
        try:
            recs = lf.read(strict=True)
        except OutputError as e:
            problems.append(str(e))
            recs = lf.read(strict=False)
        mine = [n for n in names if int(n[6:11]) == t]
        if recs is None:
            if mine:
                problems.append(f"task {t} has no ledger ({lf.path}): its {len(mine)} shard(s) can't be verified")
                known.update((n, "") for n in mine)
            continue
        led = Ledger.from_records(recs)
        for rec in sorted(led.records.values(), key=lambda r: r.seq):
            problems += _check_record(out, rec, generation)
            known[rec.name] = str(lf.path)
        overlap = led.first_overlap()
        if overlap:
            problems.append(f"task {t}: {overlap} (duplicate positions)")
        held = led.done
        for n in mine:
            if n in known:
                continue
            line = f"{out / n} is not in task {t}'s ledger (not committed there by batchgen)"
            with contextlib.suppress(Exception):
                r = IntervalSet(read_shard_meta(out / n).get("positions", [])).overlap(held)
                if r is not None:
                    line += f"; it repeats positions {_fmt_range(r)} of task {t} (duplicate rows)"
            problems.append(line)
    for n in names:
        t = int(n[6:11])
        if t >= num_tasks:
            problems.append(f"{out / n} is a shard of task {t}, but the output has {num_tasks} task(s)")
    return problems


def _check_record(out: Path, rec: ShardRecord, generation: str) -> list[str]:
    p = out / rec.name
    if rec.generation != generation:
        return [f"{p}: its ledger record is from another output at this path (generation {rec.generation or 'none'})"]
    if _is_link(p):
        return [f"{p} is a symbolic link"]
    try:
        got: tuple[int, str] | None = file_digest(p)
    except FileNotFoundError:
        got = None
    except OSError as e:
        return [f"{p} can't be read ({e.strerror or e})"]
    if got != (rec.bytes, rec.sha256):
        with contextlib.suppress(OSError):
            if file_digest(out / f".{rec.name}.tmp") == (rec.bytes, rec.sha256):
                what = "commit" if got is None else "rewrite (--retry-errors; the old shard is still in place)"
                return [f"{p}: an interrupted {what}: its temp file holds the recorded shard; the next run of task "
                        f"{rec.task} finishes it"]
    if got is None:
        return [f"{p} is in the ledger but missing ({rec.rows:,} rows)"]
    size, sha = got
    if size != rec.bytes:
        return [f"{p} is {size:,} bytes, the ledger says {rec.bytes:,} (truncated or replaced)"]
    if sha != rec.sha256:
        return [f"{p}: bad checksum (sha256 {sha[:12]}..., the ledger says {rec.sha256[:12]}...)"]
    return []

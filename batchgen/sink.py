"""Rows out: sharded Parquet, committed atomically; the committed shards are the checkpoint.

Layout of an output directory (everything but the shards is hidden, so
`datasets.load_dataset("parquet", data_dir=OUT)` and `pyarrow.dataset.dataset(OUT)` read only
the shards):

    OUT/part-t00000-000000.parquet      shards: task 0, sequence 0, ... never rewritten
    OUT/.part-t00000-000001.parquet.tmp a shard being written (deleted on the next start)
    OUT/.batchgen/manifest.json         the job's fingerprint, config, output schema, num_tasks
    OUT/.batchgen/progress/task-00000.json   per-task state, rows done, shards, tokens, tok/s
    OUT/.batchgen/summary.json          the summary of the finished job (per task: summary-t00000.json)
    OUT/.batchgen/locks/task-00000.lock one process per task at a time

A shard is committed by: write `.part-...tmp` -> flush + fsync -> rename to `part-...parquet`
-> fsync the directory. Its footer (Parquet key-value metadata "batchgen") records the job
fingerprint, the model/prompt/sampling settings, and the task positions it holds as ranges;
on start the footers of the committed shards rebuild the done-set without reading any data.
"""
from __future__ import annotations

import base64
import bisect
import contextlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

META_DIR = ".batchgen"
META_KEY = b"batchgen"
SHARD_RE = re.compile(r"^part-t(\d{5})-(\d{6})\.parquet$")
TMP_RE = re.compile(r"^\.part-t(\d{5})-(\d{6})\.parquet\.tmp$")
FORMAT_VERSION = 1


class OutputError(RuntimeError):
    """The output directory can't be used as asked (another job's output, a running task...)."""


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


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repeated_ids(shards: list[Path], examples: int = 3) -> tuple[int, list[Any]]:
    """Ids written by more than one input row (a row's first sample counts; null ids are error
    rows and do not): (how many ids, a few of them). Reads only the id column, vectorised."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not shards:
        return 0, []
    ids = pds.dataset([str(p) for p in shards], format="parquet").to_table(
        columns=["id"], filter=pc.field("sample_index") == 0).column("id")
    counts = pc.value_counts(pc.drop_null(ids))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(repeated), repeated.slice(0, examples).to_pylist()


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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


# --------------------------------------------------------------------------- output schema
OUTPUT_FIXED = ["completion", "finish_reason", "prompt_tokens", "completion_tokens", "error"]


def output_schema(id_type: pa.DataType, copied: list[tuple[str, pa.DataType]]) -> pa.Schema:
    fields = [pa.field("id", id_type), pa.field("sample_index", pa.int32())]
    fields += [pa.field(n, t) for n, t in copied]
    fields += [
        pa.field("completion", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("error", pa.string()),
    ]
    return pa.schema(fields)


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(s: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(s)))


def _coerce_column(values: list[Any], t: pa.DataType, name: str, warnings: dict[str, int]) -> pa.Array:
    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            pa.array([v], type=t)
            out.append(v)
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            pass
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            out.append(v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False))
        else:
            warnings[name] = warnings.get(name, 0) + 1
            out.append(None)
    return pa.array(out, type=t)


# --------------------------------------------------------------------------- ledger
@dataclass
class Ledger:
    """What the committed shards of one task hold."""

    done: IntervalSet = field(default_factory=IntervalSet)
    shards: list[str] = field(default_factory=list)
    next_seq: int = 0
    rows: int = 0  # input rows
    samples: int = 0  # output rows
    errors: int = 0  # output rows with error set
    error_rows: int = 0  # input rows with an error
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_meta(self, meta: dict) -> None:
        self.done.update(IntervalSet(meta.get("positions", [])))
        self.rows += int(meta.get("rows", 0))
        self.samples += int(meta.get("samples", 0))
        self.errors += int(meta.get("errors", 0))
        self.error_rows += int(meta.get("error_rows", 0))
        self.prompt_tokens += int(meta.get("prompt_tokens", 0))
        self.completion_tokens += int(meta.get("completion_tokens", 0))


def read_shard_meta(path: str | os.PathLike[str]) -> dict:
    md = pq.read_schema(path).metadata or {}
    raw = md.get(META_KEY)
    if raw is None:
        raise OutputError(f"{path} is not a batchgen shard (no batchgen metadata)")
    return json.loads(raw)


# --------------------------------------------------------------------------- the output directory
class OutputDir:
    def __init__(self, path: str | os.PathLike[str], task_id: int = 0, num_tasks: int = 1) -> None:
        self.path = Path(path)
        self.meta = self.path / META_DIR
        self.task_id = task_id
        self.num_tasks = num_tasks
        self._lock_fd: int | None = None

    # paths
    @property
    def manifest_path(self) -> Path:
        return self.meta / "manifest.json"

    def progress_path(self, task: int | None = None) -> Path:
        return self.meta / "progress" / f"task-{self.task_id if task is None else task:05d}.json"

    def summary_path(self, task: int | None = None) -> Path:
        if self.num_tasks == 1:
            return self.meta / "summary.json"
        return self.meta / f"summary-t{self.task_id if task is None else task:05d}.json"

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
        return read_json(self.manifest_path)

    # setup
    def prepare(self, manifest: dict, overwrite: bool = False) -> dict:
        """Create the directory and manifest, or check that an existing one is this job's.
        Returns the manifest in force (the existing one when it matches)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.meta.mkdir(exist_ok=True)
        # One task at a time: with --overwrite, a task that read the old manifest must not clear
        # what a faster task already wrote under the new one (it sees the new manifest instead).
        with self._exclusive("prepare.lock"):
            return self._prepare(manifest, overwrite)

    def _prepare(self, manifest: dict, overwrite: bool) -> dict:
        existing = self.manifest()
        if existing is not None:
            problem = _manifest_mismatch(existing, manifest)
            if problem is None:
                return existing
            if not overwrite:
                raise OutputError(
                    f"output {self.path} holds a different job ({problem}); "
                    "pass --overwrite to replace it, or choose another output.path"
                )
            self.clear()
        elif self.shard_files():
            if not overwrite:
                raise OutputError(
                    f"output {self.path} holds part-*.parquet shards but no {META_DIR}/manifest.json; "
                    "pass --overwrite to replace them, or choose another output.path"
                )
            self.clear()
        self.meta.mkdir(parents=True, exist_ok=True)
        tmp = self.meta / f".manifest.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.manifest_path)  # atomic create: another task may race us
        except FileExistsError:
            os.unlink(tmp)
            existing = self.manifest() or {}
            problem = _manifest_mismatch(existing, manifest)
            if problem is not None:
                raise OutputError(f"output {self.path} was just created by a different job ({problem})") from None
            return existing
        except OSError:  # no hard links here: plain rename (last writer wins; same content)
            os.replace(tmp, self.manifest_path)
        else:
            os.unlink(tmp)
        fsync_dir(self.meta)
        return manifest

    def clear(self) -> None:
        """Remove what batchgen wrote here (shards, temp files, metadata); nothing else."""
        if not self.path.is_dir():
            return
        for n in os.listdir(self.path):
            if SHARD_RE.match(n) or TMP_RE.match(n):
                try:
                    os.unlink(self.path / n)
                except FileNotFoundError:
                    pass
        import shutil

        if self.meta.is_dir():
            shutil.rmtree(self.meta / "progress", ignore_errors=True)  # locks stay: they may be held
            for n in os.listdir(self.meta):
                p = self.meta / n
                if p.is_file() and (n.endswith(".json") or n.endswith(".tmp")):
                    p.unlink()
        fsync_dir(self.path)

    def _lock_file(self, name: str) -> int:
        """An open descriptor of OUT/.batchgen/locks/<name> (clear() leaves that folder alone)."""
        d = self.meta / "locks"
        d.mkdir(parents=True, exist_ok=True)
        return os.open(d / name, os.O_RDWR | os.O_CREAT, 0o644)

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
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.close(self._lock_fd)
            finally:
                self._lock_fd = None

    def clean_tmp(self) -> int:
        """Delete this task's uncommitted temp shards (from a crash). Returns how many."""
        n = 0
        if not self.path.is_dir():
            return 0
        for name in os.listdir(self.path):
            m = TMP_RE.match(name)
            if m and int(m.group(1)) == self.task_id:
                try:
                    os.unlink(self.path / name)
                    n += 1
                except FileNotFoundError:
                    pass
        return n

    def scan(self, fingerprint: str | None = None) -> Ledger:
        """Rebuild this task's ledger from the footers of its committed shards."""
        led = Ledger()
        for p in self.shard_files(self.task_id):
            try:
                meta = read_shard_meta(p)
            except Exception as e:  # noqa: BLE001
                raise OutputError(f"committed shard {p} can't be read ({e}); move it away and rerun") from None
            if fingerprint is not None and meta.get("fingerprint") != fingerprint:
                raise OutputError(f"shard {p} was written by a different job; pass --overwrite to replace the output")
            led.add_meta(meta)
            led.shards.append(p.name)
            led.next_seq = max(led.next_seq, int(SHARD_RE.match(p.name).group(2)) + 1)  # type: ignore[union-attr]
        return led


def _manifest_mismatch(old: dict, new: dict) -> str | None:
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
class ShardWriter:
    """Buffers completed rows and commits them as shards. Thread-safe: add() may be called from
    the engine's request-feeding thread (rows that fail before the engine) and the main loop."""

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
    ) -> None:
        self.out = out
        self.schema = schema
        self.footer = footer
        self.rows_per_shard = rows_per_shard
        self.compression = None if compression == "none" else compression
        self.flush_seconds = flush_seconds
        self.seq = next_seq
        self._records: list[tuple[int, list[dict], dict]] = []
        self._samples = 0
        self._lock = threading.RLock()
        self._last_flush = time.monotonic()
        self.coerce_warnings: dict[str, int] = {}
        self.committed: list[dict] = []  # footer metadata of shards committed by this run
        self.busy = False  # inside a commit: signal handlers must not raise here

    def add(self, pos: int, rows: list[dict], stats: dict) -> None:
        """One input row's output rows (all its samples) and its counters:
        stats = {error_rows, errors, prompt_tokens, completion_tokens}."""
        rec = (pos, rows, stats)
        with self._lock:
            self._records.append(rec)  # one append: a record is in the buffer whole or not at all
            self._samples += len(rows)

    @property
    def pending(self) -> int:
        return self._samples

    def due(self) -> bool:
        with self._lock:
            if not self._records:
                return False
            return self._samples >= self.rows_per_shard or time.monotonic() - self._last_flush >= self.flush_seconds

    def flush(self, *, all_rows: bool = True) -> dict | None:
        """Commit the buffered rows (in shards of at most rows_per_shard rows, whole input rows).
        Returns the footer of the last shard committed, or None when there was nothing."""
        last = None
        while True:
            with self._lock:
                if not self._records:
                    self._last_flush = time.monotonic()
                    return last
                take, n = 0, 0
                for _, rows, _ in self._records:
                    if take and n + len(rows) > self.rows_per_shard:
                        break
                    take += 1
                    n += len(rows)
                if not all_rows and n < self.rows_per_shard:
                    return last
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
                self._last_flush = time.monotonic()

    def _commit(self, batch: list[tuple[int, list[dict], dict]], seq: int) -> dict:
        rows = [r for _, rs, _ in batch for r in rs]
        cols = {}
        for f in self.schema:
            cols[f.name] = _coerce_column([r.get(f.name) for r in rows], f.type, f.name, self.coerce_warnings)
        meta = dict(self.footer)
        meta.update(
            task=self.out.task_id,
            seq=seq,
            positions=IntervalSet.from_points(p for p, _, _ in batch).ranges(),
            rows=len(batch),
            samples=len(rows),
            errors=sum(int(s.get("errors", 0)) for _, _, s in batch),
            error_rows=sum(int(s.get("error_rows", 0)) for _, _, s in batch),
            prompt_tokens=sum(int(s.get("prompt_tokens", 0)) for _, _, s in batch),
            completion_tokens=sum(int(s.get("completion_tokens", 0)) for _, _, s in batch),
            created=now_iso(),
        )
        schema = self.schema.with_metadata({META_KEY: json.dumps(meta, default=str).encode()})
        table = pa.Table.from_pydict(cols, schema=schema)
        name = shard_name(self.out.task_id, seq)
        final = self.out.path / name
        if final.exists():
            raise OutputError(f"shard {final} already exists; it is never rewritten")
        tmp = self.out.path / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression=self.compression, row_group_size=max(len(rows), 1))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(self.out.path)
        meta["name"] = name
        self.committed.append(meta)
        return meta

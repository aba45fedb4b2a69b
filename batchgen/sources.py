"""Rows in: Hugging Face datasets, Parquet and JSONL files; stable ids; the task partition.

A source yields `(pos, index, row)` for the rows of one task, streaming (memory does not grow
with the input):
- `index` is the row's position in the whole input in source order (files sorted by path; it is
  the default id);
- `pos` is its position in this task's partition (0, 1, 2, ...), stable across restarts: the
  output ledger records which positions are done, and `iter_rows(start=k)` skips the first k
  cheaply (Parquet row groups and datasets are skipped without reading them).
- `row` holds only the columns the job needs; a row that could not be read (a malformed JSONL
  line) carries the reason under ROW_ERROR.

Partition (`task_id` of `num_tasks`, deterministic, stable across restarts):
- files, at least as many files as tasks: whole files, balanced by size (largest first onto the
  least loaded task);
- files, fewer files than tasks: contiguous row ranges of the whole input;
- a dataset with a known length: contiguous row ranges; a streaming dataset of unknown length:
  rows whose index % num_tasks == task_id.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from .config import ConfigError, JobConfig, resolve_path, template_fields

ROW_ERROR = "__batchgen_row_error__"
PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
BATCH = 1024


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(JSONL_EXT):
        return "jsonl"
    return None


def needed_columns(cfg: JobConfig) -> list[str]:
    """Input columns the job reads, in a stable order."""
    cols: list[str] = []
    pr = cfg.prompt
    for c in ([pr.column] if pr.column else []) + ([pr.messages_column] if pr.messages_column else []):
        cols.append(c)
    if pr.template:
        cols += template_fields(pr.template)
    if cfg.input.id_column:
        cols.append(cfg.input.id_column)
    cols += list(cfg.input.columns)
    seen: list[str] = []
    for c in cols:
        if c not in seen:
            seen.append(c)
    return seen


def check_columns(cfg: JobConfig, available: list[str], where: str) -> None:
    """Every column the job names must exist in the input; list the ones that do."""
    avail = list(available)
    checks: list[tuple[str, str]] = []
    pr = cfg.prompt
    if pr.column:
        checks.append(("prompt.column", pr.column))
    if pr.messages_column:
        checks.append(("prompt.messages_column", pr.messages_column))
    if pr.template:
        checks += [("prompt.template", c) for c in template_fields(pr.template)]
    if cfg.input.id_column:
        checks.append(("input.id_column", cfg.input.id_column))
    checks += [("input.columns", c) for c in cfg.input.columns]
    for key, col in checks:
        if col not in avail:
            import difflib

            close = difflib.get_close_matches(col, avail, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            shown = ", ".join(avail[:50]) + (" ..." if len(avail) > 50 else "")
            raise ConfigError(
                f"{cfg.source_path}: {key}: column '{col}' is not in {where}{hint}; available columns: {shown or '(none)'}"
            )


# --------------------------------------------------------------------------- files
@dataclass
class _File:
    path: str
    kind: str
    size: int
    _count: int | None = None

    def count(self) -> int:
        if self._count is None:
            if self.kind == "parquet":
                import pyarrow.parquet as pq

                self._count = pq.ParquetFile(self.path).metadata.num_rows
            else:
                n = 0
                with _open_jsonl(self.path) as f:
                    for line in f:
                        if line.strip():
                            n += 1
                self._count = n
        return self._count


def _open_jsonl(path: str) -> Any:
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


def expand_files(cfg: JobConfig) -> list[_File]:
    """Paths, globs and directories -> sorted unique supported files. ConfigError when any entry
    matches nothing."""
    out: dict[str, _File] = {}
    for i, spec in enumerate(cfg.input.files or []):
        key = f"input.files[{i}]" if len(cfg.input.files or []) > 1 else "input.files"
        is_glob = any(ch in spec for ch in "*?[")
        p = resolve_path(cfg, spec, must_exist=True)
        matches: list[str]
        if is_glob:
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches and not Path(spec).is_absolute():
                matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [m for m in matches if os.path.isfile(m) or os.path.isdir(m)]
            if not matches:
                raise ConfigError(f"{cfg.source_path}: {key}: '{spec}' matches no file (looked in {p.parent})")
        else:
            if not p.exists():
                raise ConfigError(f"{cfg.source_path}: {key}: no such file or directory: {p}")
            matches = [str(p)]
        found_any = False
        for m in matches:
            if os.path.isdir(m):
                for root, dirs, names in os.walk(m):
                    dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                    for n in sorted(names):
                        if n.startswith((".", "_")):
                            continue
                        fp = os.path.join(root, n)
                        k = _kind(fp)
                        if k:
                            out[os.path.abspath(fp)] = _File(os.path.abspath(fp), k, os.path.getsize(fp))
                            found_any = True
            else:
                k = _kind(m)
                if k is None:
                    if is_glob:
                        continue
                    raise ConfigError(
                        f"{cfg.source_path}: {key}: '{m}' is neither Parquet (.parquet) nor JSON Lines (.jsonl, .json, .jsonl.gz)"
                    )
                out[os.path.abspath(m)] = _File(os.path.abspath(m), k, os.path.getsize(m))
                found_any = True
        if not found_any:
            raise ConfigError(f"{cfg.source_path}: {key}: '{spec}' holds no .parquet or .jsonl file")
    return [out[k] for k in sorted(out)]


def _jsonl_first_keys(path: str, max_lines: int = 100) -> tuple[list[str], list[dict]]:
    keys: list[str] = []
    rows: list[dict] = []
    with _open_jsonl(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
                for k in obj:
                    if k not in keys:
                        keys.append(k)
            if len(rows) >= max_lines:
                break
    return keys, rows


def _infer_type(values: list[Any]) -> pa.DataType:
    vals = [v for v in values if v is not None]
    if not vals:
        return pa.string()
    try:
        t = pa.array(vals).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return pa.string()
    if pa.types.is_null(t):
        return pa.string()
    return t


class Source:
    """Base: see the module docstring."""

    columns: list[str]  # every column the input has
    types: dict[str, pa.DataType]  # arrow types of the copied and id columns
    total: int | None  # rows in this task's partition (after input.limit), when known
    description: str

    def iter_rows(self, start: int = 0) -> Iterator[tuple[int, int, dict]]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the positions depend on (checked again on resume)."""
        return {}


class FileSource(Source):
    def __init__(self, cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> None:
        self.cfg = cfg
        self.files = expand_files(cfg)
        self.need = needed_columns(cfg)
        self.limit = cfg.input.limit
        first = self.files[0]
        if first.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                schema = pq.read_schema(first.path)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"{cfg.source_path}: input.files: can't read Parquet file {first.path}: {e}") from None
            self.columns = list(schema.names)
            arrow = {n: schema.field(n).type for n in schema.names}
            sample: list[dict] = []
        else:
            self.columns, sample = _jsonl_first_keys(first.path)
            arrow = {}
        self.types = {}
        for c in ([cfg.input.id_column] if cfg.input.id_column else []) + list(cfg.input.columns):
            if c in arrow:
                self.types[c] = arrow[c]
            else:
                self.types[c] = _infer_type([r.get(c) for r in sample])
        self.description = f"{len(self.files)} file(s)" if len(self.files) > 1 else self.files[0].path
        self._plan(task_id, num_tasks)

    def check(self) -> None:
        check_columns(self.cfg, self.columns, f"input file {self.files[0].path}")

    def _plan(self, task_id: int, num_tasks: int) -> None:
        files = self.files
        # segments: (file index, first row in file, end row in file or None, global index of first row)
        self.segments: list[tuple[int, int, int | None, int]] = []
        if num_tasks == 1:
            mine = list(range(len(files)))
            self._whole_files(mine)
        elif len(files) >= num_tasks:
            order = sorted(range(len(files)), key=lambda i: (-files[i].size, files[i].path))
            load = [0] * num_tasks
            owner = [0] * len(files)
            for i in order:
                t = min(range(num_tasks), key=lambda k: (load[k], k))
                owner[i] = t
                load[t] += max(files[i].size, 1)
            mine = [i for i in range(len(files)) if owner[i] == task_id]
            self._whole_files(mine)
        else:
            total = sum(f.count() for f in files)
            if self.limit is not None:
                total = min(total, self.limit)
            lo, hi = task_id * total // num_tasks, (task_id + 1) * total // num_tasks
            off = 0
            for i, f in enumerate(files):
                n = f.count()
                a, b = max(lo, off), min(hi, off + n)
                if a < b:
                    self.segments.append((i, a - off, b - off, a))
                off += n
            self.total = hi - lo
            return
        self.total = self._segments_total()

    def _whole_files(self, mine: list[int]) -> None:
        # the global index of a file's first row needs the counts of the files before it,
        # unless this task reads every file in order (num_tasks == 1): then it's counted lazily.
        self._lazy_offsets = len(mine) == len(self.files)
        off = 0
        mine_set = set(mine)
        for i, f in enumerate(self.files):
            if i in mine_set:
                self.segments.append((i, 0, None, off if not self._lazy_offsets else -1))
            if not self._lazy_offsets:
                off += f.count()

    def _segments_total(self) -> int | None:
        total = 0
        off = 0
        for i, f in enumerate(self.files):
            n = f.count()
            if any(s[0] == i for s in self.segments):
                a = off
                b = off + n if self.limit is None else min(off + n, self.limit)
                total += max(0, b - a)
            off += n
        return total

    def identity(self) -> dict[str, Any]:
        return {"files": [os.path.relpath(f.path, self.cfg.base_dir) for f in self.files]}

    def iter_rows(self, start: int = 0) -> Iterator[tuple[int, int, dict]]:
        pos = 0
        running = 0  # global index of the next file's first row (lazy offsets: every file, in order)
        for fi, a, b, goff in self.segments:
            f = self.files[fi]
            if goff < 0:
                goff = running
            if b is not None:
                seg_len: int | None = b - a
            elif f.kind == "parquet" or f._count is not None:
                seg_len = f.count() - a
            else:
                seg_len = None
            if self.limit is not None:
                room = self.limit - goff
                if room <= 0:
                    return  # segments are in increasing global order
                seg_len = room if seg_len is None else min(seg_len, room)
            skip = max(0, start - pos)
            if skip and seg_len is None:
                seg_len = f.count() - a
            if seg_len is not None and skip >= seg_len:  # all done already: don't open the file
                pos += seg_len
                running = goff + f.count() - a
                continue
            count = None if seg_len is None else seg_len - skip
            reader = self._read_parquet if f.kind == "parquet" else self._read_jsonl
            pos += skip
            k = 0
            for row in reader(f, a + skip, count):
                yield pos, goff + skip + k, row
                pos += 1
                k += 1
            running = goff + skip + k

    def _read_parquet(self, f: _File, first: int, count: int | None) -> Iterator[dict]:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f.path)
        md = pf.metadata
        names = set(pf.schema_arrow.names)
        cols = [c for c in self.need if c in names]
        missing = [c for c in self.need if c not in names]
        end = md.num_rows if count is None else min(md.num_rows, first + count)
        groups = []
        off = 0
        group_start = None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if off + n > first and off < end:
                groups.append(g)
                if group_start is None:
                    group_start = off
            off += n
        if not groups:
            return
        cur = group_start
        for batch in pf.iter_batches(batch_size=BATCH, row_groups=groups, columns=cols, use_threads=False):
            bn = batch.num_rows
            lo = max(first - cur, 0)
            hi = min(end - cur, bn)
            if hi > lo:
                if lo or hi < bn:
                    batch = batch.slice(lo, hi - lo)
                rows = batch.to_pylist()
                for r in rows:
                    for c in missing:
                        r[c] = None
                    yield r
            cur += bn
            if cur >= end:
                return

    def _read_jsonl(self, f: _File, first: int, count: int | None) -> Iterator[dict]:
        need = self.need
        k = 0
        emitted = 0
        lineno = 0
        with _open_jsonl(f.path) as fh:
            for raw in fh:
                lineno += 1
                if not raw.strip():
                    continue
                if k < first:
                    k += 1
                    continue
                if count is not None and emitted >= count:
                    return
                k += 1
                emitted += 1
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # UTF-8 byte order mark
                try:
                    obj = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as e:
                    yield {ROW_ERROR: f"malformed JSON at {os.path.basename(f.path)}:{lineno}: {e}"}
                    continue
                if not isinstance(obj, dict):
                    yield {ROW_ERROR: f"line {os.path.basename(f.path)}:{lineno} is not a JSON object"}
                    continue
                yield {c: obj.get(c) for c in need}


# --------------------------------------------------------------------------- datasets
def _import_datasets(cfg: JobConfig) -> Any:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{cfg.source_path}: input.dataset: reading a dataset needs the 'datasets' package: "
            "pip install datasets (or: pip install 'batchgen[datasets]')"
        ) from None
    import datasets

    return datasets


class DatasetSource(Source):
    """A local save_to_disk directory, a local dataset directory/files, or a hub id."""

    def __init__(self, cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> None:
        self.cfg = cfg
        self.need = needed_columns(cfg)
        self.limit = cfg.input.limit
        self.task_id, self.num_tasks = task_id, num_tasks
        ds_lib = _import_datasets(cfg)
        inp = cfg.input
        spec = inp.dataset or ""
        local = resolve_path(cfg, spec, must_exist=True)
        self.description = spec
        self.iterable = False
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                               or (local / "state.json").is_file()):
            ds = ds_lib.load_from_disk(str(local))
            if isinstance(ds, ds_lib.DatasetDict):
                split = inp.split or ("train" if "train" in ds else None)
                if split is None or split not in ds:
                    raise ConfigError(
                        f"{cfg.source_path}: input.split: '{inp.split}' is not a split of {spec}; "
                        f"available splits: {', '.join(ds.keys())}"
                    )
                ds = ds[split]
            elif inp.split not in (None, "train") and ds.split is not None and str(ds.split) != inp.split:
                raise ConfigError(
                    f"{cfg.source_path}: input.split: the dataset saved at {spec} holds split '{ds.split}', not '{inp.split}'"
                )
        else:
            if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
                raise ConfigError(f"{cfg.source_path}: input.dataset: no such directory: {local}")
            name = str(local) if local.exists() else spec
            kwargs: dict[str, Any] = dict(split=inp.split or "train", streaming=inp.streaming)
            if inp.config is not None:
                kwargs["name"] = inp.config
            if inp.revision is not None:
                kwargs["revision"] = inp.revision
            if inp.data_files is not None:
                kwargs["data_files"] = inp.data_files
            try:
                ds = ds_lib.load_dataset(name, **kwargs)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"{cfg.source_path}: input.dataset: can't load '{spec}': {_first_line(e)}") from None
            except Exception as e:  # noqa: BLE001 - hub/network errors of many kinds
                raise ConfigError(f"{cfg.source_path}: input.dataset: can't load '{spec}': {type(e).__name__}: {_first_line(e)}") from None
        self.iterable = isinstance(ds, ds_lib.IterableDataset)
        feats = getattr(ds, "features", None)
        if feats is not None:
            self.columns = list(feats.keys())
            schema = feats.arrow_schema
            arrow = {n: schema.field(n).type for n in schema.names}
        else:  # streaming with unknown features: peek at the first rows
            first = list(ds.take(100))
            self.columns = list(first[0].keys()) if first else []
            arrow = {c: _infer_type([r.get(c) for r in first]) for c in self.columns}
        self.types = {}
        for c in ([inp.id_column] if inp.id_column else []) + list(inp.columns):
            self.types[c] = arrow.get(c, pa.string())
        self.ds = ds
        if self.iterable:
            n = None
            try:
                info = ds.info.splits.get(inp.split or "train") if ds.info and ds.info.splits else None
                n = info.num_examples if info is not None and info.num_examples else None
            except Exception:  # noqa: BLE001
                n = None
            if self.limit is not None:
                n = self.limit if n is None else min(n, self.limit)
            self.global_total = n
            # modulo partition: rows index % N == task_id
            self.total = None if n is None else max(0, (n - task_id + num_tasks - 1) // num_tasks)
        else:
            n = len(ds)
            if self.limit is not None:
                n = min(n, self.limit)
            self.global_total = n
            self.lo, self.hi = task_id * n // num_tasks, (task_id + 1) * n // num_tasks
            self.total = self.hi - self.lo

    def check(self) -> None:
        check_columns(self.cfg, self.columns, f"dataset {self.description}")

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"dataset": self.description}
        if self.num_tasks > 1:  # one task reads rows in the same order either way
            ident["partition"] = "modulo" if self.iterable else "range"
        return ident

    def iter_rows(self, start: int = 0) -> Iterator[tuple[int, int, dict]]:
        need = [c for c in self.need if c in self.columns]
        missing = [c for c in self.need if c not in self.columns]
        if self.iterable:
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
                    r = {c: row.get(c) for c in need}
                    for c in missing:
                        r[c] = None
                    yield pos, g, r
                    pos += 1
                g += 1
            return
        a = self.lo + start
        if a >= self.hi:
            return
        ds = self.ds.select_columns(need).select(range(a, self.hi))
        pos, g = start, a
        for batch in ds.iter(batch_size=BATCH):
            n = len(next(iter(batch.values()))) if batch else 0
            for j in range(n):
                r = {c: batch[c][j] for c in need}
                for c in missing:
                    r[c] = None
                yield pos, g, r
                pos += 1
                g += 1


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def open_source(cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> Source:
    """The source of this task's rows; checks files and columns (ConfigError)."""
    if not 0 <= task_id < num_tasks:
        raise ConfigError(f"task id {task_id} is out of range for {num_tasks} task(s)")
    src: Source
    if cfg.input.files is not None:
        src = FileSource(cfg, task_id, num_tasks)
    else:
        src = DatasetSource(cfg, task_id, num_tasks)
    src.check()  # type: ignore[attr-defined]
    return src

"""Rows in: Hugging Face datasets, Parquet and JSONL files; stable ids; the task partition; the
input's identity (what a resumed run checks has not changed).

A source yields `(pos, index, row)` for the rows of one task, streaming (memory does not grow
with the input):
- `index` is the row's position in the whole input in source order (files sorted by path; it is
  the default id, unique across the input, also for rows that could not be read);
- `pos` is its position in this task's partition (0, 1, 2, ...), stable across restarts and
  across changes of input.limit: the output ledger records which positions are done, and
  `iter_rows(start=k)` skips the first k cheaply (Parquet row groups and datasets are skipped
  without reading them).
- `row` holds only the columns the job needs. A row that can't be used (a malformed or over-long
  JSONL line, a value nested too deeply, an id that is null, NaN, a list...) holds
  ROW_ERROR (the reason, one line naming file and line) and ROW_ORIGIN (a RowOrigin: file or
  dataset, row and line) and none of the job's columns.

Partition (`task_id` of `num_tasks`, deterministic, stable across restarts). It is computed from
the whole input, never from input.limit: the limit keeps the rows whose index is below it, so
raising it only adds positions at the end of each task's part.
- files, at least as many files as tasks: whole files, balanced by size (largest first onto the
  least loaded task);
- files, fewer files than tasks: contiguous row ranges of the whole input;
- a dataset with a known length: contiguous row ranges; a streaming dataset of unknown length:
  rows whose index % num_tasks == task_id.

Identity (`Source.identity()`, stored in the output's manifest; `identity_change(old, new)`
compares): every file's path, size, modification time and a content hash that reads a few KiB
(head, tail and blocks in between; a Parquet file's footer), the partition, and for datasets
their fingerprint, row count and arrow files. A changed input is refused; rows appended to the
last JSONL file are accepted when that provably moves no row (see `identity_change`). A file is
read only up to the size it had at start-up, so rows appended while a job runs are left for the
next run.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa

from .config import ConfigError, JobConfig, output_dir, resolve_path, template_fields

ROW_ERROR = "__batchgen_row_error__"
ROW_ORIGIN = "__batchgen_row_origin__"
PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
BATCH = 1024
IDENTITY_VERSION = 2
# A JSONL line longer than this is an error row, skipped without holding it in memory: 64 MiB is
# millions of tokens of text, and parsing it needs several times its size.
MAX_LINE_BYTES = 64 << 20
# Values of the job's columns nested deeper than this are error rows: deeper values risk Python's
# recursion limit wherever they are copied, encoded or written later.
MAX_DEPTH = 64
# A line nested deeper than this is not parsed at all: json's own limit (RecursionError) counts
# the frames already on the call stack, so near it the same line could parse in one run and not
# in another. 200 levels leave json ~800 frames of the default limit of 1000 for its callers.
MAX_PARSE_DEPTH = 200
# The content hash reads the head, the tail and BLOCKS blocks in between (a few KiB, however big
# the file): an inserted or removed row shifts every later byte, so it changes a sampled block.
HASH_HEAD, HASH_TAIL, HASH_BLOCK, HASH_BLOCKS = 64 << 10, 16 << 10, 4 << 10, 8
BOM = b"\xef\xbb\xbf"


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


def _error_row(reason: str, origin: RowOrigin) -> dict:
    return {ROW_ERROR: reason, ROW_ORIGIN: origin}


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(JSONL_EXT):
        return "jsonl"
    return None


def _where(cfg: JobConfig, key: str) -> str:
    where = getattr(cfg, "where", None)
    return where(key) if callable(where) else str(cfg.source_path or "job file")


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
    # per-row sampling values (sampling.from_columns, json_schema_column): read like any other column
    cols += list(cfg.sampling.from_columns.values())
    if cfg.sampling.json_schema_column:
        cols.append(cfg.sampling.json_schema_column)
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


def check_id_type(cfg: JobConfig, t: pa.DataType | None, where: str) -> None:
    """An id names one row: a list, struct or map column can't be one (ConfigError)."""
    if t is None or not cfg.input.id_column:
        return
    if pa.types.is_dictionary(t):
        t = t.value_type
    nested = (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
              or pa.types.is_struct(t) or pa.types.is_map(t) or pa.types.is_union(t))
    if nested:
        raise ConfigError(f"{_where(cfg, 'input.id_column')}: input.id_column: column '{cfg.input.id_column}' holds "
                          f"{t} values in {where}; an id must be a string or a number")


# --------------------------------------------------------------------------- row values
def _kind_of(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return "a " + type(v).__name__


def id_problem(value: Any, t: pa.DataType | None) -> str | None:
    """Why `value` can't be the id of a row in an id column of type `t` (None: it can).
    The output's id column has that type, so a value it can't hold would be lost there."""
    if value is None:
        return "is null"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}"
    if isinstance(value, (list, tuple, dict)):
        return f"is {_kind_of(value)}, not a string or a number"
    if t is None or pa.types.is_string(t) or pa.types.is_large_string(t):
        return None  # strings; a number is written as its text
    if pa.types.is_integer(t):
        if not isinstance(value, int) or isinstance(value, bool):
            return f"is {_kind_of(value)} ({value!r}), but this input's ids are {t}"
        bits = t.bit_width
        lo, hi = (0, 2**bits - 1) if pa.types.is_unsigned_integer(t) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return None if lo <= value <= hi else f"{value} is out of the range of {t}"
    if pa.types.is_floating(t):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"is {_kind_of(value)} ({value!r}), but this input's ids are {t}"
    try:
        pa.array([value], type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return f"is {_kind_of(value)} ({value!r}), but this input's ids are {t}"
    return None


def value_problem(col: str, value: Any, surrogates: bool = True) -> str | None:
    """Why a value can't travel through the job (None: it can): nested deeper than MAX_DEPTH, or
    a string with an unpaired UTF-16 surrogate (from a JSON \\ud800 escape), which is not text:
    the tokenizer and Parquet (UTF-8) can't take it."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if surrogates and not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    return f"column '{col}' holds an unpaired surrogate (\\u{ord(v[e.start]):04x}), which is not text"
            continue
        if isinstance(v, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                return f"column '{col}' is nested deeper than {MAX_DEPTH} levels"
            items = v.values() if isinstance(v, dict) else v
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)  # keys are strings too
            stack.extend((x, depth + 1) for x in items)
    return None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STRING_OR_BRACKET = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a string (unrolled: fast) or a bracket


def nesting(raw: bytes) -> int:
    """How deeply a JSON text nests arrays and objects (brackets inside strings don't count)."""
    depth = deepest = 0
    for m in _STRING_OR_BRACKET.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def too_deep(raw: bytes) -> bool:
    """Whether a line nests past MAX_PARSE_DEPTH (counting brackets first: most lines have few)."""
    return raw.count(b"[") + raw.count(b"{") > MAX_PARSE_DEPTH and nesting(raw) > MAX_PARSE_DEPTH


class _JsonLine:
    """Parses JSONL lines into the job's columns; never raises: a line that can't be used
    becomes an error row. Duplicate keys in what the job reads are refused (which value wins
    differs between tools)."""

    def __init__(self, need: list[str]) -> None:
        self.need = need
        self._dups: dict[int, list[str]] = {}  # id(dict) -> its repeated keys, for the line being parsed
        self._decoder = json.JSONDecoder(object_pairs_hook=self._pairs)

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict:
        d = dict(pairs)
        if len(d) != len(pairs):
            seen: set[str] = set()
            self._dups[id(d)] = [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
        return d

    def decode(self, text: str) -> Any:
        """json.loads, noting repeated keys (ValueError, RecursionError as json raises them)."""
        self._dups.clear()
        return self._decoder.decode(text)

    def parse(self, raw: bytes, origin: RowOrigin) -> dict:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return _error_row(f"{origin}: not valid UTF-8 (byte {e.start} of the line)", origin)
        if too_deep(raw):
            return _error_row(f"{origin}: JSON nested too deeply to read (over {MAX_PARSE_DEPTH} levels)", origin)
        try:
            obj = self.decode(text)
        except ValueError as e:
            return _error_row(f"malformed JSON at {origin}: {e}", origin)
        except RecursionError:  # not expected below MAX_PARSE_DEPTH; never a crash either way
            return _error_row(f"{origin}: JSON nested too deeply to read", origin)
        if not isinstance(obj, dict):
            return _error_row(f"line {origin} is not a JSON object (it is {_kind_of(obj)})", origin)
        row = {c: obj.get(c) for c in self.need}
        problem = self._duplicates(obj, row) if self._dups else None
        # cheap filters first: only a line with many brackets can nest deeply, only a \\uD8xx
        # escape can make a lone surrogate (raw UTF-8 can't encode one: it failed to decode above)
        deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
        surrogates = _SURROGATE_ESCAPE.search(raw) is not None
        if problem is None and (deep or surrogates):
            for c in self.need:
                problem = value_problem(c, row[c], surrogates)
                if problem:
                    break
        return _error_row(f"{origin}: {problem}", origin) if problem else row

    def _duplicates(self, top: dict, row: dict) -> str | None:
        top_dups = [k for k in self._dups.get(id(top), []) if k in self.need]
        if top_dups:
            return f"key '{top_dups[0]}' appears more than once"
        nested = set(self._dups) - {id(top)}
        for c, v in row.items():
            stack = [v]
            while stack:
                x = stack.pop()
                if isinstance(x, dict):
                    if id(x) in nested:
                        return f"key '{self._dups[id(x)][0]}' appears more than once in column '{c}'"
                    stack.extend(x.values())
                elif isinstance(x, list):
                    stack.extend(x)
        return None


# --------------------------------------------------------------------------- content hashes
def content_hash(path: str, size: int) -> str:
    """A hash of a file's first `size` bytes that reads only its head, tail and HASH_BLOCKS blocks
    in between (the whole of a small file). Rows inserted, removed or resized anywhere shift the
    bytes after them, so this changes; an in-place edit between the sampled blocks is caught by
    the modification time, which the identity holds too."""
    h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    fd = os.open(path, os.O_RDONLY)
    try:
        if size <= HASH_HEAD + HASH_TAIL + HASH_BLOCK * HASH_BLOCKS:
            h.update(_pread_all(fd, size, 0))
        else:
            h.update(_pread_all(fd, HASH_HEAD, 0))
            span = size - HASH_HEAD - HASH_TAIL - HASH_BLOCK
            for i in range(1, HASH_BLOCKS + 1):
                h.update(_pread_all(fd, HASH_BLOCK, HASH_HEAD + span * i // (HASH_BLOCKS + 1)))
            h.update(_pread_all(fd, HASH_TAIL, size - HASH_TAIL))
    finally:
        os.close(fd)
    return h.hexdigest()


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    parts = []
    while n > 0:
        b = os.pread(fd, min(n, 1 << 20), offset)
        if not b:
            break  # shorter than it was: the hash differs, as it should
        parts.append(b)
        n -= len(b)
        offset += len(b)
    return b"".join(parts)


def parquet_footer(path: str, size: int, name: str) -> bytes:
    """The footer (Thrift FileMetaData: schema, row groups, column statistics, offsets) of a
    Parquet file; InputError naming it when it has none (truncated, or not Parquet)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        tail = _pread_all(fd, 8, size - 8) if size >= 12 else b""
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise InputError(f"input file {name}: not a Parquet file: no PAR1 footer (truncated, or still being written?)")
        n = int.from_bytes(tail[:4], "little")
        if n <= 0 or n > size - 12:
            raise InputError(f"input file {name}: corrupt Parquet footer (length {n} in a file of {size:,} bytes)")
        return _pread_all(fd, n, size - 8 - n)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- files
@dataclass
class _File:
    path: str  # absolute
    kind: str
    size: int  # at start-up: the file is read up to here
    mtime_ns: int = 0
    rel: str = ""  # relative to the job file's directory: names it in identities and messages
    sha: str = ""
    _count: int | None = None
    schema: pa.Schema | None = None  # Parquet
    group_rows: list[int] = field(default_factory=list)  # Parquet: rows per row group

    def count(self) -> int:
        """Rows in the file (JSONL: non-blank lines, read once; Parquet: from the footer)."""
        if self._count is None:
            self._count = sum(1 for _ in _jsonl_lines(self))
        return self._count

    def entry(self, with_mtime: bool = True) -> dict[str, Any]:
        e: dict[str, Any] = {"path": self.rel, "size": self.size}
        if with_mtime:
            e["mtime_ns"] = self.mtime_ns
        e["sha"] = self.sha
        return e


def _stat_file(path: str, base_dir: str) -> _File:
    st = os.stat(path)
    k = _kind(path)
    assert k is not None
    return _File(path, k, st.st_size, st.st_mtime_ns, os.path.relpath(path, base_dir))


class _Prefix(io.RawIOBase):
    """The first `size` bytes of a file: a file that grows while it is read is read as it was at
    start-up; `left` says how much of that was not there (a file truncated meanwhile)."""

    def __init__(self, path: str, size: int) -> None:
        self._raw = open(path, "rb", buffering=0)
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.left <= 0:
            return 0
        with memoryview(b) as m:
            n = self._raw.readinto(m[: min(len(m), self.left)]) or 0
        self.left -= n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextmanager
def _open_jsonl(f: _File) -> Iterator[BinaryIO]:
    prefix = _Prefix(f.path, f.size)
    buf = io.BufferedReader(prefix, 1 << 20)
    try:
        if f.path.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=buf, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        else:
            yield buf  # type: ignore[misc]
        if prefix.left > 0:
            raise OSError(f"the file is {prefix.left:,} bytes shorter than when the job started (truncated?)")
    finally:
        buf.close()


def _jsonl_lines(f: _File) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of each non-blank line of a JSONL file as it was at start-up (a
    leading byte order mark dropped); bytes is None for a line over MAX_LINE_BYTES, skipped
    without holding it. Counting and reading both use this, so they agree on what a row is.
    InputError when the file can't be read (bad gzip data, truncated, I/O error)."""
    lineno = 0
    try:
        with _open_jsonl(f) as fh:
            readline = fh.readline
            while True:
                raw = readline(MAX_LINE_BYTES + 1)
                if not raw:
                    break
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    while True:  # the rest of the over-long line, a chunk at a time
                        chunk = readline(1 << 20)
                        if not chunk or chunk.endswith(b"\n"):
                            break
                    yield lineno, None
                    continue
                if raw.startswith(BOM):
                    raw = raw[3:]
                if not raw.isspace():  # (strip() would copy the line)
                    yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"input file {f.rel}: can't be read after line {lineno:,}: {_first_line(e)}") from None


def expand_files(cfg: JobConfig) -> list[_File]:
    """Paths, globs and directories -> sorted unique supported files. ConfigError when any entry
    matches nothing. Files inside output.path are never input: the job's own shards would be read
    as rows on the next run."""
    out: dict[str, _File] = {}
    base = str(Path(cfg.base_dir).resolve())
    own = os.path.join(str(output_dir(cfg)), "")
    skipped: list[str] = []

    def add(path: str) -> bool:
        p = os.path.abspath(path)
        if p.startswith(own) or os.path.realpath(p).startswith(own):
            skipped.append(p)
            return False
        try:
            out[p] = _stat_file(p, base)
        except OSError as e:
            raise ConfigError(f"{_where(cfg, 'input.files')}: input.files: can't read {p}: {e.strerror}") from None
        return True

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
                        if _kind(fp) and add(fp):
                            found_any = True
            else:
                k = _kind(m)
                if k is None:
                    if is_glob:
                        continue
                    raise ConfigError(
                        f"{cfg.source_path}: {key}: '{m}' is neither Parquet (.parquet) nor JSON Lines (.jsonl, .json, .jsonl.gz)"
                    )
                found_any = add(m) or found_any
        if not found_any:
            why = " (only files in output.path, which are never input)" if skipped else ""
            raise ConfigError(f"{cfg.source_path}: {key}: '{spec}' holds no .parquet or .jsonl file{why}")
    return [out[k] for k in sorted(out)]


def _probe_jsonl(f: _File, max_rows: int = 100, max_bytes: int = 1 << 20) -> tuple[list[str], list[dict], int]:
    """The keys and rows of the first JSON objects of a JSONL file, and how many non-blank lines
    were looked at. InputError for a file that can't be read or whose first lines hold no JSON
    object at all (not JSON Lines: a JSON array, another format, UTF-16...)."""
    keys: list[str] = []
    rows: list[dict] = []
    parser = _JsonLine([])
    seen = nbytes = 0
    any_object = False
    first_problem = ""
    for lineno, raw in _jsonl_lines(f):
        seen += 1
        if raw is None:
            first_problem = first_problem or f"line {lineno} is over {MAX_LINE_BYTES:,} bytes"
            continue
        nbytes += len(raw)
        try:
            if too_deep(raw):
                raise ValueError(f"nested over {MAX_PARSE_DEPTH} levels")
            obj = parser.decode(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            first_problem = first_problem or f"line {lineno}: {_first_line(e)}"
            obj = None
        any_object = any_object or isinstance(obj, dict)
        if isinstance(obj, dict):
            keys += [k for k in obj if k not in keys]
            if value_problem("", obj) is None:  # a row the reader refuses must not type a column
                rows.append(obj)
        elif obj is not None:
            first_problem = first_problem or f"line {lineno} is {_kind_of(obj)}"
        if len(rows) >= max_rows or nbytes >= max_bytes:
            break
    if seen and not any_object:
        hint = ""
        with open(f.path, "rb") as fh:
            head = fh.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff", b"{\x00", b"\x00{"):
            hint = " (it looks like UTF-16; JSON Lines must be UTF-8)"
        elif head.lstrip()[:1] == b"[":
            hint = " (a JSON array? one object per line is needed: jq -c '.[]' FILE)"
        raise InputError(f"input file {f.rel}: not JSON Lines: none of its first {seen} line(s) is a JSON object "
                         f"({first_problem}){hint}")
    return keys, rows, seen


def _infer_type(values: list[Any]) -> pa.DataType:
    vals = [v for v in values if v is not None]
    if not vals:
        return pa.string()
    try:
        t = pa.array(vals).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return pa.string()
    if pa.types.is_null(t):
        return pa.string()
    return t


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Types that give the same output column (an all-null column of one file fits any type)."""
    strings = (pa.string(), pa.large_string())
    return a == b or pa.types.is_null(a) or pa.types.is_null(b) or (a in strings and b in strings)


class Source:
    """Base: see the module docstring."""

    columns: list[str]  # every column the input has
    types: dict[str, pa.DataType]  # arrow types of the copied and id columns
    total: int | None  # rows in this task's partition (after input.limit), when known
    description: str

    def iter_rows(self, start: int = 0) -> Iterator[tuple[int, int, dict]]:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What the rows and their positions depend on (checked again on resume with identity_change)."""
        return {}

    def check(self) -> None:
        """ConfigError when the job's columns don't fit the input."""

    def _id_checked(self, row: dict, origin: RowOrigin) -> dict:
        """The row, or an error row when its id can't be one (null, NaN, a list, a value the id
        column's type can't hold: written, it would be null or lost)."""
        col = self.cfg.input.id_column  # type: ignore[attr-defined]
        if col is None or ROW_ERROR in row:
            return row
        problem = id_problem(row.get(col), self.types.get(col))
        if problem is None:
            return row
        return _error_row(f"{origin}: id column '{col}' {problem}", origin)


class FileSource(Source):
    def __init__(self, cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> None:
        self.cfg = cfg
        self.files = expand_files(cfg)
        self.need = needed_columns(cfg)
        self.limit = cfg.input.limit
        self.num_tasks = num_tasks
        self.root = str(Path(cfg.base_dir).resolve())
        sample = self._inspect()
        first = self.files[0]
        arrow = {n: first.schema.field(n).type for n in first.schema.names} if first.schema is not None else {}
        self.types = {}
        for c in ([cfg.input.id_column] if cfg.input.id_column else []) + list(cfg.input.columns):
            self.types[c] = arrow[c] if c in arrow else _infer_type([r.get(c) for r in sample])
        self.description = f"{len(self.files)} file(s)" if len(self.files) > 1 else first.path
        try:
            self._plan(task_id, num_tasks)  # counting rows reads whole files: a bad one shows here
        except InputError as e:
            raise InputError(f"{_where(cfg, 'input.files')}: {e}") from None

    def _inspect(self) -> list[dict]:
        """Read what is cheap of every file before the model loads: Parquet footers (row counts,
        schemas), the first lines of JSONL files, content hashes. InputError names a file that
        can't be read; ConfigError an input with no rows. Returns the first JSONL file's rows."""
        sample: list[dict] = []
        rows_seen = 0
        for i, f in enumerate(self.files):
            try:
                if f.kind == "parquet":
                    self._inspect_parquet(f)
                    rows_seen += f.count()
                else:
                    f.sha = content_hash(f.path, f.size)
                    keys, rows, seen = _probe_jsonl(f)
                    rows_seen += seen
                    if i == 0:
                        self.columns, sample = keys, rows
            except InputError as e:
                raise InputError(f"{_where(self.cfg, 'input.files')}: {e}") from None
            except OSError as e:
                raise InputError(f"{_where(self.cfg, 'input.files')}: input file {f.rel}: can't be read: {e}") from None
        first = self.files[0]
        if first.schema is not None:
            self.columns = list(first.schema.names)
        if rows_seen == 0:
            raise ConfigError(f"{_where(self.cfg, 'input.files')}: input.files: the input holds no rows "
                              f"({len(self.files)} empty file(s), e.g. {first.rel})")
        return sample

    def _inspect_parquet(self, f: _File) -> None:
        import pyarrow.parquet as pq

        footer = parquet_footer(f.path, f.size, f.rel)
        f.sha = hashlib.blake2b(f.size.to_bytes(8, "little") + footer, digest_size=16).hexdigest()
        try:
            md = pq.read_metadata(f.path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a corrupt footer
            raise InputError(f"input file {f.rel}: can't read its Parquet footer: {_first_line(e)}") from None
        f.schema = md.schema.to_arrow_schema()
        f.group_rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        f._count = md.num_rows

    def check(self) -> None:
        first = self.files[0]
        check_columns(self.cfg, self.columns, f"input file {first.path}")
        check_id_type(self.cfg, self.types.get(self.cfg.input.id_column or ""), f"input file {first.rel}")
        self._check_parquet_schemas()

    def _check_parquet_schemas(self) -> None:
        """Every Parquet file has the job's columns, and the id and copied columns have the first
        file's types (the output's columns have those types: other values would be lost)."""
        typed = ([self.cfg.input.id_column] if self.cfg.input.id_column else []) + list(self.cfg.input.columns)
        ref = {c: t for c, t in self.types.items()}
        ref_file: dict[str, str] = {c: self.files[0].rel for c in ref}
        for f in self.files:
            if f.schema is None:
                continue
            names = f.schema.names
            for c in self.need:
                if c not in names:
                    raise ConfigError(f"{_where(self.cfg, 'input.files')}: input file {f.rel} has no column '{c}' "
                                      f"(the job reads it; {f.rel} has: {', '.join(names[:20])})")
            for c in typed:
                t = f.schema.field(c).type
                if pa.types.is_null(ref[c]) and not pa.types.is_null(t):
                    ref[c], ref_file[c] = t, f.rel
                    self.types[c] = t  # all null in the first file: the output column takes this type
                elif not _same_type(ref[c], t):
                    raise ConfigError(f"{_where(self.cfg, 'input.files')}: column '{c}' is {t} in {f.rel} but "
                                      f"{ref[c]} in {ref_file[c]}; the output column needs one type")

    # ------------------------------------------------------------------ partition
    def _plan(self, task_id: int, num_tasks: int) -> None:
        """This task's segments, from the whole input (never from input.limit)."""
        files = self.files
        # segments: (file index, first row in file, end row in file or None, global index of first row)
        self.segments: list[tuple[int, int, int | None, int]] = []
        self.owners: list[int] | None = None
        if num_tasks == 1:
            self.mode = "whole"
            self._whole_files(list(range(len(files))))
        elif len(files) >= num_tasks:
            self.mode = "files"
            self.owners = _balance([f.size for f in files], [f.path for f in files], num_tasks)
            self._whole_files([i for i in range(len(files)) if self.owners[i] == task_id])
        else:
            self.mode = "ranges"
            total = sum(f.count() for f in files)
            lo, hi = task_id * total // num_tasks, (task_id + 1) * total // num_tasks
            off = 0
            for i, f in enumerate(files):
                n = f.count()
                a, b = max(lo, off), min(hi, off + n)
                if a < b:
                    self.segments.append((i, a - off, b - off, a))
                off += n
            self.rows = total
            # the limit keeps rows with index < limit: a prefix of this task's range
            self.total = hi - lo if self.limit is None else max(0, min(hi, self.limit) - lo)
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
        part: dict[str, Any] = {"mode": self.mode}
        if self.owners is not None:
            part["owners"] = self.owners
        if self.mode == "ranges":
            part["rows"] = self.rows
        return {"version": IDENTITY_VERSION, "root": self.root, "files": [f.entry() for f in self.files],
                "partition": part}

    # ------------------------------------------------------------------ reading
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
            known = seg_len  # rows the file holds from a (None: not counted); the limit may cut it
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
            self._check_unchanged(f)
            reader = self._read_parquet if f.kind == "parquet" else self._read_jsonl
            pos += skip
            k = 0
            for row in reader(f, a + skip, count):
                yield pos, goff + skip + k, row
                pos += 1
                k += 1
            if count is not None and k < count and known is not None:
                raise InputError(f"input file {f.rel}: {k:,} rows where {count:,} were expected from row {a + skip:,} "
                                 "(it changed while the job was running)")
            running = goff + skip + k

    def _check_unchanged(self, f: _File) -> None:
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

    def _read_parquet(self, f: _File, first: int, count: int | None) -> Iterator[dict]:
        """Rows first .. first+count of a Parquet file, a row group at a time. A row group that
        can't be read (twice) becomes error rows, one per row (the footer says how many); a row
        that can't be converted, one error row."""
        import pyarrow.parquet as pq

        end = sum(f.group_rows) if count is None else min(sum(f.group_rows), first + count)
        names = set(f.schema.names) if f.schema is not None else set()
        cols = [c for c in self.need if c in names]
        off = 0
        pf = None
        for g, n in enumerate(f.group_rows):
            lo, hi = max(first - off, 0), min(end - off, n)  # rows of this group wanted
            if hi > lo:
                done = lo
                for attempt in range(2):
                    try:
                        pf = pf or pq.ParquetFile(f.path)  # opened again for the retry
                        for r in self._group_rows(f, pf, g, off, cols, done, hi):
                            yield r
                            done += 1
                        break
                    except Exception as e:  # noqa: BLE001 - pyarrow: OSError, ArrowInvalid, ... for bad data
                        pf = None
                        if attempt == 1:
                            why = f"row group {g} can't be read: {type(e).__name__}: {_first_line(e)}"
                            for k in range(done, hi):
                                o = RowOrigin(f.rel, off + k)
                                yield _error_row(f"{f.rel} row {off + k}: {why}", o)
            off += n
            if off >= end:
                return

    def _group_rows(self, f: _File, pf: Any, g: int, off: int, cols: list[str], lo: int, hi: int) -> Iterator[dict]:
        cur = 0
        for batch in pf.iter_batches(batch_size=BATCH, row_groups=[g], columns=cols, use_threads=False):
            bn = batch.num_rows
            a, b = max(lo - cur, 0), min(hi - cur, bn)
            if b > a:
                part = batch.slice(a, b - a)
                try:
                    rows = part.to_pylist()
                except Exception:  # noqa: BLE001 - e.g. invalid UTF-8 in a string: find the rows
                    rows = [self._convert_one(part, j, f, off + cur + a + j) for j in range(b - a)]
                for j, r in enumerate(rows):
                    if ROW_ERROR not in r:
                        for c in self.need:
                            r.setdefault(c, None)
                        r = self._id_checked(r, RowOrigin(f.rel, off + cur + a + j))
                    yield r
            cur += bn
            if cur >= hi:
                return

    def _convert_one(self, batch: Any, j: int, f: _File, row: int) -> dict:
        try:
            return batch.slice(j, 1).to_pylist()[0]
        except Exception as e:  # noqa: BLE001
            o = RowOrigin(f.rel, row)
            return _error_row(f"{o}: can't be read: {type(e).__name__}: {_first_line(e)}", o)

    def _read_jsonl(self, f: _File, first: int, count: int | None) -> Iterator[dict]:
        parser = _JsonLine(self.need)
        k = 0  # rows (non-blank lines) before this one
        emitted = 0
        for lineno, raw in _jsonl_lines(f):
            if k < first:
                k += 1
                continue
            if count is not None and emitted >= count:
                return
            origin = RowOrigin(f.rel, k, lineno)
            k += 1
            emitted += 1
            if raw is None:
                yield _error_row(f"{origin}: the line is over the limit of {MAX_LINE_BYTES:,} bytes", origin)
            else:
                yield self._id_checked(parser.parse(raw, origin), origin)


def _balance(sizes: list[int], paths: list[str], num_tasks: int) -> list[int]:
    """The task of each file: largest first onto the least loaded task."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], paths[i]))
    load = [0] * num_tasks
    owner = [0] * len(sizes)
    for i in order:
        t = min(range(num_tasks), key=lambda k: (load[k], k))
        owner[i] = t
        load[t] += max(sizes[i], 1)
    return owner


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


def _saved_files(d: Path) -> list[str] | None:
    """The arrow files of a save_to_disk directory of one split (state.json), None if unknown."""
    try:
        state = json.loads((d / "state.json").read_text())
        return [x["filename"] for x in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class DatasetSource(Source):
    """A local save_to_disk directory, a local dataset directory/files, or a hub id."""

    def __init__(self, cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> None:
        self.cfg = cfg
        self.need = needed_columns(cfg)
        self.limit = cfg.input.limit
        self.task_id, self.num_tasks = task_id, num_tasks
        self.description = cfg.input.dataset or ""
        self.saved_dir: Path | None = None
        ds_lib = _import_datasets(cfg)
        ds = self._load(ds_lib)
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
            arrow = {c: _infer_type([r.get(c) for r in first]) for c in self.columns}
        self.types = {}
        for c in ([inp.id_column] if inp.id_column else []) + list(inp.columns):
            self.types[c] = arrow.get(c, pa.string())
        self.ds = ds
        self._plan(task_id, num_tasks)

    def _load(self, ds_lib: Any) -> Any:
        cfg, inp = self.cfg, self.cfg.input
        spec = inp.dataset or ""
        local = resolve_path(cfg, spec, must_exist=True)
        if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                               or (local / "state.json").is_file()):
            return self._load_saved(ds_lib, local)
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
        if not isinstance(ds, ds_lib.IterableDataset) and len(ds) == 0:
            raise ConfigError(f"{cfg.source_path}: input.dataset: '{spec}' (split {kwargs['split']}) holds no rows")
        return ds

    def _load_saved(self, ds_lib: Any, local: Path) -> Any:
        """A save_to_disk directory: of one dataset, or of a DatasetDict (only the split asked for
        is loaded). ConfigError for a missing split, an empty or unreadable dataset."""
        cfg, inp, spec = self.cfg, self.cfg.input, self.cfg.input.dataset
        where = f"{cfg.source_path}: input.dataset"
        if (local / "dataset_dict.json").is_file():
            try:
                splits = list(json.loads((local / "dataset_dict.json").read_text())["splits"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{where}: can't read {local / 'dataset_dict.json'}: {_first_line(e)}") from None
            split = inp.split or ("train" if "train" in splits else None)
            if split is None or split not in splits:
                raise ConfigError(f"{cfg.source_path}: input.split: '{inp.split}' is not a split of {spec}; "
                                  f"available splits: {', '.join(splits)}")
            local, label = local / split, f"split '{split}' of the dataset saved at {spec}"
        else:
            label = f"the dataset saved at {spec}"
        if _saved_files(local) == []:  # datasets can't load a saved dataset of no rows
            raise ConfigError(f"{where}: {label} holds no rows")
        try:
            ds = ds_lib.load_from_disk(str(local))
        except Exception as e:  # noqa: BLE001 - missing/corrupt arrow files, bad JSON, ...
            raise ConfigError(f"{where}: can't load {label}: {type(e).__name__}: {_first_line(e)}") from None
        if isinstance(ds, ds_lib.DatasetDict):  # a dict saved without dataset_dict.json: cannot happen, but be clear
            raise ConfigError(f"{where}: {label} is a DatasetDict; set input.split")
        if (local / "state.json").is_file() and not (local.parent / "dataset_dict.json").is_file():
            if inp.split not in (None, "train") and ds.split is not None and str(ds.split) != inp.split:
                raise ConfigError(f"{cfg.source_path}: input.split: the dataset saved at {spec} holds split "
                                  f"'{ds.split}', not '{inp.split}'")
        if len(ds) == 0:
            raise ConfigError(f"{where}: {label} holds no rows")
        self.saved_dir = local
        return ds

    def _plan(self, task_id: int, num_tasks: int) -> None:
        """Row ranges of the whole dataset, or every N-th row of a stream (never from input.limit)."""
        ds, inp = self.ds, self.cfg.input
        if self.iterable:
            n = None
            try:
                info = ds.info.splits.get(inp.split or "train") if ds.info and ds.info.splits else None
                n = info.num_examples if info is not None and info.num_examples else None
            except Exception:  # noqa: BLE001
                n = None
            self.rows = n
            if n is not None and self.limit is not None:
                n = min(n, self.limit)
            elif self.limit is not None:
                n = self.limit
            # modulo partition: rows index % N == task_id
            self.total = None if n is None else max(0, (n - task_id + num_tasks - 1) // num_tasks)
        else:
            n = len(ds)
            self.rows = n
            self.lo, self.hi = task_id * n // num_tasks, (task_id + 1) * n // num_tasks
            # the limit keeps rows with index < limit: a prefix of this task's range
            self.end = self.hi if self.limit is None else max(self.lo, min(self.hi, self.limit))
            self.total = self.end - self.lo

    def check(self) -> None:
        check_columns(self.cfg, self.columns, f"dataset {self.description}")
        check_id_type(self.cfg, self.types.get(self.cfg.input.id_column or ""), f"dataset {self.description}")

    def identity(self) -> dict[str, Any]:
        inp = self.cfg.input
        ident: dict[str, Any] = {"version": IDENTITY_VERSION, "dataset": self.description, "split": inp.split,
                                 "rows": self.rows}
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
        out: list[dict[str, Any]] = []
        if self.saved_dir is not None:
            for name in _saved_files(self.saved_dir) or []:
                p = self.saved_dir / name
                size = p.stat().st_size
                out.append({"path": name, "size": size, "sha": content_hash(str(p), size)})
            return out
        if not self.iterable:
            return out  # a map-style dataset from load_dataset: its fingerprint covers its files
        try:  # datasets keeps a stream's files here (not public API: best effort)
            files = list(self.ds._ex_iterable.kwargs.get("original_files") or [])
        except Exception:  # noqa: BLE001
            files = []
        for u in files[:10000]:
            u = str(u)
            if os.path.isfile(u):
                st = os.stat(u)
                out.append({"path": u, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha": content_hash(u, st.st_size)})
            else:
                out.append({"path": u})
        return out

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
                    yield pos, g, self._id_checked(r, RowOrigin(self.description, g))
                    pos += 1
                g += 1
            return
        a = self.lo + start
        if a >= self.end:
            return
        ds = self.ds.select_columns(need).select(range(a, self.end))
        pos, g = start, a
        for batch in ds.iter(batch_size=BATCH):
            n = len(next(iter(batch.values()))) if batch else 0
            for j in range(n):
                r = {c: batch[c][j] for c in need}
                for c in missing:
                    r[c] = None
                yield pos, g, self._id_checked(r, RowOrigin(self.description, g))
                pos += 1
                g += 1


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# --------------------------------------------------------------------------- identity comparison
def identity_change(old: dict, new: dict) -> str | None:
    """None when `new` (this run's Source.identity()) reads the same rows at the same positions as
    `old` (the one stored when the output was started), else one line naming what changed.

    New files that sort after all the old ones are accepted on the same terms as an append.
    Rows appended to the last JSONL file (not gzip) are the same input, provably: the file's
    first old-size bytes hash as before (content_hash: head, tail and blocks between), the old
    part ended with a line end (the old last line is whole), no other file changed, and the
    partition puts no old row elsewhere (one task; or whole files per task with the same owners;
    never row ranges, which the new row count moves). This reads a few KiB of that file."""
    if not old or not new:
        return None
    try:
        if old.get("version") != IDENTITY_VERSION:
            return _v1_change(old, new)
        if "files" in old and "dataset" not in old:
            return _files_change(old, new)
        return _dataset_change(old, new)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a manifest edited by hand, or garbled
        return f"the input it recorded can't be compared ({type(e).__name__}: {e})"


def _v1_change(old: dict, new: dict) -> str | None:
    """Outputs started by an older batchgen recorded paths (or the dataset) only: compare those.
    Their row ranges (several tasks over fewer files, or over a dataset) were cut from the rows
    under the limit of each run, which this one can't know: resuming them could move rows."""
    if new.get("partition", {}).get("mode") == "ranges":
        return ("it was started by an older batchgen, whose row ranges per task moved with input.limit, "
                "so its positions can't be checked; run with --overwrite to start it again")
    if "files" in old:
        paths = [f["path"] for f in new.get("files", [])] if "dataset" not in new else None
        return None if paths == old["files"] else _paths_change(old["files"], paths or [])
    part = {"ranges": "range", "modulo": "modulo"}.get(new.get("partition", {}).get("mode"))
    now = {"dataset": new.get("dataset"), **({"partition": part} if part else {})}
    diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    return None if not diff else "changed: " + ", ".join(f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in diff)


def _paths_change(old: list[str], new: list[str]) -> str:
    added = [p for p in new if p not in set(old)]
    removed = [p for p in old if p not in set(new)]
    parts = []
    if added:
        parts.append(f"{len(added)} file(s) added ({', '.join(added[:3])}{' ...' if len(added) > 3 else ''})")
    if removed:
        parts.append(f"{len(removed)} file(s) removed ({', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''})")
    return "; ".join(parts) or "the order of the input files changed"


def _fmt_time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _entry_change(a: dict, b: dict) -> str | None:
    """What differs between two entries of one file (None: same size, time and content hash)."""
    what = []
    if a.get("size") != b.get("size"):
        what.append(f"size {a.get('size', 0):,} -> {b.get('size', 0):,} bytes")
    if a.get("sha") != b.get("sha") and a.get("size") == b.get("size"):
        what.append("content changed")
    if "mtime_ns" in a and a.get("mtime_ns") != b.get("mtime_ns"):
        what.append(f"modified {_fmt_time(a['mtime_ns'])} -> {_fmt_time(b.get('mtime_ns') or 0)}")
        if len(what) == 1:  # only the time: say how to put it back if the content really is the same
            sec, ns = divmod(int(a["mtime_ns"]), 10**9)
            what.append(f"size and sampled content are the same; if the file is unchanged, restore its time "
                        f"with: touch -d @{sec}.{ns:09d} {a['path']}")
    return ", ".join(what) or None


def _files_change(old: dict, new: dict) -> str | None:
    of, nf = old.get("files", []), new.get("files", [])
    op, np_ = [f["path"] for f in of], [f["path"] for f in nf]
    if np_[: len(op)] == op and len(np_) > len(op):  # files added after all the old ones
        return _added_files_problem(of, nf, old, new)
    if op != np_:
        return _paths_change(op, np_)
    changed = [(i, _entry_change(a, b)) for i, (a, b) in enumerate(zip(of, nf))]
    changed = [(i, c) for i, c in changed if c]
    if not changed:
        if old.get("partition") != new.get("partition"):
            return f"the partition changed: {old.get('partition')} -> {new.get('partition')}"
        return None
    i, what = changed[0]
    more = f" (and {len(changed) - 1} more file(s))" if len(changed) > 1 else ""
    if len(changed) == 1 and i == len(nf) - 1:
        unsafe = _append_problem(of[i], nf[i], old, new)
        if unsafe is None:
            return None
        if unsafe:
            return f"{nf[i]['path']}: rows were appended, but {unsafe}"
    return f"{nf[i]['path']}: {what}{more}"


def _added_files_problem(of: list[dict], nf: list[dict], old: dict, new: dict) -> str | None:
    """New files that sort after every old one only add rows at the end, like an append: None
    when the old files are unchanged and no old file moves to another task."""
    changed = [(a["path"], _entry_change(a, b)) for a, b in zip(of, nf)]
    changed = [(p, c) for p, c in changed if c]
    if changed:
        return f"{changed[0][0]}: {changed[0][1]}"
    added = f"{len(nf) - len(of)} file(s) added after the old ones ({nf[len(of)]['path']} ...)"
    po, pn = old.get("partition", {}), new.get("partition", {})
    if pn.get("mode") != po.get("mode") or pn.get("mode") == "ranges":
        return f"{added}, but the tasks split the rows into ranges, which the new row count moves"
    if pn.get("mode") == "files" and pn.get("owners", [])[: len(of)] != po.get("owners"):
        return f"{added}, but the tasks' files are balanced by size, and the new files move old ones to other tasks"
    return None


def _append_problem(a: dict, b: dict, old: dict, new: dict) -> str | None:
    """For the last file, grown: None when it is a safe append, "" when it is not an append at
    all (its old part changed), else why the appended rows would move rows."""
    path = b["path"]
    if not (b.get("size", 0) > a.get("size", 0) and path.lower().endswith((".jsonl", ".ndjson", ".json"))):
        return ""
    full = os.path.join(new.get("root") or ".", path)
    try:
        if content_hash(full, a["size"]) != a.get("sha"):
            return ""
        if a["size"]:
            with open(full, "rb") as fh:
                fh.seek(a["size"] - 1)
                if fh.read(1) != b"\n":
                    return "its old last line had no line end, so the appended text changed that row"
    except OSError:
        return ""
    po, pn = old.get("partition", {}), new.get("partition", {})
    if pn.get("mode") == "ranges" or po.get("mode") == "ranges":
        return ("the tasks split the rows into ranges, which the new row count moves "
                "(run with --overwrite, or put new rows in a new output)")
    if po != pn:
        return "the tasks' files are balanced by size, and the new size moves files to other tasks"
    return None


def _dataset_change(old: dict, new: dict) -> str | None:
    for key in ("dataset", "split", "fingerprint", "rows"):
        if old.get(key) != new.get(key):
            return f"the dataset's {key} changed: {old.get(key)!r} -> {new.get(key)!r}"
    of, nf = old.get("files", []), new.get("files", [])
    if [f["path"] for f in of] != [f["path"] for f in nf]:
        return "its files changed: " + _paths_change([f["path"] for f in of], [f["path"] for f in nf])
    for a, b in zip(of, nf):
        what = _entry_change(a, b)
        if what:
            return f"its file {b['path']}: {what}"
    if old.get("partition") != new.get("partition"):
        return f"the partition changed: {old.get('partition')} -> {new.get('partition')}"
    return None


def open_source(cfg: JobConfig, task_id: int = 0, num_tasks: int = 1) -> Source:
    """The source of this task's rows; checks files and columns (ConfigError)."""
    if not 0 <= task_id < num_tasks:
        raise ConfigError(f"task id {task_id} is out of range for {num_tasks} task(s)")
    src: Source
    if cfg.input.files is not None:
        src = FileSource(cfg, task_id, num_tasks)
    else:
        src = DatasetSource(cfg, task_id, num_tasks)
    src.check()
    return src

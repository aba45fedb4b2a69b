"""Input files: expanding input.files (paths, globs, directories) to sorted files, each one's
stat at start-up, a content hash that reads a few KiB, and a Parquet file's footer."""
from __future__ import annotations

import glob
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..config import ConfigError, JobConfig, output_dir, resolve_path
from .base import InputError
from .checks import where
from .lines import jsonl_lines

PARQUET_EXT = (".parquet", ".pq")
JSONL_EXT = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
# The content hash reads the head, the tail and BLOCKS blocks in between (a few KiB, however big
# the file): an inserted or removed row shifts every later byte, so it changes a sampled block.
HASH_HEAD, HASH_TAIL, HASH_BLOCK, HASH_BLOCKS = 64 << 10, 16 << 10, 4 << 10, 8


def file_kind(path: str) -> str | None:
    """'parquet', 'jsonl', or None for a file that is neither."""
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(JSONL_EXT):
        return "jsonl"
    return None


@dataclass
class InputFile:
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
            self._count = sum(1 for _ in jsonl_lines(self))
        return self._count

    def entry(self, with_mtime: bool = True) -> dict[str, Any]:
        e: dict[str, Any] = {"path": self.rel, "size": self.size}
        if with_mtime:
            e["mtime_ns"] = self.mtime_ns
        e["sha"] = self.sha
        return e


def stat_file(path: str, base_dir: str, st: os.stat_result) -> InputFile:
    k = file_kind(path)
    assert k is not None
    return InputFile(path, k, st.st_size, st.st_mtime_ns, os.path.relpath(path, base_dir))


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
            h.update(pread_all(fd, size, 0))
        else:
            h.update(pread_all(fd, HASH_HEAD, 0))
            span = size - HASH_HEAD - HASH_TAIL - HASH_BLOCK
            for i in range(1, HASH_BLOCKS + 1):
                h.update(pread_all(fd, HASH_BLOCK, HASH_HEAD + span * i // (HASH_BLOCKS + 1)))
            h.update(pread_all(fd, HASH_TAIL, size - HASH_TAIL))
    finally:
        os.close(fd)
    return h.hexdigest()


def pread_all(fd: int, n: int, offset: int) -> bytes:
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
        tail = pread_all(fd, 8, size - 8) if size >= 12 else b""
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise InputError(f"input file {name}: not a Parquet file: no PAR1 footer (truncated, or still being written?)")
        n = int.from_bytes(tail[:4], "little")
        if n <= 0 or n > size - 12:
            raise InputError(f"input file {name}: corrupt Parquet footer (length {n} in a file of {size:,} bytes)")
        return pread_all(fd, n, size - 8 - n)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- expanding input.files
class _Expansion:
    """The files found so far, by absolute path; files inside output.path are skipped."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.found: dict[str, InputFile] = {}
        self.base = str(Path(cfg.base_dir).resolve())
        self.own = os.path.join(str(output_dir(cfg)), "")
        self.skipped: list[str] = []

    def add(self, path: str) -> bool:
        p = os.path.abspath(path)
        if p.startswith(self.own) or os.path.realpath(p).startswith(self.own):
            self.skipped.append(p)
            return False
        try:
            st = os.stat(p)  # a link to an input file is fine: inputs are only read
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, and a resume needs the same bytes again
                raise ConfigError(f"{where(self.cfg, 'input.files')}: input.files: {p} is not a regular file (a FIFO, "
                                  "socket or device can't be read twice, and a resume reads the input again): copy "
                                  "its rows into a file")
            self.found[p] = stat_file(p, self.base, st)
        except OSError as e:
            raise ConfigError(f"{where(self.cfg, 'input.files')}: input.files: can't read {p}: {e.strerror}") from None
        return True

    def add_dir(self, top: str) -> bool:
        """Every supported file under a directory (names starting with '.' or '_' left out)."""
        found_any = False
        for root, dirs, names in os.walk(top):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
            for n in sorted(names):
                if n.startswith((".", "_")):
                    continue
                fp = os.path.join(root, n)
                if file_kind(fp) and self.add(fp):
                    found_any = True
        return found_any

    def matches(self, spec: str, key: str, is_glob: bool) -> list[str]:
        """The paths one entry of input.files names (ConfigError when it names nothing)."""
        cfg = self.cfg
        p = resolve_path(cfg, spec, must_exist=True)
        if not is_glob:
            if not p.exists():
                raise ConfigError(f"{cfg.source_path}: {key}: no such file or directory: {p}")
            return [str(p)]
        matches = sorted(glob.glob(str(p), recursive=True))
        if not matches and not Path(spec).is_absolute():
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        matches = [m for m in matches if os.path.isfile(m) or os.path.isdir(m)]
        if not matches:
            raise ConfigError(f"{cfg.source_path}: {key}: '{spec}' matches no file (looked in {p.parent})")
        return matches

    def expand(self, spec: str, key: str) -> None:
        cfg = self.cfg
        is_glob = any(ch in spec for ch in "*?[")
        found_any = False
        for m in self.matches(spec, key, is_glob):
            if os.path.isdir(m):
                found_any = self.add_dir(m) or found_any
            elif file_kind(m) is not None:
                found_any = self.add(m) or found_any
            elif not is_glob:
                raise ConfigError(
                    f"{cfg.source_path}: {key}: '{m}' is neither Parquet (.parquet) nor JSON Lines (.jsonl, .json, .jsonl.gz)"
                )
        if not found_any:
            why = " (only files in output.path, which are never input)" if self.skipped else ""
            raise ConfigError(f"{cfg.source_path}: {key}: '{spec}' holds no .parquet or .jsonl file{why}")


def expand_files(cfg: JobConfig) -> list[InputFile]:
    """Paths, globs and directories -> sorted unique supported files. ConfigError when any entry
    matches nothing. Files inside output.path are never input: the job's own shards would be read
    as rows on the next run."""
    ex = _Expansion(cfg)
    specs = cfg.input.files or []
    for i, spec in enumerate(specs):
        ex.expand(spec, f"input.files[{i}]" if len(specs) > 1 else "input.files")
    return [ex.found[k] for k in sorted(ex.found)]

"""One shard file on disk: its footer's batchgen metadata, its size and sha256, and a file
wrapper that hashes a shard while it is written (no re-read to checksum it)."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq

from ..files import OutputError, open_regular
from .layout import META_KEY


def read_shard_meta(path: str | os.PathLike[str]) -> dict:
    with os.fdopen(open_regular(path), "rb") as f:
        md = pq.read_schema(f).metadata or {}
    raw = md.get(META_KEY)
    if raw is None:
        raise OutputError(f"{path} is not a batchgen shard (no batchgen metadata)")
    return json.loads(raw)


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a regular file, read without following a link (NotRegularError for anything else)."""
    fd = open_regular(path)
    h = hashlib.sha256()
    n = 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


class HashingWriter(io.RawIOBase):
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

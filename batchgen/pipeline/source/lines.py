"""The lines of a JSONL file as it was at start-up: a prefix reader (rows appended while a job
runs are left for the next run), gzip, byte order marks and over-long lines."""
from __future__ import annotations

import gzip
import io
import zlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from .base import InputError
from .describe import first_line

if TYPE_CHECKING:
    from .files import InputFile

# A JSONL line longer than this is an error row, skipped without holding it in memory: 64 MiB is
# millions of tokens of text, and parsing it needs several times its size.
MAX_LINE_BYTES = 64 << 20
BOM = b"\xef\xbb\xbf"


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
def _open_jsonl(f: InputFile) -> Iterator[BinaryIO]:
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


def _skip_rest_of_line(readline: Any) -> None:
    """Read past the rest of an over-long line, a chunk at a time."""
    while True:
        chunk = readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def jsonl_lines(f: InputFile) -> Iterator[tuple[int, bytes | None]]:
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
                    _skip_rest_of_line(readline)
                    yield lineno, None
                    continue
                if raw.startswith(BOM):
                    raw = raw[3:]
                if not raw.isspace():  # (strip() would copy the line)
                    yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"input file {f.rel}: can't be read after line {lineno:,}: {first_line(e)}") from None

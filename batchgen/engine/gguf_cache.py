"""The dequantized-GGUF cache: <root>/gguf/<stem>-<key>, one directory per distinct GGUF content.

Key (content_key): the file's size and a SHA-256 of its first 16 MiB plus 1 MiB from its middle and
1 MiB from its end. The first MiBs hold the whole GGUF header: the version, every metadata value
(architecture, hyperparameters, the tokenizer's vocabulary, merges and chat template) and the tensor
table (each tensor's name, shape, quantization type and offset), then the start of the tensor data.
Two files that agree there, in size and in the samples are one model: two fine-tunes of one base with
the same metadata still differ in every tensor, so in each sample. A copy of the file at another path
(a new clone, a new venv) gets the same key, so it reuses the conversion instead of adding ~538 MB.
Reading 18 MiB takes milliseconds whatever the model's size; a file edited only outside the sampled
ranges (hand-patched bytes) keeps its key: delete its entry to reconvert.

Pruning (prune, after each new conversion): of the entries converted from a file of the same name
(same stem), the KEEP_PER_NAME most recently used stay (the new one among them); older ones go, but
only once unused for GRACE_S, since another process may have just resolved one and not opened its
files yet. A converter's .tmp-* directory goes once a day old (a crashed run's leftover). A use is a
cache hit (mark_used touches the entry's mtime). Only real directories directly under <root>/gguf are
removed: a symlink there is left alone (never followed), and rmtree never follows links inside.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
from pathlib import Path

CACHE_VERSION = 2  # bump when the conversion's output changes, so old cache entries are not reused
HEAD_BYTES = 16 << 20
SAMPLE_BYTES = 1 << 20
KEEP_PER_NAME = 2
GRACE_S = 3600.0
TMP_STALE_S = 86400.0
_KEY = re.compile(r"[0-9a-f]{16}")
_MEMO: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime, inode) -> key: hash once per process


def content_key(gguf: Path) -> str:
    """16 hex digits from the cache version, the file's size and its sampled content (module doc)."""
    st = gguf.stat()
    memo = (str(gguf.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _MEMO:
        return _MEMO[memo]
    h = hashlib.sha256(f"batchgen-gguf v{CACHE_VERSION}\0{st.st_size}\0".encode())
    with open(gguf, "rb") as f:
        for offset, n in _sample_ranges(st.st_size):
            f.seek(offset)
            h.update(f.read(n))
    _MEMO[memo] = key = h.hexdigest()[:16]
    return key


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    if size <= HEAD_BYTES + 2 * SAMPLE_BYTES:
        return [(0, size)]  # small file: all of it
    return [(0, HEAD_BYTES), (size // 2 - SAMPLE_BYTES // 2, SAMPLE_BYTES), (size - SAMPLE_BYTES, SAMPLE_BYTES)]


def entry_dir(root: Path, gguf: Path) -> Path:
    """Where gguf converts into under the cache root."""
    return root / "gguf" / f"{gguf.stem}-{content_key(gguf)}"


def mark_used(entry: Path) -> None:
    """Record a cache hit (the entry's mtime), which pruning reads. A read-only cache just isn't marked."""
    try:
        os.utime(entry)
    except OSError:
        pass


def prune(keep: Path, now: float | None = None) -> list[Path]:
    """Remove stale entries of keep's name beside it (module doc); returns what was removed."""
    now = time.time() if now is None else now
    stem = _stem(keep.name)
    if stem is None:
        return []
    same: list[tuple[float, Path]] = []
    removed: list[Path] = []
    try:
        children = list(keep.parent.iterdir())
    except OSError:  # an unreadable cache dir: pruning is housekeeping, never a reason to fail a load
        return []
    for p in children:
        st = _real_dir(p)
        if st is None or p.name == keep.name:
            continue
        if p.name.startswith(f".tmp-{stem}-"):
            if now - st.st_mtime > TMP_STALE_S and remove_tree(p):
                removed.append(p)
        elif _stem(p.name) == stem:
            same.append((st.st_mtime, p))
    same.sort(reverse=True)  # most recently used first
    for mtime, p in same[KEEP_PER_NAME - 1:]:
        if now - mtime > GRACE_S and remove_tree(p):
            removed.append(p)
    return removed


def remove_tree(p: Path) -> bool:
    """rmtree a real directory (never a symlink, never following one inside); False when it isn't one."""
    if _real_dir(p) is None:
        return False
    shutil.rmtree(p, ignore_errors=True)
    return not p.exists()


def _real_dir(p: Path) -> os.stat_result | None:
    try:
        st = p.lstat()
    except OSError:
        return None
    return st if stat.S_ISDIR(st.st_mode) else None  # lstat: a symlink is S_ISLNK, never S_ISDIR


def _stem(name: str) -> str | None:
    """The GGUF stem of an entry name <stem>-<16 hex>, else None (not an entry)."""
    stem, _, key = name.rpartition("-")
    return stem if stem and _KEY.fullmatch(key) else None

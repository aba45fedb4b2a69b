"""batchgen's own files on disk: JSON written atomically and read back, fsync of a directory,
and the link-safe operations every writer under an output directory uses.

Nothing is written, truncated, renamed onto or deleted through a symbolic link inside OUT (OUT
itself may be one): every such path is checked with lstat and files are opened with O_NOFOLLOW.
No pyarrow here: the progress bar and `batchgen status` import this without it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO

META_DIR = ".batchgen"  # batchgen's own folder in an output; link checks start at the OUT above it
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputError(RuntimeError):
    """The output directory can't be used as asked (another job's output, a running task...)."""


class LinkError(OutputError):
    """A path batchgen would write, truncate, rename onto or delete is a symbolic link."""


class NotRegularError(OutputError):
    """Something that is not a regular file (a FIFO, a device, a directory) where batchgen keeps one of its files."""


class WriteError(OutputError):
    """Writing batchgen's files failed (the file system said no)."""


class DiskFullError(WriteError):
    """No space left (ENOSPC, EDQUOT) or a file size limit (EFBIG)."""


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


# --------------------------------------------------------------------------- regular files only
NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def not_regular_error(p: str | os.PathLike[str]) -> NotRegularError:
    return NotRegularError(f"{p} is not a regular file (batchgen writes only files by that name): move it away")


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """os.open(path, flags) for one of batchgen's own files, never through a link (O_NOFOLLOW: ELOOP) and only onto
    a regular file: a FIFO put in its place would block the open, and the run with it, until someone writes to it
    (a device or a directory would be read as data). Opened non-blocking, checked with fstat, then made blocking;
    NotRegularError names anything else. FileNotFoundError and ELOOP come as os.open raises them."""
    try:
        fd = os.open(path, flags | NOFOLLOW | CLOEXEC | NONBLOCK, mode)
    except NotADirectoryError:  # a file where one of batchgen's folders goes (OUT/.batchgen/ledger, ...)
        raise OutputError(f"{Path(path).parent} is not a directory; batchgen keeps its own files there: "
                          "move it away") from None
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO with no reader opened for writing; a directory
            raise not_regular_error(path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular_error(path)
        if NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------- never through a link
def is_link(p: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(p).st_mode)
    except OSError:
        return False


def link_error(p: Path) -> LinkError:
    return LinkError(f"{p} is a symbolic link; batchgen never writes, truncates or deletes through a link in "
                     "its output: replace the link with a real directory or file, or choose another output.path")


def write_error(e: OSError, path: Path) -> WriteError:
    if e.errno in FULL_ERRNOS:
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
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        if is_link(path):
            raise link_error(path) from None
        if stat.S_ISDIR(os.lstat(path).st_mode):  # never deleted (a FIFO or a file by this name goes: it is ours)
            raise not_regular_error(path) from None
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    return os.fdopen(fd, "wb")


def replace_into(root: Path, src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`, never onto a link (the link would go, its target would not change:
    still not what the user set up)."""
    check_no_links(root, dst)
    os.replace(src, dst)


def discard(path: Path) -> None:
    """Remove a temp file this process created (a link is never one: left alone)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


# --------------------------------------------------------------------------- JSON
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
        discard(tmp)
        raise write_error(e, path) from None
    except BaseException:
        discard(tmp)
        raise


def read_json(path: Path) -> Any:
    """The JSON at `path`, or None when it is missing or unreadable."""
    return read_json_checked(path)[0]


def read_json_checked(path: Path) -> tuple[Any, str | None]:
    """(data, None), or (None, why): "missing", or "unreadable (reason)"."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None, "missing"
    except NotRegularError:
        return None, "not a regular file"
    except OSError as e:
        return None, "a symbolic link" if e.errno == errno.ELOOP else f"unreadable ({e.strerror or e})"
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read().decode("utf-8")), None
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"

"""The output's lock files, OUT/.batchgen/locks/ (clear() leaves that folder alone):
task-NNNNN.lock, one process per task (it names its holder); output.lock, held shared by every
run and exclusive to replace the output; prepare.lock, one task at a time in prepare().
On a file system without locks everything goes on unlocked: commits still check the manifest's
generation."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
from pathlib import Path
from typing import Iterator

from ..files import META_DIR, OutputError, link_error, make_dirs, open_regular, write_error
from .layout import LOCK_DIR

_TASK_LOCK_RE = re.compile(r"^task-(\d{5})\.lock$")


class OutputLocks:
    def __init__(self, root: Path, task_id: int) -> None:
        self.root = root
        self.dir = root / META_DIR / LOCK_DIR
        self.task_id = task_id
        self.task_fd: int | None = None  # this task's lock, held from lock_task() to release()
        self.shared_fd: int | None = None  # output.lock held shared, from hold_shared() to release()

    def open(self, name: str) -> int:
        """An open descriptor of OUT/.batchgen/locks/<name>."""
        make_dirs(self.root, self.dir)
        p = self.dir / name
        try:
            return open_regular(p, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise link_error(p) from None
            raise write_error(e, p) from None

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock on <name> (waits for other processes)."""
        fd = self.open(name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # file system without locks: go on unlocked
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def output_exclusive_now(self) -> Iterator[bool]:
        """Try to hold output.lock exclusive without waiting: yields False while a run holds it."""
        fd = self.open("output.lock")
        try:
            free = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                free = False
            except OSError:
                pass  # no locks on this file system: commits still check the manifest's generation
            yield free
        finally:
            os.close(fd)

    def hold_shared(self) -> None:
        if self.shared_fd is not None:
            return
        fd = self.open("output.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never long: exclusive holders hold prepare.lock, as we do
        except OSError:
            pass
        self.shared_fd = fd

    def lock_task(self) -> None:
        """One process per task; raises OutputError when another one holds it."""
        fd = self.open(f"task-{self.task_id:05d}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = os.read(fd, 200).decode(errors="replace").strip()
            except OSError:
                who = ""
            os.close(fd)
            raise OutputError(
                f"task {self.task_id} of {self.root} is already running ({who or 'another process'})"
            ) from None
        except OSError:
            pass  # file system without locks: go on unlocked
        os.ftruncate(fd, 0)  # O_NOFOLLOW: this is the lock file itself, never a link's target
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.task_fd = fd

    def release(self) -> None:
        """Release the shared output lock and the task lock."""
        for attr in ("shared_fd", "task_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def running_tasks(self) -> list[str]:
        """'task N (pid P on host)' for every other task whose lock is held now."""
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            return []
        out = []
        for n in names:
            m = _TASK_LOCK_RE.match(n)
            if not m or int(m.group(1)) == self.task_id and self.task_fd is not None:
                continue
            who = self._holder(self.dir / n)
            if who is not None:
                out.append(f"task {int(m.group(1))}" + (f" ({who})" if who else ""))
        return out

    @staticmethod
    def _holder(p: Path) -> str | None:
        """Who holds the task lock at `p` ("" when it does not say), or None when nobody does."""
        try:
            fd = open_regular(p)
        except (OSError, OutputError):  # not a regular file too: nothing holds what is not a lock file
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.read(fd, 200).decode(errors="replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return None


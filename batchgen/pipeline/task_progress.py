"""The progress contract between the run loop (the writer) and `batchgen status` (the reader).

One file per task, OUT/.batchgen/progress/task-NNNNN.json: a TaskProgress written with
`asdict` and read back into the same dataclass, field names and all. The file is advisory (the
ledger is the checkpoint): the writer rewrites it whole at each state change and commit.

The writer's identity (pid, host, the pid's start time, the boot id) goes in the file, so that
the reader on the same host can tell that a task which says "running" has lost its process,
even once the pid is reused.
"""
from __future__ import annotations

import errno
import os
import socket
import time
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .files import META_DIR, now_iso, read_json_checked, write_json_atomic

PROGRESS_DIR = f"{META_DIR}/progress"


class ProgressFileError(ValueError):
    """A progress file that is not a TaskProgress: unreadable, not an object, a field of the wrong type."""


@dataclass
class TaskProgress:
    """What one task has done, as of updated_unix. Counts are the whole output's (the task's
    ledger), rates and times this run's unless named total_."""

    task_id: int
    num_tasks: int | None = None
    state: str = "pending"  # the writer's: loading | running | stopped | failed | done
    rows_done: int = 0
    rows_total: int | None = None  # None: the source's size is not known up front
    limit: int | None = None  # input.limit the task ran with (a "done" file counts only under it)
    shards: int = 0
    output_tokens: int = 0
    errors: int = 0
    tok_s: float | None = None  # this run's output tokens per second
    run_started_unix: float | None = None
    total_wall_s: float = 0.0  # summed over every run of the task (what the cost is computed from)
    fingerprint: str | None = None  # the job's fingerprint the output was written for
    summary: dict | None = None  # the task's summary once done (run/summary.py's summary_dict)
    reason: str | None = None  # why it stopped
    error: str | None = None  # why it failed
    updated_at: str | None = None  # local ISO time, for people
    updated_unix: float | None = None  # for programs
    pid: int | None = None
    host: str | None = None
    pid_start: int | None = None  # the pid's start time, clock ticks since boot
    boot_id: str | None = None

    @classmethod
    def now(cls, **fields: Any) -> TaskProgress:
        """A record made by this process at this moment: the time and the writer's identity
        filled in (the fields given win). A field name that is not one is a TypeError."""
        return cls(**{"updated_at": now_iso(), "updated_unix": time.time(), **process_identity(), **fields})

    def write(self, path: os.PathLike[str] | str) -> None:
        """asdict, atomically (temp file, fsync, rename; no link followed under OUT)."""
        write_json_atomic(Path(path), asdict(self))

    @classmethod
    def read(cls, path: os.PathLike[str] | str) -> TaskProgress:
        """The TaskProgress in `path`; ProgressFileError when there is none or it has the wrong shape."""
        data, why = read_json_checked(Path(path))
        if why is not None:
            raise ProgressFileError(why)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> TaskProgress:
        """The dataclass from its asdict form: the same names only; unknown keys are ignored (a
        newer writer's), a known one of the wrong type is a ProgressFileError."""
        if not isinstance(data, dict):
            raise ProgressFileError(f"not a JSON object but {type(data).__name__}")
        if "task_id" not in data:
            raise ProgressFileError("no task_id")
        known = {}
        for f in fields(cls):
            if f.name in data:
                _check_type(f.name, data[f.name], _FIELD_TYPES[f.name])
                known[f.name] = data[f.name]
        return cls(**known)

    def writer_gone(self) -> str | None:
        """Why the process that wrote this is certainly not running any more, or None when it may
        be (it is, it is another host's, or the file does not say which process wrote it)."""
        pid, host = self.pid, self.host
        if pid is None or pid <= 0 or host != socket.gethostname():
            return None
        gone = f"its process (pid {pid} on {host}) is gone without saying why (killed?)"
        if self.boot_id and boot_id() and self.boot_id != boot_id():
            return f"its process (pid {pid} on {host}) was lost when the machine restarted"
        try:
            os.kill(pid, 0)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return gone
            if e.errno != errno.EPERM:  # EPERM: the pid exists (another user's): look closer below
                return None
        stat = _proc_stat(pid)
        if stat and stat[0] in ("Z", "X"):  # exited, not yet reaped by its parent
            return gone
        if self.pid_start is not None and stat is not None and process_start_ticks(pid) not in (None, self.pid_start):
            return gone  # the pid now belongs to another process
        return None


def _accepted(hint: Any) -> tuple[type, ...]:
    """The JSON types a field's annotation accepts: `int | None` -> (int, NoneType); a float takes an int."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kinds = tuple(typing.get_origin(a) or a for a in args)
    return kinds + ((int,) if float in kinds else ())


_FIELD_TYPES = {name: _accepted(hint) for name, hint in typing.get_type_hints(TaskProgress).items()}


def _check_type(name: str, value: Any, accepted: tuple[type, ...]) -> None:
    # bool is an int to Python, never a count or a pid here
    if isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted):
        return
    want = " or ".join("null" if t is type(None) else t.__name__ for t in accepted if t is not int or float not in accepted)
    raise ProgressFileError(f"{name} is {type(value).__name__} {value!r:.40}, not {want}")


def write_task_progress(path: os.PathLike[str] | str, **fields: Any) -> None:
    """The run loop's call: TaskProgress.now(**fields).write(path) (a misspelled field is a TypeError)."""
    TaskProgress.now(**fields).write(path)


# ---------------------------------------------------------------------------------------
# who writes the file
# ---------------------------------------------------------------------------------------
_identity: dict[str, Any] = {}  # this process's pid, host, start time and boot id (pid-keyed: a fork is another)


def process_identity() -> dict[str, Any]:
    """Who writes the progress file: with pid_start (the pid's start time) and boot_id, `batchgen
    status` on the same host can tell that the writer is gone, even once its pid is reused."""
    pid = os.getpid()
    if _identity.get("pid") != pid:
        _identity.clear()
        _identity.update(pid=pid, host=socket.gethostname(), pid_start=process_start_ticks(pid), boot_id=boot_id())
    return dict(_identity)


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None (no such process, or no /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and ')'


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc field 22): with the pid
    it names one process, since a pid is reused once its process is gone."""
    stat = _proc_stat(pid)
    try:
        return int(stat[19]) if stat else None
    except (IndexError, ValueError):
        return None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None

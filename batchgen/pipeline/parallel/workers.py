"""One worker: a `batchgen run` subprocess for one task of the output, on one slot (a GPU, or CPU
cores), its output appended to OUT/.batchgen/logs/task-NNNNN.log.

Workers start in a session of their own, so a Ctrl-C on the terminal reaches only the supervisor,
which forwards one stop to each (a second one escalates). `--worker` tells the worker a supervisor
runs it: it leaves data_parallel and the Slurm requeue to the supervisor, takes a repeat of the
same stop signal within a moment for the same stop (inside Slurm, TERM reaches every process of
the task and the supervisor forwards it too), and stops gracefully when the supervisor dies
(PR_SET_PDEATHSIG; see worker_side.py).
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..files import META_DIR, is_link, link_error, make_dirs, now_iso, open_regular, write_error
from .plan import Slot

LOG_DIR = f"{META_DIR}/logs"
SUPERVISOR_ENV = "BATCHGEN_SUPERVISOR_PID"  # a worker's parent: it stops when that process is gone
TAIL_LINES = 12
LOG_KEEP_BYTES = 32 << 20  # a task's log past this at a worker's start moves to task-NNNNN.log.1 (the one before goes)


def log_path(out: Path, task: int) -> Path:
    return Path(out) / LOG_DIR / f"task-{task:05d}.log"


def open_log(out: Path, task: int) -> int:
    """The task's log, opened for appending (created; never through a link). Every run of the task appends to it;
    one that has grown past LOG_KEEP_BYTES is kept as task-NNNNN.log.1 first, so a task's logs stay bounded."""
    path = log_path(out, task)
    make_dirs(Path(out), path.parent)
    _rotate(path)
    try:
        return open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path) from None
        raise write_error(e, path) from None


def _rotate(path: Path) -> None:
    """path -> path.1 (replacing the older one) when path is a regular file past LOG_KEEP_BYTES; a link or anything
    else by these names is left for open_log to refuse."""
    old = path.with_name(path.name + ".1")
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size <= LOG_KEEP_BYTES:
            return
        if is_link(old):
            raise link_error(old)
        try:
            os.replace(path, old)  # renames the entries themselves: nothing is written through a link
        except OSError as e:
            raise write_error(e, old) from None


def package_root() -> str:
    """The directory this batchgen is imported from: the workers run the same code."""
    return str(Path(__file__).resolve().parents[3])


@dataclass
class WorkerArgs:
    """What every worker's `batchgen run` gets besides its task."""

    job_file: str
    overrides: Sequence[str] = ()
    overwrite: bool = False
    retry_errors: bool = False
    log_interval: float = 30.0

    def argv(self, task: int, num_tasks: int) -> list[str]:
        cmd = [sys.executable, "-m", "batchgen.cli", "run", os.path.abspath(self.job_file), "--task-id", str(task),
               "--num-tasks", str(num_tasks), "--worker", "--progress", "log", "--log-interval",
               f"{self.log_interval:g}"]
        for o in self.overrides:
            cmd += ["--set", o]
        return cmd + (["--overwrite"] if self.overwrite else []) + (["--retry-errors"] if self.retry_errors else [])


@dataclass
class Worker:
    task: int
    slot: Slot
    log: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    started: float = field(default_factory=time.monotonic)
    signals_sent: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None

    def poll(self) -> int | None:
        if self.proc is not None and self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode

    def send(self, signum: int) -> None:
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)
                self.signals_sent.append(signum)

    def exit_text(self) -> str:
        rc = self.returncode
        if rc is None:
            return "running"
        if rc < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-rc).name}"
            return f"killed by signal {-rc}"
        if rc > 128:
            with contextlib.suppress(ValueError):
                return f"exit {rc} (stopped by {signal.Signals(rc - 128).name})"
        return f"exit {rc}"

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last lines of its log (the end of a big log only)."""
        try:
            with os.fdopen(open_regular(self.log), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]


def worker_env(slot: Slot, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    if slot.threads is not None:
        env["OMP_NUM_THREADS"] = str(slot.threads)
    env[SUPERVISOR_ENV] = str(os.getpid())
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"  # a worker that dies has said all it printed: its log's tail is whole
    root = package_root()
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if p != root])
    return env


def start_worker(out: Path, task: int, num_tasks: int, slot: Slot, args: WorkerArgs) -> Worker:
    """Spawn the worker of `task` on `slot`; its log says when and where it started."""
    fd = open_log(out, task)
    w = Worker(task, slot, log_path(out, task))
    argv = args.argv(task, num_tasks)
    try:
        os.write(fd, (f"\n=== batchgen data parallel: task {task} of {num_tasks}, worker {slot.index} "
                      f"({slot.describe()}), started {now_iso()} by pid {os.getpid()} ===\n").encode())
        w.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                  env=worker_env(slot), start_new_session=True, close_fds=True)
    finally:
        os.close(fd)
    if slot.cpus is not None:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(w.proc.pid, slot.cpus)  # threads it starts later inherit it
    return w


def describe_worker(w: Worker) -> str:
    return f"task {w.task} (worker {w.slot.index}, {w.slot.describe()}, pid {w.pid})"


__all__: Any = ["LOG_DIR", "SUPERVISOR_ENV", "Worker", "WorkerArgs", "describe_worker", "log_path", "start_worker",
                "worker_env"]

"""Stopping and self-requeue inside Slurm: this task's identity, the USR1/TERM handlers that stop a
run gracefully, and the `scontrol requeue` that follows a USR1 (the time-limit warning).

The contract is in batchgen/slurm/__init__.py's docstring.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Callable, Mapping

EXIT_USR1 = 128 + signal.SIGUSR1  # 138: stopped by the time-limit warning (and requeued)


# ---------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------
def _int_env(env: Mapping[str, str], key: str) -> int | None:
    v = env.get(key, "").strip()
    if not v:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times Slurm has restarted this job (SLURM_RESTART_COUNT; 0 outside Slurm)."""
    return _int_env(os.environ if environ is None else environ, "SLURM_RESTART_COUNT") or 0


def own_slurm_job(environ: Mapping[str, str] | None = None) -> str | None:
    """The id that `scontrol requeue` needs for this very task: "<arrayjob>_<task>" inside an
    array, the job id in a plain job, None outside Slurm."""
    env = os.environ if environ is None else environ
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


# ---------------------------------------------------------------------------------------
# graceful stop
# ---------------------------------------------------------------------------------------
EARLY_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_saved_handlers: dict[int, Any] = {}


def attach_to_job(job: Any, environ: Mapping[str, str] | None = None, *, early_handlers: bool = True,
                  requeue: bool = True) -> Any:
    """Make a batchgen.pipeline.run.job.Job stop gracefully on USR1 too, and requeue itself afterwards when
    it runs inside Slurm. Called by `batchgen run` before job.run(); harmless outside Slurm
    (USR1 then just stops the run, exit 138).

    early_handlers: also catch USR1/TERM from now on, outside the part of run() where Job's
    own handlers are installed (they cover only the generation loop): a signal while the model
    loads would otherwise kill the task (USR1's default action) with no requeue, and the TERM
    that `scontrol requeue` sends during the final commit would kill it mid-commit. Here they
    just ask the job to stop (`job.request_stop`): it stops admitting as soon as it starts,
    commits and runs its on_stop callbacks. Only from the main thread; `restore_signals()`
    puts the previous handlers back.

    `job` may be a data-parallel Supervisor (the same stop interface): it forwards the stop to its
    workers and requeues the array task once they are all done; its workers are attached with
    requeue=False (USR1 stops them, exit 138, and no worker requeues the task its supervisor runs).
    """
    job.stop_signals.setdefault(signal.SIGUSR1, EXIT_USR1)
    if requeue:
        job.on_stop.append(lambda j: requeue_on_usr1(j, environ))
    if early_handlers and hasattr(job, "request_stop"):
        import threading

        if threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                name = signal.Signals(signum).name
                print(f"batchgen: got {name}; stopping (no new rows, commit, exit"
                      + (", requeue" if requeue and signum == signal.SIGUSR1 and own_slurm_job(environ) else "") + ")",
                      file=sys.stderr, flush=True)
                job.request_stop(f"stopped by {name}", exit_code=job.stop_signals.get(signum, 128 + signum),
                                 signum=signum)

            for s in EARLY_SIGNALS:
                prev = signal.signal(s, handler)
                _saved_handlers.setdefault(s, prev)
    return job


def restore_signals() -> None:
    """Put back the handlers that attach_to_job replaced."""
    while _saved_handlers:
        s, prev = _saved_handlers.popitem()
        signal.signal(s, prev if prev is not None else signal.SIG_DFL)


def requeue_on_usr1(job: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Job.on_stop callback (runs after the final commit of a stopped run): on USR1 inside
    Slurm, `scontrol requeue` this task. Returns whether it requeued."""
    if getattr(job, "stopped_by", None) != signal.SIGUSR1 or not own_slurm_job(environ):
        return False
    log = getattr(job, "say", None) or (lambda m: print(m, file=sys.stderr, flush=True))
    restarts = restart_count(environ)
    if restarts > 0 and getattr(job, "rows_committed_this_run", None) == 0:
        # the first run may have paid a cold start (page cache, compile caches); a restart has not
        log(f"batchgen: not requeueing {own_slurm_job(environ)}: restart {restarts} committed no rows before the "
            "time-limit warning, so another run would only repeat it; give the tasks a longer --time "
            "(or a shorter --grace) and resubmit: they resume from the committed shards")
        return False
    return requeue_self(environ, log=log)


def requeue_self(environ: Mapping[str, str] | None = None, timeout: float = 60,
                 log: Callable[[str], None] | None = None) -> bool:
    """`scontrol requeue` this task. Slurm then sends TERM to it (the run is already stopping,
    its output committed) and runs it again later with SLURM_RESTART_COUNT+1. True on success."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    job = own_slurm_job(environ)
    if not job:
        return False
    scontrol = shutil.which("scontrol") or "scontrol"
    try:
        r = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"batchgen: scontrol requeue {job} failed: {e}")
        return False
    if r.returncode != 0:
        log(f"batchgen: scontrol requeue {job} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
        return False
    log(f"batchgen: requeued {job}")
    return True


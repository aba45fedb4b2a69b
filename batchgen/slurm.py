"""Slurm: array-task identity, the sbatch script of `batchgen submit`, graceful stop and requeue.

How a batchgen array job behaves (the contract the tests check):

- `batchgen submit job.yaml --tasks N` writes OUT/.batchgen/slurm/<name>-<stamp>.sbatch and submits it:
  `--array=0-(N-1)[%M]`, `--requeue`, `--signal=B:USR1@<grace>`, one log per task
  (OUT/.batchgen/slurm/logs/<arrayjob>_<task>.log, appended across requeues) and a last line that
  `exec`s the absolute path of the batchgen that submitted it, so the batchgen process *is*
  the batch shell and receives the signals that Slurm sends to it.
- Each task reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (`task_identity`).
- USR1 (the time-limit warning asked for by `--signal=B:USR1@grace`): stop admitting, commit
  what is complete, then `scontrol requeue <arrayjob>_<task>` and exit EXIT_STOPPED.
- TERM (preemption, `scontrol requeue` by anyone, scancel, the time limit itself): stop
  admitting, commit, exit EXIT_STOPPED. No self-requeue: when Slurm is requeueing the task
  (preemption with PreemptMode=REQUEUE, scontrol requeue) it restarts it on its own, and
  after a scancel the user wants it to stay stopped.
- Requeueing sends TERM to the task itself: the handlers are idempotent (the first signal
  decides; later ones are only logged) and the requeue happens only after the final commit.
- A restarted task (SLURM_RESTART_COUNT > 0) resumes from its own progress file.

Exit codes of `batchgen run`: 0 = this task's part is complete; EXIT_STOPPED (75, EX_TEMPFAIL)
= stopped by a signal with everything complete committed (rerun or requeue resumes it);
anything else = an error.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import click

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early on a signal, progress committed, resumable
DEFAULT_GRACE_S = 120
SLURM_DIR = ".batchgen/slurm"  # hidden, like the rest of OUT/.batchgen: only shards are visible
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


def task_identity(task_id: int | None = None, num_tasks: int | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(task_id, num_tasks): explicit values win, then SLURM_ARRAY_TASK_ID/COUNT, then (0, 1).

    The array must be 0-based and dense (`--array=0-(N-1)`), which is what `batchgen submit`
    writes; anything else is an error rather than a silently wrong partition.
    """
    env = os.environ if environ is None else environ
    if task_id is None:
        task_id = _int_env(env, "SLURM_ARRAY_TASK_ID")
    if num_tasks is None:
        num_tasks = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        if num_tasks is not None and task_id is not None:
            lo, hi = _int_env(env, "SLURM_ARRAY_TASK_MIN"), _int_env(env, "SLURM_ARRAY_TASK_MAX")
            if lo not in (None, 0) or (hi is not None and hi != num_tasks - 1):
                raise ValueError(
                    f"the Slurm array must be 0..N-1 (got min={lo} max={hi} count={num_tasks}); "
                    "submit with `batchgen submit` or pass --task-id/--num-tasks")
    task_id = 0 if task_id is None else task_id
    num_tasks = 1 if num_tasks is None else num_tasks
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if not 0 <= task_id < num_tasks:
        raise ValueError(f"task id {task_id} is outside 0..{num_tasks - 1}")
    return task_id, num_tasks


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
@dataclass
class GracefulStop:
    """USR1/TERM handlers that ask the running job to stop; idempotent.

        stop = GracefulStop().install()
        stop.add_hook(job.request_stop)        # called once, at the first signal
        result = job.run()                     # returns after the final commit
        if stop.signum is not None and not result.complete:
            sys.exit(stop.finish())            # requeue on USR1, then EXIT_STOPPED

    A signal that comes before a hook is added (e.g. while the model loads) is remembered and
    the hook is called as soon as it is added; `stop.requested` can be polled as well.
    """

    signals: Sequence[int] = STOP_SIGNALS
    signum: int | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    _hooks: list = field(default_factory=list)
    _previous: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: bool = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "GracefulStop":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()

    def add_hook(self, hook: Callable[[int], object] | Callable[[], object]) -> None:
        with self._lock:
            self._hooks.append(hook)
            signum = self.signum
        if signum is not None:
            _call_hook(hook, signum)

    def _handle(self, signum: int, frame=None) -> None:  # runs in the main thread
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.log(f"batchgen: got {name} again while stopping (first: "
                     f"{signal.Signals(self.signum).name}); still committing")
            return
        self.signum = signum
        self.log(f"batchgen: got {name}: no new rows, committing what is complete"
                 + (", then requeueing" if signum == signal.SIGUSR1 and own_slurm_job() else ""))
        for hook in list(self._hooks):
            _call_hook(hook, signum)

    def finish(self, environ: Mapping[str, str] | None = None) -> int:
        """After the final commit of a stopped run: requeue own task on USR1 (inside Slurm)
        and return the exit code (EXIT_STOPPED). Call once; later calls just return it."""
        if self._finished or self.signum is None:
            return EXIT_STOPPED
        self._finished = True
        if self.signum == signal.SIGUSR1 and own_slurm_job(environ):
            requeue_self(environ, log=self.log)
        return EXIT_STOPPED


def _call_hook(hook, signum: int) -> None:
    try:
        hook(signum)
    except TypeError:
        hook()


def requeue_self(environ: Mapping[str, str] | None = None, timeout: float = 60,
                 log: Callable[[str], None] | None = None) -> bool:
    """`scontrol requeue` this task. Slurm then sends TERM to it (ignored by GracefulStop
    once stopping) and runs it again later with SLURM_RESTART_COUNT+1. True on success."""
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


# ---------------------------------------------------------------------------------------
# the sbatch script
# ---------------------------------------------------------------------------------------
@dataclass
class SubmitOptions:
    tasks: int
    gpus_per_task: int = 1
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    max_parallel: int | None = None
    sbatch_args: Sequence[str] = ()
    grace_s: int = DEFAULT_GRACE_S
    job_name: str | None = None

    def validate(self) -> None:
        if self.tasks < 1:
            raise click.BadParameter(f"--tasks must be >= 1, got {self.tasks}")
        if self.gpus_per_task < 0:
            raise click.BadParameter(f"--gpus-per-task must be >= 0, got {self.gpus_per_task}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise click.BadParameter(f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise click.BadParameter(f"--max-parallel must be >= 1, got {self.max_parallel}")
        if self.grace_s < 1:
            raise click.BadParameter(f"--grace must be >= 1 s, got {self.grace_s}")
        limit = time_limit_seconds(self.time) if self.time else None
        if limit is not None and limit <= self.grace_s:
            raise click.BadParameter(
                f"--time {self.time} is not longer than the stop grace of {self.grace_s} s (--grace)")


def time_limit_seconds(t: str) -> int | None:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> seconds (None: unparsed)."""
    t = t.strip()
    if t.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        if not d.isdigit():
            return None
        days = int(d)
        parts = t.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            return None
        h, m, s = (list(map(int, parts)) + [0, 0])[:3]
    else:
        parts = t.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            return None
        nums = list(map(int, parts))
        if len(nums) == 1:
            h, m, s = 0, nums[0], 0
        elif len(nums) == 2:
            h, (m, s) = 0, nums
        else:
            h, m, s = nums
    return ((days * 24 + h) * 60 + m) * 60 + s


def batchgen_command() -> list[str]:
    """The absolute path of the batchgen that is running now (argv for the batch script)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "batchgen":
        p = Path(os.path.abspath(argv0))
        if p.is_file():
            return [str(p)]
    beside = Path(os.path.abspath(sys.executable)).parent / "batchgen"  # the venv's script
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("batchgen")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "batchgen.cli"]


def _sbatch_line(opt: str) -> str:
    if any(c in opt for c in "\n\r"):
        raise click.BadParameter(f"sbatch argument with a newline: {opt!r}")
    return f"#SBATCH {opt}"


def render_sbatch_script(job_file: Path, output_dir: Path, opts: SubmitOptions,
                         command: Sequence[str] | None = None, workdir: Path | None = None,
                         run_args: Sequence[str] = ()) -> str:
    """The batch script. Paths are absolute, so `sbatch <script>` works from anywhere."""
    opts.validate()
    job_file = Path(os.path.abspath(job_file))
    output_dir = Path(os.path.abspath(output_dir))
    workdir = Path(os.path.abspath(workdir or Path.cwd()))
    command = list(command or batchgen_command())
    name = opts.job_name or f"batchgen-{job_file.stem}"
    logs = output_dir / SLURM_DIR / "logs"
    for p in (logs,):
        if any(c.isspace() for c in str(p)):
            raise click.BadParameter(f"#SBATCH paths cannot contain white space: {p}")
    array = f"0-{opts.tasks - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# Written by `batchgen submit` on {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}.",
        "# Resubmit as is with `sbatch <this file>`: finished tasks exit at once, the others resume.",
        _sbatch_line(f"--job-name={name}"),
        _sbatch_line(f"--array={array}"),
        _sbatch_line("--requeue"),
        _sbatch_line(f"--signal=B:USR1@{opts.grace_s}"),
        _sbatch_line(f"--output={logs}/%A_%a.log"),
        _sbatch_line("--open-mode=append"),
        _sbatch_line("--nodes=1"),
        _sbatch_line("--ntasks=1"),
    ]
    if opts.cpus_per_task:
        lines.append(_sbatch_line(f"--cpus-per-task={opts.cpus_per_task}"))
    if opts.gpus_per_task > 0:
        lines.append(_sbatch_line(f"--gres=gpu:{opts.gpus_per_task}"))
    if opts.partition:
        lines.append(_sbatch_line(f"--partition={opts.partition}"))
    if opts.time:
        lines.append(_sbatch_line(f"--time={opts.time}"))
    lines += [_sbatch_line(a) for a in opts.sbatch_args]
    q = shlex.quote
    run = " ".join([*map(q, command), "run", q(str(job_file)), *map(q, run_args)])
    lines += [
        "",
        "set -eu",
        'echo "batchgen: array task ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT} of job '
        '${SLURM_ARRAY_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}, on $(hostname) at $(date -Is)" >&2',
        "# one thread pool per allocated CPU, not per CPU of the node",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "export TOKENIZERS_PARALLELISM=false",
        f"cd {q(str(workdir))}",
        "# exec: batchgen becomes the batch shell, so USR1 (--signal=B:...) and TERM reach it;",
        "# it stops admitting, commits, requeues itself on USR1 and exits 75 (0 when done).",
        f"exec {run}",
        "",
    ]
    return "\n".join(lines)


def write_sbatch_script(output_dir: Path, text: str, name: str) -> Path:
    d = Path(output_dir) / SLURM_DIR
    (d / "logs").mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}.sbatch"
    n = 1
    while path.exists():
        n += 1
        path = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}-{n}.sbatch"
    tmp = path.with_suffix(".sbatch.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


def sbatch_submit(script: Path, environ: Mapping[str, str] | None = None) -> str:
    """`sbatch --parsable script` -> job id."""
    sbatch = shutil.which("sbatch")
    if not sbatch:
        raise click.ClickException("sbatch not found: is this a Slurm login node? (--dry-run prints the script)")
    r = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True,
                       env=None if environ is None else dict(environ), cwd=str(Path(script).parent))
    if r.returncode != 0:
        raise click.ClickException(f"sbatch failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip().split(";")[0]


# ---------------------------------------------------------------------------------------
# the job file: where its output goes (read through the pipeline's config when it can)
# ---------------------------------------------------------------------------------------
def job_output_dir(job_file: Path) -> Path:
    """The job's output directory, absolute, resolved exactly as `batchgen run` resolves it.
    The whole job file is validated on the way (a bad file fails here, not in N tasks)."""
    from batchgen import config as _config

    try:
        cfg = _config.load_job(job_file)
    except _config.ConfigError as e:
        raise click.ClickException(str(e)) from None
    return Path(_config.output_dir(cfg))


# ---------------------------------------------------------------------------------------
# `batchgen submit`
# ---------------------------------------------------------------------------------------
@click.command("submit")
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tasks", "-n", type=int, required=True, help="Number of array tasks (the input is split in N parts).")
@click.option("--gpus-per-task", type=int, default=1, show_default=True, help="GPUs per task (0: CPU only).")
@click.option("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the cluster's).")
@click.option("--partition", "-p", default=None, help="Slurm partition.")
@click.option("--time", "-t", "time_limit", default=None, help="Time limit per task run, e.g. 4:00:00.")
@click.option("--max-parallel", type=int, default=None, help="At most M tasks running at once (--array=...%M).")
@click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
              help="Extra sbatch option, repeatable, e.g. --sbatch-arg=--mem=64G.")
@click.option("--grace", "grace_s", type=int, default=DEFAULT_GRACE_S, show_default=True,
              help="Seconds before the time limit at which a task stops, commits and requeues itself.")
@click.option("--job-name", default=None, help="Slurm job name (default: batchgen-<job file stem>).")
@click.option("--dry-run", is_flag=True, help="Print the sbatch script; write and submit nothing.")
def submit_command(job_file: Path, tasks: int, gpus_per_task: int, cpus_per_task: int | None,
                   partition: str | None, time_limit: str | None, max_parallel: int | None,
                   sbatch_args: tuple[str, ...], grace_s: int, job_name: str | None, dry_run: bool) -> None:
    """Run JOB_FILE as a Slurm array of N tasks (writes the sbatch script beside the output)."""
    opts = SubmitOptions(tasks=tasks, gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task,
                         partition=partition, time=time_limit, max_parallel=max_parallel,
                         sbatch_args=sbatch_args, grace_s=grace_s, job_name=job_name)
    try:
        opts.validate()
    except click.BadParameter as e:
        raise click.UsageError(str(e.message))
    out = job_output_dir(job_file)
    _check_task_count(out, tasks)
    text = render_sbatch_script(job_file, out, opts)
    if dry_run:
        click.echo(text, nl=False)
        return
    script = write_sbatch_script(out, text, opts.job_name or f"batchgen-{job_file.stem}")
    job_id = sbatch_submit(script)
    click.echo(f"Submitted array job {job_id} ({tasks} tasks): {script}", err=True)
    click.echo(f"Logs: {out / SLURM_DIR / 'logs'}/{job_id}_<task>.log; progress: batchgen status {out}", err=True)
    click.echo(job_id)


def _check_task_count(out: Path, tasks: int) -> None:
    """Refuse to resubmit into an output that was partitioned for another number of tasks."""
    from batchgen.status import manifest_num_tasks, read_progress

    seen = {p.num_tasks for p in read_progress(out) if p.num_tasks}
    if manifest_num_tasks(out):
        seen.add(manifest_num_tasks(out))
    if seen and seen != {tasks}:
        raise click.UsageError(
            f"{out} was started with --tasks {', '.join(map(str, sorted(seen)))}; the partition depends on it, "
            f"so resubmit with the same --tasks (or use a new output directory)")

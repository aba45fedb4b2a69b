"""Slurm: array-task identity, the sbatch script of `batchgen submit`, stop and self-requeue.

How a batchgen array job behaves (the contract the tests check):

- `batchgen submit job.yaml --tasks N` writes OUT/.batchgen/slurm/<name>-<stamp>.sbatch and
  submits it: `--array=0-(N-1)[%M]`, `--requeue`, `--signal=B:USR1@<grace>`, one log per task
  (OUT/.batchgen/slurm/logs/<arrayjob>_<task>.log, appended across requeues) and a last line
  that `exec`s the absolute path of the batchgen that submitted it, so the batchgen process
  *is* the batch shell and receives the signals Slurm sends to it.
- Each task reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (batchgen.job.task_from_env).
- USR1 (the time-limit warning asked for by `--signal=B:USR1@grace`): the run stops admitting,
  commits what is complete, then (`requeue_on_usr1`, a Job.on_stop callback) runs
  `scontrol requeue <arrayjob>_<task>` and exits 138 (128 + USR1). Not when a restarted task
  (SLURM_RESTART_COUNT > 0) committed no rows in its run: another run would only repeat it
  (time limit shorter than loading the model, or than one batch), so it says so and stays stopped.
- TERM (preemption, `scontrol requeue` by anyone, scancel, the time limit itself): stop
  admitting, commit, exit 143. No self-requeue: when Slurm is requeueing the task
  (preemption with PreemptMode=REQUEUE, scontrol requeue) it restarts it on its own, and
  after a scancel the user wants it to stay stopped.
- Requeueing sends TERM to the task itself, after the final commit: a second signal while
  stopping only makes the stop "hard" (nothing left to abandon by then).
- A restarted task (SLURM_RESTART_COUNT > 0) resumes from its committed shards.

Exit codes of `batchgen run`: 0 = this task's part is complete; 128 + signal (138 USR1,
143 TERM, 130 INT) = stopped by that signal with everything complete committed (a rerun or
requeue resumes); 1 = failed; 2 = refused (bad job file, output of another job).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import click

DEFAULT_GRACE_S = 120
SLURM_DIR = ".batchgen/slurm"  # hidden, like the rest of OUT/.batchgen: only shards are visible
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


def attach_to_job(job: Any, environ: Mapping[str, str] | None = None, *, early_handlers: bool = True) -> Any:
    """Make a batchgen.job.Job stop gracefully on USR1 too, and requeue itself afterwards when
    it runs inside Slurm. Called by `batchgen run` before job.run(); harmless outside Slurm
    (USR1 then just stops the run, exit 138).

    early_handlers: also catch USR1/TERM from now on, outside the part of run() where Job's
    own handlers are installed (they cover only the generation loop): a signal while the model
    loads would otherwise kill the task (USR1's default action) with no requeue, and the TERM
    that `scontrol requeue` sends during the final commit would kill it mid-commit. Here they
    just ask the job to stop (`job.request_stop`): it stops admitting as soon as it starts,
    commits and runs its on_stop callbacks. Only from the main thread; `restore_signals()`
    puts the previous handlers back.
    """
    job.stop_signals.setdefault(signal.SIGUSR1, EXIT_USR1)
    job.on_stop.append(lambda j: requeue_on_usr1(j, environ))
    if early_handlers and hasattr(job, "request_stop"):
        import threading

        if threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                name = signal.Signals(signum).name
                print(f"batchgen: got {name}; stopping (no new rows, commit, exit"
                      + (", requeue" if signum == signal.SIGUSR1 and own_slurm_job(environ) else "") + ")",
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


# sbatch splits #SBATCH lines at white space and strips quotes itself (no shell is involved): a
# path holding these can't be written there; '%' is its file-name pattern character (%A, %a).
_SBATCH_PATH_BAD = re.compile(r"[\s'\"\\]")


def _sbatch_path(p: Path) -> str:
    """A path for an #SBATCH option: refused when sbatch would split or unquote it, '%' escaped."""
    text = str(p)
    if _SBATCH_PATH_BAD.search(text) or not text.isprintable():
        raise click.BadParameter(f"the output directory's path can't hold white space, quotes or backslashes "
                                 f"(sbatch reads it from an #SBATCH line): {text!r}")
    return text.replace("%", "%%")


def render_sbatch_script(job_file: Path, output_dir: Path, opts: SubmitOptions,
                         command: Sequence[str] | None = None, workdir: Path | None = None,
                         run_args: Sequence[str] = ()) -> str:
    """The batch script. Paths are absolute, so `sbatch <script>` works from anywhere. Every value
    put in a shell line is one shlex.quote'd word (never inside double quotes, where $(...) and
    backticks would still run on the compute node)."""
    opts.validate()
    job_file = Path(os.path.abspath(job_file))
    output_dir = Path(os.path.abspath(output_dir))
    workdir = Path(os.path.abspath(workdir or Path.cwd()))
    command = list(command or batchgen_command())
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", opts.job_name or f"batchgen-{job_file.stem}").lstrip("-") or "batchgen"
    logs = _sbatch_path(output_dir / SLURM_DIR / "logs")
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
    missing_dir = q(f"batchgen: warning: no directory {workdir} here")
    lines += [
        "",
        "set -eu",
        'echo "batchgen: array task ${SLURM_ARRAY_TASK_ID:-?}/${SLURM_ARRAY_TASK_COUNT:-?} of job '
        '${SLURM_ARRAY_JOB_ID:-?}, restart ${SLURM_RESTART_COUNT:-0}, on $(hostname) at $(date -Is)" >&2',
        "# one thread pool per allocated CPU, not per CPU of the node",
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
        "export TOKENIZERS_PARALLELISM=false",
        f"cd -- {q(str(workdir))} 2>/dev/null || echo {missing_dir} >&2",
        "# exec: batchgen becomes the batch shell, so USR1 (--signal=B:...) and TERM reach it;",
        "# it stops admitting, commits, requeues itself on USR1 and exits (0 only when done).",
        f"exec {run}",
        "",
    ]
    return "\n".join(lines)


def write_sbatch_script(output_dir: Path, text: str, name: str) -> Path:
    """Write the script under OUT/.batchgen/slurm/ (and its logs/ directory) without following a link on the
    way: a link planted there must not make batchgen write elsewhere (sink's link-safe helpers)."""
    from . import sink

    out = Path(output_dir)
    d = out / SLURM_DIR
    try:
        sink.make_dirs(out, d / "logs")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}.sbatch"
        n = 1
        while os.path.lexists(path):
            n += 1
            path = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}-{n}.sbatch"
        tmp = path.with_suffix(".sbatch.tmp")
        with sink.open_new(out, tmp) as f:
            f.write(text.encode())
            os.fchmod(f.fileno(), 0o755)
        sink.replace_into(out, tmp, path)
    except sink.OutputError as e:
        raise click.ClickException(str(e)) from None
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
class JobRefused(click.ClickException):
    """A bad job file: `error: <one line>` and exit 2, as `batchgen run` says it."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def job_output_dir(job_file: Path, gpus_per_task: int | None = None) -> Path:
    """The job's output directory, absolute, resolved exactly as `batchgen run` resolves it.
    The whole job file is validated on the way, with the checks that hold on any node (a bad
    file fails here, not in N tasks): JobRefused."""
    from batchgen import config as _config

    try:
        cfg = _config.load_job(job_file)
        _config.preflight(cfg, local=False)  # the login node may have no GPU: no device check here
    except _config.ConfigError as e:
        raise JobRefused(str(e)) from None
    if gpus_per_task == 0:
        _check_cpu_only(cfg)
    return Path(_config.output_dir(cfg))


def _check_cpu_only(cfg: Any) -> None:
    """--gpus-per-task 0 gives the tasks no GPU: a job that needs CUDA would fail in every task."""
    e = cfg.engine
    if e.device.startswith("cuda"):
        raise JobRefused(f"{cfg.where('engine.device')}: engine.device: {e.device} needs a GPU, "
                         "but --gpus-per-task 0 gives the tasks none")
    if e.attention in ("flash", "triton"):
        raise JobRefused(f"{cfg.where('engine.attention')}: engine.attention: {e.attention} needs a GPU, "
                         "but --gpus-per-task 0 gives the tasks none")


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
    out = job_output_dir(job_file, gpus_per_task)
    _check_task_count(out, tasks)
    try:
        text = render_sbatch_script(job_file, out, opts)
    except click.BadParameter as e:  # a path or argument the script can't hold: one line, exit 2
        raise JobRefused(e.message) from None
    if dry_run:
        click.echo(text, nl=False)
        return
    script = write_sbatch_script(out, text, opts.job_name or f"batchgen-{job_file.stem}")
    try:
        job_id = sbatch_submit(script)
    except click.ClickException as e:
        e.message += f" (the script is {script}: `sbatch {script}` submits it)"
        raise
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

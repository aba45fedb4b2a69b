"""`batchgen submit JOB --tasks N`: check the job file and the options on the login node, then
write the sbatch script beside the output and submit it (see sbatch.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import click

from .sbatch import SLURM_DIR, render_sbatch_script, sbatch_submit, write_sbatch_script

DEFAULT_GRACE_S = 120


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
    data_parallel: int | None = None  # workers per task (None: --gpus-per-task, see data_parallel_of)

    def validate(self) -> None:
        if self.tasks < 1:
            raise click.BadParameter(f"--tasks must be >= 1, got {self.tasks}")
        if self.data_parallel is not None and self.data_parallel < 1:
            raise click.BadParameter(f"--data-parallel must be >= 1, got {self.data_parallel}")
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


class JobRefused(click.ClickException):
    """A bad job file: `error: <one line>` and exit 2, as `batchgen run` says it."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def job_output_dir(job_file: Path, gpus_per_task: int | None = None) -> Path:
    """The job's output directory, absolute, resolved exactly as `batchgen run` resolves it.
    The whole job file is validated on the way, with the checks that hold on any node (a bad
    file fails here, not in N tasks): JobRefused."""
    from ..pipeline.config import output_dir

    return Path(output_dir(checked_job(job_file, gpus_per_task)))


def checked_job(job_file: Path, gpus_per_task: int | None = None) -> Any:
    """The job file loaded and checked as on any node (JobRefused)."""
    from ..pipeline.config import ConfigError, load_job, preflight

    try:
        cfg = load_job(job_file)
        preflight(cfg, local=False)  # the login node may have no GPU: no device check here
    except ConfigError as e:
        raise JobRefused(str(e)) from None
    if gpus_per_task == 0:
        _check_cpu_only(cfg)
    return cfg


def data_parallel_of(cfg: Any, opts: SubmitOptions) -> int:
    """Worker processes per array task: --data-parallel, else one per engine.tensor_parallel GPUs of the task
    (--gpus-per-task), else (a CPU-only task) the job's engine.data_parallel (`all` is one on the CPU)."""
    tp = cfg.engine.tensor_parallel  # GPUs per worker
    if opts.data_parallel is not None:
        d = opts.data_parallel
    elif opts.gpus_per_task >= 1:
        d = max(1, opts.gpus_per_task // tp)
    else:
        d = cfg.engine.data_parallel if isinstance(cfg.engine.data_parallel, int) else 1
    if opts.gpus_per_task >= 1 and d * tp > opts.gpus_per_task and cfg.engine.device != "cpu":
        per = "one per worker" if tp == 1 else f"{tp} per worker: engine.tensor_parallel"
        raise click.UsageError(f"--data-parallel {d} needs {d * tp} GPUs per task ({per}), but --gpus-per-task "
                               f"is {opts.gpus_per_task}")
    return d


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
@click.option("--data-parallel", "data_parallel", type=int, default=None, metavar="D",
              help="Worker processes per task, each a task of the output: the array makes N x D tasks "
                   "(default: --gpus-per-task, one worker per GPU; CPU only: the job's engine.data_parallel).")
@click.option("--dry-run", is_flag=True, help="Print the sbatch script; write and submit nothing.")
def submit_command(job_file: Path, tasks: int, gpus_per_task: int, cpus_per_task: int | None,
                   partition: str | None, time_limit: str | None, max_parallel: int | None,
                   sbatch_args: tuple[str, ...], grace_s: int, job_name: str | None, data_parallel: int | None,
                   dry_run: bool) -> None:
    """Run JOB_FILE as a Slurm array of N tasks (writes the sbatch script beside the output)."""
    opts = SubmitOptions(tasks=tasks, gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task,
                         partition=partition, time=time_limit, max_parallel=max_parallel,
                         sbatch_args=sbatch_args, grace_s=grace_s, job_name=job_name, data_parallel=data_parallel)
    try:
        opts.validate()
    except click.BadParameter as e:
        raise click.UsageError(str(e.message))
    from ..pipeline.config import output_dir

    cfg = checked_job(job_file, gpus_per_task)
    out = Path(output_dir(cfg))
    workers = data_parallel_of(cfg, opts)
    _check_task_count(out, tasks, workers)
    try:
        text = render_sbatch_script(job_file, out, opts, run_args=["--data-parallel", str(workers)])
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
    click.echo(f"Submitted array job {job_id} ({tasks} tasks" + (f", {workers} workers each" if workers > 1 else "")
               + f"): {script}", err=True)
    click.echo(f"Logs: {out / SLURM_DIR / 'logs'}/{job_id}_<task>.log; progress: batchgen status {out}", err=True)
    click.echo(job_id)


def _check_task_count(out: Path, tasks: int, workers: int = 1) -> None:
    """Refuse to resubmit into an output that was partitioned for another number of tasks (each
    array task's workers are tasks of the output too: it has tasks x workers)."""
    from .status import manifest_num_tasks, read_progress

    seen = {p.num_tasks for p in read_progress(out) if p.num_tasks}
    if manifest_num_tasks(out):
        seen.add(manifest_num_tasks(out))
    if seen and seen != {tasks * workers}:
        counts = ", ".join(map(str, sorted(seen)))
        if workers == 1:
            raise click.UsageError(f"{out} was started with --tasks {counts}; the partition depends on it, so resubmit "
                                   "with the same --tasks (or use a new output directory)")
        raise click.UsageError(f"{out} was started with {counts} tasks in all; this submission makes {tasks} x "
                               f"{workers} (--tasks x --data-parallel) = {tasks * workers}: the partition depends on "
                               "it, so resubmit with numbers that make the same count (or use a new output directory)")

"""The `batchgen` command line. Thin: parse, call, print. torch and the engine are imported only
inside commands that need them, so `batchgen --help` is fast.

The other commands live with their wings: LAZY_COMMANDS maps a command name to the module and
click command that implement it, imported only when that command runs (help lists them unimported).
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "submit": ("batchgen.slurm.submit", "submit_command"),
    "status": ("batchgen.slurm.status", "status_command"),
    "bench": ("batchgen.bench", "bench_command"),
    "show": ("batchgen.show", "show_command"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in LAZY_COMMANDS:
            return cmd
        mod_name, attr = LAZY_COMMANDS[name]
        try:
            cmd = getattr(importlib.import_module(mod_name), attr)
        except Exception as e:  # noqa: BLE001 - a command whose dependencies are broken must not break the CLI
            raise click.ClickException(f"command '{name}' is unavailable: {type(e).__name__}: {e}") from None
        return cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="batchgen", message="batchgen %(version)s")
def cli() -> None:
    """Offline batch generation: a job file in, sharded Parquet out, resumable exactly once."""
    from .engine.switches import SwitchError, switches  # standard library only: no torch here

    try:  # a bad BATCHGEN_* variable is one line now, not a traceback from inside a kernel later
        switches()
    except SwitchError as e:
        _fail(str(e))


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@cli.command("run")
@click.argument("job_file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--dry-run", is_flag=True, help="Validate, render the first prompts with token counts and estimate the "
              "total tokens; loads only the tokenizer.")
@click.option("--overwrite", is_flag=True, help="Replace the output of a different (changed) job at output.path.")
@click.option("--task-id", type=int, default=None, envvar=None,
              help="This task's index, 0-based (default: $SLURM_ARRAY_TASK_ID, else 0).")
@click.option("--num-tasks", type=int, default=None,
              help="Number of tasks the input is split into (default: $SLURM_ARRAY_TASK_COUNT, else 1).")
@click.option("--data-parallel", "data_parallel", default=None, metavar="N|all",
              help="Worker processes, one per GPU (on the CPU: each with its share of the cores), as N tasks of "
                   "this output (default: engine.data_parallel, 1). With --task-id/--num-tasks (or a Slurm array) "
                   "this task's share is split N ways.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a job-file key, e.g. --set sampling.temperature=0 (repeatable; a YAML scalar "
              "or [list], else the text as given).")
@click.option("--progress", type=click.Choice(["auto", "bar", "log", "off"]), default="auto", show_default=True,
              help="auto: a bar on a terminal, log lines otherwise.")
@click.option("--log-interval", type=float, default=30.0, show_default=True, metavar="SECONDS",
              help="Seconds between progress log lines (when not a bar).")
@click.option("--preview", type=int, default=3, show_default=True, help="Rows to print with --dry-run.")
@click.option("--retry-errors", is_flag=True,
              help="Generate the output's error rows again (e.g. with a bigger engine.kv_cache_tokens); their new "
                   "rows replace the old in place, each (row, sample) once.")
@click.option("--worker", is_flag=True, hidden=True, help="A data-parallel worker, started by its supervisor.")
def run_command(job_file: str, dry_run: bool, overwrite: bool, task_id: int | None, num_tasks: int | None,
                data_parallel: str | None, overrides: tuple[str, ...], progress: str, log_interval: float,
                preview: int, retry_errors: bool, worker: bool) -> None:
    """Run JOB_FILE (YAML): stream its input through the model into Parquet shards.

    Interrupted runs (kill, SIGTERM, Ctrl-C) resume where they stopped when the same command is
    run again; the output holds every input row exactly once. See jobs/example.yaml."""
    from .pipeline.config import ConfigError, engine_config_error, load_job, preflight
    from .engine.validation import EngineArgumentError  # torch-free

    tid, n, own_share = _task_share(task_id, num_tasks)
    try:
        cfg = load_job(job_file, list(overrides))
        preflight(cfg)  # this machine: device, attention backend, output path (before any model loads)
        requested = 1 if worker else _requested(cfg, data_parallel)  # a worker is one task, whatever the job says
        plan = None if worker else _plan(cfg, requested, (tid, n), own_share, overwrite)
    except ConfigError as e:
        _fail(str(e))
        return
    from .pipeline.files import OutputError

    try:
        if dry_run:
            _dry_run(cfg, plan, requested, tid, n, preview)
            return
        if plan is not None and not plan.inline:
            from .pipeline.parallel import Supervisor, WorkerArgs

            args = WorkerArgs(job_file, overrides, overwrite, retry_errors, log_interval)
            code = _run_attached(Supervisor(cfg, plan, args, progress=progress, log_every=log_interval))
        else:
            if plan is not None:  # one task left to run: here
                for note in plan.notes:
                    click.echo(note, err=True)
                tid, n = plan.tasks[0], plan.num_tasks
            from .pipeline.run.job import Job

            job = Job(cfg, task_id=tid, num_tasks=n, overwrite=overwrite, progress=progress, log_every=log_interval,
                      retry_errors=retry_errors)
            code = _run_attached(job, worker=worker)
    except (ConfigError, OutputError) as e:
        _fail(str(e))
        return
    except EngineArgumentError as e:  # an argument the engine refused at start-up: the job file's fault
        _fail(str(engine_config_error(cfg, e)))
        return
    except KeyboardInterrupt:
        _fail("interrupted", 130)
        return
    sys.exit(code)


def _task_share(task_id: int | None, num_tasks: int | None) -> tuple[int, int, bool]:
    """(task id, task count, whether this run was given a share of its own: the flags or a Slurm array)."""
    from .slurm.array_task import task_from_env

    env_task, env_n = task_from_env()
    tid = env_task if task_id is None else task_id
    n = env_n if num_tasks is None else num_tasks
    if num_tasks is not None and task_id is None and env_n == 1:
        tid = 0
    if n < 1:
        _fail(f"--num-tasks must be >= 1, got {n}")
    if not 0 <= tid < n:
        _fail(f"--task-id {tid} is out of range for --num-tasks {n} (task ids are 0..{n - 1})")
    return tid, n, task_id is not None or num_tasks is not None or env_n > 1


def _requested(cfg: Any, flag: str | None) -> int | str:
    """--data-parallel, else engine.data_parallel (ConfigError for a bad flag value)."""
    from .pipeline.parallel import requested_workers

    return requested_workers(cfg, flag)


def _plan(cfg: Any, requested: int | str, share: tuple[int, int], own_share: bool, overwrite: bool) -> Any:
    """The data-parallel plan (None: a plain run of this share). ConfigError for what can't run here."""
    from .pipeline.parallel import plan_run

    return plan_run(cfg, requested, share, own_share, overwrite)


def _dry_run(cfg: Any, plan: Any, requested: int | str, tid: int, n: int, preview: int) -> None:
    from .pipeline.run.dry_run import dry_run as do_dry_run

    if plan is not None:
        for note in plan.notes:
            click.echo(note)
        click.echo(plan.describe())
        tid, n = plan.tasks[0], plan.num_tasks  # the first worker's share is previewed
    elif requested != 1:
        click.echo(f"data parallel: {requested} is one worker here (one GPU, or the CPU): a plain run in this process")
    do_dry_run(cfg, task_id=tid, num_tasks=n, preview=preview)


def _run_attached(job: Any, worker: bool = False) -> int:
    """job.run() (a Job or a Supervisor) with the Slurm stop and requeue attached: USR1 -> graceful
    stop + requeue inside Slurm. A worker stops on USR1 too but leaves the requeue to its supervisor."""
    from .slurm.requeue import attach_to_job, restore_signals

    attach_to_job(job, requeue=not worker)
    try:
        if worker:
            from .pipeline.parallel import become_worker

            become_worker(job)
        return job.run()
    finally:
        restore_signals()


def main(argv: list[str] | None = None) -> Any:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cli.main(args=argv, prog_name="batchgen")


if __name__ == "__main__":
    main()

"""The sbatch script of `batchgen submit`: rendered, written under OUT/.batchgen/slurm/, submitted.

One array task per part of the input, `--requeue`, `--signal=B:USR1@<grace>`, one log per task
(appended across requeues), and a last line that `exec`s the absolute path of the batchgen that
submitted it, so the batchgen process *is* the batch shell and receives Slurm's signals.
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import click

if TYPE_CHECKING:
    from .submit import SubmitOptions

SLURM_DIR = ".batchgen/slurm"  # hidden, like the rest of OUT/.batchgen: only shards are visible


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
    q = shlex.quote
    run = " ".join([*map(q, command), "run", q(str(job_file)), *map(q, run_args)])
    return "\n".join([*_sbatch_header(job_file, output_dir, opts), "", *_script_body(run, workdir), ""])


def _sbatch_header(job_file: Path, output_dir: Path, opts: SubmitOptions) -> list[str]:
    """The shebang, a comment and the #SBATCH lines."""
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", opts.job_name or f"batchgen-{job_file.stem}").lstrip("-") or "batchgen"
    logs = _sbatch_path(output_dir / SLURM_DIR / "logs")
    array = f"0-{opts.tasks - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# Written by `batchgen submit` on {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}.",
        "# Resubmit as is with `sbatch <this file>`: finished tasks exit at once, the others resume.",
    ]
    sbatch_opts = [f"--job-name={name}", f"--array={array}", "--requeue", f"--signal=B:USR1@{opts.grace_s}",
             f"--output={logs}/%A_%a.log", "--open-mode=append", "--nodes=1", "--ntasks=1"]
    if opts.cpus_per_task:
        sbatch_opts.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.gpus_per_task > 0:
        sbatch_opts.append(f"--gres=gpu:{opts.gpus_per_task}")
    if opts.partition:
        sbatch_opts.append(f"--partition={opts.partition}")
    if opts.time:
        sbatch_opts.append(f"--time={opts.time}")
    return lines + [_sbatch_line(o) for o in [*sbatch_opts, *opts.sbatch_args]]


def _script_body(run: str, workdir: Path) -> list[str]:
    """The shell part: say which task this is, set the thread pools, cd, exec batchgen."""
    q = shlex.quote
    missing_dir = q(f"batchgen: warning: no directory {workdir} here")
    return [
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
    ]


def write_sbatch_script(output_dir: Path, text: str, name: str) -> Path:
    """Write the script under OUT/.batchgen/slurm/ (and its logs/ directory) without following a link on the
    way: a link planted there must not make batchgen write elsewhere (sink's link-safe helpers)."""
    from ..pipeline.files import OutputError, make_dirs, open_new, replace_into

    out = Path(output_dir)
    d = out / SLURM_DIR
    try:
        make_dirs(out, d / "logs")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}.sbatch"
        n = 1
        while os.path.lexists(path):
            n += 1
            path = d / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{stamp}-{n}.sbatch"
        tmp = path.with_suffix(".sbatch.tmp")
        with open_new(out, tmp) as f:
            f.write(text.encode())
            os.fchmod(f.fileno(), 0o755)
        replace_into(out, tmp, path)
    except OutputError as e:
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



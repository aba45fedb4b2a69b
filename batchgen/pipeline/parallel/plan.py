"""What a data-parallel run will do, decided before any process starts: how many workers, which
device each one gets (CUDA_VISIBLE_DEVICES, CPU cores and threads), and which tasks of how many
they run. Every refusal is a ConfigError (one line, exit 2, nothing written).

Workers and tasks: the output's task count is fixed when its first rows are committed (the
partition depends on it); data_parallel is how many run at once.
- A new output (or --overwrite): this process's share (task i of T: --task-id/--num-tasks or the
  Slurm array, else 0 of 1) is split further in N: workers run tasks i*N .. i*N+N-1 of T*N.
- An output of this job with M tasks, run without a share of its own (no --task-id/--num-tasks, no
  Slurm array): its M tasks run, N at a time (one after another with N = 1), so a job started with
  data_parallel 4 is resumed with 2, or 1, and the other way round.
- An output of M tasks and a run with a share of its own (task i of T): M must be T*N, as a plain
  run refuses another --num-tasks.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...engine.threads import cpu_threads
from ..config import ConfigError, JobConfig, job_fingerprint, job_identity, output_dir
from ..config.errors import Ctx
from ..config.values import check_workers
from ..sink.manifest import different_job, manifest_mismatch
from ..sink.paths import OutputPaths


@dataclass(frozen=True)
class Slot:
    """One worker process's place: what it may use (a GPU or CPU cores)."""

    index: int
    device: str  # "cuda" (its one GPU is cuda:0 inside it) or "cpu"
    gpu: str | None = None  # its CUDA_VISIBLE_DEVICES (tensor parallel: several, comma-separated); None: unchanged
    cpus: tuple[int, ...] | None = None  # CPU affinity (CPU workers); None: inherited
    threads: int | None = None  # its OMP_NUM_THREADS (torch threads unless engine.threads says)

    def describe(self) -> str:
        where = (f"GPU{'s' if ',' in self.gpu else ''} {self.gpu}") if self.gpu else self.device
        if self.cpus is not None:
            where += f", cores {_span(self.cpus)}"
        return where + (f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else "")


@dataclass
class Plan:
    slots: list[Slot]
    tasks: list[int]  # the task ids this run runs, in start order
    num_tasks: int  # the output's task count
    share: tuple[int, int] = (0, 1)  # (task id, task count) of this process
    notes: list[str] = field(default_factory=list)
    inline: bool = False  # one worker, one task: run in this process (after saying the notes)

    @property
    def workers(self) -> int:
        return len(self.slots)

    def describe(self) -> str:
        """One line for --dry-run and the start of a run."""
        devs = "; ".join(f"worker {s.index}: {s.describe()}" for s in self.slots)
        return (f"data parallel: {self.workers} worker process{'es' if self.workers != 1 else ''}, "
                f"tasks {_span(self.tasks)} of {self.num_tasks}" + (" (queued: one starts as one ends)"
                                                                   if len(self.tasks) > self.workers else "")
                + f" ({devs})")


def _span(ids: Any) -> str:
    ids = list(ids)
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def parse_workers(text: str) -> int | str:
    """The --data-parallel value: a positive integer or all (ConfigError naming the flag)."""
    raw = text.strip()
    value: Any = raw.lower() if raw.lower() == "all" else raw
    try:
        value = int(raw)
    except ValueError:
        pass
    return check_workers(Ctx(f"--data-parallel {text}"), "engine.data_parallel", value, None)


def requested_workers(cfg: JobConfig, flag: str | None) -> int | str:
    """--data-parallel when given, else engine.data_parallel."""
    return parse_workers(flag) if flag is not None else cfg.engine.data_parallel


# ---------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------
def uses_cuda(cfg: JobConfig) -> bool:
    device = cfg.engine.device
    if device.startswith("cuda"):
        return True
    if device == "cpu":
        return False
    import torch  # preflight imported it already

    return bool(torch.cuda.is_available())


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices, UUIDs or MIG ids)."""
    env = os.environ if environ is None else environ
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    out = []
    for entry in (x.strip() for x in listed.split(",")):
        if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry
            break
        out.append(entry)
    return out[:count] if count else []


def worker_count(cfg: JobConfig, requested: int | str, gpus: list[str] | None) -> int:
    """How many workers `requested` is here. `gpus`: the visible GPUs when the job runs on CUDA, None
    on the CPU, where `all` is one worker (one process already uses every core; more only split them)."""
    if gpus is None:
        return 1 if requested == "all" else int(requested)
    device = cfg.engine.device
    if device.startswith("cuda:"):
        if requested not in (1, "all"):
            raise ConfigError(f"{cfg.where('engine.device')}: engine.device: {device} names one GPU, but data "
                              "parallel gives each worker its own (CUDA_VISIBLE_DEVICES): use device auto or cuda")
        return 1
    tp = cfg.engine.tensor_parallel  # GPUs per worker: its tensor-parallel ranks
    n = len(gpus) // tp if requested == "all" else int(requested)
    if n * tp > len(gpus) or n < 1:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        per = "one per worker" if tp == 1 else f"{tp} per worker (engine.tensor_parallel)"
        raise ConfigError(f"{cfg.where('engine.data_parallel')}: engine.data_parallel: {requested} needs "
                          f"{max(n, 1) * tp} GPU(s), {per}, but {len(gpus)} {'is' if len(gpus) == 1 else 'are'} "
                          "visible here" + (f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else ""))
    return n


def cuda_slots(cfg: JobConfig, n: int, gpus: list[str], total_threads: int) -> list[Slot]:
    """GPUs i*tp .. i*tp + tp - 1 of the visible ones for worker i (tp = engine.tensor_parallel: its ranks),
    and its share of the CPU threads."""
    per = max(1, total_threads // n)
    if cfg.engine.device.startswith("cuda:"):  # the one GPU it names, as a plain run would use it
        return [Slot(0, "cuda", None, None, total_threads)]
    tp = cfg.engine.tensor_parallel
    return [Slot(i, "cuda", ",".join(gpus[i * tp:(i + 1) * tp]), None, per) for i in range(n)]


def cpu_slots(n: int, cpus: list[int], total_threads: int, omp_set: bool, notes: list[str]) -> list[Slot]:
    """CPU workers: the cores split into n contiguous parts, one per worker, a thread per core (with
    OMP_NUM_THREADS set, its count split n ways). No GPU is visible to them."""
    if n == 1:
        return [Slot(0, "cpu", "", None, None)]
    if n > len(cpus):
        notes.append(f"note: {n} CPU workers on {len(cpus)} core(s): they share the cores, one thread each")
        return [Slot(i, "cpu", "", None, 1) for i in range(n)]
    parts = [cpus[len(cpus) * i // n: len(cpus) * (i + 1) // n] for i in range(n)]
    return [Slot(i, "cpu", "", tuple(p), max(1, total_threads // n) if omp_set else len(p))
            for i, p in enumerate(parts)]


def usable_cpus() -> list[int]:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return sorted(getaffinity(0))
        except OSError:
            pass
    return list(range(os.cpu_count() or 1))


def make_slots(cfg: JobConfig, n: int, gpus: list[str] | None, notes: list[str]) -> list[Slot]:
    """n Slots. engine.threads, when the job sets it, is each worker's (it wins over OMP_NUM_THREADS)."""
    total = cpu_threads(None)  # OMP_NUM_THREADS when set (the Slurm script sets it), else the usable cores
    if gpus is not None:
        return cuda_slots(cfg, n, gpus, total)
    return cpu_slots(n, usable_cpus(), total, bool(os.environ.get("OMP_NUM_THREADS", "").strip()), notes)


# ---------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------
def existing_tasks(cfg: JobConfig, refuse_other: bool = True) -> int | None:
    """The task count of this job's output at output.path, once it has committed rows (None: a new
    output). Another job's committed output is refused here, in the words every worker would use
    (--overwrite replaces it; a changed input is left to the workers, which read it)."""
    paths = OutputPaths(output_dir(cfg))
    m = paths.manifest()
    if not m or not paths.has_committed_rows():
        return None
    fp = job_fingerprint(cfg)
    if m.get("fingerprint") != fp:
        if not refuse_other:
            return None
        problem = manifest_mismatch(m, {"fingerprint": fp, "identity": job_identity(cfg)})
        raise ConfigError(different_job(paths.path, problem or "its fingerprint differs"))
    n = m.get("num_tasks")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def plan_tasks(cfg: JobConfig, n: int, share: tuple[int, int], own_share: bool, existing: int | None,
               notes: list[str]) -> tuple[list[int], int]:
    """(the task ids to run, the output's task count) for n workers."""
    tid, n_share = share
    if existing is None or (own_share and existing == n_share * n):
        return [tid * n + j for j in range(n)], n_share * n
    if own_share:
        raise ConfigError(f"{output_dir(cfg)} was written by {existing} task(s); this run is task {tid} of {n_share} "
                          f"split into {n} worker(s), {n_share * n} tasks: the partition depends on the count, so "
                          "rerun with the numbers it was started with (or use another output.path)")
    if existing != n:
        notes.append(f"note: {output_dir(cfg)} has {existing} task{'s' if existing != 1 else ''} (fixed when it was "
                     "started): " + (f"they run {min(n, existing)} at a time" if existing > 1 else "one worker runs it"))
    return list(range(existing)), existing


def plan_run(cfg: JobConfig, requested: int | str, share: tuple[int, int], own_share: bool,
             overwrite: bool = False) -> Plan | None:
    """The data-parallel plan, or None for a plain run of this share in this process. ConfigError
    for what can't run here."""
    if requested == 1 and own_share:
        return None  # a plain run (an output of another task count is refused by it, as before)
    existing = None if overwrite else existing_tasks(cfg, refuse_other=requested != 1)
    if requested == 1 and existing in (None, 1):
        return None
    gpus = visible_gpus() if uses_cuda(cfg) else None
    n = worker_count(cfg, requested, gpus)
    if n == 1 and (existing is None or own_share):
        return None  # `all` on a machine of one GPU (or the CPU)
    notes: list[str] = []
    tasks, num_tasks = plan_tasks(cfg, n, share, own_share, existing, notes)
    slots = make_slots(cfg, min(n, len(tasks)), gpus, notes)
    return Plan(slots, tasks, num_tasks, share, notes, inline=len(tasks) == 1)

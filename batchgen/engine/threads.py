"""How many torch threads the engine uses on the CPU.

torch's default intra-op thread count is the machine's core count, which is wrong in the places
batchgen runs: a Slurm task or a container may be pinned to a few of many cores (more threads
than cores only fight each other), and on a loaded 2-core box one thread was measured faster
than two. So the count comes from the cores this process may run on (`os.sched_getaffinity`),
and can be set (`engine.threads` in the job file).

Order of precedence:
1. an explicit request (`engine.threads`, `Engine(threads=...)`);
2. an explicit `OMP_NUM_THREADS` in the environment (its first entry, e.g. "4" or "4,2"): it is
   the user's or the scheduler's choice (the Slurm script batchgen writes sets it to
   SLURM_CPUS_PER_TASK, tests set it to 1 for one float reduction order), and torch itself
   reads it at start-up; a value that isn't a positive integer is ignored;
3. the number of CPUs in `os.sched_getaffinity(0)` where the OS has it, else `os.cpu_count()`.
Without an explicit request, the engine never raises torch's current count (apply_cpu_threads): torch
starts at the physical core count, which beats the logical one, and a caller or a test that lowered
it (one thread for one float reduction order) keeps its choice.
"""
from __future__ import annotations

import os

__all__ = ["cpu_threads", "apply_cpu_threads"]


def _omp_num_threads() -> int | None:
    """OMP_NUM_THREADS's first entry as a positive int, or None when unset or unusable."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw.split(",")[0].strip())
    except ValueError:
        return None
    return n if n >= 1 else None


def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else all of them."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            n = len(getaffinity(0))
            if n >= 1:
                return n
        except OSError:
            pass
    return max(os.cpu_count() or 1, 1)


def cpu_threads(requested: int | None = None) -> int:
    """The torch thread count to use: `requested` when given, else OMP_NUM_THREADS when set,
    else the CPUs this process may run on. Raises ValueError for a request that isn't an int >= 1."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be an integer >= 1 or None, got {requested!r}")
        return requested
    omp = _omp_num_threads()
    if omp is not None:
        return omp
    return _usable_cpus()


def apply_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count to cpu_threads(requested), or without a request to at most that
    (never above torch's current count); returns the count used. torch.set_num_threads is called only
    when the count differs from the current one."""
    import torch

    n = cpu_threads(requested) if requested is not None else min(torch.get_num_threads(), cpu_threads(None))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

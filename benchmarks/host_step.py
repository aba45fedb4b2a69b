"""Host-side cost of one engine step in steady-state decode.

Builds an Engine on the CPU with a tiny random-weight Llama checkpoint, puts N requests (default
256) into steady-state decode (all prefilled, every running sequence decoding one token per step),
then times, per step:
  schedule  Scheduler.schedule()
  prepare   ModelRunner.prepare(batch)  (input building: ids, positions, slot mapping, tables, sampling rows)
  process   Engine._process(handle)     (appending sampled tokens, stop checks)
The model forward itself (ModelRunner.execute) is run but not counted. Prints median / p90 ms.
On this CPU-only path the forward runs on the same cores between the timed parts and leaves the
host's caches cold, which a GPU run does not do; `--forward none` skips it (every sequence
"samples" token 0) to time the host work as it runs beside a GPU. Both are printed in the note.

    PYTHONPATH=. python benchmarks/host_step.py [--requests 256] [--steps 200] [--prompt-len 64]

Target: schedule + prepare < 1 ms for 256 running decode requests.
It adds the requests with Engine.add, then drives one step's parts by hand the way Engine.step
does (scheduler.schedule, runner.prepare / execute, Engine._process); adjust here if those change.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def build_checkpoint(out: Path) -> Path:
    """The tests' tiny llama (tests/checkpoints.py: BPE tokenizer, the same tiny shapes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import build_checkpoint as build

    return build("llama", out)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


@dataclass
class StepTimes:
    """Per-step milliseconds of each part, over the timed steady-state decode steps."""

    sched: list[float] = field(default_factory=list)
    prep: list[float] = field(default_factory=list)
    proc: list[float] = field(default_factory=list)
    fwd: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed decode steps first")
    ap.add_argument("--prompt-len", type=int, default=64, help="mean prompt length (uniform +-50%%)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the forward is not timed)")
    ap.add_argument("--checkpoint", default=None, help="use this model dir instead of a tiny llama")
    ap.add_argument("--profile", action="store_true", help="cProfile schedule + prepare over the timed steps")
    ap.add_argument("--forward", choices=["cpu", "none"], default="cpu",
                    help="run the model forward on the CPU between steps (default) or skip it")
    return ap.parse_args()


def build_engine(args: argparse.Namespace, path: Path) -> Any:
    """A CPU Engine sized for args.requests requests, with all of them added (random prompts, seed 0)."""
    from batchgen import Engine, GenerationRequest, SamplingParams

    n = args.requests
    max_new = args.warmup + args.steps + 8
    rng = random.Random(0)
    lens = [max(1, int(args.prompt_len * rng.uniform(0.5, 1.5))) for _ in range(n)]
    kv_tokens = sum(L + max_new + 16 for L in lens) + 1024
    eng = Engine.from_pretrained(str(path), device="cpu", dtype="float32", cuda_graphs=False,
                                 max_num_seqs=n, max_batch_tokens=max(8192, sum(lens) + n),
                                 kv_cache_tokens=kv_tokens, max_model_len=max(lens) + max_new + 16)
    vocab = eng.model.cfg.vocab_size
    eng.add(GenerationRequest([rng.randrange(3, vocab) for _ in range(L)],
                              SamplingParams(max_new_tokens=max_new, ignore_eos=True,
                                             temperature=0.0 if i % 2 else 0.8, top_p=0.95, seed=i),
                              request_id=i)
            for i, L in enumerate(lens))
    return eng


def run_step(eng: Any, forward: str, prof: Any | None) -> tuple[Any, list[float]]:
    """One engine step's parts by hand, as Engine.step does; returns the batch and 5 perf_counter stamps.

    prof, when given, is enabled around schedule + prepare only.
    """
    from batchgen.engine.runner import StepHandle

    if prof is not None:
        prof.enable()
    t0 = time.perf_counter()
    batch = eng.scheduler.schedule()
    t1 = time.perf_counter()
    step = eng.runner.prepare(batch)
    t2 = time.perf_counter()
    if prof is not None:
        prof.disable()
    if forward == "cpu":
        handle = eng.runner.execute(step)
    else:  # host work only: token 0 for every sampling row, nothing runs on the device
        handle = StepHandle(step.sample_seqs, torch.zeros(len(step.sample_seqs), dtype=torch.int64),
                            None, None, None)
    t3 = time.perf_counter()
    finished = list(eng._process(handle))
    t4 = time.perf_counter()
    assert not finished, "a request finished before the timed steps ended"
    return batch, [t0, t1, t2, t3, t4]


def timed_loop(eng: Any, args: argparse.Namespace, prof: Any | None) -> StepTimes:
    """Step until warmup + steps steady-state decode steps have run; time the last args.steps of them."""
    times = StepTimes()
    n = args.requests
    decode_steps = 0
    while decode_steps < args.warmup + args.steps:
        timed = prof is not None and decode_steps >= args.warmup
        batch, (t0, t1, t2, t3, t4) = run_step(eng, args.forward, prof if timed else None)
        steady = len(batch.seqs) == n and all(x == 1 for x in batch.lens)
        if steady:
            decode_steps += 1
            if decode_steps > args.warmup:
                times.sched.append(1e3 * (t1 - t0))
                times.prep.append(1e3 * (t2 - t1))
                times.fwd.append(1e3 * (t3 - t2))
                times.proc.append(1e3 * (t4 - t3))
    return times


def report(args: argparse.Namespace, times: StepTimes, t_all: float) -> None:
    """Print the min / median / p90 table and the < 1 ms target line (t_all: perf_counter at loop start)."""
    host = [a + b for a, b in zip(times.sched, times.prep)]
    host_all = [a + b + c for a, b, c in zip(times.sched, times.prep, times.proc)]
    print(f"host step, {args.requests} running decode requests, {len(host)} steps, forward {args.forward}, "
          f"torch {torch.__version__} (CPU, {args.threads} thread(s)); total loop {time.perf_counter() - t_all:.1f}s")
    print(f"{'part':<32}{'min ms':>9}{'median ms':>11}{'p90 ms':>9}")
    for name, xs in (("schedule()", times.sched), ("runner.prepare()", times.prep),
                     ("schedule + prepare", host), ("_process() (token bookkeeping)", times.proc),
                     ("host total", host_all), ("forward+sample (not host)", times.fwd)):
        print(f"{name:<32}{min(xs):>9.3f}{statistics.median(xs):>11.3f}{pct(xs, 0.9):>9.3f}")
    ok = statistics.median(host) < 1.0
    print(f"target schedule + prepare < 1 ms: {'MET' if ok else 'NOT MET'} "
          f"(median {statistics.median(host):.3f} ms)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else build_checkpoint(Path(tmp) / "llama")
        eng = build_engine(args, path)
        prof = None
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
        t_all = time.perf_counter()
        times = timed_loop(eng, args, prof)
        report(args, times, t_all)
        if prof is not None:
            import pstats

            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        eng.close()


if __name__ == "__main__":
    main()

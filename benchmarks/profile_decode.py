"""Kernel-level breakdown of decode steps on the GPU (torch profiler), for one benchmark shape.

    python benchmarks/profile_decode.py --shape llama-3.1-8b --batch 32 --context 768
Prints the top CUDA kernels by total time over the profiled steps, and the per-step total.
"""
from __future__ import annotations

import argparse

import torch

from batchgen.bench import SHAPES
from batchgen.engine.engine import Engine
from batchgen.engine.loader import build_model, init_random
from batchgen.engine.models.config import ModelConfig
from batchgen.engine.request import GenerationRequest, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--graphs", action="store_true")
    a = ap.parse_args()
    cfg = ModelConfig.from_hf(SHAPES[a.shape])
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, qkv_bias=False)
    init_random(model)
    eng = Engine(None, model=model, device="cuda", max_num_seqs=a.batch, max_model_len=4096,
                 cuda_graphs=a.graphs, prefix_caching=False)
    reqs = [GenerationRequest([100 + (i * 7 + j) % 5000 for j in range(a.context)],
                              SamplingParams(max_new_tokens=10_000 // 8, ignore_eos=True), i) for i in range(a.batch)]
    for r in reqs:
        eng._enqueue(eng._make_group(r, None))
    for _ in range(3):  # admit everything and reach steady decode
        batch = eng.scheduler.schedule()
        list(eng._process(eng.runner.execute(eng.runner.prepare(batch))))
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            batch = eng.scheduler.schedule()
            list(eng._process(eng.runner.execute(eng.runner.prepare(batch))))
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_time_total > 0:
            rows.append((e.device_time_total / a.steps, e.count // a.steps, e.key[:90]))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{a.shape} batch {a.batch} context {a.context}: {total / 1000:.3f} ms of kernels per step")
    for us, n, name in rows[:25]:
        print(f"{us:9.1f} us  x{n:<4d} {name}")


if __name__ == "__main__":
    main()

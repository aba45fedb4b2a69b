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
    ap.add_argument("--graphs", action="store_true", help="replay decode CUDA graphs (their kernels may not be "
                    "listed by the profiler: eager steps are the default)")
    ap.add_argument("--quantization", default=None, choices=["fp8"])
    ap.add_argument("--kv-cache-dtype", default=None)
    a = ap.parse_args()
    cfg = ModelConfig.from_hf(SHAPES[a.shape])
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, qkv_bias=False)
    init_random(model)
    kv = {"kv_cache_dtype": a.kv_cache_dtype} if a.kv_cache_dtype else {}
    eng = Engine(None, model=model, device="cuda", max_num_seqs=a.batch, max_model_len=4096,
                 cuda_graphs=a.graphs, prefix_caching=False, quantization=a.quantization, **kv)
    print(eng.describe())
    prompts = [[100 + (i * 7 + j) % 5000 for j in range(a.context)] for i in range(a.batch)]
    eng.add([GenerationRequest(p, SamplingParams(max_new_tokens=4000 - a.context, ignore_eos=True)) for p in prompts])
    # admit everything (the prompts' prefill chunks) and reach steady decode
    for _ in range(-(-a.batch * a.context // eng.max_batch_tokens) + 4):
        eng.step()
    torch.cuda.synchronize()
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # CPU activity too: recent torch attaches kernels to the CPU ops that launched them
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(a.steps):
            eng.step()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            t = by_name.setdefault(e.name[:90], [0.0, 0])
            t[0] += e.device_time
            t[1] += 1
    rows = sorted(((us / a.steps, n // a.steps, name) for name, (us, n) in by_name.items()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"{a.shape} batch {a.batch} context {a.context}: {total / 1000:.3f} ms of kernels per step")
    for us, n, name in rows[:30]:
        print(f"{us:9.1f} us  x{n:<4d} {name}")
    eng.abort()
    eng.close()


if __name__ == "__main__":
    main()

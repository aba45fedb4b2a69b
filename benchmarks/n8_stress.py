"""The n > 1 workload that used to stop with "scheduler stalled" on an H200 (issue 10): random weights of
the qwen3-0.6b shape, 128 prompts of 100-1024 token ids x n=8 samples (temperature 1.0, top_p 0.95,
seed 7), 512 new tokens, max_num_seqs=512. Checks that every request comes back with all its samples
and prints one JSON line (outcome, output tok/s, preemptions). Runs against any batchgen checkout:
    PYTHONPATH=<checkout> python benchmarks/n8_stress.py [--json FILE] [--label NAME]
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="batchgen")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    args = ap.parse_args()

    from batchgen.bench import SHAPES
    from batchgen.engine.engine import Engine
    from batchgen.engine.loader import build_model, init_random
    from batchgen.engine.models.config import ModelConfig
    from batchgen.engine.request import SamplingParams

    cfg = ModelConfig.from_hf(SHAPES["qwen3-0.6b"])
    model = build_model(cfg, torch.device("cuda"), torch.bfloat16, qkv_bias=False)
    init_random(model)
    engine = Engine(None, model=model, device="cuda", max_num_seqs=args.max_num_seqs, max_model_len=4096)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(args.requests)]
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0, top_p=0.95, seed=7, n=args.n,
                            ignore_eos=True)
    t0 = time.perf_counter()
    record = dict(label=args.label, device=torch.cuda.get_device_name(), requests=args.requests, n=args.n,
                  new_tokens=args.new, max_num_seqs=args.max_num_seqs)
    try:
        outs = engine.generate(prompts, params)
    except Exception as e:  # noqa: BLE001 - the outcome is the measurement
        record.update(outcome=f"{type(e).__name__}: {e}", seconds=round(time.perf_counter() - t0, 2))
    else:
        wall = time.perf_counter() - t0
        lost = sum(o is None for o in outs)
        samples = sum(len(o.outputs) for o in outs if o is not None)
        tokens = sum(len(c.token_ids) for o in outs if o is not None for c in o.outputs)
        complete = lost == 0 and samples == args.requests * args.n and tokens == samples * args.new
        record.update(outcome="complete" if complete else f"INCOMPLETE: {lost} requests lost, {samples} samples",
                      seconds=round(wall, 2), output_tok_s=round(tokens / wall, 1),
                      preemptions=engine.stats.preemptions, kv_cache_tokens=engine.stats.kv_cache_tokens)
    print(json.dumps(record))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    engine.close()


if __name__ == "__main__":
    main()

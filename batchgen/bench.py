"""`batchgen bench`: two fixed workloads on random weights of a named model shape, our engine and
(optionally) transformers' continuous batching on the same work in the same run.

seed: 32 prompts of 256 random token ids, 1024 new tokens each (llama-3.1-8b shape);
nanovllm: 256 prompts of 100-1024 ids, 100-1024 new tokens each (qwen3-0.6b shape, nano-vllm's own
benchmark);
isl1000-osl1000: 2,048 prompts of 1,000 ids, 1,000 new tokens each (llama-3.1-8b shape);
isl128-osl2048: 1,024 prompts of 128 ids, 2,048 new tokens each (llama-3.1-8b shape): the input and
output lengths of TensorRT-LLM's published H200 throughput tables.
Greedy, EOS ignored, so every run generates exactly the same number of tokens."""
from __future__ import annotations

import datetime as _dt
import json
import random
import time
from typing import Any

import click

# HF config fields of the benchmark shapes (random weights: speed does not depend on values)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    # google/gemma-3-4b-it's text model (its config.json's text_config over Gemma3TextConfig's defaults)
    "gemma-3-4b": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=2560,
                       intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=256, vocab_size=262208, max_position_embeddings=131072, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                       sliding_window=1024, sliding_window_pattern=6, query_pre_attn_scalar=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=True),
    # MoE: 128 experts, 8 active (renormalised), every layer sparse; ~61 GB in bf16 (bench_floor.py: its floor)
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                          rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
}
# workload -> (prompts, prompt length, new tokens) for the fixed-length ones
FIXED_WORKLOADS: dict[str, tuple[int, int, int]] = {
    "seed": (32, 256, 1024), "isl1000-osl1000": (2048, 1000, 1000), "isl128-osl2048": (1024, 128, 2048),
}
WORKLOADS = ("seed", "nanovllm", "isl1000-osl1000", "isl128-osl2048")
DEFAULT_SHAPE = {"seed": "llama-3.1-8b", "nanovllm": "qwen3-0.6b", "isl1000-osl1000": "llama-3.1-8b",
                 "isl128-osl2048": "llama-3.1-8b"}


def workload(name: str) -> tuple[list[list[int]], list[int]]:
    """Token-id prompts and new-token counts of a workload (fixed seed: the same on every run)."""
    rng = random.Random(0)
    if name in FIXED_WORKLOADS:
        n, isl, osl = FIXED_WORKLOADS[name]
        return [[rng.randrange(100, 100000) for _ in range(isl)] for _ in range(n)], [osl] * n
    if name == "nanovllm":
        prompts = [[rng.randrange(100, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
        return prompts, [rng.randint(100, 1024) for _ in range(256)]
    raise click.BadParameter(f"unknown workload {name!r} ({', '.join(WORKLOADS)})")


def _record(system: str, wl: str, shape: str, figures: dict[str, Any], **settings: Any) -> dict[str, Any]:
    import torch
    import transformers

    return dict(system=system, workload=wl, shape=shape,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, transformers=transformers.__version__,
                date=_dt.date.today().isoformat(), **settings, **figures)


# --constraint json: every request's completion must match this schema, which cannot be complete within any
# benchmark's max_new_tokens, so a constrained run generates exactly the tokens of an unconstrained one
LONG_JSON = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 8192}


def synthetic_tokenizer() -> Any:
    """A byte-level BPE tokenizer (~1k ids) trained in-process, for constrained runs on random weights: the
    grammar engine needs one, ids past its vocabulary are simply never allowed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ['{"a": [1, 2, 3], "b": "text"}', "0 1 2 3 4 5 6 7 8 9 10 100 999, 42, 7", "The quick brown fox. " * 4]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def run_batchgen(wl: str, shape: str, overlap: bool, cuda_graphs: bool, attention: str,
                 max_num_seqs: int, max_batch_tokens: int, block_size: int = 16,
                 constraint: str = "none", quantization: str | None = None,
                 kv_cache_dtype: str = "auto", quantize_lm_head: bool = False) -> dict[str, Any]:
    import torch

    from .engine.engine import Engine
    from .engine.loader import build_model, init_random
    from .engine.models.config import ModelConfig
    from .engine.request import GenerationRequest, SamplingParams

    prompts, new = workload(wl)
    cfg = ModelConfig.from_hf(SHAPES[shape])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, device, dtype, qkv_bias=False)
    init_random(model)
    t0 = time.perf_counter()
    engine = Engine(None, model=model, device=str(device), max_num_seqs=max_num_seqs,
                    max_batch_tokens=max_batch_tokens, overlap=overlap, cuda_graphs=cuda_graphs,
                    attention=attention, max_model_len=4096, prefix_caching=False, block_size=block_size,
                    quantization=quantization, kv_cache_dtype=kv_cache_dtype, quantize_lm_head=quantize_lm_head)
    startup = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    if constraint == "json":
        engine.tokenizer = synthetic_tokenizer()
        extra["json_schema"] = LONG_JSON
    # warm-up on the same prompts (two batches' worth at most) with a few new tokens each: compiles every
    # kernel variant the timed run meets (prefill chunks, mixed steps, sampler shapes) so no compile
    # lands in the figures
    warm = prompts[: 2 * max_num_seqs]
    engine.generate(warm, [SamplingParams(max_new_tokens=2 + i % 8, ignore_eos=True, **extra)
                           for i in range(len(warm))])
    engine.reset_stats()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reqs = [GenerationRequest(p, SamplingParams(max_new_tokens=n, ignore_eos=True, **extra), i)
            for i, (p, n) in enumerate(zip(prompts, new))]
    t0 = time.perf_counter()
    outs = list(engine.stream(reqs))
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert out_tokens == sum(new), f"expected {sum(new)} output tokens, got {out_tokens}"
    figures = _figures(engine, prompts, out_tokens, wall, startup)
    figures.update(_moe_floor(engine, prompts, new))
    engine.close()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _record("batchgen", wl, shape, figures, overlap=engine.overlap, cuda_graphs=engine.cuda_graphs,
                   max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, block_size=block_size,
                   constraint=constraint, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                   **({"quantize_lm_head": True} if quantize_lm_head else {}))


def _figures(engine: Any, prompts: list[list[int]], out_tokens: int, wall: float, startup: float) -> dict[str, Any]:
    """The measured figures of one timed run, from the engine's counters."""
    import torch

    device = engine.device
    s = engine.stats
    return dict(requests=len(prompts), output_tokens=out_tokens, seconds=round(wall, 3),
                output_tok_s=round(out_tokens / wall, 1),
                total_tok_s=round((out_tokens + sum(map(len, prompts))) / wall, 1),
                mean_decode_step_ms=_r(s.mean_decode_step_ms), mean_decode_gpu_ms=_r(s.mean_decode_gpu_ms),
                gpu_busy_fraction=_r(s.gpu_busy_fraction, 4),
                decode_gpu_busy_fraction=_r(s.decode_gpu_busy_fraction, 4),
                host_ms_per_step=_r(s.host_ms_per_step), steps=s.steps,
                peak_gpu_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                startup_s=round(startup, 2), cuda_graph_capture_s=round(engine.graph_capture_s, 2),
                attention_backend=engine.backend.name, kv_cache_tokens=s.kv_cache_tokens,
                precision=engine.precision or str(engine.dtype).removeprefix("torch."))


def _moe_floor(engine: Any, prompts: list[list[int]], new: list[int]) -> dict[str, Any]:
    """For an MoE shape, the floor of a decode step from the bytes it must read (bench_floor.py)."""
    if engine.model.cfg.moe is None:
        return {}
    import torch

    from .bench_floor import floor_record

    name = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    return {"decode_floor": floor_record(engine.model.cfg, prompts, new, engine.max_num_seqs, name, engine.stats,
                                         kv_bytes=engine.kv_dtype.itemsize)}


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def run_transformers(wl: str, shape: str, max_batch_tokens: int = 4096) -> dict[str, Any]:
    """The anchor: transformers' generate_batch with async batching and CUDA graphs on."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers import ContinuousBatchingConfig

    prompts, new = workload(wl)
    cfg = AutoConfig.for_model(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    blocks = sum((len(p) + o + 255) // 256 for p, o in zip(prompts, new)) + 8
    cb = ContinuousBatchingConfig(use_cuda_graph=True, use_async_batching=True, num_blocks=blocks,
                                  max_batch_tokens=max_batch_tokens)
    gen = GenerationConfig(max_new_tokens=max(new), eos_token_id=-1, do_sample=False)
    t0 = time.perf_counter()
    if len(set(new)) == 1:
        res = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb)
        toks = sum(len(r.generated_tokens) for r in res.values())
    else:  # per-request lengths go through add_request
        mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        mgr.start()
        for i, (p, o) in enumerate(zip(prompts, new)):
            mgr.add_request(p, request_id=f"r{i}", max_new_tokens=o)
        toks = got = 0
        while got < len(prompts):
            r = mgr.get_result(timeout=600)
            if r is None:
                break
            if r.is_finished():
                got += 1
                toks += len(r.generated_tokens)
        mgr.stop(block=True)
    wall = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    figures = dict(requests=len(prompts), output_tokens=toks, seconds=round(wall, 3),
                   output_tok_s=round(toks / wall, 1),
                   total_tok_s=round((toks + sum(map(len, prompts))) / wall, 1))
    return _record("transformers-cb", wl, shape, figures, overlap=True, cuda_graphs=True,
                   max_batch_tokens=max_batch_tokens)


@click.command("bench")
@click.option("--workload", "wl", type=click.Choice(WORKLOADS), default="nanovllm", show_default=True)
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None,
              help="model shape (default: the workload's own: nanovllm -> qwen3-0.6b, the others -> llama-3.1-8b)")
@click.option("--no-overlap", is_flag=True, help="synchronous step loop (ablation)")
@click.option("--no-cuda-graphs", is_flag=True, help="run decode steps eagerly")
@click.option("--attention", type=click.Choice(["auto", "torch", "triton", "flash"]), default="auto", show_default=True)
@click.option("--max-num-seqs", type=int, default=256, show_default=True)
@click.option("--max-batch-tokens", type=int, default=8192, show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True, help="KV cache block size (tokens)")
@click.option("--compare", type=click.Choice(["transformers"]), default=None, help="also run the anchor, same workload")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="append JSON records here")
@click.option("--constraint", type=click.Choice(["none", "json"]), default="none", show_default=True,
              help="json: every completion constrained by a JSON schema (llguidance), same token counts")
@click.option("--quantization", type=click.Choice(["none", "fp8"]), default="none", show_default=True,
              help="fp8: the projections' weights quantized to FP8 at load (Engine(quantization='fp8'))")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "bfloat16", "fp8"]), default="auto", show_default=True,
              help="fp8: an e4m3 KV cache, twice the tokens per GiB (Engine(kv_cache_dtype='fp8'))")
@click.option("--quantize-lm-head", is_flag=True,
              help="with --quantization fp8: lm_head in FP8 too (Engine(quantize_lm_head=True))")
def bench_command(wl: str, shape: str | None, no_overlap: bool, no_cuda_graphs: bool, attention: str,
                  max_num_seqs: int, max_batch_tokens: int, block_size: int, compare: str | None,
                  json_path: str | None, constraint: str, quantization: str, kv_cache_dtype: str,
                  quantize_lm_head: bool) -> None:
    """Throughput on random weights of a named shape (nothing is downloaded)."""
    shape = shape or DEFAULT_SHAPE[wl]
    if quantize_lm_head and quantization == "none":
        raise click.UsageError("--quantize-lm-head needs --quantization fp8")
    records = [run_batchgen(wl, shape, not no_overlap, not no_cuda_graphs, attention, max_num_seqs,
                            max_batch_tokens, block_size, constraint,
                            None if quantization == "none" else quantization, kv_cache_dtype, quantize_lm_head)]
    click.echo(json.dumps(records[0]))
    if compare == "transformers":
        records.append(run_transformers(wl, shape))
        click.echo(json.dumps(records[1]))
        ratio = records[0]["output_tok_s"] / records[1]["output_tok_s"]
        records[0]["ratio_vs_transformers"] = round(ratio, 2)
        click.echo(f"batchgen / transformers-cb output tok/s: {ratio:.2f}x")
    if json_path:
        with open(json_path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

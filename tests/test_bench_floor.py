"""The decode floor of `batchgen bench` for MoE shapes (bench_floor.py): expected experts touched, the bytes
of a step for the qwen3-30b-a3b shape against its parameter count, and the record's fields."""
from __future__ import annotations

import pytest
import torch

from batchgen import bench
from batchgen.bench_floor import decode_floor, expected_experts, floor_record, step_floor_bytes
from batchgen.engine.stats import DecodeTotals, EngineStats
from batchgen.engine.models.config import ModelConfig


def test_expected_experts_touched() -> None:
    assert expected_experts(128, 8, 1) == pytest.approx(8.0)
    assert expected_experts(128, 8, 2) == pytest.approx(128 * (1 - (120 / 128) ** 2))
    assert expected_experts(128, 8, 64) == pytest.approx(125.94, abs=0.01)
    assert 128 - expected_experts(128, 8, 256) < 1e-5
    assert expected_experts(8, 2, 1) == pytest.approx(2.0)


def _meta_params(cfg: ModelConfig) -> dict[str, int]:
    from batchgen.engine.models.llama import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(cfg)
    return {n: p.numel() for n, p in model.named_parameters()}


def test_qwen3_30b_a3b_shape_matches_transformers_and_its_floor_reads_every_weight_at_256() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = bench.SHAPES["qwen3-30b-a3b"]
    cfg = ModelConfig.from_hf(shape)
    moe = cfg.moe
    assert (moe.num_experts, moe.top_k, moe.intermediate_size, moe.norm_topk_prob) == (128, 8, 768, True)
    assert moe.num_sparse == 48 and (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 4, 128)
    ours = _meta_params(cfg)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape))
    assert sum(ours.values()) == sum(p.numel() for p in hf.parameters())
    total = sum(ours.values())
    assert 30.4e9 < total < 30.6e9  # ~61 GB in bf16
    # at 256 sequences every expert is touched: the step reads every weight but the embedding table
    f = decode_floor(cfg, 256, 0.0)
    read = total - ours["embed_tokens.weight"] + 256 * cfg.hidden_size
    assert f.weight_bytes + f.expert_bytes == pytest.approx(2 * read, rel=1e-6)
    assert f.kv_bytes == 0
    # one token: 8 experts per layer, the KV of its context
    one = decode_floor(cfg, 1, 1000.0)
    per_expert = 3 * 2048 * 768 * 2
    assert one.expert_bytes == pytest.approx(48 * 8 * per_expert)
    assert one.kv_bytes == 1000 * 48 * 2 * 4 * 128 * 2


def _stats(mean_decode_gpu_ms: float | None, by_batch: dict[int, DecodeTotals] | None = None) -> EngineStats:
    by_batch = by_batch or {}
    return EngineStats(steps=0, requests=0, errors=0, prompt_tokens=0, output_tokens=0, generated_tokens=0, wall_s=0.0,
                       gpu_busy_fraction=None, host_ms_per_step=0.0, output_tok_s=0.0,
                       decode_steps=sum(t.steps for t in by_batch.values()), decode_gpu_busy_fraction=None,
                       mean_decode_step_ms=None, mean_decode_gpu_ms=mean_decode_gpu_ms, preemptions=0,
                       prefix_cache_hit_tokens=0, kv_cache_tokens=0, decode_by_batch=by_batch)


def test_floor_record_at_the_full_batch() -> None:
    cfg = ModelConfig.from_hf(bench.SHAPES["qwen3-30b-a3b"])
    prompts, new = [[1] * 100] * 300, [50] * 300
    # 40 full steps then a tail of 10 steps of 4 sequences: their floor is each step's own
    by_batch = {256: DecodeTotals(40, 40 * 22.0, 40 * 256 * 125), 4: DecodeTotals(10, 10 * 12.0, 10 * 4 * 140)}
    rec = floor_record(cfg, prompts, new, 256, "NVIDIA H200", _stats(20.0, by_batch))
    assert rec["batch"] == 256 and rec["mean_context"] == 125.0 and rec["experts_touched"] == pytest.approx(128.0)
    f = decode_floor(cfg, 256, 125.0)
    assert rec["floor_ms"] == pytest.approx(f.ms(4.23e12), abs=1e-3)
    assert rec["fraction_of_floor"] == pytest.approx(rec["floor_ms"] / 20.0, abs=1e-3)
    assert rec["floor_tok_s"] == pytest.approx(256 / rec["floor_ms"] * 1000, rel=1e-3)
    tail = decode_floor(cfg, 4, 140.0)
    assert 4 * 125 * 48 * 2 * 4 * 128 * 2 < tail.kv_bytes
    run_ms = (40 * f.ms(4.23e12) + 10 * tail.ms(4.23e12))
    assert rec["run_floor_ms_per_step"] == pytest.approx(run_ms / 50, abs=1e-3)
    assert rec["run_fraction_of_floor"] == pytest.approx(run_ms / (40 * 22.0 + 10 * 12.0), abs=1e-3)
    # the full batch's steps alone: their floor against their own time
    assert rec["full_batch_steps"] == 40 and rec["full_batch_gpu_ms"] == pytest.approx(22.0)
    assert rec["full_batch_fraction_of_floor"] == pytest.approx(f.ms(4.23e12) / 22.0, abs=1e-3)
    assert step_floor_bytes(cfg, 4, 10, 10 * 4 * 140) == pytest.approx(10 * tail.total_bytes)
    assert "floor_ms" not in floor_record(cfg, prompts, new, 256, "cpu", _stats(None))  # no known bandwidth: bytes only
    # an FP8 KV cache reads half the KV bytes
    assert floor_record(cfg, prompts, new, 256, "cpu", _stats(None), kv_bytes=1)["kv_gb"] == pytest.approx(
        rec["kv_gb"] / 2, abs=1e-3)


def test_bench_record_of_an_moe_shape_carries_its_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """`batchgen bench` on a tiny random MoE shape (CPU): the run completes and its record has decode_floor."""
    import random

    tiny = dict(bench.SHAPES["qwen3-30b-a3b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=2048, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32)
    monkeypatch.setitem(bench.SHAPES, "tiny-moe", tiny)

    def small(name: str):
        rng = random.Random(0)
        return [[rng.randrange(3, 2000) for _ in range(rng.randint(5, 40))] for _ in range(6)], [20] * 6

    monkeypatch.setattr(bench, "workload", small)
    rec = bench.run_batchgen("seed", "tiny-moe", False, False, "torch", 4, 256)
    assert rec["output_tokens"] == 120
    floor = rec["decode_floor"]
    assert floor["batch"] == 4 and floor["experts_touched"] == pytest.approx(8 * (1 - 0.75 ** 4), abs=0.01)
    assert floor["bytes"] > 0 and "floor_ms" not in floor  # the CPU: no bandwidth known


class _Event:
    """A GPU timeline point (what Counters reads of a torch.cuda.Event: elapsed_time in ms)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, later: "_Event") -> float:
        return later.ms - self.ms


def test_counters_total_decode_steps_by_batch_size() -> None:
    """The engine's counters: each decode step after the first timed one lands under its batch size with its
    busy time and KV positions; prefill steps and the first step (no gap to measure) count in neither."""
    from batchgen.engine.stats import Counters

    c = Counters()
    c.add_gpu_step(_Event(0.0), _Event(2.0), decode_only=True, batch=4, kv_tokens=400)  # first: no gap yet
    c.add_gpu_step(_Event(2.5), _Event(5.0), decode_only=False, batch=4, kv_tokens=900)  # prefill
    c.add_gpu_step(_Event(5.0), _Event(6.0), decode_only=True, batch=4, kv_tokens=404)
    c.add_gpu_step(_Event(6.5), _Event(7.0), decode_only=True, batch=2, kv_tokens=150)
    c.add_gpu_step(_Event(7.0), _Event(8.0), decode_only=True, batch=4, kv_tokens=412)
    s = c.snapshot(preemptions=0, prefix_cache_hit_tokens=0, kv_cache_tokens=0)
    assert s.decode_steps == 3 and s.decode_by_batch == {2: DecodeTotals(1, 0.5, 150), 4: DecodeTotals(2, 2.0, 816)}
    assert list(s.decode_by_batch) == [2, 4]
    c.decode_by_batch[4].steps += 10  # the snapshot is a copy, not a view of the running totals
    assert s.decode_by_batch[4].steps == 2
    assert s.mean_decode_gpu_ms == pytest.approx(2.5 / 3)

"""`batchgen bench --constraint json` on a tiny random shape (CPU): the constrained run generates exactly the
unconstrained token counts (the schema cannot be complete first), so tok/s figures compare like for like."""
from __future__ import annotations

import pytest

pytest.importorskip("llguidance")


def test_constrained_bench_runs_the_same_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from batchgen import bench

    tiny = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=2048,
                max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    monkeypatch.setitem(bench.SHAPES, "tiny", tiny)

    def small(name: str):
        rng = random.Random(0)
        return [[rng.randrange(3, 2000) for _ in range(rng.randint(5, 40))] for _ in range(6)], [30] * 6

    monkeypatch.setattr(bench, "workload", small)
    free = bench.run_batchgen("seed", "tiny", False, False, "torch", 4, 256)
    json_run = bench.run_batchgen("seed", "tiny", False, False, "torch", 4, 256, constraint="json")
    assert free["output_tokens"] == json_run["output_tokens"] == 180
    assert json_run["constraint"] == "json" and free["constraint"] == "none"

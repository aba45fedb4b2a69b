"""Tensor parallel (Engine(..., tensor_parallel=N), batchgen/engine/parallel): on the CPU with gloo, real
processes. tensor_parallel=2 gives the same greedy tokens as tensor_parallel=1 in float32 on tiny
checkpoints of each family (KV heads split, and replicated with 1 KV head); chunked prefill, preemption
and an abandoned stream stay in step across ranks; the sharded layers equal the full ones; bad settings
fail before any process starts; close() leaves no process behind and a dead worker makes rank 0 raise.
Each engine start spawns one worker (a few seconds: it imports torch and loads the checkpoint): those tests
are marked slow (about 10 s each on a 2-core box).
"""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from batchgen import Engine, SamplingParams
from batchgen.engine.parallel import TensorParallelError
from batchgen.engine.validation import EngineArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 90)), [300 + i % 7 for i in range(33)]]
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def _tokens(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def _run(path, prompts, params, tp: int, **kw) -> tuple[list[list[int]], int]:
    engine = Engine(path, device="cpu", dtype="float32", threads=1, tensor_parallel=tp, **kw)
    try:
        return _tokens(engine.generate(prompts, params)), engine.stats.preemptions
    finally:
        engine.close()


def _workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("batchgen-tp-")]


# ------------------------------------------------------------------ greedy tokens, TP=2 == TP=1
FAMILY_CASES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),  # q/k/v bias
    "qwen3": ("qwen3", {}),  # q/k norm, head_dim != hidden / heads
    "mistral": ("mistral", {}),
    "phi3": ("phi3", {}),  # checkpoint stores fused qkv_proj / gate_up_proj
    "smollm2-tied": ("smollm2", {}),  # tied embeddings: one vocab-parallel weight for both
    "llama-1-kv-head": ("llama", {"num_key_value_heads": 1}),  # fewer KV heads than ranks: replicated
}


@pytest.mark.slow  # spawns a worker process
@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_tp2_greedy_tokens_equal_tp1(tiny_checkpoint, case):
    family, overrides = FAMILY_CASES[case]
    path = tiny_checkpoint(family, **overrides)
    want, _ = _run(path, PROMPTS, GREEDY, 1)
    got, _ = _run(path, PROMPTS, GREEDY, 2)
    assert got == want


def _scenario(engine: Engine, prompts, params) -> list[list[int]]:
    engine.add([[1, 2, 3, 4]] * 3, GREEDY)
    engine.step()
    assert engine.abort() == 3
    for _ in engine.stream([[40, 41, 42]] * 4, GREEDY):
        break  # left early: its unfinished requests are dropped on every rank
    return _tokens(engine.generate(prompts, params))


@pytest.mark.slow  # spawns a worker process
@pytest.mark.parametrize("overlap", [False, True])
def test_tp2_chunked_prefill_preemption_and_abandoned_calls_stay_in_step(tiny_checkpoint, overlap):
    """Small steps (chunked prefill) and a small KV cache (preemption); an add()/abort() and a stream left
    early before: every rank drops the same requests and derives the same seeds (n=2, seed None), and the
    tokens equal TP=1's after the same calls."""
    path = tiny_checkpoint("llama")
    prompts = [list(range(10 + i, 70 + i)) for i in range(6)]
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True),
              SamplingParams(max_new_tokens=16, temperature=0.8, top_k=20, seed=7, ignore_eos=True),
              SamplingParams(max_new_tokens=12, temperature=1.0, n=2, ignore_eos=True)] * 2
    got = []
    for tp in (1, 2):
        engine = Engine(path, device="cpu", dtype="float32", threads=1, tensor_parallel=tp, max_batch_tokens=32,
                        kv_cache_tokens=256, max_num_seqs=4, overlap=overlap)
        try:
            got.append(_scenario(engine, prompts, params))
            assert engine.stats.preemptions > 0
        finally:
            engine.close()
    assert got[1] == got[0]


# ------------------------------------------------------------------ the sharded layers, in one process
class _Rank:
    """A group of `world` whose collectives do nothing (the test sums the ranks itself)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world, self.backend = rank, world, "none"

    def all_reduce(self, t):
        return t

    def all_gather_last(self, t):
        return t


@pytest.mark.parametrize("family,overrides", [("qwen2", {}), ("llama", {"num_key_value_heads": 1}),
                                              ("smollm2", {}), ("phi3", {})])
def test_sharded_layers_equal_the_full_ones(tiny_checkpoint, family, overrides):
    """Column-parallel qkv / gate_up keep exactly their heads' / slice's outputs; the row-parallel o / down
    and the vocab-parallel embedding sum to the full result; the lm_head shards concatenate to it. Loading
    only the rank's share (load_shard, what the engine does) gives exactly the sharded full model."""
    from batchgen.engine.loader import load_model
    from batchgen.engine.parallel.load import load_shard
    from batchgen.engine.parallel.shard import head_ranges, shard_model

    path = tiny_checkpoint(family, **overrides)
    full, _ = load_model(path, torch.device("cpu"), "float32")
    cfg, d = full.cfg, full.cfg.head_dim
    x = torch.randn(5, cfg.hidden_size)
    ids = torch.tensor([0, 3, cfg.vocab_size // 2, cfg.vocab_size - 1])
    attn, mlp = full.layers[0].self_attn, full.layers[0].mlp
    q_full, k_full, v_full = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], -1)
    o_in = torch.randn(5, attn.q_size)
    sums = {"o": 0, "down": 0, "emb": 0}
    heads = []
    for rank in range(2):
        part, _ = load_model(path, torch.device("cpu"), "float32")
        shard_model(part, _Rank(rank, 2))
        direct, _ = load_shard(path, torch.device("cpu"), "float32", _Rank(rank, 2))
        want = dict(part.named_parameters(remove_duplicate=False))
        got = dict(direct.named_parameters(remove_duplicate=False))
        assert sorted(got) == sorted(want)
        for name, p in want.items():
            assert torch.equal(got[name], p), name
        assert torch.equal(direct.cos_sin, part.cos_sin)
        qr, kvr = head_ranges(cfg, rank, 2)
        a, m = part.layers[0].self_attn, part.layers[0].mlp
        q, k, v = a.qkv_proj(x).split([a.q_size, a.kv_size, a.kv_size], -1)
        torch.testing.assert_close(q, q_full[:, qr.start * d: qr.stop * d], rtol=0, atol=0)
        torch.testing.assert_close(k, k_full[:, kvr.start * d: kvr.stop * d], rtol=0, atol=0)
        torch.testing.assert_close(v, v_full[:, kvr.start * d: kvr.stop * d], rtol=0, atol=0)
        sums["o"] = sums["o"] + a.o_proj(o_in[:, qr.start * d: qr.stop * d])
        sums["down"] = sums["down"] + m(x)
        sums["emb"] = sums["emb"] + part.embed_tokens(ids)
        heads.append(part.lm_head(x))
        assert part.cfg.num_heads == cfg.num_heads // 2 and part.cfg.vocab_size == cfg.vocab_size
    torch.testing.assert_close(sums["o"], attn.o_proj(o_in), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["down"], mlp(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums["emb"], full.embed_tokens(ids), rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(heads, -1)[:, : cfg.vocab_size], full.lm_head(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ validation: before any process starts
@pytest.mark.parametrize("kw,message", [
    (dict(tensor_parallel=3), "tensor_parallel 3 must divide num_attention_heads (4) and intermediate_size (128)"),
    (dict(tensor_parallel=0), "Engine: tensor_parallel"),
    (dict(tensor_parallel=2, quantization="fp8"), "quantization 'fp8' is not supported with tensor parallel"),
])
def test_bad_tensor_parallel_settings_fail_in_one_line(tiny_checkpoint, kw, message):
    with pytest.raises(EngineArgumentError) as err:
        Engine(tiny_checkpoint("llama"), device="cpu", dtype="float32", **kw)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not _workers()


def test_kv_heads_that_do_not_divide_the_ranks_are_refused(tiny_checkpoint):
    path = tiny_checkpoint("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    with pytest.raises(EngineArgumentError, match=r"tensor_parallel 2 and num_key_value_heads \(3\) must divide"):
        Engine(path, device="cpu", tensor_parallel=2)
    assert not _workers()


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3_moe", "mixtral"])
def test_families_without_a_sharded_decoder_are_refused(tiny_checkpoint, family):
    """Their layers are not the ones parallel/shard.py splits: refused in one line, never silently wrong."""
    with pytest.raises(EngineArgumentError) as err:
        Engine(tiny_checkpoint(family), device="cpu", dtype="float32", tensor_parallel=2)
    assert "tensor_parallel is not supported for model_type" in str(err.value) and "\n" not in str(err.value)
    assert not _workers()


# ------------------------------------------------------------------ shutdown and failures
@pytest.mark.slow  # spawns a worker process
def test_close_leaves_no_process_behind(tiny_checkpoint):
    engine = Engine(tiny_checkpoint("llama"), device="cpu", dtype="float32", threads=1, tensor_parallel=2)
    procs = list(engine._tp.procs)
    assert [p.is_alive() for p in procs] == [True]
    assert "tensor parallel 2 (gloo)" in engine.describe()
    with pytest.raises(EngineArgumentError, match="already has a torch.distributed group"):
        Engine(tiny_checkpoint("llama"), device="cpu", tensor_parallel=2)  # one at a time per process
    engine.close()
    assert not any(p.is_alive() for p in procs) and not _workers()
    assert engine.close() is None  # twice is fine


@pytest.mark.slow  # spawns a worker process
@pytest.mark.parametrize("when", ["between_steps", "during_a_step"])
def test_a_dead_worker_makes_rank_0_raise_not_hang(tiny_checkpoint, when):
    engine = Engine(tiny_checkpoint("llama"), device="cpu", dtype="float32", threads=1, tensor_parallel=2,
                    max_num_seqs=8)
    worker = engine._tp.procs[0]
    if when == "between_steps":
        worker.kill()
        worker.join()
    else:  # killed while rank 0 is inside the steps' collectives
        threading.Timer(1.0, worker.kill).start()
    t0 = time.monotonic()
    with pytest.raises(TensorParallelError, match="rank 1 exited with code -9; the engine is closed"):
        engine.generate([[5, 6, 7]] * 8, SamplingParams(max_new_tokens=1000, ignore_eos=True))
    assert time.monotonic() - t0 < 60
    assert engine.runner is None and not _workers()
    with pytest.raises(Exception, match="closed"):
        engine.generate([[1, 2]], GREEDY)


# ------------------------------------------------------------------ CUDA (NCCL)
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_equals_tp1_on_cuda_in_float32(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    results = []
    for tp in (1, 2):
        engine = Engine(path, device="cuda", dtype="float32", tensor_parallel=tp, attention="torch")
        try:
            results.append(_tokens(engine.generate(PROMPTS, GREEDY)))
            if tp == 2:
                assert "tensor parallel 2 (nccl)" in engine.describe()
        finally:
            engine.close()
    assert results[0] == results[1]
@pytest.mark.slow  # spawns a worker process
def test_a_failure_on_rank_0_while_building_stops_the_workers(tiny_checkpoint, monkeypatch):
    """Rank 0 fails after its worker started (the worker waits in a collective): the worker is stopped at
    once, and a new tensor-parallel engine starts in the same process afterwards."""
    from batchgen.engine.engine import Engine as EngineClass

    path = tiny_checkpoint("llama")

    def boom(self):
        raise RuntimeError("rank 0 only")  # the spawned worker imports the real method

    with monkeypatch.context() as m:
        m.setattr(EngineClass, "_load_tokenizer", boom)
        with pytest.raises(RuntimeError, match="rank 0 only"):
            Engine(path, device="cpu", dtype="float32", threads=1, tensor_parallel=2)
    assert not _workers()
    got, _ = _run(path, PROMPTS[:1], GREEDY, 2)
    assert got == _run(path, PROMPTS[:1], GREEDY, 1)[0]
@pytest.mark.slow  # spawns a worker process
def test_tp2_constrained_and_text_requests_equal_tp1(tiny_checkpoint):
    """Text prompts (tokenized on rank 0, the ids forwarded) and constrained rows (each rank runs its own
    matchers on the same tokens) beside a free one, through stream()."""
    pytest.importorskip("llguidance")
    path = tiny_checkpoint("qwen3")
    reqs = [("Hello", SamplingParams(max_new_tokens=6, ignore_eos=True)),
            ("Pick one:", SamplingParams(choice=["yes", "no", "maybe"], max_new_tokens=8)),
            ("Digits:", SamplingParams(regex=r"[0-9]{3}", max_new_tokens=8, logprobs=True))]
    from batchgen import GenerationRequest

    got = []
    for tp in (1, 2):
        engine = Engine(path, device="cpu", dtype="float32", threads=1, tensor_parallel=tp)
        try:
            outs = sorted(engine.stream([GenerationRequest(p, sp, request_id=i) for i, (p, sp) in enumerate(reqs)]),
                          key=lambda o: o.request_id)
            got.append([(c.token_ids, c.text, c.finish_reason) for o in outs for c in o.outputs])
        finally:
            engine.close()
    assert got[1] == got[0]
    assert got[0][1][1] in ("yes", "no", "maybe") and got[0][2][1].isdigit()


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "nan", "inf", "1e300"])
def test_tp_timeout_refuses_what_timedelta_cannot_hold(monkeypatch, raw: str) -> None:
    from batchgen.engine.parallel import group

    monkeypatch.setenv("BATCHGEN_TP_TIMEOUT", raw)
    with pytest.raises(TensorParallelError, match="BATCHGEN_TP_TIMEOUT"):
        group.timeout()
    monkeypatch.setenv("BATCHGEN_TP_TIMEOUT", "90")
    assert group.timeout().total_seconds() == 90

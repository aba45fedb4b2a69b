"""CUDA-only engine checks (skipped without a GPU): the overlapped loop, decode CUDA graphs and
the Triton backend give the same greedy tokens as the synchronous loop and the transformers
reference, in float32 so that only true near-ties may differ."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return R.make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("cuda") / "qwen3")


def _engine(path: str, **kw):
    from batchgen import Engine

    base = dict(device="cuda", dtype="float32", max_num_seqs=16, max_batch_tokens=512, kv_cache_tokens=16384)
    return Engine.from_pretrained(path, **{**base, **kw})


def _greedy(engine, prompts, max_new):
    outs = engine.generate(prompts, R.greedy_params(max_new))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def work(ckpt):
    prompts = R.random_prompts_for(ckpt, 32)
    max_new = R.random_max_new(32)
    return prompts, max_new, R.cached_greedy(ckpt, prompts, max_new)


@pytest.mark.parametrize("attention", ["triton", "torch"])
def test_overlap_equals_sync_and_reference(ckpt, work, attention):
    prompts, max_new, ref = work
    overlapped = _engine(ckpt, attention=attention, overlap=True)
    assert overlapped.overlap
    got = _greedy(overlapped, prompts, max_new)
    assert overlapped.stats.gpu_busy_fraction is not None
    sync = _engine(ckpt, attention=attention, overlap=False, cuda_graphs=overlapped.cuda_graphs)
    assert _greedy(sync, prompts, max_new) == got  # same kernels, same order: bit-identical
    failures, _ = R.compare_greedy(R.get_reference(ckpt), prompts, got, ref)
    assert not failures, R.format_failures(failures, f"cuda {attention} overlap")


def test_graphs_and_preemption_match_reference(ckpt, work):
    prompts, max_new, ref = work
    eng = _engine(ckpt, attention="triton", kv_cache_tokens=1024, cuda_graphs=True)
    assert eng.cuda_graphs and eng.runner.graphs is not None
    got = _greedy(eng, prompts, max_new)
    assert eng.stats.preemptions > 0
    failures, _ = R.compare_greedy(R.get_reference(ckpt), prompts, got, ref)
    assert not failures, R.format_failures(failures, "cuda graphs + preemption")


def test_seeded_sampling_same_with_and_without_overlap(ckpt, work):
    from batchgen import SamplingParams

    prompts = work[0][:12]
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    a = _engine(ckpt, attention="triton", overlap=True).generate(prompts, params)
    b = _engine(ckpt, attention="triton", overlap=False).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.parametrize("seed", range(4))
def test_stress_overlap_equals_sync_under_preemption(ckpt, seed):
    """The CPU stress test's workloads on CUDA (Triton attention, decode graphs, overlap): constant preemption,
    n up to 8, greedy and seeded, stop strings, min_new_tokens. Every sample comes back, overlapped == sync."""
    import random

    from invariants import check_engine_idle
    from test_engine_stress import check_complete, random_config, random_requests, summary

    rng = random.Random(seed)
    conf = {**random_config(rng), "block_size": 16}
    vocab, _ = R.model_info(ckpt)
    reqs = random_requests(rng, vocab, 40)
    results = []
    for overlap in (True, False):
        eng = _engine(ckpt, attention="triton", overlap=overlap, **conf)
        outs = list(eng.stream(reqs))
        check_complete(outs, reqs)
        check_engine_idle(eng)
        results.append(summary(outs))
        eng.close()
    assert results[0] == results[1], f"overlapped != synchronous for {conf}"

"""Engine greedy output == a plain transformers greedy loop, per family and scheduling scenario.

32 random prompts of 1..300 tokens, 1..64 new tokens each (fixed seeds), ignore_eos on both sides.
A difference is tolerated only at a near-tie of the reference (top-2 logits within 1e-3), after
which that prompt is not compared further (see reference.compare_greedy).

Scenarios: one_batch (all in one step), max_seqs_3, chunked_prefill (max_batch_tokens=64),
preemption (small kv cache; stats.preemptions > 0), prefix_cache (shared 100-token prefix;
stats.prefix_cache_hit_tokens > 0), eos (EOS honoured: reference truncated at the first EOS).
By default every scenario runs on llama and qwen3 and one_batch + chunked_prefill on the other
families; BATCHGEN_ENGINE_FULL=1 runs every scenario on every family.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

N_PROMPTS = 32
SCENARIOS = {
    "one_batch": dict(max_num_seqs=256, max_batch_tokens=16384, kv_cache_tokens=16384),
    "max_seqs_3": dict(max_num_seqs=3, max_batch_tokens=16384, kv_cache_tokens=16384,
                       prefix_caching=False),
    "chunked_prefill": dict(max_num_seqs=256, max_batch_tokens=64, kv_cache_tokens=16384),
    "preemption": dict(max_num_seqs=256, max_batch_tokens=4096, kv_cache_tokens=512),
    "prefix_cache": dict(max_num_seqs=4, max_batch_tokens=128, kv_cache_tokens=16384,
                         prefix_caching=True),
}
FULL_FAMILIES = ["llama", "qwen3"]
LIGHT_SCENARIOS = ["one_batch", "chunked_prefill"]
# checkpoint variants: name -> (conftest family, config overrides)
VARIANTS = {
    # a window (48) much shorter than the prompts: masks in prefill chunks, decode and recompute
    "mistral-sw48": ("mistral", {"sliding_window": 48}),
}
VARIANT_SCENARIOS = ["one_batch", "chunked_prefill", "preemption"]


def _cases():
    full = os.environ.get("BATCHGEN_ENGINE_FULL") == "1"
    for fam in R.FAMILIES:
        for sc in SCENARIOS:
            if full or fam in FULL_FAMILIES or sc in LIGHT_SCENARIOS:
                yield pytest.param(fam, sc, id=f"{fam}-{sc}")
    for var in VARIANTS:
        for sc in SCENARIOS:
            if full or sc in VARIANT_SCENARIOS:
                yield pytest.param(var, sc, id=f"{var}-{sc}")


@pytest.fixture
def ckpt(request, tmp_path_factory):
    get = R.checkpoint_getter(request, tmp_path_factory)

    def by_name(name: str) -> str:
        if name in VARIANTS:
            family, overrides = VARIANTS[name]
            return get(family, **overrides)
        return get(name)

    return by_name


def _prompts(path: str, scenario: str):
    if scenario == "prefix_cache":
        prompts = R.shared_prefix_prompts_for(path, 24, prefix_len=100)
    else:
        prompts = R.random_prompts_for(path, N_PROMPTS)
    return prompts, R.random_max_new(len(prompts))


def _check_outputs(outs, prompts, max_new, label):
    assert len(outs) == len(prompts), label
    for i, (o, p, m) in enumerate(zip(outs, prompts, max_new)):
        assert o.error is None, f"{label}: prompt #{i} (len {len(p)}) errored: {o.error}"
        assert o.request_id == i, f"{label}: request_id {o.request_id!r} at position {i}"
        assert list(o.prompt_token_ids) == p, f"{label}: prompt_token_ids differ at #{i}"
        assert len(o.outputs) == 1 and o.outputs[0].index == 0
        c = o.outputs[0]
        assert c.finish_reason == "length", f"{label}: #{i} finish_reason {c.finish_reason}"
        assert len(c.token_ids) == m, f"{label}: #{i} (len {len(p)}) gave {len(c.token_ids)} tokens, wanted {m}"


def _assert_matches(path, prompts, outs, ref_results, label):
    ref = R.get_reference(path)
    got = [list(o.outputs[0].token_ids) for o in outs]
    failures, ties = R.compare_greedy(ref, prompts, got, ref_results)
    if ties:
        print(f"{label}: tolerated near-ties: " + "; ".join(map(str, ties)))
    assert not failures, R.format_failures(failures, label)


@pytest.mark.parametrize("family,scenario", list(_cases()))
def test_greedy_matches_transformers(ckpt, family, scenario):
    path = ckpt(family)
    prompts, max_new = _prompts(path, scenario)
    ref_results = R.cached_greedy(path, prompts, max_new)
    engine = R.make_engine(path, **SCENARIOS[scenario])
    try:
        label = f"{family}/{scenario}"
        outs = engine.generate(prompts, R.greedy_params(max_new))
        _check_outputs(outs, prompts, max_new, label)
        _assert_matches(path, prompts, outs, ref_results, label)
        stats = engine.stats
        if scenario == "preemption":
            assert stats.preemptions > 0, f"{label}: no preemption happened: {stats}"
        if scenario == "prefix_cache":
            assert stats.prefix_cache_hit_tokens > 0, f"{label}: no prefix-cache hit: {stats}"
            # Second pass on the same engine: every prompt is now fully cached up to its last block.
            hits_before = stats.prefix_cache_hit_tokens
            outs2 = engine.generate(prompts, R.greedy_params(max_new))
            _check_outputs(outs2, prompts, max_new, label + "/second-pass")
            _assert_matches(path, prompts, outs2, ref_results, label + "/second-pass")
            assert engine.stats.prefix_cache_hit_tokens > hits_before, engine.stats
        if scenario in ("one_batch", "max_seqs_3"):
            assert stats.preemptions == 0, f"{label}: unexpected preemptions: {stats}"
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["llama"])
def test_greedy_eos_honoured(ckpt, family, tmp_path):
    """EOS set to the token the reference produces most often; the engine must stop right after
    the first EOS (included in token_ids, finish_reason "stop") and match the reference."""
    path = ckpt(family)
    prompts, max_new = _prompts(path, "one_batch")
    ref_results = R.cached_greedy(path, prompts, max_new)
    counts = Counter(t for r in ref_results for t in set(r.tokens[1:]))
    eos = counts.most_common(1)[0][0]
    eos_path = R.copy_with_eos(path, tmp_path / "eos_ckpt", [eos])
    truncated = []
    for r in ref_results:
        k = r.tokens.index(eos) if eos in r.tokens else None
        truncated.append(R.RefResult(tokens=r.tokens[: k + 1] if k is not None else list(r.tokens),
                                     finish_reason="stop" if k is not None else "length"))
    n_stop = sum(t.finish_reason == "stop" for t in truncated)
    assert n_stop >= 2, f"EOS token {eos} occurs in too few reference outputs ({n_stop})"
    from batchgen import SamplingParams

    engine = R.make_engine(eos_path, max_num_seqs=8, max_batch_tokens=256, kv_cache_tokens=16384)
    try:
        assert eos in engine.eos_token_ids, engine.eos_token_ids
        outs = engine.generate(prompts, [SamplingParams(max_new_tokens=m) for m in max_new])
        got = [list(o.outputs[0].token_ids) for o in outs]
        failures, _ = R.compare_greedy(R.get_reference(path), prompts, got, truncated)
        assert not failures, R.format_failures(failures, f"{family}/eos={eos}")
        for i, (o, t) in enumerate(zip(outs, truncated)):
            if o.outputs[0].token_ids == t.tokens:
                assert o.outputs[0].finish_reason == t.finish_reason, (i, o.outputs[0], t.finish_reason)
    finally:
        engine.close()

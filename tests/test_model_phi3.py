"""Phi-3 / Phi-3.5 / Phi-4-mini on the engine: greedy tokens equal a plain transformers greedy loop.

Tiny random-weight Phi3ForCausalLM checkpoints (tests/checkpoints.py "phi3") in variants: plain, partial
rotary 0.75, longrope (short and long factor sets), tied embeddings, and Phi-4-mini's combination of all
three, and a sliding window. Longrope prompts fit the original window (160) and generation crosses it, so both factor sets are
used (see models/rope.py _longrope_table for the one case that differs from transformers: prompts longer
than the window). Plus the rope scalings against transformers' ROPE_INIT_FUNCTIONS.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ORIG = 160  # original_max_position_embeddings of the longrope variants (max_position_embeddings 1024)
_SHORT = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5]
_LONG = [1.5, 2.5, 4.0, 6.0, 9.0, 14.0, 20.0, 30.0]


def _longrope(n: int) -> dict:
    return {"rope_type": "longrope", "short_factor": _SHORT[:n], "long_factor": _LONG[:n]}


VARIANTS = {
    "phi3": {},
    "phi3-partial": dict(partial_rotary_factor=0.75),  # head_dim 16: 12 dims rotate, 4 pass
    "phi3-longrope": dict(original_max_position_embeddings=ORIG, rope_parameters=_longrope(8)),
    "phi3-tied": dict(tie_word_embeddings=True),
    # Phi-3-mini-4k ships a sliding_window (2047) and transformers' Phi3 masks with it: a short one here
    "phi3-sw48": dict(sliding_window=48),
    "phi4-mini": dict(partial_rotary_factor=0.75, tie_word_embeddings=True,
                      original_max_position_embeddings=ORIG, rope_parameters=_longrope(6)),
}
SCENARIOS = R.FAMILY_SCENARIOS
FULL = ("phi3", "phi4-mini")  # every scenario; the other variants: one batch and chunked prefill
N_PROMPTS = 24


def _cases():
    for var in VARIANTS:
        for sc in SCENARIOS:
            if var in FULL or sc in ("one_batch", "chunked_prefill"):
                yield pytest.param(var, sc, id=f"{var}-{sc}")


def _prompts(path: str, variant: str, scenario: str) -> tuple[list[list[int]], list[int]]:
    longrope = "rope_parameters" in VARIANTS[variant]
    if scenario == "prefix_cache":
        prompts = R.shared_prefix_prompts_for(path, N_PROMPTS, prefix_len=100, max_suffix=50 if longrope else 80)
    else:
        prompts = R.random_prompts_for(path, N_PROMPTS, max_len=ORIG if longrope else 300)
    max_new = R.random_max_new(len(prompts))
    if longrope:
        # every prompt fits the original window; most generations cross it (the long factors)
        assert max(map(len, prompts)) <= ORIG and sum(len(p) + m > ORIG for p, m in zip(prompts, max_new)) >= 3
    return prompts, max_new


@pytest.mark.parametrize("variant,scenario", list(_cases()))
def test_phi3_greedy_matches_transformers(tiny_checkpoint, variant, scenario):
    path = str(tiny_checkpoint("phi3", **VARIANTS[variant]))
    prompts, max_new = _prompts(path, variant, scenario)

    def check_model(engine) -> None:
        assert engine.model.cfg.model_type == "phi3"

    R.check_family_scenario(path, prompts, max_new, scenario, f"{variant}/{scenario}", check_model)


def test_longrope_prompt_beyond_the_original_window_is_the_requests_error(tiny_checkpoint):
    """A prompt longer than original_max_position_embeddings would take the long factors at every
    position (per sequence, as the model does); the engine's one table can't, so such a request is
    its own error, never different tokens. Prompts within the window run (and may generate past it)."""
    from batchgen import SamplingParams

    path = str(tiny_checkpoint("phi3", **VARIANTS["phi3-longrope"]))
    eng = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=4096)
    try:
        ok, long = eng.generate([[5] * ORIG, [6] * (ORIG + 1)], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert ok.outputs[0].error is None and len(ok.outputs[0].token_ids) == 4
        assert long.outputs[0].finish_reason == "error"
        assert f"longer than the model's original_max_position_embeddings ({ORIG})" in long.outputs[0].error
    finally:
        eng.close()


def test_phi3_config_reads_partial_rotary_and_longrope(tiny_checkpoint):
    from batchgen.engine.loader import read_config

    _, cfg = read_config(tiny_checkpoint("phi3", **VARIANTS["phi4-mini"]))
    assert (cfg.model_type, cfg.head_dim, cfg.rotary_dim, cfg.tie_word_embeddings) == ("phi3", 16, 12, True)
    s = cfg.rope_scaling
    assert s["rope_type"] == "longrope" and s["original_max_position_embeddings"] == ORIG
    assert s["factor"] == pytest.approx(1024 / ORIG)


def test_phi3_legacy_su_rope_type_is_longrope():
    from batchgen.engine.models.config import ModelConfig

    d = dict(model_type="phi3", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
             num_attention_heads=4, max_position_embeddings=1024, original_max_position_embeddings=64,
             rope_theta=10000.0, rope_scaling={"type": "su", "short_factor": _SHORT, "long_factor": _LONG})
    assert ModelConfig.from_hf(d).rope_scaling["rope_type"] == "longrope"


def test_longrope_factor_count_mismatch_is_one_clear_line():
    from batchgen.engine.models.rope import cos_sin_table

    s = {"rope_type": "longrope", "original_max_position_embeddings": 64, "factor": 16.0,
         "short_factor": _SHORT, "long_factor": _LONG[:7]}
    with pytest.raises(ValueError, match="long_factor needs 8 values"):
        cos_sin_table(16, 10000.0, s, 1024)


@pytest.mark.parametrize("variant", ["phi3-longrope", "phi4-mini"])
def test_longrope_table_equals_transformers_rotary_embedding(tiny_checkpoint, variant):
    """Rows below the original window: transformers' cos/sin for a short sequence; rows from it on:
    its cos/sin for a sequence past the window (long factors), attention factor included in both."""
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from batchgen.engine.loader import read_config
    from batchgen.engine.models.rope import cos_sin_table

    path = tiny_checkpoint("phi3", **VARIANTS[variant])
    _, cfg = read_config(path)
    table = cos_sin_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
    rot = Phi3RotaryEmbedding(AutoConfig.from_pretrained(path))
    x = torch.zeros(1, 1, dtype=torch.float32)
    half = cfg.rotary_dim // 2
    for n, rows in ((ORIG, slice(0, ORIG)), (400, slice(ORIG, 400))):
        cos, sin = rot(x, torch.arange(n)[None])
        torch.testing.assert_close(table[rows, :half], cos[0, rows, :half], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(table[rows, half:], sin[0, rows, :half], rtol=1e-5, atol=1e-6)
    assert rot.attention_scaling > 1.0


# ------------------------------------------------------------------ rope scalings vs ROPE_INIT_FUNCTIONS

_ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


def _hf_config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=64, hidden_size=128, num_attention_heads=4,
                                num_hidden_layers=1, intermediate_size=256, max_position_embeddings=1024, **kw)


@pytest.mark.parametrize("kind", list(_ROPE_CASES))
def test_rope_scaling_matches_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from batchgen.engine.models.config import ModelConfig
    from batchgen.engine.models.rope import inv_frequencies

    hf = _hf_config("llama", rope_parameters={"rope_theta": 50000.0, **_ROPE_CASES[kind]})
    want, want_scale = ROPE_INIT_FUNCTIONS[kind](hf, None)
    cfg = ModelConfig.from_hf(hf.to_dict())
    got, scale = inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale)
    if kind == "dynamic":  # at the longest length the engine allows, still the default frequencies
        at_max, _ = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=hf.max_position_embeddings)
        torch.testing.assert_close(got, at_max.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_inv_freq_matches_transformers(partial):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from batchgen.engine.models.config import ModelConfig
    from batchgen.engine.models.rope import inv_frequencies, longrope_inv_frequencies

    n = int(32 * partial) // 2
    hf = _hf_config("phi3", original_max_position_embeddings=128, partial_rotary_factor=partial,
                    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                     "short_factor": (_SHORT * 2)[:n], "long_factor": (_LONG * 2)[:n]})
    cfg = ModelConfig.from_hf(hf.to_dict())
    assert cfg.rotary_dim == 2 * n
    for seq_len, long in ((None, False), (129, True)):
        want, want_scale = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=seq_len)
        got, scale = longrope_inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, long=long)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
        assert scale == pytest.approx(want_scale) and scale > 1.0
    short, _ = inv_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    torch.testing.assert_close(short, ROPE_INIT_FUNCTIONS["longrope"](hf, None)[0].float(), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ CUDA: Triton path equals torch backend

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["phi3", "phi3-partial", "phi3-longrope", "phi3-sw48", "phi4-mini"])
def test_phi3_triton_equals_torch_on_cuda(tmp_path_factory, variant):
    path = R.make_tiny_checkpoint("phi3", tmp_path_factory.mktemp("cuda-phi3") / variant, **VARIANTS[variant])
    prompts, max_new = _prompts(path, variant, "one_batch")
    from batchgen import Engine

    # the engine's CUDA defaults (CUDA graphs for decode steps) on the tests' float32
    base = dict(device="cuda", dtype="float32", max_num_seqs=16, max_batch_tokens=512, kv_cache_tokens=16384)
    outs = {}
    for attention in ("torch", "triton"):
        eng = Engine.from_pretrained(path, attention=attention, **base)
        try:
            outs[attention] = [list(o.outputs[0].token_ids) for o in eng.generate(prompts, R.greedy_params(max_new))]
        finally:
            eng.close()
    ref = R.get_reference(path)
    ref_results = R.cached_greedy(path, prompts, max_new)
    for attention, got in outs.items():
        failures, _ = R.compare_greedy(ref, prompts, got, ref_results)
        assert not failures, R.format_failures(failures, f"cuda {variant} {attention}")
    failures, _ = R.compare_greedy(ref, prompts, outs["triton"], [R.RefResult(tokens=t) for t in outs["torch"]])
    assert not failures, R.format_failures(failures, f"cuda {variant}: triton vs torch")

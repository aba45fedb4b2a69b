"""Gemma 2 and Gemma 3 (text) on the engine: greedy tokens equal a plain transformers greedy loop.

Tiny random-weight checkpoints (tests/checkpoints.py "gemma2", "gemma3", "gemma3-mm") in variants: tied
embeddings (as every real Gemma), Gemma 3 1B's shape (one kv head, no rope scaling), configs in transformers
4.x's keys (no layer_types; Gemma 3's rope_theta / rope_local_base_freq / rope_scaling, sliding_window_pattern),
and Gemma3ForConditionalGeneration's multimodal checkpoint (its text model runs). Every prompt set crosses the
48-token sliding window. Plus: Gemma 2's logit soft-cap in the logprobs, the config reading against
transformers' own config classes, the two rope tables, the norm / GeGLU numerics, the refusals, the dry run.
CUDA: each family on the Triton path (CUDA graphs, head_dim 256 too) equals the torch backend.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# variant -> (family, overrides, legacy config.json keys)
VARIANTS = {
    "gemma2": ("gemma2", {}, False),
    "gemma2-tied": ("gemma2", dict(tie_word_embeddings=True), False),
    "gemma2-legacy": ("gemma2", {}, True),
    "gemma3": ("gemma3", {}, False),
    "gemma3-tied": ("gemma3", dict(tie_word_embeddings=True), False),
    "gemma3-1b": ("gemma3", dict(num_key_value_heads=1, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}), False),
    "gemma3-legacy": ("gemma3", {}, True),
    "gemma3-mm": ("gemma3-mm", {}, False),
}
SCENARIOS = R.FAMILY_SCENARIOS
FULL = ("gemma2", "gemma3", "gemma3-mm")  # every scenario; the other variants: one batch and chunked prefill
N_PROMPTS = 24
_LEGACY: dict[str, str] = {}


def _cases():
    for var in VARIANTS:
        for sc in SCENARIOS:
            if var in FULL or sc in ("one_batch", "chunked_prefill"):
                yield pytest.param(var, sc, id=f"{var}-{sc}")


def legacy_config(src: Path, dst: Path) -> str:
    """The checkpoint with its config.json in transformers 4.x's keys: no layer_types (the pattern decides);
    Gemma 3: rope_theta + rope_scaling (global) and rope_local_base_freq, Gemma 2: rope_theta."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("layer_types")
    params = cfg.pop("rope_parameters")
    if cfg["model_type"] == "gemma2":
        cfg["rope_theta"] = params["rope_theta"]
    else:
        full = dict(params["full_attention"])
        cfg["rope_theta"] = full.pop("rope_theta")
        cfg["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
        cfg["rope_scaling"] = full if full.get("rope_type") != "default" else None
        cfg.pop("_sliding_window_pattern", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(dst)


def checkpoint(tiny_checkpoint, tmp_path_factory, variant: str) -> str:
    family, overrides, legacy = VARIANTS[variant]
    path = tiny_checkpoint(family, **overrides)
    if not legacy:
        return str(path)
    if variant not in _LEGACY:
        _LEGACY[variant] = legacy_config(path, tmp_path_factory.mktemp("legacy") / variant)
    return _LEGACY[variant]


def _prompts(path: str, scenario: str) -> tuple[list[list[int]], list[int]]:
    if scenario == "prefix_cache":  # the shared 100-token prefix is longer than the window
        prompts = R.shared_prefix_prompts_for(path, N_PROMPTS, prefix_len=100, max_suffix=80)
    else:
        prompts = R.random_prompts_for(path, N_PROMPTS, max_len=300)
    return prompts, R.random_max_new(len(prompts))


@pytest.mark.parametrize("variant,scenario", list(_cases()))
def test_gemma_greedy_matches_transformers(tiny_checkpoint, tmp_path_factory, variant, scenario):
    path = checkpoint(tiny_checkpoint, tmp_path_factory, variant)
    prompts, max_new = _prompts(path, scenario)

    def check_model(engine) -> None:
        assert engine.model.cfg.gemma is not None and type(engine.model).__name__ == "GemmaModel"

    R.check_family_scenario(path, prompts, max_new, scenario, f"{variant}/{scenario}", check_model)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_gemma_logprobs_match_transformers(tiny_checkpoint, tmp_path_factory, variant):
    """Gemma 2's final soft-cap never moves an argmax: the logprobs show it (and Gemma 3's lack of one)."""
    path = checkpoint(tiny_checkpoint, tmp_path_factory, variant)
    prompts, max_new = _prompts(path, "one_batch")
    prompts, max_new = prompts[:8], max_new[:8]
    ref = R.cached_greedy(path, prompts, max_new)
    engine = R.make_engine(path, **SCENARIOS["one_batch"])
    try:
        outs = engine.generate(prompts, R.greedy_params(max_new, logprobs=True))
    finally:
        engine.close()
    for i, (o, r) in enumerate(zip(outs, ref)):
        c = o.outputs[0]
        for j, (tok, want) in enumerate(zip(r.tokens, r.logprobs)):
            if c.token_ids[j] != tok:
                break  # a near-tie (the greedy test judges it): positions after it are not comparable
            assert abs(c.logprobs[j] - want) < 1e-4, f"prompt #{i} step {j}: {c.logprobs[j]} vs ref {want}"


# ------------------------------------------------------------------ config reading

# google/gemma-3-4b-it's config.json (transformers 4.50): the multimodal wrapper, six keys of text_config
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3", "torch_dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_gemma3_4b_hub_config_reads_transformers_defaults():
    from batchgen.bench import SHAPES
    from batchgen.engine.models.config import ModelConfig

    cfg = ModelConfig.from_hf(GEMMA3_4B)
    assert (cfg.model_type, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == ("gemma3", 2560, 10240, 34)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (8, 4, 256, 262208)
    assert cfg.tie_word_embeddings and cfg.qk_norm and cfg.max_position_embeddings == 131072
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    g = cfg.gemma
    assert (g.family, g.query_pre_attn_scalar, g.attn_softcap, g.final_softcap) == ("gemma3", 256, 0.0, 0.0)
    assert g.local_rope_theta == 10000.0 and g.local_rope_scaling is None
    globals_ = [i for i, w in enumerate(cfg.layer_windows) if w is None]
    assert globals_ == [5, 11, 17, 23, 29] and set(cfg.layer_windows) == {1024, None}
    assert g.local_layers == tuple(w is not None for w in cfg.layer_windows)
    # batchgen bench's gemma-3-4b shape is this model
    assert dataclasses.replace(ModelConfig.from_hf(SHAPES["gemma-3-4b"]), model_type="gemma3",
                               torch_dtype="bfloat16") == cfg


def _hf_dict(model_type: str, **kw) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw).to_dict()


@pytest.mark.parametrize("model_type, kw", [
    ("gemma3_text", dict(num_hidden_layers=8, sliding_window_pattern=4, rope_theta=500000.0,
                         rope_local_base_freq=20000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("gemma3_text", dict(num_hidden_layers=7, rope_scaling=None)),
    ("gemma2", dict(num_hidden_layers=5, rope_theta=20000.0, attn_logit_softcapping=None)),
])
def test_legacy_config_reads_as_transformers_converts_it(model_type, kw):
    """A 4.x-style dict (no layer_types, Gemma 3's three rope keys) gives the ModelConfig of the dict
    transformers' own config class makes of it (layer_types, rope_parameters by layer type)."""
    from batchgen.engine.models.config import ModelConfig

    legacy = {"model_type": model_type, **kw}
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(_hf_dict(model_type, **kw))


def test_gemma2_defaults_and_alternating_windows():
    from batchgen.engine.models.config import ModelConfig

    cfg = ModelConfig.from_hf({"model_type": "gemma2", "num_hidden_layers": 4, "hidden_size": 3584,
                               "num_attention_heads": 16, "num_key_value_heads": 8})
    assert cfg.layer_windows == (4096, None, 4096, None) and cfg.head_dim == 256 and not cfg.qk_norm
    assert (cfg.gemma.attn_softcap, cfg.gemma.final_softcap, cfg.gemma.local_rope_theta) == (50.0, 30.0, None)


@pytest.mark.parametrize("extra, words", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="silu"), "hidden_activation 'silu'"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_gemma_settings_are_one_line(extra, words):
    from batchgen.engine.models.config import ModelConfig, UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf({"model_type": "gemma3_text", **extra})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unsupported_architecture_names_the_gemmas():
    from batchgen.engine.models.config import ModelConfig, UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]})  # Gemma 1: not (yet)
    msg = str(e.value)
    assert "'GemmaForCausalLM'" in msg and "Gemma 2, Gemma 3 (text)" in msg and "\n" not in msg
    assert "gemma2, gemma3_text, gemma3" in msg


def test_rope_tables_equal_transformers_rotary_embedding(tiny_checkpoint):
    """Gemma 3: the global table is rope_theta with linear scaling, the local one rope_local_base_freq."""
    from transformers import AutoConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from batchgen.engine.loader import build_model, read_config

    path = tiny_checkpoint("gemma3")
    _, cfg = read_config(path)
    model = build_model(cfg, torch.device("cpu"), torch.float32, qkv_bias=False)
    rot = Gemma3RotaryEmbedding(AutoConfig.from_pretrained(path))
    half = cfg.rotary_dim // 2
    pos = torch.arange(400)[None]
    for layer_type, table in (("full_attention", model.cos_sin), ("sliding_attention", model.cos_sin_local)):
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos, layer_type)
        torch.testing.assert_close(table[:400, :half], cos[0, :, :half], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(table[:400, half:], sin[0, :, :half], rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.cos_sin, model.cos_sin_local)


def test_engine_keeps_the_rope_rows_its_sequences_reach(tiny_checkpoint):
    """Gemma 3's two tables cut to max_model_len rows (positions beyond are never read), the rows kept as they were;
    greedy tokens still transformers'."""
    from batchgen.engine.loader import build_model, read_config

    path = str(tiny_checkpoint("gemma3"))
    _, cfg = read_config(path)
    full = build_model(cfg, torch.device("cpu"), torch.float32, qkv_bias=False)
    eng = R.make_engine(path, max_model_len=400, max_num_seqs=4, kv_cache_tokens=4096)
    try:
        assert cfg.max_position_embeddings > 400
        for name in ("cos_sin", "cos_sin_local"):
            table = getattr(eng.model, name)
            assert table.shape[0] == 400 and torch.equal(table, getattr(full, name)[:400]), name
        prompts = R.random_prompts_for(path, 3, max_len=300)
        outs = eng.generate(prompts, R.greedy_params([20, 60, 99]))
        failures, _ = R.compare_greedy(R.get_reference(path), prompts, [o.outputs[0].token_ids for o in outs],
                                       R.cached_greedy(path, prompts, [20, 60, 99]))
        assert not failures, R.format_failures(failures, "gemma3 max_model_len 400")
    finally:
        eng.close()


# ------------------------------------------------------------------ numerics of the Gemma pieces

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_and_geglu_equal_transformers_bit_for_bit(dtype):
    from transformers.activations import ACT2FN
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    from batchgen.engine import fused_ops
    from batchgen.engine.models.gemma import GemmaModel  # noqa: F401 - the module under test imports

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 96, generator=g) * 3).to(dtype)
    r = torch.randn(7, 96, generator=g).to(dtype)
    hf = Gemma2RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(96, generator=g))
    w = hf.weight.detach().to(dtype)
    hf = hf.to(dtype)
    assert torch.equal(fused_ops.rms_norm(x, w, 1e-6, offset=True, force="torch"), hf(x))
    out, res = fused_ops.rms_norm(x, w, 1e-6, r, offset=True, force="torch")
    assert torch.equal(res, r + x) and torch.equal(out, hf(r + x))
    gu = (torch.randn(5, 2 * 48, generator=g) * 2).to(dtype)
    want = ACT2FN["gelu_pytorch_tanh"](gu[:, :48]) * gu[:, 48:]
    assert torch.equal(fused_ops.gelu_tanh_and_mul(gu, force="torch"), want)


def test_embedding_scale_is_rounded_to_the_model_dtype(tiny_checkpoint):
    from batchgen.engine.loader import load_model

    model, _ = load_model(tiny_checkpoint("gemma2"), torch.device("cpu"), "float32")
    assert model._embed_scale(torch.float32) == 8.0
    model.cfg = type(model.cfg)(**{**vars(model.cfg), "hidden_size": 3072})
    assert model._embed_scale(torch.bfloat16) == 55.5  # transformers' note: sqrt(3072) = 55.4256 -> 55.5


def test_torch_backend_softcap_equals_a_plain_loop():
    """The torch backend's soft-capped path (the Triton kernels' reference) against scores written out."""
    from test_kernels_cuda import make_case

    from batchgen.engine.attention.torch_backend import TorchAttention

    case = make_case([(1, 1), (40, 40), (70, 9)], 4, 2, 16, 16, torch.float32, "cpu")
    meta, be = case["meta"], TorchAttention()
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    be.write_kv(case["k"], case["v"], kc, vc, meta)
    out = be.attend(case["q"], kc, vc, meta, 0.3, window=20, softcap=2.0)
    flat_k, flat_v = kc.view(-1, 2, 16), vc.view(-1, 2, 16)
    qsl, bt = meta.query_start_loc.tolist(), meta.block_tables
    for b, seq_len in enumerate(meta.seq_lens.tolist()):
        slots = torch.tensor([int(bt[b, p // 16]) * 16 + p % 16 for p in range(seq_len)])
        for i, t in enumerate(range(qsl[b], qsl[b + 1])):
            pos = seq_len - (qsl[b + 1] - qsl[b]) + i
            keys = torch.arange(max(0, pos - 19), pos + 1)
            for h in range(4):
                s = torch.tanh(flat_k[slots[keys], h // 2] @ case["q"][t, h] * 0.3 / 2.0) * 2.0
                want = torch.softmax(s, 0) @ flat_v[slots[keys], h // 2]
                torch.testing.assert_close(out[t, h], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ refusals and the dry run

def test_backend_without_softcap_refuses_gemma2_in_one_line(tiny_checkpoint, monkeypatch):
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.validation import EngineArgumentError

    path = tiny_checkpoint("gemma2")
    monkeypatch.setattr(TorchAttention, "logit_softcap", False)
    with pytest.raises(EngineArgumentError) as e:
        R.make_engine(path, max_num_seqs=2, kv_cache_tokens=256)
    msg = str(e.value)
    assert "can't soft-cap attention logits" in msg and "attn_logit_softcapping is 5" in msg and "\n" not in msg
    eng = R.make_engine(tiny_checkpoint("gemma3"), max_num_seqs=2, kv_cache_tokens=256)  # no soft-cap: runs
    eng.close()


@pytest.mark.parametrize("family, expect", [
    ("gemma2", "model: gemma decoder (model_type gemma2, Gemma2ForCausalLM, sliding window 48 on 1/2 layers, "
               "attention scale 24^-0.5, attention soft-cap 5, logit soft-cap 8), attention torch on cpu, "
               "dtype float32"),
    ("gemma3-mm", "model: gemma decoder (the text model) (model_type gemma3, Gemma3ForConditionalGeneration, "
                  "sliding window 48 on 2/3 layers, q/k norm, attention scale 32^-0.5, local rope theta 10000), "
                  "attention torch on cpu, dtype float32"),
])
def test_dry_run_names_the_gemma_decoder(tiny_checkpoint, tmp_path, family, expect):
    from test_run_dry_run import dry_run, model_line, without_weights

    without_weights(tiny_checkpoint(family), tmp_path / "model")
    assert model_line(dry_run(tmp_path, "model")) == expect


# ------------------------------------------------------------------ CUDA: Triton path equals torch backend

# head_dim 256 (every real Gemma but Gemma 2 27B): the Triton kernels' large-head tiles
CUDA_VARIANTS = {
    "gemma2": ("gemma2", {}), "gemma3": ("gemma3", {}), "gemma3-mm": ("gemma3-mm", {}),
    "gemma2-hd256": ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256)),
    "gemma3-hd256": ("gemma3", dict(head_dim=256, query_pre_attn_scalar=256, num_key_value_heads=1)),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", list(CUDA_VARIANTS))
def test_gemma_triton_equals_torch_on_cuda(tmp_path_factory, variant):
    from batchgen import Engine

    family, overrides = CUDA_VARIANTS[variant]
    path = R.make_tiny_checkpoint(family, tmp_path_factory.mktemp("cuda-gemma") / variant, **overrides)
    prompts, max_new = _prompts(path, "one_batch")
    # the engine's CUDA defaults (CUDA graphs for decode steps) on the tests' float32
    base = dict(device="cuda", dtype="float32", max_num_seqs=16, max_batch_tokens=512, kv_cache_tokens=16384)
    outs = {}
    for attention in ("torch", "triton"):
        eng = Engine.from_pretrained(path, attention=attention, **base)
        try:
            assert attention != "triton" or eng.cuda_graphs
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


def test_bench_runs_a_gemma_shape(monkeypatch):
    """`batchgen bench --shape gemma-3-4b`'s path (build_model, init_random, Engine(model=...)) on a tiny
    Gemma 3 shape of the same kind on the CPU."""
    import random

    from batchgen import bench

    tiny = dict(bench.SHAPES["gemma-3-4b"], hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=2048, sliding_window=16,
                query_pre_attn_scalar=32)
    monkeypatch.setitem(bench.SHAPES, "tiny-gemma", tiny)

    def small(name: str):
        rng = random.Random(0)
        return [[rng.randrange(3, 2000) for _ in range(rng.randint(5, 40))] for _ in range(6)], [30] * 6

    monkeypatch.setattr(bench, "workload", small)
    rec = bench.run_batchgen("seed", "tiny-gemma", False, False, "torch", 4, 256)
    assert rec["output_tokens"] == 180 and rec["shape"] == "tiny-gemma"

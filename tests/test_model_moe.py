"""Mixture-of-experts models on the engine (Qwen3-MoE, Mixtral): greedy tokens equal a plain transformers
greedy loop, prompt by prompt, in every scenario the other families pass (one batch, max_num_seqs=3, chunked
prefill, forced preemption, prefix caching).

Tiny random-weight checkpoints (tests/checkpoints.py "qwen3_moe": top-3 of 8 experts, renormalised, q/k norm;
"mixtral": top-2 of 6) in variants: Qwen3-MoE without renormalisation and with dense layers
(mlp_only_layers, decoder_sparse_step), Mixtral with a sliding window. Plus the MoE block itself against
transformers' (float32 and bfloat16, experts that get no token), its three implementations against each
other, the loader (per-expert and stacked checkpoints), FP8 on an MoE model, and the config.
The Triton kernels: tests/test_fused_moe.py.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "qwen3_moe": ("qwen3_moe", {}),
    # no renormalisation, layer 1 dense (mlp_only_layers)
    "qwen3_moe-mixed": ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False)),
    # every second layer sparse (decoder_sparse_step 2: layers 1 and 3)
    "qwen3_moe-step2": ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2)),
    "mixtral": ("mixtral", {}),
    "mixtral-sw48": ("mixtral", dict(sliding_window=48)),
}
SCENARIOS = R.FAMILY_SCENARIOS
FULL = ("qwen3_moe", "mixtral")  # every scenario; the other variants: one batch and chunked prefill
N_PROMPTS = 24


def _cases():
    for var in VARIANTS:
        for sc in SCENARIOS:
            if var in FULL or sc in ("one_batch", "chunked_prefill"):
                yield pytest.param(var, sc, id=f"{var}-{sc}")


def _checkpoint(tiny_checkpoint, variant: str) -> str:
    family, overrides = VARIANTS[variant]
    return str(tiny_checkpoint(family, **overrides))


@pytest.mark.parametrize("variant,scenario", list(_cases()))
def test_moe_greedy_matches_transformers(tiny_checkpoint, variant, scenario):
    path = _checkpoint(tiny_checkpoint, variant)
    if scenario == "prefix_cache":
        prompts = R.shared_prefix_prompts_for(path, N_PROMPTS, prefix_len=100, max_suffix=80)
    else:
        prompts = R.random_prompts_for(path, N_PROMPTS, max_len=300)
    max_new = R.random_max_new(len(prompts))

    def check_model(engine) -> None:
        assert engine.model.cfg.moe is not None

    R.check_family_scenario(path, prompts, max_new, scenario, f"{variant}/{scenario}", check_model)


# ------------------------------------------------------------------ the MoE block against transformers'

def _hf_block(family: str, dtype: torch.dtype, **kw):
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    base = dict(vocab_size=64, hidden_size=64, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2)
    if family == "mixtral":
        cfg = AutoConfig.for_model("mixtral", num_local_experts=6, num_experts_per_tok=2, **base, **kw)
        block = MixtralSparseMoeBlock(cfg)
    else:
        cfg = AutoConfig.for_model("qwen3_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                                   **base, **kw)
        block = Qwen3MoeSparseMoeBlock(cfg)
    cfg._experts_implementation = "eager"  # the per-expert loop, not grouped_mm: the same sum order as ours
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return cfg, block.to(dtype).eval()


def _our_block(cfg, hf_block, dtype: torch.dtype):
    from batchgen.engine.models.config import ModelConfig
    from batchgen.engine.models.moe import SparseMoeBlock

    ours = SparseMoeBlock(ModelConfig.from_hf(cfg.to_dict())).to(dtype)
    with torch.no_grad():
        ours.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.gate_up_proj.copy_(hf_block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(hf_block.experts.down_proj)
    return ours


@pytest.mark.parametrize("family,kw", [("qwen3_moe", dict(norm_topk_prob=True)), ("qwen3_moe", {}),
                                       ("mixtral", {})], ids=["qwen3_moe-norm", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", "dense"])
def test_moe_block_equals_transformers(family, kw, dtype, impl):
    cfg, hf = _hf_block(family, dtype, **kw)
    ours = _our_block(cfg, hf, dtype)
    ours.impl = impl
    x = torch.randn(37, 64).to(dtype)
    with torch.no_grad():
        want = hf(x[None])[0] if family == "qwen3_moe" else hf(x[None])[0]
        got = ours(x)
    if isinstance(want, tuple):
        want = want[0]
    want = want.reshape(got.shape)
    if impl == "torch":  # the same operations in the same order: equal to the bit
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:  # the dense sum adds zeros and the experts in another order
        torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))


def test_experts_without_tokens_and_the_three_paths_agree():
    from batchgen.engine.models.moe import experts_dense, experts_torch

    torch.manual_seed(1)
    E, H, I, T, K = 8, 32, 16, 9, 2
    x, w1, w2 = torch.randn(T, H), torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    ids = torch.randint(0, 3, (T, K))  # experts 3..7 get no token
    ids[:, 1] = (ids[:, 0] + 1) % 3
    w = torch.rand(T, K)
    got = experts_torch(x, w1, w2, ids, w)
    want = torch.zeros(T, H)
    for t in range(T):
        for j in range(K):
            e = int(ids[t, j])
            h = w1[e] @ x[t]
            want[t] += w[t, j] * (w2[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts_dense(x, w1, w2, ids, w), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ config, loader, layout, FP8, describe

def test_config_reads_experts_routing_and_sparse_layers():
    from batchgen.engine.models.config import ModelConfig

    base = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4)
    q = ModelConfig.from_hf(dict(base, model_type="qwen3_moe", num_experts=16, num_experts_per_tok=4,
                                 moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2,
                                 mlp_only_layers=[3], sliding_window=4096, use_sliding_window=False))
    m = q.moe
    assert (m.num_experts, m.top_k, m.intermediate_size, m.norm_topk_prob, m.round_weights) == (16, 4, 32, True, True)
    assert m.sparse_layers == (False, True, False, False, False, True) and q.qk_norm
    assert q.layer_windows == (None,) * 6  # use_sliding_window false: no window (as transformers)
    assert m.describe() == "MoE top-4 of 16 experts, renormalised, 2 of 6 layers sparse"
    # transformers >= 5 writes num_local_experts for Qwen3-MoE; Mixtral: every layer, always renormalised
    assert ModelConfig.from_hf(dict(base, model_type="qwen3_moe", num_local_experts=8)).moe.num_experts == 8
    x = ModelConfig.from_hf(dict(base, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2)).moe
    assert (x.num_experts, x.top_k, x.intermediate_size, x.norm_topk_prob, x.round_weights) == (8, 2, 128, True, False)
    assert x.sparse_layers == (True,) * 6
    with pytest.raises(ValueError, match="num_experts_per_tok 9"):
        ModelConfig.from_hf(dict(base, model_type="mixtral", num_local_experts=8, num_experts_per_tok=9))


def test_unsupported_architecture_names_the_moe_families():
    from batchgen.engine.models.config import ModelConfig, UnsupportedModelError

    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]})
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "'Qwen2MoeForCausalLM'" in msg
    assert "Qwen3-MoE and Mixtral" in msg and "qwen3_moe, mixtral" in msg


def _stacked_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with its experts stacked as transformers >= 5 holds them ([E, 2I, H] / [E, H, I])."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault(int(m.group(1)), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for layer, parts in experts.items():
        n = max(e for e, _ in parts) + 1
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_loader_fuses_per_expert_tensors_and_takes_stacked_ones(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from batchgen.engine.loader import load_model

    src = Path(tiny_checkpoint("qwen3_moe"))
    model, _ = load_model(src, torch.device("cpu"), "float32")
    hf = load_file(str(src / "model.safetensors"))
    experts = model.layers[1].mlp.experts
    torch.testing.assert_close(experts.gate_up_proj[5, :48], hf["model.layers.1.mlp.experts.5.gate_proj.weight"])
    torch.testing.assert_close(experts.gate_up_proj[5, 48:], hf["model.layers.1.mlp.experts.5.up_proj.weight"])
    torch.testing.assert_close(experts.down_proj[2], hf["model.layers.1.mlp.experts.2.down_proj.weight"])
    torch.testing.assert_close(model.layers[0].mlp.gate.weight, hf["model.layers.0.mlp.gate.weight"])
    stacked, _ = load_model(_stacked_copy(src, tmp_path / "stacked"), torch.device("cpu"), "float32")
    for (n, a), (_, b) in zip(model.named_parameters(), stacked.named_parameters()):
        assert torch.equal(a, b), n
    # one expert's up_proj missing: refused, naming the stacked weight it belongs to
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    save_file({k: v for k, v in hf.items() if k != "model.layers.0.mlp.experts.7.up_proj.weight"},
              str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights.*layers\.0\.mlp\.experts\.gate_up_proj"):
        load_model(broken, torch.device("cpu"), "float32")


def test_mixtral_names_load(tiny_checkpoint):
    from safetensors.torch import load_file

    from batchgen.engine.loader import load_model

    src = Path(tiny_checkpoint("mixtral"))
    model, _ = load_model(src, torch.device("cpu"), "float32")
    hf = load_file(str(src / "model.safetensors"))
    mlp, pre = model.layers[1].mlp, "model.layers.1.block_sparse_moe"
    torch.testing.assert_close(mlp.gate.weight, hf[f"{pre}.gate.weight"])
    torch.testing.assert_close(mlp.experts.gate_up_proj[3, :128], hf[f"{pre}.experts.3.w1.weight"])
    torch.testing.assert_close(mlp.experts.gate_up_proj[3, 128:], hf[f"{pre}.experts.3.w3.weight"])
    torch.testing.assert_close(mlp.experts.down_proj[3], hf[f"{pre}.experts.3.w2.weight"])


def test_moe_model_takes_the_unfused_decode_layer_path(tiny_checkpoint):
    from batchgen.engine.loader import load_model
    from batchgen.engine.models.linear_layout import fused_decode_rows

    model, _ = load_model(Path(tiny_checkpoint("qwen3_moe")), torch.device("cpu"), "float32")
    assert fused_decode_rows(model) == 0


def test_fp8_on_an_moe_model_quantizes_attention_only(tiny_checkpoint, caplog):
    from batchgen.engine.quant import Fp8Linear

    path = _checkpoint(tiny_checkpoint, "qwen3_moe-mixed")  # layers 0, 2 sparse; layer 1 dense
    with caplog.at_level(logging.INFO, logger="batchgen.engine"):
        eng = R.make_engine(path, quantization="fp8", max_num_seqs=4, kv_cache_tokens=2048)
    try:
        layers = eng.model.layers
        assert all(isinstance(layer.self_attn.qkv_proj, Fp8Linear) for layer in layers)
        assert isinstance(layers[1].mlp.gate_up_proj, Fp8Linear) and isinstance(layers[1].mlp.down_proj, Fp8Linear)
        assert layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
        said = [r.getMessage() for r in caplog.records if "MoE layers' experts" in r.getMessage()]
        assert said == ["fp8: 2 MoE layers' experts and routers stay in float32 (FP8 covers the attention "
                        "projections and dense MLPs: 8 projections)"], said
        assert "the experts of 2 MoE layers in the model dtype" in eng.describe()
        outs = eng.generate([[5, 6, 7, 8], [9] * 30], R.greedy_params([6, 9]))
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 9]
    finally:
        eng.close()


def test_describe_names_the_experts_and_their_implementation(tiny_checkpoint):
    eng = R.make_engine(_checkpoint(tiny_checkpoint, "mixtral"), max_num_seqs=2, kv_cache_tokens=256)
    try:
        assert "mixtral float32, MoE top-2 of 6 experts, renormalised (MoE experts in torch) on cpu" in eng.describe()
    finally:
        eng.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_without_triton_a_cuda_graph_captures_the_dense_path(monkeypatch):
    """CUDA without triton: eager steps take the torch loop, a graph capture the dense path (no host sync)."""
    from batchgen.engine.models import moe

    monkeypatch.setattr(moe, "_HAS_TRITON", False)
    cfg, hf = _hf_block("qwen3_moe", torch.float32, norm_topk_prob=True)
    block = _our_block(cfg, hf, torch.float32).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        eager = block(x)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = block(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
    assert moe.implementation("cuda") == "MoE experts in torch (dense in CUDA graphs)" and eager.shape == x.shape


@pytest.mark.parametrize("variant", ["ct-channel", "fp8-block128"])
def test_fp8_checkpoint_of_an_moe_model_loads_its_experts_dequantized(tiny_checkpoint, tmp_path, variant):
    """Expert weights stored as FP8 (per channel or per block) load as their exact dequantization, like the
    attention projections; the engine then runs (quantization fp8: the attention on the checkpoint's codes)."""
    from test_fp8_checkpoints import write_fp8_checkpoint

    from batchgen.engine.loader import load_model

    d = write_fp8_checkpoint(Path(tiny_checkpoint("qwen3_moe")), tmp_path, variant)
    model, _ = load_model(d / "fp8", torch.device("cpu"), "float32", keep_quantized=True)
    ref, _ = load_model(d / "plain", torch.device("cpu"), "float32")
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    kept = model.fp8_checkpoint.linears
    assert kept and not any(".experts." in name for name in kept)  # experts never become Fp8Linears
    eng = R.make_engine(str(d / "fp8"), quantization="fp8", max_num_seqs=4, kv_cache_tokens=2048)
    try:
        outs = eng.generate([[5, 6, 7, 8], [9] * 30], R.greedy_params([6, 9]))
        assert [len(o.outputs[0].token_ids) for o in outs] == [6, 9]
    finally:
        eng.close()

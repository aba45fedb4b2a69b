"""The FP8 decode GEMM (kernels/fp8_skinny_gemm.py): its float32 recipe (quant.fp8.emulate_skinny) on the
CPU against the quantization written out here, and on a GPU with FP8 tensor cores the Triton kernel, with
every epilogue (bias, residual in place, gated SiLU-and-mul, a K split), against that recipe; Fp8Linear
taking it at decode sizes and _scaled_mm above them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from batchgen.engine.quant import Fp8Linear, fp8
from interpreter import interpreter_test  # tests/ is on the path

CUDA = torch.cuda.is_available()
FP8_GPU = CUDA and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8_gpu = pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores (capability >= 8.9)")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_group_quantization_has_one_scale_per_token_per_128_columns() -> None:
    x = torch.randn(3, 300)
    x[1, 130] = 1000.0  # only row 1's second group gets the large scale
    codes, scale = fp8.quantize_activation_groups(x)
    assert codes.shape == (3, 300) and codes.dtype == torch.float8_e4m3fn and scale.shape == (3, 3)
    for r in range(3):
        for g, (lo, hi) in enumerate(((0, 128), (128, 256), (256, 300))):  # the last group is short
            part = x[r, lo:hi]
            assert scale[r, g] == pytest.approx(float(part.abs().max()) / 448.0, rel=1e-6)
            back = codes[r, lo:hi].float() * scale[r, g]
            assert (back - part).abs().max() <= part.abs().max() * 2 ** -4 + 1e-6  # half an e4m3 ulp


@pytest.mark.parametrize("act_fp8", [False, True])
def test_emulate_skinny_is_the_dequantized_product(act_fp8: bool) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(5, 260), torch.randn(48, 260)
    wq, ws = fp8.quantize_weight(w)
    if act_fp8:
        xq, xs = fp8.quantize_activation_groups(x)
        xd = xq.float() * torch.cat([xs[:, g:g + 1].expand(5, 128) for g in range(3)], dim=1)[:, :260]
    else:
        xd = x
    ref = xd @ (wq.float() * ws[:, None]).t()
    torch.testing.assert_close(fp8.emulate_skinny(x, wq, ws, act_fp8), ref)
    assert rel_err(ref, x @ w.t()) < 0.06  # and both stay near the unquantized product


# ------------------------------------------------------------------ the Triton kernel (CUDA)
def _case(M: int, N: int, K: int, gated: bool, bias: bool, residual: bool, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    Nw = 2 * N if gated else N
    x = torch.randn(M, K, generator=g, device="cuda").bfloat16()
    wq, ws = fp8.quantize_weight(torch.randn(Nw, K, generator=g, device="cuda") * 0.02)
    b = torch.randn(Nw, generator=g, device="cuda").bfloat16() if bias else None
    r = torch.randn(M, N, generator=g, device="cuda").bfloat16() if residual else None
    return x, wq, ws, b, r


def _expected(x, wq, ws, b, r, N: int, gated: bool, act_fp8: bool) -> torch.Tensor:
    y = fp8.emulate_skinny(x, wq, ws, act_fp8)
    if b is not None:
        y = y + b.float()
    if gated:  # gate and up rounded to bf16 first, as HF's MLP computes them
        gate, up = y[:, :N].bfloat16().float(), y[:, N:].bfloat16().float()
        y = nn.functional.silu(gate).bfloat16().float() * up
    return y + r.float() if r is not None else y


@needs_fp8_gpu
@pytest.mark.parametrize("act_fp8", [False, True])
@pytest.mark.parametrize("M", [1, 7, 32, 64, 100, 256])
@pytest.mark.parametrize("N,K,config,gated,bias,residual", [
    (384, 512, None, False, False, False),
    (4096, 4096, None, False, True, False),
    (320, 1000, (64, 128, 1, 4, 3), False, False, True),    # K off the 128 grid, N off the 64 grid
    (512, 4096, (64, 128, 4, 4, 4), False, False, True),   # a K split with the residual in its merge
    (256, 1024, (128, 128, 1, 8, 3), True, False, False),  # gated: gate | up, SiLU-and-mul
    (192, 512, (64, 128, 1, 4, 4), True, True, False),
    (256, 1000, (128, 128, 3, 8, 3), True, True, False),   # gated with a K split: the last split's epilogue
    (6144, 4096, (64, 128, 2, 4, 6), False, False, False),  # the 8B shapes' FP8_TUNED picks: q/k/v
    (4096, 14336, (128, 128, 4, 8, 6), False, False, True),  # down_proj, its residual in the split merge
])
def test_cuda_fp8_skinny_gemm_matches_its_recipe(act_fp8, M, N, K, config, gated, bias, residual) -> None:
    from batchgen.engine.kernels.fp8_skinny_gemm import fp8_skinny_gemm

    x, wq, ws, b, r = _case(M, N, K, gated, bias, residual, seed=M * 7 + N)
    want = _expected(x, wq, ws, b, r, N, gated, act_fp8)
    out = r.clone() if r is not None else None
    y = fp8_skinny_gemm(x, wq, ws, b, gated=gated, residual=out, out=out, act_fp8=act_fp8, config=config)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    if out is not None:
        assert y.data_ptr() == out.data_ptr()  # in place
    assert rel_err(y, want) < 8e-3  # bf16 output rounding and accumulation order only
    again = fp8_skinny_gemm(x, wq, ws, b, gated=gated, residual=r.clone() if r is not None else None,
                            act_fp8=act_fp8, config=config)
    assert torch.equal(again, y)  # deterministic (the split merge order is fixed too)


@needs_fp8_gpu
def test_cuda_fp8_linear_takes_the_decode_kernel_up_to_64_rows() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(1024, 768, bias=True, device="cuda", dtype=torch.bfloat16)
    f = Fp8Linear.from_linear(lin)
    assert f.skinny is not None and f._skinny_max_m == 64
    for m in (1, 64, 65, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        y = f(x)
        if m <= 64:
            want = fp8.emulate_skinny(x, f.weight, f.weight_scale, f._act_fp8) + f.bias.float()
        else:
            want = f._emulated(x).float()
        assert rel_err(y, want) < 8e-3, m
        res = torch.randn(m, 768, device="cuda", dtype=torch.bfloat16)
        assert rel_err(f.add_to(res.clone(), x), res.float() + want) < 8e-3


@needs_fp8_gpu
@pytest.mark.parametrize("M,N", [(1, 4096), (32, 4096), (64, 1000)])
def test_cuda_rms_norm_fp8_is_the_norm_quantized(M: int, N: int) -> None:
    from batchgen.engine import fused_ops
    from batchgen.engine.kernels.fp8_quant import rms_norm_fp8

    g = torch.Generator(device="cuda").manual_seed(N + M)
    x = (torch.randn(M, N, generator=g, device="cuda") * 3).bfloat16()
    w = (torch.rand(N, generator=g, device="cuda") + 0.5).bfloat16()
    rows = rms_norm_fp8(x, w, 1e-5)
    codes, scales = fp8.quantize_activation_groups(fused_ops.rms_norm(x, w, 1e-5))
    assert rows.codes.dtype == torch.float8_e4m3fn and rows.scales.shape == scales.shape
    torch.testing.assert_close(rows.scales, scales, rtol=1e-2, atol=0)  # a rounding flip moves an amax by an ulp
    assert rel_err(rows.dequantize(), fp8.Fp8Rows(codes, scales).dequantize()) < 5e-3


@needs_fp8_gpu
@pytest.mark.parametrize("M", [3, 32])
def test_cuda_gate_up_hands_down_proj_quantized_rows(M: int) -> None:
    """The W8A8 MLP at decode sizes: rms_norm_fp8 -> gated GEMM with out_fp8 -> down GEMM on those rows,
    against the same chain in float32 (fp8.emulate_skinny with the 16-bit roundings in between)."""
    from batchgen.engine import fused_ops
    from batchgen.engine.kernels.fp8_quant import rms_norm_fp8
    from batchgen.engine.kernels.fp8_skinny_gemm import fp8_skinny_gemm

    H, I = 1024, 1536
    x, wq, ws, _, _ = _case(M, I, H, True, False, False, seed=M)
    dq, ds = fp8.quantize_weight(torch.randn(H, I, device="cuda") * 0.02)
    norm_w = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    mid = fp8_skinny_gemm(rms_norm_fp8(x, norm_w, 1e-6), wq, ws, gated=True, out_fp8=True,
                          config=(128, 128, 1, 8, 4))
    assert isinstance(mid, fp8.Fp8Rows) and mid.codes.shape == (M, I) and mid.scales.shape == (M, I // 128)
    res = torch.randn(M, H, device="cuda").bfloat16()
    y = fp8_skinny_gemm(mid, dq, ds, residual=res.clone(), config=(128, 128, 4, 8, 4))
    h = fused_ops.rms_norm(x, norm_w, 1e-6)
    act = _expected(h, wq, ws, None, None, I, True, True).bfloat16()
    want = res.float() + fp8.emulate_skinny(act, dq, ds, True)
    # the epilogue's codes are act's own (a bf16 rounding flip in the GEMM moves a code by one e4m3 step, 6-12%,
    # now and then: 1.4% over the tensor measured on the H200)
    assert rel_err(mid.dequantize(), fp8.Fp8Rows(*fp8.quantize_activation_groups(act)).dequantize()) < 3e-2
    assert rel_err(y - res, want - res.float()) < 2e-2


@needs_fp8_gpu
@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("M,K", [(1, 4096), (300, 14336), (7, 1000)])
def test_cuda_quantize_fp8_gives_the_torch_codes(per_group: bool, M: int, K: int) -> None:
    from batchgen.engine.kernels.fp8_quant import quantize_fp8

    x = (torch.randn(M, K, device="cuda") * 5).bfloat16()
    x[0, :3] = 0.0
    codes, scales = quantize_fp8(x, per_group)
    want_codes, want_scales = fp8.quantize_activation_groups(x) if per_group else fp8.quantize_activation(x)
    assert torch.equal(scales, want_scales) and torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


@needs_fp8_gpu
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("M,I", [(1, 14336), (352, 14336), (9, 300), (3, 20000)])
def test_cuda_act_and_mul_quantize_gives_the_two_kernels_codes(gelu: bool, M: int, I: int) -> None:
    """One kernel for down_proj's input above decode size: bit for bit quantize_fp8(silu_and_mul(x))."""
    from batchgen.engine import fused_ops
    from batchgen.engine.kernels.fp8_quant import act_and_mul_quantize_fp8, quantize_fp8

    x = (torch.randn(M, 2 * I, device="cuda") * 3).bfloat16()
    x[0, :5] = 0.0
    act = fused_ops.gelu_tanh_and_mul(x) if gelu else fused_ops.silu_and_mul(x)
    want_codes, want_scales = quantize_fp8(act, per_group=False)
    codes, scales = act_and_mul_quantize_fp8(x, gelu)
    assert torch.equal(scales, want_scales) and torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))


@needs_fp8_gpu
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("M,N,dtype", [(1, 4096, torch.bfloat16), (4099, 4096, torch.bfloat16),
                                       (97, 1000, torch.bfloat16), (2053, 2304, torch.float16)])
def test_cuda_rms_norm_quantize_gives_the_two_kernels_codes(residual: bool, offset: bool, M: int, N: int,
                                                            dtype: torch.dtype) -> None:
    """The FP8 GEMM's input from the norm's own kernel: bit for bit quantize_fp8(rms_norm(x [+ r])) and the same
    new residual, Llama's rounding and Gemma's (offset); x's rows strided. Thousands of rows: a sum of squares
    added in another order than fused.rms_norm's flips some 16-bit norm output, and so some code."""
    from batchgen.engine import fused_ops
    from batchgen.engine.kernels.fp8_quant import quantize_fp8, rms_norm_quantize_fp8

    g = torch.Generator(device="cuda").manual_seed(M + N + 2 * residual + offset)
    x = (torch.randn(M, N + 8, generator=g, device="cuda") * 3).to(dtype)[:, :N]
    x[0, :5] = 0.0
    r = torch.randn(M, N, generator=g, device="cuda").to(dtype) if residual else None
    w = (torch.randn(N, generator=g, device="cuda") * 0.5 + (0.0 if offset else 1.0)).to(dtype)
    codes, scales, new_r = rms_norm_quantize_fp8(x, w, 1e-5, r, offset)
    out = fused_ops.rms_norm(x, w, 1e-5, r, offset=offset)
    h, want_r = out if residual else (out, None)
    want_codes, want_scales = quantize_fp8(h, per_group=False)
    assert scales.shape == (M, 1) and torch.equal(scales, want_scales)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert (new_r is None) if not residual else torch.equal(new_r, want_r)


def _tiny_layer(family: str):
    """One decoder layer of a small Llama / Gemma 2 shape on the GPU in bf16, random weights, FP8 projections."""
    from batchgen.engine.models.config import ModelConfig
    from batchgen.engine.models.gemma import GemmaDecoderLayer
    from batchgen.engine.models.llama import DecoderLayer

    shape = dict(model_type=family, num_hidden_layers=1, vocab_size=256, num_attention_heads=8, num_key_value_heads=4)
    if family == "llama":
        cfg = ModelConfig.from_hf(dict(shape, hidden_size=2048, intermediate_size=5632))
        layer = DecoderLayer(cfg, qkv_bias=False, window=None)
    else:  # Gemma 2's sandwich norms; hidden 2304 is off the power-of-two grid
        cfg = ModelConfig.from_hf(dict(shape, hidden_size=2304, intermediate_size=4608, head_dim=256))
        layer = GemmaDecoderLayer(cfg, window=None, local=False)
    torch.manual_seed(0)
    layer = layer.to("cuda", torch.bfloat16)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):  # Llama scales by w, Gemma by 1 + w
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if family == "llama" else 0.0))
    attn, mlp = layer.self_attn, layer.mlp
    attn.qkv_proj, attn.o_proj = Fp8Linear.from_linear(attn.qkv_proj), Fp8Linear.from_linear(attn.o_proj)
    mlp.gate_up_proj, mlp.down_proj = Fp8Linear.from_linear(mlp.gate_up_proj), Fp8Linear.from_linear(mlp.down_proj)
    return layer, cfg


def _two_step_layer(layer: nn.Module, x, residual, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer as it ran before Fp8Linear.from_norm: each norm writes 16-bit rows, the projection after it
    quantizes them (Attention.forward, MLP.forward)."""
    h, residual = (layer.input_layernorm(x), x) if residual is None else layer.input_layernorm(x, residual)
    h = layer.self_attn(h, *args)
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma
        h, residual = layer.pre_feedforward_layernorm(layer.post_attention_layernorm(h), residual)
        return layer.post_feedforward_layernorm(layer.mlp(h)), residual
    h, residual = layer.post_attention_layernorm(h, residual)
    return layer.mlp(h), residual


@needs_fp8_gpu
@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("T", [40, 65, 301])
def test_cuda_fp8_layer_with_the_fused_norm_quantize_is_the_two_step_layer(family: str, T: int) -> None:
    """DecoderLayer.forward (and Gemma's) with FP8 projections: above decode size (64 rows) qkv_proj and gate_up_proj
    take their input from the norm's own kernel; the output and residual stream are the two-step path's, bit for bit.
    40 rows: the decode kernel's size, where nothing changes."""
    from torch.profiler import ProfilerActivity, profile

    from batchgen.engine.attention.base import AttentionMetadata
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.models.rope import cos_sin_table

    layer, cfg = _tiny_layer(family)
    dev = torch.device("cuda")
    blocks = -(-T // 16)
    meta = AttentionMetadata(slot_mapping=torch.arange(T, device=dev),
                             query_start_loc=torch.tensor([0, T], dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor([T], dtype=torch.int32, device=dev),
                             block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
                             max_query_len=T, max_seq_len=T, decode_only=False)
    cos_sin = cos_sin_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings).to(dev)

    def step_args():  # a fresh KV cache each run: both write the same K and V into it
        kv = tuple(torch.zeros(blocks, 16, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=torch.bfloat16)
                   for _ in range(2))
        return torch.arange(T, device=dev), cos_sin, kv, meta, TorchAttention()

    x = torch.randn(T, cfg.hidden_size, device=dev).bfloat16()
    r = torch.randn(T, cfg.hidden_size, device=dev).bfloat16()
    with torch.no_grad():
        for residual in (None, r):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out, new_residual = layer(x, residual, *step_args())
                torch.cuda.synchronize()
            want, want_residual = _two_step_layer(layer, x, residual, *step_args())
            assert torch.equal(out, want) and torch.equal(new_residual, want_residual)
            fused = sum("_rms_norm_quantize_kernel" in e.name for e in prof.events())
            assert fused == (2 if T > 64 else 0), fused  # qkv_proj's norm and gate_up_proj's


def test_fp8_from_norm_off_the_gpu_is_the_norm_then_the_projection() -> None:
    """Where the Triton kernels do not run (here: the CPU emulation), from_norm is self(rms_norm(x [+ r])) and that
    norm's new residual (x itself without one), for Llama's norm and Gemma's, above decode size too."""
    from batchgen.engine import fused_ops

    torch.manual_seed(0)
    f = Fp8Linear.from_linear(nn.Linear(256, 96, bias=True))
    x, r = torch.randn(5, 30, 256), torch.randn(5, 30, 256)
    w = torch.rand(256) + 0.5
    for offset in (False, True):
        y, res = f.from_norm(x, w, 1e-5, offset=offset)
        assert res is x and torch.equal(y, f(fused_ops.rms_norm(x, w, 1e-5, offset=offset)))
        y, res = f.from_norm(x, w, 1e-5, r, offset=offset)
        h, want_res = fused_ops.rms_norm(x, w, 1e-5, r, offset=offset)
        assert y.shape == (5, 30, 96) and torch.equal(y, f(h)) and torch.equal(res, want_res)


@needs_fp8_gpu
@pytest.mark.parametrize("gemm_max_m", [None, "128"])
def test_cuda_fp8_down_proj_of_gated_is_the_unfused_mlp(monkeypatch: pytest.MonkeyPatch, gemm_max_m) -> None:
    """Fp8Linear.of_gated (the MLP's down_proj): the same output as down_proj(silu_and_mul(gate_up)) at every
    size, decode rows, the Triton FP8 GEMM and (BATCHGEN_FP8_GEMM_MAX_M=128) _scaled_mm; GeGLU too."""
    from batchgen.engine import fused_ops, switches

    if gemm_max_m:
        monkeypatch.setenv("BATCHGEN_FP8_GEMM_MAX_M", gemm_max_m)
    switches.reload()
    try:
        down = Fp8Linear.from_linear(nn.Linear(1024, 512, bias=False, device="cuda", dtype=torch.bfloat16))
        for m in (16, 100, 300):
            gu = torch.randn(m, 2048, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(down.of_gated(gu), down(fused_ops.silu_and_mul(gu)))
            assert torch.equal(down.of_gated(gu, gelu=True), down(fused_ops.gelu_tanh_and_mul(gu)))
    finally:
        monkeypatch.delenv("BATCHGEN_FP8_GEMM_MAX_M", raising=False)
        switches.reload()


def test_fp8_down_proj_of_gated_off_the_gpu_is_the_unfused_mlp() -> None:
    """Where the Triton kernels do not run (here: the CPU emulation), of_gated is down_proj(act(gate_up))."""
    from batchgen.engine import fused_ops

    torch.manual_seed(0)
    down = Fp8Linear.from_linear(nn.Linear(256, 96, bias=True))
    gu = torch.randn(7, 2, 512)
    assert torch.equal(down.of_gated(gu), down(fused_ops.silu_and_mul(gu)))
    assert torch.equal(down.of_gated(gu, gelu=True), down(fused_ops.gelu_tanh_and_mul(gu)))
    assert down.of_gated(gu).shape == (7, 2, 96)


@needs_fp8_gpu
def test_cuda_fp8_linear_decode_rows_follow_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """BATCHGEN_FP8_DECODE_MAX_M=256: steps up to 256 rows on the decode kernel (x quantized once above 64)."""
    from batchgen.engine import switches

    monkeypatch.setenv("BATCHGEN_FP8_DECODE_MAX_M", "256")
    switches.reload()
    try:
        lin = nn.Linear(1024, 768, bias=False, device="cuda", dtype=torch.bfloat16)
        f = Fp8Linear.from_linear(lin)
        assert f._skinny_max_m == 256
        for m in (65, 256):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            assert rel_err(f(x), fp8.emulate_skinny(x, f.weight, f.weight_scale, True)) < 8e-3
    finally:
        monkeypatch.delenv("BATCHGEN_FP8_DECODE_MAX_M")
        switches.reload()


@needs_fp8_gpu
@pytest.mark.parametrize("M", [65, 128, 300, 1000])
@pytest.mark.parametrize("N,K,config,bias,residual", [
    (6144, 4096, None, False, False),
    (4096, 14336, None, False, True),                     # down_proj: the residual added in place
    (1000, 1000, (64, 128, 128, 8, 4, 3), True, False),  # K and N off the tile grid, a bias
    (768, 512, (128, 256, 128, 8, 8, 3), False, True),
])
def test_cuda_fp8_gemm_matches_the_emulation(M, N, K, config, bias, residual) -> None:
    """kernels/fp8_gemm.py (steps above decode size): x quantized per token, one dot in fp32, both scales in
    the epilogue: torch._scaled_mm's numerics, which Fp8Linear emulates in float32."""
    from batchgen.engine.kernels.fp8_gemm import fp8_gemm
    from batchgen.engine.kernels.fp8_quant import quantize_fp8

    x, wq, ws, b, r = _case(M, N, K, False, bias, residual, seed=M + N)
    xq, xs = quantize_fp8(x, per_group=False)
    want = fp8.dequantize(xq, xs) @ fp8.dequantize(wq, ws).t() + (b.float() if b is not None else 0)
    if r is not None:
        want = want.bfloat16().float() + r.float()
    out = r.clone() if r is not None else None
    y = fp8_gemm(xq, xs, wq, ws, b, residual=out, out=out, config=config)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16 and (out is None or y.data_ptr() == out.data_ptr())
    assert rel_err(y, want) < 8e-3
    if K % 16 == 0 and N % 16 == 0:  # the shapes _scaled_mm takes
        ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)
        assert rel_err(fp8_gemm(xq, xs, wq, ws, config=config), ref) < 8e-3  # and _scaled_mm's result


@pytest.mark.parametrize("M,N,K,tiles", [
    (128, 6144, 4096, (64, 128)), (128, 28672, 4096, (128, 256)), (256, 6144, 4096, (128, 128)),
    (352, 6144, 4096, (128, 256)), (352, 28672, 4096, (128, 256)), (1024, 6144, 4096, (128, 128)),
    (1024, 4096, 14336, (128, 256)), (8192, 28672, 4096, (128, 256)),
])
def test_fp8_gemm_tiles_are_the_fewest_waves_the_sweep_measured_fastest(M, N, K, tiles) -> None:
    """kernels/fp8_gemm.default_config against the H200 sweep's fastest tiles for the 8B shape's projections
    (benchmarks/results/2026-12-04-h200-fp8-stream-k.jsonl): e.g. qkv_proj at 256 rows 14.3 us on 128 x 128
    against 23.2 on the 128 x 256 the row-count rule took before."""
    pytest.importorskip("triton")
    from batchgen.engine.kernels.fp8_gemm import default_config

    bm, bn, bk, _, warps, stages = default_config(M, N, K, sm_count=132)
    assert (bm, bn) == tiles and bk == 128 and warps == (4 if bm == 64 else 8)
    assert stages == (5 if bn == 128 else 4 if M <= 512 else 3)
    assert default_config(M, N, K, sm_count=78)[:2] in ((64, 128), (128, 128), (128, 256))  # any GPU: a kernel config


# ------------------------------------------------------------------ the kernels in Triton's CPU interpreter
def interpreter_suite() -> None:
    """The FP8 kernels' logic on the CPU (float32 and bf16 inputs; the interpreter's fp8 and bf16 roundings
    patched to torch's, as the GPU rounds): every X_MODE, the epilogues, a K split, the quantize kernels."""
    from test_kernels_cuda import _patch_interpreter
    from test_kv_fp8_kernels import _patch_fp8_interpreter

    from batchgen.engine.kernels.fp8_gemm import fp8_gemm
    from batchgen.engine.kernels.fp8_quant import (act_and_mul_quantize_fp8, quantize_fp8, rms_norm_fp8,
                                                   rms_norm_quantize_fp8)
    from batchgen.engine.kernels.fp8_skinny_gemm import fp8_skinny_gemm

    _patch_interpreter()
    _patch_fp8_interpreter()
    torch.manual_seed(0)
    errs = []
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 300, dtype=dt)
        codes, scales = quantize_fp8(x, per_group=True)
        want = fp8.quantize_activation_groups(x)
        assert torch.equal(scales, want[1]) and torch.equal(codes.view(torch.uint8), want[0].view(torch.uint8))
        codes, scales = quantize_fp8(x, per_group=False)
        assert torch.equal(scales, fp8.quantize_activation(x)[1])
        from batchgen.engine import fused_ops

        gu = torch.randn(5, 2 * 300, dtype=dt) * 3
        for gelu in (False, True):
            act = fused_ops.gelu_tanh_and_mul(gu) if gelu else fused_ops.silu_and_mul(gu)
            want = quantize_fp8(act, per_group=False)
            got = act_and_mul_quantize_fp8(gu, gelu)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
        for n in (4096, 1000):  # the norm's own quantize: quantize_fp8(rms_norm(x [+ r])) bit for bit, 37 rows
            xn, rn = torch.randn(37, n, dtype=dt) * 3, torch.randn(37, n, dtype=dt)
            wn = torch.randn(n, dtype=dt) * 0.5 + 1.0
            for res in (None, rn):
                for offset in (False, True):
                    codes, scales, new_r = rms_norm_quantize_fp8(xn, wn, 1e-5, res, offset)
                    out = fused_ops.rms_norm(xn, wn, 1e-5, res, offset=offset)
                    h, want_r = out if res is not None else (out, None)
                    want = quantize_fp8(h, per_group=False)
                    assert torch.equal(scales, want[1]) and torch.equal(codes.view(torch.uint8),
                                                                        want[0].view(torch.uint8))
                    assert (new_r is None) if res is None else torch.equal(new_r, want_r)
        wq, ws = fp8.quantize_weight(torch.randn(96, 300))
        for act in (False, True):
            for split, res in ((1, False), (2, True)):
                r = torch.randn(5, 96, dtype=dt) if res else None
                y = fp8_skinny_gemm(x, wq, ws, residual=r, act_fp8=act, dtype=dt, config=(64, 128, split, 4, 2))
                want_y = fp8.emulate_skinny(x, wq, ws, act) + (r.float() if res else 0)
                errs.append(((y.float() - want_y).norm() / want_y.norm()).item())
        rows = fp8.Fp8Rows(*fp8.quantize_activation_groups(x))
        gq, gs = fp8.quantize_weight(torch.randn(2 * 128, 300))
        mid = fp8_skinny_gemm(rows, gq, gs, gated=True, out_fp8=True, dtype=dt, config=(128, 128, 1, 4, 2))
        pre = fp8.emulate_skinny(rows, gq, gs, True)
        act_out = (nn.functional.silu(pre[:, :128].to(dt).float()).to(dt).float() * pre[:, 128:].to(dt).float()).to(dt)
        act_q = fp8.Fp8Rows(*fp8.quantize_activation_groups(act_out)).dequantize()  # the codes of act_out
        errs.append(((mid.dequantize() - act_q).norm() / act_q.norm()).item())
        # the same with K split 3 ways (300 columns: 128 + 128 + 44): the last split sums gate and up, then runs
        # SiLU-and-mul and the quantize; and gated with a bias into 16-bit rows
        mid3 = fp8_skinny_gemm(rows, gq, gs, gated=True, out_fp8=True, dtype=dt, config=(128, 128, 3, 4, 2))
        errs.append(((mid3.dequantize() - act_q).norm() / act_q.norm()).item())
        gb = torch.randn(2 * 128, dtype=dt)
        y3 = fp8_skinny_gemm(rows, gq, gs, gb, gated=True, dtype=dt, config=(64, 128, 2, 4, 2))
        pre_b = pre + gb.float()
        want3 = nn.functional.silu(pre_b[:, :128].to(dt).float()).to(dt).float() * pre_b[:, 128:].to(dt).float()
        errs.append(((y3.float() - want3).norm() / want3.norm()).item())
        norm_w = torch.rand(300, dtype=dt) + 0.5
        from batchgen.engine import fused_ops

        q = rms_norm_fp8(x, norm_w, 1e-5)
        want = fp8.quantize_activation_groups(fused_ops.rms_norm(x, norm_w, 1e-5))
        errs.append(((q.dequantize() - fp8.Fp8Rows(*want).dequantize()).norm() / want[0].float().norm()).item())
        # kernels/fp8_gemm.py: rows and columns past the tiles, K off the 128 grid, bias and residual epilogues
        xb = torch.randn(70, 300, dtype=dt)
        xq, xs = quantize_fp8(xb, per_group=False)
        bias = torch.randn(96, dtype=dt)
        r = torch.randn(70, 96, dtype=dt)
        prod = fp8.dequantize(xq, xs) @ fp8.dequantize(wq, ws).t()
        y = fp8_gemm(xq, xs, wq, ws, bias, dtype=dt, config=(32, 64, 128, 2, 4, 2))
        errs.append(((y.float() - (prod + bias.float())).norm() / prod.norm()).item())
        y = fp8_gemm(xq, xs, wq, ws, residual=r.clone(), dtype=dt, config=(64, 32, 128, 1, 4, 2))
        want_y = prod.to(dt).float() + r.float()
        errs.append(((y.float() - want_y).norm() / want_y.norm()).item())
    assert max(errs) < 2e-2, errs
    print("fp8 decode interpreter suite ok", " ".join(f"{e:.1e}" for e in errs))


@pytest.mark.slow
@interpreter_test
def test_fp8_decode_kernels_triton_interpreter_cpu() -> None:
    from interpreter import run_interpreter_suite

    run_interpreter_suite(__file__, "fp8 decode interpreter suite ok")


if __name__ == "__main__" and "--interpret" in sys.argv:
    interpreter_suite()

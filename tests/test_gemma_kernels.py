"""The Triton pieces Gemma needs, against the torch reference: soft-capped attention scores (paged decode, split
or not, and varlen prefill; windowed too), head_dim 256 tiles, the (1 + w) RMSNorm and GeGLU kernels, and a
whole tiny Gemma 2 / Gemma 3 forward (prefill, mixed, decode steps) on TritonAttention with the fused Triton
ops equal to the same steps on TorchAttention with plain torch ops.

CUDA tests run with a GPU and triton. The CPU test runs the same checks, float32 and small, in a subprocess
under the Triton interpreter (TRITON_INTERPRET=1); it is skipped without triton (as in CI).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_cuda import TOL, _head_major, _patch_interpreter, _rel, make_case  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
from interpreter import interpreter_test  # noqa: E402  (tests/ is on the path)
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


def check_softcap_attention(seqs, heads, kv_heads, head_dim, block_size, dtype, device, softcap, window=None,
                            num_splits=None, force_prefill_kernel=False, head_major=False, seed=0) -> float:
    """paged_decode / paged_prefill with softcap == TorchAttention (float32 copies) with it."""
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.attention.triton_kernels import cache_ops, decode, prefill

    case = make_case(seqs, heads, kv_heads, head_dim, block_size, dtype, device, seed)
    meta = case["meta"]
    scale = 3 * head_dim ** -0.5  # scores of a few units (std 3): tanh bends them
    rk, rv = case["k_cache"].float(), case["v_cache"].float()
    ref_be = TorchAttention()
    ref_be.write_kv(case["k"].float(), case["v"].float(), rk, rv, meta)
    ref = ref_be.attend(case["q"].float(), rk, rv, meta, scale, window, softcap=softcap).cpu()
    plain = ref_be.attend(case["q"].float(), rk, rv, meta, scale, window).cpu()
    assert _rel(plain, ref) > 20 * TOL[dtype], "the soft-cap does not change these scores: a vacuous case"
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    if head_major:
        kc, vc = _head_major(kc), _head_major(vc)
    cache_ops.write_kv(case["k"], case["v"], kc, vc, meta.slot_mapping)
    out = torch.full_like(case["q"], float("nan"))
    if meta.decode_only and not force_prefill_kernel:
        decode.paged_decode(case["q"], kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_seq_len, scale, window=window, out=out, num_splits=num_splits, softcap=softcap)
    else:
        prefill.paged_prefill(case["q"], kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                              window=window, out=out, softcap=softcap)
    err = _rel(out.cpu(), ref)
    assert err < TOL[dtype], f"rel err {err:.3e} seqs={seqs} D={head_dim} {dtype} cap={softcap} w={window}"
    return err


def check_gemma_fused_ops(device, dtype, seed=0) -> None:
    from batchgen.engine import fused_ops as F

    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    tol = TOL[dtype] * 2
    for shape in [(7, 64), (5, 3, 256), (9, 2560)]:
        x = (3 * torch.randn(*shape, generator=g)).to(dtype).to(dev)
        r = torch.randn(*shape, generator=g).to(dtype).to(dev)
        w = torch.randn(shape[-1], generator=g).to(dtype).to(dev)
        out, ref = (F.rms_norm(x, w, 1e-6, offset=True, force=f) for f in ("triton", "torch"))
        assert _rel(out.cpu(), ref.cpu()) < tol
        (o2, nr), (r2, nr2) = (F.rms_norm(x, w, 1e-6, r, offset=True, force=f) for f in ("triton", "torch"))
        assert _rel(o2.cpu(), r2.cpu()) < tol and torch.equal(nr.cpu(), nr2.cpu())
    x = (2 * torch.randn(9, 2 * 384, generator=g)).to(dtype).to(dev)
    out, ref = (F.gelu_tanh_and_mul(x, force=f) for f in ("triton", "torch"))
    assert _rel(out.cpu(), ref.cpu()) < tol


def _step(steps, block_size, max_blocks, device):
    """AttentionMetadata + positions for sequences b = 0.. with (seq_len, q_len); sequence b owns blocks
    [b * max_blocks, (b + 1) * max_blocks)."""
    from batchgen.engine.attention.base import AttentionMetadata

    pos = torch.cat([torch.arange(sl - ql, sl) for sl, ql in steps])
    seq = torch.cat([torch.full((ql,), b) for b, (_, ql) in enumerate(steps)])
    qsl = torch.zeros(len(steps) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor([ql for _, ql in steps]), 0)
    tables = torch.arange(len(steps) * max_blocks, dtype=torch.int32).view(len(steps), max_blocks)
    meta = AttentionMetadata(
        slot_mapping=((seq * max_blocks + pos // block_size) * block_size + pos % block_size).to(device),
        query_start_loc=qsl.to(device), seq_lens=torch.tensor([sl for sl, _ in steps], dtype=torch.int32).to(device),
        block_tables=tables.to(device), max_query_len=max(ql for _, ql in steps),
        max_seq_len=max(sl for sl, _ in steps), decode_only=all(ql == 1 for _, ql in steps))
    return meta, pos.to(device)


_STEPS = [[(60, 60), (70, 70), (5, 5)], [(61, 1), (90, 20), (6, 1)], [(62, 1), (91, 1), (7, 1)]]


def _forward_steps(model, backend, ops: str, device: str) -> torch.Tensor:
    """The logits of every token of _STEPS (prefill, mixed, decode only) on fresh caches, with the fused ops
    of `ops` ("triton" or "torch")."""
    from batchgen.engine import fused_ops

    cfg, dtype = model.cfg, model.embed_tokens.weight.dtype
    bs, max_blocks = 16, 8
    ids = torch.randint(3, cfg.vocab_size, (len(_STEPS), 256), generator=torch.Generator().manual_seed(0))
    caches = [tuple(torch.zeros(3 * max_blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
                    for _ in range(2)) for _ in range(cfg.num_layers)]
    orig, fused_ops._use_triton = fused_ops._use_triton, (lambda t, force: (force or ops) == "triton")
    try:
        out = []
        for i, st in enumerate(_STEPS):
            meta, pos = _step(st, bs, max_blocks, device)
            with torch.no_grad():
                out.append(model.logits(model(ids[i, :pos.numel()].to(device), pos, caches, meta, backend)).cpu())
    finally:
        fused_ops._use_triton = orig
    return torch.cat(out)


def check_gemma_forward(family: str, device: str, dtype=torch.float32, **overrides) -> float:
    """A tiny Gemma's logits with TritonAttention and the Triton fused ops equal those with TorchAttention and
    plain torch ops (float32: within TOL; 16-bit: no further from the float32 torch run than 16-bit torch is)."""
    import tempfile

    from checkpoints import build_checkpoint

    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.attention.triton_backend import TritonAttention
    from batchgen.engine.loader import load_model

    with tempfile.TemporaryDirectory() as d:
        path = build_checkpoint(family, Path(d), **overrides)
        models = {dt: load_model(path, torch.device(device), dt)[0] for dt in {dtype, torch.float32}}
    triton_out = _forward_steps(models[dtype], TritonAttention(), "triton", device)
    torch_out = _forward_steps(models[dtype], TorchAttention(), "torch", device)
    err = _rel(triton_out, torch_out)
    if dtype == torch.float32:
        assert err < TOL[dtype], f"{family} {overrides}: rel err {err:.3e}"
        return err
    ref = _forward_steps(models[torch.float32], TorchAttention(), "torch", device)
    base, got = _rel(torch_out, ref), _rel(triton_out, ref)
    assert got < 1.5 * base + 1e-3, f"{family} {overrides} {dtype}: triton {got:.3e} vs torch {base:.3e} off float32"
    return err


# ----------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_softcap_decode_cuda(dtype, head_dim, num_splits):
    seqs = [(n, 1) for n in (1, 17, 255, 1024, 4097)]
    check_softcap_attention(seqs, 16, 8, head_dim, 16, dtype, "cuda", softcap=5.0, num_splits=num_splits,
                            head_major=True)
    check_softcap_attention(seqs, 8, 4, head_dim, 16, dtype, "cuda", softcap=50.0 / 8, window=1024,
                            num_splits=num_splits, head_major=True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("window", [None, 100])
def test_softcap_prefill_cuda(dtype, head_dim, window):
    seqs = [(1, 1), (37, 37), (300, 120), (1000, 1), (2048, 513)]
    check_softcap_attention(seqs, 8, 4, head_dim, 16, dtype, "cuda", softcap=5.0, window=window, head_major=True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_head_dim_256_without_softcap_cuda(dtype):
    """Gemma 3's shape (no soft-cap): the default tiles of head_dim 256 compile and match (bf16: shared memory)."""
    from test_kernels_cuda import check_attention

    check_attention([(n, 1) for n in (1, 100, 4097)], 8, 4, 256, 16, dtype, "cuda", head_major=True)
    check_attention([(n, 1) for n in (3, 2000)], 8, 4, 256, 16, dtype, "cuda", window=1024, head_major=True)
    check_attention([(37, 37), (300, 120), (2048, 513)], 8, 4, 256, 16, dtype, "cuda", head_major=True)
    check_attention([(300, 120), (2048, 513)], 8, 4, 256, 16, dtype, "cuda", window=100, head_major=True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemma_fused_ops_cuda(dtype):
    check_gemma_fused_ops("cuda", dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family, overrides", [("gemma2", {}), ("gemma3", {}),
                                               ("gemma2", dict(head_dim=256, query_pre_attn_scalar=256)),
                                               ("gemma3", dict(head_dim=256, query_pre_attn_scalar=256))])
def test_gemma_forward_triton_equals_torch_cuda(family, overrides, dtype):
    check_gemma_forward(family, "cuda", dtype, **overrides)


# ----------------------------------------------------------------------------------------- CPU (interpreter)
def interpreter_suite() -> None:
    _patch_interpreter()
    f32 = torch.float32
    errs = [
        check_softcap_attention([(1, 1), (40, 1), (300, 1)], 8, 2, 64, 16, f32, "cpu", softcap=5.0),
        check_softcap_attention([(1, 1), (40, 1), (300, 1)], 8, 2, 64, 16, f32, "cpu", softcap=5.0, num_splits=3,
                                head_major=True),
        check_softcap_attention([(9, 1), (200, 1)], 8, 2, 64, 16, f32, "cpu", softcap=3.0, window=50),
        check_softcap_attention([(37, 37), (150, 70), (90, 1)], 8, 2, 64, 16, f32, "cpu", softcap=5.0),
        check_softcap_attention([(37, 37), (150, 70), (90, 1)], 8, 2, 64, 16, f32, "cpu", softcap=5.0, window=20),
        check_softcap_attention([(40, 1), (300, 1)], 8, 2, 64, 16, f32, "cpu", softcap=5.0,
                                force_prefill_kernel=True),
        # head_dim 256: the decode tile of 16 tokens, the prefill one of 16
        check_softcap_attention([(5, 1), (70, 1)], 4, 2, 256, 16, f32, "cpu", softcap=5.0, num_splits=2),
        check_softcap_attention([(21, 21), (70, 9)], 4, 2, 256, 16, f32, "cpu", softcap=5.0, window=30),
    ]
    check_gemma_fused_ops("cpu", f32)
    errs.append(check_gemma_forward("gemma2", "cpu"))
    errs.append(check_gemma_forward("gemma3", "cpu"))
    errs.append(check_gemma_forward("gemma3", "cpu", head_dim=256, query_pre_attn_scalar=256))
    print("gemma interpreter suite ok", " ".join(f"{e:.1e}" for e in errs))


@pytest.mark.slow
@interpreter_test
def test_gemma_kernels_triton_interpreter_cpu():
    from interpreter import run_interpreter_suite

    run_interpreter_suite(__file__, "gemma interpreter suite ok")


if __name__ == "__main__" and "--interpret" in sys.argv:
    interpreter_suite()

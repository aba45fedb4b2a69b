"""Triton kernels (attention + fused ops) against the torch reference backend / plain torch.

CUDA tests run only with a CUDA device and triton. The CPU test runs a small suite of the same
checks in a subprocess under the Triton interpreter (TRITON_INTERPRET=1); it is skipped when
triton is not installed (as in CI).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
from interpreter import interpreter_test  # noqa: E402  (tests/ is on the path)
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


# ----------------------------------------------------------------------------------------- helpers
def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in output (unwritten or bad)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 1.5e-2}


def make_case(seqs, heads, kv_heads, head_dim, block_size, dtype, device, seed=0, extra_blocks=3,
              max_blocks=None, num_blocks=None):
    """seqs: list of (seq_len, q_len). Returns dict of tensors + metadata (random block placement)."""
    from batchgen.engine.attention.base import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    B = len(seqs)
    nblk = [-(-sl // block_size) for sl, _ in seqs]
    max_blocks = max_blocks or max(nblk) + 2
    total = num_blocks or sum(nblk) + extra_blocks
    perm = torch.randperm(total, generator=g)
    bt = torch.zeros(B, max_blocks, dtype=torch.int32)
    i = 0
    for b, n in enumerate(nblk):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    kc = torch.randn(total, block_size, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(total, block_size, kv_heads, head_dim, generator=g).to(dtype)
    q_lens = [ql for _, ql in seqs]
    T = sum(q_lens)
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    slots = []
    for b, (sl, ql) in enumerate(seqs):
        for p in range(sl - ql, sl):
            slots.append(int(bt[b, p // block_size]) * block_size + p % block_size)
    q = torch.randn(T, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype)
    dev = torch.device(device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        query_start_loc=qsl.to(dev), seq_lens=torch.tensor([sl for sl, _ in seqs], dtype=torch.int32, device=dev),
        block_tables=bt.to(dev), max_query_len=max(q_lens), max_seq_len=max(sl for sl, _ in seqs),
        decode_only=all(ql == 1 for ql in q_lens))
    return dict(q=q.to(dev), k=k.to(dev), v=v.to(dev), k_cache=kc.to(dev), v_cache=vc.to(dev), meta=meta)


def reference_attend(case, scale, window=None):
    """TorchAttention on float32 copies (the project's reference backend), K/V written first."""
    from batchgen.engine.attention.base import AttentionMetadata
    from batchgen.engine.attention.torch_backend import TorchAttention

    m = case["meta"]
    meta = AttentionMetadata(m.slot_mapping, m.query_start_loc, m.seq_lens, m.block_tables,
                             m.max_query_len, m.max_seq_len, m.decode_only)
    kc, vc = case["k_cache"].float(), case["v_cache"].float()  # float32 copies
    be = TorchAttention()
    be.write_kv(case["k"].float(), case["v"].float(), kc, vc, meta)
    return be.attend(case["q"].float(), kc, vc, meta, scale, window).cpu()


def _head_major(c: torch.Tensor) -> torch.Tensor:
    """Same values, stored [num_blocks, kv_heads, block_size, head_dim] (the runner's layout), viewed as
    [num_blocks, block_size, kv_heads, head_dim]."""
    return c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


def check_attention(seqs, heads, kv_heads, head_dim, block_size, dtype, device, window=None, seed=0,
                    num_splits=None, force_prefill_kernel=False, head_major=False,
                    max_seq_len=None, **decode_kw):
    from batchgen.engine.attention.triton_kernels import cache_ops, decode, prefill

    case = make_case(seqs, heads, kv_heads, head_dim, block_size, dtype, device, seed)
    meta = case["meta"]
    scale = head_dim ** -0.5
    ref = reference_attend(case, scale, window)
    if max_seq_len is not None:
        meta.max_seq_len = max_seq_len  # loose host bound (CUDA graphs)
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    if head_major:
        kc, vc = _head_major(kc), _head_major(vc)
    cache_ops.write_kv(case["k"], case["v"], kc, vc, meta.slot_mapping)
    out = torch.full_like(case["q"], float("nan"))  # poisoned: every row must be written
    if meta.decode_only and not force_prefill_kernel:
        decode.paged_decode(case["q"], kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_seq_len, scale, window=window, out=out, num_splits=num_splits, **decode_kw)
        from batchgen.engine.kernels.counters import _BUFFERS

        sem = _BUFFERS.get(("decode", out.device))
        assert sem is None or not sem.any(), "fused-reduce counters not reset"
    else:
        prefill.paged_prefill(case["q"], kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              scale, window=window, out=out)
    err = _rel(out.cpu(), ref)
    assert err < TOL[dtype], f"rel err {err:.3e} seqs={seqs} H={heads}/{kv_heads} bs={block_size} {dtype} w={window}"
    return err


def check_write_kv(T, kv_heads, head_dim, block_size, dtype, device, seed=0):
    from batchgen.engine.attention.triton_kernels import cache_ops

    g = torch.Generator().manual_seed(seed)
    nb = -(-T // block_size) + 4
    kc = torch.full((nb, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    vc = kc.clone()
    slots = torch.randperm(nb * block_size, generator=g)[:T]
    slots[::3] = -1  # padding rows are skipped
    k = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype).to(device)
    v = torch.randn(T, kv_heads, head_dim, generator=g).to(dtype).to(device)
    cache_ops.write_kv(k, v, kc, vc, slots.to(device))
    flat_k, flat_v = kc.view(-1, kv_heads, head_dim).cpu(), vc.view(-1, kv_heads, head_dim).cpu()
    keep = slots >= 0
    assert torch.equal(flat_k[slots[keep]], k.cpu()[keep]) and torch.equal(flat_v[slots[keep]], v.cpu()[keep])
    written = torch.zeros(nb * block_size, dtype=torch.bool)
    written[slots[keep]] = True
    assert torch.isnan(flat_k[~written].float()).all() and torch.isnan(flat_v[~written].float()).all()


def check_rope_write_kv(T, heads, kv_heads, head_dim, rot, block_size, dtype, device, interleaved=False, seed=0,
                       head_major=False):
    """cache_ops.rope_write_kv == fused_ops.apply_rope (torch path) followed by a plain cache write."""
    from batchgen.engine import fused_ops as F
    from batchgen.engine.attention.triton_kernels import cache_ops

    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    nb = -(-T // block_size) + 4
    kc = torch.full((nb, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=dev)
    vc = kc.clone()
    if head_major:
        kc, vc = _head_major(kc), _head_major(vc)
    slots = torch.randperm(nb * block_size, generator=g)[:T]
    slots[1::3] = -1  # padding rows: no cache write
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(dev)  # packed, like the model
    q = qkv[:, : heads * head_dim].view(T, heads, head_dim)
    k = qkv[:, heads * head_dim: (heads + kv_heads) * head_dim].view(T, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(T, kv_heads, head_dim)
    pos = torch.randint(0, 5000, (T,), generator=g).to(dev)
    cs = F.rope_cos_sin_cache(F.rope_inv_freq(rot, 10000.0), 5000, dev)
    q_ref, k_ref = q.clone(), k.clone()
    F.apply_rope(q_ref, k_ref, pos, cs, interleaved, force="torch")
    k_before = k.clone()
    cache_ops.rope_write_kv(q, k, v, pos, cs, kc, vc, slots.to(dev), interleaved)
    assert torch.equal(k, k_before), "k must be left as it was"
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert _rel(q.cpu(), q_ref.cpu()) < tol
    flat_k, flat_v = kc.reshape(-1, kv_heads, head_dim).cpu(), vc.reshape(-1, kv_heads, head_dim).cpu()
    keep = slots >= 0
    assert _rel(flat_k[slots[keep]], k_ref.cpu()[keep]) < tol
    assert torch.equal(flat_v[slots[keep]], v.cpu()[keep])
    written = torch.zeros(nb * block_size, dtype=torch.bool)
    written[slots[keep]] = True
    assert torch.isnan(flat_k[~written].float()).all() and torch.isnan(flat_v[~written].float()).all()


def check_fused_ops(device, dtype, seed=0):
    from batchgen.engine import fused_ops as F

    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    tol = TOL[dtype] * 2
    # rms norm, with and without residual
    for shape in [(7, 64), (33, 1024), (5, 3, 128)]:
        x = torch.randn(*shape, generator=g).to(dtype).to(dev)
        r = torch.randn(*shape, generator=g).to(dtype).to(dev)
        w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(dev)
        out = F.rms_norm(x, w, 1e-6, force="triton")
        ref = F.rms_norm(x, w, 1e-6, force="torch")
        assert _rel(out.cpu(), ref.cpu()) < tol
        o2, nr = F.rms_norm(x, w, 1e-6, residual=r, force="triton")
        r2, nr2 = F.rms_norm(x, w, 1e-6, residual=r, force="torch")
        assert _rel(o2.cpu(), r2.cpu()) < tol and _rel(nr.cpu(), nr2.cpu()) < tol
    # silu and mul
    x = torch.randn(9, 2 * 384, generator=g).to(dtype).to(dev)
    assert _rel(F.silu_and_mul(x, force="triton").cpu(), F.silu_and_mul(x, force="torch").cpu()) < tol
    # rope in place, on non-contiguous q/k views of a packed qkv tensor, neox and interleaved, partial rotary
    for D, rot, interleaved in [(64, 64, False), (128, 128, False), (128, 64, False), (64, 64, True)]:
        T, H, KVH = 11, 4, 2
        qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype).to(dev)
        cache = F.rope_cos_sin_cache(F.rope_inv_freq(rot, 10000.0), 512, device=dev)
        pos = torch.randint(0, 512, (T,), generator=g).to(dev)
        q, k, _ = qkv.view(T, H + 2 * KVH, D).split([H, KVH, KVH], dim=1)
        q2, k2 = q.clone(), k.clone()
        F.apply_rope(q, k, pos, cache, interleaved=interleaved, force="triton")
        F.apply_rope(q2, k2, pos, cache, interleaved=interleaved, force="torch")
        assert _rel(q.cpu(), q2.cpu()) < tol and _rel(k.cpu(), k2.cpu()) < tol


# ----------------------------------------------------------------------------------------- CUDA
DECODE_LENS = [1, 2, 17, 100, 255, 1024, 4097, 6000]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_decode_cuda(dtype, gqa):
    for block_size in (16, 32, 64):
        seqs = [(n, 1) for n in DECODE_LENS]
        check_attention(seqs, 8 * gqa if gqa < 8 else 32, 8 if gqa < 8 else 4, 128, block_size, dtype, "cuda")


@cuda_only
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_splits_cuda(num_splits, head_dim):
    seqs = [(n, 1) for n in (1, 5, 300, 5000)]
    check_attention(seqs, 16, 4, head_dim, 16, torch.bfloat16, "cuda", num_splits=num_splits)


@cuda_only
@pytest.mark.parametrize("num_splits", [None, 1, 2, 3, 4, 6])
@pytest.mark.parametrize("cfg", [dict(block_n=64, num_warps=4), dict(block_n=128, num_warps=8),
                                 dict(block_n=32, num_warps=4, num_stages=2), dict(block_n=64, num_stages=4)])
def test_decode_seed_shape_head_major_cuda(num_splits, cfg):
    """The benchmark regime: B=32, 32/8 heads, head-major cache, loose host bound, graph padding rows."""
    seqs = [(n, 1) for n in (257, 768, 769, 1280, 1, 16, 17, 1000)] * 4
    check_attention(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", num_splits=num_splits, head_major=True,
                    max_seq_len=4096, **cfg)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_major", [False, True])
def test_rope_write_kv_cuda(dtype, head_major):
    check_rope_write_kv(300, 32, 8, 128, 128, 16, dtype, "cuda", head_major=head_major)
    check_rope_write_kv(37, 16, 8, 128, 128, 32, dtype, "cuda", interleaved=True, head_major=head_major)
    check_rope_write_kv(9, 8, 2, 64, 32, 16, dtype, "cuda", head_major=head_major)  # partial rotary


@cuda_only
@pytest.mark.parametrize("window", [1, 64, 1000])
def test_decode_window_cuda(window):
    seqs = [(n, 1) for n in (1, 63, 64, 65, 999, 3000)]
    check_attention(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", window=window)
    check_attention(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", window=window, num_splits=1)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 64])
def test_prefill_cuda(dtype, gqa, block_size):
    # fresh prompts, chunks with cached context, decode rows mixed in (mixed step)
    seqs = [(1, 1), (37, 37), (300, 129), (1000, 1), (2100, 700), (64, 16)]
    check_attention(seqs, 8 * gqa, 8, 128, block_size, dtype, "cuda")
    check_attention([(5000, 4096)], 4 * gqa, 4, 64, block_size, dtype, "cuda")


@cuda_only
@pytest.mark.parametrize("window", [1, 100, 4096])
def test_prefill_window_cuda(window):
    seqs = [(37, 37), (300, 129), (1000, 1), (2100, 700)]
    check_attention(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", window=window)


@cuda_only
def test_prefill_kernel_on_decode_batch_cuda():
    seqs = [(n, 1) for n in DECODE_LENS]
    check_attention(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", force_prefill_kernel=True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_write_kv_cuda(dtype, block_size):
    check_write_kv(300, 8, 128, block_size, dtype, "cuda")
    check_write_kv(7, 2, 64, block_size, dtype, "cuda")


@cuda_only
def test_backend_cuda_graph_decode():
    """TritonAttention.forward captured in a CUDA graph, replayed with new lengths/tables in place."""
    from batchgen.engine.attention.triton_backend import make_triton_backend

    be = make_triton_backend()
    seqs = [(100, 1), (2000, 1), (7, 1), (1, 1), (10, 1)]
    case = make_case(seqs, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=1, max_blocks=300, num_blocks=600)
    meta = case["meta"]
    meta.max_seq_len = 4096  # host upper bound, as a graph runner passes
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    scale = 128 ** -0.5
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        be.forward(case["q"], case["k"], case["v"], kc, vc, meta, scale)  # warm-up / compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.forward(case["q"], case["k"], case["v"], kc, vc, meta, scale)
    # next step: 4 real sequences with new lengths/tables + one padding entry (seq_len 0, slot -1)
    new = make_case([(1500, 1), (3, 1), (4000, 1), (64, 1)], 32, 8, 128, 16, torch.bfloat16, "cuda", seed=2,
                    max_blocks=300, num_blocks=600)
    nm = new["meta"]
    for name in ("q", "k", "v"):
        case[name][:4].copy_(new[name])
    kc.copy_(new["k_cache"]); vc.copy_(new["v_cache"])  # noqa: E702
    meta.slot_mapping[:4].copy_(nm.slot_mapping); meta.slot_mapping[4] = -1  # noqa: E702
    meta.seq_lens[:4].copy_(nm.seq_lens); meta.seq_lens[4] = 0  # noqa: E702
    meta.block_tables[:4].copy_(nm.block_tables); meta.block_tables[4] = 0  # noqa: E702
    graph.replay()
    torch.cuda.synchronize()
    assert _rel(out[:4].cpu(), reference_attend(new, scale)) < TOL[torch.bfloat16]
    assert torch.all(out[4] == 0)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_ops_cuda(dtype):
    check_fused_ops("cuda", dtype)


# ----------------------------------------------------------------------------------------- skinny GEMM
def check_skinny_gemm(device, dtype, cases, seed=0, graph=False):
    """Triton split-K GEMM (optionally SiLU-and-mul fused on load, bias) vs the torch ops it replaces.
    cases: (M, K, N, config or None, silu_mul, bias)."""
    from batchgen.engine import fused_ops as F
    from batchgen.engine.kernels.counters import _BUFFERS
    from batchgen.engine.kernels.skinny_gemm import skinny_gemm

    g = torch.Generator().manual_seed(seed)
    for M, K, N, cfg, silu, bias in cases:
        x = torch.randn(M, 2 * K if silu else K, generator=g).to(dtype).to(device)
        w = (torch.randn(K, N, generator=g) / K ** 0.5).to(dtype).to(device)
        b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
        a = F.silu_and_mul(x, force="torch") if silu else x
        ref = a.double() @ w.double() + (b.double() if bias else 0)
        if graph:  # replayed inside a CUDA graph, twice, with new inputs: the split counters must reset
            out = skinny_gemm(x, w, b, silu_mul=silu, config=cfg)
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg):
                out = skinny_gemm(x, w, b, silu_mul=silu, config=cfg)
            for _ in range(2):
                x.copy_(torch.randn(x.shape, generator=g).to(dtype).to(device))
                a = F.silu_and_mul(x, force="torch") if silu else x
                ref = a.double() @ w.double() + (b.double() if bias else 0)
                cg.replay()
                assert _rel(out.cpu(), ref.cpu()) < TOL[dtype], (M, K, N, cfg, silu, bias)
        else:
            out = skinny_gemm(x, w, b, silu_mul=silu, config=cfg)
            assert out.shape == (M, N) and out.dtype == dtype
            sem = _BUFFERS.get(("skinny_gemm", out.device))
            assert sem is None or not sem.any(), "split-K counters not reset"
            assert _rel(out.cpu(), ref.cpu()) < TOL[dtype], (M, K, N, cfg, silu, bias)


def check_skinny_fusions(device, dtype, cases, seed=0, graph=False):
    """The skinny GEMM's fused decode options vs the unfused torch ops: SiLU-and-mul of the gate | up
    halves after the product (gated), and the residual add in place (residual).
    cases: (M, K, N, config, gated, residual, bias); N is the output width."""
    from batchgen.engine import fused_ops as F
    from batchgen.engine.kernels.skinny_gemm import skinny_gemm

    g = torch.Generator().manual_seed(seed)
    for M, K, N, cfg, gated, residual, bias in cases:
        Nw = 2 * N if gated else N
        w = (torch.randn(K, Nw, generator=g) / K ** 0.5).to(dtype).to(device)
        b = torch.randn(Nw, generator=g).to(dtype).to(device) if bias else None

        def inputs():
            x = (3 * torch.randn(M, K, generator=g)).to(dtype).to(device)
            r = torch.randn(M, N, generator=g).to(dtype).to(device) if residual else None
            return x, r

        def reference(x, r):
            y = x.double() @ w.double() + (b.double() if bias else 0)
            if gated:
                y = F.silu_and_mul(y.to(dtype), force="torch").double()
            return y + r.double() if residual else y

        def call(x, r):
            return skinny_gemm(x, w, b, gated=gated, residual=r, out=r, config=cfg)

        x, r = inputs()
        ref = reference(x, r)
        out = call(x, r)
        assert out.shape == (M, N) and out.dtype == dtype and (r is None or out.data_ptr() == r.data_ptr())
        assert _rel(out.cpu(), ref.cpu()) < TOL[dtype], (M, K, N, cfg, gated, residual, bias)
        if graph:  # captured once, replayed with new inputs copied into the captured buffers
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg):
                out = call(x, r)
            for _ in range(2):
                x2, r2 = inputs()
                x.copy_(x2)
                if residual:
                    r.copy_(r2)
                ref = reference(x2, r2)
                cg.replay()
                assert _rel(out.cpu(), ref.cpu()) < TOL[dtype], (M, K, N, cfg, gated, residual, bias)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_gemm_fused_decode_options_cuda(dtype):
    cases = [(32, 4096, 14336, (256, 64, 1, 4, 3), True, False, False),    # gate_up + SiLU-and-mul
             (32, 4096, 4096, (32, 256, 1, 4, 4), False, True, False),     # o_proj + residual
             (32, 14336, 4096, (64, 128, 2, 4, 5), False, True, False),    # down + residual, K split
             (1, 1024, 200, (64, 64, 1, 4, 3), True, True, True),
             (7, 1000, 96, (32, 128, 1, 4, 2), False, False, True),
             (5, 1024, 256, (64, 64, 1, 4, 3), True, False, True),
             (64, 512, 320, None, False, True, True)]
    check_skinny_fusions("cuda", dtype, cases)
    check_skinny_fusions("cuda", dtype, [(24, 2048, 1024, (128, 64, 1, 4, 3), True, False, False),
                                         (24, 2048, 1024, (64, 64, 4, 4, 3), False, True, False)], graph=True)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_gemm_cuda(dtype):
    # every config meets every shape once; M, SiLU and bias rotate (each case is a compile)
    cfgs = (None, (64, 128, 8, 4, 3), (128, 64, 3, 8, 5), (256, 64, 1, 8, 3))
    shapes = ((4096, 6144), (1024, 200), (3000, 320))
    variants = ((1, False, False), (7, True, False), (32, False, True), (64, True, True), (32, True, False))
    cases = [(variants[(i + j) % 5][0], K, N, cfg, *variants[(i + j) % 5][1:])
             for i, cfg in enumerate(cfgs) for j, (K, N) in enumerate(shapes)]
    check_skinny_gemm("cuda", dtype, cases)
    check_skinny_gemm("cuda", dtype, [(32, 4096, 4096, None, False, False), (5, 1024, 512, (64, 128, 4, 4, 4), True, True)],
                      graph=True)


@cuda_only
def test_engine_linears_use_skinny_gemm_at_decode_sizes(monkeypatch):
    """On CUDA in 16-bit a projection with a tuned config takes the skinny path for <= MAX_M rows, cuBLAS
    above; projections without one (or not chosen) stay on cuBLAS."""
    from torch import nn

    from batchgen.engine.models import linear_layout
    from batchgen.engine.models.linear_layout import make_input_major
    from batchgen.engine.switches import Switches

    monkeypatch.setitem(linear_layout.TUNED, (256, 384), (64, 64, 2, 4, 3))
    monkeypatch.setitem(linear_layout.TUNED, (512, 256), (64, 64, 2, 4, 3))

    m = nn.ModuleDict({"qkv_proj": nn.Linear(256, 384, bias=True), "down_proj": nn.Linear(512, 256, bias=False)})
    m = m.to("cuda", torch.bfloat16)
    x = torch.randn(48, 256, device="cuda", dtype=torch.bfloat16)
    ref = m["qkv_proj"](x)
    make_input_major(m, sw=Switches(skinny=("qkv_proj",)))
    assert m["qkv_proj"].skinny is not None and m["down_proj"].skinny is None
    for rows in (48, 200):
        xx = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16) if rows != 48 else x
        out = m["qkv_proj"](xx)
        r = xx.double() @ m["qkv_proj"].weight_t.double() + m["qkv_proj"].bias.double()
        assert _rel(out.cpu(), r.cpu()) < TOL[torch.bfloat16]
    assert _rel(m["qkv_proj"](x).cpu(), ref.cpu()) < TOL[torch.bfloat16]


@cuda_only
@pytest.mark.parametrize("graphs", [True, False])
def test_engine_fused_decode_path_matches_reference(monkeypatch, tmp_path, graphs):
    """With gate_up on the skinny GEMM (no K split), decode steps take the fused layer path (residual
    adds and SiLU-and-mul inside the GEMMs). In bfloat16 its greedy tokens
    follow the float32 transformers reference up to bf16-sized near-ties, and its hidden states
    match the unfused path's on the same step."""
    sys.path.insert(0, str(Path(__file__).parent))
    import reference as R

    from batchgen import Engine
    from batchgen.engine import switches
    from batchgen.engine.models import linear_layout

    ckpt = R.make_tiny_checkpoint("llama", tmp_path / "llama")  # hidden 64, inter 128, 4 heads / 2 kv of 16
    monkeypatch.setitem(linear_layout.TUNED, (64, 128), (64, 64, 1, 4, 2))   # qkv
    monkeypatch.setitem(linear_layout.TUNED, (64, 256), (64, 64, 1, 4, 2))   # gate_up
    monkeypatch.setitem(linear_layout.TUNED, (64, 64), (32, 64, 1, 4, 2))    # o
    monkeypatch.setitem(linear_layout.TUNED, (128, 64), (32, 64, 2, 4, 2))   # down, K split
    # the engine reads its switches once: swap the process's registry for this test (restored after it)
    monkeypatch.setattr(switches, "_CURRENT", switches.Switches(skinny=("qkv_proj", "o_proj", "gate_up_proj",
                                                                        "down_proj")))
    eng = Engine.from_pretrained(ckpt, device="cuda", dtype="bfloat16", max_num_seqs=48, max_batch_tokens=512,
                                 kv_cache_tokens=16384, cuda_graphs=graphs)
    assert eng.model.fused_rows == 64
    prompts, max_new = R.random_prompts_for(ckpt, 40), R.random_max_new(40)
    got = [o.outputs[0].token_ids for o in eng.generate(prompts, R.greedy_params(max_new))]
    failures, ties = R.compare_greedy(R.get_reference(ckpt), prompts, got, R.cached_greedy(ckpt, prompts, max_new),
                                      tol=0.04)  # bf16 keeps 8 bits: logits of magnitude ~4 round by
    # ~0.016 each, so a top-2 gap up to ~0.03 can flip (0.0204 did, on the shared tiny checkpoint)
    assert not failures, R.format_failures(failures, "fused decode path, bf16")

    # the same 40-token batch through both layer paths of the same model (eager, torch attention)
    model = eng.model
    ids = torch.tensor([p[-1] for p in prompts], device="cuda")
    with torch.no_grad():
        x0 = model.embed_tokens(ids)
        fused = x0.clone()
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q = attn.qkv_proj.normed(fused, layer.input_layernorm.weight, layer.input_layernorm.eps)
            attn.o_proj.add_to(fused, q[:, :attn.q_size].contiguous())  # attention stand-in: q
            mlp.down_proj.add_to(fused, mlp.gate_up_proj.normed(fused, layer.post_attention_layernorm.weight,
                                                                 layer.post_attention_layernorm.eps, gated=True))
        plain, residual = x0, None
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            h, residual = (layer.input_layernorm(plain), plain) if residual is None else \
                layer.input_layernorm(plain, residual)
            q = attn.qkv_proj(h)[:, :attn.q_size]
            h, residual = layer.post_attention_layernorm(attn.o_proj(q.contiguous()), residual)
            plain = mlp(h)
        plain = plain + residual
    assert _rel(fused.float().cpu(), plain.float().cpu()) < 2 * TOL[torch.bfloat16]


def test_skinny_configs_file_errors_name_the_problem(tmp_path, monkeypatch):
    from batchgen.engine.models.linear_layout import skinny_config
    from batchgen.engine.switches import Switches

    f = tmp_path / "best.json"
    monkeypatch.setenv("BATCHGEN_SKINNY_CONFIGS", str(f))
    monkeypatch.setenv("BATCHGEN_SKINNY", "qkv_proj")
    sw = Switches.from_env()  # the registry as the engine builds it from these variables
    assert sw.skinny == ("qkv_proj",) and sw.skinny_configs == str(f)
    f.write_text('{"64,128": [64, 64, 1, 4, 2]}')
    assert skinny_config("layers.0.qkv_proj", 64, 128, sw) == (64, 64, 1, 4, 2)
    assert skinny_config("layers.0.qkv_proj", 64, 96, sw) is None  # not in the file, not tuned: cuBLAS
    for text, problem in (('{"64,128": [64, 64]}', "not 5 positive integers"), ("{oops", "Expecting"),
                          (None, "No such file")):
        if text is None:
            f.unlink()
        else:
            f.write_text(text)
        with pytest.raises(ValueError, match=problem) as e:
            skinny_config("layers.0.qkv_proj", 64, 128, sw)
        assert str(f) in str(e.value) and "BATCHGEN_SKINNY_CONFIGS" in str(e.value)


# ----------------------------------------------------------------------------------------- CPU (interpreter)
def _patch_interpreter():
    """Work around two triton 3.6 interpreter bugs: bf16 dot operands are multiplied as raw uint16
    (upcast them first), and a scalar used as a loop bound fails under numpy >= 2.4 (1-element array)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig_patch = ti._patch_lang_tensor

    def patch_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    ti._patch_lang_tensor = patch_tensor

    orig = ti.InterpreterBuilder.create_dot

    def up(h):
        if h.dtype.scalar == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    ti.InterpreterBuilder.create_dot = lambda self, a, b, d, *args: orig(self, up(a), up(b), d, *args)


def interpreter_suite():
    _patch_interpreter()
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        results.append(check_attention([(1, 1), (40, 1), (300, 1)], 8, 2, 64, 16, dtype, "cpu"))
    results.append(check_attention([(1, 1), (40, 1), (300, 1)], 8, 8, 64, 32, torch.float32, "cpu", num_splits=4))
    results.append(check_attention([(9, 1), (200, 1)], 16, 2, 64, 16, torch.float32, "cpu", window=50))
    results.append(check_attention([(200, 1)], 16, 2, 64, 16, torch.float32, "cpu", window=50, num_splits=1))
    for gqa in (1, 4):
        results.append(check_attention([(1, 1), (37, 37), (150, 70), (90, 1)], 4 * gqa, 4, 64, 16,
                                       torch.float32, "cpu"))
    results.append(check_attention([(37, 37), (150, 70)], 8, 2, 64, 32, torch.bfloat16, "cpu"))
    results.append(check_attention([(37, 37), (150, 70), (90, 1)], 8, 2, 64, 16, torch.float32, "cpu", window=20))
    results.append(check_attention([(40, 1), (300, 1)], 8, 2, 64, 16, torch.float32, "cpu",
                                   force_prefill_kernel=True))
    check_write_kv(20, 2, 64, 16, torch.bfloat16, "cpu")
    check_write_kv(20, 4, 64, 32, torch.float32, "cpu")
    results.append(check_attention([(1, 1), (40, 1), (300, 1)], 8, 2, 64, 16, torch.float32, "cpu",
                                   num_splits=3, head_major=True, max_seq_len=4096))
    check_rope_write_kv(20, 8, 2, 64, 64, 16, torch.float32, "cpu")
    check_rope_write_kv(20, 8, 2, 64, 32, 16, torch.bfloat16, "cpu", interleaved=True, head_major=True)
    check_skinny_gemm("cpu", torch.float32, [(3, 256, 96, (64, 64, 1, 4, 2), False, False),
                                              (17, 512, 128, (64, 64, 4, 4, 2), False, True),
                                              (32, 384, 200, (64, 64, 2, 4, 2), True, False)])
    check_skinny_gemm("cpu", torch.bfloat16, [(5, 256, 64, (64, 64, 3, 4, 2), True, True)])
    check_skinny_fusions("cpu", torch.float32, [(3, 256, 96, (64, 64, 1, 4, 2), True, False, True),
                                                 (9, 320, 64, (32, 64, 1, 4, 2), False, True, False),
                                                 (5, 512, 128, (64, 64, 3, 4, 2), False, True, True)])
    check_skinny_fusions("cpu", torch.bfloat16, [(5, 256, 64, (64, 64, 1, 4, 2), True, True, False)])
    if os.environ.get("SKIP_FUSED") != "1":
        check_fused_ops("cpu", torch.float32)
        check_fused_ops("cpu", torch.bfloat16)
    print("interpreter suite ok", " ".join(f"{e:.1e}" for e in results))


@pytest.mark.slow
@interpreter_test
def test_kernels_triton_interpreter_cpu():
    from interpreter import run_interpreter_suite

    run_interpreter_suite(__file__, "interpreter suite ok")


if __name__ == "__main__" and "--interpret" in sys.argv:
    interpreter_suite()

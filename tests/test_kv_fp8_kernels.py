"""The Triton KV-cache kernels with an FP8 (e4m3) cache against the torch emulation (engine/kv_fp8.py and
the torch backend, itself checked against SDPA in test_kv_fp8.py): write_kv and the fused RoPE + write
store exactly the emulation's codes; paged decode (split or not, windowed, head-major) and paged prefill
over those codes equal TorchAttention over the same cache within the dots' rounding; the Triton backend
reads each cache's own scale, also inside a CUDA graph.

CUDA tests run with a GPU and triton. The CPU test runs a few of the same checks in a subprocess under the
Triton interpreter (TRITON_INTERPRET=1); it is skipped without triton (as in CI).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_cuda import TOL, _head_major, _patch_interpreter, _rel, make_case  # noqa: E402

from batchgen.engine import kv_fp8  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
from interpreter import interpreter_test  # noqa: E402  (tests/ is on the path)
HAS_CUDA = torch.cuda.is_available()
FP8_CUDA = HAS_CUDA and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)
cuda_fp8 = pytest.mark.skipif(not FP8_CUDA, reason="needs CUDA (compute capability 8.9+) and triton")
FP8 = torch.float8_e4m3fn
NAN_CODE = 0x7F  # e4m3fn NaN: what an unwritten slot keeps
K_SCALE, V_SCALE = 0.037, 0.011  # not powers of two: the division's rounding is exercised


def ref_codes(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The recipe written out again: fp32 division, saturation at 448, round to nearest even."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8)


def nan_cache(nb: int, bs: int, kvh: int, d: int, device, head_major: bool, scale: float) -> torch.Tensor:
    c = torch.full((nb, bs, kvh, d), NAN_CODE, dtype=torch.uint8, device=device).view(FP8)
    return kv_fp8.set_scale(_head_major(c) if head_major else c, scale)


def fp8_copy(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """A cache of values quantized to codes (same layout), tagged with its scale."""
    return kv_fp8.set_scale(kv_fp8.quantize(cache, scale), scale)


def _codes(c: torch.Tensor, kvh: int, d: int) -> torch.Tensor:
    return c.reshape(-1, kvh, d).cpu().view(torch.uint8)


def check_fp8_write_kv(T, kvh, d, bs, dtype, device, head_major=False, seed=0):
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.attention.triton_kernels import cache_ops

    g = torch.Generator().manual_seed(seed)
    nb = -(-T // bs) + 4
    kc, vc = (nan_cache(nb, bs, kvh, d, device, head_major, s) for s in (K_SCALE, V_SCALE))
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[::3] = -1  # padding rows are skipped
    k = (torch.randn(T, kvh, d, generator=g) * 3).to(dtype).to(device)
    v = torch.randn(T, kvh, d, generator=g).to(dtype).to(device)
    k[1, 0, :4] = torch.tensor([1e4, -1e4, 17.0, 1e-6], dtype=dtype)  # saturates both ways; rounds to 0
    cache_ops.write_kv(k, v, kc, vc, slots.to(device), K_SCALE, V_SCALE)
    keep = slots >= 0
    fk, fv = _codes(kc, kvh, d), _codes(vc, kvh, d)
    assert torch.equal(fk[slots[keep]], ref_codes(k.cpu()[keep], K_SCALE).view(torch.uint8))
    assert torch.equal(fv[slots[keep]], ref_codes(v.cpu()[keep], V_SCALE).view(torch.uint8))
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots[keep]] = True
    assert (fk[~written] == NAN_CODE).all() and (fv[~written] == NAN_CODE).all()
    # the torch backend (the emulation) writes the same codes (it has no padding rows to skip)
    tk, tv = (nan_cache(nb, bs, kvh, d, device, head_major, s) for s in (K_SCALE, V_SCALE))
    TorchAttention().write_kv(k[keep.to(device)], v[keep.to(device)], tk, tv, make_meta(slots[keep].to(device)))
    assert torch.equal(_codes(tk, kvh, d), fk) and torch.equal(_codes(tv, kvh, d), fv)


def make_meta(slots: torch.Tensor):
    from batchgen.engine.attention.base import AttentionMetadata

    z = torch.zeros(1, dtype=torch.int32, device=slots.device)
    return AttentionMetadata(slots, z, z, z[None], 1, 1, True)


def check_fp8_rope_write_kv(T, heads, kvh, d, rot, bs, dtype, device, interleaved=False, head_major=False, seed=0):
    """rope_write_kv into an FP8 cache == fused_ops.apply_rope (torch) + the emulation's write."""
    from batchgen.engine import fused_ops as F
    from batchgen.engine.attention.triton_kernels import cache_ops

    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    nb = -(-T // bs) + 4
    kc, vc = (nan_cache(nb, bs, kvh, d, dev, head_major, s) for s in (K_SCALE, V_SCALE))
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[1::3] = -1
    qkv = torch.randn(T, (heads + 2 * kvh) * d, generator=g).to(dtype).to(dev)  # packed, like the model
    q = qkv[:, : heads * d].view(T, heads, d)
    k = qkv[:, heads * d: (heads + kvh) * d].view(T, kvh, d)
    v = qkv[:, (heads + kvh) * d:].view(T, kvh, d)
    pos = torch.randint(0, 5000, (T,), generator=g).to(dev)
    cs = F.rope_cos_sin_cache(F.rope_inv_freq(rot, 10000.0), 5000, dev)
    q_ref, k_ref = q.clone(), k.clone()
    F.apply_rope(q_ref, k_ref, pos, cs, interleaved, force="torch")
    cache_ops.rope_write_kv(q, k, v, pos, cs, kc, vc, slots.to(dev), interleaved, K_SCALE, V_SCALE)
    keep = slots >= 0
    got_k, want_k = _codes(kc, kvh, d)[slots[keep]], ref_codes(k_ref.cpu()[keep], K_SCALE).view(torch.uint8)
    # the rotation's fp32 rounding may differ by an ulp (FMA on the GPU), which can move a code by one step
    differ = got_k != want_k
    assert differ.float().mean() <= 2e-3, f"{int(differ.sum())} of {differ.numel()} K codes differ"
    back = kv_fp8.dequantize(got_k.view(FP8), K_SCALE)
    assert torch.allclose(back, kv_fp8.dequantize(want_k.view(FP8), K_SCALE), rtol=0.13, atol=K_SCALE * 2 ** -9)
    assert torch.equal(_codes(vc, kvh, d)[slots[keep]], ref_codes(v.cpu()[keep], V_SCALE).view(torch.uint8))
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots[keep]] = True
    assert (_codes(kc, kvh, d)[~written] == NAN_CODE).all() and (_codes(vc, kvh, d)[~written] == NAN_CODE).all()


def check_fp8_attention(seqs, heads, kvh, d, bs, dtype, device, window=None, num_splits=None,
                        force_prefill_kernel=False, head_major=False, max_seq_len=None, seed=0):
    """Triton write + decode / prefill over an FP8 cache vs TorchAttention (float32 queries) over a copy."""
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.attention.triton_kernels import cache_ops, decode, prefill

    case = make_case(seqs, heads, kvh, d, bs, dtype, device, seed)
    meta = case["meta"]
    scale = d ** -0.5
    kc, vc = fp8_copy(case["k_cache"] * 3, K_SCALE), fp8_copy(case["v_cache"], V_SCALE)
    rk, rv = fp8_copy(case["k_cache"] * 3, K_SCALE), fp8_copy(case["v_cache"], V_SCALE)
    be = TorchAttention()
    be.write_kv(case["k"].float(), case["v"].float(), rk, rv, meta)
    ref = be.attend(case["q"].float(), rk, rv, meta, scale, window).cpu()
    if head_major:
        kc, vc = kv_fp8.set_scale(_head_major(kc), K_SCALE), kv_fp8.set_scale(_head_major(vc), V_SCALE)
    cache_ops.write_kv(case["k"], case["v"], kc, vc, meta.slot_mapping, K_SCALE, V_SCALE)
    assert torch.equal(_codes(kc, kvh, d), _codes(rk, kvh, d))  # the emulation's codes, in every slot
    if max_seq_len is not None:
        meta.max_seq_len = max_seq_len  # loose host bound (CUDA graphs)
    out = torch.full_like(case["q"], float("nan"))
    if meta.decode_only and not force_prefill_kernel:
        decode.paged_decode(case["q"], kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                            meta.max_seq_len, scale, window=window, out=out, num_splits=num_splits,
                            k_scale=K_SCALE, v_scale=V_SCALE)
    else:
        prefill.paged_prefill(case["q"], kc, vc, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                              scale, window=window, out=out, k_scale=K_SCALE, v_scale=V_SCALE)
    err = _rel(out.cpu(), ref)
    assert err < TOL[dtype], f"rel err {err:.3e} seqs={seqs} H={heads}/{kvh} {dtype} w={window} splits={num_splits}"
    return err


def check_backend_forward_rope(dtype, device):
    """TritonAttention.forward_rope with FP8 caches (scales read from the tensors) == TorchAttention's."""
    from batchgen.engine import fused_ops as F
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.attention.triton_backend import TritonAttention

    case = make_case([(30, 30), (70, 9), (5, 1)], 8, 2, 64, 16, dtype, device, seed=3)
    meta = case["meta"]
    pos = torch.cat([torch.arange(sl - ql, sl) for sl, ql in [(30, 30), (70, 9), (5, 1)]]).to(device)
    cs = F.rope_cos_sin_cache(F.rope_inv_freq(64, 10000.0), 128, torch.device(device))
    outs = []
    for be in (TritonAttention(), TorchAttention()):
        kc, vc = fp8_copy(case["k_cache"], K_SCALE), fp8_copy(case["v_cache"], V_SCALE)
        q, k = case["q"].clone(), case["k"].clone()
        if isinstance(be, TorchAttention):  # the reference: float32 queries, the torch rotation
            q, k = q.float(), k.float()
        outs.append(be.forward_rope(q, k, case["v"].clone(), pos, cs, kc, vc, meta, 64 ** -0.5).cpu())
    assert _rel(outs[0], outs[1]) < TOL[dtype]


# ----------------------------------------------------------------------------------------- CUDA
@cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_major", [False, True])
def test_fp8_write_kv_cuda(dtype, head_major):
    check_fp8_write_kv(300, 8, 128, 16, dtype, "cuda", head_major)
    check_fp8_write_kv(7, 2, 64, 32, dtype, "cuda", head_major)


@cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rot, interleaved", [(128, False), (64, False), (128, True)])
def test_fp8_rope_write_kv_cuda(dtype, rot, interleaved):
    check_fp8_rope_write_kv(200, 32, 8, 128, rot, 16, dtype, "cuda", interleaved, head_major=True)


@cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_fp8_decode_cuda(dtype, gqa, num_splits):
    seqs = [(n, 1) for n in (1, 2, 17, 100, 255, 1024, 4097)]
    check_fp8_attention(seqs, 8 * gqa, 8, 128, 16, dtype, "cuda", num_splits=num_splits, head_major=True,
                        max_seq_len=8192)


@cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_decode_register_capped_cuda(dtype):
    """Enough sequences that the FP8 kernel runs with its register cap (decode.fp8_register_cap): same sums."""
    from batchgen.engine.attention.triton_kernels import decode

    seqs = [(n, 1) for n in ([1, 17, 300, 1100, 2000] * 30)[:150]]
    assert decode.fp8_register_cap(len(seqs) * 8, torch.device("cuda"))[0] == decode.FP8_REGISTER_CAP
    check_fp8_attention(seqs, 32, 8, 128, 16, dtype, "cuda", head_major=True, max_seq_len=4096)


@cuda_fp8
@pytest.mark.parametrize("window", [1, 64, 1000])
def test_fp8_decode_window_cuda(window):
    check_fp8_attention([(n, 1) for n in (3, 100, 2000)], 32, 8, 128, 16, torch.bfloat16, "cuda", window=window,
                        head_major=True)


@cuda_fp8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("window", [None, 100])
def test_fp8_prefill_cuda(dtype, gqa, window):
    seqs = [(1, 1), (37, 37), (300, 120), (1000, 1), (2048, 513)]
    check_fp8_attention(seqs, 8 * gqa, 8, 128, 16, dtype, "cuda", window=window, head_major=True)


@cuda_fp8
def test_fp8_backend_forward_rope_cuda():
    check_backend_forward_rope(torch.bfloat16, "cuda")


@cuda_fp8
def test_fp8_backend_cuda_graph_decode():
    """TritonAttention.forward over FP8 caches captured in a CUDA graph, replayed with new lengths and
    tables: the scales were baked in at capture, and the output is still the emulation's."""
    from batchgen.engine.attention.torch_backend import TorchAttention
    from batchgen.engine.attention.triton_backend import TritonAttention

    be = TritonAttention()
    mk = dict(heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda",
              max_blocks=300, num_blocks=600)
    case = make_case([(100, 1), (2000, 1), (7, 1), (1, 1), (10, 1)], seed=1, **mk)
    meta = case["meta"]
    meta.max_seq_len = 4096
    kc, vc = fp8_copy(case["k_cache"], K_SCALE), fp8_copy(case["v_cache"], V_SCALE)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        be.forward(case["q"], case["k"], case["v"], kc, vc, meta, 128 ** -0.5)  # warm-up / compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = be.forward(case["q"], case["k"], case["v"], kc, vc, meta, 128 ** -0.5)
    new = make_case([(1500, 1), (3, 1), (4000, 1), (64, 1)], seed=2, **mk)
    nm = new["meta"]
    for name in ("q", "k", "v"):
        case[name][:4].copy_(new[name])
    kc.copy_(kv_fp8.quantize(new["k_cache"], K_SCALE))
    vc.copy_(kv_fp8.quantize(new["v_cache"], V_SCALE))
    meta.slot_mapping[:4].copy_(nm.slot_mapping); meta.slot_mapping[4] = -1  # noqa: E702
    meta.seq_lens[:4].copy_(nm.seq_lens); meta.seq_lens[4] = 0  # noqa: E702
    meta.block_tables[:4].copy_(nm.block_tables); meta.block_tables[4] = 0  # noqa: E702
    graph.replay()
    torch.cuda.synchronize()
    rk, rv = fp8_copy(new["k_cache"], K_SCALE), fp8_copy(new["v_cache"], V_SCALE)
    ref_be = TorchAttention()
    ref_be.write_kv(new["k"].float(), new["v"].float(), rk, rv, nm)
    ref = ref_be.attend(new["q"].float(), rk, rv, nm, 128 ** -0.5).cpu()
    assert _rel(out[:4].cpu(), ref) < TOL[torch.bfloat16]
    assert torch.all(out[4] == 0)


# ----------------------------------------------------------------------------------------- CPU (interpreter)
def _patch_fp8_interpreter() -> None:
    """Triton 3.6's interpreter converts to fp8 by adding the rounding bit to the truncated mantissa without
    the carry into the exponent (31.3 becomes 16, not 32) and rounds ties up, and truncates float32 to
    bfloat16: convert with torch instead (round to nearest even, as the GPU does)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    orig = ti.InterpreterBuilder.create_fp_to_fp
    np_of = {tl.float32: np.float32, tl.float16: np.float16}

    def fp_to_fp(self, src, dst_type, rounding_mode):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == tl.float8e4nv and s in (tl.float32, tl.float16):
            codes = torch.from_numpy(src.data.astype(np.float32)).to(FP8).view(torch.uint8).numpy()
            return ti.TensorHandle(codes, d)
        if s == tl.float8e4nv and d in (tl.float32, tl.float16):
            values = torch.from_numpy(src.data.astype(np.uint8)).view(FP8).float().numpy().astype(np_of[d])
            return ti.TensorHandle(values, d)
        return orig(self, src, dst_type, rounding_mode)

    ti.InterpreterBuilder.create_fp_to_fp = fp_to_fp
    orig_cast = ti.InterpreterBuilder.cast_impl

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(src.data.astype(np.float32)).bfloat16().view(torch.int16).numpy()
            return ti.TensorHandle(bits.view(np.uint16), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    ti.InterpreterBuilder.cast_impl = cast


def interpreter_suite() -> None:
    _patch_interpreter()
    _patch_fp8_interpreter()
    errs = []
    check_fp8_write_kv(20, 2, 64, 16, torch.float32, "cpu")
    check_fp8_write_kv(20, 4, 32, 32, torch.bfloat16, "cpu", head_major=True)
    check_fp8_rope_write_kv(20, 8, 2, 64, 64, 16, torch.float32, "cpu")
    check_fp8_rope_write_kv(20, 8, 2, 64, 32, 16, torch.bfloat16, "cpu", interleaved=True, head_major=True)
    errs.append(check_fp8_attention([(1, 1), (40, 1), (300, 1)], 8, 2, 64, 16, torch.float32, "cpu"))
    errs.append(check_fp8_attention([(1, 1), (40, 1), (300, 1)], 8, 2, 64, 16, torch.bfloat16, "cpu",
                                    num_splits=3, head_major=True, max_seq_len=4096))
    errs.append(check_fp8_attention([(9, 1), (200, 1)], 8, 2, 64, 16, torch.float32, "cpu", window=50))
    errs.append(check_fp8_attention([(37, 37), (150, 70), (90, 1)], 8, 2, 64, 16, torch.float32, "cpu",
                                    window=20))
    errs.append(check_fp8_attention([(37, 37), (150, 70)], 8, 2, 64, 32, torch.bfloat16, "cpu"))
    check_backend_forward_rope(torch.float32, "cpu")
    print("fp8 interpreter suite ok", " ".join(f"{e:.1e}" for e in errs))


@pytest.mark.slow
@interpreter_test
def test_fp8_kernels_triton_interpreter_cpu():
    from interpreter import run_interpreter_suite

    run_interpreter_suite(__file__, "fp8 interpreter suite ok")


if __name__ == "__main__" and "--interpret" in sys.argv:
    interpreter_suite()

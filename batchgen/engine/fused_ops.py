"""Fused elementwise ops for the model code: Triton on CUDA, plain torch elsewhere (same signatures).

    normed = rms_norm(x, weight, eps)                        # x: [..., N]
    normed, new_residual = rms_norm(x, weight, eps, residual=r)   # new_residual = x + r (model dtype),
                                                                  # normed = rms_norm(new_residual)
    normed = rms_norm(x, weight, eps, offset=True)           # Gemma: x * rstd * (1 + weight), fp32, rounded once
    y = silu_and_mul(x)                                      # x: [..., 2I] -> silu(x[..., :I]) * x[..., I:]
    y = gelu_tanh_and_mul(x)                                 # the same with gelu_pytorch_tanh (Gemma's GeGLU)
    cache = rope_cos_sin_cache(inv_freq, max_pos, device)    # [max_pos, rot_dim] fp32: cos | sin
    apply_rope(q, k, positions, cache, interleaved=False)    # in place; q [T, H, D], k [T, KVH, D]
                                                             # (views of a packed qkv are fine: last dim
                                                             # contiguous); rotates the first rot_dim dims

Numerics follow the HF implementations (RMSNorm: normalise in fp32, cast to the model dtype, then
multiply by the weight; SiLU: act(gate) rounded to the model dtype, then * up). RoPE is computed
in fp32 and rounded once (HF rounds cos/sin to the model dtype first: differences are ~1 ulp).

`force="torch"|"triton"` overrides the automatic choice (tests and benchmarks). The automatic
choice is Triton on CUDA tensors (and on CPU ones under TRITON_INTERPRET=1, read once in
switches.py): all three measured faster than eager torch on H100 (benchmarks/kernels.py,
notes/KERNELS.md). Without triton installed every op runs in torch.
"""
from __future__ import annotations

import importlib.util

import torch

from .switches import switches

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor, force: str | None) -> bool:
    if force is not None:
        if force not in ("torch", "triton"):
            raise ValueError(f"force must be 'torch' or 'triton', not {force!r}")
        return force == "triton"
    return _HAS_TRITON and (t.is_cuda or switches().triton_interpret)


def _fused():
    from .kernels import fused

    return fused


# ----------------------------------------------------------------------------- RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             *, offset: bool = False, force: str | None = None):
    """offset=False: HF Llama's weight * h.to(input_dtype) (weights are loaded in the model dtype);
    offset=True: HF Gemma's (h * (1 + weight.float())).to(input_dtype), h the fp32 normalised x."""
    if _use_triton(x, force):
        return _fused().rms_norm(x, weight, eps, residual, x.dtype, offset=offset)
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (h * (1.0 + weight.float())).to(x.dtype) if offset else (weight * h.to(x.dtype)).to(x.dtype)
    return (out, x) if residual is not None else out


# ----------------------------------------------------------------------------- SiLU-and-mul
def silu_and_mul(x: torch.Tensor, *, force: str | None = None) -> torch.Tensor:
    if _use_triton(x, force):
        return _fused().silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor, *, force: str | None = None) -> torch.Tensor:
    """gelu_pytorch_tanh(x[..., :I]) * x[..., I:]: HF's act_fn(gate_proj(x)) * up_proj(x), act in the model dtype."""
    if _use_triton(x, force):
        return _fused().silu_and_mul(x, gelu=True)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(rot_dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Plain RoPE frequencies (scaled variants: models.rope.inv_frequencies with the config's rope_scaling)."""
    from .models.rope import inv_frequencies

    return inv_frequencies(rot_dim, base, None)[0].to(device)


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_pos: int, device: torch.device | str | None = None,
                       attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_pos, 2 * len(inv_freq)] float32: cos in the first half, sin in the second."""
    from .models.rope import cos_sin_from_inv_freq

    return cos_sin_from_inv_freq(inv_freq.to(device), max_pos, attention_scaling).contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               interleaved: bool = False, *, force: str | None = None) -> None:
    """Rotate q [T, H, D] and k [T, KVH, D] in place (first rot_dim = cos_sin_cache.shape[-1] dims)."""
    if _use_triton(q, force) and q.stride(-1) == 1 and k.stride(-1) == 1:
        _fused().apply_rope(q, k, positions, cos_sin_cache, interleaved)
        return
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    for x in (q, k):
        xr = x[..., :rot].float()
        if interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            o = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        else:
            x1, x2 = xr[..., :half], xr[..., half:]
            o = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x[..., :rot].copy_(o.to(x.dtype))

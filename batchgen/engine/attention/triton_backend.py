"""Triton attention backend: paged decode (split-K), paged varlen prefill/mixed, K/V cache writes.

    from batchgen.engine.attention.triton_backend import make_triton_backend
    backend = make_triton_backend()          # raises RuntimeError if triton is not importable

Everything here is CUDA-graph capturable: no host reads of device values, grids from host bounds
(number of sequences, number of tokens, meta.max_seq_len), early exit beyond a sequence's length.
For decode, meta.max_seq_len only caps the number of splits; a tight bound is not required for
correctness, and the split length is derived per sequence on the device.

FP8 caches (kv_fp8.py): each cache tensor carries its layer's scale, passed to the kernels as a float.
"""
from __future__ import annotations

import importlib.util

import torch

from ..kv_fp8 import scale_of
from .base import AttentionBackend, AttentionMetadata


class TritonAttention(AttentionBackend):
    name = "triton"
    kv_head_major = True  # the decode kernel reads one contiguous run per (block, kv head)
    graph_capturable = True
    fp8_kv = True  # needs e4m3 in Triton: compute capability 8.9+ (the engine checks)

    def __init__(self, decode_num_splits: int | None = None) -> None:
        from .triton_kernels import cache_ops, decode, prefill  # lazy: needs triton

        self._cache_ops, self._decode, self._prefill = cache_ops, decode, prefill
        self.decode_num_splits = decode_num_splits

    def kv_dtype_problem(self, kv_dtype: torch.dtype, model_dtype: torch.dtype | None,
                         device: torch.device) -> str | None:
        if kv_dtype == torch.float8_e4m3fn and device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 9):  # Triton has e4m3 (float8e4nv) from Ada / Hopper on
                return (f"attention 'triton' reads FP8 KV caches on compute capability 8.9+ only (this GPU is "
                        f"{cap[0]}.{cap[1]}): use attention 'torch' or another kv_cache_dtype")
        return super().kv_dtype_problem(kv_dtype, model_dtype, device)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        self._cache_ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, scale_of(k_cache), scale_of(v_cache))

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, window: int | None = None, softcap: float = 0.0) -> torch.Tensor:
        """fused_ops.apply_rope(q, k, positions, cos_sin) + forward(q, k, v, ...) with the rotation and the
        K/V cache write in one kernel (q is rotated in place; k is left unrotated: only the cache is read)."""
        self._cache_ops.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping,
                                      k_scale=scale_of(k_cache), v_scale=scale_of(v_cache))
        return self.attend(q, k_cache, v_cache, meta, scale, window, softcap)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, window: int | None = None,
               softcap: float = 0.0) -> torch.Tensor:
        if q.stride(-1) != 1:
            q = q.contiguous()
        scales = dict(k_scale=scale_of(k_cache), v_scale=scale_of(v_cache), softcap=softcap)
        if meta.decode_only:
            return self._decode.paged_decode(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                meta.max_seq_len, scale, window=window, num_splits=self.decode_num_splits, **scales)
        return self._prefill.paged_prefill(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale, window=window,
            **scales)


def make_triton_backend(**kwargs) -> TritonAttention:
    """kwargs: decode_num_splits (None = heuristic from batch size, kv heads and SM count)."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("attention='triton' needs the `triton` package")
    return TritonAttention(**kwargs)

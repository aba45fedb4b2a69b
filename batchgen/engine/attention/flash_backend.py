"""FlashAttention backend over the paged cache (lazy import; untested on this project's GPU box,
which has no flash-attn: written against the documented APIs).

Preference order:
- FlashAttention-3 (`flash_attn_interface`, Hopper): flash_attn_with_kvcache with page_table and
  cu_seqlens_q handles decode and varlen/mixed steps alike, any page (block) size.
- FlashAttention-2 (`flash_attn`): flash_attn_with_kvcache(block_table=...) for decode and
  flash_attn_varlen_func(block_table=...) for prefill/mixed; FA2's paged path needs the
  block size to be a multiple of 256, so make_flash_backend refuses smaller blocks.

K/V are written by the Triton write_kv kernel (slot -1 skipped; graph-capturable), or by a torch
index_copy_ fallback when triton is missing. The caches are [num_blocks, block_size, kv_heads,
head_dim], which is the paged layout both FA versions take. causal=True with seqlen_q < seqlen_k
aligns the queries to the end of the keys (FA >= 2.1), which is this engine's convention. Soft-capped
scores (Gemma 2) go to flash-attn's own `softcap` (FA >= 2.6 and FA3); an older install refuses such a
model in one line (AttentionBackend.softcap_problem) before anything runs.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from .base import AttentionBackend, AttentionMetadata


def _load_flash():
    """(version, module) of the best importable FlashAttention, or (None, None)."""
    for ver, name in ((3, "flash_attn_interface"), (2, "flash_attn")):
        try:
            mod = importlib.import_module(name)
        except Exception:  # ImportError, or a broken CUDA extension
            continue
        if hasattr(mod, "flash_attn_with_kvcache"):
            return ver, mod
    return None, None


def _window(window: int | None) -> tuple[int, int]:
    return (window - 1, 0) if window else (-1, -1)


def _takes_softcap(*fns) -> bool:
    try:
        return all("softcap" in inspect.signature(f).parameters for f in fns)
    except (TypeError, ValueError):  # a signature Python can't read: don't guess
        return False


class FlashAttention(AttentionBackend):
    name = "flash"
    graph_capturable = True  # with the Triton K/V write (the torch fallback syncs: only without triton)
    any_kv_dtype = False  # flash-attn reads caches in the query's dtype only: no FP8 KV (the engine refuses it)

    def __init__(self) -> None:
        self.version, self.fa = _load_flash()
        if self.fa is None:
            raise RuntimeError("attention='flash' needs flash-attn (flash_attn_interface or flash_attn)")
        try:
            from .triton_kernels.cache_ops import write_kv as triton_write_kv
        except Exception:
            triton_write_kv = None
        self._triton_write_kv = triton_write_kv
        fns = [self.fa.flash_attn_with_kvcache] + ([self.fa.flash_attn_varlen_func] if self.version == 2 else [])
        self.logit_softcap = _takes_softcap(*fns)

    def write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        if k_cache.dtype != k.dtype:  # never silently wrong: flash-attn would read the codes as values
            raise ValueError(f"attention 'flash' needs the KV cache in the model dtype ({k.dtype}), "
                             f"not {k_cache.dtype}: use attention 'triton' or 'torch' for another kv_cache_dtype")
        if self._triton_write_kv is not None and k.is_cuda:
            self._triton_write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            return
        nb, bs, kvh, d = k_cache.shape
        slots = meta.slot_mapping.long()
        keep = slots >= 0  # host sync: not graph-capturable (only without triton)
        k_cache.view(nb * bs, kvh, d).index_copy_(0, slots[keep], k[keep].to(k_cache.dtype))
        v_cache.view(nb * bs, kvh, d).index_copy_(0, slots[keep], v[keep].to(v_cache.dtype))

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               window: int | None = None, softcap: float = 0.0) -> torch.Tensor:
        B = meta.seq_lens.shape[0]
        cap = {"softcap": softcap} if softcap else {}  # only when used: older flash-attn has no such argument
        if self.version == 3:
            # varlen q over the paged cache (decode is q_len 1 everywhere); K/V already written
            out = self.fa.flash_attn_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=meta.seq_lens, page_table=meta.block_tables,
                cu_seqlens_q=meta.query_start_loc, max_seqlen_q=meta.max_query_len,
                softmax_scale=scale, causal=True, window_size=_window(window), **cap)
            return out[0] if isinstance(out, tuple) else out
        if meta.decode_only:
            out = self.fa.flash_attn_with_kvcache(
                q[:B].unsqueeze(1), k_cache, v_cache, cache_seqlens=meta.seq_lens, block_table=meta.block_tables,
                softmax_scale=scale, causal=True, window_size=_window(window), **cap)
            out = out.squeeze(1)
            if q.shape[0] != B:  # padded token rows (CUDA graphs): keep the [T, H, D] contract
                full = torch.zeros_like(q)
                full[:B] = out
                out = full
            return out
        cu_k = meta.cache.get("flash_cu_seqlens_k")
        if cu_k is None:
            cu_k = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
            torch.cumsum(meta.seq_lens, 0, out=cu_k[1:])
            meta.cache["flash_cu_seqlens_k"] = cu_k
        return self.fa.flash_attn_varlen_func(
            q, k_cache, v_cache, cu_seqlens_q=meta.query_start_loc, cu_seqlens_k=cu_k,
            max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_seq_len, softmax_scale=scale,
            causal=True, window_size=_window(window), block_table=meta.block_tables, **cap)


def make_flash_backend(block_size: int) -> FlashAttention:
    """Raises RuntimeError if flash-attn is missing, ValueError if FA2 cannot page this block size."""
    be = FlashAttention()
    if be.version == 2 and block_size % 256:
        raise ValueError(f"flash-attn 2 paged KV needs block_size % 256 == 0 (got {block_size}); "
                         "FlashAttention-3 has no such limit")
    return be

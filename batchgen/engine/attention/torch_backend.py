"""Portable attention in plain PyTorch: correct on CPU and CUDA, the reference for fast backends.

Each step gathers every sequence's context from the paged cache into a padded [B, S] batch and
runs one scaled-dot-product attention with a causal (and optional sliding-window) mask. Memory
grows with B * max_seq_len, which is fine for a reference and for CPU work. An FP8 cache is the
emulation itself (kv_fp8.py): new K/V quantized with the layer's scale, the context dequantized to the
query's dtype before the attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kv_fp8
from .base import AttentionBackend, AttentionMetadata


class _PaddedLayout:
    """Per-step index tensors shared by every layer: flat tokens <-> padded [B, max_q] queries."""

    def __init__(self, meta: AttentionMetadata, device: torch.device) -> None:
        qsl = meta.query_start_loc.long()
        q_lens = qsl[1:] - qsl[:-1]
        B = q_lens.numel()
        max_q = meta.max_query_len
        offs = torch.arange(max_q, device=device)
        self.valid = offs[None, :] < q_lens[:, None]  # [B, max_q]
        # flat index of padded query (b, i); padded entries point at the sequence's first token
        self.flat_index = (qsl[:-1, None] + torch.where(self.valid, offs[None, :], 0)).reshape(-1)
        seq_lens = meta.seq_lens.long()
        self.q_pos = (seq_lens - q_lens)[:, None] + offs[None, :]  # absolute position of each query
        self.B, self.max_q = B, max_q


def _mask(q_pos: torch.Tensor, key_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    k_pos = torch.arange(key_len, device=device)
    allowed = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, max_q, S]
    if window is not None:
        allowed &= k_pos[None, None, :] > q_pos[:, :, None] - window
    return allowed[:, None]  # [B, 1, max_q, S]


class TorchAttention(AttentionBackend):
    name = "torch"  # write_kv works for any cache strides; not graph-capturable (host-sized gathers)
    fp8_kv = True

    def write_kv(self, k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
        bs = k_cache.shape[1]
        slots = meta.slot_mapping.long()
        blk, off = slots // bs, slots % bs  # works for any cache strides (token- or head-major)
        kv_fp8.raw(k_cache)[blk, off] = kv_fp8.raw(kv_fp8.to_cache(k, k_cache))  # raw: FP8 as bytes
        kv_fp8.raw(v_cache)[blk, off] = kv_fp8.raw(kv_fp8.to_cache(v, v_cache))

    def attend(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
               window: int | None = None, softcap: float = 0.0) -> torch.Tensor:
        layout = meta.cache.get("torch_layout")
        if layout is None:
            layout = meta.cache["torch_layout"] = _PaddedLayout(meta, q.device)
        nb, bs, kvh, d = k_cache.shape
        B, max_q = layout.B, layout.max_q
        n_blk = -(-meta.max_seq_len // bs)
        tables = meta.block_tables[:, :n_blk].long()
        S = n_blk * bs
        keys = kv_fp8.raw(k_cache)[tables].reshape(B, S, kvh, d).transpose(1, 2)  # [B, kvh, S, d]
        vals = kv_fp8.raw(v_cache)[tables].reshape(B, S, kvh, d).transpose(1, 2)
        heads = q.shape[1]
        group = heads // kvh
        # GQA without copying K/V: fold each kv head's group of query heads into the query axis
        qp = q[layout.flat_index].view(B, max_q, kvh, group, d).permute(0, 2, 3, 1, 4).reshape(B, kvh, group * max_q, d)
        mask = meta.cache.get(("torch_mask", window, S, group))
        if mask is None:
            m = _mask(layout.q_pos, S, window, q.device)  # [B, 1, max_q, S]
            mask = m[:, :, None].expand(B, 1, group, max_q, S).reshape(B, 1, group * max_q, S)
            meta.cache[("torch_mask", window, S, group)] = mask
        keys, vals = kv_fp8.from_cache(keys, k_cache, q.dtype), kv_fp8.from_cache(vals, v_cache, q.dtype)
        if softcap:
            out = _softcapped_attention(qp, keys, vals, mask, scale, softcap)
        else:
            out = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=mask, scale=scale)
        out = out.view(B, kvh, group, max_q, d).permute(0, 3, 1, 2, 4).reshape(B, max_q, heads, d)
        return out[layout.valid]  # [T, H, d] in flat token order


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                          softcap: float) -> torch.Tensor:
    """transformers' eager attention with soft-capping (Gemma 2), op for op: scores in the query's dtype,
    tanh(s / cap) * cap, the mask, softmax in float32 cast back, then the values."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)

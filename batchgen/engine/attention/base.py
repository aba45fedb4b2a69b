"""The attention backend interface: one call per layer over the step's flat token batch.

A step holds B sequences; sequence b contributes q_len[b] new tokens (its prefill chunk, or 1
for decode), laid out contiguously in a flat batch of T tokens. K/V of the new tokens are written
into the paged cache first (at slot_mapping), then each query attends causally to its sequence's
cached context [0, seq_len[b]).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    max_query_len: int  # host ints, known when the batch is built (CUDA graphs pass upper bounds)
    max_seq_len: int
    decode_only: bool  # every sequence has exactly one query token
    cache: dict = field(default_factory=dict)  # per-step derived tensors a backend computes once for all layers


class AttentionBackend:
    """Stateless per-layer attention over a paged KV cache."""

    name: str = "base"
    # capabilities the engine asks for instead of testing names:
    kv_head_major: bool = False  # caches stored [blocks, kv_heads, block_size, head_dim] (viewed token-major)
    graph_capturable: bool = False  # launches depend only on host bounds: decode steps may be CUDA graphs
    fp8_kv: bool = False  # reads and writes e4m3 caches with their scales (kv_fp8.py)
    any_kv_dtype: bool = True  # caches may be in another dtype than the queries (else: the model's dtype only)
    logit_softcap: bool = True  # can soft-cap the attention scores (Gemma 2: tanh(s / cap) * cap before the mask)

    def softcap_problem(self, softcap: float) -> str | None:
        """Why this backend can't run a model whose attention scores are soft-capped at softcap (0: none), in
        words; None when it can."""
        if softcap and not self.logit_softcap:
            return (f"attention '{self.name}' can't soft-cap attention logits (this model's attn_logit_softcapping "
                    f"is {softcap:g}): use attention 'triton' or 'torch'")
        return None

    def kv_dtype_problem(self, kv_dtype: torch.dtype, model_dtype: torch.dtype | None,
                         device: torch.device) -> str | None:
        """Why this backend can't run caches of kv_dtype for a model of model_dtype (None: not known yet) on
        device, in words; None when it can."""
        if kv_dtype == torch.float8_e4m3fn and not self.fp8_kv:
            return f"attention '{self.name}' reads no FP8 KV cache: use attention 'triton' or 'torch'"
        if model_dtype is not None and kv_dtype != model_dtype and not self.any_kv_dtype:
            return (f"attention '{self.name}' needs the KV cache in the model dtype "
                    f"({str(model_dtype).removeprefix('torch.')}): use kv_cache_dtype 'auto'")
        return None

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """k, v: [T, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, window: int | None = None,
               softcap: float = 0.0) -> torch.Tensor:
        """q: [T, heads, head_dim] -> [T, heads, head_dim] (GQA: heads % kv_heads == 0).
        window: sliding-window layers attend only to the `window` most recent positions (incl. self).
        softcap > 0: each score s = scale * q.k becomes tanh(s / softcap) * softcap before the mask."""
        raise NotImplementedError

    def forward_rope(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float, window: int | None = None, softcap: float = 0.0) -> torch.Tensor:
        """RoPE on q and k (cos_sin: [max_pos, head_dim] cos | sin), then forward. Backends may fuse the
        rotation with the cache write (q is rotated in place; k may be left unrotated)."""
        from .. import fused_ops

        fused_ops.apply_rope(q, k, positions, cos_sin)
        return self.forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                window: int | None = None, softcap: float = 0.0) -> torch.Tensor:
        self.write_kv(k, v, k_cache, v_cache, meta)
        return self.attend(q, k_cache, v_cache, meta, scale, window, softcap)

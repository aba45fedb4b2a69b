"""One decoder for the Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM2), Phi-3 and the
MoE models (Qwen3-MoE, Mixtral: sparse layers' MLP is a models/moe.py SparseMoeBlock).

Works on the flat token batch of a step: x is [T, hidden]; attention goes through a backend
over the paged KV cache. q/k/v and gate/up projections are fused into one matmul each.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import fused_ops
from ..attention.base import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .moe import moe_mlp
from .rope import cos_sin_table


class RMSNorm(nn.Module):
    offset = False  # weight, not Gemma's 1 + weight (Fp8Linear.from_norm reads it)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual), fused on CUDA.
        Same op order as transformers' LlamaRMSNorm: normalise in float32, scale in the input dtype."""
        return fused_ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, window: int | None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5
        self.window = window

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), positions, cos_sin, kv, meta, backend))

    def attend(self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        """Packed q|k|v [T, ...] -> attention output [T, heads * head_dim] (before o_proj)."""
        T = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        v = v.view(T, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = backend.forward_rope(q, k, v, positions, cos_sin, kv[0], kv[1], meta, self.scale, self.window)
        return out.reshape(T, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up) of gate_up_proj's output."""
        if hasattr(self.down_proj, "of_gated"):  # quant.Fp8Linear: the product comes quantized for it
            return self.down_proj.of_gated(gate_up)
        return self.down_proj(fused_ops.silu_and_mul(gate_up))


def norm_then(norm: nn.Module, proj: nn.Module, x: torch.Tensor,
              residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(x + residual)), x + residual); without a residual (proj(norm(x)), x). proj: the projection
    after the norm (or any module of the normed rows); a quant.Fp8Linear above decode size takes the norm's
    output quantized from the norm's own kernel (Fp8Linear.from_norm)."""
    if hasattr(proj, "from_norm"):
        return proj.from_norm(x, norm.weight, norm.eps, residual, offset=norm.offset)
    if residual is None:
        return proj(norm(x)), x
    h, residual = norm(x, residual)
    return proj(h), residual


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool, window: int | None, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, qkv_bias, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg)  # a sparse layer's SparseMoeBlock (models/moe.py)

    def forward(self, x, residual, positions, cos_sin, kv, meta, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it): the add is fused into the next norm."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = norm_then(self.input_layernorm, attn.qkv_proj, x, residual)
        h = attn.o_proj(attn.attend(qkv, positions, cos_sin, kv, meta, backend))
        if not isinstance(mlp, MLP):  # a sparse layer's SparseMoeBlock, on the normed rows
            return norm_then(self.post_attention_layernorm, mlp, h, residual)
        gate_up, residual = norm_then(self.post_attention_layernorm, mlp.gate_up_proj, h, residual)
        return mlp.down(gate_up), residual

    def forward_fused(self, h, positions, cos_sin, kv, meta, backend) -> torch.Tensor:
        """Decode-sized steps (linear_layout.fused_decode_rows): each residual add inside the GEMM
        before it, SiLU-and-mul in gate_up's epilogue (InputMajorLinear.normed / add_to). h is the
        residual stream, updated in place and returned."""
        attn, mlp = self.self_attn, self.mlp
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        out = attn.attend(attn.qkv_proj.normed(h, ln1.weight, ln1.eps), positions, cos_sin, kv, meta, backend)
        attn.o_proj.add_to(h, out)
        return mlp.down_proj.add_to(h, mlp.gate_up_proj.normed(h, ln2.weight, ln2.eps, gated=True))


class LlamaModel(nn.Module):
    """Decoder + LM head. forward() returns final hidden states; logits() projects chosen rows only."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias, w, moe_mlp(cfg, i))
                                    for i, w in enumerate(cfg.layer_windows))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_rows = 0  # steps of at most this many tokens run DecoderLayer.forward_fused (set by the engine)
        table = cos_sin_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        if x.shape[0] <= self.fused_rows:
            for layer, kv in zip(self.layers, kv_caches):
                x = layer.forward_fused(x, positions, self.cos_sin, kv, meta, backend)
            return self.norm(x)
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, self.cos_sin, kv, meta, backend)
        return self.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

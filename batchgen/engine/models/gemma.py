"""One decoder for Gemma 2 and Gemma 3 (text), on the flat token batch of a step like llama.py.

What differs from the Llama family, each matching transformers' numerics op for op:
- RMSNorm scales by (1 + w), in float32, rounded once (fused_ops.rms_norm offset=True); four per layer:
  input, post-attention, pre- and post-feed-forward (the residual add rides on the next norm, as in llama.py).
- Embeddings times sqrt(hidden), that factor rounded to the model dtype first.
- GeGLU MLP: gelu_pytorch_tanh(gate) * up.
- Attention scale query_pre_attn_scalar ** -0.5; Gemma 2 soft-caps the scores (tanh(s / cap) * cap before
  the mask, in the attention backend) and the LM head's logits; Gemma 3 RMS-normalises q and k per head.
- Sliding-window layers alternate with global ones (ModelConfig.layer_windows); Gemma 3's sliding layers
  rotate with their own rope base (rope_local_base_freq), its global ones with rope_theta and rope_scaling.
- Tied embeddings (the checkpoints carry no lm_head).
The fused decode layer (llama.DecoderLayer.forward_fused: SiLU in the GEMM epilogue, two norms) is Llama's
shape: Gemma always takes this unfused path, whatever the engine sets fused_rows to.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import fused_ops
from ..attention.base import AttentionBackend, AttentionMetadata
from .config import ModelConfig
from .llama import norm_then
from .rope import cos_sin_table


class GemmaRMSNorm(nn.Module):
    offset = True  # scales by 1 + weight (Fp8Linear.from_norm reads it)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with residual (norm(x + residual), x + residual) like llama.RMSNorm."""
        return fused_ops.rms_norm(x, self.weight, self.eps, residual, offset=True)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, local: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.gemma.query_pre_attn_scalar ** -0.5
        self.softcap = cfg.gemma.attn_softcap
        self.window = window
        self.local = local  # takes the local rope table (Gemma 3's sliding layers)

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
        out = backend.forward_rope(q, k, v, positions, cos_sin, kv[0], kv[1], meta, self.scale, self.window,
                                   softcap=self.softcap)
        return out.reshape(T, self.q_size)


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(gelu_tanh(gate) * up) of gate_up_proj's output."""
        if hasattr(self.down_proj, "of_gated"):  # quant.Fp8Linear: the product comes quantized for it
            return self.down_proj.of_gated(gate_up, gelu=True)
        return self.down_proj(fused_ops.gelu_tanh_and_mul(gate_up))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, local: bool) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.self_attn = GemmaAttention(cfg, window, local)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x, residual, positions, cos_sin, kv, meta, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's normed MLP output, the residual stream before it): the add is fused into the next norm.
        The norms before qkv_proj and gate_up_proj take the residual add, as in llama.py (norm_then); the
        sandwich norms after o_proj and down_proj feed no projection."""
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = norm_then(self.input_layernorm, attn.qkv_proj, x, residual)
        h = self.post_attention_layernorm(attn.o_proj(attn.attend(qkv, positions, cos_sin, kv, meta, backend)))
        gate_up, residual = norm_then(self.pre_feedforward_layernorm, mlp.gate_up_proj, h, residual)
        return self.post_feedforward_layernorm(mlp.down(gate_up)), residual


class GemmaModel(nn.Module):
    """Decoder + LM head, the interface of llama.LlamaModel: forward() -> final hidden states, logits(rows)."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool = False) -> None:
        """qkv_bias is not read: gemma_config refuses attention_bias, and the q_proj biases a multimodal Gemma 3
        checkpoint holds are its vision tower's."""
        super().__init__()
        if cfg.gemma is None:
            raise ValueError(f"GemmaModel needs a Gemma config (model_type {cfg.model_type})")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, w, local)
                                    for w, local in zip(cfg.layer_windows, cfg.gemma.local_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_rows = 0  # set by the engine for llama.py's fused decode layer; never used here
        self.attn_softcap = cfg.gemma.attn_softcap  # what the engine asks the attention backend for
        self.final_softcap = cfg.gemma.final_softcap
        self._embed_scales: dict[torch.dtype, float] = {}
        for name, table in self.rope_tables().items():
            self.register_buffer(name, table, persistent=False)

    def rope_tables(self) -> dict[str, torch.Tensor]:
        """The cos/sin tables (float32), by buffer name: the global one, and Gemma 3's local one (loader.build_model
        recomputes them on the device after allocating the model on meta)."""
        cfg, spec = self.cfg, self.cfg.gemma
        tables = {"cos_sin": cos_sin_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                           cfg.max_position_embeddings)}
        if spec.local_rope_theta is not None:
            tables["cos_sin_local"] = cos_sin_table(cfg.rotary_dim, spec.local_rope_theta, spec.local_rope_scaling,
                                                    cfg.max_position_embeddings)
        return tables

    def _embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden) rounded to the model dtype, as transformers multiplies (bf16: sqrt(3072) -> 55.5)."""
        if dtype not in self._embed_scales:
            self._embed_scales[dtype] = float(torch.tensor(self.cfg.hidden_size ** 0.5, dtype=torch.float32).to(dtype))
        return self._embed_scales[dtype]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, backend: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x, residual = x * self._embed_scale(x.dtype), None
        local = getattr(self, "cos_sin_local", self.cos_sin)
        for layer, kv in zip(self.layers, kv_caches):
            cos_sin = local if layer.self_attn.local else self.cos_sin
            x, residual = layer(x, residual, positions, cos_sin, kv, meta, backend)
        return self.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap:  # in the model dtype, as transformers does, then float32 for the sampler
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits.float()

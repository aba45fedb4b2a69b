"""Gemma 2 and Gemma 3 (text) config.json -> the flat dict ModelConfig reads, plus the Gemma-only settings.

Hub configs name only what differs from transformers' defaults (Gemma 3's multimodal config.json keeps
just six keys of its text_config), so the defaults of Gemma2Config / Gemma3TextConfig are filled in
here, and the layer pattern is spelled out as layer_types the way their __post_init__ does:
- Gemma 2: sliding and global layers alternate, layer 0 sliding ((i + 1) % 2).
- Gemma 3: `sliding_window_pattern` (default 6): layer i is sliding unless (i + 1) % pattern == 0.
Rope: Gemma 3's global layers use rope_theta with rope_scaling (linear x8 on 4B/12B/27B), its local
(sliding) ones rope_local_base_freq; transformers >= 5 writes both as rope_parameters keyed by layer
type. Gemma 2 has one rope for every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GEMMA_TYPES = ("gemma2", "gemma3_text", "gemma3")  # gemma3: Gemma3ForConditionalGeneration, its text model
_COMMON = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
               num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
               tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
               hidden_activation="gelu_pytorch_tanh", attention_bias=False)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma2": dict(_COMMON, max_position_embeddings=8192, rope_theta=10000.0, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON, vocab_size=262208, max_position_embeddings=131072, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, sliding_window_pattern=6, final_logit_softcapping=None,
                        attn_logit_softcapping=None),
}


class GemmaConfigError(ValueError):
    """A Gemma config this implementation does not run (one line)."""


@dataclass(frozen=True)
class GemmaSpec:
    """What a Gemma decoder needs beyond the Llama-shaped ModelConfig fields."""
    family: str  # "gemma2" | "gemma3"
    query_pre_attn_scalar: float  # attention scale = query_pre_attn_scalar ** -0.5
    attn_softcap: float  # tanh(s / cap) * cap on the attention scores (0: off)
    final_softcap: float  # the same on the LM head's logits (0: off)
    local_layers: tuple[bool, ...]  # sliding_attention layers (Gemma 3: these take the local rope)
    local_rope_theta: float | None  # Gemma 3's local rope (None: every layer takes the global one, Gemma 2)
    local_rope_scaling: dict | None


def read(d: dict[str, Any]) -> tuple[dict[str, Any], GemmaSpec]:
    """(the text model's config with defaults and layer_types filled in, its GemmaSpec)."""
    mt = d.get("model_type")
    if mt == "gemma3":  # the multimodal wrapper: its text model runs; the vision tower's weights are skipped
        top = {k: d[k] for k in ("architectures", "torch_dtype", "dtype", "eos_token_id") if d.get(k) is not None}
        # the wrapper's own tie_word_embeddings decides (Gemma3Config's default: True), not its text_config's
        top["tie_word_embeddings"] = d.get("tie_word_embeddings", True)
        d = {**(d.get("text_config") or {}), **top, "model_type": "gemma3"}
    text_type = "gemma2" if mt == "gemma2" else "gemma3_text"
    d = {**_DEFAULTS[text_type], **d}  # a key set to null stays None (no window, no soft-cap), as in transformers
    if d.get("hidden_activation") is None:  # as transformers reads a null one (hidden_act is not read)
        d["hidden_activation"] = "gelu_pytorch_tanh"
    _refuse_unsupported(d, mt)
    layers = d["num_hidden_layers"]
    if not d.get("layer_types"):
        pattern = 2 if mt == "gemma2" else int(d.get("sliding_window_pattern") or 6)
        d["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    local = tuple(t == "sliding_attention" for t in d["layer_types"])
    local_theta, local_scaling = None, None
    if mt != "gemma2":
        d, local_theta, local_scaling = _gemma3_rope(d)
    spec = GemmaSpec(
        family="gemma2" if mt == "gemma2" else "gemma3",
        query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
        attn_softcap=float(d.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(d.get("final_logit_softcapping") or 0.0),
        local_layers=local, local_rope_theta=local_theta, local_rope_scaling=local_scaling)
    return d, spec


def _refuse_unsupported(d: dict[str, Any], mt: str) -> None:
    if d["hidden_activation"] != "gelu_pytorch_tanh":
        raise GemmaConfigError(f"{mt}: hidden_activation {d['hidden_activation']!r} is not supported "
                               "(batchgen's Gemma runs gelu_pytorch_tanh)")
    if d.get("use_bidirectional_attention"):
        raise GemmaConfigError(f"{mt}: use_bidirectional_attention (an embedding model) is not supported: "
                               "batchgen generates with causal attention")
    if d.get("attention_bias"):
        raise GemmaConfigError(f"{mt}: attention_bias is not supported")
    if len(d.get("layer_types") or [None] * d["num_hidden_layers"]) != d["num_hidden_layers"]:
        raise GemmaConfigError(f"{mt}: layer_types has {len(d['layer_types'])} entries for "
                               f"{d['num_hidden_layers']} layers")


def _gemma3_rope(d: dict[str, Any]) -> tuple[dict[str, Any], float, dict | None]:
    """Gemma 3's two ropes: d with the global one as flat rope_parameters (what ModelConfig reads), and the
    local one's (theta, scaling or None)."""
    from .config import _rope  # lazy: config imports this module

    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # transformers >= 5
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:  # transformers 4.x: rope_theta + rope_scaling for the global layers, rope_local_base_freq local
        full = dict(d.get("rope_scaling") or params or {})
        local = {}
    full.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", d.get("rope_local_base_freq", 10000.0))
    d = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_parameters")}
    d["rope_parameters"] = full
    d["rope_theta"] = full["rope_theta"]
    theta, scaling, _ = _rope({"rope_parameters": local}, d["head_dim"])
    return d, theta, scaling

"""The model description the engine needs, read from a Hugging Face config.json dict."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import gemma_config
from .moe_config import MoeConfig, moe_config

# model_type -> our implementation (all share the Llama-style decoder in llama.py; Phi-3's checkpoints
# already store the fused qkv_proj / gate_up_proj we use, and its partial rotary / longrope live in rope.py;
# Gemma 2 / 3 run gemma.py, their config is read by gemma_config.py)
# Qwen3-MoE and Mixtral: the same decoder with sparse MoE blocks (models/moe.py) where the config has experts
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", *gemma_config.GEMMA_TYPES, "qwen3_moe", "mixtral")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # rope_type and its parameters (None: plain RoPE)
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k before RoPE
    layer_windows: tuple[int | None, ...]  # sliding window per layer (None: full attention)
    torch_dtype: str | None
    rotary_dim: int  # leading dims of each head that RoPE rotates (partial_rotary_factor * head_dim); the rest pass
    gemma: gemma_config.GemmaSpec | None = None  # Gemma 2 / 3: soft-caps, attention scale, local rope (gemma.py)
    moe: MoeConfig | None = None  # experts, routing and which layers are sparse (None: a dense model)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures") or [mt]
            raise UnsupportedModelError(
                f"unsupported model architecture {archs[0]!r} (model_type {mt!r}); batchgen supports "
                "Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/2.5, Qwen3, SmolLM2, Phi-3/3.5/Phi-4-mini, Gemma 2, "
                "Gemma 3 (text), Qwen3-MoE and Mixtral "
                f"(model_type one of {', '.join(SUPPORTED_MODEL_TYPES)})")
        gemma = None
        if mt in gemma_config.GEMMA_TYPES:
            try:
                d, gemma = gemma_config.read(d)
            except gemma_config.GemmaConfigError as e:
                raise UnsupportedModelError(f"unsupported model configuration: {e}") from None
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        layers = d["num_hidden_layers"]
        head_dim = d.get("head_dim") or hidden // heads
        theta, scaling, rotary_dim = _rope(d, head_dim)
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe") or (gemma is not None and gemma.family == "gemma3"),
            layer_windows=_layer_windows(d, layers),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
            rotary_dim=rotary_dim,
            gemma=gemma,
            moe=moe_config(d, layers),
        )


def _rope(d: dict[str, Any], head_dim: int) -> tuple[float, dict | None, int]:
    """(theta, scaling or None for plain RoPE, rotary_dim) the way transformers' standardize_rope_params reads them."""
    # transformers >= 5 keeps rope settings in rope_parameters (theta included); 4.x in rope_theta/rope_scaling
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
    partial = rope.pop("partial_rotary_factor", None) or d.get("partial_rotary_factor") or 1.0
    rotary_dim = int(head_dim * float(partial))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if d.get("model_type") == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config's names for it before transformers 4.42
    if rope_type in (None, "default"):
        return theta, None, rotary_dim
    scaling = {**rope, "rope_type": rope_type}
    if rope_type == "longrope":
        max_pos = int(d.get("max_position_embeddings", 4096))
        # a top-level original_max_position_embeddings wins over the rope dict's (as in transformers)
        orig = int(d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos)
        scaling["original_max_position_embeddings"] = orig
        if scaling.get("factor") is None:  # Phi-3: the context extension ratio
            scaling["factor"] = max_pos / orig
    return theta, scaling, rotary_dim


def _layer_windows(d: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" and window else None for t in types)
    if d.get("model_type") in ("qwen2", "qwen3"):
        # Qwen: sliding window only when use_sliding_window, on layers >= max_window_layers
        if not d.get("use_sliding_window") or not window:
            return (None,) * layers
        first = d.get("max_window_layers", layers)
        return tuple(window if i >= first else None for i in range(layers))
    if d.get("model_type") == "qwen3_moe" and not d.get("use_sliding_window"):
        window = None  # transformers' Qwen3-MoE: the window only with use_sliding_window, then on every layer
    return (window,) * layers if window else (None,) * layers

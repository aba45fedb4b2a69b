"""What `batchgen run --dry-run` says about the model: the implementation, attention backend and dtype the
engine will give it, from its config.json alone (no weights load). The engine's own functions decide
(ModelConfig.from_hf, the device pick, attention.get_backend, loader.resolve_dtype), so the line can't
drift from what a run does; torch is imported (preflight already did)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, JobConfig
from ..prompt.tokenizer import model_location

# model_type -> the engine's implementation of it; every family not named here runs the shared
# Llama-style decoder (models/llama.py) with its per-family pieces switched on by ModelConfig
IMPLEMENTATIONS: dict[str, str] = {"gemma2": "gemma decoder", "gemma3_text": "gemma decoder",
                                   "gemma3": "gemma decoder (the text model)"}
DEFAULT_IMPLEMENTATION = "llama decoder"


@dataclass(frozen=True)
class ModelPlan:
    """How a run would set the model up."""

    implementation: str
    model_type: str
    details: tuple[str, ...]  # what the config says beyond the model_type: architecture, rope, windows...
    device: str
    attention: str
    dtype: str | None  # None: not known before a GGUF is converted
    tensor_parallel: int = 1

    def line(self) -> str:
        what = ", ".join((f"model_type {self.model_type}", *self.details))
        dtype = f", dtype {self.dtype}" if self.dtype else ""
        tp = ""
        if self.tensor_parallel > 1:
            tp = f", tensor parallel {self.tensor_parallel} ({'nccl' if self.device.startswith('cuda') else 'gloo'})"
        return f"model: {self.implementation} ({what}), attention {self.attention} on {self.device}{dtype}{tp}"


def model_plan(cfg: JobConfig) -> ModelPlan:
    """The plan for cfg's model on this machine. ConfigError (one line) for a model the engine refuses."""
    from ...engine import model_source
    from ...engine.models.config import ModelConfig, UnsupportedModelError

    try:
        raw = model_source.peek_config(model_location(cfg))
    except model_source.ModelSourceError as e:
        raise ConfigError(f"{cfg.source_path}: model.path: {e}") from None
    device, backend = _device_and_attention(cfg)
    attention = backend.name
    if "gguf_architecture" in raw:  # a GGUF before its first conversion: its config comes from that
        arch = raw["gguf_architecture"] or "unknown"
        return ModelPlan(IMPLEMENTATIONS.get(arch, DEFAULT_IMPLEMENTATION), arch,
                         ("from a GGUF not converted yet: the first run converts it",), device, attention, None)
    try:
        mc = ModelConfig.from_hf(raw)
    except UnsupportedModelError as e:
        raise ConfigError(f"{cfg.source_path}: model.path: {e}") from None
    problem = backend.softcap_problem(mc.gemma.attn_softcap if mc.gemma else 0.0)
    if problem is not None:
        raise ConfigError(f"{cfg.source_path}: engine.attention: {problem}")
    archs = raw.get("architectures") or []
    _check_tensor_parallel(cfg, mc)
    implementation = IMPLEMENTATIONS.get(mc.model_type, DEFAULT_IMPLEMENTATION)
    if mc.moe is not None:  # Qwen3-MoE, Mixtral: the decoder with sparse MoE blocks (engine/models/moe.py)
        from ...engine.models.moe import implementation as moe_implementation

        implementation += f" with {moe_implementation(device)}"
    return ModelPlan(implementation, mc.model_type, (*archs[:1], *_features(mc)), device, attention,
                     _dtype(cfg, mc, device), cfg.engine.tensor_parallel)


def _check_tensor_parallel(cfg: JobConfig, mc: Any) -> None:
    """engine.tensor_parallel this model can't be split over: the engine's own line, naming the key."""
    from ...engine.parallel.shard import shard_problem

    problem = shard_problem(mc, cfg.engine.tensor_parallel) if cfg.engine.tensor_parallel > 1 else None
    if problem is not None:
        where = cfg.locations.get("engine.tensor_parallel", cfg.source_path)
        raise ConfigError(f"{where}: engine.tensor_parallel: {problem}")


def _device_and_attention(cfg: JobConfig) -> tuple[str, Any]:
    """The device and attention backend the Engine picks for the job's engine.device / engine.attention."""
    from ...engine.attention import get_backend
    from ...engine.engine import _pick_device

    device = _pick_device(cfg.engine.device)
    return str(device), get_backend(cfg.engine.attention, device, cfg.engine.block_size)


def _dtype(cfg: JobConfig, mc: Any, device: str) -> str:
    import torch

    from ...engine.loader import resolve_dtype

    return str(resolve_dtype(cfg.model.dtype, mc, torch.device(device))).removeprefix("torch.")


def _features(mc: Any) -> tuple[str, ...]:
    out = []
    if mc.rope_scaling:
        out.append(f"rope {mc.rope_scaling.get('rope_type')}")
    windows = [w for w in mc.layer_windows if w]
    if windows:
        out.append(f"sliding window {max(windows)} on {len(windows)}/{len(mc.layer_windows)} layers")
    if mc.qk_norm:
        out.append("q/k norm")
    if mc.gemma is not None:
        out += _gemma_features(mc.gemma)
    if mc.moe is not None:
        out.append(mc.moe.describe())
    if mc.tie_word_embeddings:
        out.append("tied embeddings")
    return tuple(out)


def _gemma_features(g: Any) -> list[str]:
    out = [f"attention scale {g.query_pre_attn_scalar:g}^-0.5"]
    if g.attn_softcap:
        out.append(f"attention soft-cap {g.attn_softcap:g}")
    if g.final_softcap:
        out.append(f"logit soft-cap {g.final_softcap:g}")
    if g.local_rope_theta is not None:
        out.append(f"local rope theta {g.local_rope_theta:g}")
    return out

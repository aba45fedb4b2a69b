"""Build the native model from a Hugging Face model directory and load its safetensors weights.

transformers provides tokenizer, config and generation config; its modeling code is not used.
Paths, hub ids, GGUF files and the embedded demo model are resolved by model_source.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .fp8_checkpoint import read_fp8_scheme
from .fp8_weights import Fp8Reader
from .moe_weights import complete as moe_complete, load_moe_tensor
from .models.config import ModelConfig
from .models.gemma import GemmaModel
from .models.llama import LlamaModel
from .models.rope import cos_sin_table

# HF parameter names -> (our parameter, which shard of a fused weight: index among the parts, parts)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def read_config(model_dir: Path) -> tuple[dict, ModelConfig]:
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return raw, ModelConfig.from_hf(raw)


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    # on GPU: the checkpoint's half type, bf16 when it says float32 or nothing
    return torch.float16 if cfg.torch_dtype in ("float16", "torch.float16") else torch.bfloat16


def _safetensor_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return files


def _has_qkv_bias(files: list[Path]) -> bool:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if any(k.endswith("self_attn.q_proj.bias") for k in st.keys()):
                return True
    return False


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, qkv_bias: bool) -> LlamaModel:
    """Allocate the model on `device` without running random initialisation (weights come next)."""
    decoder = GemmaModel if cfg.gemma is not None else LlamaModel  # Gemma 2 / 3: models/gemma.py
    with torch.device("meta"):
        model = decoder(cfg, qkv_bias=qkv_bias)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie: restore it
        model.lm_head.weight = model.embed_tokens.weight
    tables = model.rope_tables() if hasattr(model, "rope_tables") else {
        "cos_sin": cos_sin_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)}
    for name, table in tables.items():
        setattr(model, name, table.to(device))  # kept float32; cast per use
    return model.eval().requires_grad_(False)


def load_weights(model: LlamaModel, model_dir: Path, fp8: Fp8Reader | None = None) -> None:
    """Copy the checkpoint's tensors into the model; `fp8` (an FP8 checkpoint) dequantizes its FP8 weights."""
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    cfg = model.cfg
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    part_rows = {"self_attn.qkv_proj": [0, q, q + kv, q + 2 * kv],
                 "mlp.gate_up_proj": [0, cfg.intermediate_size, 2 * cfg.intermediate_size]}
    for f in _safetensor_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                moe_keys = load_moe_tensor(name, st, params, fp8) if cfg.moe is not None else None
                if moe_keys is not None:  # an expert or router weight (moe_weights.py)
                    loaded.update(moe_keys)
                    continue
                target, rows = _target(name, part_rows)
                if target is None or target not in params:
                    continue  # rotary inv_freq and other buffers some checkpoints carry
                t = st.get_tensor(name) if fp8 is None else fp8.get(st, name, target, rows)
                p = params[target]
                with torch.no_grad():
                    dst = p if rows is None else p[rows[0]:rows[1]]
                    if dst.shape != t.shape:
                        raise ValueError(f"weight {name}: checkpoint shape {tuple(t.shape)} != model {tuple(dst.shape)}")
                    dst.copy_(t.to(p.dtype))
                loaded.update(_loaded_keys(target, rows, part_rows))
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    loaded |= moe_complete(loaded, params)
    expected = set()
    for n, p in params.items():
        fused = next((rows for key, rows in part_rows.items() if n.endswith(f"{key}.weight") or n.endswith(f"{key}.bias")), None)
        expected.update(f"{n}[{r}]" for r in fused[:-1]) if fused else expected.add(n)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} weights, e.g. {missing[:3]}")


def _loaded_keys(target: str, rows: tuple[int, int] | None, part_rows: dict[str, list[int]]) -> list[str]:
    """What one checkpoint tensor fills: a shard of a fused weight, or a whole one (Phi-3 stores qkv_proj
    and gate_up_proj already fused), which covers every shard."""
    if rows is not None:
        return [f"{target}[{rows[0]}]"]
    fused = next((r for key, r in part_rows.items() if target.endswith((f"{key}.weight", f"{key}.bias"))), None)
    return [f"{target}[{r}]" for r in fused[:-1]] if fused else [target]


def _target(name: str, part_rows: dict[str, list[int]]) -> tuple[str | None, tuple[int, int] | None]:
    for wrapped in ("model.language_model.", "language_model.model.", "language_model."):
        if name.startswith(wrapped):  # Gemma 3's multimodal checkpoints: the text model (its vision tower is skipped)
            name = ("" if name.startswith("language_model.lm_head.") else "model.") + name[len(wrapped):]
            break
    if name.startswith("model."):
        name = name[len("model."):]
    elif not name.startswith("lm_head."):
        return None, None
    for hf, (ours, idx) in _FUSED.items():
        for suffix in (".weight", ".bias"):
            if name.endswith(hf + suffix):
                bounds = part_rows[ours]
                return name[: -len(hf + suffix)] + ours + suffix, (bounds[idx], bounds[idx + 1])
    return name, None


def init_random(model: LlamaModel, seed: int = 0, std: float = 0.02) -> None:
    """Random weights of the right shape, for benchmarks (speed does not depend on values)."""
    g = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)


def load_model(model_dir: Path, device: torch.device, dtype: str | torch.dtype,
               keep_quantized: bool = False) -> tuple[LlamaModel, dict]:
    """The model and its raw config. An FP8 checkpoint (fp8_checkpoint.py) loads dequantized to `dtype` and
    leaves `model.fp8_checkpoint` (a QuantizedWeights; with keep_quantized, every FP8 weight as stored)."""
    raw, cfg = read_config(model_dir)
    scheme = read_fp8_scheme(raw)  # before any allocation: an unsupported format fails fast
    files = _safetensor_files(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg, device)
    model = build_model(cfg, device, torch_dtype, _has_qkv_bias(files))
    fp8 = None if scheme is None else Fp8Reader(scheme, files, device, keep_quantized)
    load_weights(model, model_dir, fp8)
    if fp8 is not None:
        model.fp8_checkpoint = fp8.finish(torch_dtype)
    return model, raw

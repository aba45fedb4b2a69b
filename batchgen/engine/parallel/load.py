"""One rank's share of a checkpoint, loaded without the whole model: the model is built on the meta device at
full size, sharded there (shard.py), allocated on the rank's device, and each checkpoint tensor is cut to
this rank's rows / columns as it is read (one full tensor in host memory at a time).

FP8 checkpoints take the plain path instead (loaded whole on the host, dequantized, then sharded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import loader
from ..fp8_checkpoint import read_fp8_scheme
from ..models.llama import LlamaModel
from ..models.rope import cos_sin_table
from .group import TPGroup
from .shard import head_ranges, shard_model


def load_shard(model_dir: Path, device: torch.device, dtype: Any, group: TPGroup) -> tuple[LlamaModel, dict]:
    """(this rank's sharded model on `device`, the raw config)."""
    raw, cfg = loader.read_config(model_dir)
    if read_fp8_scheme(raw) is not None:
        model, raw = loader.load_model(model_dir, torch.device("cpu"), dtype)
        shard_model(model, group)
        return model.to(device), raw
    files = loader._safetensor_files(model_dir)
    with torch.device("meta"):
        model = LlamaModel(cfg, qkv_bias=loader._has_qkv_bias(files))
    expected = _expected_keys(model)
    shard_model(model, group)
    model = model.to_empty(device=device).to(loader.resolve_dtype(dtype, cfg, device))
    with torch.no_grad():
        model.embed_tokens.weight.zero_()  # the padding rows past the vocabulary stay zero
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        else:
            model.lm_head.weight.zero_()
    model.cos_sin = cos_sin_table(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling,
                                  cfg.max_position_embeddings).to(device)
    _copy_weights(model, cfg, files, group, expected)
    return model.eval().requires_grad_(False), raw


def _part_rows(cfg) -> dict[str, list[int]]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"self_attn.qkv_proj": [0, q, q + kv, q + 2 * kv],
            "mlp.gate_up_proj": [0, cfg.intermediate_size, 2 * cfg.intermediate_size]}


def _expected_keys(model: LlamaModel) -> set[str]:
    """What a complete checkpoint fills, as loader.load_weights counts it (each part of a fused weight)."""
    part_rows, out = _part_rows(model.cfg), set()
    for n, _ in model.named_parameters(remove_duplicate=False):
        fused = next((r for k, r in part_rows.items() if n.endswith((f"{k}.weight", f"{k}.bias"))), None)
        out.update(f"{n}[{r}]" for r in fused[:-1]) if fused else out.add(n)
    if model.cfg.tie_word_embeddings:
        out.discard("lm_head.weight")
    return out


def _copy_weights(model: LlamaModel, cfg, files: list[Path], group: TPGroup, expected: set[str]) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    part_rows, loaded = _part_rows(cfg), set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                target, rows = loader._target(name, part_rows)
                if target is None:
                    continue
                dst_name, dst_rows, t = _local(target, rows, st.get_tensor(name), cfg, group)
                if dst_name not in params:
                    continue  # rotary inv_freq and other buffers some checkpoints carry
                p = params[dst_name]
                dst = p if dst_rows is None else p[dst_rows]
                if dst.shape != t.shape:
                    raise ValueError(f"weight {name}: rank {group.rank}'s share {tuple(t.shape)} != {tuple(dst.shape)}")
                with torch.no_grad():
                    dst.copy_(t.to(p.dtype))
                loaded.update(loader._loaded_keys(target, rows, part_rows))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")


def _local(target: str, rows: tuple[int, int] | None, t: torch.Tensor, cfg,
           group: TPGroup) -> tuple[str, slice | None, torch.Tensor]:
    """(the sharded model's parameter, the rows of it this tensor fills or None, this rank's part of t)."""
    d, r, world = cfg.head_dim, group.rank, group.world
    q, kv = head_ranges(cfg, r, world)
    n = cfg.intermediate_size // world

    def heads(rng: range, base: int = 0) -> torch.Tensor:  # rows of heads base + rng (base: where a part starts)
        return t[(base + rng.start) * d: (base + rng.stop) * d]

    if ".self_attn.qkv_proj." in target:
        hq, hk = len(q) * d, len(kv) * d
        k0, v0 = cfg.num_heads, cfg.num_heads + cfg.num_kv_heads
        if rows is None:  # stored fused (Phi-3): q, k and v parts of one tensor
            return target, None, torch.cat([heads(q), heads(kv, k0), heads(kv, v0)])
        part = _part_rows(cfg)["self_attn.qkv_proj"].index(rows[0])
        dst = [slice(0, hq), slice(hq, hq + hk), slice(hq + hk, hq + 2 * hk)][part]
        return target, dst, heads([q, kv, kv][part])
    if ".mlp.gate_up_proj." in target:
        mine = slice(r * n, (r + 1) * n)
        if rows is None:
            return target, None, torch.cat([t[: cfg.intermediate_size][mine], t[cfg.intermediate_size:][mine]])
        return target, slice(0, n) if rows[0] == 0 else slice(n, 2 * n), t[mine]
    if target.endswith("self_attn.o_proj.weight"):
        return target.replace("o_proj.", "o_proj.linear."), None, t[:, q.start * d: q.stop * d]
    if target.endswith("mlp.down_proj.weight"):
        return target.replace("down_proj.", "down_proj.linear."), None, t[:, r * n: (r + 1) * n]
    if target in ("embed_tokens.weight", "lm_head.weight"):
        per = -(-cfg.vocab_size // world)
        part = t[r * per: (r + 1) * per]
        return target, slice(0, part.shape[0]), part
    return target, None, t

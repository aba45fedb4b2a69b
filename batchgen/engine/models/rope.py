"""Rotary position embeddings: inverse frequencies for the rope types HF configs name, and a cos/sin table."""
from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim // 2] float32, attention_scaling) as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    if kind == "dynamic":
        # NTK base growth only past max_position_embeddings, which the engine never exceeds (max_model_len is
        # capped there): at every reachable length transformers' dynamic inv_freq is the default one
        return inv_freq, 1.0
    if kind == "longrope":
        return longrope_inv_frequencies(head_dim, theta, scaling, long=False)
    raise ValueError(f"unsupported rope_type {kind!r} (supported: default, linear, dynamic, llama3, yarn, longrope)")


def longrope_inv_frequencies(dim: int, theta: float, s: dict, long: bool) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-frequency divisors, long_factor past original_max_position_embeddings, short_factor
    within; one attention factor for both, from the extension ratio (transformers' _compute_longrope_parameters)."""
    orig, factor = s["original_max_position_embeddings"], s["factor"]
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    key = "long_factor" if long else "short_factor"
    if len(s.get(key) or ()) != dim // 2:
        raise ValueError(f"longrope rope scaling: {key} needs {dim // 2} values (rotary dim {dim} / 2), "
                         f"the config has {len(s.get(key) or ())}")
    ext = torch.tensor(s[key], dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * theta ** shape), float(attention)


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, s: dict) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings") or 4096
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    mscale = s.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(old_len / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv, float(mscale)


def cos_sin_table(head_dim: int, theta: float, scaling: dict | None, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half, sin in the second (one gather per step).
    head_dim is the rotary dim: kernels rotate that many leading dims of each head and pass the rest."""
    if scaling is not None and scaling["rope_type"] == "longrope":
        return _longrope_table(head_dim, theta, scaling, max_positions)
    inv_freq, attn_scale = inv_frequencies(head_dim, theta, scaling)
    return cos_sin_from_inv_freq(inv_freq, max_positions, attn_scale)


def _longrope_table(dim: int, theta: float, s: dict, max_positions: int) -> torch.Tensor:
    """Short-factor rows below original_max_position_embeddings, long-factor rows from there on. transformers
    picks the set per forward by max(position) + 1 > original: with its KV cache, a sequence whose prompt fits
    the original window gets exactly these rotations at every position, during generation past the window too
    (keys cached before the switch keep their short rotation). The one difference: a prompt longer than the
    window, which transformers rotates with long factors throughout, keeps short ones below it here (one
    table for every sequence keeps batches and the prefix cache position-pure)."""
    orig = min(int(s["original_max_position_embeddings"]), max_positions)
    short, attn = longrope_inv_frequencies(dim, theta, s, long=False)
    table = cos_sin_from_inv_freq(short, max_positions, attn)
    if orig < max_positions:
        long_, _ = longrope_inv_frequencies(dim, theta, s, long=True)
        table[orig:] = cos_sin_from_inv_freq(long_, max_positions, attn)[orig:]
    return table


def cos_sin_from_inv_freq(inv_freq: torch.Tensor, max_positions: int, attn_scale: float = 1.0) -> torch.Tensor:
    freqs = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos() * attn_scale, freqs.sin() * attn_scale], dim=-1)


ROPE_TABLES = ("cos_sin", "cos_sin_local")  # the buffers models keep their tables in (Gemma 3: a local one too)


def trim_rope_tables(model: torch.nn.Module, positions: int) -> None:
    """Keep the first `positions` rows of the model's cos/sin tables: the engine admits no sequence longer than
    its max_model_len, and a table's rows depend on their position alone (longrope's switch included), so the rest
    is never read. A 131k-position table is 67 MB at head_dim 128 and 134 MB at Gemma's 256, per table."""
    for name in ROPE_TABLES:
        table = getattr(model, name, None)
        if isinstance(table, torch.Tensor) and table.shape[0] > positions:
            setattr(model, name, table[:positions].clone())  # a copy: the full table's memory goes back

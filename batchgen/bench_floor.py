"""The floor of a decode step from the bytes it must read (bench records it for MoE shapes).

A decode step of B sequences reads every weight once (a memory-bound step's time is at least its bytes over
the memory bandwidth), except an MoE layer's experts: only those its B tokens route to. With each token
choosing k of E experts uniformly, the expected number of distinct experts a step touches is
E * (1 - (1 - k / E) ** B) (128 experts, top-8: 8 at B = 1, 125.9 at B = 64, all 128 at B = 256). So:

    bytes = attention + norm weights of every layer + router + expected experts * one expert's bytes (sparse
            layers) or the dense MLP (dense layers) + lm_head + final norm + B embedding rows
            + the batch's KV: B * mean context * layers * 2 * kv_heads * head_dim * KV bytes per value

and the floor time is bytes / bandwidth (the measured copy bandwidth of the GPU where it is known).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine.stats import DecodeTotals, EngineStats

# measured device-to-device copy bandwidth, bytes/s (README "Performance"); by a substring of the device name
BANDWIDTH = {"H200": 4.23e12, "H100": 3.35e12}


def expected_experts(experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts that `batch` tokens touch, each choosing top_k of `experts` uniformly."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


@dataclass(frozen=True)
class DecodeFloor:
    batch: int
    mean_context: float  # KV tokens per sequence the step reads
    experts_touched: float | None  # per sparse layer (None: a dense model)
    weight_bytes: float  # everything but the experts
    expert_bytes: float  # the experts the step's tokens touch, all sparse layers
    kv_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.expert_bytes + self.kv_bytes

    def ms(self, bandwidth: float) -> float:
        return 1000.0 * self.total_bytes / bandwidth


def decode_floor(cfg: Any, batch: int, mean_context: float, weight_bytes: int = 2, kv_bytes: int = 2) -> DecodeFloor:
    """The bytes a decode step of `batch` sequences of `mean_context` KV tokens each must read, for a
    models.config.ModelConfig with weights of `weight_bytes` and a KV cache of `kv_bytes` per value."""
    H, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = H * (q + 2 * kv) + q * H + 2 * H + (2 * cfg.head_dim if cfg.qk_norm else 0)
    moe = getattr(cfg, "moe", None)
    sparse = moe.sparse_layers if moe is not None else (False,) * cfg.num_layers
    touched = expected_experts(moe.num_experts, moe.top_k, batch) if moe is not None else None
    dense_mlp = 3 * H * cfg.intermediate_size
    params = cfg.num_layers * per_layer + sum(dense_mlp for s in sparse if not s)
    if moe is not None:
        params += moe.num_sparse * moe.num_experts * H  # the routers
    params += cfg.vocab_size * H + H + batch * H  # lm_head (tied or not: read once), final norm, embedding rows
    experts = 0.0
    if moe is not None:
        experts = moe.num_sparse * touched * 3 * H * moe.intermediate_size * weight_bytes
    kv_total = batch * mean_context * cfg.num_layers * 2 * kv * kv_bytes
    return DecodeFloor(batch, mean_context, touched, params * weight_bytes, experts, kv_total)


def step_floor_bytes(cfg: Any, batch: int, steps: int, kv_tokens: int, weight_bytes: int = 2,
                     kv_bytes: int = 2) -> float:
    """The bytes `steps` decode steps of `batch` sequences that read `kv_tokens` KV positions in all must read:
    the weights each step at its batch size (a tail step of few sequences touches fewer experts) plus that KV."""
    per_token_kv = decode_floor(cfg, 1, 1.0, weight_bytes, kv_bytes).kv_bytes
    return steps * decode_floor(cfg, batch, 0.0, weight_bytes, kv_bytes).total_bytes + kv_tokens * per_token_kv


def bandwidth_of(device_name: str) -> float | None:
    return next((bw for key, bw in BANDWIDTH.items() if key in device_name), None)


def floor_record(cfg: Any, prompts: list[list[int]], new: list[int], max_num_seqs: int, device_name: str,
                 stats: EngineStats, kv_bytes: int = 2) -> dict[str, Any]:
    """The bench record's `decode_floor`: the floor at the workload's full batch (min(max_num_seqs, requests))
    and the mean context of a sequence over its decode (prompt + half its new tokens), against the run's mean
    decode step GPU time (`fraction_of_floor`: the tail's smaller steps make that mean lower, so it flatters);
    and `run_fraction_of_floor`: every timed decode step's own floor (its batch, the KV it read) summed,
    over the steps' summed GPU time, the figure that holds for the whole run."""
    mean_decode_gpu_ms = stats.mean_decode_gpu_ms
    batch = min(max_num_seqs, len(prompts))
    context = sum(len(p) + n / 2 for p, n in zip(prompts, new)) / len(prompts)
    f = decode_floor(cfg, batch, context, kv_bytes=kv_bytes)
    rec: dict[str, Any] = dict(batch=batch, mean_context=round(context, 1),
                               experts_touched=None if f.experts_touched is None else round(f.experts_touched, 2),
                               bytes=round(f.total_bytes), gb=round(f.total_bytes / 1e9, 3),
                               expert_gb=round(f.expert_bytes / 1e9, 3), kv_gb=round(f.kv_bytes / 1e9, 3))
    bw = bandwidth_of(device_name)
    if bw is not None:
        ms = f.ms(bw)
        rec.update(bandwidth_tb_s=bw / 1e12, floor_ms=round(ms, 3), floor_tok_s=round(batch / ms * 1000, 1))
        if mean_decode_gpu_ms:
            rec["fraction_of_floor"] = round(ms / mean_decode_gpu_ms, 3)
        rec.update(_measured_fractions(cfg, stats.decode_by_batch, batch, bw, kv_bytes))
    return rec


def _measured_fractions(cfg: Any, by_batch: dict[int, DecodeTotals], full: int, bw: float,
                        kv_bytes: int) -> dict[str, Any]:
    """Each timed decode step's own floor against its GPU time: over the whole run, and over the steps of
    the full batch alone (`full_batch_*`: the steady state the workload is sized for)."""
    def floor_ms(b: int, t: DecodeTotals) -> float:
        return 1000.0 * step_floor_bytes(cfg, b, t.steps, t.kv_tokens, kv_bytes=kv_bytes) / bw

    rec: dict[str, Any] = {}
    steps = sum(t.steps for t in by_batch.values())
    busy = sum(t.busy_ms for t in by_batch.values())
    if steps and busy:
        run = sum(floor_ms(b, t) for b, t in by_batch.items())
        rec.update(run_floor_ms_per_step=round(run / steps, 3), run_fraction_of_floor=round(run / busy, 3))
    t = by_batch.get(full)
    if t is not None and t.busy_ms:
        full_ms = floor_ms(full, t)
        rec.update(full_batch_steps=t.steps, full_batch_gpu_ms=round(t.busy_ms / t.steps, 3),
                   full_batch_floor_ms=round(full_ms / t.steps, 3),
                   full_batch_fraction_of_floor=round(full_ms / t.busy_ms, 3))
    return rec

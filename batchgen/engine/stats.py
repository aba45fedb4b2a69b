"""The engine's counters (updated on the step path) and the `EngineStats` snapshot read from them.
Torch-free at import (the events are only type hints), so job code may import EngineStats."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class DecodeTotals:
    """The timed decode steps of one batch size: how many, their GPU busy time, the KV positions they read."""
    steps: int = 0
    busy_ms: float = 0.0
    kv_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """What `Engine.stats` returns: counts since the engine started (or since reset_stats())."""
    steps: int
    requests: int  # accepted
    errors: int  # rejected (finish_reason "error" at intake)
    prompt_tokens: int
    output_tokens: int  # of finished samples
    generated_tokens: int  # every sampled token used, finished or not
    wall_s: float  # time inside generate() / stream() / step() calls
    gpu_busy_fraction: float | None  # GPU busy time over the span from the first step to the last (CUDA)
    host_ms_per_step: float
    output_tok_s: float
    decode_steps: int
    decode_gpu_busy_fraction: float | None  # decode steps' busy time over busy + the gaps before them
    mean_decode_step_ms: float | None
    mean_decode_gpu_ms: float | None
    preemptions: int
    prefix_cache_hit_tokens: int
    kv_cache_tokens: int
    kv_cache_dtype: str = ""  # what the KV cache holds: "bfloat16", "fp8 e4m3", ... (the run summary shows it)
    weights: str = ""  # how the projections run: the model dtype, or Engine.precision ("weights fp8 e4m3 ...")
    # the timed decode steps by batch size: what each step's floor needs (bench_floor.step_floor_bytes), since a
    # run's tail steps hold fewer sequences than its full ones
    decode_by_batch: dict[int, DecodeTotals] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counters:
    """Running totals, bumped by the engine as it works; cheap attribute updates on the step path."""
    steps: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    generated_tokens: int = 0
    requests: int = 0
    errors: int = 0
    wall_s: float = 0.0
    host_s: float = 0.0
    busy_ms: float = 0.0
    decode_steps: int = 0
    decode_busy_ms: float = 0.0
    decode_gap_ms: float = 0.0
    gpu_first: torch.cuda.Event | None = None  # first step's start / last step's end on the GPU timeline
    gpu_last: torch.cuda.Event | None = None
    decode_by_batch: dict[int, DecodeTotals] = field(default_factory=dict)

    def add_gpu_step(self, started: torch.cuda.Event, done: torch.cuda.Event, decode_only: bool,
                     batch: int = 0, kv_tokens: int = 0) -> None:
        """One step's busy time and, for decode steps, the idle gap before it (events already complete), its
        batch size and the KV positions it read."""
        busy = started.elapsed_time(done)
        self.busy_ms += busy
        if decode_only and self.gpu_last is not None:
            self.decode_steps += 1
            self.decode_busy_ms += busy
            self.decode_gap_ms += max(0.0, self.gpu_last.elapsed_time(started))
            totals = self.decode_by_batch.get(batch)
            if totals is None:
                totals = self.decode_by_batch[batch] = DecodeTotals()
            totals.steps += 1
            totals.busy_ms += busy
            totals.kv_tokens += kv_tokens
        self.gpu_first = self.gpu_first or started
        self.gpu_last = done

    def snapshot(self, preemptions: int, prefix_cache_hit_tokens: int, kv_cache_tokens: int,
                 kv_cache_dtype: str = "", weights: str = "") -> EngineStats:
        busy = None
        if self.gpu_first is not None and self.gpu_last is not None:
            span = self.gpu_first.elapsed_time(self.gpu_last)
            busy = min(1.0, self.busy_ms / span) if span > 0 else None
        decode_ms = self.decode_busy_ms + self.decode_gap_ms
        timed = bool(self.decode_busy_ms)
        return EngineStats(
            steps=self.steps, requests=self.requests, errors=self.errors, prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens, generated_tokens=self.generated_tokens, wall_s=self.wall_s,
            gpu_busy_fraction=busy, host_ms_per_step=1000 * self.host_s / max(1, self.steps),
            output_tok_s=self.output_tokens / self.wall_s if self.wall_s else 0.0,
            decode_steps=self.decode_steps,
            decode_gpu_busy_fraction=self.decode_busy_ms / decode_ms if timed else None,
            mean_decode_step_ms=decode_ms / self.decode_steps if timed else None,
            mean_decode_gpu_ms=self.decode_busy_ms / self.decode_steps if timed else None,
            preemptions=preemptions, prefix_cache_hit_tokens=prefix_cache_hit_tokens,
            kv_cache_tokens=kv_cache_tokens, kv_cache_dtype=kv_cache_dtype, weights=weights,
            decode_by_batch={b: replace(t) for b, t in sorted(self.decode_by_batch.items())})

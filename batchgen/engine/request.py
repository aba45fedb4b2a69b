"""The engine's public request and output types, and the per-sample sequence state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "error"]


@dataclass
class SamplingParams:
    """How to sample one request. temperature == 0 means greedy."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = -1  # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # per-request stream; sample j of n uses (seed, j)
    n: int = 1
    stop: list[str] = field(default_factory=list)  # stop strings, removed from the text
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to EOS
    ignore_eos: bool = False
    logprobs: bool = False  # return the log-probability of each chosen token
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """One prompt for Engine.stream: text (no chat template applied) or token ids."""

    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: Any = None  # echoed back on the output; defaults to the input position


@dataclass
class CompletionOutput:
    index: int  # sample index within the request (0..n-1)
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    error: str | None = None
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    request_id: Any
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def error(self) -> str | None:
        return next((o.error for o in self.outputs if o.error), None)

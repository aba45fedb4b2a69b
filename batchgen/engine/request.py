"""The engine's public request and output types, and the per-sample sequence state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .validation import check_sampling_params

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
    top_logprobs: int = 0  # also return the k most likely (token id, log-probability) pairs at each position
    skip_special_tokens: bool = True
    # constrained decoding, at most one (llguidance): the completion is made to match it, and stops when complete
    json_schema: dict[str, Any] | str | None = None  # a JSON schema (dict or JSON text)
    regex: str | None = None
    choice: list[str] | None = None  # exactly one of these strings
    grammar: str | None = None  # a Lark grammar
    json_object: bool = False  # any JSON object
    # reasoning models: the constraint starts after this token (e.g. "</think>"); before it, tokens are free
    reasoning_end: str | None = None

    def __post_init__(self) -> None:
        check_sampling_params(self)  # one clear error per bad field; also normalises types (stop: str -> [str])

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
    logprobs: list[float] | None = None  # of the chosen tokens, under the raw model distribution
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per position: the k most likely (id, logprob)


@dataclass
class RequestOutput:
    request_id: Any
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def error(self) -> str | None:
        return next((o.error for o in self.outputs if o.error), None)

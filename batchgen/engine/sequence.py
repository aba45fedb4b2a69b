"""Host-side state of one sample (Sequence) and of one request with its n samples (RequestGroup)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .request import CompletionOutput, RequestOutput, SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    RETIRING = 3  # at its length cap, its last token still on the device; slot and blocks already given back


@dataclass(eq=False)
class RequestGroup:
    request_id: Any
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list["Sequence"] = field(default_factory=list)
    num_finished: int = 0
    uid: int = 0  # engine-wide serial number: the key of the engine's table of unfinished requests
    position: int = 0  # index in the input of the stream() / generate() call that added it
    owner: Any = None  # who receives the output (the engine's push API or one stream)

    def output(self, tokenizer_decode) -> RequestOutput:
        outs = [s.completion(tokenizer_decode) for s in self.seqs]
        return RequestOutput(self.request_id, self.prompt_ids, outs)


@dataclass(eq=False, slots=True)
class Sequence:
    group: RequestGroup
    index: int  # sample index within the request
    stream_key: int  # sampling stream for (request seed, index)
    stop_ids: frozenset[int]
    max_tokens: int  # prompt + max_new_tokens, capped by the model's maximum length
    token_ids: list[int]  # prompt + generated tokens the host knows
    num_prompt: int = 0
    num_tokens: int = 0  # prompt + generated, including tokens still on the device
    num_computed: int = 0  # tokens whose K/V are written (or being written by a launched step)
    blocks: list[int] = field(default_factory=list)
    num_hashed: int = 0  # leading blocks named in the prefix cache
    last_hash: int = 0
    slot: int = -1
    status: Status = Status.WAITING
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    matcher: Any = None  # llguidance matcher of a constrained sample (constraints.py), else None
    matcher_from: int = -1  # token id after which the matcher applies (reasoning_end), -1: from the start
    finish_reason: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self.num_prompt = self.num_tokens = len(self.token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.group.params

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    def completion(self, decode) -> CompletionOutput:
        gen = self.token_ids[self.num_prompt:]
        if self.error is not None:
            return CompletionOutput(self.index, gen, "", "error", self.error, self.logprobs, self.top_logprobs)
        text = decode(gen, self.params.skip_special_tokens)
        for stop in self.params.stop:  # cut at the earliest stop string
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return CompletionOutput(self.index, gen, text, self.finish_reason or "length", None, self.logprobs,
                                self.top_logprobs)

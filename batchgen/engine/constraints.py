"""Constrained decoding: JSON schemas, regexes, choices and Lark grammars through llguidance.

Why llguidance: it is the grammar engine vLLM and SGLang ship, a CPU wheel with no dependencies, it
compiles JSON schemas, regexes and Lark grammars lazily (no start-up cost per schema, so per-row schemas
are cheap), and it computes token masks in ~40 us per sequence from Rust with the GIL released, in
parallel over a batch (LLExecutor).

Each constrained sample owns a matcher (a copy of its compiled grammar). Per step the host fills the
allowed-token bitmask of the step's rows ([rows, ceil(vocab / 32)] int32, all bits set on free rows)
while the GPU runs the forward pass; the runner applies it to the logits before sampling. After the
step, the sampled tokens advance the matchers; a matcher that can take no more tokens ends its sample
("stop"). llguidance is imported only when the first constrained request arrives.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .validation import grammar_error_line

if TYPE_CHECKING:  # torch only where buffers are made: the job config checks constraints with grammar_text, torch-free
    import torch


class ConstraintError(ValueError):
    """A constraint that does not compile (bad schema, regex or grammar): the request's error."""


@dataclass(frozen=True)
class ConstraintSpec:
    kind: str  # json_schema | json_object | regex | choice | grammar
    source: str  # canonical text: the cache key and what the grammar is built from


def constraint_of(p: Any) -> ConstraintSpec | None:
    """The constraint of a SamplingParams (or of a job's sampling section: same field names), or None."""
    if p.json_schema is not None:
        schema = json.loads(p.json_schema) if isinstance(p.json_schema, str) else p.json_schema
        return ConstraintSpec("json_schema", json.dumps(schema, sort_keys=True))
    if p.json_object:
        return ConstraintSpec("json_object", '{"type": "object"}')
    if p.regex is not None:
        return ConstraintSpec("regex", p.regex)
    if p.choice is not None:
        return ConstraintSpec("choice", json.dumps(p.choice, ensure_ascii=False))
    if p.grammar is not None:
        return ConstraintSpec("grammar", p.grammar)
    return None


def grammar_text(llg: Any, spec: ConstraintSpec) -> str:
    """The llguidance grammar of a constraint (ValueError for a schema that is not JSON)."""
    m = llg.LLMatcher
    if spec.kind in ("json_schema", "json_object"):
        return m.grammar_from_json_schema(spec.source)
    if spec.kind == "regex":
        return m.grammar_from_regex(spec.source)
    if spec.kind == "choice":  # Lark string literals take JSON's escapes
        return m.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                           for c in json.loads(spec.source)))
    return m.grammar_from_lark(spec.source)


class Grammars:
    """Compiled grammars of one engine, the matchers of its constrained samples, and their step bitmasks."""

    CACHE = 512  # compiled grammars kept (per-row schemas: one per distinct schema)

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int], device: torch.device) -> None:
        try:
            import llguidance
            import llguidance.hf
            import llguidance.torch
        except ImportError as e:
            raise ConstraintError("constrained decoding needs llguidance: pip install llguidance") from e
        self.llg, self.vocab_size = llguidance, vocab_size
        if tokenizer is None:
            raise ConstraintError("constrained decoding needs the model's tokenizer")
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids or None)
        self.executor = llguidance.LLExecutor()
        self.width = (vocab_size + 31) // 32
        self._templates: OrderedDict[ConstraintSpec, Any] = OrderedDict()
        # two pinned bitmask buffers, alternating: the copy of step N's mask may still be pending while the
        # host fills step N+1's
        self._pin = device.type == "cuda"
        self._buffers: list[torch.Tensor] = [self._alloc(64), self._alloc(64)]
        self._flip = 0

    def _alloc(self, rows: int) -> torch.Tensor:
        import torch

        return torch.full((rows, self.width), -1, dtype=torch.int32, pin_memory=self._pin)

    def matcher(self, spec: ConstraintSpec) -> Any:
        """A fresh matcher for one sample (a copy of the cached compiled grammar); ConstraintError if it fails."""
        template = self._templates.get(spec)
        if template is None:
            try:
                text = grammar_text(self.llg, spec)
            except ValueError as e:
                raise ConstraintError(f"invalid {spec.kind}: {e}") from None
            template = self.llg.LLMatcher(self.tokenizer, text, log_level=0)
            if template.is_error():
                raise ConstraintError(f"invalid {spec.kind}: {grammar_error_line(template.get_error())}")
            self._templates[spec] = template
            if len(self._templates) > self.CACHE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(spec)
        return template.deep_copy()

    def masks(self, seqs: list[Any]) -> torch.Tensor:
        """Host bitmask [len(seqs), width] of the tokens each row may sample next (all bits on free rows)."""
        buf = self._buffers[self._flip]
        if buf.shape[0] < len(seqs):
            buf = self._buffers[self._flip] = self._alloc(max(len(seqs), 2 * buf.shape[0]))
        self._flip ^= 1
        out = buf[: len(seqs)]
        out.fill_(-1)
        rows = [(s.matcher, i) for i, s in enumerate(seqs)
                if s.matcher is not None and s.matcher_from < 0 and not s.matcher.is_stopped()]
        if rows:
            self.llg.torch.fill_next_token_bitmask_par(self.executor, rows, out)
        return out

    def consume(self, seqs: list[Any], tokens: list[int]) -> None:
        """Advance each sample's matcher by its sampled token (in parallel, GIL released). A matcher waiting for
        the end of a reasoning section starts after that token, which it does not see."""
        pairs = []
        for s, t in zip(seqs, tokens):
            if s.matcher_from < 0:
                pairs.append((s.matcher, t))
            elif t == s.matcher_from:
                s.matcher_from = -1
        if pairs:
            self.executor.consume_token_par(pairs)

    def reasoning_end_id(self, text: str) -> int:
        """The token id of a reasoning section's closing tag; ConstraintError unless it is one token."""
        ids = self.tokenizer.tokenize_str(text)
        if len(ids) != 1:
            raise ConstraintError(f"reasoning_end {text!r} is {len(ids)} tokens for this tokenizer; it must be one")
        return ids[0]

"""A finished request (or a failed row) as output rows, and the ledger counts they add.

The columns and their order are the sink's (sink/columns.py: output_schema, output_row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..prompt.reasoning import split_reasoning
from ..sink.columns import output_row
from .work import WorkItem


@dataclass(frozen=True)
class RowShape:
    """What the job's output rows hold beyond the fixed columns."""

    samples: int  # sampling.n: output rows per input row
    reasoning_tags: tuple[str, str] | None = None  # split the completion's reasoning into its own column
    logprobs: bool = False
    top_logprobs: bool = False


@dataclass(frozen=True)
class RowBatch:
    """One input row's output rows, and what they add to the task's ledger."""

    position: int
    rows: list[dict[str, Any]]
    errors: int  # samples that failed
    prompt_tokens: int  # counted once per row, and only when some sample was generated
    completion_tokens: int

    @property
    def counts(self) -> dict[str, int]:
        return {"error_rows": int(self.errors > 0), "errors": self.errors,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


def error_rows(shape: RowShape, item: WorkItem, message: str) -> RowBatch:
    """Every sample of a row that could not be generated (bad input, too long, a bad per-row value)."""
    rows = [_error_row(item, j, message) for j in range(shape.samples)]
    return RowBatch(item.position, rows, errors=shape.samples, prompt_tokens=0, completion_tokens=0)


def _error_row(item: WorkItem, j: int, message: str) -> dict[str, Any]:
    return output_row(item.row_id, j, item.copied, None, "error", item.prompt_tokens, 0, message)


def sample_rows(shape: RowShape, item: WorkItem, out: Any) -> RowBatch:
    """A RequestOutput as one row per sample (a sample the engine did not return is an error row)."""
    by_index = {c.index: c for c in out.outputs}
    prompt_len = len(out.prompt_token_ids) if out.prompt_token_ids else item.prompt_tokens
    rows, errors, ctoks = [], 0, 0
    for j in range(shape.samples):
        c = by_index.get(j)
        if c is None:
            rows.append(_error_row(item, j, f"the engine returned no sample {j}"))
            errors += 1
            continue
        failed = c.finish_reason == "error" or c.error is not None
        errors += int(failed)
        ctoks += len(c.token_ids or [])
        rows.append(_sample_row(shape, item, j, c, failed, prompt_len))
    ptoks = (prompt_len or 0) if errors < shape.samples else 0
    return RowBatch(item.position, rows, errors=errors, prompt_tokens=ptoks, completion_tokens=ctoks)


def _sample_row(shape: RowShape, item: WorkItem, j: int, c: Any, failed: bool, prompt_len: int | None) -> dict:
    completion = None if failed and not c.text else c.text
    optional: dict[str, Any] = {}
    if shape.reasoning_tags is not None and not failed and c.text is not None:
        optional["reasoning"], completion = split_reasoning(c.text, shape.reasoning_tags)
    if shape.logprobs:
        optional["logprobs"] = None if failed else c.logprobs
    if shape.top_logprobs:
        optional["top_logprobs"] = None if failed or c.top_logprobs is None else [
            [{"id": i, "logprob": lp} for i, lp in pos] for pos in c.top_logprobs]
    return output_row(item.row_id, j, item.copied, completion, c.finish_reason, prompt_len, len(c.token_ids or []),
                      (c.error or "generation failed") if failed else None, **optional)

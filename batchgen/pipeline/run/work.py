"""The work item: what the run loop knows of one input row while the engine generates it.

It travels through the engine as the request id, so an output carries everything needed to turn
it into output rows: no side table keyed by position.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class WorkItem:
    position: int  # the row's place in this task's share of the input: the ledger's key
    row_id: Any  # the output's id column (never null: a row without one gets one from its position)
    copied: dict[str, Any] = field(default_factory=dict)  # input.columns, as the output holds them
    prompt_tokens: int | None = None  # the prompt's length (None: it was never tokenized)
    seed: int = 0  # the row's sampling seed (from the job's seed and the row's id)

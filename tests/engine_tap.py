"""EngineTap: the real engine behind the push API the run loop drives (add / step /
has_unfinished / abort), with a record of what the job submitted and hooks to inject faults.

It hands outputs over one per step() call, so a hook runs exactly between two outputs, as the
job sees them: `on_output(k)` runs once the job has taken the k-th output (at its next call),
`crash_after=k` raises once k outputs reached the job (an engine failure). `seen` lists the
positions the job submitted, `yielded` the positions of the outputs in the order they came back.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any


def position(request_id: Any) -> Any:
    return getattr(request_id, "position", request_id)


class EngineTap:
    def __init__(self, engine: Any, *, crash_after: int | None = None,
                 on_output: Callable[[int], Any] | None = None) -> None:
        self.engine = engine
        self.tokenizer, self.max_model_len = engine.tokenizer, engine.max_model_len
        self.max_num_seqs = engine.max_num_seqs
        self.crash_after, self.on_output = crash_after, on_output
        self.seen: list[Any] = []
        self.yielded: list[Any] = []
        self._ready: deque[Any] = deque()
        self._handed = 0  # outputs the job has taken
        self._hooked = 0  # ... of which on_output has run for

    @property
    def stats(self) -> Any:
        return self.engine.stats

    @property
    def generated_tokens(self) -> int:
        return self.engine.generated_tokens

    def add(self, requests: Iterable[Any]) -> list[Any]:
        reqs = list(requests)
        self.seen += [position(r.request_id) for r in reqs]
        return self.engine.add(reqs)

    def step(self) -> list[Any]:
        self._run_hooks()
        if not self._ready:
            self._ready.extend(self.engine.step())
        if not self._ready:
            return []
        if self.crash_after is not None and self._handed >= self.crash_after:
            raise RuntimeError("simulated engine crash")
        out = self._ready.popleft()
        self.yielded.append(position(out.request_id))
        self._handed += 1
        return [out]

    def has_unfinished(self) -> bool:
        self._run_hooks()
        return bool(self._ready) or self.engine.has_unfinished()

    def _run_hooks(self) -> None:
        while self.on_output is not None and self._hooked < self._handed:
            self._hooked += 1
            self.on_output(self._hooked)

    def abort(self) -> None:
        self._ready.clear()
        self.engine.abort()

    def close(self) -> None:
        self.engine.close()

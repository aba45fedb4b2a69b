"""Zeroed int32 counters for kernels whose last program to finish merges the others' partial results
(split decode attention, split-K GEMM). Every launch leaves the counters it used at zero again, so one
buffer per (kernel, device) serves every launch. Allocated on the first (eager) call, which the
engine makes before any CUDA-graph capture. A buffer that a larger launch outgrows is kept, not freed:
a CUDA graph captured before the growth still points at it."""
from __future__ import annotations

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # never freed: captured graphs may still increment them


def zeroed_counters(owner: str, n: int, device: torch.device, minimum: int = 1 << 12) -> torch.Tensor:
    buf = _BUFFERS.get((owner, device))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(n, minimum), dtype=torch.int32, device=device)
        _BUFFERS[(owner, device)] = buf
    return buf

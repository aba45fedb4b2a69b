"""Tensor parallel (Engine(..., tensor_parallel=N)): one process per rank, joined in one torch.distributed
group (gloo on the CPU, NCCL on CUDA with NVLink multicast off).

- group.py: the process group (a free localhost port, its own init method, timeouts) and its collectives;
- shard.py: the model sharded after load: q/k/v and gate/up column-parallel (per q, k, v and gate, up
  part), o and down row-parallel (one all-reduce each), KV heads split (replicated below one per rank),
  vocab-parallel embedding (masked lookup + all-reduce) and lm_head (all-gathered logits);
- load.py: a rank's share of a checkpoint, read straight onto its device (the model built on meta, sharded,
  then each checkpoint tensor cut as it is read);
- setup.py: the checks that fail before any process starts;
- ranks.py: rank 0 (the user's process) spawns ranks 1..N-1 and forwards every call that changes engine
  state (accept, advance, drop) as a small message; each rank runs the same deterministic scheduler and
  sampler on the same all-gathered logits, so no per-step tensor is broadcast;
- worker.py: what ranks 1..N-1 run: build the same Engine, then replay rank 0's calls.
"""
from __future__ import annotations

from .group import TensorParallelError

__all__ = ["TensorParallelError"]

"""Programmatic dependent launch (Hopper+): let a kernel start while the one before it finishes.

In a decode step every kernel is short (a 50 MB projection streams in ~17 us), so the few
microseconds each one spends launching, reaching full memory bandwidth and draining its last
wave add up to a large share of the step. With PDL the next kernel is launched early; it may do
work that does not depend on the previous kernel (the skinny GEMM prefetches its weights into
L2), then waits (`griddepcontrol.wait`) until the previous kernel has completed and its writes
are visible. Rules every PDL kernel here follows, so that completion stays transitive along the
chain: each program waits before it reads or writes anything another kernel touches, and no
program can finish without having waited.

BATCHGEN_PDL=0 turns it off (ablation, engine/switches.py); it is off on GPUs before sm_90 and under
the interpreter.
"""
from __future__ import annotations

import torch

from ..switches import switches

_ON: dict[int, bool] = {}


def enabled(device: torch.device) -> bool:
    if device.type != "cuda" or not switches().pdl:
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _ON:
        _ON[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _ON[idx]


def launch_options(device: torch.device) -> dict:
    """Kernel-call keyword arguments: USE_PDL for the kernel body, launch_pdl for the launch."""
    if enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}

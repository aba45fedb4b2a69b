"""Launch a Triton kernel at the pipeline depth its config asks for, or shallower where this GPU's shared
memory is smaller.

The configs were tuned on the H100 / H200 (227 KiB of shared memory a block); an Ada part (L4, L40S,
RTX 4090: ~99 KiB) or an Ampere one (A100: 163 KiB) cannot hold as many stages of the same tiles, and Triton
refuses such a launch with OutOfResources before anything runs. The first launch of a (kernel, constexprs,
warps, stages) finds the depth that fits by retrying with one stage fewer; later launches take that depth
straight away. The engine's warm-up runs every decode shape eagerly before its CUDA graph is captured, so the
search happens outside capture (a refused launch enqueues nothing, so it would be harmless inside too).
"""
from __future__ import annotations

import torch
import triton

TRITON_DEFAULT_STAGES = 3  # what Triton's CUDA backend takes when a launch names no num_stages
_STAGES: dict[tuple, int] = {}  # (kernel, constexprs, warps, stages asked) -> the stages that fit this GPU


def launch_fitting(kernel, grid: tuple[int, ...], num_warps: int, num_stages: int | None, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs, num_warps=..., num_stages=s) with s = num_stages or the most below it that
    fits (num_stages None: Triton's default, launched as it is)."""
    if num_stages is None:
        kernel[grid](*args, **kwargs, num_warps=num_warps)
        return
    # a call site passes its keywords in one order: no sort on the launch path
    key = (id(kernel), tuple(kwargs.items()), num_warps, num_stages)
    s = _STAGES.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, **kwargs, num_warps=num_warps, num_stages=s)
        except triton.runtime.errors.OutOfResources:
            if s <= 1:
                raise
            s -= 1
            continue
        _STAGES[key] = s
        return


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """The device's SM count, read once per GPU (132 off CUDA: the interpreter and host-side heuristics)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]

"""Engine(..., tensor_parallel=N > 1): the checks that fail before any process starts, then the ranks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..validation import EngineArgumentError
from . import ranks
from .shard import shard_problem


def start_ranks(model_dir: Path | None, device: torch.device, model: Any,
                spec: dict[str, Any]) -> tuple[ranks.Ranks, int | None]:
    """(this process's Ranks, the torch threads each rank uses). Rank 0 checks, then spawns the others."""
    world = spec["tensor_parallel"]
    if ranks._WORKER is not None:  # a worker: rank 0 checked everything and chose the threads
        return ranks.start(world, device, model_dir, spec), spec["threads"]
    check_tensor_parallel(world, model_dir, device, model, spec.get("quantization"))
    threads = spec["threads"]
    if device.type == "cpu" and threads is None:
        threads = ranks.default_threads(world)
    return ranks.start(world, device, model_dir, {**spec, "threads": threads}), threads


def check_tensor_parallel(world: int, model_dir: Path | None, device: torch.device, model: Any,
                          quantization: str | None) -> None:
    """One EngineArgumentError line for what tensor_parallel=world can't run."""
    e = f"Engine: tensor_parallel {world}: "
    if model is not None or model_dir is None:
        raise EngineArgumentError(e + "needs a model directory (each rank loads its share of it), not a built model")
    if quantization is not None:
        raise EngineArgumentError(e + f"quantization {quantization!r} is not supported with tensor parallel yet")
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise EngineArgumentError(e + f"needs {world} GPUs, {torch.cuda.device_count()} visible")
    if device.type == "cuda" and device.index not in (None, 0):
        raise EngineArgumentError(e + f"ranks use cuda:0..cuda:{world - 1}; pass device 'cuda', not {device}")
    if device.type not in ("cpu", "cuda"):
        raise EngineArgumentError(e + f"runs on the CPU (gloo) or CUDA (NCCL), not {device.type}")
    import torch.distributed as dist

    from .group import TensorParallelError, timeout

    try:
        timeout()
    except TensorParallelError as err:
        raise EngineArgumentError(e + str(err)) from None

    if dist.is_available() and dist.is_initialized():
        raise EngineArgumentError(e + "this process already has a torch.distributed group (another tensor-parallel "
                                  "engine is open?): close it first")
    from ..loader import read_config

    problem = shard_problem(read_config(model_dir)[1], world)
    if problem is not None:
        raise EngineArgumentError(f"Engine: {problem}")

"""Attention backends behind one interface; `get_backend` picks one by name."""
from __future__ import annotations

import importlib.util

import torch

from ..validation import BACKENDS, EngineArgumentError
from .base import AttentionBackend, AttentionMetadata
from .torch_backend import TorchAttention


def get_backend(name: str, device: torch.device, block_size: int = 16) -> AttentionBackend:
    """auto: Triton on CUDA, else the portable torch backend. FlashAttention only when asked for: auto never
    picks a backend without a passing CUDA test, and the flash one has not run on a GPU yet. block_size is
    the KV cache's, checked here against what the chosen backend can page (FA2: multiples of 256)."""
    if name not in BACKENDS:
        raise EngineArgumentError(f"Engine: attention must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    if name == "flash":
        return _flash(block_size)
    if importlib.util.find_spec("triton") is not None and device.type == "cuda":
        from .triton_backend import make_triton_backend

        return make_triton_backend()
    if name == "triton":
        raise EngineArgumentError("Engine: attention 'triton' needs CUDA and the triton package")
    return TorchAttention()


def _flash(block_size: int) -> AttentionBackend:
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("flash_attn_interface") is None:
        raise EngineArgumentError("Engine: attention 'flash' needs the flash-attn package "
                                  "(pip install 'batchgen[flash]')")
    from .flash_backend import make_flash_backend

    try:
        return make_flash_backend(block_size)
    except (RuntimeError, ValueError) as e:  # a broken install, or a block size FA2 cannot page
        raise EngineArgumentError(f"Engine: attention 'flash': {e}") from None


__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttention", "get_backend", "BACKENDS"]

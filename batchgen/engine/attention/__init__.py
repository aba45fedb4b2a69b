"""Attention backends behind one interface; `get_backend` picks one by name."""
from __future__ import annotations

import importlib.util

import torch

from .base import AttentionBackend, AttentionMetadata
from .torch_backend import TorchAttention

BACKENDS = ("auto", "torch", "triton", "flash")


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """auto: flash-attn when importable on CUDA, else Triton on CUDA, else the portable torch backend."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    if name in ("flash", "auto") and importlib.util.find_spec("flash_attn") is not None:
        from .flash_backend import make_flash_backend
        return make_flash_backend()
    if name == "flash":
        raise ValueError("attention: flash needs the flash-attn package (pip install 'batchgen[flash]')")
    if importlib.util.find_spec("triton") is not None and device.type == "cuda":
        try:
            from .triton_backend import make_triton_backend
        except ImportError:
            if name == "triton":
                raise
        else:
            return make_triton_backend()
    if name == "triton":
        raise ValueError("attention: triton needs CUDA and the triton package")
    return TorchAttention()


__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttention", "get_backend", "BACKENDS"]

"""kernels/counters.py: the per-kernel counter buffer grows for a larger launch, zeroed, and the buffer it
outgrew stays allocated (a CUDA graph captured before the growth still increments it)."""
from __future__ import annotations

import gc
import weakref

import torch

from batchgen.engine.kernels.counters import zeroed_counters


def test_an_outgrown_counter_buffer_stays_allocated() -> None:
    cpu = torch.device("cpu")
    small = zeroed_counters("test-owner", 10, cpu, minimum=16)
    assert small.numel() == 16 and not small.any()
    assert zeroed_counters("test-owner", 16, cpu, minimum=16) is small  # fits: the same buffer
    gone = weakref.ref(small)
    del small
    big = zeroed_counters("test-owner", 17, cpu, minimum=16)
    gc.collect()
    assert big.numel() == 17 and not big.any()
    assert gone() is not None, "the outgrown buffer was freed: a graph captured with it would write freed memory"
    assert zeroed_counters("test-owner", 5, cpu, minimum=16) is big

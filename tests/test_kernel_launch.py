"""kernels/launch.py: a launch that does not fit this GPU's shared memory retries with fewer pipeline stages,
once per (kernel, constexprs, warps, stages); later launches take the depth that fitted.

A GPU's shared-memory limit cannot be met on the CPU (the interpreter has none), so the kernel here is a
stand-in that refuses as Triton does (OutOfResources, before anything runs) above a given depth."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from batchgen.engine.kernels import launch  # noqa: E402


class KernelFitting:
    """kernel[grid](...) that raises Triton's OutOfResources above `fits` stages, recording each attempt."""

    def __init__(self, fits: int) -> None:
        self.fits, self.attempts = fits, []

    def __getitem__(self, grid):
        def run(*args, num_warps: int, num_stages: int | None = None, **constexprs):
            self.attempts.append(num_stages)
            if num_stages is not None and num_stages > self.fits:
                raise triton.runtime.errors.OutOfResources(num_stages * 64 * 1024, self.fits * 64 * 1024,
                                                           "shared memory")
        return run


def test_a_config_too_deep_for_the_gpu_runs_shallower_and_remembers() -> None:
    k = KernelFitting(fits=2)
    launch.launch_fitting(k, (4,), 4, 5, "x", BM=64)
    assert k.attempts == [5, 4, 3, 2]
    launch.launch_fitting(k, (8,), 4, 5, "y", BM=64)  # the same config: straight to the depth that fitted
    assert k.attempts[4:] == [2]
    launch.launch_fitting(k, (8,), 4, 5, "y", BM=128)  # other constexprs: searched on their own
    assert k.attempts[5:] == [5, 4, 3, 2]


def test_a_config_that_fits_is_launched_as_asked_and_one_that_never_fits_raises() -> None:
    k = KernelFitting(fits=4)
    launch.launch_fitting(k, (1,), 8, 3, BN=32)
    launch.launch_fitting(k, (1,), 8, None, BN=32)  # Triton's default depth, no search
    assert k.attempts == [3, None]
    with pytest.raises(triton.runtime.errors.OutOfResources):
        launch.launch_fitting(KernelFitting(fits=0), (1,), 4, 2, BN=64)

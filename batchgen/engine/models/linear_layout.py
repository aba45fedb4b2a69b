"""Store linear weights input-major ([in, out]) for GPU decode.

At decode batch sizes a projection is a skinny matrix product that only streams its weights;
cuBLAS picks faster kernels for x @ W with W stored [in, out] than for x @ W.T with W stored
[out, in] (measured on H100 with the 8B shape). Weights are loaded in HF layout first, then
transposed once here.
"""
from __future__ import annotations

import torch
from torch import nn


class InputMajorLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y


def make_input_major(model: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Swap every nn.Linear (but those named in skip) for an InputMajorLinear, freeing the old weight."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                setattr(module, child_name, InputMajorLinear(child))
                del child
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

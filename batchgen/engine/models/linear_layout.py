"""Linear layers for GPU decode: weights input-major ([in, out]), small batches through a skinny GEMM.

At decode batch sizes a projection is a skinny matrix product that only streams its weights.
cuBLAS picks faster kernels for x @ W with W stored [in, out] than for x @ W.T with W stored
[out, in] (measured on H100 with the 8B shape), so weights are loaded in HF layout and transposed
once here. For batches of at most skinny_gemm.MAX_M rows, the projections listed by
`skinny_layers()` go through the split-K Triton kernel instead (it fills the GPU where cuBLAS
leaves the small attention projections short of full bandwidth; notes/KERNELS.md), and the MLP's
SiLU-and-mul can be fused into the down projection's loads.

BATCHGEN_SKINNY=0 turns the Triton path off (ablation); BATCHGEN_SKINNY=qkv_proj,o_proj,gate_up_proj,down_proj
(a list of projection names) picks where it is used.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

DEFAULT_SKINNY = "qkv_proj,o_proj"
SkinnyConfig = tuple[int, int, int, int, int]  # BN, BK, SPLIT_K, num_warps, num_stages
# best at M=32 on H100 (benchmarks/gemm_sweep.py), keyed by (in, out): llama-3.1-8b's projections
TUNED: dict[tuple[int, int], SkinnyConfig] = {
    (4096, 6144): (64, 128, 1, 4, 5), (4096, 4096): (64, 128, 2, 4, 5), (4096, 28672): (256, 64, 1, 4, 3),
    (14336, 4096): (64, 128, 4, 4, 5),
}


class InputMajorLinear(nn.Module):
    def __init__(self, linear: nn.Linear, skinny: SkinnyConfig | None = None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.skinny = skinny  # config for the Triton skinny GEMM, None = always cuBLAS

    def _use_skinny(self, x: torch.Tensor) -> bool:
        from ..attention.triton_kernels.skinny_gemm import MAX_M

        return self.skinny is not None and x.dim() == 2 and x.shape[0] <= MAX_M and x.stride(-1) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_skinny(x):
            from ..attention.triton_kernels.skinny_gemm import skinny_gemm

            return skinny_gemm(x, self.weight_t, self.bias, config=self.skinny)
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up, then this projection, in one kernel; None where that path does not apply."""
        if self.bias is not None or not self._use_skinny(gate_up):
            return None
        from ..attention.triton_kernels.skinny_gemm import skinny_gemm

        return skinny_gemm(gate_up, self.weight_t, silu_mul=True, config=self.skinny)


def skinny_config(name: str, in_features: int, out_features: int, sm_count: int) -> SkinnyConfig | None:
    """Which projections use the Triton skinny GEMM at decode batch sizes, and how.
    H100 sweep (benchmarks/gemm_sweep.py, notes/KERNELS.md): the attention projections gain; the
    big MLP matrices already stream at ~3 TB/s with cuBLAS."""
    chosen = os.environ.get("BATCHGEN_SKINNY", DEFAULT_SKINNY)
    if not name.endswith(tuple(p for p in chosen.split(",") if p and p != "0")):
        return None
    tuned = os.environ.get("BATCHGEN_SKINNY_CONFIGS")  # JSON {"K,N": [BN, BK, SPLIT_K, warps, stages]} (sweeps)
    if tuned:
        import json

        with open(tuned) as f:
            table = json.load(f)
        if f"{in_features},{out_features}" in table:
            return tuple(table[f"{in_features},{out_features}"])
    if (in_features, out_features) in TUNED:
        return TUNED[(in_features, out_features)]
    from ..attention.triton_kernels.skinny_gemm import default_config

    return default_config(32, out_features, in_features, sm_count)


def make_input_major(model: nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Swap every nn.Linear (but those named in skip) for an InputMajorLinear, freeing the old weight."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    skinny = (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
              and importlib.util.find_spec("triton") is not None)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if skinny else 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                cfg = skinny_config(full, child.in_features, child.out_features, sm_count) if skinny else None
                setattr(module, child_name, InputMajorLinear(child, cfg))
                del child
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

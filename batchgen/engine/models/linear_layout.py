"""Linear layers for GPU decode: weights input-major ([in, out]), small batches through a skinny GEMM.

At decode batch sizes a projection is a skinny matrix product that only streams its weights.
cuBLAS picks faster kernels for x @ W with W stored [in, out] than for x @ W.T with W stored
[out, in] (measured on H100 with the 8B shape), so weights are loaded in HF layout and transposed
once here. For batches of at most skinny_gemm.MAX_M rows, the projections chosen by
`skinny_config()` (those with a swept config) go through the Triton skinny GEMM instead: on their
own they match cuBLAS, and in the step they launch early and prefetch their weights while the
kernel before them finishes (kernels/pdl.py; notes/KERNELS.md).

BATCHGEN_SKINNY=0 turns the Triton path off (ablation); BATCHGEN_SKINNY=qkv_proj,o_proj,gate_up_proj,down_proj
(a list of projection names) picks where it is used. Where gate_up takes it, decode steps also fold
SiLU-and-mul and the residual adds into the GEMMs (fused_decode_rows, llama.py). The switches are
read once (engine/switches.py), when the engine lays out its model.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from .. import fused_ops
from ..switches import Switches, switches

SkinnyConfig = tuple[int, int, int, int, int]  # BN, BK, SPLIT_K, num_warps, num_stages
# best at M=32 on the H200 (benchmarks/gemm_sweep.py --no-silu, 2026-12-04), keyed by (in, out): llama-3.1-8b's
# projections. Alone, gate_up 57.8 us against cuBLAS's 60.0 (4.06 TB/s) and qkv 18.0 against 16.0; in the step
# they launch early (pdl.py) and prefetch their weights: seed 5,742 tok/s against 5,660 all on cuBLAS and 5,638
# with the H100's configs. o_proj / down_proj (12.0 / 32.2 us alone, 1.13x / 1.03x cuBLAS) stay on cuBLAS by
# default: on the skinny GEMM too the step was no faster (5,746 / 5,631; notes/KERNELS.md).
TUNED: dict[tuple[int, int], SkinnyConfig] = {
    (4096, 6144): (128, 128, 2, 4, 4), (4096, 28672): (128, 64, 1, 4, 3),
    (4096, 4096): (64, 256, 2, 8, 4), (14336, 4096): (64, 256, 2, 8, 4),
}


class InputMajorLinear(nn.Module):
    def __init__(self, linear: nn.Linear, skinny: SkinnyConfig | None = None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.skinny = skinny  # config for the Triton skinny GEMM, None = always cuBLAS
        self._skinny_max_m = 0
        if skinny is not None:  # triton is imported only where the skinny path is used
            from ..kernels import skinny_gemm

            self._skinny_gemm, self._skinny_max_m = skinny_gemm.skinny_gemm, skinny_gemm.MAX_M

    def _skinny_rows(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= self._skinny_max_m and x.stride(-1) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._skinny_rows(x):
            return self._skinny_gemm(x, self.weight_t, self.bias, config=self.skinny)
        y = x @ self.weight_t
        return y + self.bias if self.bias is not None else y

    @property
    def can_gate(self) -> bool:
        """Whether the skinny GEMM can take a whole row per program (no K split): needed for the
        gated (SiLU-and-mul) epilogue."""
        return self.skinny is not None and self.skinny[2] == 1

    def normed(self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gated: bool = False) -> torch.Tensor:
        """rms_norm(x) @ W (+ bias) for at most MAX_M rows; gated=True (needs can_gate): W is gate | up
        and the result SiLU(gate) * up, in the GEMM's epilogue. The norm is its own kernel (inside the
        GEMM it measured slower: the scaled x cannot stream as a dot operand)."""
        x = fused_ops.rms_norm(x, norm_weight, eps)
        if not gated:
            return self(x)
        return self._skinny_gemm(x, self.weight_t, self.bias, gated=True, config=self.skinny)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual += x @ W (+ bias), in place, with the add in the GEMM's epilogue (no add kernel)."""
        if self.skinny is not None and self._skinny_rows(x):
            return self._skinny_gemm(x, self.weight_t, self.bias, residual=residual, out=residual,
                                     config=self.skinny)
        residual.addmm_(x, self.weight_t)  # cuBLAS with beta = 1: the add rides on the GEMM
        return residual.add_(self.bias) if self.bias is not None else residual


def skinny_config(name: str, in_features: int, out_features: int, sw: Switches | None = None) -> SkinnyConfig | None:
    """The Triton skinny GEMM config for this projection at decode batch sizes, or None (cuBLAS)."""
    sw = sw or switches()
    if not name.endswith(sw.skinny):  # BATCHGEN_SKINNY
        return None
    tuned = sw.skinny_configs  # BATCHGEN_SKINNY_CONFIGS: JSON {"K,N": [BN, BK, SPLIT_K, warps, stages]} (sweeps)
    if tuned:
        config = config_from_file(tuned, f"{in_features},{out_features}")
        if config is not None:
            return config
    # shapes not swept stay on cuBLAS: an untuned split can cost more than the whole gain
    return TUNED.get((in_features, out_features))


def config_from_file(path: str, key: str) -> SkinnyConfig | None:
    import json

    try:
        with open(path) as f:
            table = json.load(f)
        config = table.get(key) if isinstance(table, dict) else ()
        if config is None:
            return None
        if not (isinstance(config, list) and len(config) == 5 and all(isinstance(v, int) and v > 0 for v in config)):
            raise ValueError(f"entry {key!r} is {config!r}, not 5 positive integers")
    except (OSError, ValueError) as e:
        raise ValueError(f"BATCHGEN_SKINNY_CONFIGS={path}: {e} (expected a JSON object "
                         '{"K,N": [BN, BK, SPLIT_K, num_warps, num_stages]})') from None
    return tuple(config)


def fused_decode_rows(model: nn.Module, sw: Switches | None = None) -> int:
    """Largest step (in tokens) for the model's fused decode layer path, 0 where it is off. It needs
    every gate_up projection on the skinny GEMM without a K split: then SiLU-and-mul runs in its
    epilogue and the residual adds inside the o / down GEMMs (cuBLAS beta = 1 or the skinny
    epilogue), two launches fewer per layer. BATCHGEN_FUSED_DECODE=0 turns it off."""
    layers = getattr(model, "layers", None)
    if not (sw or switches()).fused_decode or not layers:
        return 0
    gate_ups = [getattr(layer.mlp, "gate_up_proj", None) for layer in layers]  # none on an MoE layer
    # InputMajorLinear or quant.Fp8Linear: both give the decode layer normed / add_to / can_gate
    if not all(getattr(g, "can_gate", False) for g in gate_ups):
        return 0
    return gate_ups[0]._skinny_max_m


def make_input_major(model: nn.Module, skip: tuple[str, ...] = (), sw: Switches | None = None) -> None:
    """Swap every nn.Linear (but those named in skip) for an InputMajorLinear, freeing the old weight.
    FP8 projections (engine/quant Fp8Linear, not nn.Linear) keep their own layout and decode kernel
    (kernels/fp8_skinny_gemm.py), with the same fused-layer API: the bf16 GEMMs never see FP8 weights."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    skinny = (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
              and importlib.util.find_spec("triton") is not None)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full not in skip:
                cfg = skinny_config(full, child.in_features, child.out_features, sw) if skinny else None
                setattr(module, child_name, InputMajorLinear(child, cfg))
                del child
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

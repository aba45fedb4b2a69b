"""apply_fp8(model): the decoder's projections become Fp8Linear, quantized where the model lies.

Swapped: every layer's qkv_proj, o_proj, gate_up_proj and down_proj (q/k/v and gate/up are fused
in llama.py, and per-output-channel scales fuse with them: each row keeps its own), and lm_head when
asked (lm_head=True: one scale per vocabulary row; a tied head becomes its own e4m3 copy, the embedding
keeps the model dtype). Untouched: embeddings, lm_head unless asked, the norms, and an MoE layer's
router and experts (models/moe.py: stacked weights, no Linear to swap), said in one log line.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .fp8 import quantize_weight
from .fp8_linear import Fp8Linear

log = logging.getLogger("batchgen.engine")
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Fp8Summary:
    """What apply_fp8 did: how many projections it swapped and how many of them run emulated here."""
    projections: int
    emulated: int  # on float32 emulation: all of them off FP8 hardware, else those _scaled_mm can't take
    device: str
    moe_layers: int = 0  # MoE layers whose experts stayed in the model dtype (only attention / dense MLPs are FP8)
    lm_head: bool = False  # lm_head in e4m3 too (counted in projections and emulated)

    @property
    def tensor_cores(self) -> bool:
        """Every projection on FP8 tensor cores (the Triton FP8 GEMMs, torch._scaled_mm above BATCHGEN_FP8_GEMM_MAX_M)."""
        return self.emulated == 0

    def describe(self) -> str:
        how = ("FP8 tensor cores (decode: Triton FP8 skinny GEMM, activations per token per 128 columns; "
               "larger steps: Triton FP8 GEMM, per-token activations)" if self.tensor_cores else "emulated in float32"
               if self.emulated == self.projections else f"{self.emulated} emulated in float32")
        experts = f"; the experts of {self.moe_layers} MoE layers in the model dtype" if self.moe_layers else ""
        head = ", lm_head included" if self.lm_head else ""
        return f"weights fp8 e4m3 ({self.projections} projections{head}, per-channel scales, {how}){experts}"


def apply_fp8(model: nn.Module, prequantized: dict[str, Fp8Linear] | None = None,
              lm_head: bool = False) -> Fp8Summary:
    """Swap the projections of model.layers (and model.lm_head with lm_head=True) for Fp8Linear, freeing
    their bf16/fp32 weights. prequantized maps "layers.{i}.{projection}" to an Fp8Linear built from a
    checkpoint's own FP8 weights (Fp8Linear.from_quantized): used as is; every other projection is
    quantized here."""
    layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError("apply_fp8: the model has no decoder layers (model.layers)")
    given = prequantized or {}

    def make(old: nn.Module, path: str) -> Fp8Linear:
        if path in given:
            return given[path]
        if isinstance(old, Fp8Linear):
            return old
        if not isinstance(old, nn.Linear):
            raise TypeError(f"apply_fp8: {path} is a {type(old).__name__}, not an nn.Linear "
                            "(apply FP8 before the GPU layout, linear_layout.make_input_major)")
        return Fp8Linear.from_linear(old)

    swapped: list[Fp8Linear] = []
    moe_layers = 0
    for i, layer in enumerate(layers):
        sparse = not hasattr(layer.mlp, "gate_up_proj")  # an MoE layer (models/moe.py): experts stay as they are
        moe_layers += sparse
        for path in PROJECTIONS:
            if sparse and path.startswith("mlp."):
                continue
            parent_name, _, child = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            swapped.append(make(getattr(parent, child), f"layers.{i}.{path}"))
            setattr(parent, child, swapped[-1])  # the old linear (and its weight) is freed here
    if lm_head:
        swapped.append(quantize_lm_head(model).fp8)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    device = swapped[0].weight.device
    summary = Fp8Summary(len(swapped), sum(not m.uses_tensor_cores for m in swapped), str(device), moe_layers, lm_head)
    if moe_layers:
        log.info("fp8: %d MoE layers' experts and routers stay in %s (FP8 covers the attention projections and "
                 "dense MLPs: %d projections)", moe_layers, str(layers[0].input_layernorm.weight.dtype)
                 .removeprefix("torch."), len(swapped))
    _say(summary, device)
    return summary


class Fp8LmHead(nn.Module):
    """lm_head in e4m3: an Fp8Linear over the vocabulary padded with zero rows to a multiple of 16 (what the
    FP8 GEMMs take), the padding's logits cut off. forward(x) -> [..., vocab] in x's dtype."""

    def __init__(self, fp8: Fp8Linear, vocab: int) -> None:
        super().__init__()
        self.fp8, self.vocab = fp8, vocab
        self.in_features, self.out_features = fp8.in_features, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fp8(x)
        return y if self.fp8.out_features == self.vocab else y[..., :self.vocab].contiguous()


def quantize_lm_head(model: nn.Module) -> Fp8LmHead:
    """model.lm_head as an Fp8LmHead (one scale per vocabulary row). A head tied to the embeddings is
    quantized from the shared weight into a copy of its own: the embedding lookup stays exact."""
    head = model.lm_head
    if isinstance(head, Fp8LmHead):
        return head
    if not isinstance(head, nn.Linear):
        raise TypeError(f"apply_fp8: lm_head is a {type(head).__name__}, not an nn.Linear")
    vocab, weight = head.out_features, head.weight.detach()
    pad = -vocab % 16
    if pad:
        weight = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])])
    codes, scale = quantize_weight(weight)
    model.lm_head = Fp8LmHead(Fp8Linear(codes, scale, head.bias), vocab)
    return model.lm_head


def _say(summary: Fp8Summary, device: torch.device) -> None:
    """The one log line for FP8 without FP8 hardware (a warning on a GPU, where it costs speed)."""
    if summary.tensor_cores:
        return
    level = logging.WARNING if device.type == "cuda" else logging.INFO
    if summary.emulated == summary.projections:
        log.log(level, "fp8: no FP8 tensor cores on %s (CUDA capability >= 8.9 needed): FP8 weights run "
                "dequantized, emulated in float32 (same numerics, no speed-up)", device)
    else:
        log.log(level, "fp8: %d of %d projections run dequantized, emulated in float32 (torch._scaled_mm needs "
                "dimensions that are multiples of 16)", summary.emulated, summary.projections)

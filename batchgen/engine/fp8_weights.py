"""The tensors of an FP8 checkpoint (fp8_checkpoint.py says which format): each float8_e4m3fn weight is
dequantized for the model (float32 product of the FP8 value and its scale, then the model dtype), and on
request kept as stored, with its scale, for FP8 GEMMs to take as they are (QuantizedWeights).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fp8_checkpoint import Fp8CheckpointError, Fp8Scheme, ScaleKind

log = logging.getLogger("batchgen.engine")


@dataclass(frozen=True)
class QuantizedLinear:
    """One FP8 linear as the checkpoint stores it. Dequantized: weight.float() * scale, broadcast per kind."""
    checkpoint_name: str  # e.g. "model.layers.0.self_attn.q_proj.weight"
    target: str  # our parameter, e.g. "layers.0.self_attn.qkv_proj.weight"
    rows: tuple[int, int] | None  # the rows of a fused target (qkv_proj, gate_up_proj) it fills; None: all
    weight: torch.Tensor  # float8_e4m3fn [N, K], on the CPU
    scale: torch.Tensor  # float32, CPU: [N, 1] "channel", [] "tensor", [ceil(N/bn), ceil(K/bk)] "block"
    kind: ScaleKind
    block: tuple[int, int] | None  # (bn, bk) for kind "block"
    input_scale: torch.Tensor | None  # float32 [] static activation scale (multiplies); None: dynamic/none


@dataclass
class QuantizedWeights:
    """What load_model leaves on an FP8 checkpoint's model as `model.fp8_checkpoint`."""
    scheme: Fp8Scheme
    dequantized: int  # FP8 weights dequantized into the model
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)  # by checkpoint name; keep_quantized only


def dequantize(weight: torch.Tensor, scale: torch.Tensor, kind: ScaleKind,
               block: tuple[int, int] | None = None) -> torch.Tensor:
    """float32 weight = float(weight) * scale, the scale broadcast over its row ("channel"), the whole
    tensor ("tensor") or its (bn, bk) block ("block"; edge blocks may be partial)."""
    w = weight.to(torch.float32)
    s = scale.to(device=w.device, dtype=torch.float32)
    if kind == "block":
        assert block is not None
        n, k = w.shape
        s = s.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return w * s


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and t.element_size() == 1


class Fp8Reader:
    """Hands loader.load_weights each tensor: FP8 weights dequantized (float32, on `device`), others as stored."""

    def __init__(self, scheme: Fp8Scheme, files: list[Path], device: torch.device, keep: bool) -> None:
        self.scheme, self.device, self.keep = scheme, device, keep
        # (an FP8 KV cache's k_scale / v_scale are the engine's to read: kv_fp8.read_kv_scales)
        self.small = _small_tensors(files, (f".{scheme.scale_suffix}", ".input_scale"))
        self.out = QuantizedWeights(scheme=scheme, dequantized=0)

    def get(self, st: Any, name: str, target: str, rows: tuple[int, int] | None) -> torch.Tensor:
        t = st.get_tensor(name)
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        scale_name = f"{base}.{self.scheme.scale_suffix}"
        scale = self.small.get(scale_name) if base else None
        if not _is_fp8(t):
            if scale is not None:
                raise Fp8CheckpointError(f"{name} has a {scale_name} but is stored as {t.dtype}, not float8_e4m3fn")
            return t
        if t.dtype != torch.float8_e4m3fn:
            raise Fp8CheckpointError(f"{name} is {t.dtype}: batchgen loads FP8 e4m3 (float8_e4m3fn) weights only")
        if scale is None or t.dim() != 2:
            raise Fp8CheckpointError(f"{name} is float8_e4m3fn {tuple(t.shape)} without its {scale_name}")
        kind, s = self._scale(scale_name, tuple(t.shape), scale)
        block = self.scheme.block if kind == "block" else None
        self.out.dequantized += 1
        if self.keep:
            self.out.linears[name] = QuantizedLinear(name, target, rows, t, s, kind, block, self._input_scale(base))
        return dequantize(t.to(self.device), s, kind, block)

    def _scale(self, scale_name: str, shape: tuple[int, int], scale: torch.Tensor) -> tuple[ScaleKind, torch.Tensor]:
        """The scale's kind, from its shape among those the config allows; float32, shaped as in QuantizedLinear."""
        n, k = shape
        s, kinds = scale.to(torch.float32), self.scheme.kinds
        if "block" in kinds and self.scheme.block is not None:
            bn, bk = self.scheme.block
            if tuple(s.shape) == (math.ceil(n / bn), math.ceil(k / bk)):
                return "block", s
        if "tensor" in kinds and s.numel() == 1:
            return "tensor", s.reshape(())
        if "channel" in kinds and s.numel() == n and tuple(s.shape) in ((n,), (n, 1)):
            return "channel", s.reshape(n, 1)
        raise Fp8CheckpointError(f"{scale_name} has shape {tuple(s.shape)}, which is no weight scale of kind "
                                 f"{'/'.join(sorted(kinds))} for a {n}x{k} weight (the config's quantization_config)")

    def _input_scale(self, base: str) -> torch.Tensor | None:
        if self.scheme.activations != "static":
            return None
        t = self.small.get(f"{base}.input_scale")
        if t is None or t.numel() != 1:
            raise Fp8CheckpointError(f"activations are static but {base}.input_scale is "
                                     f"{'missing' if t is None else f'of shape {tuple(t.shape)}'}")
        return t.to(torch.float32).reshape(())

    def finish(self, model_dtype: torch.dtype) -> QuantizedWeights:
        """Check something was FP8 and say, once, how the checkpoint runs."""
        if self.out.dequantized == 0:
            raise Fp8CheckpointError(f"the config declares FP8 ({self.scheme.label}) but the checkpoint holds no "
                                     "float8_e4m3fn weights")
        why = _why_dequantized(self.device, self.scheme, self.keep)
        if why is not None:
            log.info("FP8 checkpoint (%s): %d FP8 linears run dequantized to %s on %s: %s", self.scheme.describe(),
                     self.out.dequantized, str(model_dtype).removeprefix("torch."), self.device, why)
        return self.out


def _why_dequantized(device: torch.device, scheme: Fp8Scheme, keep: bool) -> str | None:
    """Why the checkpoint runs dequantized here; None when the engine takes its FP8 weights as stored
    (kept, with per-channel or per-tensor scales: the engine says how they run)."""
    if keep and "block" not in scheme.kinds:
        return None
    if device.type != "cuda":
        return f"the {device.type.upper()} has no FP8 GEMMs"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"this GPU has no FP8 tensor cores (compute capability {cap[0]}.{cap[1]} < 8.9)"
    if "block" in scheme.kinds:
        return "the FP8 GEMMs take per-channel or per-tensor weight scales, not blocks"
    return "torch._scaled_mm with row-wise scales is not available in this torch build"


def _small_tensors(files: list[Path], suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every scale in the checkpoint, up front: a weight's scale may sit in another shard."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                if name.endswith(suffixes):
                    out[name] = st.get_tensor(name)
    return out

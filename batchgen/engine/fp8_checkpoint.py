"""Which pre-quantized FP8 checkpoint a config.json describes, read from its `quantization_config`.

Two formats load (fp8_weights.py reads their tensors):
- compressed-tensors (what llm-compressor writes): quant_method "compressed-tensors", format
  "float-quantized" (or "naive-quantized"), config groups of 8-bit float weights with per-channel,
  per-tensor or block scales in `<linear>.weight_scale`, activations dynamic (per token) or static
  (`<linear>.input_scale`), or weights only.
- fp8 (DeepSeek-V3 / Qwen3-FP8 releases, AutoFP8): quant_method "fp8", fmt "e4m3"; with
  `weight_block_size` [bn, bk] each linear has `<linear>.weight_scale_inv` [ceil(N/bn), ceil(K/bk)],
  without it a per-tensor `<linear>.weight_scale` (and `input_scale` when activations are static).
In both the scale multiplies: w = float(w_fp8) * scale, broadcast over its channel or block.
Anything else FP8-like is refused with one line naming the config key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .model_source import ModelSourceError

ScaleKind = Literal["channel", "tensor", "block"]
CT_FORMATS = ("float-quantized", "naive-quantized")  # compressed-tensors formats holding fp8 weights as they are
_CT_STRATEGIES: dict[str, ScaleKind] = {"channel": "channel", "tensor": "tensor", "block": "block"}
_ACT_STRATEGIES = ("token", "tensor")


class Fp8CheckpointError(ModelSourceError):
    """The checkpoint's quantization is one batchgen cannot load; the message names the config key."""


@dataclass(frozen=True)
class Fp8Scheme:
    """What an FP8 checkpoint holds, as its config declares it."""
    method: Literal["compressed-tensors", "fp8"]
    kinds: frozenset[str]  # the weight-scale kinds the config allows (a subset of ScaleKind)
    block: tuple[int, int] | None  # [rows, cols] of a scale block, for kind "block"
    activations: Literal["dynamic", "static", "none"]  # none: weights-only FP8 (activations stay 16-bit)
    scale_suffix: str  # "weight_scale" or "weight_scale_inv" (both multiply)
    label: str  # e.g. "compressed-tensors float-quantized", for the log line

    def describe(self) -> str:
        kinds = "/".join(sorted(self.kinds)).replace("block", f"{self.block[0]}x{self.block[1]} block"
                                                     if self.block else "block")
        acts = {"dynamic": "activations dynamic", "static": "activations static (input_scale)",
                "none": "weights only"}[self.activations]
        return f"{self.label}, weight scales per {kinds}, {acts}"


def read_fp8_scheme(raw_config: dict[str, Any]) -> Fp8Scheme | None:
    """The FP8 scheme of a config.json dict; None when it declares no FP8 quantization (a plain checkpoint,
    or another quant_method, left to the plain loader as before)."""
    qc = raw_config.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fp8":
        return _block_fp8(qc)
    return None


def _refuse(key: str, value: object, why: str) -> Fp8CheckpointError:
    return Fp8CheckpointError(f"quantization_config.{key} = {value!r}: {why}")


def _compressed_tensors(qc: dict[str, Any]) -> Fp8Scheme | None:
    groups = qc.get("config_groups")
    if not groups and qc.get("kv_cache_scheme"):
        return None  # only the KV cache is quantized: 16-bit weights load as before (k/v scales: kv_fp8.py)
    fmt = qc.get("format")
    if fmt not in CT_FORMATS:
        raise _refuse("format", fmt, f"batchgen loads compressed-tensors checkpoints in format "
                      f"{' or '.join(CT_FORMATS)} (FP8 weights) only")
    sparsity = qc.get("sparsity_config")
    if sparsity and (sparsity.get("format") not in (None, "dense")):
        raise _refuse("sparsity_config.format", sparsity.get("format"),
                      "sparse compressed-tensors weights are not supported")
    if not isinstance(groups, dict) or not groups:
        raise _refuse("config_groups", groups, "expected at least one config group")
    kinds: set[str] = set()
    blocks: set[tuple[int, int]] = set()
    acts: set[str] = set()
    for name, group in groups.items():
        kind, block = _ct_weights(f"config_groups.{name}", group)
        kinds.add(kind)
        if block is not None:
            blocks.add(block)
        acts.add(_ct_activations(f"config_groups.{name}", group))
        if group.get("format") not in (None, *CT_FORMATS):
            raise _refuse(f"config_groups.{name}.format", group.get("format"), "expected float-quantized FP8 weights")
    if len(blocks) > 1 or len(acts) > 1:
        raise _refuse("config_groups", sorted(groups), "config groups with different block sizes or "
                      "activation schemes are not supported")
    return Fp8Scheme(method="compressed-tensors", kinds=frozenset(kinds), block=next(iter(blocks), None),
                     activations=acts.pop(), scale_suffix="weight_scale", label=f"compressed-tensors {fmt}")


def _ct_weights(where: str, group: Any) -> tuple[str, tuple[int, int] | None]:
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict):
        raise _refuse(f"{where}.weights", w, "expected a weights quantization scheme")
    for key, want in (("type", "float"), ("num_bits", 8)):
        if w.get(key) != want:
            raise _refuse(f"{where}.weights.{key}", w.get(key),
                          "batchgen loads 8-bit float (FP8 e4m3) weights only (type 'float', num_bits 8)")
    if w.get("symmetric") is False:
        raise _refuse(f"{where}.weights.symmetric", False, "asymmetric FP8 weights (zero points) are not supported")
    if w.get("dynamic"):
        raise _refuse(f"{where}.weights.dynamic", w.get("dynamic"), "weights must be quantized in the checkpoint")
    strategy = w.get("strategy")
    if strategy not in _CT_STRATEGIES:
        raise _refuse(f"{where}.weights.strategy", strategy, "batchgen loads FP8 weight scales per channel, "
                      "per tensor or per block only")
    block = None
    if strategy == "block":
        block = _block_size(f"{where}.weights.block_structure", w.get("block_structure"))
    return _CT_STRATEGIES[strategy], block


def _ct_activations(where: str, group: dict[str, Any]) -> str:
    if group.get("output_activations"):
        raise _refuse(f"{where}.output_activations", group["output_activations"],
                      "output quantization is not supported")
    a = group.get("input_activations")
    if not a:
        return "none"
    for key, want in (("type", "float"), ("num_bits", 8)):
        if a.get(key) != want:
            raise _refuse(f"{where}.input_activations.{key}", a.get(key),
                          "batchgen runs FP8 activations only (type 'float', num_bits 8)")
    if a.get("strategy") not in _ACT_STRATEGIES:
        raise _refuse(f"{where}.input_activations.strategy", a.get("strategy"),
                      "activation scales per token (dynamic) or per tensor only")
    return "dynamic" if a.get("dynamic") else "static"


def _block_fp8(qc: dict[str, Any]) -> Fp8Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _refuse("fmt", fmt, "batchgen loads FP8 e4m3 weights only")
    act = qc.get("activation_scheme", "dynamic")
    if act not in ("dynamic", "static"):
        raise _refuse("activation_scheme", act, "expected 'dynamic' or 'static'")
    size = qc.get("weight_block_size")
    if size is None:  # AutoFP8 / vLLM-serialized per-tensor FP8
        return Fp8Scheme(method="fp8", kinds=frozenset({"tensor"}), block=None, activations=act,
                         scale_suffix="weight_scale", label="fp8 per-tensor")
    if act != "dynamic":
        raise _refuse("activation_scheme", act, "block-wise FP8 checkpoints come with dynamic activations only")
    block = _block_size("weight_block_size", size)
    return Fp8Scheme(method="fp8", kinds=frozenset({"block"}), block=block, activations="dynamic",
                     scale_suffix="weight_scale_inv", label="fp8 block-wise")


def _block_size(key: str, v: object) -> tuple[int, int]:
    ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
    if not ok:
        raise _refuse(key, v, "expected two positive ints [rows, cols]")
    return int(v[0]), int(v[1])

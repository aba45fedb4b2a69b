"""An MoE checkpoint's expert and router tensors into the model's stacked expert weights (models/moe.py).

Checkpoints store each expert on its own, as the hub does:
    Qwen3-MoE  model.layers.{i}.mlp.experts.{e}.gate_proj / up_proj / down_proj.weight, router mlp.gate.weight
    Mixtral    model.layers.{i}.block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down).weight,
               router block_sparse_moe.gate.weight
or already stacked, as transformers >= 5 holds them in memory: mlp.experts.gate_up_proj [E, 2I, H] and
mlp.experts.down_proj [E, H, I]. Each per-expert tensor fills its slice of layers.{i}.mlp.experts.gate_up_proj
(gate rows, then up rows) or down_proj; a stacked one fills the whole. loader.load_weights calls
load_moe_tensor for every checkpoint name first, and `complete` at the end names the stacked weights every
expert's part of which arrived (its check of missing weights then covers them).
"""
from __future__ import annotations

import re
from typing import Any

import torch

_PER_EXPERT = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_STACKED_OR_ROUTER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:mlp|block_sparse_moe)\."
                                r"(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")
# checkpoint name -> (our stacked weight, which half of gate_up: 0 gate, 1 up; None: down_proj)
_PART = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
         "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


def load_moe_tensor(name: str, st: Any, params: dict[str, torch.Tensor], fp8: Any = None) -> list[str] | None:
    """Copy checkpoint tensor `name` into its place if it is an expert or router weight of a sparse layer;
    returns the keys it filled ("{param}[{expert}:{half}]" for a per-expert part, else the parameter's
    name), or None for any other tensor (the loader's own mapping takes it)."""
    m = _PER_EXPERT.match(name)
    if m is not None:
        layer, expert, kind = int(m.group(1)), int(m.group(2)), m.group(3)
        ours, half = _PART[kind]
        target = f"layers.{layer}.mlp.experts.{ours}"
    else:
        m = _STACKED_OR_ROUTER.match(name)
        if m is None:
            return None
        target, expert, half = f"layers.{m.group(1)}.mlp.{m.group(2)}", None, None
    p = params.get(target)
    if p is None:
        return None  # a dense layer's name, or an architecture that names its MLP like this without experts
    t = _read(name, st, target, fp8)
    dst = p if expert is None else p[expert]
    if half is not None:
        inter = p.shape[1] // 2
        dst = dst[half * inter:(half + 1) * inter]
    if tuple(dst.shape) != tuple(t.shape):
        raise ValueError(f"weight {name}: checkpoint shape {tuple(t.shape)} != model {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(t.to(p.dtype))
    if expert is None:
        return [target]
    return [f"{target}[{expert}:{half}]" if half is not None else f"{target}[{expert}]"]


def _read(name: str, st: Any, target: str, fp8: Any) -> torch.Tensor:
    if fp8 is None:
        return st.get_tensor(name)
    t = fp8.get(st, name, target, None)  # an FP8 expert weight: dequantized (experts run in the model dtype)
    fp8.out.linears.pop(name, None)  # never an Fp8Linear (quant/from_checkpoint takes nn.Linear projections)
    return t


def complete(loaded: set[str], params: dict[str, torch.Tensor]) -> set[str]:
    """The stacked expert weights whose every expert's parts are in `loaded` (as load_moe_tensor keys)."""
    done = set()
    for n, p in params.items():
        if n.endswith(".experts.gate_up_proj"):
            keys = [f"{n}[{e}:{h}]" for e in range(p.shape[0]) for h in (0, 1)]
        elif n.endswith(".experts.down_proj"):
            keys = [f"{n}[{e}]" for e in range(p.shape[0])]
        else:
            continue
        if all(k in loaded for k in keys):
            done.add(n)
    return done

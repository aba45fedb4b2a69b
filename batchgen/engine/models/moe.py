"""Sparse mixture-of-experts MLP blocks (Qwen3-MoE, Mixtral) for the shared decoder (llama.py).

    block = SparseMoeBlock(cfg)          # layer.mlp of a sparse layer (moe_mlp(cfg, i) says which layers)
    y = block(x)                         # x [T, hidden] -> [T, hidden]

Weights, stacked per layer (the loader fuses the checkpoint's per-expert tensors into them):
    gate.weight              [E, hidden]       the router (an nn.Linear: on CUDA laid out like the others)
    experts.gate_up_proj     [E, 2I, hidden]   each expert's gate rows, then its up rows
    experts.down_proj        [E, hidden, I]
the names and layout of transformers' own (>= 5) Qwen3MoeExperts / MixtralExperts.

Numerics as transformers computes them: router logits in the model dtype, softmax over the experts in
float32, top-k, the top-k weights renormalised (norm_topk_prob; Mixtral always) and, for Qwen3-MoE, rounded
to the model dtype; each expert SiLU(x @ gate) * (x @ up) -> @ down in the model dtype; each expert's output
times its weight rounded to the model dtype, then summed over the top k.

Three implementations of the experts, one result:
- "triton" (CUDA, kernels/moe_route.py then kernels/fused_moe.py): the routing in one kernel; token-expert
  pairs sorted by expert into blocks, one grouped GEMM for gate_up with SiLU-and-mul, one for down with the
  routing weight, a deterministic sum over the top k; no host sync, so decode steps are captured in CUDA
  graphs;
- "torch" (the CPU): pairs sorted by expert, a loop over the experts that have pairs, index_add_ in expert
  order (as transformers sums);
- "dense" (CUDA without triton, while a CUDA graph is captured): every expert on every token, weighted by a
  dense [T, E] routing matrix with zeros off the top k: no data-dependent shapes, E times the work.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..switches import switches
from .config import ModelConfig
from .moe_config import MoeConfig

_HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = ("triton", "torch", "dense")


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.moe: MoeConfig = cfg.moe
        self.gate = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=False)
        self.experts = Experts(cfg.moe.num_experts, cfg.hidden_size, cfg.moe.intermediate_size)
        self.impl: str | None = None  # None: chosen per call (impl_for); tests set one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        impl = self.impl or impl_for(x)
        w1, w2 = self.experts.gate_up_proj, self.experts.down_proj
        if impl == "triton":
            from ..kernels.fused_moe import fused_moe
            from ..kernels.moe_route import moe_route

            weights, ids = moe_route(logits, self.moe.top_k, self.moe.norm_topk_prob, self.moe.round_weights)
            return fused_moe(x, w1, w2, ids, weights)
        weights, ids = route(logits, self.moe)
        return (experts_dense if impl == "dense" else experts_torch)(x, w1, w2, ids, weights)


def moe_mlp(cfg: ModelConfig, layer: int) -> SparseMoeBlock | None:
    """Layer `layer`'s MLP when the config makes it sparse, else None (the layer keeps its dense MLP)."""
    if cfg.moe is None or not cfg.moe.sparse_layers[layer]:
        return None
    return SparseMoeBlock(cfg)


def impl_for(x: torch.Tensor) -> str:
    """Triton on CUDA tensors (and on CPU ones under TRITON_INTERPRET=1, like fused_ops); without triton the
    dense path inside a CUDA graph capture (no host sync allowed there), else the torch loop."""
    if _HAS_TRITON and (x.is_cuda or switches().triton_interpret):
        return "triton"
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return "dense"
    return "torch"


def implementation(device: torch.device | str) -> str:
    """What runs a model's experts on `device`, in words (the engine's describe(), the dry run)."""
    if torch.device(device).type != "cuda":
        return "MoE experts in torch"
    return "fused MoE in Triton" if _HAS_TRITON else "MoE experts in torch (dense in CUDA graphs)"


def route(logits: torch.Tensor, moe: MoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (model dtype) -> (top-k weights [T, k] float32, expert ids [T, k] int64), as
    transformers: softmax in float32, top-k, renormalised if norm_topk_prob, rounded to the model dtype for
    Qwen3-MoE (Mixtral keeps them in float32)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if moe.round_weights:
        weights = weights.to(logits.dtype).float()
    return weights, ids


def experts_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]): pairs sorted by expert, one pair of matmuls per expert
    that has pairs, the weighted outputs added in expert order (transformers' order)."""
    K, inter = ids.shape[1], down.shape[-1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pair indices t * K + k, grouped by expert
    tok = order // K
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    w = weights.reshape(-1)[order, None]
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            h = nn.functional.linear(x[tok[rows]], gate_up[e])
            h = nn.functional.linear(nn.functional.silu(h[:, :inter]) * h[:, inter:], down[e])
            # one index_add_ per expert, in expert order: transformers' sum, to the bit in bf16 too
            out.index_add_(0, tok[rows], (h.float() * w[rows]).to(x.dtype))
            start += n
    return out


def experts_dense(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """The same sum with every expert applied to every token (static shapes: CUDA-graph capturable)."""
    inter = down.shape[-1]
    combine = torch.zeros(x.shape[0], gate_up.shape[0], dtype=torch.float32, device=x.device)
    combine.scatter_(1, ids, weights)  # [T, E]: the routing weight, 0 off the top k
    h = torch.matmul(x.unsqueeze(0), gate_up.transpose(1, 2))  # [E, T, 2I]
    h = nn.functional.silu(h[..., :inter]) * h[..., inter:]
    out = torch.matmul(h, down.transpose(1, 2))  # [E, T, hidden]
    y = (out.float() * combine.t().unsqueeze(-1)).to(x.dtype)
    return y.float().sum(0).to(x.dtype)

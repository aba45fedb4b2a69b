"""A loaded LlamaModel cut down to one rank's share, in place (like quant/apply.py swaps projections).

Column-parallel (no communication): qkv_proj keeps this rank's q heads and the k/v heads they use (the
fused weight is cut per q, k and v part), gate_up_proj this rank's slice of gate and of up. Row-parallel:
o_proj and down_proj keep the matching input columns; their partial sums are all-reduced. KV heads: with
at least one per rank each rank keeps num_kv_heads / N of them; with fewer, every rank keeps the one its
q heads use (replicated). Embedding and lm_head are vocab-parallel: ceil(vocab / N) rows per rank
(zero-padded at the end); a lookup outside the rank's rows gives zeros and the all-reduce fills them in;
the logits are all-gathered, so every rank samples from the same full row. model.cfg becomes the rank's
view (heads, kv heads, intermediate size per rank; the vocabulary stays whole), so the runner allocates
per-rank KV caches and the attention backends run unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .group import TPGroup


TP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # the Llama-style decoder (llama.py)


def shard_problem(cfg, world: int) -> str | None:
    """Why this model can't be split over `world` ranks (one line naming the numbers), or None."""
    if cfg.model_type not in TP_MODEL_TYPES:  # their layers differ from the ones sharded here (Gemma, MoE)
        return (f"tensor_parallel is not supported for model_type {cfg.model_type!r} yet (supported: "
                f"{', '.join(TP_MODEL_TYPES)})")
    heads, kv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    if heads % world or inter % world:
        return (f"tensor_parallel {world} must divide num_attention_heads ({heads}) and intermediate_size "
                f"({inter})")
    if kv % world and world % kv:
        return (f"tensor_parallel {world} and num_key_value_heads ({kv}) must divide one another (KV heads "
                "are split across ranks, or replicated where there are fewer than ranks)")
    return None


def head_ranges(cfg, rank: int, world: int) -> tuple[range, range]:
    """(this rank's q heads, its kv heads)."""
    hq = cfg.num_heads // world
    q = range(rank * hq, (rank + 1) * hq)
    if cfg.num_kv_heads >= world:
        hk = cfg.num_kv_heads // world
        return q, range(rank * hk, (rank + 1) * hk)
    first = q.start // (cfg.num_heads // cfg.num_kv_heads)  # the kv head this rank's q heads share
    return q, range(first, first + 1)


class RowParallelLinear(nn.Module):
    """This rank's input columns of a linear; the partial outputs summed over the ranks."""

    def __init__(self, linear: nn.Linear, group: TPGroup) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual += all_reduce(x @ W): the fused decode layer's API (llama.forward_fused)."""
        return residual.add_(self(x))


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: nn.Parameter, start: int, group: TPGroup) -> None:
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class VocabParallelHead(nn.Module):
    def __init__(self, weight: nn.Parameter, vocab: int, group: TPGroup) -> None:
        super().__init__()
        self.weight, self.vocab, self.group = weight, vocab, group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last(F.linear(h, self.weight))[..., : self.vocab]


def _rows(t: torch.Tensor, parts: list[tuple[int, range]]) -> torch.Tensor:
    """Concatenated row blocks of t: for each (block size, indices), rows [i * size, (i + 1) * size)."""
    return torch.cat([t[r.start * size: r.stop * size] for size, r in parts])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def _vocab_rows(weight: torch.Tensor, rank: int, world: int) -> tuple[nn.Parameter, int]:
    per = -(-weight.shape[0] // world)
    shard = weight.new_zeros(per, weight.shape[1])
    part = weight[rank * per: (rank + 1) * per]
    shard[: part.shape[0]] = part
    return nn.Parameter(shard, requires_grad=False), rank * per


def _shard_attention(attn: nn.Module, cfg, q: range, kv: range, group: TPGroup) -> None:
    d = cfg.head_dim
    k0 = cfg.num_heads  # in head_dim rows: q heads, then k heads, then v heads
    parts = [(d, q), (d, range(k0 + kv.start, k0 + kv.stop)),
             (d, range(k0 + cfg.num_kv_heads + kv.start, k0 + cfg.num_kv_heads + kv.stop))]
    qkv = attn.qkv_proj
    attn.qkv_proj = _linear(_rows(qkv.weight, parts), None if qkv.bias is None else _rows(qkv.bias, parts))
    o = attn.o_proj.weight[:, q.start * d: q.stop * d]
    attn.o_proj = RowParallelLinear(_linear(o, None), group)
    attn.heads, attn.kv_heads = len(q), len(kv)
    attn.q_size, attn.kv_size = len(q) * d, len(kv) * d


def _shard_mlp(mlp: nn.Module, inter: int, group: TPGroup) -> None:
    n = inter // group.world
    mine = range(group.rank, group.rank + 1)
    gu = mlp.gate_up_proj.weight
    mlp.gate_up_proj = _linear(torch.cat([_rows(gu[:inter], [(n, mine)]), _rows(gu[inter:], [(n, mine)])]), None)
    mlp.down_proj = RowParallelLinear(_linear(mlp.down_proj.weight[:, group.rank * n: (group.rank + 1) * n], None),
                                      group)
    mlp.inter = n


@torch.no_grad()
def shard_model(model: nn.Module, group: TPGroup) -> None:
    """Cut `model` (a loaded LlamaModel, unquantized nn.Linear projections) to this rank's share."""
    cfg, rank, world = model.cfg, group.rank, group.world
    problem = shard_problem(cfg, world)
    if problem is not None:
        raise ValueError(problem)
    q, kv = head_ranges(cfg, rank, world)
    for layer in model.layers:
        if layer.mlp.down_proj.bias is not None or layer.self_attn.o_proj.bias is not None:
            raise ValueError("tensor_parallel: o_proj / down_proj with a bias is not supported")
        _shard_attention(layer.self_attn, cfg, q, kv, group)
        _shard_mlp(layer.mlp, cfg.intermediate_size, group)
    emb, start = _vocab_rows(model.embed_tokens.weight, rank, world)
    head = emb if cfg.tie_word_embeddings else _vocab_rows(model.lm_head.weight, rank, world)[0]
    model.embed_tokens = VocabParallelEmbedding(emb, start, group)
    model.lm_head = VocabParallelHead(head, cfg.vocab_size, group)
    model.cfg = dataclasses.replace(cfg, num_heads=len(q), num_kv_heads=len(kv),
                                    intermediate_size=cfg.intermediate_size // world)
    model.tensor_parallel = (rank, world)

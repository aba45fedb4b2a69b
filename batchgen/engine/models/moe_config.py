"""The mixture-of-experts part of a model description (Qwen3-MoE, Mixtral), read from its config.json dict.

Qwen3-MoE: top-k of `num_experts` (transformers >= 5 writes `num_local_experts`) by softmax over the router
logits in float32, the top-k weights renormalised when `norm_topk_prob` and then rounded to the model dtype;
a layer is sparse unless listed in `mlp_only_layers` or off the `decoder_sparse_step` grid (then a dense MLP
of `intermediate_size`). Mixtral: top-2 of `num_local_experts`, always renormalised, weights kept in float32,
every layer sparse with experts of `intermediate_size`. No shared expert in either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    norm_topk_prob: bool  # renormalise the top-k softmax weights to sum to 1
    round_weights: bool  # the top-k weights rounded to the model dtype before they scale the experts (Qwen3-MoE)
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP (False)

    @property
    def num_sparse(self) -> int:
        return sum(self.sparse_layers)

    def describe(self) -> str:
        norm = ", renormalised" if self.norm_topk_prob else ""
        layers = (f", {self.num_sparse} of {len(self.sparse_layers)} layers sparse"
                  if self.num_sparse != len(self.sparse_layers) else "")
        return f"MoE top-{self.top_k} of {self.num_experts} experts{norm}{layers}"


def moe_config(d: dict[str, Any], layers: int) -> MoeConfig | None:
    """The MoE settings of a Qwen3-MoE or Mixtral config, None for a dense model."""
    mt = d.get("model_type")
    if mt not in MOE_MODEL_TYPES:
        return None
    experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
    if experts <= 0:  # Qwen3-MoE with num_experts 0 is a dense model (transformers builds no sparse block)
        return None
    k = int(d.get("num_experts_per_tok", 2))
    if not 0 < k <= experts:
        raise ValueError(f"num_experts_per_tok {k} must be between 1 and the number of experts ({experts})")
    if mt == "mixtral":
        return MoeConfig(experts, k, int(d["intermediate_size"]), True, False, (True,) * layers)
    step = int(d.get("decoder_sparse_step") or 1)
    dense = set(d.get("mlp_only_layers") or ())
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    return MoeConfig(experts, k, int(d.get("moe_intermediate_size") or d["intermediate_size"]),
                     bool(d.get("norm_topk_prob", False)), True, sparse)

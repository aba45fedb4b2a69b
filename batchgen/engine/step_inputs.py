"""The device tensors of one step, as the runner stages them (one host->device copy per dtype).

T tokens of B sequences, S of which sample this step. Token ids of -1 are still on the device:
the forward gathers them from the runner's sampled-token buffer by `tok_slot`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepInputs:
    ids: torch.Tensor  # [T] int64 input ids (-1: the sequence's last sampled token, not on the host yet)
    pos: torch.Tensor  # [T] int64 absolute positions
    slot_mapping: torch.Tensor  # [T] int64 KV cache slot of each token
    tok_slot: torch.Tensor  # [T] int64 sequence slot of each token
    qsl: torch.Tensor  # [B + 1] int32 cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32 context length after this step
    tables: torch.Tensor  # [B, blocks] int32 block tables, as wide as the longest sequence needs
    logit_rows: torch.Tensor  # [S] int64 token rows whose logits are sampled
    s_slots: torch.Tensor  # [S] int64 slots of the sampling sequences
    s_pos: torch.Tensor  # [S] int64 position of the token each one samples
    iparams: torch.Tensor  # [2, S] int64: top_k, sampling stream key
    fparams: torch.Tensor  # [4, S] float32: temperature, top_p, min_p, repetition_penalty
    suppress: torch.Tensor | None = None  # [S, E] int64 stop ids forbidden under min_new_tokens (-1 padded)

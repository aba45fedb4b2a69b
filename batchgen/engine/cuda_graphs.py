"""CUDA graphs for decode steps: one graph per padded batch size, sharing one memory pool.

A decode step is the same sequence of kernels every time, only the batch size and the values in
its inputs change, so it is captured once per size of a ladder and replayed: the launch overhead
of a few hundred small kernels becomes one graph launch. Inputs live in static buffers; padded
rows write their K/V to the scratch block and have length 0, so they touch no real sequence.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .attention.base import AttentionBackend, AttentionMetadata
from .step_inputs import StepInputs

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def batch_ladder(max_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_size] + list(range(16, max_size, 16))
    return sorted(set(sizes + [max_size]))


class DecodeGraphs:
    """model(ids, positions, kv_caches, meta, backend) -> hidden and model.logits(hidden), captured.
    token_buf: the runner's sampled-token buffer (by slot), read for ids of -1; table_width: block
    table columns of the longest sequence; max_seq_len: the host bound the attention kernels get."""

    def __init__(self, model: nn.Module, backend: AttentionBackend, kv_caches: KVCaches, token_buf: torch.Tensor,
                 max_batch: int, max_seq_len: int, table_width: int) -> None:
        self.model, self.backend, self.kv_caches, self.token_buf = model, backend, kv_caches, token_buf
        self.sizes = batch_ladder(max_batch)
        self.max_seq_len = max_seq_len
        dev = token_buf.device
        M = self.sizes[-1]
        self.ids = torch.zeros(M, dtype=torch.int64, device=dev)
        self.tok_slot = torch.zeros(M, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(M, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(M, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(M, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(M + 1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(M, table_width, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0

    def _forward(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:n], query_start_loc=self.qsl[: n + 1],
                                 seq_lens=self.seq_lens[:n], block_tables=self.tables[:n], max_query_len=1,
                                 max_seq_len=self.max_seq_len, decode_only=True)
        ids = torch.where(self.ids[:n] >= 0, self.ids[:n], self.token_buf[self.tok_slot[:n]])
        hidden = self.model(ids, self.pos[:n], self.kv_caches, meta, self.backend)
        return self.model.logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = None
        self.seq_lens.fill_(1)  # capture on harmless inputs: every row reads one scratch-block slot
        for n in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            self._forward(n)  # warm-up: compiles kernels, settles allocator
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[n] = self._forward(n)
            pool = g.pool()
            self.graphs[n] = g
        self.seq_lens.zero_()
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def run(self, inputs: StepInputs, batch: int) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, replay, return logits [batch, vocab]."""
        n = next(s for s in self.sizes if s >= batch)
        self.ids[:batch].copy_(inputs.ids)
        self.tok_slot[:batch].copy_(inputs.tok_slot)
        self.pos[:batch].copy_(inputs.pos)
        self.slot_mapping[:batch].copy_(inputs.slot_mapping)
        self.seq_lens[:batch].copy_(inputs.seq_lens)
        tables = inputs.tables
        self.tables[:batch, : tables.shape[1]].copy_(tables)
        if n > batch:  # padded rows: scratch slot, empty context
            self.slot_mapping[batch:n].zero_()
            self.seq_lens[batch:n].zero_()
        self.graphs[n].replay()
        return self.logits[n][:batch]

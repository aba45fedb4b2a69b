"""CUDA graphs for decode steps: one graph per padded batch size, sharing one memory pool.

A decode step is the same sequence of kernels every time, only the batch size and the values in
its inputs change, so it is captured once per size of a ladder and replayed: the launch overhead
of a few hundred small kernels becomes one graph launch. Inputs live in static buffers; padded
rows write their K/V to the scratch block and have length 0, so they touch no real sequence.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .attention.base import AttentionMetadata

if TYPE_CHECKING:
    from .runner import ModelRunner, PreparedStep


def batch_ladder(max_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_size] + list(range(16, max_size, 16))
    return sorted(set(sizes + [max_size]))


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_batch: int, max_seq_len: int) -> None:
        self.runner = runner
        self.sizes = batch_ladder(max_batch)
        self.max_seq_len = max_seq_len
        dev = runner.device
        M, width = self.sizes[-1], runner.table.shape[1]
        self.ids = torch.zeros(M, dtype=torch.int64, device=dev)
        self.tok_slot = torch.zeros(M, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(M, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(M, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(M, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(M + 1, dtype=torch.int32, device=dev)
        self.tables = torch.zeros(M, width, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.capture_s = 0.0

    def _forward(self, n: int) -> torch.Tensor:
        r = self.runner
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:n], query_start_loc=self.qsl[: n + 1],
                                 seq_lens=self.seq_lens[:n], block_tables=self.tables[:n], max_query_len=1,
                                 max_seq_len=self.max_seq_len, decode_only=True)
        ids = torch.where(self.ids[:n] >= 0, self.ids[:n], r.token_buf[self.tok_slot[:n]])
        hidden = r.model(ids, self.pos[:n], r.kv_caches, meta, r.backend)
        return r.model.logits(hidden)

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

    def run(self, step: "PreparedStep", batch: int) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, replay, return logits [batch, vocab]."""
        n = next(s for s in self.sizes if s >= batch)
        d = step.dev
        self.ids[:batch].copy_(d["ids"])
        self.tok_slot[:batch].copy_(d["tok_slot"])
        self.pos[:batch].copy_(d["pos"])
        self.slot_mapping[:batch].copy_(d["slot_mapping"])
        self.seq_lens[:batch].copy_(d["seq_lens"])
        tables = d["tables"]
        self.tables[:batch, : tables.shape[1]].copy_(tables)
        if n > batch:  # padded rows: scratch slot, empty context
            self.slot_mapping[batch:n].zero_()
            self.seq_lens[batch:n].zero_()
        self.graphs[n].replay()
        return self.logits[n][:batch]

"""Which sequences run this step and how many tokens each: continuous batching under a token
budget, prefill and decode mixed, long prompts chunked, preemption by recompute.

Running sequences go first, in admission order, each taking what it still needs (1 token when
decoding, a chunk when prefilling). When blocks run out, the most recently admitted running
sequence is preempted (blocks freed, recomputed later from its known tokens). Waiting sequences
are admitted while the budget, max_num_seqs and free blocks allow; their prompts first reuse
cached prefix blocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # num_computed before this step
    lens: list[int] = field(default_factory=list)  # tokens computed this step
    slots: list[int] = field(default_factory=list)  # each sequence's slot, in batch order
    no_sample: list[int] = field(default_factory=list)  # batch indices of prefill chunks that sample nothing
    admitted: list[Sequence] = field(default_factory=list)  # newly placed in a slot this step
    grown: list[Sequence] = field(default_factory=list)  # running sequences that got new blocks this step

    # input ids of the step's tokens, in batch order; -1 marks a token still on the device (the runner
    # gathers it from the sampled-token buffer by slot). Built here, while each sequence is at hand.
    ids: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_batch_tokens: int) -> None:
        self.bm = blocks
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.preemptions = 0
        # keep a few blocks free at admission so running sequences can grow without thrashing
        self.watermark = max(1, blocks.usable_blocks // 100)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.bm.block_size)

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """This step's batch (None when nothing can run): running sequences first, then admissions,
        unless a running sequence had to be preempted (then the cache is full: admit nobody)."""
        batch = ScheduledBatch()
        budget, preempted = self._schedule_running(batch, self.max_batch_tokens)
        if not preempted:
            self._admit_waiting(batch, budget)
        return batch if batch.seqs else None

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        """Each running sequence takes what it still needs, in admission order, preempting the most recent
        ones when blocks run out. Returns (the budget left, whether anything was preempted)."""
        preempted = False
        bs, bm, running = self.bm.block_size, self.bm, self.running
        add_seq, add_start, add_len, add_slot = batch.seqs.append, batch.starts.append, batch.lens.append, batch.slots.append
        add_id = batch.ids.append
        n_run, i = len(running), 0
        while i < n_run and budget > 0:  # the hot loop: kept flat, one pass per running sequence
            seq = running[i]
            nc, nt = seq.num_computed, seq.num_tokens
            if nt >= seq.max_tokens and nc >= nt - 1:  # capped, its last token on the device (overlap only)
                self._retire(i)
                n_run -= 1
                continue
            n = nt - nc if nt - nc <= budget else budget
            need = (nc + n + bs - 1) // bs - len(seq.blocks)
            if need > 0:
                while need > bm.num_free:
                    victim = running[-1]
                    self.preempt(victim)
                    n_run -= 1
                    preempted = True
                    if victim is seq:
                        break
                if seq.status is not Status.RUNNING:
                    break
                seq.blocks += bm.allocate(need)
                batch.grown.append(seq)
            if nt - nc == 1 and nc >= seq.num_prompt:  # decode, the common case: _take inlined
                # (a prompt's last token scheduled alone goes through _take: it releases n > 1 siblings)
                seq.num_computed, seq.num_tokens = nt, nt + 1
                toks = seq.token_ids
                add_id(toks[nc] if nc < len(toks) else -1)
                add_seq(seq)
                add_start(nc)
                add_len(1)
                add_slot(seq.slot)
                if (seq.num_hashed + 1) * bs <= nt:
                    self._name_full_blocks(seq)
            else:
                self._take(batch, seq, n)
            budget -= n
            i += 1
        return budget, preempted

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        """Admit waiting sequences (prefix-cache hits first) while the budget, the slots and the blocks allow."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if len(seq.token_ids) < seq.num_tokens:  # preempted with a token still on the device
                break
            if not seq.blocks:  # reuse cached full blocks of its known tokens (keep >= 1 token to compute)
                seq.blocks, seq.last_hash = self.bm.match_prefix(seq.token_ids, seq.num_tokens - 1)
                seq.num_computed = seq.num_hashed = len(seq.blocks)
                seq.num_computed *= self.bm.block_size
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.blocks_for(seq.num_computed + n) - len(seq.blocks)
            if need + self.watermark > self.bm.num_free and self.running:
                self._unmatch(seq)
                break
            if need > self.bm.num_free:  # nothing running and still no room: cannot happen for admitted sizes
                self._unmatch(seq)
                break
            seq.blocks += self.bm.allocate(need)
            self.bm.hit_tokens += seq.num_hashed * self.bm.block_size  # counted once, on admission
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
            batch.admitted.append(seq)
            self._take(batch, seq, n)
            budget -= n

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        start = seq.num_computed
        seq.num_computed = end = start + n
        samples = end == seq.num_tokens
        if samples:
            seq.num_tokens += 1  # the sampled token is pending on the device until results come back
        else:
            batch.no_sample.append(len(batch.seqs))
        known = seq.token_ids[start:start + n]
        batch.ids += known
        batch.ids += [-1] * (n - len(known))  # the last token may still be on the device
        batch.seqs.append(seq)
        batch.starts.append(start)
        batch.lens.append(n)
        batch.slots.append(seq.slot)
        bs = self.bm.block_size
        if (seq.num_hashed + 1) * bs <= end:  # a block just filled up: name it if its tokens are known
            self._name_full_blocks(seq)
        if start < seq.num_prompt <= end and seq.index == 0 and len(seq.group.seqs) > 1:
            self._release_siblings(seq)

    def _name_full_blocks(self, seq: Sequence) -> None:
        bs = self.bm.block_size
        known = min(seq.num_computed, len(seq.token_ids))
        while (seq.num_hashed + 1) * bs <= known:
            j = seq.num_hashed
            seq.last_hash = self.bm.register(seq.blocks[j], seq.last_hash, tuple(seq.token_ids[j * bs:(j + 1) * bs]))
            seq.num_hashed += 1

    def _release_siblings(self, leader: Sequence) -> None:
        """Samples 1..n-1 wait until the first sample's prompt is scheduled, then share its prefix blocks."""
        for sib in reversed(leader.group.seqs[1:]):
            if sib.status is Status.WAITING and sib not in self.waiting:
                self.waiting.appendleft(sib)

    def _unmatch(self, seq: Sequence) -> None:
        self.bm.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_hashed, seq.last_hash = [], 0, 0, 0

    def _retire(self, i: int) -> None:
        """running[i] has its last token in the step in flight (the overlapped loop schedules before it sees
        it): its slot and blocks go back now, where the synchronous loop, which has the token already, frees
        them, so both loops admit the same sequences at the same steps and compute the same batches. The step
        in flight touches them only on the device's stream, before any later step does. The token is still
        appended when it arrives; finish() then ends the sequence."""
        seq = self.running.pop(i)
        self.free_slots.append(seq.slot)
        seq.slot = -1
        self._unmatch(seq)
        seq.status = Status.RETIRING

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._unmatch(seq)
        self.free_slots.append(seq.slot)
        seq.slot = -1
        self.preemptions += 1
        self.add(seq, front=True)

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._unmatch(seq)
        seq.status = Status.FINISHED

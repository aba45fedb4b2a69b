"""Invariants of the engine's host state (BlockManager + Scheduler), checked by the scheduler unit tests
after every step and by the stress tests after every run. Each check raises AssertionError with the
broken invariant spelled out."""
from __future__ import annotations

from collections import Counter

from batchgen.engine.kv_cache import NULL_BLOCK, BlockManager
from batchgen.engine.scheduler import Scheduler
from batchgen.engine.sequence import Status


def check_blocks(bm: BlockManager, held: Counter[int]) -> None:
    """`held`: how many live sequences hold each block. Ref counts, the two free lists and the hash maps agree."""
    plain, cached = list(bm.free_plain), list(bm.free_cached)
    assert len(plain) == len(set(plain)), "a block is twice in the plain free list"
    free = set(plain) | set(cached)
    assert not set(plain) & set(cached), "a block is in both free lists"
    assert NULL_BLOCK not in free and NULL_BLOCK not in held, "the scratch block was handed out"
    for b in range(1, bm.num_blocks):
        assert bm.ref[b] == held[b], f"block {b}: ref count {bm.ref[b]} but {held[b]} sequences hold it"
        assert (bm.ref[b] == 0) == (b in free), f"block {b}: ref {bm.ref[b]} but free={b in free}"
    for b in cached:
        assert b in bm.hash_of, f"cached free block {b} holds no named prefix"
    for b in plain:
        assert b not in bm.hash_of, f"plain free block {b} still holds a named prefix"
    for h, b in bm.block_of.items():
        assert bm.hash_of.get(b) == h, f"hash {h} points at block {b}, which holds {bm.hash_of.get(b)}"
    assert bm.num_free + len(held) == bm.usable_blocks, "blocks neither free nor held"


def check_scheduler(s: Scheduler) -> None:
    """Slots, statuses and per-sequence counters of every waiting and running sequence."""
    bs = s.bm.block_size
    slots = [q.slot for q in s.running]
    assert len(s.running) <= s.max_num_seqs, "more running sequences than max_num_seqs"
    assert len(set(slots)) == len(slots), f"two running sequences share a slot: {slots}"
    assert sorted(slots + s.free_slots) == list(range(s.max_num_seqs)), "slots lost or duplicated"
    assert len(set(map(id, s.waiting))) == len(s.waiting), "a sequence is twice in the waiting queue"
    assert not set(map(id, s.waiting)) & set(map(id, s.running)), "a sequence is both waiting and running"
    held: Counter[int] = Counter()
    for q in s.waiting:
        assert q.status is Status.WAITING and q.slot == -1, "a waiting sequence is not WAITING or holds a slot"
        assert not q.blocks, "a waiting sequence holds KV blocks"
    for q in s.running:
        assert q.status is Status.RUNNING, f"a running sequence has status {q.status}"
        assert q.num_computed <= q.num_tokens <= q.max_tokens, "counters out of order"
        # overlapped, between scheduling step N+1 and processing step N: N's token is being fed (on the device)
        # and N+1's is being sampled, so up to two tokens are not yet known on the host
        assert 0 <= q.num_tokens - len(q.token_ids) <= 2, "more than two sampled tokens unaccounted for"
        assert q.num_computed <= len(q.token_ids) + 1, "K/V computed for a token the step cannot have"
        assert len(q.blocks) == -(-q.num_computed // bs), (
            f"{len(q.blocks)} blocks for {q.num_computed} computed tokens")
        assert q.num_hashed <= len(q.blocks) and q.num_hashed * bs <= len(q.token_ids), "a block named too early"
        held.update(q.blocks)
    check_blocks(s.bm, held)


def check_idle(s: Scheduler) -> None:
    """After a run: nothing waiting or running, every slot free, every block free (plain or cached)."""
    assert not s.waiting and not s.running, f"{len(s.waiting)} waiting, {len(s.running)} running after the run"
    check_scheduler(s)
    assert s.bm.num_free == s.bm.usable_blocks


def check_engine_idle(engine) -> None:
    """The engine after a run: scheduler idle, no request left in its table, nothing in flight."""
    check_idle(engine.scheduler)
    assert not engine._live, f"{len(engine._live)} requests still in the engine's table"
    assert engine._inflight is None or all(q.status is Status.FINISHED for q in engine._inflight.seqs)

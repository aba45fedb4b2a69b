"""Scheduler and BlockManager on their own, without a model: a small driver plays the engine's side of
the contract (schedule; the sampled tokens come back one step later when overlapped, at once when not)
and every invariant of tests/invariants.py is checked after every step, over thousands of seeded
random steps with caches small enough to preempt all the time."""
from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from invariants import check_blocks, check_idle, check_scheduler  # noqa: E402

from batchgen.engine.kv_cache import BlockManager  # noqa: E402
from batchgen.engine.request import SamplingParams  # noqa: E402
from batchgen.engine.scheduler import ScheduledBatch, Scheduler  # noqa: E402
from batchgen.engine.sequence import RequestGroup, Sequence, Status  # noqa: E402

STOP = 3  # the driver's "EOS"


def next_token(history: list[int], vocab: int) -> int:
    """A token that depends only on the history: the same run gives the same text however it is scheduled."""
    return hash(tuple(history[-8:])) % vocab


class Driver:
    """The engine's side of the scheduler contract (Engine._accept / _advance / _process / _drop)."""

    def __init__(self, sched: Scheduler, overlap: bool, vocab: int = 64, max_model_len: int = 4096) -> None:
        self.s, self.overlap, self.vocab, self.max_model_len = sched, overlap, vocab, max_model_len
        self.groups: list[RequestGroup] = []
        self.pending: list[Sequence] | None = None  # sampled in the launched step, tokens not yet back
        self.steps = 0

    def add(self, prompt: list[int], n: int, max_new: int, stop: bool = True) -> RequestGroup:
        g = RequestGroup(len(self.groups), list(prompt), SamplingParams(max_new_tokens=max_new, n=n))
        stops = frozenset([STOP]) if stop else frozenset()
        for j in range(n):
            g.seqs.append(Sequence(g, j, j, stops, min(len(prompt) + max_new, self.max_model_len), list(prompt)))
        self.groups.append(g)
        for q in g.seqs[:1] if self.s.bm.prefix_caching and n > 1 else g.seqs:
            self.s.add(q)
        return g

    def step(self) -> bool:
        """One loop turn; False once nothing is left. Raises on a stall (nothing schedulable, nothing pending)."""
        knew_all = self.pending is None
        batch = self.s.schedule()
        check_scheduler(self.s)
        if batch is not None:
            self.check_batch(batch)
        launched = None if batch is None else [q for i, q in enumerate(batch.seqs) if i not in set(batch.no_sample)]
        previous, self.pending = self.pending, launched
        if previous is not None:
            self.process(previous)
        if launched is not None and not self.overlap:
            self.pending = None
            self.process(launched)
        check_scheduler(self.s)
        unfinished = [g for g in self.groups if g.num_finished < len(g.seqs)]
        if batch is None and knew_all and unfinished:
            raise AssertionError(f"stall: {len(unfinished)} unfinished groups, {len(self.s.waiting)} waiting, "
                                 f"{len(self.s.running)} running")
        self.steps += 1
        return bool(unfinished) or self.pending is not None

    def check_batch(self, batch: ScheduledBatch) -> None:
        assert sum(batch.lens) <= self.s.max_batch_tokens, "token budget exceeded"
        assert len(batch.seqs) == len(set(map(id, batch.seqs))), "a sequence twice in one step"
        assert len(batch.ids) == sum(batch.lens)
        off = 0
        for q, start, n in zip(batch.seqs, batch.starts, batch.lens):
            known = q.token_ids[start:start + n]
            assert batch.ids[off:off + len(known)] == known, "step input ids differ from the known tokens"
            unknown = batch.ids[off + len(known):off + n]
            assert unknown in ([], [-1]), "more than the last token is unknown"
            if unknown:  # a token still on the device: only possible for the sequence's own last sample
                assert self.overlap and start + n == len(q.token_ids) + 1
            off += n

    def process(self, sampled: list[Sequence]) -> None:
        for q in sampled:
            if q.status is Status.FINISHED:
                continue
            tok = next_token(q.token_ids, self.vocab)
            q.token_ids.append(tok)
            gen = len(q.token_ids) - q.num_prompt
            if (tok in q.stop_ids) or gen >= q.params.max_new_tokens or len(q.token_ids) >= q.max_tokens:
                self.s.finish(q)
                q.group.num_finished += 1

    def abort(self, g: RequestGroup) -> None:
        if g.num_finished == len(g.seqs):
            return
        for q in g.seqs:
            if q.status is not Status.FINISHED:
                self.s.finish(q)
        g.num_finished = len(g.seqs)
        g.request_id = ("aborted", g.request_id)

    def run(self, max_steps: int = 100_000) -> None:
        while self.step():
            assert self.steps < max_steps, "no end in sight"

    def outputs(self) -> dict:
        return {g.request_id: [tuple(q.token_ids) for q in g.seqs] for g in self.groups}


def make(num_blocks: int, block_size: int = 4, prefix: bool = True, max_num_seqs: int = 8,
         max_batch_tokens: int = 32) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix), max_num_seqs, max_batch_tokens)


# ------------------------------------------------------------------ regressions


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("prompt_len", [64, 65, 66])
def test_prompt_last_token_alone_releases_siblings(overlap, prompt_len):
    """A prompt one token longer than the step budget: its last token is scheduled alone, which took the
    decode fast path and never queued samples 1..n-1 (the request was silently lost)."""
    d = Driver(make(64, block_size=16, max_batch_tokens=64), overlap)
    g = d.add(list(range(10, 10 + prompt_len)), n=2, max_new=5, stop=False)
    d.run()
    assert g.num_finished == 2 and all(len(q.token_ids) == prompt_len + 5 for q in g.seqs)
    check_idle(d.s)


def test_preempted_with_a_token_in_flight_is_not_a_stall():
    """Overlapped: a sequence preempted while its sampled token is still on the device blocks admission for
    one step; with nothing running that step schedules nothing, which is no stall (a step is in flight)."""
    d = Driver(make(9, block_size=4, max_num_seqs=4, max_batch_tokens=64), overlap=True)
    for i in range(6):
        d.add([20 + i] * 9, n=1, max_new=12, stop=False)
    d.run()
    assert d.s.preemptions > 0
    assert all(g.num_finished == 1 for g in d.groups)
    check_idle(d.s)


def test_preemption_takes_the_latest_admitted_and_requeues_it_first():
    s = make(7, block_size=4, max_num_seqs=4, max_batch_tokens=64)  # 6 usable blocks
    d = Driver(s, overlap=False)
    a, b = d.add([5] * 8, 1, 12, stop=False), d.add([6] * 8, 1, 12, stop=False)  # 5 blocks each at the end
    d.step()  # both admitted: 2 blocks each
    assert [q.group for q in s.running] == [a, b]
    while s.preemptions == 0:
        d.step()
    assert [q.group for q in s.running] == [a] and s.waiting[0].group is b
    d.run()
    check_idle(s)


def test_waiting_sequences_never_hold_blocks_and_watermark_keeps_room():
    s = make(201, block_size=4, max_num_seqs=64, max_batch_tokens=4096)
    d = Driver(s, overlap=False)
    for i in range(64):
        d.add([7 + i % 5] * 30, 1, 4, stop=False)
    d.step()
    assert s.bm.num_free >= s.watermark, "admission ate into the growth watermark"
    d.run()
    check_idle(s)


# ------------------------------------------------------------------ BlockManager


def test_block_refs_prefix_match_and_lru_eviction():
    bm = BlockManager(5, 2)  # blocks 1..4
    a = bm.allocate(2)
    h = bm.register(a[0], 0, (1, 2))
    bm.register(a[1], h, (3, 4))
    check_blocks(bm, Counter(a))
    b, last = bm.match_prefix([1, 2, 3, 4, 5], 5)  # both full blocks are shared
    assert b == a and last != 0
    check_blocks(bm, Counter(a + b))
    bm.release(a)
    bm.release(b)
    check_blocks(bm, Counter())
    assert len(bm.free_cached) == 2 and bm.num_free == 4
    again, _ = bm.match_prefix([1, 2, 3, 4], 4)  # a freed cached prefix is revived
    assert again == a
    bm.release(again)
    taken = bm.allocate(3)  # 2 plain blocks first, then the least recently used cached one
    assert a[1] in taken and a[0] not in taken, "evicted the wrong cached block"
    check_blocks(bm, Counter(taken))
    assert bm.match_prefix([1, 2, 3, 4], 4)[0] == [a[0]], "the chain must stop at the evicted block"
    with pytest.raises(MemoryError):
        bm.allocate(2)


def test_hash_collision_does_not_share_wrong_tokens():
    bm = BlockManager(4, 2)
    (b,) = bm.allocate(1)
    bm.register(b, 0, (1, 2))
    bm.tokens_of[b] = (9, 9)  # as if another prefix had hashed the same
    assert bm.match_prefix([1, 2], 2) == ([], 0)


def test_prefix_caching_off_names_nothing():
    bm = BlockManager(4, 2, prefix_caching=False)
    (b,) = bm.allocate(1)
    bm.register(b, 0, (1, 2))
    bm.release([b])
    assert not bm.hash_of and list(bm.free_plain).count(b) == 1
    assert bm.match_prefix([1, 2], 2) == ([], 0)


# ------------------------------------------------------------------ randomized


def random_workload(rng: random.Random, d: Driver, n_groups: int, vocab: int) -> None:
    prefixes = [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 40))] for _ in range(3)]
    for _ in range(n_groups):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 60))]
        if rng.random() < 0.5:
            prompt = rng.choice(prefixes) + prompt[: rng.randint(0, 20)]
        d.add(prompt, rng.choice([1, 1, 2, 4, 8]), rng.randint(1, 40), stop=rng.random() < 0.7)


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_keep_invariants_and_overlap_equals_sync(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8, 16])
    longest = 60 + 40 + 40  # prompt (prefix + suffix) + max_new
    num_blocks = -(-longest // bs) + 1 + rng.randint(0, 3 * longest // bs)  # from just-fits to roomy
    conf = dict(num_blocks=num_blocks, block_size=bs, prefix=rng.random() < 0.6,
                max_num_seqs=rng.randint(1, 32), max_batch_tokens=rng.choice([1, 2, 7, 16, 64, 512]))
    n_groups, outs = rng.randint(1, 24), []
    for overlap in (False, True):
        d = Driver(make(**conf), overlap)
        random_workload(random.Random(seed), d, n_groups, d.vocab)
        aborted = set(random.Random(seed + 1).sample(range(len(d.groups)), k=min(2, len(d.groups) // 4)))
        while d.step():
            for i in list(aborted):  # abandoned requests: dropped mid-run, the rest go on
                if d.steps >= 3 * (i + 1):
                    d.abort(d.groups[i])
                    aborted.discard(i)
            assert d.steps < 100_000
        check_idle(d.s)
        assert all(g.num_finished == len(g.seqs) for g in d.groups)
        outs.append(d.outputs())
    both = {k for k in outs[0].keys() & outs[1].keys() if not isinstance(k, tuple)}  # aborted ones are left out
    assert len(both) >= len(outs[0]) - 4
    assert {k: outs[0][k] for k in both} == {k: outs[1][k] for k in both}, (
        f"overlapped and synchronous runs differ ({conf})")

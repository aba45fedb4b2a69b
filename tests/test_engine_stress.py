"""Seeded randomized stress of the real engine on a tiny checkpoint (CPU float32): many configurations
with caches small enough to preempt constantly, chunked prefill, prefix caching on and off, shared
prefixes, n in {1, 2, 4, 8}, greedy and seeded sampling, stop strings, min_new_tokens, abandoned and
interleaved streams. For each: no exception, every request returns all its samples, the overlapped
loop gives the synchronous loop's tokens token for token, and the engine ends idle (every block free
or cached, ref counts zero, no slot held)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402
from invariants import check_engine_idle  # noqa: E402

from batchgen import GenerationRequest, SamplingParams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_CONFIGS = 16
STOP_WORDS = ["the", " a", "o", "Paris", "\n", "1"]


@pytest.fixture(scope="module")
def path(tiny_checkpoint) -> str:
    return str(tiny_checkpoint("llama"))


def random_config(rng: random.Random) -> dict:
    return dict(max_num_seqs=rng.randint(1, 32), kv_cache_tokens=rng.choice([256, 320, 512, 1024]),
                max_batch_tokens=rng.choice([8, 17, 64, 128, 512]), prefix_caching=rng.random() < 0.6,
                block_size=rng.choice([4, 8, 16]))


def random_requests(rng: random.Random, vocab: int, count: int) -> list[GenerationRequest]:
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 80))] for _ in range(3)]
    reqs = []
    for i in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 100))]
        if rng.random() < 0.5:  # shared prefixes: prefix-cache hits, and blocks shared across requests
            prompt = rng.choice(prefixes) + prompt[: rng.randint(1, 40)]
        seeded = rng.random() < 0.5
        max_new = rng.randint(1, 48)
        params = SamplingParams(
            max_new_tokens=max_new, n=rng.choice([1, 1, 2, 4, 8]),
            temperature=0.9 if seeded else 0.0, top_p=0.9 if seeded else 1.0, seed=rng.randrange(1 << 30) if seeded else None,
            stop=[rng.choice(STOP_WORDS)] if rng.random() < 0.3 else [],
            min_new_tokens=rng.randint(0, max_new) if rng.random() < 0.3 else 0,
            ignore_eos=rng.random() < 0.5)
        reqs.append(GenerationRequest(prompt, params, request_id=i))
    return reqs


def summary(outs) -> dict:
    """request id -> per sample (tokens, finish reason, error)."""
    return {o.request_id: [(tuple(c.token_ids), c.finish_reason, c.error) for c in o.outputs] for o in outs}


def check_complete(outs, reqs) -> None:
    assert sorted(o.request_id for o in outs) == [r.request_id for r in reqs], "a request is missing or doubled"
    for o in outs:
        n = reqs[o.request_id].params.n
        assert [c.index for c in o.outputs] == list(range(n)), f"request {o.request_id}: samples missing"
        assert all(c.error is None for c in o.outputs), f"request {o.request_id}: {o.error}"


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_overlap_equals_sync_under_constant_preemption(path, seed):
    rng = random.Random(seed)
    conf = random_config(rng)
    vocab, _ = R.model_info(path)
    reqs = random_requests(rng, vocab, rng.randint(4, 40))
    eng = R.make_engine(path, overlap=False, **conf)
    try:
        results = []
        for overlap in (False, True):
            eng.overlap = overlap
            if overlap and rng.random() < 0.5:  # an abandoned stream first: it must leave nothing behind
                stream = eng.stream(reqs)
                for _ in range(rng.randint(0, 3)):
                    next(stream, None)
                stream.close()
                check_engine_idle(eng)
            outs = list(eng.stream(reqs))
            check_complete(outs, reqs)
            check_engine_idle(eng)
            results.append(summary(outs))
        assert results[0] == results[1], f"overlapped != synchronous for {conf}"
    finally:
        eng.close()


def test_interleaved_streams_each_get_their_own_outputs(path):
    """Two streams (and a generate) on one engine, consumed alternately: every output goes to its own call,
    and the tokens equal those of one call at a time."""
    rng = random.Random(99)
    vocab, _ = R.model_info(path)
    a, b, c = (random_requests(rng, vocab, 12) for _ in range(3))
    eng = R.make_engine(path, max_num_seqs=6, kv_cache_tokens=512, max_batch_tokens=64, overlap=True)
    try:
        alone = [summary(eng.generate(reqs)) for reqs in (a, b, c)]
        sa, sb = eng.stream(a), eng.stream(b)
        got_a, got_b = [next(sa)], []
        got_c = eng.generate(c)  # runs to completion while both streams are open
        for x, y in zip(sa, sb):
            got_a.append(x)
            got_b.append(y)
        got_a += list(sa)
        got_b += list(sb)
        assert [summary(got_a), summary(got_b), summary(got_c)] == alone
        check_engine_idle(eng)
    finally:
        eng.close()


def test_push_api_add_step(path):
    rng = random.Random(5)
    vocab, _ = R.model_info(path)
    reqs = random_requests(rng, vocab, 10)
    eng = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=320, max_batch_tokens=32, overlap=True)
    try:
        ref = summary(eng.generate(reqs))
        assert eng.add(reqs[:4]) == [0, 1, 2, 3]
        outs = []
        while eng.has_unfinished():
            outs += eng.step()
            if len(outs) >= 2 and len(reqs) > 4:
                eng.add(reqs[4:])
                reqs = reqs[:4]
        assert summary(outs) == ref
        assert eng.step() == [] and not eng.has_unfinished()
        check_engine_idle(eng)
    finally:
        eng.close()


def test_interrupted_step_ends_every_request_with_an_error(path, monkeypatch):
    """An exception inside a step (a signal, an OOM) ends every unfinished request with an error output and
    leaves the engine idle and usable: nothing is silently lost."""
    vocab, _ = R.model_info(path)
    reqs = random_requests(random.Random(3), vocab, 8)
    eng = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=512, overlap=True)
    try:
        eng.add(reqs[4:])  # another caller's requests
        real, calls = eng.runner.forward, [0]

        def flaky(step):
            calls[0] += 1
            if calls[0] == 5:
                raise KeyboardInterrupt
            return real(step)

        monkeypatch.setattr(eng.runner, "forward", flaky)
        with pytest.raises(KeyboardInterrupt):
            list(eng.stream(reqs[:4]))
        check_engine_idle(eng)
        pushed = eng.step()
        assert sorted(o.request_id for o in pushed) == [4, 5, 6, 7], "the other caller's requests were lost"
        failed = [c for o in pushed for c in o.outputs if c.finish_reason == "error"]
        assert failed and all("interrupted by KeyboardInterrupt" in c.error for c in failed)
        monkeypatch.setattr(eng.runner, "forward", real)
        check_complete(eng.generate(reqs), reqs)
    finally:
        eng.close()


def test_overlap_schedules_the_synchronous_batches_when_lengths_end_requests(path):
    """A sequence that reaches max_new_tokens gives its slot and blocks back when the overlapped loop schedules
    past it (its last token still in flight), where the synchronous loop frees them: both loops admit the same
    requests at the same steps, so every step computes the same batch. (Before, the overlapped loop admitted a
    step later: other batches, other GEMM shapes, and in bf16 with an FP8 cache other tokens on the GPU.)"""
    rng = random.Random(7)
    vocab = R.model_info(path)[0]
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))] for _ in range(24)]
    params = [SamplingParams(max_new_tokens=rng.randint(1, 24), ignore_eos=True) for _ in prompts]
    batches, texts = [], []
    for overlap in (False, True):
        eng = R.make_engine(path, max_num_seqs=6, kv_cache_tokens=4096, max_batch_tokens=64, overlap=overlap)
        steps: list[tuple[int, ...]] = []
        schedule = eng.scheduler.schedule

        def logged(schedule=schedule, steps=steps):
            batch = schedule()
            if batch is not None:
                steps.append(tuple(batch.lens))
            return batch
        eng.scheduler.schedule = logged
        outs = eng.generate(prompts, params)
        batches.append(steps)
        texts.append([o.outputs[0].token_ids for o in outs])
        assert eng.stats.preemptions == 0
        check_engine_idle(eng)
        eng.close()
    assert texts[0] == texts[1]
    assert batches[0] == batches[1]

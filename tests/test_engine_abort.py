"""An abandoned stream (consumer stops early, or an error) leaves the engine clean for the next one."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402


def test_abandoned_stream_frees_everything_and_next_stream_is_clean(tiny_checkpoint):
    from batchgen import SamplingParams

    path = tiny_checkpoint("llama")
    with R.single_thread():
        engine = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=2048, prefix_caching=False)
        prompts = [[5 + i] * 20 for i in range(10)]
        stream = engine.stream(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True))
        next(stream)
        stream.close()  # the consumer walks away with requests still running and waiting
        assert not engine.scheduler.has_work()
        assert engine.blocks.num_free == engine.blocks.usable_blocks
        assert sorted(engine.scheduler.free_slots) == list(range(4))
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        again = engine.generate(prompts[:3], params)
        fresh = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=2048, prefix_caching=False).generate(prompts[:3], params)
        assert [o.request_id for o in again] == [0, 1, 2]
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in fresh]


def test_abort_drops_pushed_requests_and_leaves_the_engine_clean(tiny_checkpoint):
    """Push API: abort() drops every request added with add() that has not come back from step(),
    running or waiting, frees their blocks and slots at once; the engine then serves new work as a
    fresh one does."""
    from batchgen import GenerationRequest, SamplingParams

    path = tiny_checkpoint("llama")
    with R.single_thread():
        engine = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=2048, prefix_caching=False)
        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        engine.add(GenerationRequest([5 + i] * 20, params, request_id=("row", i)) for i in range(10))
        got = []
        while not got:
            got = engine.step()
        assert engine.has_unfinished()
        assert engine.abort() == 10 - len(got)
        assert not engine.has_unfinished() and engine.step() == []
        assert not engine.scheduler.has_work()
        assert engine.blocks.num_free == engine.blocks.usable_blocks
        assert sorted(engine.scheduler.free_slots) == list(range(4))
        short = SamplingParams(max_new_tokens=5, ignore_eos=True)
        again = engine.generate([[7] * 20, [8] * 9], short)
        fresh = R.make_engine(path, max_num_seqs=4, kv_cache_tokens=2048, prefix_caching=False)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in fresh.generate([[7] * 20, [8] * 9], short)]

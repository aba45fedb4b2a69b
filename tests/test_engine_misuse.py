"""Misuse of the engine API gets one clear error naming the field and the value (issue 10).

SamplingParams and check_engine_args are checked directly; the Engine-level tests (bad constructor
arguments through Engine(...), generate() / stream() inputs, use after close()) run on the tiny
llama checkpoint, one engine for the module.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

from batchgen import GenerationRequest, SamplingParams  # noqa: E402
from batchgen.engine.validation import (  # noqa: E402
    EngineArgumentError, EngineClosedError, check_engine_args, check_prompts, check_request)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def path(request, tmp_path_factory):
    return R.checkpoint_getter(request, tmp_path_factory)("llama")


@pytest.fixture(scope="module")
def engine(path):
    eng = R.make_engine(path, max_num_seqs=4, max_batch_tokens=256, kv_cache_tokens=1024)
    yield eng
    eng.close()


def _raises(fn, *words: str, type_error: bool = False):
    """fn() raises an EngineArgumentError whose message holds every word (field name, value)."""
    with pytest.raises(EngineArgumentError) as e:
        fn()
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert isinstance(e.value, ValueError) and isinstance(e.value, TypeError) == type_error, type(e.value)
    return e.value


# ------------------------------------------------------------------ SamplingParams
BAD_SAMPLING = [  # (field, value, wrong type)
    ("max_new_tokens", 0, False), ("max_new_tokens", 2.5, True), ("max_new_tokens", "8", True),
    ("max_new_tokens", True, True),
    ("temperature", math.nan, False), ("temperature", math.inf, False), ("temperature", -0.5, False),
    ("temperature", "0.7", True), ("temperature", None, True), ("temperature", 1e39, False),
    ("top_k", 2**70, False), ("top_k", 2**31, False), ("top_k", 1.5, True),
    ("top_p", math.nan, False), ("top_p", 0.0, False), ("top_p", 1.5, False), ("top_p", math.inf, False),
    ("min_p", math.nan, False), ("min_p", -0.1, False), ("min_p", 2.0, False),
    ("repetition_penalty", math.nan, False), ("repetition_penalty", math.inf, False),
    ("repetition_penalty", 0.0, False), ("repetition_penalty", 1e-300, False),  # 0 in float32
    ("seed", 1.5, True), ("seed", True, True), ("seed", "7", True),
    ("n", 1.5, True), ("n", 0, False), ("n", 10**6, False),
    ("stop", 5, True), ("stop", [""], False), ("stop", ["ok", 3], True), ("stop", {"x"}, True),
    ("stop_token_ids", [-1], False), ("stop_token_ids", [1.0], True), ("stop_token_ids", 2, True),
    ("stop_token_ids", [2**40], False),
    ("ignore_eos", 1, True), ("logprobs", "yes", True), ("skip_special_tokens", None, True),
]


@pytest.mark.parametrize("field,value,wrong_type", BAD_SAMPLING)
def test_bad_sampling_value(field, value, wrong_type):
    err = _raises(lambda: SamplingParams(**{field: value}), "SamplingParams.", field, type_error=wrong_type)
    shown = repr(value)
    if isinstance(value, list):  # the message names the bad element
        shown = next(repr(v) for v in value if not isinstance(v, str) or not v or isinstance(v, int))
    assert shown in str(err), str(err)


def test_sampling_message_style():
    with pytest.raises(ValueError, match=re.escape("SamplingParams.temperature must be a finite number >= 0, got nan")):
        SamplingParams(temperature=float("nan"))


def test_min_new_tokens_bounded_by_max():
    _raises(lambda: SamplingParams(max_new_tokens=4, min_new_tokens=5), "min_new_tokens", "max_new_tokens=4", "5")
    _raises(lambda: SamplingParams(min_new_tokens=-1), "min_new_tokens", "-1")
    _raises(lambda: SamplingParams(min_new_tokens=1.0), "min_new_tokens", type_error=True)


def test_sampling_values_normalised():
    p = SamplingParams(max_new_tokens=np.int64(5), temperature=1, top_p=np.float32(0.5), top_k=0,
                       seed=np.int64(3), stop="##", stop_token_ids=(np.int32(7),), n=np.int16(2))
    assert type(p.temperature) is float and p.temperature == 1.0 and type(p.top_p) is float
    assert type(p.max_new_tokens) is int and type(p.seed) is int and type(p.n) is int
    assert p.top_k == -1 and p.stop == ["##"] and p.stop_token_ids == [7] and type(p.stop_token_ids[0]) is int
    assert SamplingParams(top_k=-2**70).top_k == -1  # off, and no huge negative reaches a tensor
    assert SamplingParams(seed=2**80).seed == 2**80  # any int: hashed with a 64-bit mask
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


# ------------------------------------------------------------------ Engine arguments
BAD_ENGINE = [  # (argument, value, words in the message besides the name, wrong type)
    ("max_num_seqs", 0, ["0"], False), ("max_num_seqs", 2.0, ["2.0"], True),
    ("max_batch_tokens", 0, ["0"], False), ("max_batch_tokens", "8192", ["'8192'"], True),
    ("kv_cache_tokens", 1, ["smaller than one block of 16 tokens"], False),
    ("kv_cache_tokens", 0, ["0"], False), ("kv_cache_tokens", 1e6, ["1000000.0"], True),
    ("block_size", 0, ["power of two", "0"], False), ("block_size", 24, ["power of two", "24"], False),
    ("block_size", 16.0, ["16.0"], True),
    ("prefix_caching", "yes", ["'yes'"], True), ("cuda_graphs", 1, ["1"], True),
    ("gpu_memory_fraction", 0.0, ["0.0"], False), ("gpu_memory_fraction", 1.5, ["1.5"], False),
    ("gpu_memory_fraction", math.nan, ["nan"], False), ("gpu_memory_fraction", "0.9", ["'0.9'"], True),
    ("overlap", "on", ["'on'"], False), ("overlap", 1, ["1"], True),
    ("attention", "fast", ["'fast'", "'triton'"], False), ("attention", None, ["None"], True),
    ("max_model_len", 0, ["0"], False), ("max_model_len", 2.5, ["2.5"], True),
    ("seed", 0.5, ["0.5"], True), ("seed", None, ["None"], True),
    ("threads", 0, ["0"], False), ("threads", 1.0, ["1.0"], True),
    ("device", "gpu0", ["'gpu0'"], False), ("device", 3, ["3"], True),
    ("dtype", "float8", ["'float8'", "bfloat16"], False), ("dtype", torch.int32, ["torch.int32"], False),
]


@pytest.mark.parametrize("arg,value,words,wrong_type", BAD_ENGINE)
def test_bad_engine_arg(arg, value, words, wrong_type):
    _raises(lambda: check_engine_args(**{arg: value}), f"Engine: {arg}", *words, type_error=wrong_type)


def test_engine_arg_message_style():
    with pytest.raises(ValueError, match=re.escape("Engine: max_num_seqs must be an integer >= 1, got 0")):
        check_engine_args(max_num_seqs=0)


def test_kv_cache_tokens_against_block_size():
    _raises(lambda: check_engine_args(kv_cache_tokens=31, block_size=32), "kv_cache_tokens=31", "block of 32 tokens")
    check_engine_args(kv_cache_tokens=32, block_size=32)


def test_good_engine_args_pass():
    for kw in (dict(), dict(device="cpu", dtype="float32", cuda_graphs=False), dict(overlap=True),
               dict(overlap=False, threads=2, seed=np.int64(3), max_model_len=128), dict(dtype=torch.bfloat16),
               dict(device=torch.device("cpu"), attention="torch", block_size=1, gpu_memory_fraction=1)):
        check_engine_args(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_device_without_cuda():
    _raises(lambda: check_engine_args(device="cuda"), "'cuda'", "CUDA")


@pytest.mark.parametrize("arg,value,words,wrong_type", [c for c in BAD_ENGINE if c[0] != "device"])
def test_engine_constructor_rejects(path, arg, value, words, wrong_type):
    """Needs the lead's wiring: Engine.__init__ calls check_engine_args first."""
    _raises(lambda: R.make_engine(path, **{arg: value}), f"Engine: {arg}", *words, type_error=wrong_type)


# ------------------------------------------------------------------ generate / stream inputs
def test_generate_one_string(engine):
    err = _raises(lambda: engine.generate("Hello there"), "generate() takes a list of prompts; got one str",
                  "[prompt]", type_error=True)
    assert isinstance(err, TypeError)
    _raises(lambda: engine.generate(b"Hello"), "got one bytes", type_error=True)


def test_generate_params_length(engine):
    _raises(lambda: engine.generate([[5, 6], [7, 8], [9]], [SamplingParams(max_new_tokens=2)] * 2),
            "3 prompts", "2 sampling params")


@pytest.mark.parametrize("bad,words", [({"prompt": "x"}, ["prompt 1", "dict"]), (None, ["prompt 1", "NoneType"]),
                                       ([5, 6.5], ["prompt 1", "token 1", "6.5"]), (7, ["prompt 1", "int"])])
def test_generate_bad_prompt_item(engine, bad, words):
    _raises(lambda: engine.generate([[5, 6], bad], SamplingParams(max_new_tokens=2)), "generate()", *words,
            type_error=True)


def test_generate_bad_params_type(engine):
    _raises(lambda: engine.generate([[5, 6]], {"max_new_tokens": 2}), "params", "dict", type_error=True)
    _raises(lambda: engine.generate([[5, 6]], [None]), "params[0]", type_error=True)


def test_stream_bad_item_names_position(engine):
    items = [[5, 6, 7], GenerationRequest([8, 9], SamplingParams(max_new_tokens=2)), {"prompt": "x"}]
    _raises(lambda: list(engine.stream(items, SamplingParams(max_new_tokens=2))), "prompt 2", "dict",
            type_error=True)


def test_check_prompts_accepts_the_supported_kinds():
    sp = SamplingParams(max_new_tokens=2)
    check_prompts(["text", [1, 2], (np.int64(3), 4), np.array([5, 6]), GenerationRequest([7], sp), []], None)
    check_prompts([[1], [2]], [sp, sp])
    check_request(GenerationRequest("hi", sp), 0)
    _raises(lambda: check_request(GenerationRequest([1], {"n": 2}), 4), "prompt 4", "params", type_error=True)


def test_add_bad_item_names_add(engine):
    _raises(lambda: engine.add([[5, 6], None]), "add(): prompt", "NoneType", type_error=True)
    _raises(lambda: engine.add("one prompt"), "add()", "wrap it in a list", type_error=True)
    assert not engine.has_unfinished(), "add() kept part of a call it refused"


def test_stop_token_id_outside_vocab_fails_its_request_only(engine):
    """With min_new_tokens the sampler indexes logits with the stop ids: an id past the vocabulary crashed the
    whole generate (index out of bounds). Now it is that request's error."""
    vocab = engine.model.cfg.vocab_size
    bad = SamplingParams(max_new_tokens=4, min_new_tokens=2, stop_token_ids=[vocab + 10])
    good = SamplingParams(max_new_tokens=4, ignore_eos=True)
    out_bad, out_good = engine.generate([[5, 6, 7], [5, 6, 7]], [bad, good])
    assert "stop_token_ids" in out_bad.error and "vocabulary" in out_bad.error
    assert out_good.error is None and len(out_good.outputs[0].token_ids) == 4


# ------------------------------------------------------------------ after close()
def test_use_after_close(path):
    """Needs the lead's wiring: every entry point raises EngineClosedError after close()."""
    eng = R.make_engine(path, max_num_seqs=2, max_batch_tokens=64, kv_cache_tokens=256)
    eng.close()
    calls = {"generate": lambda: eng.generate([[5, 6]]), "stream": lambda: list(eng.stream([[5, 6]])),
             "add": lambda: eng.add([[5, 6]]), "step": lambda: eng.step()}
    for name, call in calls.items():
        with pytest.raises(EngineClosedError, match=re.escape("this Engine was closed; create a new one")):
            call()


def _fake_flash_attn(monkeypatch):
    """A flash_attn 2 stand-in (only what the backend probes for): the real package is CUDA-only."""
    import importlib.machinery
    import types

    mod = types.ModuleType("flash_attn")
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    mod.flash_attn_with_kvcache = mod.flash_attn_varlen_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # no FA3


def test_flash_block_size_checked_when_asked_for(monkeypatch):
    """attention='flash' checks the block size against FA2's paged layout (multiples of 256); auto never picks it."""
    from batchgen.engine.attention import get_backend
    from batchgen.engine.validation import EngineArgumentError

    _fake_flash_attn(monkeypatch)
    with pytest.raises(EngineArgumentError, match=r"block_size % 256 == 0 \(got 16\)"):
        get_backend("flash", torch.device("cpu"), 16)
    assert get_backend("flash", torch.device("cpu"), 256).name == "flash"
    assert get_backend("auto", torch.device("cpu"), 256).name == "torch"

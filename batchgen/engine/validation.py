"""Argument checks for the engine's public API (SamplingParams, Engine, generate / stream).

Each bad value gets one error naming the field and the value, raised where it is given, instead of
NaN completions, an OverflowError in a step or a misleading "not enough memory" later. All errors
are EngineArgumentError (a ValueError); wrong types are EngineArgumentTypeError, also a TypeError.
torch and the attention package are imported lazily: request.py (torch-free) imports this module.
"""
from __future__ import annotations

import json
import math
import numbers
import sys
from typing import Any, Callable, NoReturn

INT32_MAX = 2**31 - 1  # top_k and token ids go through int32 / int64 device tensors
F32_TINY = 1.1754943508222875e-38  # smallest normal float32
F32_MAX = 3.4028234663852886e38  # sampling floats live in float32 on the device: larger ones become inf
MAX_TOP_LOGPROBS = 64  # per position: each one is downloaded every step
MAX_N = 4096  # samples per request: each one is a full sequence, so more is surely a mistake
BACKENDS = ("auto", "torch", "triton", "flash")  # attention backends get_backend knows (auto: Triton on CUDA)
DTYPES = ("auto", "float32", "float16", "bfloat16")  # the model weights' types loader.py builds
QUANTIZATIONS = ("fp8",)  # Engine(quantization=...) besides None: weights quantized at load (engine/quant)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "fp8")  # Engine(kv_cache_dtype=...); auto: the model's dtype
CLOSED_MESSAGE = "this Engine was closed; create a new one"
_PROMPT_KINDS = "a str, a list of token ids or a GenerationRequest"

__all__ = ["EngineArgumentError", "EngineArgumentTypeError", "EngineClosedError", "check_sampling_params",
           "check_engine_args", "check_prompts", "check_request", "INT32_MAX", "F32_MAX", "MAX_N"]


class EngineArgumentError(ValueError):
    """A bad argument to SamplingParams, Engine, generate() or stream(); `except ValueError` catches it."""


class EngineArgumentTypeError(EngineArgumentError, TypeError):
    """A bad argument of the wrong type: both a ValueError (like every argument error) and a TypeError."""


class EngineClosedError(RuntimeError):
    """generate / stream / add / step on an Engine after close()."""

    def __init__(self, message: str = CLOSED_MESSAGE) -> None:
        super().__init__(message)


# ------------------------------------------------------------------ value helpers
def _show(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _fail(name: str, want: str, v: object, wrong_type: bool) -> NoReturn:
    cls = EngineArgumentTypeError if wrong_type else EngineArgumentError
    raise cls(f"{name} must be {want}, got {_show(v)}")


def _is_int(v: object) -> bool:  # numpy integers count; bool does not (True is no token id or count)
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(name: str, v: object, lo: int | None = None, hi: int | None = None, want: str | None = None) -> int:
    """v as a Python int in [lo, hi] (either bound optional)."""
    if want is None:
        want = ("an integer" if lo is None and hi is None else f"an integer >= {lo}" if hi is None
                else f"an integer <= {hi}" if lo is None else f"an integer in [{lo}, {hi}]")
    if not _is_int(v):
        _fail(name, want, v, True)
    i = int(v)  # type: ignore[call-overload]
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        _fail(name, want, v, False)
    return i


def _opt_int(name: str, v: object, lo: int, want: str | None = None) -> int | None:
    return None if v is None else _int(name, v, lo, want=want or f"None or an integer >= {lo}")


def _real(name: str, v: object, want: str, ok: Callable[[float], bool]) -> float:
    """v as a float passing ok that is finite in float32 (NaN, inf and beyond F32_MAX never are)."""
    if not _is_real(v):
        _fail(name, want, v, True)
    f = float(v)  # type: ignore[arg-type]
    if not (math.isfinite(f) and abs(f) <= F32_MAX and ok(f)):
        _fail(name, want, v, False)
    return f


def _bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):  # 0/1 or "false" are more likely a slip than a choice
        _fail(name, "True or False", v, True)
    return v


# ------------------------------------------------------------------ SamplingParams
def check_sampling_params(p: Any) -> None:
    """Check every field of a SamplingParams and normalise it in place (ints to int, reals to float,
    stop to a list of str, top_k <= 0 to -1)."""
    f = "SamplingParams."
    p.max_new_tokens = _int(f + "max_new_tokens", p.max_new_tokens, 1)
    p.min_new_tokens = _int(f + "min_new_tokens", p.min_new_tokens, 0, p.max_new_tokens,
                            want=f"an integer in [0, max_new_tokens={p.max_new_tokens}]")
    p.temperature = _real(f + "temperature", p.temperature, "a finite number >= 0", lambda x: x >= 0)
    top_k = _int(f + "top_k", p.top_k, hi=INT32_MAX, want=f"an integer <= {INT32_MAX} (<= 0 turns top-k off)")
    p.top_k = top_k if top_k > 0 else -1  # any "off" value is stored as -1, so no huge negative reaches a tensor
    p.top_p = _real(f + "top_p", p.top_p, "a finite number in (0, 1]", lambda x: 0 < x <= 1)
    p.min_p = _real(f + "min_p", p.min_p, "a finite number in [0, 1]", lambda x: 0 <= x <= 1)
    # the penalty divides logits in float32: one that rounds to 0 there would divide by zero
    p.repetition_penalty = _real(f + "repetition_penalty", p.repetition_penalty,
                                 f"a finite number >= {F32_TINY:.3g}", lambda x: x >= F32_TINY)
    if p.seed is not None:  # any int: the engine hashes it with a 64-bit mask
        p.seed = _int(f + "seed", p.seed, want="None or an integer")
    p.n = _int(f + "n", p.n, 1, MAX_N)
    p.top_logprobs = _int(f + "top_logprobs", p.top_logprobs, 0, MAX_TOP_LOGPROBS)
    p.stop = _stop_strings(f + "stop", p.stop)
    p.stop_token_ids = _token_ids(f + "stop_token_ids", p.stop_token_ids)
    for name in ("ignore_eos", "logprobs", "skip_special_tokens", "json_object"):
        setattr(p, name, _bool(f + name, getattr(p, name)))
    _check_constraint(p)


CONSTRAINTS = ("json_schema", "regex", "choice", "grammar", "json_object")


def _check_constraint(p: Any) -> None:
    """At most one constraint, each of the right shape (whether it compiles is checked by the grammar engine)."""
    f = "SamplingParams."
    given = [c for c in CONSTRAINTS if getattr(p, c) not in (None, False)]
    if len(given) > 1:
        raise EngineArgumentError(f"SamplingParams: give at most one of {', '.join(CONSTRAINTS)}; got {', '.join(given)}")
    if p.json_schema is not None:
        schema = p.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise EngineArgumentError(f"{f}json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            _fail(f + "json_schema", "a JSON schema object (a dict or its JSON text)", p.json_schema, True)
    for name in ("regex", "grammar", "reasoning_end"):
        v = getattr(p, name)
        if v is not None and (not isinstance(v, str) or not v):
            _fail(f + name, "a non-empty str", v, not isinstance(v, str))
    if p.choice is not None:
        if not isinstance(p.choice, (list, tuple)) or not p.choice:
            _fail(f + "choice", "a non-empty list of non-empty str", p.choice, not isinstance(p.choice, (list, tuple)))
        for i, c in enumerate(p.choice):
            if not isinstance(c, str) or not c:
                _fail(f"{f}choice[{i}]", "a non-empty str", c, not isinstance(c, str))
        p.choice = list(p.choice)


def _stop_strings(name: str, v: object) -> list[str]:
    want = "a str or a list of non-empty str"
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        _fail(name, want, v, True)
    for i, s in enumerate(v):
        if not isinstance(s, str):
            _fail(f"{name}[{i}]", "a non-empty str", s, True)
        if not s:  # "" is in every text: the request would stop at once
            _fail(f"{name}[{i}]", "a non-empty str", s, False)
    return list(v)


def _token_ids(name: str, v: object) -> list[int]:
    if not isinstance(v, (list, tuple)):
        _fail(name, "a list of token ids (integers >= 0)", v, True)
    return [_int(f"{name}[{i}]", t, 0, INT32_MAX) for i, t in enumerate(v)]


# ------------------------------------------------------------------ Engine
def check_engine_args(*, device: Any = "auto", dtype: Any = "auto", max_num_seqs: Any = 256,
                      max_batch_tokens: Any = 8192, kv_cache_tokens: Any = None, block_size: Any = 16,
                      prefix_caching: Any = True, gpu_memory_fraction: Any = 0.9, overlap: Any = "auto",
                      cuda_graphs: Any = True, attention: Any = "auto", max_model_len: Any = None,
                      seed: Any = 0, threads: Any = None, quantization: Any = None,
                      kv_cache_dtype: Any = "auto", tensor_parallel: Any = 1, quantize_lm_head: Any = False) -> None:
    """Check the Engine constructor's arguments (defaults: the Engine's, so tests can pass one)."""
    e = "Engine: "
    _check_device(device)
    _check_dtype(dtype)
    _int(e + "max_num_seqs", max_num_seqs, 1)
    _int(e + "max_batch_tokens", max_batch_tokens, 1)
    _check_block_size(block_size)
    _check_kv_cache_tokens(kv_cache_tokens, int(block_size))
    _bool(e + "prefix_caching", prefix_caching)
    _bool(e + "cuda_graphs", cuda_graphs)
    _real(e + "gpu_memory_fraction", gpu_memory_fraction, "a finite number in (0, 1]", lambda x: 0 < x <= 1)
    if not (isinstance(overlap, bool) or overlap == "auto"):
        _fail(e + "overlap", "'auto', True or False", overlap, not isinstance(overlap, str))
    _check_attention(attention)
    _opt_int(e + "max_model_len", max_model_len, 1)
    _int(e + "seed", seed)
    _opt_int(e + "threads", threads, 1)
    _check_quantization(quantization)
    check_quantize_lm_head(quantize_lm_head, quantization)
    _check_kv_cache_dtype(kv_cache_dtype)
    _int(e + "tensor_parallel", tensor_parallel, 1)


def _check_device(device: object) -> None:
    want = "'auto', a device name like 'cpu' or 'cuda:0', or a torch.device"
    if device in ("auto", "cpu"):  # no torch import for the common cases
        return
    import torch

    if not isinstance(device, (str, torch.device)):
        _fail("Engine: device", want, device, True)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        _fail("Engine: device", want, device, False)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineArgumentError(f"Engine: device {_show(device)} needs CUDA, which is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EngineArgumentError(f"Engine: device {_show(device)} does not exist "
                                  f"({torch.cuda.device_count()} CUDA device(s) here)")


def _check_dtype(dtype: object) -> None:
    if isinstance(dtype, str) and dtype in DTYPES:  # no torch import for the common case
        return
    import torch

    ok = {getattr(torch, d) for d in DTYPES[1:]}
    if (isinstance(dtype, torch.dtype) and dtype in ok) or (isinstance(dtype, str) and dtype in DTYPES):
        return
    _fail("Engine: dtype", f"one of {', '.join(DTYPES)} (or that torch.dtype)", dtype,
          not isinstance(dtype, (str, torch.dtype)))


def _check_block_size(block_size: object) -> None:
    # The paged-attention kernels take any size in principle, but are tuned and tested on powers of two
    # (16..64); FA2 needs a multiple of 256, which get_backend reports itself.
    bs = _int("Engine: block_size", block_size, 1, want="a power of two >= 1 (16 is the default)")
    if bs & (bs - 1):
        _fail("Engine: block_size", "a power of two >= 1 (16 is the default)", block_size, False)


def _check_kv_cache_tokens(tokens: object, block_size: int) -> None:
    n = _opt_int("Engine: kv_cache_tokens", tokens, 1, want=f"None or an integer >= block_size ({block_size})")
    if n is not None and n < block_size:
        raise EngineArgumentError(f"Engine: kv_cache_tokens={n} is smaller than one block of {block_size} "
                                  f"tokens; give at least {block_size} (or None to size the cache from memory)")


def _check_attention(attention: object) -> None:
    if not (isinstance(attention, str) and attention in BACKENDS):
        _fail("Engine: attention", f"one of {', '.join(map(repr, BACKENDS))}", attention,
              not isinstance(attention, str))


def _check_quantization(quantization: object) -> None:
    if quantization is not None and not (isinstance(quantization, str) and quantization in QUANTIZATIONS):
        _fail("Engine: quantization", "None or " + " or ".join(map(repr, QUANTIZATIONS)), quantization,
              not isinstance(quantization, str))


def check_quantize_lm_head(quantize_lm_head: object, quantization: object) -> None:
    """A bool, and True only with a quantization (it names the format lm_head takes too)."""
    _bool("Engine: quantize_lm_head", quantize_lm_head)
    if quantize_lm_head and quantization is None:
        raise EngineArgumentError("Engine: quantize_lm_head must stay off unless quantization is 'fp8' (lm_head "
                                  "is quantized the way the projections are)")


def _check_kv_cache_dtype(kv_cache_dtype: object) -> None:
    if not (isinstance(kv_cache_dtype, str) and kv_cache_dtype in KV_CACHE_DTYPES):
        _fail("Engine: kv_cache_dtype", f"one of {', '.join(map(repr, KV_CACHE_DTYPES))}", kv_cache_dtype,
              not isinstance(kv_cache_dtype, str))


# ------------------------------------------------------------------ prompts
def check_prompts(prompts: object, params: object = None) -> None:
    """generate(prompts, params): a list of prompts, and params None, one SamplingParams or a list
    of one per prompt. A str (or bytes) in place of the list is the usual slip: it would run one
    request per character."""
    from .request import SamplingParams

    if isinstance(prompts, (str, bytes)):
        raise EngineArgumentTypeError(f"generate() takes a list of prompts; got one {type(prompts).__name__} "
                                      "(wrap it in a list: [prompt])")
    if not isinstance(prompts, (list, tuple)):
        raise EngineArgumentTypeError(f"generate() takes a list of prompts; got {type(prompts).__name__}")
    for i, item in enumerate(prompts):
        check_request(item, i, "generate()")
    if params is None or isinstance(params, SamplingParams):
        return
    if not isinstance(params, list):
        raise EngineArgumentTypeError("generate(): params must be None, a SamplingParams or a list of them "
                                      f"(one per prompt), got {type(params).__name__}")
    if len(params) != len(prompts):
        raise EngineArgumentError(f"generate(): {len(prompts)} prompts but {len(params)} sampling params "
                                  "(give one SamplingParams for all, or a list of one per prompt)")
    for i, sp in enumerate(params):
        if not isinstance(sp, SamplingParams):
            raise EngineArgumentTypeError(f"generate(): params[{i}] must be a SamplingParams, "
                                          f"got {type(sp).__name__}")


def _is_int_array(v: object) -> bool:
    np = sys.modules.get("numpy")  # not imported: v can't be an array, and the import is not paid here
    return np is not None and isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu"


def check_request(item: object, position: int, caller: str = "stream()") -> None:
    """One prompt: a str, a list/tuple (or 1-D numpy array) of int token ids, or a GenerationRequest
    holding one of those and a SamplingParams. A wrong type is a programming error and raises; an
    empty prompt or ids outside the vocabulary stay per-request error outputs (the engine knows the
    vocabulary)."""
    from .request import GenerationRequest, SamplingParams

    where = f"{caller}: prompt {position}"
    if isinstance(item, GenerationRequest):
        if not isinstance(item.params, SamplingParams):
            raise EngineArgumentTypeError(f"{where}: GenerationRequest.params must be a SamplingParams, "
                                          f"got {type(item.params).__name__}")
        item = item.prompt
    if isinstance(item, str) or _is_int_array(item):
        return
    if not isinstance(item, (list, tuple)):
        raise EngineArgumentTypeError(f"{where} must be {_PROMPT_KINDS}, got {type(item).__name__}")
    if all(type(t) is int for t in item):  # the common case, without a per-token isinstance
        return
    for j, t in enumerate(item):
        if not _is_int(t):
            raise EngineArgumentTypeError(f"{where}: token {j} must be an integer id, got {_show(t)}")


def grammar_error_line(error: str) -> str:
    """llguidance's multi-line error as one line: its first line, plus the 'error: ...' detail where it has one."""
    lines = [ln.strip() for ln in error.strip().splitlines() if ln.strip()]
    if not lines:
        return error
    detail = next((ln for ln in lines[1:] if ln.startswith("error:")), None)
    return lines[0].rstrip(":") + (f" ({detail.removeprefix('error:').strip()})" if detail else "")

"""Engine: loads a model, owns the KV cache, scheduler and runner, and runs the step loop.

The loop is overlapped on CUDA: step N+1 is scheduled, staged and launched before the host
waits for step N's sampled tokens, so the GPU never idles on the host. On the CPU (or with
overlap=False) each step's results are processed right after it runs; overlap=True runs the
overlapped ordering on the CPU too (the tests use it to check it against the synchronous loop).

Requests come in through add() (push), stream() (pulled lazily) or generate() (a list); each call
owns its requests, so outputs always go back to the call that added them.
"""
from __future__ import annotations

import functools
import gc
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from . import kv_fp8
from .attention import get_backend
from .constraints import ConstraintError, Grammars, constraint_of
from .kv_cache import BlockManager
from .loader import load_model
from .models.rope import trim_rope_tables
from .parallel.ranks import stops_ranks_on_error
from .request import GenerationRequest, RequestOutput, SamplingParams
from .runner import ModelRunner, StepHandle
from .scheduler import Scheduler
from .sequence import RequestGroup, Sequence, Status
from .stats import Counters, EngineStats
from .validation import (EngineArgumentError, EngineArgumentTypeError, EngineClosedError, check_engine_args,
                         check_prompts, check_request)

_MASK63 = (1 << 63) - 1
log = logging.getLogger("batchgen.engine")


def _mix(*parts: int) -> int:
    """splitmix64 over the parts: a well-spread 63-bit stream key."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & _MASK63


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine:
    @stops_ranks_on_error
    def __init__(self, model_dir: str | Path | None, device: str = "auto", dtype: str | torch.dtype = "auto",
                 max_num_seqs: int = 256, max_batch_tokens: int = 8192, kv_cache_tokens: int | None = None,
                 block_size: int = 16, prefix_caching: bool = True, gpu_memory_fraction: float = 0.9,
                 overlap: bool | str = "auto", cuda_graphs: bool = True, attention: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, threads: int | None = None,
                 quantization: str | None = None, kv_cache_dtype: str = "auto", model: Any = None,
                 tensor_parallel: int = 1, quantize_lm_head: bool = False) -> None:
        spec = {k: v for k, v in locals().items() if k not in ("self", "model_dir", "model")}  # for the ranks
        check_engine_args(device=device, dtype=dtype, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                          kv_cache_tokens=kv_cache_tokens, block_size=block_size, prefix_caching=prefix_caching,
                          gpu_memory_fraction=gpu_memory_fraction, overlap=overlap, cuda_graphs=cuda_graphs,
                          attention=attention, max_model_len=max_model_len, seed=seed, threads=threads,
                          quantization=quantization, kv_cache_dtype=kv_cache_dtype, tensor_parallel=tensor_parallel,
                          quantize_lm_head=quantize_lm_head)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = _pick_device(device)
        self._tp = None  # parallel.ranks.Ranks with tensor_parallel > 1: rank 0 forwards its calls to the others
        if tensor_parallel > 1:
            from .parallel.setup import start_ranks

            self._tp, spec["threads"] = start_ranks(self.model_dir, self.device, model, spec)
            self._tp.on_failure = self.close  # a rank failed: this engine is closed
            threads, self.device = spec["threads"], self._tp.local_device(self.device)
        self.backend = get_backend(attention, self.device, block_size)  # before the model loads: fails fast
        self.kv_cache_dtype = kv_cache_dtype  # "auto" | "bfloat16" | "float16" | "fp8" (kv_fp8.py)
        if kv_cache_dtype != "auto":
            self._check_kv_dtype(kv_fp8.cache_dtype(kv_cache_dtype, torch.float32), None)
        self.threads = None
        if self.device.type == "cpu":
            from .threads import apply_cpu_threads

            self.threads = apply_cpu_threads(threads)
        self.quantization = quantization  # None | "fp8": weights quantized at load (engine/quant)
        self.quantize_lm_head = quantize_lm_head  # with "fp8": lm_head in e4m3 too (else the model dtype)
        self.precision = ""  # how the quantized weights run here, for describe() ("" unquantized)
        self.model, raw_config = self._load_model(model, dtype)
        problem = self.backend.softcap_problem(getattr(self.model, "attn_softcap", 0.0))  # Gemma 2
        if problem is not None:
            raise EngineArgumentError(f"Engine: {problem}")
        self.dtype = next(self.model.parameters()).dtype
        self.kv_dtype, self.kv_scales = self._kv_setup()
        self._load_tokenizer()
        self.eos_token_ids = self._eos_ids(raw_config)
        self.max_model_len = self._fit_model_len(max_model_len)
        self.block_size, self.seed = block_size, seed
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self._build_runtime(self._num_blocks(kv_cache_tokens, gpu_memory_fraction), prefix_caching)
        # "auto": overlapped on CUDA, where the host has a step in flight to hide behind; synchronous on the CPU
        self.overlap = self.device.type == "cuda" if overlap == "auto" else bool(overlap)
        # decode graphs need an attention backend whose launches depend only on host bounds
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and self.backend.graph_capturable
        self.graph_capture_s = self.runner.capture_graphs(max_num_seqs) if self.cuda_graphs else 0.0
        if self._tp is not None:
            self._tp.ready()  # every rank built its engine (or one clear error)
        log.info("engine: %s", self.describe())
        self._init_loop_state()
        # What exists now (torch, transformers, the model, graphs: ~400k tracked objects) lives as long as
        # the engine. Frozen, the cyclic GC stops walking it: a full collection in the middle of a run
        # otherwise stalls the host for 0.1-0.4 s, and the GPU with it. close() unfreezes.
        gc.collect()
        gc.freeze()

    def _fit_model_len(self, asked: int | None) -> int:
        """The longest sequence (prompt + new tokens) this engine runs: the model's limit or less when asked; the rope
        tables keep only the rows such sequences reach."""
        limit = self.model.cfg.max_position_embeddings
        length = min(limit, asked or limit)
        trim_rope_tables(self.model, length)
        return length

    def describe(self) -> str:
        """One line on what was set up: model, device, attention, KV cache, overlap, CUDA graph capture time."""
        graphs = (f", {len(self.runner.graphs.sizes)} decode CUDA graphs captured in {self.graph_capture_s:.1f} s"
                  if self.cuda_graphs else "")
        precision = f", {self.precision}" if self.precision else ""
        if self._tp is not None:
            precision += f", tensor parallel {self._tp.world} ({self._tp.group.backend})"
        kv = kv_fp8.dtype_name(self.kv_dtype) + (f", {self.kv_scales.describe()}" if self.kv_scales else "")
        moe = self.model.cfg.moe
        if moe is not None:  # which layers are sparse and what runs their experts (models/moe.py)
            from .models.moe import implementation

            precision += f", {moe.describe()} ({implementation(self.device)})"
        return (f"{self.model.cfg.model_type} {str(self.dtype).removeprefix('torch.')}{precision} on {self.device}, "
                f"attention {self.backend.name}, KV cache {self.blocks.usable_blocks * self.block_size:,} tokens "
                f"({kv}) in {self.block_size}-token blocks, overlap {'on' if self.overlap else 'off'}{graphs}")

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, **kwargs: Any) -> "Engine":
        from .model_source import resolve_model_dir

        return cls(resolve_model_dir(path_or_hub_id), **kwargs)

    # ------------------------------------------------------------------ set-up
    def _load_model(self, model: Any, dtype: str | torch.dtype) -> tuple[Any, dict]:
        """The model (loaded from model_dir unless one is given) and its raw HF config; with quantization
        "fp8" its projections quantized (engine/quant); on CUDA its other linears laid out for decode
        (input-major weights, the skinny GEMM where the switches pick it)."""
        from .quant import fp8_tensor_cores

        # an FP8 checkpoint's own weights run on FP8 tensor cores where there are some (or when fp8 is asked for)
        keep_fp8 = (self.quantization == "fp8" or fp8_tensor_cores(self.device)) and self._tp is None
        if self._tp is not None:  # this rank's share of every weight only (parallel/load.py)
            model, raw_config = self._tp.load(self.model_dir, self.device, dtype)
        elif model is None:
            model, raw_config = load_model(self.model_dir, self.device, dtype, keep_quantized=keep_fp8)
        else:  # a model built elsewhere (benchmarks: random weights of a named shape)
            raw_config = {}
        self._apply_fp8(model, keep_fp8)
        if self.device.type == "cuda":
            from .models.linear_layout import fused_decode_rows, make_input_major

            make_input_major(model, skip=("lm_head",) if model.cfg.tie_word_embeddings else ())
            model.fused_rows = fused_decode_rows(model) if self._tp is None else 0
        return model, raw_config

    def _apply_fp8(self, model: Any, keep_fp8: bool) -> None:
        """quantization "fp8": the projections become FP8 (the checkpoint's own FP8 weights where it has
        them, quantized at load otherwise); an FP8 checkpoint on FP8 hardware runs its weights as stored.
        Before the GPU layout, which then leaves the FP8 projections alone."""
        from .quant import apply_fp8
        from .quant.from_checkpoint import checkpoint_linears, covers_every_projection

        stored = checkpoint_linears(model) if keep_fp8 else {}
        if self.quantization == "fp8" or (stored and covers_every_projection(model, stored)):
            summary = apply_fp8(model, prequantized=stored, lm_head=self.quantize_lm_head)
            self.precision = summary.describe() + (" from the checkpoint's FP8 weights" if stored else "")
        elif stored:  # some projections of the checkpoint are not FP8: all of them run dequantized
            log.info("FP8 checkpoint: not every projection is FP8, so all run dequantized to %s",
                     str(model.embed_tokens.weight.dtype).removeprefix("torch."))
        if getattr(model, "fp8_checkpoint", None) is not None:
            model.fp8_checkpoint.linears.clear()  # the stored copies (host memory) are not needed any more

    def _kv_setup(self) -> tuple[torch.dtype, kv_fp8.KVScales | None]:
        """The KV cache's dtype and, for FP8, its per-layer scales (the checkpoint's, else the default)."""
        kv_dtype = kv_fp8.cache_dtype(self.kv_cache_dtype, self.dtype)
        self._check_kv_dtype(kv_dtype, self.dtype)
        if kv_dtype != kv_fp8.KV_FP8:
            return kv_dtype, None
        return kv_dtype, kv_fp8.read_kv_scales(self.model_dir, self.model.cfg.num_layers)

    def _check_kv_dtype(self, kv_dtype: torch.dtype, model_dtype: torch.dtype | None) -> None:
        problem = self.backend.kv_dtype_problem(kv_dtype, model_dtype, self.device)
        if problem is not None:
            raise EngineArgumentError(f"Engine: kv_cache_dtype {self.kv_cache_dtype!r}: {problem}")

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        d = self.model_dir
        has_tokenizer = d is not None and any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
        self.tokenizer = AutoTokenizer.from_pretrained(d) if has_tokenizer else None
        self.generation_config = None
        if d is not None and (d / "generation_config.json").exists():
            self.generation_config = GenerationConfig.from_pretrained(d)

    def _build_runtime(self, num_blocks: int, prefix_caching: bool) -> None:
        """KV cache blocks, scheduler and runner (the runner allocates the caches)."""
        self.blocks = BlockManager(num_blocks, self.block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_num_seqs, self.max_batch_tokens)
        self.runner = ModelRunner(self.model, self.backend, self.device, self.dtype, num_blocks, self.block_size,
                                  self.max_num_seqs, self.max_model_len, self.kv_dtype, self.kv_scales)

    def _init_loop_state(self) -> None:
        self._arrivals = itertools.count()
        self._live: dict[int, RequestGroup] = {}  # accepted, not yet finished: uid -> group
        self._inflight: StepHandle | None = None  # the launched step whose tokens are not processed yet
        self._push = _Owner()  # owner of the requests added with add()
        self._grammars_: Grammars | None = None  # built with the first constrained request
        self._constrained_groups = 0  # live requests with a constraint: 0 keeps the plain step path
        self.reset_stats()

    def _eos_ids(self, raw: dict) -> list[int]:
        ids = getattr(self.generation_config, "eos_token_id", None)
        if ids is None:
            ids = raw.get("eos_token_id")
        if ids is None and self.tokenizer is not None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return []
        return [ids] if isinstance(ids, int) else list(ids)

    def _num_blocks(self, kv_cache_tokens: int | None, fraction: float) -> int:
        cfg = self.model.cfg
        # the cache's own bytes: an FP8 cache holds twice the tokens of a 16-bit one in the same memory
        per_token = kv_fp8.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.kv_dtype)
        if kv_cache_tokens is not None:
            tokens = kv_cache_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # room for activations of a full step and the sampler's [seqs, vocab] temporaries
            act = self.max_batch_tokens * (6 * cfg.hidden_size + 3 * cfg.intermediate_size
                                           + 3 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) * 4
            act += self.max_num_seqs * cfg.vocab_size * 4 * 6
            budget = total * fraction - (total - free) - act
            tokens = int(budget // per_token)
            if tokens < self.block_size:
                raise EngineArgumentError(
                    f"Engine: gpu_memory_fraction: no GPU memory left for the KV cache: {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB "
                    f"are in use (model weights and anything else on this GPU) and gpu_memory_fraction={fraction}; "
                    "raise gpu_memory_fraction, free the GPU, or set kv_cache_tokens")
        else:  # CPU: what max_num_seqs full-length sequences need, at most 1 GiB (preemption covers the rest)
            tokens = min(self.max_num_seqs * self.max_model_len, (1 << 30) // per_token)
        if tokens < self.block_size:
            raise EngineArgumentError(f"Engine: kv_cache_tokens: the KV cache would hold {tokens} tokens, less than one "
                                      f"block ({self.block_size}): not enough memory for this model and settings")
        blocks = -(-tokens // self.block_size) + 1  # + the scratch block
        return blocks if self._tp is None else self._tp.agree_blocks(blocks, self.device)  # one count on every rank

    def reset_stats(self) -> None:
        self._counters = Counters()

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled so far (every sample, finished or not): cheap enough for a progress bar to poll."""
        return self._counters.generated_tokens

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters (EngineStats: steps, tokens, GPU busy fractions, preemptions, ...)."""
        return self._counters.snapshot(self.scheduler.preemptions, self.blocks.hit_tokens,
                                       self.blocks.usable_blocks * self.block_size, kv_fp8.dtype_name(self.kv_dtype),
                                       self.precision or str(self.dtype).removeprefix("torch."))

    # ------------------------------------------------------------------ requests
    def _decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special) if self.tokenizer is not None else ""

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        return self.tokenizer.encode(text)

    def _make_group(self, req: GenerationRequest | str | list[int], default: SamplingParams | None,
                    position: int | None = None, caller: str = "stream()") -> RequestGroup:
        arrival = next(self._arrivals)  # engine-wide: keeps derived seeds distinct across calls
        check_request(req, arrival if position is None else position, caller)
        if not isinstance(req, GenerationRequest):
            req = GenerationRequest(req, default or SamplingParams())
        rid = req.request_id if req.request_id is not None else (arrival if position is None else position)
        params = req.params
        group = RequestGroup(rid, [], params, uid=arrival, position=arrival if position is None else position)
        try:
            ids = self._encode(req.prompt) if isinstance(req.prompt, str) else [int(t) for t in req.prompt]
        except Exception as e:  # a bad prompt fails its own request only
            ids, error = [], f"could not tokenize prompt: {e}"
        else:
            error = self._check(ids, params)
        group.prompt_ids = ids
        spec = constraint_of(params) if error is None else None
        base = params.seed if params.seed is not None else _mix(self.seed, arrival)
        stop = frozenset(([] if params.ignore_eos else self.eos_token_ids) + list(params.stop_token_ids))
        max_tokens = min(len(ids) + params.max_new_tokens, self.max_model_len)
        for j in range(params.n):
            seq = Sequence(group, j, _mix(base, j), stop, max_tokens, list(ids))
            seq.logprobs = [] if params.logprobs else None
            seq.top_logprobs = [] if params.top_logprobs else None
            group.seqs.append(seq)
        if spec is not None:
            try:
                start = self._grammars.reasoning_end_id(params.reasoning_end) if params.reasoning_end else -1
                for seq in group.seqs:
                    seq.matcher, seq.matcher_from = self._grammars.matcher(spec), start
            except ConstraintError as e:
                error = str(e)
                for seq in group.seqs:
                    seq.matcher = None
        for seq in group.seqs:
            seq.error = error
        return group

    @property
    def _grammars(self) -> Grammars:
        if self._grammars_ is None:
            self._grammars_ = Grammars(self.tokenizer, self.model.cfg.vocab_size, self.eos_token_ids, self.device)
        return self._grammars_

    @functools.cached_property
    def _longrope_limit(self) -> int | None:
        return _longrope_prompt_limit(self.model.cfg.rope_scaling)  # the model's: judged once, not per request

    def _check(self, ids: list[int], p: SamplingParams) -> str | None:
        if not ids:
            return "empty prompt"
        vocab = self.model.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            return f"prompt holds token ids outside the vocabulary [0, {vocab})"
        if p.stop_token_ids and max(p.stop_token_ids) >= vocab:  # the sampler indexes logits with them
            return f"stop_token_ids hold ids outside the vocabulary [0, {vocab})"
        limit = self._longrope_limit
        if limit is not None and len(ids) > limit:
            return (f"prompt ({len(ids)} tokens) is longer than the model's original_max_position_embeddings "
                    f"({limit}): longrope then rotates the whole prompt with its long factors, which this engine "
                    "does not do yet (its tokens would differ from the model's own)")
        total = len(ids) + p.max_new_tokens
        if total > self.max_model_len:
            return (f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) = {total} exceeds the "
                    f"model's maximum length ({self.max_model_len})")
        cap = self.blocks.usable_blocks * self.block_size
        if -(-total // self.block_size) > self.blocks.usable_blocks:
            return f"prompt + max_new_tokens = {total} tokens does not fit the KV cache ({cap} tokens)"
        return None

    def _accept(self, req: GenerationRequest | str | list[int], default: SamplingParams | None,
                position: int | None, owner: _Owner) -> RequestGroup:
        """Make the request's group; a rejected one goes straight to its owner, a valid one to the scheduler."""
        group = self._make_group(req, default, position, "add()" if owner is self._push else "stream()")
        group.owner = owner
        if group.seqs[0].error is not None:
            self._counters.errors += 1
            owner.ready.append(group)
            return group
        self._counters.requests += 1
        self._counters.prompt_tokens += len(group.prompt_ids)
        self._live[group.uid] = group
        owner.unfinished += 1
        self._constrained_groups += group.seqs[0].matcher is not None
        if self._tp is not None:
            self._tp.accepted(group, owner, owner is self._push)
        share = self.blocks.prefix_caching and len(group.seqs) > 1
        for seq in group.seqs[:1] if share else group.seqs:  # siblings follow the first sample's prefill
            self.scheduler.add(seq)
        return group

    # ------------------------------------------------------------------ public API
    def add(self, requests: Iterable[GenerationRequest | str | list[int]],
            params: SamplingParams | None = None) -> list[Any]:
        """Push requests (an iterable of prompts or GenerationRequests); returns their request ids.
        Their outputs come back from step(), rejected ones (finish_reason "error") at the next call.
        A request of the wrong type raises before any of them is added."""
        self._check_open()
        _check_iterable(requests, "add")
        items = list(requests)
        for i, request in enumerate(items):
            check_request(request, i, "add()")
        return [self._accept(request, params, None, self._push).request_id for request in items]

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests added with add() that finished, in completion order."""
        self._check_open()
        t0 = time.perf_counter()
        if self._live or self._inflight is not None:
            self._advance()
        done, self._push.ready = list(self._push.ready), deque()
        outputs = [g.output(self._decode) for g in done]
        self._counters.wall_s += time.perf_counter() - t0
        return outputs

    def has_unfinished(self) -> bool:
        """True while a request added with add() has not yet come back from step()."""
        return bool(self._push.unfinished or self._push.ready)

    def abort(self) -> int:
        """Drop every request added with add() that has not come back from step() (a caller that stops
        without waiting for them): their blocks and slots are free at once. Returns how many were dropped."""
        n = self._push.unfinished + len(self._push.ready)
        if self.runner is not None:
            self._drop(self._push)
        return n

    def generate(self, prompts: list[str] | list[list[int]] | list[GenerationRequest],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a list of prompts to completion; outputs in input order."""
        self._check_open()
        check_prompts(prompts, params)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        reqs = (p if isinstance(p, GenerationRequest) else GenerationRequest(p, sp) for p, sp in zip(prompts, plist))
        outs: list[RequestOutput | None] = [None] * len(prompts)
        for group in self._run(reqs, None):
            outs[group.position] = group.output(self._decode)
        missing = [i for i, o in enumerate(outs) if o is None]
        if missing:  # _run yields every accepted request once: this would be an engine bug
            raise RuntimeError(f"internal error: {len(missing)} of {len(outs)} requests came back without an "
                               f"output (positions {missing[:5]}); please report it")
        return outs  # type: ignore[return-value]

    def stream(self, requests: Iterable[GenerationRequest | str | list[int]],
               params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Pull requests lazily, yield each RequestOutput as soon as all its samples finish. Several streams
        may be open at once: each gets exactly its own requests' outputs."""
        self._check_open()
        _check_iterable(requests, "stream")
        for group in self._run(requests, params):
            yield group.output(self._decode)

    def _run(self, requests: Iterable[GenerationRequest | str | list[int]],
             params: SamplingParams | None) -> Iterator[RequestGroup]:
        """Top up the engine from `requests` (at most `lookahead` waiting), step, yield this call's finished
        groups. Left early (the consumer stopped, an error), it drops what it had added."""
        owner = _Owner()
        source = enumerate(requests)
        exhausted = False
        lookahead = 2 * self.max_num_seqs
        t0 = time.perf_counter()
        try:
            while True:
                while not exhausted and len(self.scheduler.waiting) < lookahead:
                    try:
                        position, request = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    self._accept(request, params, position, owner)
                while owner.ready:
                    yield owner.ready.popleft()
                if exhausted and not owner.unfinished:
                    return
                self._advance()
        finally:
            self._counters.wall_s += time.perf_counter() - t0
            if owner.unfinished and self.runner is not None:
                self._drop(owner)

    # ------------------------------------------------------------------ the step loop
    def _advance(self) -> None:
        """One turn of the loop. Overlapped: schedule and launch step N+1, then process step N (in flight
        until now). Synchronous: launch a step and process it at once. Finished groups go to their owners."""
        knew_all = self._inflight is None  # no sampled token was still on the device while scheduling
        try:
            h0 = time.perf_counter()
            if self._tp is not None:
                self._tp.advance()  # every rank runs this same turn
            batch = self.scheduler.schedule()
            handle = None
            if batch is not None:
                step = self.runner.prepare(batch)
                self._counters.host_s += time.perf_counter() - h0
                launched = self.runner.forward(step)
                if not (self._constrained_groups and any(s.matcher is not None for s in step.sample_seqs)):
                    handle = self.runner.sample(launched)  # the common case: the whole step is enqueued now
                # else the masks need step N's tokens: the host waits for them while this forward runs
                self._counters.steps += 1
            previous, self._inflight = self._inflight, handle
            if previous is not None:
                self._deliver(self._process(previous))
            if batch is not None and handle is None:  # constrained rows: sampled once the masks are known
                handle = self._inflight = self.runner.sample(launched, self._grammars.masks(step.sample_seqs))
            if handle is not None and not self.overlap:
                self._inflight = None
                self._deliver(self._process(handle))
        except BaseException as e:  # a signal, an OOM: the step state is half-updated; end every request cleanly
            self._fail_all(f"interrupted by {type(e).__name__}" + (f": {e}" if str(e) else ""))
            if self._tp is not None:  # the ranks are out of step now: the engine closes
                err = self._tp.failure(e)
                self.close()
                if err is not None:
                    raise err from e
            raise
        if batch is None and knew_all and self._live:
            raise RuntimeError(self._stall_report())

    def _deliver(self, groups: list[RequestGroup]) -> None:
        for group in groups:
            self._forget(group)
            group.owner.ready.append(group)

    def _forget(self, group: RequestGroup) -> None:
        del self._live[group.uid]
        group.owner.unfinished -= 1
        self._constrained_groups -= group.seqs[0].matcher is not None

    def _drop(self, owner: _Owner) -> None:
        """Forget an abandoned call's unfinished requests: free their blocks and slots at once (a step still in
        flight only writes blocks and slots on the device's stream before any later step reuses them)."""
        if self._tp is not None:
            self._tp.dropped(owner, owner is self._push)
        for group in list(self._live.values()):
            if group.owner is owner:
                for seq in group.seqs:
                    if seq.status is not Status.FINISHED:
                        self.scheduler.finish(seq)
                self._forget(group)
        owner.ready.clear()

    def _fail_all(self, reason: str) -> None:
        """After an exception inside a step: wait for launched work, end every unfinished request with an error
        output to its owner, and leave the scheduler empty, so the engine stays usable and nothing is lost."""
        if self._inflight is not None and self.runner is not None:
            try:
                self.runner.collect(self._inflight)
            except BaseException:  # noqa: BLE001 - the device itself failed; nothing more to wait for
                pass
        self._inflight = None
        if self.runner is not None and self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except BaseException:  # noqa: BLE001
                pass
        for group in list(self._live.values()):
            for seq in group.seqs:
                if seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq)
                    seq.error, seq.finish_reason = reason, "error"
            self._deliver([group])
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):  # nothing should be left
            self.scheduler.finish(seq)

    def _stall_report(self) -> str:
        s, bm = self.scheduler, self.blocks
        return (f"internal error: the scheduler can make no progress with {len(self._live)} unfinished requests "
                f"({len(s.waiting)} waiting, {len(s.running)} running, {bm.num_free} of {bm.usable_blocks} KV "
                f"blocks free, {len(s.free_slots)} of {s.max_num_seqs} slots free); please report it")

    # ------------------------------------------------------------------ results
    def _process(self, handle: StepHandle) -> list[RequestGroup]:
        """Take one step's sampled tokens; returns the groups whose samples have all finished."""
        tokens, logprobs = self.runner.collect(handle)
        h0 = time.perf_counter()
        if handle.started is not None:  # GPU timeline: this step's busy time and the idle gap before it
            self._counters.add_gpu_step(handle.started, handle.done, handle.decode_only, handle.batch,
                                        handle.kv_tokens)
        done: list[RequestGroup] = []
        taken = 0
        toks = tokens.tolist()
        if self._constrained_groups:  # advance the matchers first: their state decides whether a sample ended
            self._advance_matchers(handle.seqs, toks)
        if handle.top_ids is not None:
            self._add_top_logprobs(handle)
        for seq, tok, lp in zip(handle.seqs, toks, logprobs.tolist() if logprobs is not None else itertools.repeat(None)):
            if seq.status is Status.FINISHED:
                continue  # finished a step earlier (overlap) or dropped: this token is not used
            seq.token_ids.append(tok)
            taken += 1
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                self._counters.output_tokens += seq.num_generated
                seq.group.num_finished += 1
                if seq.group.num_finished == len(seq.group.seqs):
                    done.append(seq.group)
        self._counters.generated_tokens += taken
        self._counters.host_s += time.perf_counter() - h0
        return done

    @staticmethod
    def _add_top_logprobs(handle: StepHandle) -> None:
        """Each asking row's k most likely (id, logprob) at this position (rows ask for different k)."""
        ids, lps = handle.top_ids.tolist(), handle.top_logprobs.tolist()
        for row, seq in enumerate(handle.seqs):
            if seq.top_logprobs is not None and seq.status is not Status.FINISHED:
                k = seq.params.top_logprobs
                seq.top_logprobs.append(list(zip(ids[row][:k], lps[row][:k])))

    def _advance_matchers(self, seqs: list[Sequence], tokens: list[int]) -> None:
        pairs = [(s, t) for s, t in zip(seqs, tokens) if s.matcher is not None and s.status is not Status.FINISHED]
        if pairs:
            self._grammars.consume([s for s, _ in pairs], [t for _, t in pairs])

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        n = seq.num_generated
        m = seq.matcher
        if m is not None and seq.matcher_from < 0:
            if m.is_error():  # cannot happen for a token sampled under its mask: an engine bug, not silent
                seq.error = f"constraint violated: {m.get_error()}"
                return "error"
            if m.is_stopped():  # the grammar is complete and takes no more tokens (its EOS included)
                return "stop"
        if tok in seq.stop_ids and n > p.min_new_tokens:  # the sampler suppresses stop ids before that
            return "stop"
        if n >= p.max_new_tokens or len(seq.token_ids) >= seq.max_tokens:
            return "length"
        if p.stop and n >= p.min_new_tokens and self._hits_stop_string(seq):
            return "stop"
        return None

    def _hits_stop_string(self, seq: Sequence) -> bool:
        stops = seq.params.stop
        window = max(len(s) for s in stops) + 8  # tokens are at least one character, mostly
        tail = self._decode(seq.token_ids[max(seq.num_prompt, len(seq.token_ids) - window):],
                            seq.params.skip_special_tokens)
        return any(s in tail for s in stops)

    def _check_open(self) -> None:
        if self.runner is None:
            raise EngineClosedError("this Engine was closed; create a new one")

    def close(self) -> None:
        """Release the KV cache, graphs and weights (another engine may start in this process)."""
        if getattr(self, "runner", None) is None:  # closed, or a rank failed while it was being built
            return
        if self._inflight is not None:
            self.runner.collect(self._inflight)  # nothing may still write into buffers about to be freed
            self._inflight = None
        self.runner = None  # type: ignore[assignment]
        self.model = None
        if self._tp is not None:
            self._tp.shutdown(grace=10.0)
        gc.unfreeze()
        gc.collect()  # frees the model, caches and graphs now, before empty_cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _longrope_prompt_limit(scaling: dict | None) -> int | None:
    """The longest prompt a longrope model runs exactly: one table holds the short factors below
    original_max_position_embeddings and the long ones from it on, which is what the model does for a
    prompt within that window (and a generation that crosses it); a longer prompt takes the long factors
    at every position (per sequence), not supported yet."""
    if not scaling or scaling.get("rope_type") != "longrope":
        return None
    if list(scaling.get("short_factor") or []) == list(scaling.get("long_factor") or []):
        return None  # one factor set: positions alone decide
    return int(scaling["original_max_position_embeddings"])


def _check_iterable(requests: object, caller: str) -> None:
    """A bare str would be taken one character per request; anything not iterable fails later and less clearly."""
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise EngineArgumentTypeError(f"{caller}() takes an iterable of prompts or GenerationRequests; got "
                                      f"{'one ' if isinstance(requests, (str, bytes)) else ''}"
                                      f"{type(requests).__name__}" +
                                      (" (wrap it in a list: [prompt])" if isinstance(requests, (str, bytes)) else ""))


class _Owner:
    """Who receives a request's output: the push API (add/step) or one stream()/generate() call."""

    __slots__ = ("ready", "unfinished")

    def __init__(self) -> None:
        self.ready: deque[RequestGroup] = deque()  # finished (or rejected) groups not yet handed out
        self.unfinished = 0  # accepted groups still in the engine

"""Runs scheduled steps on the device: builds step inputs (vectorised over the batch), runs the
model, samples on the device, and hands sampled tokens back without blocking the host.

Sampled tokens are also written to a device buffer indexed by slot; the next step gathers its
decode input ids from it, so a token is used before the host has even seen it. On CUDA the host
inputs go through pinned staging buffers (alternating, so staging step N+1 never overwrites what
step N is still copying) and tokens come back with a non-blocking copy and an event.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import kv_fp8
from .attention.base import AttentionBackend, AttentionMetadata
from .cuda_graphs import DecodeGraphs
from .models.llama import LlamaModel
from .sampler import Sampler, SamplingBatch, top_k_bound_hint, top_logprobs
from .scheduler import ScheduledBatch
from .sequence import Sequence
from .step_inputs import StepInputs


_STAGED = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.float32))


@dataclass
class PreparedStep:
    """Host work of one step, done: device inputs staged, metadata ready, sampling rows chosen."""
    inputs: StepInputs
    meta: AttentionMetadata
    needs_gather: bool  # some input ids are still on the device (token_buf)
    all_sample: bool  # every sequence samples (logits rows == batch rows)
    sample_seqs: list[Sequence]
    sampling: SamplingBatch | None
    top_logprobs: int = 0  # k of the rows asking most (0: none asks)
    kv_tokens: int = 0  # KV positions the step's attention reads, all sequences (bench's floor of a step)


@dataclass
class LaunchedForward:
    """A step whose forward pass is enqueued: its logits (on the device) wait for the sampler."""
    step: PreparedStep
    logits: torch.Tensor | None
    started: torch.cuda.Event | None


@dataclass
class StepHandle:
    seqs: list[Sequence]  # the sequences that sample this step, in row order
    tokens: torch.Tensor | None  # host (pinned on CUDA) [S] int64, valid once `done` has fired
    logprobs: torch.Tensor | None
    done: torch.cuda.Event | None
    started: torch.cuda.Event | None
    decode_only: bool = False
    top_ids: torch.Tensor | None = None  # host [S, k] int64 / float32 when some row asks for top_logprobs
    top_logprobs: torch.Tensor | None = None
    batch: int = 0  # sequences in the step
    kv_tokens: int = 0  # PreparedStep.kv_tokens


class ModelRunner:
    def __init__(self, model: LlamaModel, backend: AttentionBackend, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int,
                 kv_dtype: torch.dtype | None = None, kv_scales: kv_fp8.KVScales | None = None) -> None:
        """kv_dtype: the caches' dtype (None: the model's); kv_scales: an FP8 cache's per-layer scales."""
        cfg = model.cfg
        self.model, self.backend, self.device, self.dtype = model, backend, device, dtype
        self.block_size = block_size
        self.kv_dtype = kv_dtype or dtype
        self.kv_caches = [tuple(self._cache_tensor(num_blocks, block_size, cfg, backend.kv_head_major)
                                for _ in "kv") for _ in range(cfg.num_layers)]
        if self.kv_dtype == kv_fp8.KV_FP8:  # each cache carries its scale: the backends read it from there
            scales = kv_scales or kv_fp8.KVScales.default(cfg.num_layers)
            for (k, v), ks, vs in zip(self.kv_caches, scales.k, scales.v):
                kv_fp8.set_scale(k, ks)
                kv_fp8.set_scale(v, vs)
        self.sampler = Sampler(cfg.vocab_size, max_num_seqs, device)
        self.token_buf = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self.cuda = device.type == "cuda"
        max_blocks = -(-max_model_len // block_size)
        self.table = np.zeros((max_num_seqs, max_blocks), dtype=np.int64)
        # per-slot sampling settings, set once when a sequence takes a slot; one gather per step.
        # floats: temperature, top_p, min_p, repetition_penalty; ints: top_k, sampling stream key
        self.fparams = np.zeros((4, max_num_seqs), np.float32)
        self.fdefault = np.array([0.0, 1.0, 0.0, 1.0], np.float32)[:, None]
        self.iparams = np.zeros((2, max_num_seqs), np.int64)
        self.logprobs = np.zeros(max_num_seqs, bool)
        self.top_k_logprobs = np.zeros(max_num_seqs, np.int64)
        self.min_new_end = np.zeros(max_num_seqs, np.int64)  # position before which stop ids are suppressed
        self.stop_ids: list[list[int]] = [[] for _ in range(max_num_seqs)]
        self._staging: list[torch.Tensor | None] = [None] * (2 * len(_STAGED))  # (step parity, dtype)
        # host->device copies run on their own stream, so staging step N+1 overlaps step N's compute
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self._flip = 0
        self.max_model_len = max_model_len
        self.graphs: DecodeGraphs | None = None  # once captured

    def capture_graphs(self, max_batch: int) -> float:
        """Capture decode CUDA graphs (needs backend.graph_capturable); returns seconds spent."""
        self.graphs = DecodeGraphs(self.model, self.backend, self.kv_caches, self.token_buf, max_batch,
                                   self.max_model_len, self.table.shape[1])
        self.graphs.capture()
        return self.graphs.capture_s

    def _cache_tensor(self, num_blocks: int, block_size: int, cfg, head_major: bool) -> torch.Tensor:
        """[num_blocks, block_size, kv_heads, head_dim] as backends see it. Head-major storage keeps each
        (block, kv head) contiguous, so a decode kernel reads one run of block_size * head_dim values."""
        if head_major:
            t = torch.zeros(num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim, dtype=self.kv_dtype,
                            device=self.device)
            return t.permute(0, 2, 1, 3)
        return torch.zeros(num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=self.kv_dtype,
                           device=self.device)

    # ------------------------------------------------------------------ slots
    def admit(self, seqs: list[Sequence]) -> None:
        reset: list[Sequence] = []
        for s in seqs:
            p, k = s.params, s.slot
            self.table[k, : len(s.blocks)] = s.blocks
            self.fparams[:, k] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty)
            self.iparams[:, k] = (p.top_k, s.stream_key)
            self.logprobs[k] = p.logprobs
            self.top_k_logprobs[k] = p.top_logprobs
            self.min_new_end[k] = s.num_prompt + p.min_new_tokens
            self.stop_ids[k] = sorted(s.stop_ids)
            if p.repetition_penalty != 1.0:
                reset.append(s)
        if reset:
            self.sampler.enable_penalty_history()
            self.sampler.reset_slots([s.slot for s in reset], [s.token_ids for s in reset])

    # ------------------------------------------------------------------ one step
    def prepare(self, batch: ScheduledBatch) -> PreparedStep:
        """Everything the host does for a step, vectorised over the batch where it can be."""
        seqs, B = batch.seqs, len(batch.seqs)
        self.admit(batch.admitted)
        for s in batch.grown:  # block tables change only when a sequence gets a new block
            self.table[s.slot, : len(s.blocks)] = s.blocks
        starts = np.array(batch.starts, dtype=np.int64)
        slots = np.array(batch.slots, dtype=np.int64)
        bs = self.block_size
        ids_np = np.array(batch.ids, dtype=np.int64)
        if len(ids_np) == B:  # one token per sequence (decode): no ragged layout to build
            max_query_len, positions, tok_slot = 1, starts, slots
            qsl = np.arange(B + 1, dtype=np.int64)
            seq_lens = starts + 1
        else:
            lens = np.array(batch.lens, dtype=np.int64)
            max_query_len = int(lens.max())
            qsl = np.zeros(B + 1, np.int64)
            np.cumsum(lens, out=qsl[1:])
            tok_seq = np.repeat(np.arange(B), lens)
            positions = np.arange(qsl[-1]) - qsl[tok_seq] + starts[tok_seq]
            tok_slot = slots[tok_seq]
            seq_lens = starts + lens
        slot_mapping = self.table[tok_slot, positions // bs] * bs + positions % bs
        max_seq_len = int(seq_lens.max())
        tables = self.table[slots, : -(-max_seq_len // bs)].astype(np.int32)
        rows = np.setdiff1d(np.arange(B), batch.no_sample) if batch.no_sample else np.arange(B)
        s_slots = slots[rows]
        s_pos = seq_lens[rows]  # index of the token being sampled
        arrays = {"ids": ids_np, "pos": positions, "slot_mapping": slot_mapping, "tok_slot": tok_slot,
                  "qsl": qsl.astype(np.int32), "seq_lens": seq_lens.astype(np.int32), "tables": tables,
                  "logit_rows": qsl[1:][rows] - 1, "s_slots": s_slots, "s_pos": s_pos,
                  "iparams": self.iparams[:, s_slots], "fparams": self.fparams[:, s_slots]}
        suppress = self._suppress_ids(s_slots, s_pos)
        if suppress is not None:  # staged with the rest: a separate copy would wait for the step in flight
            arrays["suppress"] = suppress
        inputs = StepInputs(**self._upload(arrays))
        meta = AttentionMetadata(
            slot_mapping=inputs.slot_mapping, query_start_loc=inputs.qsl, seq_lens=inputs.seq_lens,
            block_tables=inputs.tables, max_query_len=max_query_len, max_seq_len=max_seq_len,
            decode_only=max_query_len == 1)
        sampling = self._sampling_batch(inputs, arrays, s_slots) if len(rows) else None
        all_sample = len(rows) == B
        sample_seqs = seqs if all_sample else [seqs[i] for i in rows]
        top_k = int(self.top_k_logprobs[s_slots].max()) if len(rows) else 0
        return PreparedStep(inputs, meta, bool((ids_np < 0).any()), all_sample, sample_seqs, sampling, top_k,
                            int(seq_lens.sum()))

    def execute(self, step: PreparedStep) -> StepHandle:
        """Enqueue the whole step (forward and sampling) on the device; returns at once on CUDA."""
        return self.sample(self.forward(step))

    @torch.inference_mode()
    def forward(self, step: PreparedStep) -> LaunchedForward:
        """Enqueue the forward pass and the logits of the rows that sample; returns at once on CUDA."""
        inputs = step.inputs
        started = None
        if self.cuda:
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        batch = step.meta.seq_lens.shape[0]
        if self.graphs is not None and step.meta.decode_only and self.graphs.fits(batch):
            logits = self.graphs.run(inputs, batch)
            if not step.all_sample:
                logits = logits[inputs.logit_rows]
        else:
            input_ids = inputs.ids
            if step.needs_gather:
                input_ids = torch.where(input_ids >= 0, input_ids, self.token_buf[inputs.tok_slot])
            hidden = self.model(input_ids, inputs.pos, self.kv_caches, step.meta, self.backend)
            logits = self.model.logits(hidden[inputs.logit_rows]) if step.sampling is not None else None
        return LaunchedForward(step, logits, started)

    @torch.inference_mode()
    def sample(self, fwd: LaunchedForward, allowed: torch.Tensor | None = None) -> StepHandle:
        """Enqueue sampling of a launched forward. `allowed`: host [rows, ceil(vocab / 32)] int32 bitmask of the
        tokens each row may take (constrained decoding; all bits set on free rows), or None."""
        step, logits = fwd.step, fwd.logits
        tokens_host = logprobs_host = top_ids = top_lps = None
        if step.sampling is not None:
            if allowed is not None:
                step.sampling.allowed = allowed.to(self.device, non_blocking=True)
            if step.top_logprobs:
                top_ids, top_lps = (self._download(t) for t in top_logprobs(logits, step.top_logprobs))
            tokens, logprobs = self.sampler(logits, step.sampling)
            self.token_buf[step.inputs.s_slots] = tokens
            self.sampler.record(step.inputs.s_slots, tokens)
            tokens_host = self._download(tokens)
            logprobs_host = self._download(logprobs) if logprobs is not None else None
        done = None
        if self.cuda:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
        return StepHandle(step.sample_seqs, tokens_host, logprobs_host, done, fwd.started, step.meta.decode_only,
                          top_ids, top_lps, int(step.meta.seq_lens.shape[0]), step.kv_tokens)

    def _sampling_batch(self, inputs: StepInputs, host: dict[str, np.ndarray], s_slots: np.ndarray) -> SamplingBatch:
        fp, ip = host["fparams"], host["iparams"]
        set_f = (fp != self.fdefault).any(axis=1)  # per parameter: does any row leave its default
        top_k_on = bool((ip[0] > 0).any())
        f, i = inputs.fparams, inputs.iparams
        return SamplingBatch(
            temperature=f[0], top_p=f[1], min_p=f[2], repetition_penalty=f[3], top_k=i[0], seeds=i[1],
            positions=inputs.s_pos, slots=inputs.s_slots, suppress_ids=inputs.suppress, all_greedy=not set_f[0],
            any_top_k=top_k_on, any_top_p=bool(set_f[1]), any_min_p=bool(set_f[2]), any_penalty=bool(set_f[3]),
            want_logprobs=bool(self.logprobs[s_slots].any()),
            top_k_bound=top_k_bound_hint(ip[0].tolist(), fp[1].tolist()) if top_k_on else 0)

    def _suppress_ids(self, s_slots: np.ndarray, s_pos: np.ndarray) -> np.ndarray | None:
        """[rows, E] stop ids to forbid (padded with -1) for rows still under min_new_tokens, else None."""
        under_min = s_pos < self.min_new_end[s_slots]
        if not under_min.any():  # only early tokens of requests with min_new_tokens pay for this
            return None
        lists = [self.stop_ids[k] if m else [] for k, m in zip(s_slots, under_min)]
        arr = np.full((len(lists), max(len(x) for x in lists) or 1), -1, np.int64)
        for i, x in enumerate(lists):
            arr[i, : len(x)] = x
        return arr

    # ------------------------------------------------------------------ host <-> device
    def _upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One host->device copy per dtype: arrays of one dtype are packed together."""
        if not self.cuda:
            return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        assert all(v.dtype in _STAGED for v in arrays.values()), "stage int64 / int32 / float32 only"
        out: dict[str, torch.Tensor] = {}
        self._flip ^= 1
        compute = torch.cuda.current_stream(self.device)
        for which, dtype in enumerate(_STAGED):
            items = [(k, v) for k, v in arrays.items() if v.dtype == dtype]
            flat = np.concatenate([v.ravel() for _, v in items])
            staged = self._stage(flat, self._flip * len(_STAGED) + which)
            with torch.cuda.stream(self.copy_stream):
                gpu = staged.to(self.device, non_blocking=True)
            gpu.record_stream(compute)  # used on the compute stream: keep the allocator from recycling it early
            off = 0
            for k, v in items:
                out[k] = gpu[off: off + v.size].view(v.shape)
                off += v.size
        copied = torch.cuda.Event()
        copied.record(self.copy_stream)
        compute.wait_event(copied)  # the step's kernels start only once its inputs have landed
        return out

    def _stage(self, flat: np.ndarray, key: int) -> torch.Tensor:
        """Copy into a pinned buffer; buffers alternate so the previous step's copy is never overwritten."""
        buf = self._staging[key]
        if buf is None or buf.numel() < flat.size:
            buf = torch.empty(max(flat.size, 1 << 16), dtype=torch.from_numpy(flat[:0]).dtype, pin_memory=True)
            self._staging[key] = buf
        view = buf[: flat.size]
        view.numpy()[:] = flat
        return view

    def _download(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    @staticmethod
    def collect(handle: StepHandle) -> tuple[np.ndarray, np.ndarray | None]:
        """Wait for one step's sampled tokens (the only host-device sync of the loop)."""
        if handle.done is not None:
            handle.done.synchronize()
        if handle.tokens is None:
            return np.empty(0, np.int64), None
        lp = handle.logprobs.numpy() if handle.logprobs is not None else None
        return handle.tokens.numpy(), lp

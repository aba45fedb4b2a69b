"""Batched on-device sampler.

Per step the runner builds a :class:`SamplingBatch` (all tensors on the device, one row per sequence that samples
this step) and calls ``Sampler(logits, batch)``. Nothing in ``__call__`` synchronises with the host: code paths are
picked with the host-side flags of the batch only.

Processing order follows Hugging Face transformers' logits processors:
repetition penalty (on raw logits) -> suppressed ids -> temperature -> top-k -> top-p -> min-p -> sample.

Randomness is counter based: the noise for (row, vocab id) is a hash of (seed, position, vocab id), so a row's token
depends only on its own logits, seed and position -- never on batch companions, batch order or a shared generator.
Sampling is a Gumbel-max (exponential race): ``argmax(l / T + G)`` with ``G = -log(-log(1 - u))``, which draws
exactly from ``softmax(l / T)`` restricted to the kept support (masked tokens are -inf and can never win).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["SamplingBatch", "Sampler", "apply_token_bitmask_", "row_keys", "top_k_bound_hint", "top_logprobs",
           "uniform_noise", "gumbel_noise"]

_M64 = (1 << 64) - 1


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


def _s32(c: int) -> int:
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= 1 << 31 else c


_GOLDEN64 = _s64(0x9E3779B97F4A7C15)
_SM_C1 = _s64(0xBF58476D1CE4E5B9)
_SM_C2 = _s64(0x94D049BB133111EB)
_GOLDEN32 = 0x9E3779B9
_FM_C1 = _s32(0x85EBCA6B)
_FM_C2 = _s32(0xC2B2AE35)


def _srl64(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64 finalizer on int64 with wrapping multiplies."""
    x = x ^ _srl64(x, 30)
    x = x * _SM_C1
    x = x ^ _srl64(x, 27)
    x = x * _SM_C2
    return x ^ _srl64(x, 31)


def row_keys(seeds: Tensor, positions: Tensor) -> Tensor:
    """[B] int32 key per (seed, position): splitmix64(splitmix64(seed) + position * golden), low 32 bits."""
    k = _mix64(_mix64(seeds.to(torch.int64)) + positions.to(torch.int64) * _GOLDEN64)
    k = ((k & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000  # low 32 bits as a signed value in int32 range
    return k.to(torch.int32)


def _xor_srl32_(x: Tensor, s: int, tmp: Tensor) -> None:
    """x ^= x >>> s (logical shift on int32), in place, using tmp as scratch."""
    torch.bitwise_right_shift(x, s, out=tmp)
    tmp.bitwise_and_((1 << (32 - s)) - 1)
    x.bitwise_xor_(tmp)


def _hash_bits(keys: Tensor, vocab_mul: Tensor) -> Tensor:
    """[B, V] int32 hash bits: murmur3 fmix32((v * golden32) ^ key[b])."""
    x = vocab_mul.unsqueeze(0) ^ keys.unsqueeze(1)  # [B, V] int32
    tmp = torch.empty_like(x)
    _xor_srl32_(x, 16, tmp)
    x.mul_(_FM_C1)
    _xor_srl32_(x, 13, tmp)
    x.mul_(_FM_C2)
    _xor_srl32_(x, 16, tmp)
    del tmp
    return x


def _vocab_mul(vocab_size: int, device: torch.device) -> Tensor:
    v = torch.arange(vocab_size, dtype=torch.int64, device=device) * _GOLDEN32
    return (((v & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def uniform_noise(seeds: Tensor, positions: Tensor, vocab_size: int, vocab_mul: Tensor | None = None) -> Tensor:
    """[B, V] float32 uniforms in (0, 1], from 31 hash bits: u = (h + 0.5) / 2^31 (small u exact)."""
    if vocab_mul is None:
        vocab_mul = _vocab_mul(vocab_size, seeds.device)
    h = _hash_bits(row_keys(seeds, positions), vocab_mul)
    h.bitwise_and_(0x7FFFFFFF)
    u = h.to(torch.float32)
    del h
    return u.add_(0.5).mul_(2.0**-31)


def gumbel_noise(seeds: Tensor, positions: Tensor, vocab_size: int, vocab_mul: Tensor | None = None) -> Tensor:
    """[B, V] float32 standard Gumbel noise G = -log(E), E = -log(1 - u) ~ Exp(1).

    E is computed as -log1p(-u) so that the winners (small E, small u) have full resolution; u == 1 (rounding of the
    largest hashes) gives E = inf, G = -inf (that token simply never wins)."""
    u = uniform_noise(seeds, positions, vocab_size, vocab_mul)
    return u.neg_().log1p_().neg_().log_().neg_()


def _noisy_argmax(x: Tensor, keys: Tensor, vocab_mul: Tensor, greedy: Tensor) -> Tensor:
    """argmax(x + G) per row, G the counter-hash Gumbel noise (0 on greedy rows). Pure elementwise + reduction, so
    torch.compile fuses it into one pass on GPU; the eager version materialises the noise."""
    h = vocab_mul.unsqueeze(0) ^ keys.unsqueeze(1)
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _FM_C1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _FM_C2
    h = h ^ ((h >> 16) & 0xFFFF)
    u = ((h & 0x7FFFFFFF).to(torch.float32) + 0.5) * (2.0**-31)
    g = -torch.log(-torch.log1p(-u))
    g = torch.where(greedy.unsqueeze(1), 0.0, g)
    return torch.argmax(x + g, dim=-1)


@dataclass
class SamplingBatch:
    """Per-step sampling parameters; all tensors on the device, B = rows that sample this step."""

    temperature: Tensor  # [B] float32 (0 => greedy row)
    top_k: Tensor  # [B] int64 (<= 0 => off)
    top_p: Tensor  # [B] float32 (1.0 => off)
    min_p: Tensor  # [B] float32 (0 => off)
    repetition_penalty: Tensor  # [B] float32 (1.0 => off)
    seeds: Tensor  # [B] int64 per-sample stream key
    positions: Tensor  # [B] int64 index of the token being sampled within the sequence
    slots: Tensor  # [B] int64 slot in [0, max_slots) (repetition-penalty history)
    suppress_ids: Tensor | None = None  # [B, E] int64 ids to forbid this step, padded with -1
    allowed: Tensor | None = None  # [B, ceil(V / 32)] int32 bitmask of the ids a row may take (constrained decoding)
    # host-side flags (no device sync needed to choose code paths)
    all_greedy: bool = True
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    any_penalty: bool = False
    want_logprobs: bool = False
    # optional host hint: 0 = unknown (full sort). K > 0 promises that every row with top-k on has top_k <= K and
    # every row with top-p on also has top-k on; then one torch.topk(K) replaces the full-vocabulary sort.
    top_k_bound: int = 0

    @classmethod
    def build(
        cls,
        *,
        temperature: Sequence[float],
        seeds: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int] | None = None,
        top_k: Sequence[int] | None = None,
        top_p: Sequence[float] | None = None,
        min_p: Sequence[float] | None = None,
        repetition_penalty: Sequence[float] | None = None,
        suppress_ids: Sequence[Sequence[int]] | None = None,
        want_logprobs: bool = False,
        device: torch.device | str = "cpu",
    ) -> SamplingBatch:
        """Convenience builder from host lists (computes the host flags). Seeds are taken modulo 2^64 as int64."""
        b = len(temperature)
        top_k = list(top_k) if top_k is not None else [-1] * b
        top_p = list(top_p) if top_p is not None else [1.0] * b
        min_p = list(min_p) if min_p is not None else [0.0] * b
        rep = list(repetition_penalty) if repetition_penalty is not None else [1.0] * b
        slots = list(slots) if slots is not None else list(range(b))
        sup = None
        if suppress_ids is not None and any(len(s) for s in suppress_ids):
            e = max(len(s) for s in suppress_ids)
            sup = torch.tensor([list(s) + [-1] * (e - len(s)) for s in suppress_ids], dtype=torch.int64)
            sup = sup.to(device)

        def t(x, dt):
            return torch.tensor(x, dtype=dt).to(device, non_blocking=True)

        return cls(
            temperature=t(temperature, torch.float32),
            top_k=t(top_k, torch.int64),
            top_p=t(top_p, torch.float32),
            min_p=t(min_p, torch.float32),
            repetition_penalty=t(rep, torch.float32),
            seeds=t([_s64(int(s)) for s in seeds], torch.int64),
            positions=t(positions, torch.int64),
            slots=t(slots, torch.int64),
            suppress_ids=sup,
            all_greedy=all(x == 0 for x in temperature),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(p > 0.0 for p in min_p),
            any_penalty=any(r != 1.0 for r in rep),
            want_logprobs=want_logprobs,
            top_k_bound=top_k_bound_hint(top_k, top_p),
        )


def top_k_bound_hint(top_k: Sequence[int], top_p: Sequence[float]) -> int:
    """The SamplingBatch.top_k_bound hint for these per-row settings (0 when a full sort is needed)."""
    ks = [k for k in top_k if k > 0]
    if not ks or any(p < 1.0 and k <= 0 for k, p in zip(top_k, top_p)):
        return 0
    return max(ks)


def apply_token_bitmask_(x: Tensor, allowed: Tensor) -> None:
    """Set to -inf, in place, the entries of x [B, V] whose bit is 0 in allowed ([B, ceil(V / 32)] int32; bit j of
    word w is token 32 w + j)."""
    rows, vocab = x.shape
    shifts = torch.arange(32, device=x.device, dtype=torch.int32)
    bits = (allowed.unsqueeze(-1) >> shifts).bitwise_and_(1).view(rows, -1)[:, :vocab]
    x.masked_fill_(bits == 0, -math.inf)


def top_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely ids of each row and their log-probabilities under the raw model distribution."""
    x = logits.float()
    vals, ids = torch.topk(x, k, dim=-1)
    return ids, vals - torch.logsumexp(x, dim=-1, keepdim=True)


class Sampler:
    """Batched sampler with per-slot repetition-penalty history.

    History is a [max_slots, V] bool presence mask (prompt + generated ids), allocated only once
    :meth:`enable_penalty_history` is called; call it before :meth:`reset_slots` of the first request that uses a
    repetition penalty. While disabled, :meth:`reset_slots` and :meth:`record` are no-ops.
    """

    def __init__(self, vocab_size: int, max_slots: int, device: torch.device | str, compile: bool | None = None):
        """compile: fuse the noise + argmax with torch.compile (one pass over [B, V] instead of ~20).
        None (default) = on for CUDA devices; falls back to eager if compilation fails."""
        self.vocab_size = int(vocab_size)
        self.max_slots = int(max_slots)
        self.device = torch.device(device)
        if compile is None:
            compile = self.device.type == "cuda"
        self._compiled = None
        if compile:
            try:
                self._compiled = torch.compile(_noisy_argmax, dynamic=True)
            except Exception:  # noqa: BLE001 - torch.compile unavailable: stay eager
                self._compiled = None
        self._vocab_mul = _vocab_mul(self.vocab_size, self.device)
        self._history: Tensor | None = None

    # ---------------------------------------------------------------- repetition-penalty history
    @property
    def history_enabled(self) -> bool:
        return self._history is not None

    def enable_penalty_history(self) -> None:
        if self._history is None:
            self._history = torch.zeros(self.max_slots, self.vocab_size, dtype=torch.bool, device=self.device)

    def reset_slots(self, slots: list[int], token_ids: list[list[int]]) -> None:
        """Start new sequences in ``slots``; their history becomes ``token_ids`` (the prompt ids)."""
        if self._history is None or not slots:
            return
        if len(slots) != len(token_ids):
            raise ValueError("reset_slots: slots and token_ids differ in length")
        # One host array, one copy: [slots | rows | cols]. From pinned memory on CUDA, so the copy is
        # queued behind the step in flight instead of synchronising the stream (pageable copies do).
        lens = np.fromiter(map(len, token_ids), dtype=np.int64, count=len(token_ids))
        cols = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lens.sum()))
        slot_arr = np.asarray(slots, dtype=np.int64)
        keep = (cols >= 0) & (cols < self.vocab_size)  # like HF: ids outside the output vocab get no penalty
        rows, cols = np.repeat(slot_arr, lens)[keep], cols[keep]
        host = torch.from_numpy(np.concatenate([slot_arr, rows, cols]))
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        n, k = len(slots), len(rows)
        self._history.index_fill_(0, dev[:n], False)
        if k:
            self._history.index_put_((dev[n:n + k], dev[n + k:]), torch.ones((), dtype=torch.bool, device=self.device))

    def record(self, slots: Tensor, tokens: Tensor) -> None:
        """Add sampled ``tokens`` [B] to the history of ``slots`` [B] (device op, no sync)."""
        if self._history is None:
            return
        self._history.index_put_(
            (slots.to(torch.int64), tokens.to(torch.int64)), torch.ones((), dtype=torch.bool, device=self.device)
        )

    # ---------------------------------------------------------------- sampling
    def _apply_penalty(self, x: Tensor, batch: SamplingBatch) -> None:
        if self._history is None:
            raise RuntimeError("repetition penalty requested but enable_penalty_history() was never called")
        seen = self._history.index_select(0, batch.slots)  # [B, V] bool
        p = batch.repetition_penalty.to(torch.float32).unsqueeze(1)
        # HF: s < 0 ? s * p : s / p on seen tokens. Division keeps the sign, so the second mask is still right.
        x.div_(torch.where(seen & (x >= 0), p, 1.0))
        x.mul_(torch.where(seen & (x < 0), p, 1.0))

    @staticmethod
    def _apply_suppress(x: Tensor, suppress_ids: Tensor) -> None:
        ids = suppress_ids.to(torch.int64)
        valid = ids >= 0
        idx = torch.where(valid, ids, 0)
        vals = torch.where(valid, -math.inf, math.inf).to(x.dtype).expand_as(idx)
        # amin with include_self: valid ids -> -inf, padding leaves the value unchanged (duplicate-safe)
        x.scatter_reduce_(1, idx, vals.contiguous(), reduce="amin", include_self=True)

    def _threshold(self, x: Tensor, batch: SamplingBatch) -> Tensor | None:
        """Per-row logit threshold [B] for top-k / top-p / min-p on temperature-scaled logits (keep x >= thr)."""
        v = x.shape[1]
        thr = None
        if batch.any_top_k or batch.any_top_p:
            bound = int(batch.top_k_bound)
            if 0 < bound < v:
                s = torch.topk(x, bound, dim=-1, sorted=True).values  # [B, K] descending
            else:
                s = torch.sort(x, dim=-1, descending=True).values  # [B, V]
            width = s.shape[1]
            k = batch.top_k.to(torch.int64)
            k = torch.where((k <= 0) | (k > v), v, k)  # [B] number kept by top-k
            if batch.any_top_p:
                if batch.any_top_k:
                    cols = torch.arange(width, device=x.device)
                    s_k = s.masked_fill(cols.unsqueeze(0) >= k.unsqueeze(1), -math.inf)
                    probs = torch.softmax(s_k, dim=-1)
                    del s_k
                else:
                    probs = torch.softmax(s, dim=-1)
                probs.cumsum_(dim=-1)
                # smallest n with cum[n-1] >= p  ==  #(cum < p) + 1
                p = batch.top_p.to(torch.float32).unsqueeze(1)
                n = (probs < p).sum(dim=-1) + 1
                del probs
                n = torch.where(batch.top_p >= 1.0, v, n)
                k = torch.minimum(k, n).clamp(1, v)
            thr = s.gather(1, (k.clamp(max=width) - 1).unsqueeze(1)).squeeze(1)
            if width < v:  # rows keeping more than the top `bound` tokens (top-k and top-p off): no threshold
                thr = torch.where(k > width, -math.inf, thr)
            del s
        if batch.any_min_p:
            mp = batch.min_p.to(torch.float32)
            # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)   (log 0 = -inf: off)
            t_mp = x.amax(dim=-1) + torch.log(mp)
            thr = t_mp if thr is None else torch.maximum(thr, t_mp)
        return thr

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor | None]:
        """logits [B, V] -> (tokens [B] int64, logprobs [B] float32 of the chosen ids under the raw model
        distribution, or None unless batch.want_logprobs)."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
        need_proc = batch.any_penalty or batch.suppress_ids is not None or batch.allowed is not None
        lse = torch.logsumexp(logits.float(), dim=-1) if batch.want_logprobs else None  # raw model distribution

        if batch.all_greedy and not need_proc:
            tokens = logits.argmax(dim=-1)
        else:
            x = logits.to(torch.float32, copy=True)
            if batch.allowed is not None:  # first: every later step sees only what the grammar allows
                apply_token_bitmask_(x, batch.allowed)
            if batch.any_penalty:
                self._apply_penalty(x, batch)
            if batch.suppress_ids is not None:
                self._apply_suppress(x, batch.suppress_ids)
            if batch.all_greedy:
                tokens = x.argmax(dim=-1)
            else:
                temp = batch.temperature.to(torch.float32)
                greedy = temp <= 0
                x.div_(torch.where(greedy, 1.0, temp).unsqueeze(1))
                thr = None
                if batch.any_top_k or batch.any_top_p or batch.any_min_p:
                    thr = self._threshold(x, batch)
                if thr is not None:
                    x.masked_fill_(x < thr.unsqueeze(1), -math.inf)
                tokens = self._sample(x, batch, greedy)
            del x

        logprobs = None
        if lse is not None:
            logprobs = logits.gather(1, tokens.unsqueeze(1)).squeeze(1).float() - lse
        return tokens, logprobs

    def _sample(self, x: Tensor, batch: SamplingBatch, greedy: Tensor) -> Tensor:
        vm = self._vocab_mul_for(x)
        if self._compiled is not None:
            try:
                return self._compiled(x, row_keys(batch.seeds, batch.positions), vm, greedy)
            except Exception as e:  # noqa: BLE001 - compilation failed (no compiler, unsupported op): eager from now on
                import warnings

                warnings.warn(f"sampler: torch.compile failed, using eager noise ({type(e).__name__}: {e})")
                self._compiled = None
        g = gumbel_noise(batch.seeds, batch.positions, x.shape[1], vm)
        g.masked_fill_(greedy.unsqueeze(1), 0.0)
        x.add_(g)
        del g
        return x.argmax(dim=-1)

    def _vocab_mul_for(self, x: Tensor) -> Tensor:
        v = x.shape[1]
        if self._vocab_mul.shape[0] != v or self._vocab_mul.device != x.device:
            self._vocab_mul = _vocab_mul(v, x.device)
        return self._vocab_mul

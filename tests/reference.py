"""Reference generation with plain transformers, and the comparator used by the engine tests.

The reference is deliberately boring: AutoModelForCausalLM in float32 with eager attention, one
prompt at a time, token-by-token argmax with transformers' own KV cache. The comparator finds the
first step where the engine and the reference disagree and accepts the difference only if the
reference's top-2 logits at that step are within TIE_TOL (recomputed there with a full forward),
after which it stops comparing that prompt.

Checkpoints come from tests/checkpoints.py (conftest's tiny_checkpoint fixture when a test has it,
else `fallback_checkpoint`); `make_tiny_checkpoint` and `build_tokenizer` stay importable from here.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from checkpoints import build_tokenizer, make_tiny_checkpoint  # noqa: F401 - names the tests use

TIE_TOL = 1e-3
FAMILIES = ["llama", "llama3.1", "mistral", "qwen2", "qwen3", "smollm2"]

# ----------------------------------------------------------------------------------------------
# Tiny checkpoints: tests/checkpoints.py builds them (tests prefer conftest's tiny_checkpoint fixture)
# ----------------------------------------------------------------------------------------------


def copy_with_eos(src: str, dst: str | os.PathLike, eos_ids: list[int]) -> str:
    """Copy a checkpoint and set its EOS (generation_config and config) to eos_ids."""
    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for name in ("generation_config.json", "config.json"):
        p = dst / name
        if p.exists():
            d = json.loads(p.read_text())
            d["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
            p.write_text(json.dumps(d, indent=2))
    return str(dst)


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


def random_prompts(n: int, vocab_size: int, seed: int = 1234, min_len: int = 1, max_len: int = 300,
                   low_id: int = 4) -> list[list[int]]:
    """n prompts of random ids in [low_id, vocab_size); lengths spread over [min_len, max_len]
    including both ends."""
    rng = random.Random(seed)
    lens = [min_len, max_len] + [rng.randint(min_len, max_len) for _ in range(n - 2)]
    rng.shuffle(lens)
    return [[rng.randrange(low_id, vocab_size) for _ in range(L)] for L in lens[:n]]


def random_max_new(n: int, seed: int = 99, lo: int = 1, hi: int = 64) -> list[int]:
    rng = random.Random(seed)
    vals = [lo, hi] + [rng.randint(lo, hi) for _ in range(n - 2)]
    rng.shuffle(vals)
    return vals[:n]


def shared_prefix_prompts(n: int, vocab_size: int, prefix_len: int = 100, seed: int = 777,
                          max_suffix: int = 80) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(4, vocab_size) for _ in range(prefix_len)]
    out = []
    for i in range(n):
        suffix_len = rng.randint(0 if i == 0 else 1, max_suffix)
        out.append(prefix + [rng.randrange(4, vocab_size) for _ in range(suffix_len)])
    return out


# ----------------------------------------------------------------------------------------------
# Reference generation
# ----------------------------------------------------------------------------------------------


@dataclass
class RefResult:
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)  # log_softmax at the chosen token
    gaps: list[float] = field(default_factory=list)  # top1 - top2 logit at each step
    finish_reason: str = "length"


class Reference:
    """A transformers model in float32 eager mode, loaded once per checkpoint."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM

        self.path = path
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          attn_implementation="eager")
        self.model.eval()
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: cache

    @torch.inference_mode()
    def logits_full(self, ids: list[int]) -> torch.Tensor:
        """Logits of the next token after `ids`, by a full forward without cache."""
        x = torch.tensor([ids], dtype=torch.long)
        return self.model(input_ids=x, use_cache=False).logits[0, -1].float()

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new_tokens: int, eos_ids: list[int] | None = None,
               min_new_tokens: int = 0) -> RefResult:
        """Greedy with transformers' KV cache. eos_ids None: ignore EOS. With eos_ids, EOS logits
        are masked while fewer than min_new_tokens tokens were generated; stops after EOS."""
        res = RefResult(tokens=[])
        x = torch.tensor([prompt], dtype=torch.long)
        past = None
        for step in range(max_new_tokens):
            out = self.model(input_ids=x, use_cache=True, **{self._cache_kw: past})
            past = getattr(out, self._cache_kw, None)
            if past is None:
                past = out.past_key_values
            logits = out.logits[0, -1].float().clone()
            if eos_ids and step < min_new_tokens:
                logits[eos_ids] = float("-inf")
            top2 = torch.topk(logits, 2)
            tok = int(top2.indices[0])
            res.gaps.append(float(top2.values[0] - top2.values[1]))
            res.logprobs.append(float(torch.log_softmax(logits, -1)[tok]))
            res.tokens.append(tok)
            if eos_ids and tok in eos_ids:
                res.finish_reason = "stop"
                break
            x = torch.tensor([[tok]], dtype=torch.long)
        return res

    def greedy_many(self, prompts: list[list[int]], max_new: list[int], **kw) -> list[RefResult]:
        return [self.greedy(p, m, **kw) for p, m in zip(prompts, max_new)]


# ----------------------------------------------------------------------------------------------
# Comparator
# ----------------------------------------------------------------------------------------------


@dataclass
class Mismatch:
    index: int
    prompt_len: int
    step: int
    engine_tok: int | None
    ref_tok: int | None
    gap: float | None
    reason: str

    def __str__(self) -> str:
        return (f"prompt #{self.index} (len {self.prompt_len}): {self.reason} at step {self.step}: "
                f"engine={self.engine_tok} ref={self.ref_tok} ref top-2 gap={self.gap}")


def compare_greedy(ref: Reference, prompts: list[list[int]], engine_tokens: list[list[int]],
                   ref_results: list[RefResult], tol: float = TIE_TOL
                   ) -> tuple[list[Mismatch], list[Mismatch]]:
    """Returns (failures, tolerated near-ties). For each prompt: find the first differing step;
    if the reference's top-2 logits there (recomputed with a full forward over prompt + the
    common prefix) are within `tol` the difference is tolerated and the rest of that prompt is
    not compared; otherwise it is a failure. A length difference without a differing token is a
    failure too."""
    failures, ties = [], []
    for i, (p, got, want) in enumerate(zip(prompts, engine_tokens, ref_results)):
        w = want.tokens
        k = next((j for j in range(min(len(got), len(w))) if got[j] != w[j]), None)
        if k is None:
            if len(got) != len(w):
                failures.append(Mismatch(i, len(p), min(len(got), len(w)),
                                         got[len(w)] if len(got) > len(w) else None,
                                         w[len(got)] if len(w) > len(got) else None, None,
                                         f"length differs (engine {len(got)}, ref {len(w)})"))
            continue
        logits = ref.logits_full(p + w[:k])
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        # The engine's pick must also be one of the near-tied top tokens.
        eng_gap = float(top2[0] - logits[got[k]])
        m = Mismatch(i, len(p), k, got[k], w[k], gap, "token differs")
        (ties if gap < tol and eng_gap < tol else failures).append(m)
    return failures, ties


def format_failures(failures: list[Mismatch], label: str, limit: int = 10) -> str:
    lines = [f"{label}: {len(failures)} prompt(s) differ from the transformers reference"]
    lines += ["  " + str(m) for m in failures[:limit]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Process-wide caches (shared by all test modules: one reference run per checkpoint + prompts)
# ----------------------------------------------------------------------------------------------

_REFS: dict[str, Reference] = {}
_GREEDY: dict[tuple, list[RefResult]] = {}
_FALLBACK_CKPTS: dict[tuple, str] = {}


def get_reference(path: str) -> Reference:
    path = str(path)
    if path not in _REFS:
        _REFS[path] = Reference(path)
    return _REFS[path]


def cached_greedy(path: str, prompts: list[list[int]], max_new: list[int], **kw) -> list[RefResult]:
    key = (str(path), tuple(map(tuple, prompts)), tuple(max_new), tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items())))
    if key not in _GREEDY:
        _GREEDY[key] = get_reference(path).greedy_many(prompts, max_new, **kw)
    return _GREEDY[key]


def fallback_checkpoint(family: str, root: str | os.PathLike) -> str:
    key = (family, str(root))
    if key not in _FALLBACK_CKPTS:
        seed = FAMILIES.index(family) if family in FAMILIES else 99
        _FALLBACK_CKPTS[key] = make_tiny_checkpoint(family, Path(root) / family, seed=seed)
    return _FALLBACK_CKPTS[key]


def model_info(path: str) -> tuple[int, set[int]]:
    """(vocab_size, special token ids) of a checkpoint."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    vocab = cfg.get_text_config().vocab_size  # a multimodal config (Gemma 3) keeps it in its text_config
    try:
        tok = AutoTokenizer.from_pretrained(path)
        specials = set(tok.all_special_ids)
        vocab = min(vocab, len(tok))
    except Exception:
        specials = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            specials.add(v)
        elif isinstance(v, list):
            specials.update(v)
    return vocab, specials


def random_prompts_for(path: str, n: int, seed: int = 1234, min_len: int = 1, max_len: int = 300
                       ) -> list[list[int]]:
    vocab, specials = model_info(path)
    allowed = [i for i in range(vocab) if i not in specials]
    rng = random.Random(seed)
    lens = [min_len, max_len] + [rng.randint(min_len, max_len) for _ in range(n - 2)]
    rng.shuffle(lens)
    return [[rng.choice(allowed) for _ in range(L)] for L in lens[:n]]


def shared_prefix_prompts_for(path: str, n: int, prefix_len: int = 100, seed: int = 777,
                              max_suffix: int = 80, block_size: int = 16) -> list[list[int]]:
    """n prompts sharing a prefix_len-token prefix, plus the edge cases of prefix caching: a
    prompt equal to the prefix, one equal to the block-aligned part of the prefix, and exact
    duplicate prompts."""
    vocab, specials = model_info(path)
    allowed = [i for i in range(vocab) if i not in specials]
    rng = random.Random(seed)
    prefix = [rng.choice(allowed) for _ in range(prefix_len)]
    out = [list(prefix), prefix[: (prefix_len // block_size) * block_size]]
    while len(out) < n:
        suffix = [rng.choice(allowed) for _ in range(rng.randint(1, max_suffix))]
        out.append(prefix + suffix)
        if len(out) % 5 == 0 and len(out) < n:
            out.append(prefix + suffix)  # exact duplicate
    return out[:n]


# ----------------------------------------------------------------------------------------------
# Engine helpers
# ----------------------------------------------------------------------------------------------

CPU_ENGINE = dict(device="cpu", dtype="float32", cuda_graphs=False)


def make_engine(path: str, **kw):
    from batchgen import Engine

    return Engine.from_pretrained(str(path), **{**CPU_ENGINE, **kw})


def greedy_params(max_new: list[int], **kw):
    from batchgen import SamplingParams

    return [SamplingParams(max_new_tokens=m, ignore_eos=True, **kw) for m in max_new]


def checkpoint_getter(request, tmp_path_factory):
    """family -> checkpoint path: conftest's tiny_checkpoint factory when it exists (not for gpt2),
    else `fallback_checkpoint` (tests/checkpoints.py with the small init)."""
    def get(family: str, **overrides) -> str:
        try:
            factory = request.getfixturevalue("tiny_checkpoint")
        except pytest_lookup_error():
            factory = None
        if factory is not None and family != "gpt2":
            try:
                return str(factory(family, **overrides))
            except (KeyError, ValueError):
                pass
        if overrides:
            import pytest

            pytest.skip(f"no tiny_checkpoint factory for {family} with {overrides}")
        global _FALLBACK_ROOT
        if _FALLBACK_ROOT is None:
            _FALLBACK_ROOT = str(tmp_path_factory.mktemp("engine_test_ckpts"))
        return fallback_checkpoint(family, _FALLBACK_ROOT)
    return get


_FALLBACK_ROOT: str | None = None


def pytest_lookup_error():
    import pytest

    return pytest.FixtureLookupError


# ----------------------------------------------------------------------------------------------
# Threads: tiny models run fastest single-threaded; with 2+ threads on a busy 2-core box torch's
# worker threads spin and a step gets ~10x slower. Tests use this around their work and restore.
# ----------------------------------------------------------------------------------------------


class single_thread:
    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)
        return False


# The engine settings of the family tests' scenarios (test_model_phi3 / gemma / moe)
FAMILY_SCENARIOS = {
    "one_batch": dict(max_num_seqs=256, max_batch_tokens=16384, kv_cache_tokens=16384),
    "max_seqs_3": dict(max_num_seqs=3, max_batch_tokens=16384, kv_cache_tokens=16384, prefix_caching=False),
    "chunked_prefill": dict(max_num_seqs=256, max_batch_tokens=64, kv_cache_tokens=16384),
    "preemption": dict(max_num_seqs=256, max_batch_tokens=4096, kv_cache_tokens=512),
    "prefix_cache": dict(max_num_seqs=4, max_batch_tokens=128, kv_cache_tokens=16384, prefix_caching=True),
}


def check_family_scenario(path: str, prompts: list[list[int]], max_new: list[int], scenario: str, label: str,
                          check_model=None) -> None:
    """One family test case: greedy tokens equal the transformers reference (near-ties tolerated) in the
    scenario's engine (prefix_cache: twice on one engine), and the scenario did what it names.
    check_model(engine) asserts the engine runs the family's implementation."""
    ref_results = cached_greedy(path, prompts, max_new)
    engine = make_engine(path, **FAMILY_SCENARIOS[scenario])
    try:
        if check_model is not None:
            check_model(engine)
        for _ in range(2 if scenario == "prefix_cache" else 1):
            outs = engine.generate(prompts, greedy_params(max_new))
            got = [list(o.outputs[0].token_ids) for o in outs]
            assert [len(g) for g in got] == max_new, label
            failures, ties = compare_greedy(get_reference(path), prompts, got, ref_results)
            if ties:
                print(f"{label}: tolerated near-ties: " + "; ".join(map(str, ties)))
            assert not failures, format_failures(failures, label)
        if scenario == "preemption":
            assert engine.stats.preemptions > 0, engine.stats
        if scenario == "prefix_cache":
            assert engine.stats.prefix_cache_hit_tokens > 0, engine.stats
    finally:
        engine.close()

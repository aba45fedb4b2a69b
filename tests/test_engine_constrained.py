"""Constrained decoding through llguidance (a real grammar engine), CPU float32.

SmolLM2-135M-Instruct on JSON schemas (required fields, enums, integer ranges, string patterns, arrays
with min/max items): every completion that ends "stop" validates. The tiny random checkpoint for the
engine mechanics: regex / choice / Lark grammar completions match, overlapped == synchronous under
preemption with n > 1, free rows of a mixed batch are untouched by the masks, bad constraints are the
request's own error.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402
from invariants import check_engine_idle  # noqa: E402

from batchgen import GenerationRequest, SamplingParams  # noqa: E402

pytest.importorskip("llguidance")

pytestmark = pytest.mark.usefixtures("one_thread")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "hobbies"],
    "additionalProperties": False,
}
LIST_GRAMMAR = 'start: "[" num ("," num)* "]"\nnum: /[0-9]{1,3}/'


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    path = str(tiny_checkpoint("llama"))
    eng = R.make_engine(path, max_num_seqs=8, kv_cache_tokens=2048, max_batch_tokens=256)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    eng = R.make_engine(str(smollm2_dir), max_num_seqs=8, kv_cache_tokens=8192)
    yield eng
    eng.close()


def chat(engine, text: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)


@pytest.mark.slow
def test_smollm2_json_schema_completions_validate(smol):
    jsonschema = pytest.importorskip("jsonschema")
    prompts = [chat(smol, f"Invent person number {i}: name, age, favourite color and hobbies, as JSON.") for i in range(4)]
    params = [SamplingParams(max_new_tokens=96, json_schema=PERSON),  # greedy
              SamplingParams(max_new_tokens=96, json_schema=json.dumps(PERSON), temperature=0.8, seed=3, n=2)]
    outs = smol.generate(prompts, [params[i % 2] for i in range(len(prompts))])
    done = [c for o in outs for c in o.outputs if c.finish_reason == "stop"]
    assert len(done) >= 4, [(c.finish_reason, c.text) for o in outs for c in o.outputs]
    for c in done:
        jsonschema.validate(json.loads(c.text), PERSON)  # 100% of the completed ones
    check_engine_idle(smol)


@pytest.mark.slow
def test_smollm2_regex_choice_and_grammar_match(smol):
    """The real model under a regex, a choice and a small Lark grammar: every stopped completion matches."""
    ask = [chat(smol, q) for q in ("When was the Eiffel Tower finished? Give the date.", "Is water wet? yes or no.",
                                   "List three small numbers.")]
    params = [SamplingParams(max_new_tokens=24, regex=r"(1[89]|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"),
              SamplingParams(max_new_tokens=8, choice=["yes", "no"], temperature=0.7, seed=5, n=3),
              SamplingParams(max_new_tokens=40, grammar=LIST_GRAMMAR)]
    outs = smol.generate(ask, params)
    pats = [r"(1[89]|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", r"yes|no", r"\[[0-9]{1,3}(,[0-9]{1,3})*\]"]
    for o, pat in zip(outs, pats):
        for c in o.outputs:
            assert c.finish_reason == "stop" and re.fullmatch(pat, c.text), (pat, c.finish_reason, c.text)


def test_regex_choice_and_lark_grammar_match(tiny):
    prompts = [[5 + i, 6, 7, 8] for i in range(6)]
    date = SamplingParams(max_new_tokens=40, regex=r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-2]\d", temperature=1.0, seed=1)
    pick = SamplingParams(max_new_tokens=40, choice=["yes", "no", 'say "maybe"'], temperature=1.0, seed=2, n=3)
    lark = SamplingParams(max_new_tokens=120, grammar=LIST_GRAMMAR, temperature=1.0, seed=4, n=2)
    outs = tiny.generate(prompts, [date, pick, lark] * 2)
    checks = {0: lambda t: re.fullmatch(r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-2]\d", t),
              1: lambda t: t in ("yes", "no", 'say "maybe"'),
              2: lambda t: re.fullmatch(r"\[[0-9]{1,3}(,[0-9]{1,3})*\]", t)}
    stopped = 0
    for i, o in enumerate(outs):
        for c in o.outputs:
            assert c.error is None
            if c.finish_reason == "stop":
                stopped += 1
                assert checks[i % 3](c.text), (i, c.text)
            else:  # cut by max_new_tokens: still a prefix the grammar allows
                assert i % 3 == 2 and c.text.startswith("["), (i, c.finish_reason, c.text)
    assert stopped >= 10


def test_free_rows_of_a_mixed_batch_are_untouched(tiny):
    free = [[9, 10, 11, 12], [13, 14, 15]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in tiny.generate(free, params)]
    mixed = tiny.generate(free + [[20, 21]] * 3, [params, params] + [SamplingParams(max_new_tokens=30, json_object=True)] * 3)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone


@pytest.mark.parametrize("seed", range(3))
def test_constrained_overlap_equals_sync_under_preemption(tiny_checkpoint, seed):
    import random

    rng = random.Random(seed)
    vocab, _ = R.model_info(str(tiny_checkpoint("llama")))
    kinds = [dict(json_object=True), dict(regex=r"[a-z ]{3,40}\."), dict(grammar=LIST_GRAMMAR), dict(choice=["alpha", "beta"]), {}]
    reqs = [GenerationRequest([rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))],
                              SamplingParams(max_new_tokens=rng.randint(8, 60), n=rng.choice([1, 2, 4]),
                                             temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(99),
                                             **rng.choice(kinds)), i)
            for i in range(16)]
    eng = R.make_engine(str(tiny_checkpoint("llama")), max_num_seqs=6, kv_cache_tokens=320, max_batch_tokens=48)
    try:
        results = []
        for overlap in (False, True):
            eng.overlap = overlap
            outs = sorted(eng.stream(reqs), key=lambda o: o.request_id)
            results.append([[(c.token_ids, c.finish_reason, c.error) for c in o.outputs] for o in outs])
            check_engine_idle(eng)
        assert eng.stats.preemptions > 0
        assert results[0] == results[1]
        assert all(err is None for r in results[0] for _, _, err in r)
    finally:
        eng.close()


@pytest.mark.parametrize("bad,words", [
    (dict(regex="[a-"), "invalid regex"),
    (dict(grammar="start: undefined_rule"), "invalid grammar"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "invalid json_schema"),
])
def test_bad_constraint_fails_its_request_only(tiny, bad, words):
    good = SamplingParams(max_new_tokens=5, ignore_eos=True)
    out_bad, out_good = tiny.generate([[5, 6], [5, 6]], [SamplingParams(max_new_tokens=5, **bad), good])
    assert out_bad.error and words in out_bad.error and "\n" not in out_bad.error, out_bad.error
    assert out_good.error is None and len(out_good.outputs[0].token_ids) == 5


def test_constraint_arguments_are_checked():
    with pytest.raises(ValueError, match="at most one"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(ValueError, match=r"choice\[1\]"):
        SamplingParams(choice=["a", ""])


def test_without_llguidance_the_request_says_so(tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails as if not installed
    eng = R.make_engine(str(tiny_checkpoint("llama")), max_num_seqs=2, kv_cache_tokens=256)
    try:
        (out,) = eng.generate([[5, 6]], SamplingParams(max_new_tokens=4, regex="a+"))
        assert "pip install llguidance" in out.error
    finally:
        eng.close()


def test_constraint_starts_after_the_reasoning_end_token(tiny):
    """reasoning_end: tokens are free up to and including that token (the reasoning section), constrained after.
    Greedy, so the free part equals the unconstrained completion token for token."""
    prompt = [7, 8, 9, 10]
    free = tiny.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    grammars = tiny._grammars
    pick = next((j, t) for j, t in enumerate(free) if j >= 2 and t not in free[:j]
                and grammars.tokenizer.tokenize_str(grammars.tokenizer.decode_str([t])) == [t])
    j, end = pick
    tag = grammars.tokenizer.decode_str([end])
    (out,) = tiny.generate([prompt], SamplingParams(max_new_tokens=30, regex="[0-9]{3}", reasoning_end=tag))
    c = out.outputs[0]
    assert c.token_ids[: j + 1] == free[: j + 1], "the reasoning section was constrained"
    assert c.finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}", tiny.tokenizer.decode(c.token_ids[j + 1:], skip_special_tokens=True)), c.text
    (bad,) = tiny.generate([prompt], SamplingParams(max_new_tokens=5, regex="a", reasoning_end="not one token at all"))
    assert "must be one" in bad.error

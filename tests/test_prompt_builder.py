"""Row -> prompt: template, system prompt, chat template on/off, messages, too-long policies, seeds."""
from __future__ import annotations

import io
from typing import Any

import pytest

from batchgen.pipeline.config import ConfigError, parse_job
from batchgen.pipeline.progress import Progress
from batchgen.pipeline.prompt.builder import Prompt, PromptBuilder
from batchgen.pipeline.prompt.seeds import row_seed


@pytest.fixture(scope="module")
def tok() -> Any:
    from conftest import build_tokenizer

    return build_tokenizer()


def build(b: PromptBuilder, row: dict) -> Prompt:
    """One row's prompt."""
    return b.build_many([row])[0]


def cfg(**prompt: Any) -> Any:
    pr = {"column": "prompt", **prompt}
    if "messages_column" in prompt:
        pr.pop("column")
    return parse_job({"model": {"path": "m"}, "input": {"files": ["x.jsonl"]}, "prompt": pr,
                      "sampling": {"max_new_tokens": 8}, "output": {"path": "o"}})


def test_template_and_system_with_chat_template(tok: Any) -> None:
    b = PromptBuilder(cfg(template="Translate to {lang}:\n{prompt}{missing}", system="Be brief."), tok)
    p = build(b, {"prompt": "hello", "lang": "French", "missing": None})
    assert p.error is None and p.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                          "Translate to French:\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert p.token_ids == list(tok(p.text, add_special_tokens=False)["input_ids"])
    assert p.n_tokens == len(p.token_ids)


def test_plain_text_and_messages_without_chat_template(tok: Any) -> None:
    b = PromptBuilder(cfg(chat_template=False, system="Sys."), tok)
    assert build(b, {"prompt": "hello"}).text == "Sys.\n\nhello"
    b = PromptBuilder(cfg(messages_column="m", chat_template=False), tok)
    p = build(b, {"m": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                       {"role": "user", "content": "again"}]})
    assert p.text == "user: hi\nassistant: yo\nuser: again\nassistant:"
    # a JSON string of messages works too; a system prompt is added unless there is one
    b = PromptBuilder(cfg(messages_column="m", system="S"), tok)
    p = build(b, {"m": '[{"role": "user", "content": "hi"}]'})
    assert p.text.startswith("<|im_start|>system\nS<|im_end|>")
    p = build(b, {"m": [{"role": "system", "content": "own"}, {"role": "user", "content": "hi"}]})
    assert p.text.count("system") == 1 and "own" in p.text


@pytest.mark.parametrize("value, msg", [
    (None, "is null"), ([], "non-empty list"), ("not json", "not a list"), ([{"role": "user"}], "not a {role, content}"),
    ([{"role": "user", "content": None}], "content is null"), ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": "  "}], "only empty messages"), ([1, 2], "not a {role, content}"),
])
def test_bad_messages_are_row_errors(tok: Any, value: Any, msg: str) -> None:
    b = PromptBuilder(cfg(messages_column="m"), tok)
    p = build(b, {"m": value})
    assert p.token_ids is None and msg in p.error


def test_chat_template_true_needs_one(tok: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(ConfigError, match="prompt.chat_template: true, but the tokenizer"):
        PromptBuilder(cfg(chat_template=True), plain)
    assert PromptBuilder(cfg(), plain).use_chat is False
    with pytest.raises(ConfigError, match="leaves no room"):
        PromptBuilder(cfg(), tok, max_model_len=8)


def test_truncate_keeps_the_template(tok: Any) -> None:
    b = PromptBuilder(cfg(template="Summarize:\n{prompt}\nEND", max_tokens=30, on_too_long="truncate"), tok)
    p = build(b, {"prompt": "the quick brown fox jumps over the lazy dog " * 20})
    assert p.error is None and p.truncated and len(p.token_ids) <= 30
    assert p.text.startswith("<|im_start|>user\nSummarize:\n") and p.text.endswith("\nEND<|im_end|>\n<|im_start|>assistant\n")
    b = PromptBuilder(cfg(template="{prompt}" + " padding" * 40, max_tokens=30, on_too_long="truncate"), tok)
    p = build(b, {"prompt": "x y z"})
    assert p.token_ids is None and "can't make it fit" in p.error
    b = PromptBuilder(cfg(max_tokens=10, on_too_long="error"), tok)
    p = build(b, {"prompt": "a b c d e f g h i j k l m n o p"})
    assert p.fatal and p.too_long and p.token_ids is None and "prompt limit of 10" in p.error


def test_batch_encoding_matches_the_tokenizer(tok: Any) -> None:
    b = PromptBuilder(cfg(chat_template=False), tok)
    rows = [{"prompt": t} for t in ["hello world", "What is the capital of France?", "ünïcödé ✓ 123", "a\n\nb"]]
    for p, r in zip(b.build_many(rows), rows):
        assert p.token_ids == list(tok(r["prompt"])["input_ids"])


def test_row_seed_is_stable_and_spread() -> None:
    assert row_seed(0, 5) == row_seed(0, 5) and 0 <= row_seed(0, 5) < 2**63
    assert row_seed(0, 5) != row_seed(1, 5) and row_seed(0, 5) != row_seed(0, "5")
    assert len({row_seed(0, i) for i in range(10000)}) == 10000
    assert (row_seed(3, "abc"), row_seed(0, 17)) == (8415079613424694264, 456770071202433185)  # pinned: resumes across versions


def test_progress_bar_mode() -> None:
    buf = io.StringIO()
    p = Progress(10, 2, mode="bar", stream=buf)
    p.start_clock()
    for _ in range(8):
        p.update(1, 5)
    p.close()
    out = buf.getvalue()
    assert "10/10" in out and "tok/s" in out
    assert p.out_tokens == 40 and p.done == 10


def test_messages_string_nested_too_deeply_is_a_row_error(tok: Any) -> None:
    """json.loads of a messages string raises RecursionError past ~1000 levels: a row error like
    any other bad messages value, not a crash of the job (issue 11, case 9)."""
    b = PromptBuilder(cfg(messages_column="m"), tok)
    p = build(b, {"m": "[" * 100_000 + "]" * 100_000})
    assert p.token_ids is None and "is a string, not a list of messages" in p.error


def test_source_error_rows_keep_their_reason(tok: Any) -> None:
    from batchgen.pipeline.source.base import RowOrigin, SourceRow

    b = PromptBuilder(cfg(), tok)
    why, origin = "in.jsonl:3: JSON nested too deeply to read", RowOrigin("in.jsonl", 2, 3)
    (p,) = b.build_many([SourceRow(0, 2, {}, why, origin)])
    assert p.token_ids is None and p.error == why
    # an error row keeps its reason next to a good row, which builds from its values
    bad, good = SourceRow(0, 2, {}, why, origin), SourceRow(1, 3, {"prompt": "hello"})
    p, q = b.build_many([bad, good])
    assert p.token_ids is None and p.error == why
    assert q.error is None and q.token_ids == build(b, {"prompt": "hello"}).token_ids


@pytest.mark.parametrize("policy", ["skip", "error", "truncate"])
def test_a_prompt_longer_than_any_fitting_one_is_not_tokenized_whole(tok: Any, policy: str) -> None:
    """A text of more characters than `limit` tokens can hold is too long however it tokenizes:
    skip/error say so without tokenizing it (a 60 MB prompt would take GBs); truncate tokenizes
    only its head and gives exactly the prompt that truncating the whole text gives."""
    b = PromptBuilder(cfg(max_tokens=20, on_too_long=policy), tok)
    assert b.max_chars is not None and b.max_chars >= 20 * 4
    seen: list[int] = []
    encode = b._encode_many
    b._encode_many = lambda texts, specials: seen.append(max(map(len, texts))) or encode(texts, specials)  # type: ignore[method-assign]
    text = "the quick brown fox " * (b.max_chars // 20 + 50)
    (p,) = b.build_many([{"prompt": text}])
    if policy != "truncate":
        assert p.token_ids is None and p.too_long and "not tokenized" in p.error and not seen
        assert p.fatal == (policy == "error")
        return
    assert max(seen) < b.max_chars + 200  # the head only (plus the chat markup)
    whole = PromptBuilder(cfg(max_tokens=20, on_too_long="truncate"), tok)
    whole.max_chars = None  # no guard: tokenize it all
    ref = build(whole, {"prompt": text})
    assert p.error is None and p.truncated and p.token_ids == ref.token_ids and p.text == ref.text


def test_chat_template_kwargs_reach_the_template() -> None:
    """prompt.chat_template_kwargs are the template's own switches (Qwen3's enable_thinking): a template that
    reads one renders differently with it."""
    from conftest import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    plain = build(PromptBuilder(cfg(), tok), {"prompt": "hi"}).text
    off = build(PromptBuilder(cfg(chat_template_kwargs={"enable_thinking": False}), tok), {"prompt": "hi"}).text
    assert plain == "hi" and off == "hi<think></think>"

"""Reasoning models: split a leading reasoning section (`<think>...</think>`) off a completion.

The tags come from the job (`output.reasoning_tags`) or from the tokenizer's chat template, which names
them for the models that have one (Qwen3, DeepSeek-R1 and their distillations write `<think>`). A
completion whose section never closed (cut by max_new_tokens) is all reasoning and no answer.
"""
from __future__ import annotations

from typing import Any

DEFAULT_TAGS = ("<think>", "</think>")


def reasoning_tags(tokenizer: Any) -> tuple[str, str] | None:
    """(open, close) tags the model's chat template uses, or None when it has no reasoning section."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates
        template = " ".join(str(t) for t in template.values())
    return DEFAULT_TAGS if DEFAULT_TAGS[1] in template else None


def split_reasoning(text: str, tags: tuple[str, str] = DEFAULT_TAGS) -> tuple[str | None, str]:
    """(reasoning, answer). The section may start right away or after the template already opened it (the
    prompt ends with the open tag, so the completion holds only its body and the close tag)."""
    open_tag, close_tag = tags
    body = text.lstrip()
    if body.startswith(open_tag):
        body = body[len(open_tag):]
    elif close_tag not in text:
        return None, text  # no reasoning section at all
    end = body.find(close_tag)
    if end < 0:
        return body.strip(), ""  # never closed: cut inside the reasoning
    return body[:end].strip(), body[end + len(close_tag):].lstrip()

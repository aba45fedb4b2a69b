"""Splitting a reasoning section off a completion."""
from __future__ import annotations

import pytest

from batchgen.pipeline.prompt.reasoning import reasoning_tags, split_reasoning


@pytest.mark.parametrize("text,want", [
    ("<think>a plan</think>\n\nThe answer.", ("a plan", "The answer.")),
    ("  <think>\nstep 1\nstep 2\n</think>42", ("step 1\nstep 2", "42")),
    ("opened by the template</think> yes", ("opened by the template", "yes")),
    ("<think>cut before the end", ("cut before the end", "")),
    ("no reasoning here", (None, "no reasoning here")),
    ("<think></think>just this", ("", "just this")),
    ("<think>a</think>b</think>c", ("a", "b</think>c")),  # only the first close tag ends the section
])
def test_split(text, want):
    assert split_reasoning(text) == want


def test_custom_tags_and_template_detection():
    assert split_reasoning("[R]why[/R]what", ("[R]", "[/R]")) == ("why", "what")

    class Tok:
        chat_template = "{% if enable_thinking %}<think>\n\n</think>{% endif %}"

    assert reasoning_tags(Tok()) == ("<think>", "</think>")
    Tok.chat_template = "{{ messages }}"
    assert reasoning_tags(Tok()) is None

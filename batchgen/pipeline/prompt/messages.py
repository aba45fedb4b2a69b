"""A row's chat messages: from prompt.messages_column, or prompt.column filled into
prompt.template; the system prompt added. A bad value is the row's error, never an exception."""
from __future__ import annotations

import json
import string
from typing import Any

from ..config import PromptSection


class _NoneAsEmpty(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        return "" if value is None else super().format_field(value, format_spec)


_FMT = _NoneAsEmpty()


def kind_of(v: Any) -> str:
    """What a value is, for a row's error message."""
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, str):
        return "a string"
    return type(v).__name__


def content_text(c: Any) -> str:
    """A message's content as plain text (the text parts of a list of parts)."""
    if isinstance(c, list):
        return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in c)
    return str(c)


def chars(msgs: list[dict]) -> int:
    """Characters of the messages' text contents."""
    return sum(len(m["content"]) for m in msgs if isinstance(m["content"], str))


def row_messages(pc: PromptSection, row: dict) -> tuple[list[dict] | None, str | None]:
    """The chat messages of a row, or (None, error)."""
    if pc.messages_column is not None:
        return _from_messages_column(pc, row.get(pc.messages_column))
    return _from_prompt_column(pc, row)


def _message_list(col: str, msgs: Any) -> tuple[Any, str | None]:
    """A messages column's value as a list (a JSON string decoded), or (None, error)."""
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for json
            return None, f"{col} is a string, not a list of messages"
    if msgs is None:
        return None, f"{col} is null"
    if hasattr(msgs, "tolist"):
        msgs = msgs.tolist()
    if not isinstance(msgs, (list, tuple)) or not msgs:
        return None, f"{col} must be a non-empty list of {{role, content}}, got {kind_of(msgs)}"
    return msgs, None


def _from_messages_column(pc: PromptSection, value: Any) -> tuple[list[dict] | None, str | None]:
    col = pc.messages_column
    assert col is not None
    msgs, err = _message_list(col, value)
    if err is not None:
        return None, err
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            return None, f"{col}[{i}] is not a {{role, content}} mapping"
        content = m["content"]
        if content is None:
            return None, f"{col}[{i}].content is null"
        if not isinstance(content, (str, list)):
            return None, f"{col}[{i}].content must be a string, got {kind_of(content)}"
        out.append({"role": m["role"], "content": content})
    if pc.system is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": pc.system})
    if not any(isinstance(m["content"], list) or m["content"].strip() for m in out if m["role"] != "system"):
        return None, f"{col} has only empty messages"
    return out, None


def _from_prompt_column(pc: PromptSection, row: dict) -> tuple[list[dict] | None, str | None]:
    value = row.get(pc.column)  # type: ignore[arg-type]
    if value is None:
        return None, f"prompt column '{pc.column}' is null"
    if not isinstance(value, str):
        return None, f"prompt column '{pc.column}' must be a string, got {kind_of(value)}"
    if not value.strip():
        return None, f"prompt column '{pc.column}' is empty"
    if pc.template is not None:
        try:
            value = _FMT.format(pc.template, **row)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
            return None, f"prompt.template can't be filled from this row: {type(e).__name__}: {e}"
    msgs = [{"role": "user", "content": value}]
    if pc.system is not None:
        msgs.insert(0, {"role": "system", "content": pc.system})
    return msgs, None

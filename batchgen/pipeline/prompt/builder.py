"""Row -> prompt token ids: template, system prompt, chat template, the too-long policy.

`PromptBuilder.build_many(rows)` never raises for bad data: each row's `Prompt` says what is
wrong with it in `error` (null/empty/non-string prompt, malformed messages, too long with
on_too_long: skip); with on_too_long: error a too-long prompt has `fatal` set: the job stops
at that row. A prompt whose text is longer than any prompt of `limit` tokens can be
(`max_chars`) is not tokenized whole: it is too long however it tokenizes (truncate: only its
head is tokenized).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..config import ConfigError, JobConfig
from ..source.base import SourceRow
from ..source.describe import first_line
from .messages import chars, content_text, row_messages


@dataclass
class Prompt:
    token_ids: list[int] | None
    text: str | None = None  # the rendered prompt (for --dry-run and error messages)
    error: str | None = None
    truncated: bool = False
    too_long: bool = False
    n_tokens: int | None = None  # prompt tokens (also for a too-long prompt)
    fatal: bool = False  # on_too_long: error: the job must stop at this row


@dataclass
class _Rendered:
    """A row's prompt rendered to text, waiting to be tokenized with its batch."""

    i: int  # the row's place in the batch
    msgs: list[dict]
    text: str
    specials: bool  # the text already holds the special tokens


def max_chars(tok: Any, limit: int) -> int | None:
    """More characters than any prompt of `limit` tokens has: a token stands for at most as many
    characters as the longest string in the vocabulary (byte-level vocabularies: bytes, which are
    at least as many as characters), x4 for normalizers that merge characters. None: unknown."""
    try:
        longest = max((len(t) for t in tok.get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: always tokenize
        return None
    return limit * longest * 4 if longest else None


def prompt_limit(cfg: JobConfig, max_model_len: int | None) -> int:
    """The longest prompt: prompt.max_tokens, and room for max_new_tokens in the model's context."""
    limit = cfg.prompt.max_tokens
    if max_model_len:
        room = max_model_len - cfg.sampling.max_new_tokens
        if room < 1:
            raise ConfigError(
                f"{cfg.source_path}: sampling.max_new_tokens: {cfg.sampling.max_new_tokens} leaves no room "
                f"for a prompt in the model's context of {max_model_len} tokens"
            )
        limit = min(limit, room)
    return limit


class PromptBuilder:
    def __init__(self, cfg: JobConfig, tokenizer: Any, max_model_len: int | None = None) -> None:
        self.cfg = cfg
        self.pc = cfg.prompt
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        ct = self.pc.chat_template
        if ct is True and not has_template:
            raise ConfigError(
                f"{cfg.source_path}: prompt.chat_template: true, but the tokenizer of '{cfg.model.path}' has no chat template"
            )
        self.use_chat = has_template if ct == "auto" else bool(ct)
        self.limit = prompt_limit(cfg, max_model_len)
        self.max_chars = max_chars(tokenizer, self.limit)

    # ------------------------------------------------------------------ rendering
    def _messages(self, row: dict) -> tuple[list[dict] | None, str | None]:
        """The chat messages of a row, or (None, error)."""
        return row_messages(self.pc, row)

    def render(self, msgs: list[dict]) -> tuple[str, bool]:
        """(prompt text, whether it already holds the special tokens)."""
        if self.use_chat:
            # prompt.chat_template_kwargs: the template's own switches (enable_thinking: false for Qwen3, ...)
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                **self.pc.chat_template_kwargs)
            return text, True
        if self.pc.messages_column is None:
            parts = [m["content"] for m in msgs]
            return "\n\n".join(parts), False
        lines = [f"{m['role']}: {content_text(m['content'])}" for m in msgs]
        return "\n".join(lines) + "\nassistant:", False

    def _encode(self, text: str, has_specials: bool) -> list[int]:
        return self._encode_many([text], has_specials)[0]

    def _encode_many(self, texts: list[str], has_specials: bool) -> list[list[int]]:
        """Tokenize a batch: the Rust backend's encode_batch when there is one (what a fast
        tokenizer's __call__ does, without its per-call overhead), else one by one."""
        backend = getattr(self.tok, "backend_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
        if backend is not None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=not has_specials)]
        return [list(self.tok(t, add_special_tokens=not has_specials)["input_ids"]) for t in texts]

    # ------------------------------------------------------------------ building
    def build_many(self, rows: Sequence[dict | SourceRow]) -> list[Prompt]:
        """Prompts for a batch of rows (a row's values as a dict, or SourceRows: an error row's
        Prompt is its error), tokenized together; never raises for a row's data (on_too_long:
        error gives a Prompt with fatal=True)."""
        out: list[Prompt | None] = [None] * len(rows)
        values: list[dict] = []  # a row cut for truncation replaces its entry here, not in the caller's
        todo: list[_Rendered] = []
        for i, row in enumerate(rows):
            v, got = self._prepare(i, row)
            values.append(v)
            if isinstance(got, Prompt):
                out[i] = got
            else:
                todo.append(got)
        for specials in (False, True):
            group = [t for t in todo if t.specials is specials]
            if group:
                self._tokenize(group, values, out)
        return out  # type: ignore[return-value]

    def _prepare(self, i: int, row: dict | SourceRow) -> tuple[dict, Prompt | _Rendered]:
        """(the row's values, and its Prompt when that is known before tokenizing (an error row,
        bad messages, too many characters, a failed rendering), else its rendering)."""
        if isinstance(row, SourceRow):
            if row.error is not None:
                return {}, Prompt(None, error=row.error)
            row = row.values
        msgs, err = self._messages(row)
        if err is not None:
            return row, Prompt(None, error=err)
        assert msgs is not None
        if self.max_chars is not None and chars(msgs) > self.max_chars:
            if self.pc.on_too_long != "truncate":
                return row, self._too_many_chars(msgs)
            row, msgs = self._cut(row, msgs)
        try:
            text, specials = self.render(msgs)
        except Exception as e:  # noqa: BLE001 - a template error is this row's problem
            return row, Prompt(None, error=f"can't render the prompt: {type(e).__name__}: {first_line(e)}")
        return row, _Rendered(i, msgs, text, specials)

    def _tokenize(self, group: list[_Rendered], values: list[dict], out: list[Prompt | None]) -> None:
        """Tokenize renderings that agree on special tokens; a failing batch is tried row by row."""
        specials = group[0].specials
        try:
            encoded: list[Any] = self._encode_many([t.text for t in group], specials)
        except Exception:  # noqa: BLE001 - find the row that fails, one by one
            encoded = []
            for t in group:
                try:
                    encoded.append(self._encode(t.text, specials))
                except Exception as e:  # noqa: BLE001
                    encoded.append(e)
        for t, ids in zip(group, encoded):
            if isinstance(ids, Exception):
                out[t.i] = Prompt(None, text=t.text,
                                  error=f"can't tokenize the prompt: {type(ids).__name__}: {first_line(ids)}")
            else:
                out[t.i] = self._check_len(values[t.i], t.msgs, t.text, list(ids))

    # ------------------------------------------------------------------ too long
    def _too_many_chars(self, msgs: list[dict]) -> Prompt:
        n = chars(msgs)
        fatal = self.pc.on_too_long == "error"
        why = (f"{n:,} characters can't fit in {self.limit} tokens (not tokenized)"
               if fatal else f"prompt too long: {n:,} characters can't fit in {self.limit} tokens "
               f"(on_too_long: skip; not tokenized)")
        return Prompt(None, too_long=True, fatal=fatal, error=why)

    def _cut(self, row: dict, msgs: list[dict]) -> tuple[dict, list[dict]]:
        """For on_too_long: truncate: every text cut to max_chars characters, which is still more
        than the limit in tokens, so truncating gives the same prompt as the whole text would."""
        m = self.max_chars or 0
        if self.pc.column is not None:
            row = {**row, self.pc.column: row[self.pc.column][:m]}
            cut, _ = self._messages(row)
            return row, cut if cut is not None else msgs
        return row, [{**x, "content": x["content"][:m]} if isinstance(x["content"], str) else x for x in msgs]

    def _check_len(self, row: dict, msgs: list[dict], text: str, ids: list[int]) -> Prompt:
        if not ids:
            return Prompt(None, text=text, error="the prompt is empty after tokenization")
        if len(ids) <= self.limit:
            return Prompt(ids, text=text, n_tokens=len(ids))
        n = len(ids)
        policy = self.pc.on_too_long
        if policy == "error":
            return Prompt(None, text=text, n_tokens=n, too_long=True, fatal=True,
                          error=f"{n} tokens > prompt limit of {self.limit}")
        if policy == "skip":
            return Prompt(None, text=text, n_tokens=n, too_long=True,
                          error=f"prompt too long: {n} tokens > limit of {self.limit} (on_too_long: skip)")
        return self._truncate(row, msgs, n, text)

    def _truncate(self, row: dict, msgs: list[dict], n: int, text: str) -> Prompt:
        """Cut the end of the prompt text until the rendered prompt fits: the prompt column's
        value (before the template, so the template's own text stays whole), or the longest
        non-system message. The chat markup stays whole."""
        if self.pc.column is not None:
            content = row[self.pc.column]
            remake = self._remake_column(row)
        else:
            idx = max(
                (i for i, m in enumerate(msgs) if isinstance(m["content"], str) and m["role"] != "system"),
                key=lambda i: len(msgs[i]["content"]),
                default=None,
            )
            if idx is None:
                return Prompt(None, text=text, n_tokens=n, too_long=True,
                              error=f"prompt too long: {n} tokens > limit of {self.limit} and nothing to truncate")
            content = msgs[idx]["content"]
            remake = _remake_message(msgs, idx)
        c_ids = list(self.tok(content, add_special_tokens=False)["input_ids"])
        over = n - self.limit
        for _ in range(6):
            keep = len(c_ids) - over
            if keep <= 0:
                break
            try:
                new_msgs = remake(self.tok.decode(c_ids[:keep], skip_special_tokens=True))
            except ValueError:
                break
            text, specials = self.render(new_msgs)
            ids = self._encode(text, specials)
            if len(ids) <= self.limit:
                return Prompt(ids, text=text, n_tokens=len(ids), truncated=True)
            over += len(ids) - self.limit + 1
        return Prompt(None, text=text, n_tokens=n, too_long=True,
                      error=f"prompt too long: {n} tokens > limit of {self.limit}, and truncating the text can't make it fit")

    def _remake_column(self, row: dict) -> Any:
        """cut prompt column text -> the row's messages (ValueError when nothing is left)."""
        col = self.pc.column

        def remake(cut: str) -> list[dict]:
            m, err = self._messages({**row, col: cut})  # type: ignore[misc]
            if m is None:  # e.g. cut down to nothing
                raise ValueError(err)
            return m
        return remake


def _remake_message(msgs: list[dict], idx: int) -> Any:
    """cut text -> the messages with message idx's content replaced by it."""
    def remake(cut: str) -> list[dict]:
        m = [dict(x) for x in msgs]
        m[idx]["content"] = cut
        return m
    return remake

"""Row -> prompt token ids: template, system prompt, chat template, the too-long policy.

`PromptBuilder.build(row)` never raises for bad data: it returns a `Prompt` whose `error` says
what is wrong with the row (null/empty/non-string prompt, malformed messages, too long with
on_too_long: skip). on_too_long: error raises `PromptTooLong`, which stops the job.
A prompt whose text is longer than any prompt of `limit` tokens can be (`max_chars`) is not
tokenized whole: it is too long however it tokenizes (truncate: only its head is tokenized).
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, JobConfig
from .sources import ROW_ERROR


class PromptTooLong(RuntimeError):
    """on_too_long: error and a prompt is over the limit: the job stops."""


@dataclass
class Prompt:
    token_ids: list[int] | None
    text: str | None = None  # the rendered prompt (for --dry-run and error messages)
    error: str | None = None
    truncated: bool = False
    too_long: bool = False
    n_tokens: int | None = None  # prompt tokens (also for a too-long prompt)
    fatal: bool = False  # on_too_long: error: the job must stop at this row


class _NoneAsEmpty(string.Formatter):
    def format_field(self, value: Any, format_spec: str) -> Any:
        return "" if value is None else super().format_field(value, format_spec)


_FMT = _NoneAsEmpty()


def load_tokenizer(cfg: JobConfig) -> Any:
    """The model's tokenizer, without loading the model. ConfigError when the model is missing."""
    path = model_location(cfg)
    try:
        from .engine import model_source
    except ImportError:  # pragma: no cover - engine package not there yet
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    try:
        return model_source.load_tokenizer(str(path))
    except model_source.ModelSourceError as e:
        raise ConfigError(f"{cfg.source_path}: model.path: {e}") from None
    except OSError as e:
        raise ConfigError(f"{cfg.source_path}: model.path: can't load a tokenizer from '{cfg.model.path}': {_first_line(e)}") from None


def model_location(cfg: JobConfig) -> str:
    """model.path as the loader should see it: a local path resolved against the job file's
    directory when it exists there, else the value unchanged (alias or hub id). Raises
    ConfigError for a path that clearly names a local file or directory that is missing."""
    from .config import resolve_path

    value = cfg.model.path
    try:
        from .engine.model_source import ALIASES
    except ImportError:  # pragma: no cover
        ALIASES = {}
    if value in ALIASES:
        return value
    p = resolve_path(cfg, value, must_exist=True)
    if p.exists():
        return str(p)
    looks_local = (
        value.startswith(("/", "./", "../", "~"))
        or value.endswith(".gguf")
        or value.count("/") > 1
        or "\\" in value
    )
    if looks_local:
        raise ConfigError(f"{cfg.source_path}: model.path: no such file or directory: {p}")
    return value


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


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
        # longest prompt: prompt.max_tokens, and room for max_new_tokens in the model's context
        limit = self.pc.max_tokens
        if max_model_len:
            room = max_model_len - cfg.sampling.max_new_tokens
            if room < 1:
                raise ConfigError(
                    f"{cfg.source_path}: sampling.max_new_tokens: {cfg.sampling.max_new_tokens} leaves no room "
                    f"for a prompt in the model's context of {max_model_len} tokens"
                )
            limit = min(limit, room)
        self.limit = limit
        self.max_chars = _max_chars(tokenizer, limit)

    # ------------------------------------------------------------------ rendering
    def _messages(self, row: dict) -> tuple[list[dict] | None, str | None]:
        """The chat messages of a row, or (None, error)."""
        pc = self.pc
        if pc.messages_column is not None:
            msgs = row.get(pc.messages_column)
            if isinstance(msgs, str):
                try:
                    msgs = json.loads(msgs)
                except (ValueError, RecursionError):  # RecursionError: nested too deeply for json
                    return None, f"{pc.messages_column} is a string, not a list of messages"
            if msgs is None:
                return None, f"{pc.messages_column} is null"
            if hasattr(msgs, "tolist"):
                msgs = msgs.tolist()
            if not isinstance(msgs, (list, tuple)) or not msgs:
                return None, f"{pc.messages_column} must be a non-empty list of {{role, content}}, got {_kind_of(msgs)}"
            out = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                    return None, f"{pc.messages_column}[{i}] is not a {{role, content}} mapping"
                content = m["content"]
                if content is None:
                    return None, f"{pc.messages_column}[{i}].content is null"
                if not isinstance(content, (str, list)):
                    return None, f"{pc.messages_column}[{i}].content must be a string, got {_kind_of(content)}"
                out.append({"role": m["role"], "content": content})
            if pc.system is not None and out[0]["role"] != "system":
                out.insert(0, {"role": "system", "content": pc.system})
            if not any(isinstance(m["content"], list) or m["content"].strip() for m in out if m["role"] != "system"):
                return None, f"{pc.messages_column} has only empty messages"
            return out, None
        value = row.get(pc.column)  # type: ignore[arg-type]
        if value is None:
            return None, f"prompt column '{pc.column}' is null"
        if not isinstance(value, str):
            return None, f"prompt column '{pc.column}' must be a string, got {_kind_of(value)}"
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
        lines = [f"{m['role']}: {_content_text(m['content'])}" for m in msgs]
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

    def build(self, row: dict) -> Prompt:
        """One row's prompt; raises PromptTooLong for a too-long prompt with on_too_long: error."""
        p = self.build_many([row])[0]
        if p.fatal:
            raise PromptTooLong(p.error or "prompt too long")
        return p

    def build_many(self, rows: list[dict]) -> list[Prompt]:
        """Prompts for a batch of rows (tokenized together); never raises for a row's data
        (on_too_long: error gives a Prompt with fatal=True)."""
        out: list[Prompt | None] = [None] * len(rows)
        rows = list(rows)  # a row cut for truncation replaces its entry here, not in the caller's list
        todo: list[tuple[int, list[dict], str, bool]] = []
        for i, row in enumerate(rows):
            if ROW_ERROR in row:
                out[i] = Prompt(None, error=row[ROW_ERROR])
                continue
            msgs, err = self._messages(row)
            if err is not None:
                out[i] = Prompt(None, error=err)
                continue
            assert msgs is not None
            if self.max_chars is not None and _chars(msgs) > self.max_chars:
                if self.pc.on_too_long != "truncate":
                    out[i] = self._too_many_chars(msgs)
                    continue
                row, msgs = self._cut(row, msgs)
                rows[i] = row
            try:
                text, specials = self.render(msgs)
            except Exception as e:  # noqa: BLE001 - a template error is this row's problem
                out[i] = Prompt(None, error=f"can't render the prompt: {type(e).__name__}: {_first_line(e)}")
                continue
            todo.append((i, msgs, text, specials))
        for specials in (False, True):
            group = [t for t in todo if t[3] is specials]
            if not group:
                continue
            try:
                encoded = self._encode_many([t[2] for t in group], specials)
            except Exception:  # noqa: BLE001 - find the row that fails, one by one
                encoded = []
                for t in group:
                    try:
                        encoded.append(self._encode(t[2], specials))
                    except Exception as e:  # noqa: BLE001
                        encoded.append(e)  # type: ignore[arg-type]
            for (i, msgs, text, _), ids in zip(group, encoded):
                if isinstance(ids, Exception):
                    out[i] = Prompt(None, text=text, error=f"can't tokenize the prompt: {type(ids).__name__}: {_first_line(ids)}")
                else:
                    out[i] = self._check_len(rows[i], msgs, text, list(ids))
        return out  # type: ignore[return-value]

    def _too_many_chars(self, msgs: list[dict]) -> Prompt:
        n = _chars(msgs)
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
            cut, err = self._messages(row)
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

            def remake(cut: str) -> list[dict]:
                m, err = self._messages({**row, self.pc.column: cut})
                if m is None:  # e.g. cut down to nothing
                    raise ValueError(err)
                return m
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

            def remake(cut: str) -> list[dict]:
                m = [dict(x) for x in msgs]
                m[idx]["content"] = cut
                return m
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


def _max_chars(tok: Any, limit: int) -> int | None:
    """More characters than any prompt of `limit` tokens has: a token stands for at most as many
    characters as the longest string in the vocabulary (byte-level vocabularies: bytes, which are
    at least as many as characters), x4 for normalizers that merge characters. None: unknown."""
    try:
        longest = max((len(t) for t in tok.get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab: always tokenize
        return None
    return limit * longest * 4 if longest else None


def _chars(msgs: list[dict]) -> int:
    return sum(len(m["content"]) for m in msgs if isinstance(m["content"], str))


def _content_text(c: Any) -> str:
    if isinstance(c, list):
        return " ".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in c)
    return str(c)


def _kind_of(v: Any) -> str:
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


def row_seed(job_seed: int, row_id: Any) -> int:
    """The per-row sampling seed: a stable hash of (job seed, id); the engine derives sample j
    from (seed, j), so (job seed, id, sample_index) fixes each sample's random stream."""
    import hashlib

    tag = "i" if isinstance(row_id, int) and not isinstance(row_id, bool) else "s"
    key = f"{job_seed}\0{tag}\0{row_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)

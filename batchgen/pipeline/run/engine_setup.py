"""The engine and tokenizer of a job, from its config (torch and the engine are imported only here)."""
from __future__ import annotations

from typing import Any

from ..config import ConfigError, JobConfig, engine_kwargs
from ..prompt.tokenizer import load_tokenizer, model_location


def make_engine(cfg: JobConfig) -> Any:
    """Load the engine for a job: the arguments preflight checked."""
    from ...engine.engine import Engine

    return Engine.from_pretrained(model_location(cfg), **engine_kwargs(cfg))


def job_tokenizer(cfg: JobConfig, tokenizer: Any = None, engine: Any = None) -> Any:
    """The tokenizer given, else the given engine's, else the model's (loaded before the model, so a
    bad model path or chat template fails before the weights load)."""
    if tokenizer is None and engine is not None:
        tokenizer = getattr(engine, "tokenizer", None)
    return tokenizer if tokenizer is not None else load_tokenizer(cfg)


def model_source_error(e: BaseException) -> str | None:
    """The one-line reason when the model could not be found or read (not an engine failure)."""
    from ...engine.model_source import ModelSourceError

    return str(e) if isinstance(e, ModelSourceError) else None


def model_context(cfg: JobConfig) -> int | None:
    """The model's context length from its config.json, without loading weights: a local directory's,
    an alias's or a converted GGUF's, a hub model's from the local cache (None when unknown, e.g. a
    GGUF not converted yet)."""
    from ...engine.model_source import ModelSourceError, peek_config

    try:
        n = peek_config(model_location(cfg)).get("max_position_embeddings")
        return int(n) if n else None
    except (ConfigError, ModelSourceError, OSError, ValueError, TypeError):
        return None

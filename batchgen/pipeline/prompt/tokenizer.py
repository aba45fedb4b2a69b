"""The model's tokenizer, loaded without the model, and where model.path points."""
from __future__ import annotations

from typing import Any

from ..config import ConfigError, JobConfig, resolve_path
from ..source.describe import first_line


def load_tokenizer(cfg: JobConfig) -> Any:
    """The model's tokenizer, without loading the model. ConfigError when the model is missing."""
    from ...engine import model_source  # lazily: the engine package imports torch

    path = model_location(cfg)
    try:
        return model_source.load_tokenizer(str(path))
    except model_source.ModelSourceError as e:
        raise ConfigError(f"{cfg.source_path}: model.path: {e}") from None
    except OSError as e:
        raise ConfigError(f"{cfg.source_path}: model.path: can't load a tokenizer from '{cfg.model.path}': "
                          f"{first_line(e)}") from None


def model_location(cfg: JobConfig) -> str:
    """model.path as the loader should see it: a local path resolved against the job file's
    directory when it exists there, else the value unchanged (alias or hub id). Raises
    ConfigError for a path that clearly names a local file or directory that is missing."""
    from ...engine.model_source import ALIASES

    value = cfg.model.path
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

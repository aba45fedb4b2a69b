"""Shared fixtures: tiny random-weight checkpoints of each family (built by tests/checkpoints.py,
cached per session), one torch thread per module, and SmolLM2.

The builder's names stay importable from here (`from conftest import build_tokenizer`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from checkpoints import (  # noqa: F401 - re-exported for the test files
    CHAT_TEMPLATE,
    EOS_ID,
    FAMILIES,
    SPECIAL_TOKENS,
    build_checkpoint,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole module (pytestmark = pytest.mark.usefixtures("one_thread")):
    fast on a shared 2-core box, and one float reduction order for the engine and its reference."""
    from reference import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: tiny_checkpoint("qwen3") -> Path of a tiny HF checkpoint (built once per session
    per (family, seed, overrides)). Families: llama, llama3.1, mistral, qwen2, qwen3, smollm2
    (and gpt2, which the engine refuses)."""
    cache: dict[tuple[Any, ...], Path] = {}

    def make(family: str, seed: int = 0, **overrides: Any) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
        key = (family, seed, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_checkpoint(family, out, seed=seed, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized to a float32 HF directory (cached across runs)."""
    from batchgen.engine.model_source import ModelSourceError, resolve_model_dir

    try:
        from batchgen.engine.model_source import alias_gguf

        alias_gguf("smollm2-135m-instruct")
    except ModelSourceError as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    return resolve_model_dir("smollm2-135m-instruct")

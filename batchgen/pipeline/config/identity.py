"""What a job is (its identity and fingerprint) and where its files are (paths from the job file)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .sections import JobConfig


def resolve_path(cfg: JobConfig, value: str, *, must_exist: bool = False) -> Path:
    """A path from the job file: absolute, ~, or relative to the job file's directory
    (falling back to the current directory when must_exist and only that one exists)."""
    p = Path(os.path.expandvars(value)).expanduser()
    if p.is_absolute():
        return p
    first = Path(cfg.base_dir) / p
    if must_exist and not first.exists() and not any(ch in value for ch in "*?[") and p.exists():
        return p.resolve()
    return first


def output_dir(cfg: JobConfig) -> Path:
    return resolve_path(cfg, cfg.output.path).resolve()


def job_identity(cfg: JobConfig) -> dict[str, Any]:
    """What defines the output: model, prompt, sampling and the input (limit excluded: raising it
    extends a job; output and engine settings excluded: they don't change what is generated, except
    engine.kv_cache_dtype when it is not auto)."""
    inp = asdict(cfg.input)
    inp.pop("limit", None)
    inp.pop("streaming", None)
    model = asdict(cfg.model)
    if model.get("quantization") is None:  # unquantized: the identity (and fingerprint) of jobs from before the key
        model.pop("quantization", None)
    if not model.get("quantize_lm_head"):  # the default: the identity of jobs from before the key
        model.pop("quantize_lm_head", None)
    identity = {
        "model": model,
        "input": inp,
        "prompt": asdict(cfg.prompt),
        "sampling": asdict(cfg.sampling),
    }
    if cfg.engine.kv_cache_dtype != "auto":  # an FP8 (or other) KV cache changes the numbers; auto keeps old jobs'
        identity["engine"] = {"kv_cache_dtype": cfg.engine.kv_cache_dtype}
    return identity


def job_fingerprint(cfg: JobConfig) -> str:
    blob = json.dumps(job_identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()

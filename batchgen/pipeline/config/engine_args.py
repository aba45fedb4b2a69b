"""The engine's arguments built from the job's sections by field name, and the engine's own argument
errors turned into job-file errors that name the key.

`engine_kwargs(cfg)`: every parameter of the Engine constructor (engine.validation.check_engine_args
has its signature and needs no torch) that a section has a field of that name for, looked up in
ENGINE_ARG_SECTIONS order (dtype and quantization come from model, seed from sampling). `sampling_kwargs(section)`:
every SamplingParams field the sampling section has, except the constraint keys (at most one of them
applies, and json_schema_column replaces it per row: request_params builds that part).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from ...engine import validation as engine_rules
from .errors import ConfigError
from .sections import SECTIONS, JobConfig, SamplingSection

ENGINE_ARG_SECTIONS = ("engine", "model", "sampling")  # where an Engine argument is looked up, in order
# the structured-output keys: at most one is given (sampling.json_schema_column: a per-row json_schema)
CONSTRAINT_KEYS = ("json_schema", "json_object", "regex", "choice", "grammar", "json_schema_column")
_ENGINE_MESSAGE = re.compile(r"(SamplingParams\.|Engine: )([a-z_]+)(\[\d+\])?(.*)", re.S)


def engine_arg_keys() -> dict[str, str]:
    """Engine argument -> the job-file key it comes from ("seed" -> "sampling.seed")."""
    names = {sec: {f.name for f in dataclasses.fields(SECTIONS[sec])} for sec in ENGINE_ARG_SECTIONS}
    out = {}
    for param in inspect.signature(engine_rules.check_engine_args).parameters:
        sec = next((s for s in ENGINE_ARG_SECTIONS if param in names[s]), None)
        if sec is not None:
            out[param] = f"{sec}.{param}"
    return out


def engine_kwargs(cfg: JobConfig) -> dict[str, Any]:
    """The Engine arguments a job gives (job.make_engine's, without the model path)."""
    out = {}
    for param, key in engine_arg_keys().items():
        sec, name = key.split(".")
        out[param] = getattr(getattr(cfg, sec), name)
    return out


def sampling_kwargs(section: SamplingSection) -> dict[str, Any]:
    """The SamplingParams arguments the sampling section gives, lists copied, constraints left out
    (request_params adds the row's seed, per-row values and the constraint)."""
    from ...engine.request import SamplingParams  # torch-free

    ours = {f.name for f in dataclasses.fields(section)} - set(CONSTRAINT_KEYS)
    out = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name in ours:
            value = getattr(section, f.name)
            out[f.name] = list(value) if isinstance(value, list) else value
    return out


def engine_error_key(message: str) -> tuple[str, str]:
    """An EngineArgumentError's text -> (job file key, what is wrong):
    "SamplingParams.top_k must be ..." -> ("sampling.top_k", "must be ...")."""
    m = _ENGINE_MESSAGE.match(message)
    if m is None:
        return "engine", message
    prefix, name, index, rest = m.groups()
    key = "sampling." + name if prefix.startswith("Sampling") else engine_arg_keys().get(name, "engine." + name)
    rest = rest.strip()
    if not rest.startswith("must"):  # "kv_cache_tokens=1 is smaller than ...", "device 'cuda' needs CUDA ..."
        rest = message[len(prefix):]
    return key + (index or ""), rest


def engine_config_error(cfg: JobConfig, error: BaseException) -> ConfigError:
    """The one-line job-file error for an EngineArgumentError the engine raised for this job."""
    key, msg = engine_error_key(str(error).splitlines()[0] if str(error) else type(error).__name__)
    return ConfigError(f"{cfg.where(key.split('[', 1)[0])}: {key}: {msg}")


def engine_checks(cfg: JobConfig) -> None:
    """The sampling section through the engine's own SamplingParams checks, and the Engine
    arguments that need no torch (block_size, kv_cache_tokens, quantize_lm_head; the rest are checked by the rules
    with the same bounds, device/dtype/attention by name; preflight() runs the full check_engine_args)."""
    from ...engine.request import SamplingParams

    try:
        SamplingParams(**sampling_kwargs(cfg.sampling))
        engine_rules._check_block_size(cfg.engine.block_size)
        engine_rules._check_kv_cache_tokens(cfg.engine.kv_cache_tokens, cfg.engine.block_size)
        engine_rules.check_quantize_lm_head(cfg.model.quantize_lm_head, cfg.model.quantization)
    except engine_rules.EngineArgumentError as e:
        raise engine_config_error(cfg, e) from None

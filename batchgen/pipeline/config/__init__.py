"""The job file: load YAML, check every key, and say clearly what is wrong.

A job file has the sections model, input, prompt, sampling, output, engine and the scalar
cost_per_hour (see jobs/example.yaml). `load_job(path)` returns a `JobConfig` whose sections are
plain dataclasses (sections.py: each key's type, default, rule and description in one field), or
raises `ConfigError` with one line that names the file, the line, the key and what is wrong.
Nothing here imports torch or datasets; the engine's torch-free argument checks are used.

    rules.py       Rule, setting(): what a key may hold, kept in the field's metadata
    sections.py    the section dataclasses and JobConfig
    yaml_lines.py  YAML that remembers each key's line
    values.py      one value against its rule
    overrides.py   --set section.key=value
    parse.py       load_job, parse_job
    checks.py      checks across keys (input / prompt sources, structured output, columns)
    engine_args.py Engine and SamplingParams arguments from the sections, by field; engine errors -> keys
    preflight.py   output path, attention backend, device: before the model loads
    identity.py    job_identity / job_fingerprint, resolve_path, output_dir
    templates.py   template_fields (prompt.template)

Relative paths (input files, a local dataset or model directory, output.path) are resolved
against the job file's directory; for inputs and the model, when nothing exists there, against
the current directory.
"""
from __future__ import annotations

from .checks import PER_ROW_KEYS, constraint_problem
from .engine_args import CONSTRAINT_KEYS, engine_config_error, engine_error_key, engine_kwargs, sampling_kwargs
from .errors import ConfigError
from .identity import job_fingerprint, job_identity, output_dir, resolve_path
from .overrides import apply_overrides
from .parse import load_job, parse_job
from .preflight import preflight
from .rules import REQUIRED, Rule, rule_of, setting
from .sections import (
    SECTIONS,
    TOP_SCALARS,
    EngineSection,
    InputSection,
    JobConfig,
    ModelSection,
    OutputSection,
    PromptSection,
    SamplingSection,
    all_rules,
)
from .templates import template_fields

__all__ = [
    "CONSTRAINT_KEYS", "PER_ROW_KEYS", "REQUIRED", "SECTIONS", "TOP_SCALARS",
    "ConfigError", "JobConfig", "ModelSection", "InputSection", "PromptSection", "SamplingSection",
    "OutputSection", "EngineSection", "Rule", "setting", "rule_of", "all_rules",
    "load_job", "parse_job", "apply_overrides", "preflight",
    "engine_kwargs", "sampling_kwargs", "engine_config_error", "engine_error_key", "constraint_problem",
    "job_identity", "job_fingerprint", "output_dir", "resolve_path", "template_fields",
]

"""The job file: load YAML, check every key, and say clearly what is wrong.

A job file has the sections model, input, prompt, sampling, output, engine and the scalar
cost_per_hour (see jobs/example.yaml). `load_job(path)` returns a `JobConfig` whose sections are
plain dataclasses, or raises `ConfigError` with one line that names the file, the line, the key
and what is wrong. Nothing here imports torch, the engine or datasets.

Relative paths (input files, a local dataset or model directory, output.path) are resolved
against the job file's directory; for inputs and the model, when nothing exists there, against
the current directory.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "JobConfig",
    "load_job",
    "parse_job",
    "job_fingerprint",
]


class ConfigError(ValueError):
    """A problem in the job file or its inputs, found before the model loads. str() is one line."""


class _Unset:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Unset()


# --------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    path: str = REQUIRED
    dtype: str = "auto"


@dataclass
class InputConfig:
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    streaming: bool = True
    data_files: Any = None
    files: list[str] | None = None
    id_column: str | None = None
    columns: list[str] = field(default_factory=list)
    limit: int | None = None


@dataclass
class PromptConfig:
    column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system: str | None = None
    chat_template: Any = "auto"  # "auto" | True | False
    max_tokens: int = 4096
    on_too_long: str = "skip"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class OutputConfig:
    path: str = REQUIRED
    rows_per_shard: int = 10000
    compression: str = "zstd"
    flush_seconds: float = 60.0
    stop_grace_seconds: float = 10.0


@dataclass
class EngineConfig:
    max_num_seqs: int = 256
    max_batch_tokens: int = 8192
    gpu_memory_fraction: float = 0.9
    overlap: Any = "auto"  # "auto" (on for CUDA, off for the CPU) | True | False
    cuda_graphs: bool = True
    attention: str = "auto"
    device: str = "auto"
    kv_cache_tokens: int | None = None
    max_model_len: int | None = None
    prefix_caching: bool = True
    block_size: int = 16
    threads: int | None = None  # torch threads on the CPU; None: automatic (batchgen/engine/threads.py)


@dataclass
class JobConfig:
    model: ModelConfig
    input: InputConfig
    prompt: PromptConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cost_per_hour: float | None = None
    # not from the file
    source_path: str | None = None  # the job file
    base_dir: str = "."  # relative paths are resolved against this

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source_path", None)
        d.pop("base_dir", None)
        return d


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "input": InputConfig,
    "prompt": PromptConfig,
    "sampling": SamplingConfig,
    "output": OutputConfig,
    "engine": EngineConfig,
}
TOP_SCALARS = {"cost_per_hour"}

# --------------------------------------------------------------------------- field rules
# kind: "str", "int", "float", "bool", "strlist", "intlist", "any"; nullable; choices; min; max
_RULES: dict[tuple[str, str], dict[str, Any]] = {
    ("model", "path"): dict(kind="str"),
    ("model", "dtype"): dict(kind="str", choices=["auto", "float32", "float16", "bfloat16"]),
    ("input", "dataset"): dict(kind="str", nullable=True),
    ("input", "config"): dict(kind="str", nullable=True),
    ("input", "split"): dict(kind="str", nullable=True),
    ("input", "revision"): dict(kind="str", nullable=True),
    ("input", "streaming"): dict(kind="bool"),
    ("input", "data_files"): dict(kind="any", nullable=True),
    ("input", "files"): dict(kind="strlist", nullable=True, scalar_ok=True),
    ("input", "id_column"): dict(kind="str", nullable=True),
    ("input", "columns"): dict(kind="strlist", scalar_ok=True, null_default=True),
    ("input", "limit"): dict(kind="int", nullable=True, min=0),
    ("prompt", "column"): dict(kind="str", nullable=True),
    ("prompt", "messages_column"): dict(kind="str", nullable=True),
    ("prompt", "template"): dict(kind="str", nullable=True),
    ("prompt", "system"): dict(kind="str", nullable=True),
    ("prompt", "chat_template"): dict(kind="auto_bool"),
    ("prompt", "max_tokens"): dict(kind="int", min=1),
    ("prompt", "on_too_long"): dict(kind="str", choices=["skip", "truncate", "error"]),
    ("sampling", "max_new_tokens"): dict(kind="int", min=1),
    ("sampling", "temperature"): dict(kind="float", min=0.0),
    ("sampling", "top_p"): dict(kind="float", min=0.0, min_exclusive=True, max=1.0),
    ("sampling", "top_k"): dict(kind="int"),
    ("sampling", "min_p"): dict(kind="float", min=0.0, max=1.0),
    ("sampling", "n"): dict(kind="int", min=1),
    ("sampling", "seed"): dict(kind="int"),
    ("sampling", "stop"): dict(kind="strlist", scalar_ok=True, null_default=True),
    ("sampling", "min_new_tokens"): dict(kind="int", min=0),
    ("sampling", "repetition_penalty"): dict(kind="float", min=0.0, min_exclusive=True),
    ("sampling", "stop_token_ids"): dict(kind="intlist", null_default=True),
    ("sampling", "ignore_eos"): dict(kind="bool"),
    ("output", "path"): dict(kind="str"),
    ("output", "rows_per_shard"): dict(kind="int", min=1),
    ("output", "compression"): dict(
        kind="str", choices=["zstd", "snappy", "gzip", "lz4", "brotli", "none"]
    ),
    ("output", "flush_seconds"): dict(kind="float", min=0.0, min_exclusive=True),
    ("output", "stop_grace_seconds"): dict(kind="float", min=0.0),
    ("engine", "max_num_seqs"): dict(kind="int", min=1),
    ("engine", "max_batch_tokens"): dict(kind="int", min=1),
    ("engine", "gpu_memory_fraction"): dict(kind="float", min=0.0, min_exclusive=True, max=1.0),
    ("engine", "overlap"): dict(kind="auto_bool"),
    ("engine", "cuda_graphs"): dict(kind="bool"),
    ("engine", "attention"): dict(kind="str", choices=["auto", "torch", "triton", "flash"]),
    ("engine", "device"): dict(kind="str"),
    ("engine", "kv_cache_tokens"): dict(kind="int", nullable=True, min=1),
    ("engine", "max_model_len"): dict(kind="int", nullable=True, min=1),
    ("engine", "prefix_caching"): dict(kind="bool"),
    ("engine", "block_size"): dict(kind="int", min=1),
    ("engine", "threads"): dict(kind="int", nullable=True, min=1),
    ("", "cost_per_hour"): dict(kind="float", nullable=True, min=0.0),
}

_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "strlist": "a list of strings",
    "intlist": "a list of integers",
    "auto_bool": "auto, true or false",
}


# --------------------------------------------------------------------------- YAML with line numbers
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps each mapping key's line and refuses duplicate keys."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    return _LinedDict(out, lines)


class _LinedDict(dict):
    def __init__(self, data: dict, lines: dict) -> None:
        super().__init__(data)
        self.lines = lines


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = e.problem or e.context or "invalid YAML"
        ctx = f" ({e.context})" if e.context and e.problem else ""
        raise ConfigError(f"{where}{line}: YAML syntax error: {problem}{ctx}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: YAML syntax error: {e}") from None


# --------------------------------------------------------------------------- validation
def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of: {', '.join(options)})"


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return f"the string '{v}'" if len(v) < 40 else "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


class _Ctx:
    def __init__(self, where: str) -> None:
        self.where = where

    def err(self, key: str, msg: str, line: int | None) -> ConfigError:
        loc = f"{self.where}:{line}" if line else self.where
        return ConfigError(f"{loc}: {key}: {msg}")


def _check_value(ctx: _Ctx, key: str, value: Any, rule: dict, line: int | None) -> Any:
    kind = rule["kind"]
    if value is None:
        if rule.get("nullable") or rule.get("null_default"):
            return None
        raise ctx.err(key, f"must be {_KIND_WORDS.get(kind, kind)}, got null", line)
    if kind == "any":
        return value
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ctx.err(key, f"must be a string, got {_type_name(value)}", line)
        if not isinstance(value, str):
            value = str(value)  # e.g. config: 2023 or revision: 1234abc parsed as a number
        if "choices" in rule and value not in rule["choices"]:
            raise ctx.err(key, f"'{value}' is not allowed{_did_you_mean(value, rule['choices'])}", line)
        if value == "" and key in ("model.path", "output.path"):
            raise ctx.err(key, "must not be empty", line)
        return value
    if kind == "auto_bool":
        if isinstance(value, bool) or value == "auto":
            return value
        raise ctx.err(key, f"must be auto, true or false, got {_type_name(value)}", line)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ctx.err(key, f"must be true or false, got {_type_name(value)}", line)
        return value
    if kind in ("int", "float"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            ok = ok or isinstance(value, float)
        if not ok:
            raise ctx.err(key, f"must be {_KIND_WORDS[kind]}, got {_type_name(value)}", line)
        if kind == "float":
            value = float(value)
        lo, hi = rule.get("min"), rule.get("max")
        if lo is not None and (value < lo or (rule.get("min_exclusive") and value == lo)):
            op = ">" if rule.get("min_exclusive") else ">="
            raise ctx.err(key, f"must be {op} {lo}, got {value}", line)
        if hi is not None and value > hi:
            raise ctx.err(key, f"must be <= {hi}, got {value}", line)
        return value
    if kind in ("strlist", "intlist"):
        if isinstance(value, str) and rule.get("scalar_ok"):
            value = [value]
        if not isinstance(value, list):
            raise ctx.err(key, f"must be {_KIND_WORDS[kind]}, got {_type_name(value)}", line)
        for i, item in enumerate(value):
            if kind == "strlist" and not isinstance(item, str):
                raise ctx.err(f"{key}[{i}]", f"must be a string, got {_type_name(item)}", line)
            if kind == "intlist" and (isinstance(item, bool) or not isinstance(item, int)):
                raise ctx.err(f"{key}[{i}]", f"must be an integer, got {_type_name(item)}", line)
        return list(value)
    raise AssertionError(kind)


def parse_job(data: Any, where: str = "job file", base_dir: str | os.PathLike[str] = ".") -> JobConfig:
    """Validate a parsed job mapping (as from YAML) and build a JobConfig."""
    ctx = _Ctx(where)
    if data is None:
        raise ConfigError(f"{where}: the job file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the job file must be a mapping of sections, got {_type_name(data)}")
    lines = getattr(data, "lines", {})
    known = list(SECTIONS) + sorted(TOP_SCALARS)
    for k in data:
        if k not in SECTIONS and k not in TOP_SCALARS:
            raise ctx.err(str(k), f"unknown key{_did_you_mean(str(k), known)}", lines.get(k))
    for required in ("model", "input", "prompt", "output"):
        if required not in data or data[required] is None:
            raise ConfigError(f"{where}: {required}: missing section (see jobs/example.yaml)")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name)
        sec_line = lines.get(name)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ctx.err(name, f"must be a mapping of keys, got {_type_name(raw)}", sec_line)
        raw_lines = getattr(raw, "lines", {})
        names = [f.name for f in fields(cls)]
        for k in raw:
            if k not in names:
                raise ctx.err(f"{name}.{k}", f"unknown key{_did_you_mean(str(k), names)}", raw_lines.get(k))
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f"{name}.{f.name}"
            if f.name not in raw:
                if f.default is REQUIRED:
                    raise ctx.err(key, "missing (required)", sec_line)
                continue
            rule = _RULES[(name, f.name)]
            value = _check_value(ctx, key, raw[f.name], rule, raw_lines.get(f.name))
            if value is None and rule.get("null_default"):
                continue
            kwargs[f.name] = value
        sections[name] = (cls(**kwargs), raw_lines, sec_line)
    cost = None
    if "cost_per_hour" in data:
        cost = _check_value(ctx, "cost_per_hour", data["cost_per_hour"], _RULES[("", "cost_per_hour")],
                            lines.get("cost_per_hour"))
    cfg = JobConfig(
        model=sections["model"][0],
        input=sections["input"][0],
        prompt=sections["prompt"][0],
        sampling=sections["sampling"][0],
        output=sections["output"][0],
        engine=sections["engine"][0],
        cost_per_hour=cost,
        source_path=where,
        base_dir=str(base_dir),
    )
    _cross_checks(ctx, cfg, {k: v[1] for k, v in sections.items()}, {k: v[2] for k, v in sections.items()})
    return cfg


def _cross_checks(ctx: _Ctx, cfg: JobConfig, lines: dict[str, dict], sec_lines: dict[str, int | None]) -> None:
    inp, pr, sp = cfg.input, cfg.prompt, cfg.sampling
    if (inp.dataset is None) == (inp.files is None):
        which = "both are set" if inp.dataset is not None else "neither is set"
        raise ctx.err("input", f"set exactly one of input.dataset and input.files ({which})", sec_lines["input"])
    if inp.files is not None and not inp.files:
        raise ctx.err("input.files", "is an empty list", lines["input"].get("files"))
    if inp.files is not None:
        for k in ("config", "split", "revision", "data_files"):
            if getattr(inp, k) is not None:
                raise ctx.err(f"input.{k}", "only applies to input.dataset, not input.files",
                              lines["input"].get(k))
    if (pr.column is None) == (pr.messages_column is None):
        which = "both are set" if pr.column is not None else "neither is set"
        raise ctx.err("prompt", f"set exactly one of prompt.column and prompt.messages_column ({which})",
                      sec_lines["prompt"])
    if pr.template is not None:
        if pr.messages_column is not None:
            raise ctx.err("prompt.template", "applies to prompt.column only (messages are used as they are)",
                          lines["prompt"].get("template"))
        try:
            template_fields(pr.template)
        except ValueError as e:
            raise ctx.err("prompt.template", f"is not a valid format string: {e}",
                          lines["prompt"].get("template")) from None
    if sp.min_new_tokens > sp.max_new_tokens:
        raise ctx.err("sampling.min_new_tokens", f"must be <= sampling.max_new_tokens ({sp.max_new_tokens})",
                      lines["sampling"].get("min_new_tokens"))
    if pr.on_too_long == "truncate" and pr.max_tokens < 8:
        raise ctx.err("prompt.max_tokens", "is too small to truncate prompts into (at least 8)",
                      lines["prompt"].get("max_tokens"))
    cols = list(inp.columns)
    reserved = {"id", "sample_index", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "error"}
    for c in cols:
        if c in reserved:
            raise ctx.err("input.columns", f"'{c}' is an output column name; it can't be copied through",
                          lines["input"].get("columns"))
    if len(set(cols)) != len(cols):
        raise ctx.err("input.columns", "lists a column twice", lines["input"].get("columns"))


def template_fields(template: str) -> list[str]:
    """The top-level row columns a str.format template refers to ("{a[0]}" -> "a")."""
    import string

    out = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError("positional fields like {} or {0} are not allowed; name a column: {prompt}")
        base = name.split(".")[0].split("[")[0]
        if base not in out:
            out.append(base)
    return out


def apply_overrides(data: Any, overrides: list[str], where: str) -> Any:
    """Apply --set section.key=value overrides (value parsed as YAML) to the raw mapping."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        return data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read, parse and validate a job file. Raises ConfigError with one clear line."""
    p = Path(path)
    where = str(path)
    if not p.exists():
        raise ConfigError(f"{where}: no such job file")
    if p.is_dir():
        raise ConfigError(f"{where}: is a directory, not a job file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: can't read the job file: {e}") from None
    data = _yaml_load(text, where)
    data = apply_overrides(data, list(overrides or []), where)
    return parse_job(data, where=where, base_dir=p.resolve().parent)


# --------------------------------------------------------------------------- paths
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


# --------------------------------------------------------------------------- fingerprint
def job_identity(cfg: JobConfig) -> dict[str, Any]:
    """What defines the output: model, prompt, sampling and the input (limit excluded: raising it
    extends a job; output and engine settings excluded: they don't change what is generated)."""
    inp = asdict(cfg.input)
    inp.pop("limit", None)
    inp.pop("streaming", None)
    return {
        "model": asdict(cfg.model),
        "input": inp,
        "prompt": asdict(cfg.prompt),
        "sampling": asdict(cfg.sampling),
    }


def job_fingerprint(cfg: JobConfig) -> str:
    blob = json.dumps(job_identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()

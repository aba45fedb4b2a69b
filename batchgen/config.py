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
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# The engine's own argument rules (torch-free: validation.py imports torch only inside its device
# and dtype checks, which are used only by preflight()), so the job file can't accept what the
# engine would reject after the model loaded.
from .engine import validation as engine_rules

__all__ = [
    "ConfigError",
    "JobConfig",
    "load_job",
    "parse_job",
    "job_fingerprint",
    "preflight",
    "engine_kwargs",
    "engine_config_error",
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
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the chat template
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
    # structured output, at most one: the completion is made to match it
    json_schema: dict[str, Any] | None = None  # a mapping, or in the file a path to a .json file
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark
    json_schema_column: str | None = None  # a per-row schema (JSON text or a mapping) from this column
    logprobs: bool = False  # a `logprobs` column: the chosen tokens' log-probabilities
    top_logprobs: int = 0  # a `top_logprobs` column: the k most likely (token id, logprob) per position
    from_columns: dict[str, str] = field(default_factory=dict)  # sampling key -> column with its per-row value


@dataclass
class OutputConfig:
    path: str = REQUIRED
    rows_per_shard: int = 10000
    compression: str = "zstd"
    flush_seconds: float = 60.0
    stop_grace_seconds: float = 10.0
    reasoning: str | None = None  # "split": a leading reasoning section goes to a `reasoning` column
    reasoning_tags: list[str] | None = None  # [open, close]; default: from the chat template (<think>)
    # OUT/README.md, a Hugging Face dataset card, once the job is done. Off by default: pyarrow.dataset(OUT)
    # reads every file that is not hidden, and would then need ignore_prefixes=[".", "_", "README"]
    dataset_card: bool = False


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
    # "section.key" -> where it was set ("job.yaml:12" or "--set section.key=value"), for errors found later
    locations: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("source_path", "base_dir", "locations"):
            d.pop(k, None)
        return d

    def where(self, key: str) -> str:
        """Where `key` was set, for an error line: "job.yaml:12", "--set k=v" or the job file."""
        return self.locations.get(key) or str(self.source_path or "job file")


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
# kind: "str", "int", "float", "bool", "strlist", "intlist", "any", "auto_bool", "device"; nullable;
# choices; min; max (ints default to the int64 range: every value ends up in JSON, Parquet or a
# tensor; floats must be finite). Ranges the engine itself checks (top_k, n, stop, stop_token_ids,
# block_size, ...) are checked by _engine_checks with the engine's code, not repeated here.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = engine_rules.INT32_MAX  # token counts index int32 device tensors
_TOKENS = dict(kind="int", min=1, max=INT32_MAX)
_RULES: dict[tuple[str, str], dict[str, Any]] = {
    ("model", "path"): dict(kind="str"),
    ("model", "dtype"): dict(kind="str", choices=list(engine_rules.DTYPES)),
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
    ("prompt", "chat_template_kwargs"): dict(kind="mapping", null_default=True),
    ("prompt", "max_tokens"): _TOKENS,
    ("prompt", "on_too_long"): dict(kind="str", choices=["skip", "truncate", "error"]),
    ("sampling", "max_new_tokens"): _TOKENS,
    ("sampling", "temperature"): dict(kind="float", min=0.0),
    ("sampling", "top_p"): dict(kind="float", min=0.0, min_exclusive=True, max=1.0),
    ("sampling", "top_k"): dict(kind="int", max=INT32_MAX),  # <= 0 is off; the engine keeps it in int32
    ("sampling", "min_p"): dict(kind="float", min=0.0, max=1.0),
    ("sampling", "n"): dict(kind="int", min=1),
    ("sampling", "seed"): dict(kind="int"),
    ("sampling", "stop"): dict(kind="strlist", scalar_ok=True, null_default=True),
    ("sampling", "min_new_tokens"): dict(kind="int", min=0, max=INT32_MAX),
    ("sampling", "repetition_penalty"): dict(kind="float", min=0.0, min_exclusive=True),
    ("sampling", "stop_token_ids"): dict(kind="intlist", null_default=True),
    ("sampling", "ignore_eos"): dict(kind="bool"),
    ("sampling", "json_schema"): dict(kind="schema", nullable=True),
    ("sampling", "json_object"): dict(kind="bool"),
    ("sampling", "regex"): dict(kind="str", nullable=True),
    ("sampling", "choice"): dict(kind="strlist", nullable=True),
    ("sampling", "grammar"): dict(kind="str", nullable=True),
    ("sampling", "json_schema_column"): dict(kind="str", nullable=True),
    ("sampling", "logprobs"): dict(kind="bool"),
    ("sampling", "top_logprobs"): dict(kind="int", min=0, max=engine_rules.MAX_TOP_LOGPROBS),
    ("sampling", "from_columns"): dict(kind="mapping", null_default=True),
    ("output", "path"): dict(kind="str"),
    ("output", "rows_per_shard"): dict(kind="int", min=1),
    ("output", "compression"): dict(
        kind="str", choices=["zstd", "snappy", "gzip", "lz4", "brotli", "none"]
    ),
    # a week: longer is surely a slip (and the shards are the checkpoint)
    ("output", "flush_seconds"): dict(kind="float", min=0.0, min_exclusive=True, max=7 * 86400.0),
    # a day: the grace is a timer (setitimer overflows near 1e11 s) and a Slurm warning is minutes
    ("output", "stop_grace_seconds"): dict(kind="float", min=0.0, max=86400.0),
    ("output", "reasoning"): dict(kind="str", nullable=True, choices=["split"]),
    ("output", "reasoning_tags"): dict(kind="strlist", nullable=True),
    ("output", "dataset_card"): dict(kind="bool"),
    ("engine", "max_num_seqs"): _TOKENS,
    ("engine", "max_batch_tokens"): _TOKENS,
    ("engine", "gpu_memory_fraction"): dict(kind="float", min=0.0, min_exclusive=True, max=1.0),
    ("engine", "overlap"): dict(kind="auto_bool"),
    ("engine", "cuda_graphs"): dict(kind="bool"),
    # the names of batchgen/engine/attention BACKENDS (that package imports torch)
    ("engine", "attention"): dict(kind="str", choices=["auto", "torch", "triton", "flash"]),
    ("engine", "device"): dict(kind="device"),
    ("engine", "kv_cache_tokens"): dict(_TOKENS, nullable=True),
    ("engine", "max_model_len"): dict(_TOKENS, nullable=True),
    ("engine", "prefix_caching"): dict(kind="bool"),
    ("engine", "block_size"): _TOKENS,
    ("engine", "threads"): dict(_TOKENS, nullable=True),
    ("", "cost_per_hour"): dict(kind="float", nullable=True, min=0.0),
}
# the devices the engine runs on (engine.py: cpu or cuda); torch.device would take more (mps, xpu, meta)
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_DEVICE_WORDS = "auto, cpu, cuda or cuda:N"

_KIND_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "strlist": "a list of strings",
    "intlist": "a list of integers",
    "auto_bool": "auto, true or false",
    "device": "a device name",
    "mapping": "a mapping",
    "schema": "a JSON schema (a mapping, or the path of a .json file)",
}


# --------------------------------------------------------------------------- YAML with line numbers
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps each mapping key's line (and each plain scalar's text) and refuses
    duplicate keys."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    texts: dict[Any, str] = {}
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
        if isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
            texts[key] = value_node.value  # revision: 012345 is the int 5349 to YAML, the text to a string key
    return _LinedDict(out, lines, texts)


class _LinedDict(dict):
    def __init__(self, data: dict, lines: dict, texts: dict | None = None) -> None:
        super().__init__(data)
        self.lines = lines
        self.texts = texts or {}


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
        return f"the string '{_one_line(v)}'" if len(v) < 40 else "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


class _Ctx:
    """Where errors point: the job file and line, or the --set argument that set the key."""

    def __init__(self, where: str, origins: dict[str, str] | None = None, base_dir: str | os.PathLike[str] = ".") -> None:
        self.where, self.base_dir = where, base_dir
        self.origins = origins or {}  # "section.key" (or a section --set created) -> the --set argument

    def loc(self, key: str, line: int | None) -> str:
        origin = self.origins.get(key.split("[", 1)[0])
        if origin is not None:
            return f"--set {_one_line(origin)}"
        return f"{self.where}:{line}" if line else self.where

    def err(self, key: str, msg: str, line: int | None) -> ConfigError:
        return ConfigError(f"{self.loc(key, line)}: {key}: {msg}")


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _check_number(ctx: _Ctx, key: str, value: Any, rule: dict, line: int | None) -> Any:
    kind = rule["kind"]
    ok = isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        ok = ok or isinstance(value, float)
    if not ok:
        raise ctx.err(key, f"must be {_KIND_WORDS[kind]}, got {_type_name(value)}", line)
    if kind == "float":
        try:
            value = float(value)
        except OverflowError:  # an int too big for a float
            value = math.inf
        if not math.isfinite(value):  # NaN passes every < and >, so it must be caught by name
            raise ctx.err(key, f"must be a finite number, got {value}", line)
    lo, hi = rule.get("min"), rule.get("max")
    if kind == "int":  # every int lands in JSON, Parquet or a tensor: int64 at most
        lo = INT64_MIN if lo is None else lo
        hi = INT64_MAX if hi is None else hi
    if lo is not None and (value < lo or (rule.get("min_exclusive") and value == lo)):
        op = ">" if rule.get("min_exclusive") else ">="
        raise ctx.err(key, f"must be {op} {lo}, got {value}", line)
    if hi is not None and value > hi:
        raise ctx.err(key, f"must be <= {hi}, got {value}", line)
    return value


def _check_device(ctx: _Ctx, key: str, value: Any, line: int | None) -> str:
    if not isinstance(value, str):
        raise ctx.err(key, f"must be {_DEVICE_WORDS}, got {_type_name(value)}", line)
    if _DEVICE_RE.fullmatch(value):
        return value
    hint = " (did you mean 'cuda'?)" if value.lower().startswith(("gpu", "cuda", "nvidia")) else ""
    raise ctx.err(key, f"'{value}' is not a device batchgen runs on: {_DEVICE_WORDS}{hint}", line)


def _plain(value: Any) -> Any:
    """A YAML mapping (our line-keeping subclass) as plain dicts and lists: JSON-able, comparable."""
    return json.loads(json.dumps(value, default=str))


def _check_schema(ctx: _Ctx, key: str, value: Any, line: int | None) -> dict:
    """A JSON schema given inline, or the path of a .json file holding one (read now: the job's fingerprint
    then covers the schema's content, not its file name)."""
    if isinstance(value, dict):
        return _plain(value)
    if not isinstance(value, str):
        raise ctx.err(key, f"must be {_KIND_WORDS['schema']}, got {_type_name(value)}", line)
    path = Path(value) if os.path.isabs(value) else Path(ctx.base_dir) / value
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise ctx.err(key, f"can't read the schema file {value}: {e.strerror or e}", line) from None
    except ValueError as e:
        raise ctx.err(key, f"the schema file {value} is not valid JSON: {e}", line) from None
    if not isinstance(schema, dict):
        raise ctx.err(key, f"the schema file {value} must hold a JSON object, got {_type_name(schema)}", line)
    return schema


def _check_value(ctx: _Ctx, key: str, value: Any, rule: dict, line: int | None, text: str | None = None) -> Any:
    """One key's value against its rule; `text` is the value as written (plain YAML scalars)."""
    kind = rule["kind"]
    if value is None:
        if rule.get("nullable") or rule.get("null_default"):
            return None
        raise ctx.err(key, f"must be {_KIND_WORDS.get(kind, kind)}, got null", line)
    if kind == "any":
        return value
    if kind == "device":
        return _check_device(ctx, key, value, line)
    if kind == "mapping":
        if not isinstance(value, dict):
            raise ctx.err(key, f"must be a mapping, got {_type_name(value)}", line)
        return _plain(value)
    if kind == "schema":
        return _check_schema(ctx, key, value, line)
    if kind == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ctx.err(key, f"must be a string, got {_type_name(value)}", line)
        if not isinstance(value, str):
            # e.g. config: 2023 or revision: 012345 parsed as a number: keep the text as written
            value = text if text is not None else str(value)
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
        return _check_number(ctx, key, value, rule, line)
    if kind in ("strlist", "intlist"):
        if isinstance(value, str) and rule.get("scalar_ok"):
            value = [value]
        if not isinstance(value, list):
            raise ctx.err(key, f"must be {_KIND_WORDS[kind]}, got {_type_name(value)}", line)
        for i, item in enumerate(value):
            if kind == "strlist" and not isinstance(item, str):
                hint = " (YAML reads yes/no/on/off/true/false as booleans: quote it)" if isinstance(item, bool) else ""
                raise ctx.err(f"{key}[{i}]", f"must be a string, got {_type_name(item)}{hint}", line)
            if kind == "intlist":
                _check_number(ctx, f"{key}[{i}]", item, {"kind": "int"}, line)
        return list(value)
    raise AssertionError(kind)


def parse_job(data: Any, where: str = "job file", base_dir: str | os.PathLike[str] = ".",
              origins: dict[str, str] | None = None) -> JobConfig:
    """Validate a parsed job mapping (as from YAML) and build a JobConfig. `origins` maps the keys
    that --set gave (see apply_overrides) to their argument, so errors in them name it."""
    ctx = _Ctx(where, origins, base_dir)
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
            raise ConfigError(f"{ctx.loc(required, None)}: {required}: missing section (see jobs/example.yaml)")
    locations = {k: ctx.loc(k, lines.get(k)) for k in data}
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name)
        sec_line = lines.get(name)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ctx.err(name, f"must be a mapping of keys, got {_type_name(raw)}", sec_line)
        raw_lines = getattr(raw, "lines", {})
        texts = getattr(raw, "texts", {})
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
            locations[key] = ctx.loc(key, raw_lines.get(f.name))
            rule = _RULES[(name, f.name)]
            value = _check_value(ctx, key, raw[f.name], rule, raw_lines.get(f.name),
                                 None if key in ctx.origins else texts.get(f.name))
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
        locations=locations,
    )
    _cross_checks(ctx, cfg, {k: v[1] for k, v in sections.items()}, {k: v[2] for k, v in sections.items()})
    _engine_checks(cfg)
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
            raise ctx.err("prompt.template", f"is not a valid template: {e}",
                          lines["prompt"].get("template")) from None
    if sp.min_new_tokens > sp.max_new_tokens:
        raise ctx.err("sampling.min_new_tokens", f"must be <= sampling.max_new_tokens ({sp.max_new_tokens})",
                      lines["sampling"].get("min_new_tokens"))
    if pr.on_too_long == "truncate" and pr.max_tokens < 8:
        raise ctx.err("prompt.max_tokens", "is too small to truncate prompts into (at least 8)",
                      lines["prompt"].get("max_tokens"))
    _structured_checks(ctx, cfg, lines)
    cols = list(inp.columns)
    reserved = {"id", "sample_index", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "error",
                "reasoning", "logprobs", "top_logprobs"}
    for c in cols:
        if c in reserved:
            raise ctx.err("input.columns", f"'{c}' is an output column name; it can't be copied through",
                          lines["input"].get("columns"))
    if len(set(cols)) != len(cols):
        raise ctx.err("input.columns", "lists a column twice", lines["input"].get("columns"))


# sampling keys a column may set per row (sampling.from_columns); n is not one: a row's sample count is fixed
PER_ROW_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                "seed", "stop", "stop_token_ids")
CONSTRAINT_KEYS = ("json_schema", "json_object", "regex", "choice", "grammar", "json_schema_column")


def _structured_checks(ctx: _Ctx, cfg: JobConfig, lines: dict[str, dict]) -> None:
    """Structured output, per-row settings and reasoning: shapes, at most one constraint, constraints that compile."""
    sp, out, sl = cfg.sampling, cfg.output, lines["sampling"]
    given = [k for k in CONSTRAINT_KEYS if getattr(sp, k) not in (None, False)]
    if len(given) > 1:
        raise ctx.err(f"sampling.{given[1]}", f"give at most one of sampling.{', sampling.'.join(CONSTRAINT_KEYS)} "
                      f"(also set: sampling.{given[0]})", sl.get(given[1]))
    for k, col in sp.from_columns.items():
        if k not in PER_ROW_KEYS:
            raise ctx.err(f"sampling.from_columns.{k}", f"can't come from a column{_did_you_mean(str(k), PER_ROW_KEYS)}",
                          sl.get("from_columns"))
        if not isinstance(col, str) or not col:
            raise ctx.err(f"sampling.from_columns.{k}", f"must name a column, got {_type_name(col)}", sl.get("from_columns"))
    if out.reasoning_tags is not None and (len(out.reasoning_tags) != 2 or not all(out.reasoning_tags)):
        raise ctx.err("output.reasoning_tags", "must be two non-empty strings: [open, close]",
                      lines["output"].get("reasoning_tags"))
    if given and given[0] != "json_schema_column":
        problem = constraint_problem(sp)
        if problem is not None:
            raise ctx.err(f"sampling.{given[0]}", problem, sl.get(given[0]))


def constraint_problem(sp: SamplingConfig, schema: Any = None) -> str | None:
    """Why the sampling section's constraint (or a per-row `schema`) does not compile, or None. Uses the grammar
    engine itself (llguidance, no tokenizer needed), so a bad schema or regex fails before the model loads."""
    try:
        import llguidance
    except ImportError:
        return "structured output needs llguidance: pip install llguidance (or 'batchgen[structured]')"
    from .engine.constraints import ConstraintSpec, constraint_of, grammar_text  # the engine's own grammars

    if sp.choice is not None and (not sp.choice or not all(sp.choice)):
        return "must be a non-empty list of non-empty strings"
    m = llguidance.LLMatcher
    try:
        spec = ConstraintSpec("json_schema", json.dumps(schema)) if schema is not None else constraint_of(sp)
        if spec is None:
            return None
        grammar = grammar_text(llguidance, spec)
    except (ValueError, TypeError) as e:
        return f"is not valid: {_one_line(str(e))}"
    error = m.validate_grammar(grammar)
    return f"does not compile: {engine_rules.grammar_error_line(error)}" if error else None


# --------------------------------------------------------------------------- the engine's rules
_ENGINE_MESSAGE = re.compile(r"(SamplingParams\.|Engine: )([a-z_]+)(\[\d+\])?(.*)", re.S)
_ENGINE_KEYS = {"seed": "sampling.seed", "dtype": "model.dtype"}  # Engine arguments from other sections


def engine_kwargs(cfg: JobConfig) -> dict[str, Any]:
    """The Engine arguments a job gives (job.make_engine's, without the model path)."""
    e = cfg.engine
    return dict(device=e.device, dtype=cfg.model.dtype, max_num_seqs=e.max_num_seqs,
                max_batch_tokens=e.max_batch_tokens, kv_cache_tokens=e.kv_cache_tokens, block_size=e.block_size,
                prefix_caching=e.prefix_caching, gpu_memory_fraction=e.gpu_memory_fraction, overlap=e.overlap,
                cuda_graphs=e.cuda_graphs, attention=e.attention, max_model_len=e.max_model_len,
                seed=cfg.sampling.seed, threads=e.threads)


def engine_error_key(message: str) -> tuple[str, str]:
    """An EngineArgumentError's text -> (job file key, what is wrong):
    "SamplingParams.top_k must be ..." -> ("sampling.top_k", "must be ...")."""
    m = _ENGINE_MESSAGE.match(message)
    if m is None:
        return "engine", message
    prefix, name, index, rest = m.groups()
    key = "sampling." + name if prefix.startswith("Sampling") else _ENGINE_KEYS.get(name, "engine." + name)
    rest = rest.strip()
    if not rest.startswith("must"):  # "kv_cache_tokens=1 is smaller than ...", "device 'cuda' needs CUDA ..."
        rest = message[len(prefix):]
    return key + (index or ""), rest


def engine_config_error(cfg: JobConfig, error: BaseException) -> ConfigError:
    """The one-line job-file error for an EngineArgumentError the engine raised for this job."""
    key, msg = engine_error_key(str(error).splitlines()[0] if str(error) else type(error).__name__)
    return ConfigError(f"{cfg.where(key.split('[', 1)[0])}: {key}: {msg}")


def _engine_checks(cfg: JobConfig) -> None:
    """The sampling section through the engine's own SamplingParams checks, and the Engine
    arguments that need no torch (block_size, kv_cache_tokens; the rest are checked above with
    the same bounds, device/dtype/attention by name; preflight() runs the full check_engine_args)."""
    from .engine.request import SamplingParams

    s = cfg.sampling
    try:
        SamplingParams(max_new_tokens=s.max_new_tokens, min_new_tokens=s.min_new_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty,
                       seed=s.seed, n=s.n, stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
                       ignore_eos=s.ignore_eos)
        engine_rules._check_block_size(cfg.engine.block_size)
        engine_rules._check_kv_cache_tokens(cfg.engine.kv_cache_tokens, cfg.engine.block_size)
    except engine_rules.EngineArgumentError as e:
        raise engine_config_error(cfg, e) from None


# --------------------------------------------------------------------------- preflight
_ATTENTION_PACKAGES = {"flash": ("flash_attn", "the flash-attn package (pip install 'batchgen[flash]')"),
                       "triton": ("triton", "the triton package")}


def preflight(cfg: JobConfig, *, local: bool = True) -> None:
    """What the job file can't say alone, checked before the model loads: the output path can be
    written, the attention backend is installed and, when `local` (this machine runs the job:
    `batchgen run`, --dry-run), the engine's full argument check including the device (imports
    torch). `batchgen submit` passes local=False: the login node may have no GPU. ConfigError."""
    _check_output_path(cfg)
    _check_attention_installed(cfg)
    if not local:
        return
    try:
        engine_rules.check_engine_args(**engine_kwargs(cfg))
    except engine_rules.EngineArgumentError as e:
        raise engine_config_error(cfg, e) from None
    _check_attention_device(cfg)


def _check_output_path(cfg: JobConfig) -> None:
    key = "output.path"
    out = output_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{cfg.where(key)}: {key}: {out} is a file, not a directory")
    top = out
    while not top.exists() and top != top.parent:  # the nearest existing directory: where mkdir starts
        top = top.parent
    if not top.is_dir():
        raise ConfigError(f"{cfg.where(key)}: {key}: can't create {out}: {top} is a file, not a directory")
    if not os.access(top, os.W_OK | os.X_OK):
        what = f"{out} is not writable" if top == out else f"can't create {out}: {top} is not writable"
        raise ConfigError(f"{cfg.where(key)}: {key}: {what}")


def _check_attention_installed(cfg: JobConfig) -> None:
    import importlib.util

    name = cfg.engine.attention
    if name not in _ATTENTION_PACKAGES:
        return
    module, package = _ATTENTION_PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"{cfg.where('engine.attention')}: engine.attention: {name} needs {package}, "
                          "which is not installed here (attention: auto picks what is)")


def _check_attention_device(cfg: JobConfig) -> None:
    """flash and triton run on CUDA only (attention.get_backend)."""
    import torch

    name, device = cfg.engine.attention, cfg.engine.device
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if name in _ATTENTION_PACKAGES and not on_cuda:
        raise ConfigError(f"{cfg.where('engine.attention')}: engine.attention: {name} needs a CUDA device, "
                          f"and engine.device: {device} is the CPU here (attention: auto picks the torch backend)")


def template_fields(template: str) -> list[str]:
    """The top-level row columns a str.format template refers to ("{a[0]}" -> "a"). ValueError
    for what the job file refuses: positional fields, attribute lookups ({a.b}: a row value's
    attributes are never a column), conversions other than !s !r !a, and any format spec
    ({x:>100000000000} pads each prompt to that width: memory, not text)."""
    import _string  # str.format's own parser, as string.Formatter uses it
    import string

    out = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        field_text = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
        if name == "" or name.isdigit():
            raise ValueError("positional fields like {} or {0} are not allowed; name a column: {prompt}")
        base, rest = _string.formatter_field_name_split(name)
        if any(is_attr for is_attr, _ in rest):  # list() also checks the [..] syntax
            raise ValueError(f"{field_text}: attribute lookups are not allowed; index a mapping column with [key]")
        if conversion not in (None, "s", "r", "a"):
            raise ValueError(f"{field_text}: unknown conversion '!{conversion}' (use !s, !r or !a)")
        if spec:
            raise ValueError(f"{field_text}: format specs (':{spec[:20]}') are not allowed; "
                             "the template inserts column values as they are")
        if base not in out:
            out.append(base)
    return out


def _override_value(raw: str, rule: dict[str, Any] | None) -> Any:
    """A --set value: YAML when it is a plain scalar (0.5, true, null, 'quoted'), or a [list] /
    {mapping} written as such for a key that takes one; otherwise the text as given, so that
    prompt.template=Q: {x} or a template '{prompt}' stays a string instead of becoming a mapping."""
    text = raw.strip()
    if not text:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return raw
    kind = (rule or {}).get("kind")
    if isinstance(value, (list, dict)):
        wanted = (list,) if kind in ("strlist", "intlist") else (list, dict) if kind == "any" else ()
        return value if isinstance(value, wanted) and text[0] in "[{" else raw
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return raw  # a YAML date or timestamp: the text is what was meant
    if kind == "str" and value is not None and not isinstance(value, str):
        return raw  # --set input.revision=012345 is that text, not the octal int 5349
    return value


def apply_overrides(data: Any, overrides: list[str], where: str) -> dict[str, str]:
    """Apply --set section.key=value overrides to the raw mapping, in place (values: see
    _override_value). Returns "section.key" (and any section a --set created) -> its argument."""
    origins: dict[str, str] = {}
    if not overrides or not isinstance(data, dict):
        return origins
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {_one_line(item)}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        rule = _RULES.get((parts[0], parts[1]) if len(parts) == 2 else ("", parts[0]))
        value = _override_value(raw, rule)
        node = data
        for depth, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
                node[p] = nxt
                origins.setdefault(".".join(parts[:depth + 1]), item)
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {_one_line(item)}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
        origins[".".join(parts)] = item
    return origins


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
    origins = apply_overrides(data, list(overrides or []), where)
    return parse_job(data, where=where, base_dir=p.resolve().parent, origins=origins)


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

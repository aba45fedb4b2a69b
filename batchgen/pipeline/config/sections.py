"""The job file's sections as dataclasses: each key's type, default, rule and description in one place.

Field order is the order jobs/example.yaml documents them in. The section classes are named
`*Section` (the job's `ModelSection` is not the architecture's engine.models.config.ModelConfig).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ...engine import validation as engine_rules
from .rules import INT32_MAX, REQUIRED, TOKENS, Rule, rule_of, setting

_NULL_STR: dict[str, Any] = dict(default=None, kind="str", nullable=True)


@dataclass
class ModelSection:
    path: str = setting(REQUIRED, kind="str", non_empty=True,
                        doc="a hub id, a local Hugging Face directory, a .gguf file or smollm2-135m-instruct")
    dtype: str = setting("auto", kind="str", choices=engine_rules.DTYPES,
                         doc="auto | float32 | float16 | bfloat16")
    quantization: str | None = setting(None, kind="str", nullable=True, choices=engine_rules.QUANTIZATIONS,
                                       doc="null | fp8: the projections' weights quantized to FP8 at load")
    quantize_lm_head: bool = setting(False, kind="bool",
                                     doc="with quantization fp8: lm_head in FP8 too (one scale per vocabulary row)")


@dataclass
class InputSection:
    dataset: str | None = setting(**_NULL_STR, doc="a hub dataset id or a local dataset directory")
    config: str | None = setting(**_NULL_STR, doc="the dataset's configuration name (load_dataset's name)")
    split: str | None = setting(**_NULL_STR, doc="the dataset's split (default: train)")
    revision: str | None = setting(**_NULL_STR, doc="a branch, tag or commit of the hub dataset")
    streaming: bool = setting(True, kind="bool", doc="stream a hub dataset instead of downloading it whole")
    data_files: Any = setting(None, kind="any", nullable=True, doc="passed to load_dataset as is")
    files: list[str] | None = setting(None, kind="strlist", nullable=True, scalar_ok=True,
                                      doc="Parquet or JSON Lines files: paths, globs or directories")
    id_column: str | None = setting(**_NULL_STR, doc="the column that identifies a row (default: its index)")
    columns: list[str] = setting(kind="strlist", factory=list, scalar_ok=True, null_default=True,
                                 doc="input columns copied through to the output")
    limit: int | None = setting(None, kind="int", nullable=True, min=0, doc="process only the first `limit` rows")


@dataclass
class PromptSection:
    column: str | None = setting(**_NULL_STR, doc="the column holding the prompt text")
    messages_column: str | None = setting(**_NULL_STR, doc="the column holding a list of {role, content}")
    template: str | None = setting(**_NULL_STR, doc="a str.format template over the row's columns")
    system: str | None = setting(**_NULL_STR, doc="a system prompt")
    chat_template: Any = setting("auto", kind="auto_bool",
                                 doc="apply the tokenizer's chat template: auto | true | false")
    chat_template_kwargs: dict[str, Any] = setting(kind="mapping", factory=dict, null_default=True,
                                                   doc="passed to the chat template")
    max_tokens: int = setting(4096, kind="int", **TOKENS, doc="the longest prompt, in tokens")
    on_too_long: str = setting("skip", kind="str", choices=["skip", "truncate", "error"],
                               doc="a prompt over the limit: skip | truncate | error")


@dataclass
class SamplingSection:
    max_new_tokens: int = setting(512, kind="int", **TOKENS, doc="most tokens generated per sample")
    temperature: float = setting(0.7, kind="float", min=0.0, doc="0: greedy")
    top_p: float = setting(1.0, kind="float", min=0.0, min_exclusive=True, max=1.0, doc="nucleus sampling mass")
    # <= 0 is off; the engine keeps it in int32
    top_k: int = setting(-1, kind="int", max=INT32_MAX, doc="<= 0: off")
    min_p: float = setting(0.0, kind="float", min=0.0, max=1.0, doc="drop tokens below min_p times the top one")
    n: int = setting(1, kind="int", min=1, doc="samples per input row")
    seed: int = setting(0, kind="int", doc="each row's seed is a hash of (seed, id)")
    stop: list[str] = setting(kind="strlist", factory=list, scalar_ok=True, null_default=True,
                              doc="stop strings, cut from the completion")
    min_new_tokens: int = setting(0, kind="int", min=0, max=INT32_MAX, doc="no EOS / stop before this many tokens")
    repetition_penalty: float = setting(1.0, kind="float", min=0.0, min_exclusive=True, doc="1: off")
    stop_token_ids: list[int] = setting(kind="intlist", factory=list, null_default=True,
                                        doc="extra stop tokens, besides the model's EOS")
    ignore_eos: bool = setting(False, kind="bool", doc="keep generating past EOS")
    # structured output, at most one: the completion is made to match it
    json_schema: dict[str, Any] | None = setting(None, kind="schema", nullable=True,
                                                 doc="a JSON schema: a mapping, or in the file a path to a .json file")
    json_object: bool = setting(False, kind="bool", doc="any JSON object")
    regex: str | None = setting(**_NULL_STR, doc="a regular expression")
    choice: list[str] | None = setting(None, kind="strlist", nullable=True, doc="exactly one of these strings")
    grammar: str | None = setting(**_NULL_STR, doc="a Lark grammar")
    json_schema_column: str | None = setting(**_NULL_STR,
                                             doc="a per-row schema (JSON text or a mapping) from this column")
    logprobs: bool = setting(False, kind="bool", doc="a `logprobs` column: the chosen tokens' log-probabilities")
    top_logprobs: int = setting(0, kind="int", min=0, max=engine_rules.MAX_TOP_LOGPROBS,
                                doc="a `top_logprobs` column: the k most likely (token id, logprob) per position")
    from_columns: dict[str, str] = setting(kind="mapping", factory=dict, null_default=True,
                                           doc="sampling key -> the column with its per-row value")


@dataclass
class OutputSection:
    path: str = setting(REQUIRED, kind="str", non_empty=True, doc="the output directory")
    rows_per_shard: int = setting(10000, kind="int", min=1, doc="output rows per shard")
    compression: str = setting("zstd", kind="str", choices=["zstd", "snappy", "gzip", "lz4", "brotli", "none"],
                               doc="the shards' Parquet compression")
    # a week: longer is surely a slip (and the shards are the checkpoint)
    flush_seconds: float = setting(60.0, kind="float", min=0.0, min_exclusive=True, max=7 * 86400.0,
                                   doc="completed rows are committed at least this often")
    # a day: the grace is a timer (setitimer overflows near 1e11 s) and a Slurm warning is minutes
    stop_grace_seconds: float = setting(10.0, kind="float", min=0.0, max=86400.0,
                                        doc="on SIGTERM / SIGINT, how long in-flight rows may finish")
    reasoning: str | None = setting(None, kind="str", nullable=True, choices=["split"],
                                    doc="split: a leading reasoning section goes to a `reasoning` column")
    reasoning_tags: list[str] | None = setting(None, kind="strlist", nullable=True,
                                               doc="[open, close]; default: from the chat template (<think>)")
    # Off by default: pyarrow.dataset(OUT) reads every file that is not hidden, and would then need
    # ignore_prefixes=[".", "_", "README"]
    dataset_card: bool = setting(False, kind="bool", doc="write OUT/README.md, a dataset card, once the job is done")


@dataclass
class EngineSection:
    max_num_seqs: int = setting(256, kind="int", **TOKENS, doc="sequences decoded together")
    max_batch_tokens: int = setting(8192, kind="int", **TOKENS, doc="tokens per step (prefill chunks + decodes)")
    gpu_memory_fraction: float = setting(0.9, kind="float", min=0.0, min_exclusive=True, max=1.0,
                                         doc="of the GPU's memory, for weights + KV cache + activations")
    overlap: Any = setting("auto", kind="auto_bool", doc="auto (on for CUDA, off for the CPU) | true | false")
    cuda_graphs: bool = setting(True, kind="bool", doc="capture decode steps in CUDA graphs")
    # the names of batchgen/engine/attention BACKENDS (that package imports torch)
    attention: str = setting("auto", kind="str", choices=["auto", "torch", "triton", "flash"],
                             doc="the attention backend: auto | torch | triton | flash")
    device: str = setting("auto", kind="device", doc="auto | cpu | cuda | cuda:N")
    kv_cache_tokens: int | None = setting(None, kind="int", nullable=True, **TOKENS,
                                          doc="KV cache size in tokens (null: from gpu_memory_fraction)")
    max_model_len: int | None = setting(None, kind="int", nullable=True, **TOKENS,
                                        doc="cap on prompt + new tokens (null: the model's context)")
    prefix_caching: bool = setting(True, kind="bool", doc="share the KV cache of common prompt prefixes")
    block_size: int = setting(16, kind="int", **TOKENS, doc="KV cache block, in tokens: a power of two")
    kv_cache_dtype: str = setting("auto", kind="str", choices=engine_rules.KV_CACHE_DTYPES,
                                  doc="auto (the model's dtype) | bfloat16 | float16 | fp8 (e4m3 with per-layer scales)")
    threads: int | None = setting(None, kind="int", nullable=True, **TOKENS,
                                  doc="torch threads on the CPU; null: automatic (batchgen/engine/threads.py)")
    tensor_parallel: int = setting(1, kind="int", **TOKENS,
                                   doc="ranks (GPUs, or CPU processes) each holding a share of every layer")
    # how the job runs, not what it computes: not part of its identity (pipeline/parallel/plan.py)
    data_parallel: int | str = setting(1, kind="workers",
                                       doc="worker processes, one per GPU (a positive integer or all)")


@dataclass
class JobConfig:
    model: ModelSection
    input: InputSection
    prompt: PromptSection
    sampling: SamplingSection = field(default_factory=SamplingSection)
    output: OutputSection = field(default_factory=OutputSection)
    engine: EngineSection = field(default_factory=EngineSection)
    cost_per_hour: float | None = setting(None, kind="float", nullable=True, min=0.0,
                                          doc="GPU price in $ per hour: the summary gives $ per 1M output tokens")
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
    "model": ModelSection,
    "input": InputSection,
    "prompt": PromptSection,
    "sampling": SamplingSection,
    "output": OutputSection,
    "engine": EngineSection,
}
TOP_SCALARS = {"cost_per_hour"}


def top_rule(name: str) -> Rule:
    """The rule of a top-level scalar key (cost_per_hour)."""
    return rule_of(next(f for f in fields(JobConfig) if f.name == name))


def key_rule(key: str) -> Rule | None:
    """The rule of "section.key" or of a top-level key; None for what the job file has no such key."""
    parts = key.split(".")
    if len(parts) == 1:
        return top_rule(parts[0]) if parts[0] in TOP_SCALARS else None
    cls = SECTIONS.get(parts[0]) if len(parts) == 2 else None
    f = next((f for f in fields(cls) if f.name == parts[1]), None) if cls is not None else None
    return rule_of(f) if f is not None else None


def all_rules() -> dict[tuple[str, str], Rule]:
    """(section, key) -> Rule for every key of the job file; ("", name) for the top-level scalars."""
    out = {(name, f.name): rule_of(f) for name, cls in SECTIONS.items() for f in fields(cls)}
    out.update({("", name): top_rule(name) for name in sorted(TOP_SCALARS)})
    return out

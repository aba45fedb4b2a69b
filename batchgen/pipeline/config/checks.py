"""Checks across keys, after each key passed its own rule: exactly one input and one prompt source,
at most one constraint (and one that compiles), per-row keys, reasoning tags, copied columns."""
from __future__ import annotations

import json
from typing import Any

from ...engine import validation as engine_rules
from .engine_args import CONSTRAINT_KEYS
from .errors import Ctx, did_you_mean, one_line, type_name
from .sections import JobConfig, SamplingSection
from .templates import template_fields

# sampling keys a column may set per row (sampling.from_columns); n is not one: a row's sample count is fixed
PER_ROW_KEYS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                "seed", "stop", "stop_token_ids")
# output columns batchgen writes itself: an input column of that name can't be copied through
RESERVED_COLUMNS = {"id", "sample_index", "completion", "finish_reason", "prompt_tokens", "completion_tokens", "error",
                    "reasoning", "logprobs", "top_logprobs"}


def cross_checks(ctx: Ctx, cfg: JobConfig, lines: dict[str, dict], sec_lines: dict[str, int | None]) -> None:
    """`lines`: section -> {key: line}; `sec_lines`: section -> the section's own line."""
    _input_checks(ctx, cfg, lines["input"], sec_lines["input"])
    _prompt_checks(ctx, cfg, lines["prompt"], sec_lines["prompt"])
    sp, pr = cfg.sampling, cfg.prompt
    if sp.min_new_tokens > sp.max_new_tokens:
        raise ctx.err("sampling.min_new_tokens", f"must be <= sampling.max_new_tokens ({sp.max_new_tokens})",
                      lines["sampling"].get("min_new_tokens"))
    if pr.on_too_long == "truncate" and pr.max_tokens < 8:
        raise ctx.err("prompt.max_tokens", "is too small to truncate prompts into (at least 8)",
                      lines["prompt"].get("max_tokens"))
    structured_checks(ctx, cfg, lines)
    _columns_checks(ctx, cfg, lines["input"])


def _input_checks(ctx: Ctx, cfg: JobConfig, lines: dict, sec_line: int | None) -> None:
    inp = cfg.input
    if (inp.dataset is None) == (inp.files is None):
        which = "both are set" if inp.dataset is not None else "neither is set"
        raise ctx.err("input", f"set exactly one of input.dataset and input.files ({which})", sec_line)
    if inp.files is not None and not inp.files:
        raise ctx.err("input.files", "is an empty list", lines.get("files"))
    if inp.files is not None:
        for k in ("config", "split", "revision", "data_files"):
            if getattr(inp, k) is not None:
                raise ctx.err(f"input.{k}", "only applies to input.dataset, not input.files", lines.get(k))


def _prompt_checks(ctx: Ctx, cfg: JobConfig, lines: dict, sec_line: int | None) -> None:
    pr = cfg.prompt
    if (pr.column is None) == (pr.messages_column is None):
        which = "both are set" if pr.column is not None else "neither is set"
        raise ctx.err("prompt", f"set exactly one of prompt.column and prompt.messages_column ({which})", sec_line)
    if pr.template is not None:
        if pr.messages_column is not None:
            raise ctx.err("prompt.template", "applies to prompt.column only (messages are used as they are)",
                          lines.get("template"))
        try:
            template_fields(pr.template)
        except ValueError as e:
            raise ctx.err("prompt.template", f"is not a valid template: {e}", lines.get("template")) from None


def _columns_checks(ctx: Ctx, cfg: JobConfig, lines: dict) -> None:
    cols = list(cfg.input.columns)
    for c in cols:
        if c in RESERVED_COLUMNS:
            raise ctx.err("input.columns", f"'{c}' is an output column name; it can't be copied through",
                          lines.get("columns"))
    if len(set(cols)) != len(cols):
        raise ctx.err("input.columns", "lists a column twice", lines.get("columns"))


def structured_checks(ctx: Ctx, cfg: JobConfig, lines: dict[str, dict]) -> None:
    """Structured output, per-row settings and reasoning: shapes, at most one constraint, constraints that compile."""
    sp, out, sl = cfg.sampling, cfg.output, lines["sampling"]
    given = [k for k in CONSTRAINT_KEYS if getattr(sp, k) not in (None, False)]
    if len(given) > 1:
        raise ctx.err(f"sampling.{given[1]}", f"give at most one of sampling.{', sampling.'.join(CONSTRAINT_KEYS)} "
                      f"(also set: sampling.{given[0]})", sl.get(given[1]))
    for k, col in sp.from_columns.items():
        if k not in PER_ROW_KEYS:
            raise ctx.err(f"sampling.from_columns.{k}", f"can't come from a column{did_you_mean(str(k), PER_ROW_KEYS)}",
                          sl.get("from_columns"))
        if not isinstance(col, str) or not col:
            raise ctx.err(f"sampling.from_columns.{k}", f"must name a column, got {type_name(col)}",
                          sl.get("from_columns"))
    if out.reasoning_tags is not None and (len(out.reasoning_tags) != 2 or not all(out.reasoning_tags)):
        raise ctx.err("output.reasoning_tags", "must be two non-empty strings: [open, close]",
                      lines["output"].get("reasoning_tags"))
    if given and given[0] != "json_schema_column":
        problem = constraint_problem(sp)
        if problem is not None:
            raise ctx.err(f"sampling.{given[0]}", problem, sl.get(given[0]))


def constraint_problem(sp: SamplingSection, schema: Any = None) -> str | None:
    """Why the sampling section's constraint (or a per-row `schema`) does not compile, or None. Uses the grammar
    engine itself (llguidance, no tokenizer needed), so a bad schema or regex fails before the model loads."""
    try:
        import llguidance
    except ImportError:
        return "structured output needs llguidance: pip install llguidance (or 'batchgen[structured]')"
    from ...engine.constraints import ConstraintSpec, constraint_of, grammar_text  # the engine's own grammars

    if sp.choice is not None and (not sp.choice or not all(sp.choice)):
        return "must be a non-empty list of non-empty strings"
    m = llguidance.LLMatcher
    try:
        spec = ConstraintSpec("json_schema", json.dumps(schema)) if schema is not None else constraint_of(sp)
        if spec is None:
            return None
        grammar = grammar_text(llguidance, spec)
    except (ValueError, TypeError) as e:
        return f"is not valid: {one_line(str(e))}"
    error = m.validate_grammar(grammar)
    return f"does not compile: {engine_rules.grammar_error_line(error)}" if error else None

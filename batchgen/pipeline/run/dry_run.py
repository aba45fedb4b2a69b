"""`batchgen run --dry-run`: check the job, render the first prompts with their token counts and
estimate the tokens of the whole run; say which implementation, attention backend and dtype the model
gets (model_plan.py). Loads only the tokenizer and config.json."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..sink.manifest import manifest_mismatch
from ..config import JobConfig, job_fingerprint, job_identity, output_dir
from ..prompt.builder import Prompt, PromptBuilder
from ..prompt.tokenizer import load_tokenizer
from ..sink.output_dir import OutputDir
from ..source import open_source
from .engine_setup import model_context
from .model_plan import model_plan


@dataclass
class Sample:
    """What the first rows of the input would give."""

    seen: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    too_long: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, rid: Any, p: Prompt) -> None:
        self.seen += 1
        if p.fatal:
            self.errors.append(f"id={rid!r}: too long: {p.error} (on_too_long: error would stop the job)")
            self.too_long += 1
        elif p.error:
            self.errors.append(f"id={rid!r}: {p.error}")
            self.too_long += int(p.too_long)
        else:
            self.ok += 1
            self.prompt_tokens += len(p.token_ids or [])
            self.truncated += int(p.truncated)


def dry_run(cfg: JobConfig, *, task_id: int = 0, num_tasks: int = 1, preview: int = 3, sample: int = 200,
            tokenizer: Any = None, stream: TextIO | None = None) -> dict:
    """Validate, read the first rows, print rendered prompts with token counts and an estimate
    of the total tokens. Returns the estimate."""
    out = stream or sys.stdout
    source = open_source(cfg, task_id, num_tasks)
    od = OutputDir(output_dir(cfg), task_id, num_tasks)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    limits = [x for x in (model_context(cfg), cfg.engine.max_model_len) if x]
    builder = PromptBuilder(cfg, tok, min(limits) if limits else None)
    print(f"job {cfg.source_path}: model {cfg.model.path}, input {source.description}"
          + (f", task {task_id}/{num_tasks}" if num_tasks > 1 else ""), file=out)
    print(model_plan(cfg).line(), file=out)  # implementation, attention backend, dtype: no weights load
    print(f"chat template: {'applied' if builder.use_chat else 'not applied'}; prompt limit {builder.limit} tokens "
          f"(on_too_long: {cfg.prompt.on_too_long})", file=out)
    if cfg.model.quantization == "fp8":
        print(f"precision: weights fp8 (e4m3, per-channel weight scales, activation scales per token (per token "
              f"per 128 columns in decode steps); FP8 tensor cores on CUDA capability 8.9+, emulated in float32 "
              f"elsewhere), " + ("lm_head fp8 too (one scale per vocabulary row), embeddings "
                                 if cfg.model.quantize_lm_head else "embeddings and lm_head ")
              + f"in model.dtype ({cfg.model.dtype})", file=out)
    if cfg.engine.kv_cache_dtype != "auto":
        print(f"KV cache: {_kv_line(cfg.engine.kv_cache_dtype)}", file=out)
    s, shown_errors = _preview(cfg, source, builder, preview, max(sample, preview), out)
    est = _estimate(cfg, source.total, s, out)
    for e in s.errors[shown_errors:shown_errors + 5]:
        print(f"  error row: {e}", file=out)
    print(f"output {od.path}: {_output_state(cfg, od, source, num_tasks)}", file=out)
    return est


def _kv_line(kv_cache_dtype: str) -> str:
    if kv_cache_dtype != "fp8":
        return kv_cache_dtype
    return ("fp8 e4m3, one k and one v scale per layer (the checkpoint's k_scale / v_scale where it has them, "
            "else 1.0): twice the tokens of a 16-bit cache in the same memory")


def _preview(cfg: JobConfig, source: Any, builder: PromptBuilder, preview: int, limit: int,
             out: TextIO) -> tuple[Sample, int]:
    """Build the first `limit` rows' prompts, printing the first `preview`; (the sample, errors printed)."""
    s, shown, shown_errors = Sample(), 0, 0
    for row in source.rows():
        if s.seen >= limit:
            break
        rid = row.values.get(cfg.input.id_column) if cfg.input.id_column else row.index
        p = Prompt(None, error=row.error) if row.error is not None else builder.build_many([row.values])[0]
        s.add(rid, p)
        if shown < preview:
            shown += 1
            shown_errors += int(bool(p.error))
            print(f"\n--- row id={rid!r} ---", file=out)
            if p.error:
                print(f"[error] {s.errors[-1]}", file=out)
            else:
                print(p.text, file=out)
                print(f"--- {len(p.token_ids or [])} prompt tokens{' (truncated)' if p.truncated else ''} ---", file=out)
    return s, shown_errors


def _estimate(cfg: JobConfig, total: int | None, s: Sample, out: TextIO) -> dict:
    avg = s.prompt_tokens / s.ok if s.ok else 0.0
    est: dict[str, Any] = {"rows": total, "sampled_rows": s.seen, "sampled_errors": len(s.errors),
                           "avg_prompt_tokens": round(avg, 1), "too_long": s.too_long, "truncated": s.truncated}
    print("", file=out)
    print(f"rows: {f'{total:,}' if total is not None else 'unknown'}; sampled {s.seen}: {len(s.errors)} would be "
          f"error rows, {s.truncated} truncated; mean prompt {avg:.1f} tokens", file=out)
    if total is not None:
        ok_frac = s.ok / s.seen if s.seen else 0.0
        est_in = int(avg * total * ok_frac)
        est_out = int(total * ok_frac * cfg.sampling.n * cfg.sampling.max_new_tokens)
        est.update(prompt_tokens=est_in, max_output_tokens=est_out)
        print(f"estimate: ~{est_in:,} prompt tokens, at most {est_out:,} output tokens "
              f"({cfg.sampling.n} sample(s) x {cfg.sampling.max_new_tokens} max_new_tokens)", file=out)
    return est


def _output_state(cfg: JobConfig, od: OutputDir, source: Any, num_tasks: int) -> str:
    existing = od.manifest()
    if existing is None:
        return "new"
    # the run's own comparison: job fingerprint, number of tasks and the input's content
    mismatch = manifest_mismatch(existing, {"fingerprint": job_fingerprint(cfg), "num_tasks": num_tasks,
                                                     "identity": job_identity(cfg), "source": source.identity()})
    if mismatch is None:
        return "exists for this job (a run resumes it)"
    if od.has_committed_rows():
        return f"can't be resumed by this job: {mismatch} (a run is refused without --overwrite)"
    return "holds another job that committed no rows (a run replaces it)"

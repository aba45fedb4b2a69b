"""The job's summary: counts of the whole output, this run's pace, and the cost, computed once."""
from __future__ import annotations

from typing import Any

from ..progress import format_clock


def summary_dict(
    *,
    rows: int,
    samples: int,
    errors: int,
    error_rows: int,
    prompt_tokens: int,
    completion_tokens: int,
    wall_s: float,
    gen_s: float,
    run_completion_tokens: int,
    gpu_busy: float | None,
    cost_per_hour: float | None,
    total_wall_s: float,
    extra: dict | None = None,
) -> dict:
    """rows/errors/tokens are the whole output's; wall and tok/s this run's, plus total_wall_s
    summed over every run of the job (what the cost is computed from)."""
    d: dict[str, Any] = {
        "rows": rows,
        "samples": samples,
        "errors": errors,
        "error_rows": error_rows,
        "prompt_tokens": prompt_tokens,
        "output_tokens": completion_tokens,
        "wall_s": round(wall_s, 3),
        "generation_s": round(gen_s, 3),
        "output_tok_s": round(run_completion_tokens / gen_s, 2) if gen_s > 0 else None,
        "run_output_tokens": run_completion_tokens,
        "gpu_busy_pct": round(100.0 * gpu_busy, 1) if gpu_busy is not None else None,
        "total_wall_s": round(total_wall_s, 3),
        "cost_per_hour": cost_per_hour,
        "usd_per_1m_output_tokens": None,
        "usd_total": None,
    }
    if cost_per_hour is not None:
        usd = cost_per_hour * total_wall_s / 3600.0
        d["usd_total"] = round(usd, 6)
        if completion_tokens > 0:
            d["usd_per_1m_output_tokens"] = round(usd / (completion_tokens / 1e6), 6)
    if extra:
        d.update(extra)
    return d


def format_summary(d: dict) -> str:
    lines = [
        f"rows            {d['rows']:,} ({d['samples']:,} samples)",
        f"errors          {d['errors']:,} samples in {d['error_rows']:,} rows",
        f"tokens in/out   {d['prompt_tokens']:,} / {d['output_tokens']:,}",
        f"wall time       {format_clock(d['wall_s'])} this run ({format_clock(d['total_wall_s'])} all runs)",
        f"output tok/s    {d['output_tok_s'] if d['output_tok_s'] is not None else 'n/a'}",
        f"GPU busy        {str(d['gpu_busy_pct']) + '%' if d['gpu_busy_pct'] is not None else 'n/a'}",
    ]
    if d.get("usd_per_1m_output_tokens") is not None:
        lines.append(f"cost            ${d['usd_per_1m_output_tokens']:.4f} per 1M output tokens (${d['usd_total']:.4f} total)")
    return "\n".join(lines)


def combine_summaries(parts: list[dict], cost_per_hour: float | None) -> dict:
    """The job's summary from its tasks' summaries: counts add up; wall time is the longest
    task's (they run side by side), cost the sum of all tasks' time."""
    add = ["rows", "samples", "errors", "error_rows", "prompt_tokens", "output_tokens", "run_output_tokens", "shards"]
    d: dict[str, Any] = {k: sum(int(p.get(k) or 0) for p in parts) for k in add}
    d["num_tasks"] = len(parts)
    d["wall_s"] = max(float(p.get("wall_s") or 0) for p in parts)
    d["total_wall_s"] = round(sum(float(p.get("total_wall_s") or 0) for p in parts), 3)
    d["output_tok_s"] = round(sum(float(p.get("output_tok_s") or 0) for p in parts), 2)
    busy = [p["gpu_busy_pct"] for p in parts if p.get("gpu_busy_pct") is not None]
    d["gpu_busy_pct"] = round(sum(busy) / len(busy), 1) if busy else None
    d["cost_per_hour"] = cost_per_hour
    d["usd_total"] = d["usd_per_1m_output_tokens"] = None
    if cost_per_hour is not None:
        usd = cost_per_hour * d["total_wall_s"] / 3600.0
        d["usd_total"] = round(usd, 6)
        if d["output_tokens"]:
            d["usd_per_1m_output_tokens"] = round(usd / (d["output_tokens"] / 1e6), 6)
    return d

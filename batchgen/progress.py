"""Progress: a tqdm bar on a terminal, plain periodic log lines otherwise (Slurm logs); the
per-task progress file that `batchgen status` reads; the end-of-run summary."""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, TextIO

from .sink import now_iso, write_json_atomic


def _fmt_dur(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Rows done of total (when known), output tok/s, ETA.

    mode: "bar" (tqdm), "log" (a line every log_every seconds) or "off"; "auto" picks bar when
    the stream is a terminal."""

    def __init__(
        self,
        total: int | None,
        done: int = 0,
        *,
        mode: str = "auto",
        log_every: float = 30.0,
        stream: TextIO | None = None,
        label: str = "",
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.total = total
        self.done = done
        self.start_done = done
        self.out_tokens = 0  # this run
        self.errors = 0  # this run (input rows)
        self.t0 = time.monotonic()
        self.log_every = log_every
        self._last_log = self.t0
        self.label = label
        self._bar = None
        self._last_bar_post = 0.0
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=done, unit="row", desc=label or "rows", file=self.stream,
                dynamic_ncols=True, smoothing=0.05,
            )

    def start_clock(self) -> None:
        """Call when generation starts (after the model loaded), so tok/s excludes loading."""
        self.t0 = time.monotonic()
        self._last_log = self.t0
        if self._bar is not None:
            self._bar.start_t = self._bar._time()
            self._bar.last_print_t = self._bar.start_t

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.t0, 1e-9)

    @property
    def tok_s(self) -> float:
        return self.out_tokens / self.elapsed

    @property
    def rows_s(self) -> float:
        return (self.done - self.start_done) / self.elapsed

    def eta(self) -> float | None:
        if self.total is None or self.rows_s <= 0:
            return None
        return max(self.total - self.done, 0) / self.rows_s

    def update(self, rows: int = 1, out_tokens: int = 0, errors: int = 0) -> None:
        self.done += rows
        self.out_tokens += out_tokens
        self.errors += errors
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(rows)
            if now - self._last_bar_post > 0.5:
                self._bar.set_postfix_str(f"{self.tok_s:,.1f} tok/s, {self.errors} err", refresh=False)
                self._last_bar_post = now
        elif self.mode == "log" and now - self._last_log >= self.log_every:
            self._last_log = now
            self.log_line()

    def line(self) -> str:
        tot = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        return (
            f"{self.label + ': ' if self.label else ''}{self.done}{tot} rows{pct}, "
            f"{self.tok_s:,.1f} output tok/s, {self.errors} errors, "
            f"elapsed {_fmt_dur(self.elapsed)}, ETA {_fmt_dur(self.eta())}"
        )

    def log_line(self) -> None:
        print(f"[batchgen {time.strftime('%H:%M:%S')}] {self.line()}", file=self.stream, flush=True)

    def message(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tok_s:,.1f} tok/s, {self.errors} err", refresh=True)
            self._bar.close()
            self._bar = None
        elif self.mode == "log":
            self.log_line()


_identity: dict[str, Any] = {}  # this process's pid, host, start time and boot id (pid-keyed: a fork is another)


def process_identity() -> dict[str, Any]:
    """Who writes the progress file: with pid_start (the pid's start time) and boot_id, `batchgen
    status` on the same host can tell that the writer is gone, even once its pid is reused."""
    from .status import boot_id, process_start_ticks

    pid = os.getpid()
    if _identity.get("pid") != pid:
        _identity.clear()
        _identity.update(pid=pid, host=socket.gethostname(), pid_start=process_start_ticks(pid), boot_id=boot_id())
    return dict(_identity)


def write_task_progress(path: os.PathLike[str] | str, **fields: Any) -> None:
    """The per-task progress file: state (running|stopped|failed|done), rows_done, rows_total,
    shards, output_tokens, tok_s, updated_at, pid, host, pid_start, boot_id..."""
    from pathlib import Path

    data = {"updated_at": now_iso(), "updated_unix": time.time(), **process_identity()}
    data.update(fields)
    write_json_atomic(Path(path), data)


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
        f"wall time       {_fmt_dur(d['wall_s'])} this run ({_fmt_dur(d['total_wall_s'])} all runs)",
        f"output tok/s    {d['output_tok_s'] if d['output_tok_s'] is not None else 'n/a'}",
        f"GPU busy        {str(d['gpu_busy_pct']) + '%' if d['gpu_busy_pct'] is not None else 'n/a'}",
    ]
    if d.get("usd_per_1m_output_tokens") is not None:
        lines.append(f"cost            ${d['usd_per_1m_output_tokens']:.4f} per 1M output tokens (${d['usd_total']:.4f} total)")
    return "\n".join(lines)

"""The terminal progress of a run: a tqdm bar on a terminal, plain periodic log lines otherwise
(Slurm logs). The per-task progress file that `batchgen status` reads is task_progress.py."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, TextIO


def format_clock(s: float | None) -> str:
    """Seconds as MM:SS or H:MM:SS ("?" when unknown)."""
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Rows done of total (when known), output tok/s, ETA.

    mode: "bar" (tqdm), "log" (a line every log_every seconds) or "off"; "auto" picks bar when
    the stream is a terminal.

    Live tokens: rows finish late (a row is done only when all its samples are), so tok/s and
    the ETA counted from finished rows alone are far off at the start. Give `generated`, a callable
    returning the engine's running count of sampled tokens (engine.generated_tokens), or push that
    count with set_generated(n): tok/s then counts every token as it is sampled, and the ETA is the
    token work left (rows left x tokens per row, less what in-flight rows already have) over that
    rate. With a callable, the bar or the log line is also refreshed while no row finishes.
    `tokens_per_row` (n x max_new_tokens, an upper bound) steadies that estimate until rows finish."""

    TICK_S = 1.0  # refresh of the bar (and check for a due log line) while no row finishes

    def __init__(
        self,
        total: int | None,
        done: int = 0,
        *,
        mode: str = "auto",
        log_every: float = 30.0,
        stream: TextIO | None = None,
        label: str = "",
        generated: Callable[[], int] | None = None,
        tokens_per_row: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.total = total
        self.done = done
        self.start_done = done
        self.out_tokens = 0  # this run, of finished rows
        self.errors = 0  # this run (input rows)
        self.clock = clock
        self.t0 = clock()
        self.log_every = log_every
        self._last_log = self.t0
        self.label = label
        self.suffix = ""  # appended to the line and the bar's postfix (a data-parallel run: the workers' states)
        self._generated_fn = generated
        self._generated: int | None = None  # the engine's count, last seen
        self._generated_base = 0  # ... at start_clock: tokens sampled before are not this run's
        self.tokens_per_row = tokens_per_row
        self._lock = threading.RLock()  # the ticker thread and the caller both draw (RLock: a signal handler may re-enter)
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        self._redraw = False
        self._bar = None
        self._last_bar_post = 0.0
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=done, unit="row", desc=label or "rows", file=self.stream,
                dynamic_ncols=True, smoothing=0.05, bar_format=self._bar_format(total),
            )

    @staticmethod
    def _bar_format(total: int | None) -> str:
        # the bar's own [elapsed<remaining, rate] counts finished rows only: ours is in the postfix
        return ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]" if total
                else "{desc}: {n_fmt} rows [{elapsed}{postfix}]")

    def set_total(self, total: int | None) -> None:
        """The total, once it is known (a data-parallel run learns it from its workers' files)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.bar_format = self._bar_format(total)
                self._redraw = True

    # ------------------------------------------------------------------ clock and counts
    def start_clock(self) -> None:
        """Call when generation starts (after the model loaded), so tok/s excludes loading."""
        self.t0 = self.clock()
        self._last_log = self.t0
        self._read_generated()
        self._generated_base = self._generated or 0
        if self._bar is not None:
            self._bar.start_t = self._bar._time()
            self._bar.last_print_t = self._bar.start_t
        self._start_ticker()

    def track_tokens(self, generated: Callable[[], int], tokens_per_row: float | None = None) -> None:
        """Follow a live token count from now on: `generated=` for a Progress made before the engine."""
        self._generated_fn = generated
        if tokens_per_row is not None:
            self.tokens_per_row = tokens_per_row
        self._read_generated()
        self._generated_base = self._generated or 0
        self._start_ticker()

    def _start_ticker(self) -> None:
        if self._generated_fn is not None and self.mode in ("bar", "log") and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="batchgen-progress", daemon=True)
            self._ticker.start()

    def set_generated(self, n: int) -> None:
        """The engine's running count of sampled tokens (all samples, finished or not)."""
        self._generated = int(n)

    def _read_generated(self) -> None:
        if self._generated_fn is not None:
            try:
                self._generated = int(self._generated_fn())
            except Exception:  # noqa: BLE001 - a progress display must never stop the job
                self._generated_fn = None

    @property
    def live(self) -> bool:
        """Whether tok/s and the ETA come from the live token count."""
        return self._generated is not None

    @property
    def generated_tokens(self) -> int:
        """Tokens sampled this run: the live count (read now), else the finished rows' tokens."""
        self._read_generated()
        if self._generated is None:
            return self.out_tokens
        return max(self._generated - self._generated_base, self.out_tokens)

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.t0, 1e-9)

    @property
    def tok_s(self) -> float:
        return self.generated_tokens / self.elapsed

    @property
    def rows_s(self) -> float:
        return (self.done - self.start_done) / self.elapsed

    def _tokens_per_row(self) -> float | None:
        """Output tokens per input row: the finished rows' mean, with the upper bound (when given)
        counted as one more row, so the first short completions don't make the ETA collapse."""
        rows = self.done - self.start_done
        if self.tokens_per_row is not None:
            return (self.out_tokens + self.tokens_per_row) / (rows + 1)
        return self.out_tokens / rows if rows > 0 and self.out_tokens > 0 else None

    def eta(self) -> float | None:
        if self.total is None:
            return None
        left = max(self.total - self.done, 0)
        if left == 0:
            return 0.0
        pace = left / self.rows_s if self.rows_s > 0 else None  # at the finished rows' pace
        per_row = self._tokens_per_row() if self.live else None
        if per_row is None or self.tok_s <= 0:  # no live count (or no token yet)
            return pace
        in_flight = max(self.generated_tokens - self.out_tokens, 0)  # already sampled for unfinished rows
        work = left * per_row - in_flight
        by_tokens = work / self.tok_s if work > 0 else None
        # Rows finish shortest first, so the finished rows' mean underestimates the running ones: once a
        # quarter of this run's rows are done, their pace bounds the ETA from below (make demo showed
        # "ETA 00:00" at 37% when every row was running and the short ones had finished)
        finished = self.done - self.start_done
        settled = pace is not None and finished >= 0.25 * max(self.total - self.start_done, 1)
        figures = [x for x in (by_tokens, pace if settled or by_tokens is None else None) if x is not None]
        return max(figures) if figures else None

    # ------------------------------------------------------------------ drawing
    def update(self, rows: int = 1, out_tokens: int = 0, errors: int = 0) -> None:
        self.done += rows
        self.out_tokens += out_tokens
        self.errors += errors
        self._read_generated()
        with self._lock:
            if self._bar is not None:
                self._bar.update(rows)
            self._refresh(force=False)

    def _refresh(self, force: bool) -> None:
        """Postfix of the bar (at most every 0.5 s) or a log line when due. Holds self._lock."""
        now = self.clock()
        if self._bar is not None:
            if force or self._redraw or now - self._last_bar_post > 0.5:
                self._bar.set_postfix_str(self._postfix(), refresh=force or self._redraw)
                self._last_bar_post = now
                self._redraw = False
        elif self.mode == "log" and now - self._last_log >= self.log_every:
            self._last_log = now
            self.log_line()

    def _tick(self) -> None:
        """While generating: redraw with the live count, even when no row finishes for minutes."""
        while not self._closed.wait(max(0.05, min(self.TICK_S, self.log_every))):
            self._read_generated()
            with self._lock:
                if self._closed.is_set():
                    return
                self._refresh(force=self._bar is not None)

    def _postfix(self) -> str:
        eta = self.eta()
        return f"{self.tok_s:,.1f} tok/s, ETA {format_clock(eta)}, {self.errors} err" + (
            f", {self.suffix}" if self.suffix else "")

    def line(self) -> str:
        tot = f"/{self.total}" if self.total is not None else ""
        pct = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        return (
            f"{self.label + ': ' if self.label else ''}{self.done}{tot} rows{pct}, "
            f"{self.tok_s:,.1f} output tok/s, {self.errors} errors, "
            f"elapsed {format_clock(self.elapsed)}, ETA {format_clock(self.eta())}"
            + (f" [{self.suffix}]" if self.suffix else "")
        )

    def log_line(self) -> None:
        print(f"[batchgen {time.strftime('%H:%M:%S')}] {self.line()}", file=self.stream, flush=True)

    def message(self, msg: str) -> None:
        """A line above the bar (tqdm.write clears and redraws it), or a plain line. Not from a
        signal handler: use urgent()."""
        with self._lock:
            if self._bar is not None:
                self._bar.write(msg, file=self.stream)
            else:
                print(msg, file=self.stream, flush=True)

    def urgent(self, msg: str) -> None:
        """Print `msg` at once, in any mode, also from a signal handler while the bar is drawn:
        one os.write to the stream's file descriptor (a print could re-enter the stream's buffered
        writer, or wait for a lock the interrupted code holds). The bar's line is blanked first and
        the bar redrawn at its next refresh."""
        text = msg + "\n"
        if self._bar is not None:
            width = getattr(self._bar, "ncols", None) or 80
            text = "\r" + " " * (width - 1) + "\r" + text
            self._redraw = True
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (io.StringIO): nothing to re-enter
            self.stream.write(text)
            return
        try:
            self.stream.flush()  # what was printed before goes first, unless that re-enters the writer
        except (RuntimeError, OSError, ValueError):
            pass
        data = text.encode("utf-8", "replace")
        while data:
            try:
                data = data[os.write(fd, data):]
            except InterruptedError:
                continue
            except OSError:
                return  # a closed terminal: the message can't be shown, the stop goes on

    def close(self) -> None:
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        self._read_generated()
        with self._lock:
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(), refresh=True)
                self._bar.close()
                self._bar = None
            elif self.mode == "log":
                self.log_line()

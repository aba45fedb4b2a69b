"""The run loop: source -> prompts -> engine.stream -> shards; signals, progress, summary.

    job = Job(cfg, task_id=0, num_tasks=1)
    code = job.run()          # exit code: 0 done (or already done), 1 failed, 2 refused,
                              # 128+signal when stopped by a signal (130 SIGINT, 143 SIGTERM)

Graceful stop, from a signal handler or another thread: `job.request_stop(reason, exit_code=...)`
stops admitting new rows, lets in-flight rows finish for up to output.stop_grace_seconds, commits
every completed row to a shard and makes run() return `exit_code`. A second request (or the
grace deadline) abandons the in-flight rows (they are redone on the next run). `job.stop_signals`
(default {SIGTERM: 143, SIGINT: 130}) maps the signals run() handles to exit codes; add one
before run() (e.g. `job.stop_signals[signal.SIGUSR1] = 99`) to get the same graceful stop.
After run(), `job.stopped_by` is the signal number (or None) and `job.stop_reason` the text.
`job.on_stop` callbacks run after the final flush of a stopped run.

`Job(cfg, retry_errors=True)` generates the output's error rows again (rows that failed, e.g. a
prompt that did not fit the KV cache of the engine settings of the time): each one's new rows
replace its old ones in the shard that holds them (rewritten atomically), so every (row, sample)
stays in the output exactly once.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import pyarrow as pa

from . import sink as sinkmod
from .config import CONSTRAINT_KEYS, ConfigError, JobConfig, job_fingerprint, job_identity, output_dir
from .pipeline.run.summary import combine_summaries, format_summary, summary_dict
from .progress import Progress, write_task_progress
from .reasoning import DEFAULT_TAGS, split_reasoning
from .reasoning import reasoning_tags as reasoning_tags_of
from .request_params import RowParamsError, request_params
from .prompts import PromptBuilder, load_tokenizer, model_location, row_seed
from .sink import (IntervalSet, Ledger, LinkError, OutputDir, OutputError, ShardWriter, WriteError, column_value,
                   output_schema)
from .sources import ROW_ERROR, InputError, Source, open_source

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _HardStop(BaseException):
    """Raised in the main thread by a signal handler to leave engine.stream at once."""


def task_from_env() -> tuple[int, int]:
    """(task_id, num_tasks) from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else (0, 1).
    Array ids are made 0-based with SLURM_ARRAY_TASK_MIN."""
    tid = os.environ.get("SLURM_ARRAY_TASK_ID")
    cnt = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if tid is None or cnt is None:
        return 0, 1
    try:
        t, n = int(tid), int(cnt)
        t -= int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
    except ValueError:
        return 0, 1
    return t, n


def make_engine(cfg: JobConfig) -> Any:
    """Load the engine for a job (imports torch and the engine only here)."""
    from .config import engine_kwargs
    from .engine.engine import Engine

    return Engine.from_pretrained(model_location(cfg), **engine_kwargs(cfg))  # what preflight checked


def sampling_params(cfg: JobConfig, seed: int, row: dict[str, Any] | None = None) -> Any:
    """The SamplingParams of one row (request_params: the job's values and the row's own)."""
    return request_params(cfg, seed, row)


TOP_LOGPROB = pa.struct([pa.field("id", pa.int64()), pa.field("logprob", pa.float32())])


def extra_fields(cfg: JobConfig) -> list[pa.Field]:
    """Output columns the job asked for beyond the fixed ones: reasoning, logprobs, top_logprobs."""
    out = []
    if cfg.output.reasoning:
        out.append(pa.field("reasoning", pa.string()))
    if cfg.sampling.logprobs:
        out.append(pa.field("logprobs", pa.list_(pa.float32())))
    if cfg.sampling.top_logprobs:
        out.append(pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))))
    return out


def generation_extras(cfg: JobConfig, c: Any, failed: bool, tags: tuple[str, str] | None) -> dict[str, Any]:
    """A sample's values of the extra columns (the completion's reasoning split off in place of its text)."""
    extra: dict[str, Any] = {}
    if tags is not None and not failed and c.text is not None:
        extra["reasoning"], extra["completion"] = split_reasoning(c.text, tags)
    if cfg.sampling.logprobs:
        extra["logprobs"] = None if failed else c.logprobs
    if cfg.sampling.top_logprobs:
        extra["top_logprobs"] = None if failed or c.top_logprobs is None else [
            [{"id": i, "logprob": lp} for i, lp in pos] for pos in c.top_logprobs]
    return extra


def id_column_type(source: Source, id_column: str | None) -> pa.DataType:
    """The output's id type: int64 for row positions, else the input's type of input.id_column
    (sources.py makes a row whose id that type can't hold an error row, so no id is lost as null)
    when it is a number or a string, widened so that the id a row without one gets from its
    position fits (int64, float64; uint64 as text); another type (dates, bytes...) is kept as text."""
    if not id_column:
        return pa.int64()
    t = source.types.get(id_column)
    if t is None:
        return pa.string()
    if pa.types.is_integer(t):  # int64 holds any narrower int and the negative ids rows get from positions
        return pa.string() if t == pa.uint64() else pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return pa.large_string() if pa.types.is_large_string(t) else pa.string()


def position_id(id_type: pa.DataType, index: int) -> Any:
    """The id of a row that has none (null, or a line that could not be read), from its index in
    the input: unique, and never a real id's look-alike by accident."""
    if pa.types.is_integer(id_type) or pa.types.is_floating(id_type):
        return -(index + 1)
    return f"__batchgen_row_{index}"


def _short(v: Any, limit: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("batchgen")
    except Exception:  # noqa: BLE001
        return "0+unknown"


class Job:
    def __init__(
        self,
        cfg: JobConfig,
        *,
        task_id: int = 0,
        num_tasks: int = 1,
        overwrite: bool = False,
        progress: str = "auto",
        log_every: float = 30.0,
        engine: Any = None,
        engine_factory: Callable[[JobConfig], Any] | None = None,
        tokenizer: Any = None,
        stream: TextIO | None = None,
        retry_errors: bool = False,
    ) -> None:
        self.cfg = cfg
        self.task_id, self.num_tasks = task_id, num_tasks
        self.overwrite = overwrite
        self.retry_errors = retry_errors
        self.progress_mode = progress
        self.log_every = log_every
        self._engine = engine
        self._engine_factory = engine_factory or make_engine
        self._tokenizer = tokenizer
        self.out = stream or sys.stderr
        self.stop_signals: dict[int, int] = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}
        self.on_stop: list[Callable[[Job], None]] = []
        self.stop_reason: str | None = None
        self.stopped_by: int | None = None
        self.summary: dict | None = None
        self.rows_committed_this_run = 0  # rows in the shards this run committed (slurm: no requeue without progress)
        self._stop = threading.Event()
        self._hard = threading.Event()
        self._stop_code = EXIT_FAILED
        self._stop_deadline: float | None = None
        self._in_stream = False
        self._fatal: str | None = None
        self._fatal_code = EXIT_FAILED
        self._fatal_hint = ""
        self._lock = threading.Lock()
        self.tokenize_batch = 64  # rows rendered and tokenized together
        self._writer: ShardWriter | None = None
        self._prog: Progress | None = None
        self._in_flight: dict | None = None  # the loop's rows sent to the engine and not back yet
        self._notice: str | None = None  # a stop notice the signal handler could not print
        self._dropped = 0  # input rows completed but not committed (a commit failed)
        self._progress_warned = False

    # ------------------------------------------------------------------ stopping
    def request_stop(self, reason: str, *, exit_code: int = EXIT_FAILED, hard: bool = False, signum: int | None = None) -> None:
        """Stop admitting rows, finish or abandon in-flight ones, flush, return exit_code.
        Safe from signal handlers and other threads; a second call makes the stop hard."""
        if self._stop.is_set():
            hard = True
        else:
            self.stop_reason = reason
            self.stopped_by = signum
            self._stop_code = exit_code
            grace = self.cfg.output.stop_grace_seconds
            self._stop_deadline = time.monotonic() + grace
            self._stop.set()
        if hard:
            self._hard.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        first = not self._stop.is_set()
        self.request_stop(f"stopped by {name}", exit_code=self.stop_signals.get(signum, 128 + signum), signum=signum)
        if first:
            self._stop_notice()
        if first and self.cfg.output.stop_grace_seconds > 0:
            try:
                signal.setitimer(signal.ITIMER_REAL, self.cfg.output.stop_grace_seconds)
            except (ValueError, OSError):
                pass
        if not first or self.cfg.output.stop_grace_seconds <= 0:
            self._hard.set()
            if self._can_raise():
                raise _HardStop()

    def _stop_notice(self) -> None:
        """Say at once what the stop does (a row can take the whole grace period to come back,
        and nothing else is printed meanwhile). From a signal handler: Progress.urgent writes
        without re-entering the stream's writer; without a Progress, a print that would is left
        to the loop."""
        n = len(self._in_flight or {})
        grace = self.cfg.output.stop_grace_seconds
        if grace > 0 and n:
            msg = f"stopping: finishing {n} in-flight rows (up to {grace:g} s); press Ctrl-C again to stop now"
        elif n:
            msg = f"stopping now: {n} in-flight rows are generated again on the next run"
        else:
            msg = "stopping: committing what is done"
        try:
            (self._prog.urgent if self._prog is not None else self.say)(msg)
        except (RuntimeError, OSError, ValueError):
            self._notice = msg

    def _on_alarm(self, signum: int, frame: Any) -> None:
        self._hard.set()
        if self._can_raise():
            raise _HardStop()

    def _can_raise(self) -> bool:
        """Leave engine.stream at once only while inside it and not in the middle of a commit."""
        w = self._writer
        return self._in_stream and not (w is not None and w.busy)

    def _install_signals(self) -> dict[int, Any]:
        old: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for s in list(self.stop_signals) + [signal.SIGALRM]:
            try:
                old[s] = signal.signal(s, self._on_alarm if s == signal.SIGALRM else self._on_signal)
            except (ValueError, OSError):
                pass
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        except (ValueError, OSError):
            pass
        for s, h in old.items():
            try:
                signal.signal(s, h)
            except (ValueError, OSError):
                pass

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # ------------------------------------------------------------------ setup
    def _manifest(self, source: Source, schema: pa.Schema) -> dict:
        cfg = self.cfg
        return {
            "format": sinkmod.FORMAT_VERSION,
            "fingerprint": job_fingerprint(cfg),
            "identity": job_identity(cfg),
            "num_tasks": self.num_tasks,
            "source": source.identity(),
            "schema": sinkmod.schema_to_b64(schema),
            "job_file": cfg.source_path,
            "config": cfg.to_dict(),
            "created": sinkmod.now_iso(),
            "batchgen_version": _version(),
        }

    def _schema(self, source: Source) -> pa.Schema:
        cfg = self.cfg
        copied = [(c, source.types.get(c, pa.string())) for c in cfg.input.columns]
        copied = [(c, pa.string() if pa.types.is_null(t) else t) for c, t in copied]
        return output_schema(id_column_type(source, cfg.input.id_column), copied, extra_fields(cfg))

    def _footer(self, source: Source) -> dict:
        cfg = self.cfg
        return {
            "format": sinkmod.FORMAT_VERSION,
            "fingerprint": job_fingerprint(cfg),
            "source_sha": sinkmod.source_sha(source.identity()),
            "model": {"path": cfg.model.path, "dtype": cfg.model.dtype},
            "sampling": json.loads(json.dumps(cfg.to_dict()["sampling"])),
            "prompt": cfg.to_dict()["prompt"],
            "batchgen_version": _version(),
        }

    def _is_done(self, source: Source, done: IntervalSet, prev: dict | None) -> bool:
        if source.total is not None:
            return done.covers(source.total)
        return bool(prev and prev.get("state") == "done" and prev.get("limit") == self.cfg.input.limit)

    def _read_progress(self, od: OutputDir) -> dict | None:
        """The previous run's progress file: advisory (the ledger is the checkpoint), so one that
        is unreadable is said and rewritten, never fatal."""
        data, why = sinkmod.read_json_checked(od.progress_path())
        if why is None and not isinstance(data, dict):
            why = "unreadable (not a JSON object)"
        if why is not None and why != "missing":
            self.say(f"warning: {od.progress_path()} is {why}; it only reports progress (the shards and "
                     f"{od.ledger_path()} are the checkpoint), so it is written again")
            return None
        return data

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        t_start = time.monotonic()
        cfg = self.cfg
        source = open_source(cfg, self.task_id, self.num_tasks)  # ConfigError: files, columns
        od = OutputDir(output_dir(cfg), self.task_id, self.num_tasks)
        try:
            od.lock()  # before prepare: --overwrite must not clear a running task's output
            manifest = od.prepare(self._manifest(source, self._schema(source)), overwrite=self.overwrite,
                                  say=self.say)
            schema = sinkmod.schema_from_b64(manifest["schema"])
            return self._run_locked(source, od, schema, t_start)
        except WriteError as e:  # before any row: the disk is full, a file can't be written
            self.say(f"error: {e}; nothing more was written: fix that, then run the same command to resume")
            return EXIT_FAILED
        finally:
            od.unlock()

    def _retry_set(self, led: Ledger) -> dict[int, str]:
        """--retry-errors: position -> shard of every error row that can be replaced in place."""
        retry: dict[int, str] = {}
        old = 0
        for rec in led.records.values():
            if rec.error_rows and rec.layout != "sorted":
                old += rec.error_rows  # rows of a shard of batchgen < 2 can't be found by position
                continue
            for p in IntervalSet(rec.error_positions).points():
                retry[p] = rec.name
        if old:
            self.say(f"warning: {old:,} error row(s) are in shards written by an older batchgen, which don't record "
                     "where each row is: they can't be retried in place and are kept")
        return retry

    def _run_locked(self, source: Source, od: OutputDir, schema: pa.Schema, t_start: float) -> int:
        cfg = self.cfg
        fp = job_fingerprint(cfg)
        led, removed = od.open_ledger(fp, say=self.say)
        prev = self._read_progress(od)
        prev_wall = float((prev or {}).get("total_wall_s", 0.0) or 0.0)
        label = f"task {self.task_id}/{self.num_tasks}" if self.num_tasks > 1 else ""
        retry = self._retry_set(led) if self.retry_errors else {}
        skip = led.done.minus(IntervalSet.from_points(retry)) if retry else led.done
        if not retry and self._is_done(source, skip, prev):
            if not prev or prev.get("state") != "done":  # killed after its last commit: record it
                summ = summary_dict(
                    rows=led.rows, samples=led.samples, errors=led.errors, error_rows=led.error_rows,
                    prompt_tokens=led.prompt_tokens, completion_tokens=led.completion_tokens, wall_s=0.0, gen_s=0.0,
                    run_completion_tokens=0, gpu_busy=None, cost_per_hour=cfg.cost_per_hour, total_wall_s=prev_wall,
                    extra={"task_id": self.task_id, "num_tasks": self.num_tasks, "rows_total": source.total,
                           "shards": len(led.shards), "output": str(od.path), "state": "done"},
                )
                write_task_progress(od.progress_path(), task_id=self.task_id, num_tasks=self.num_tasks, state="done",
                                    rows_done=led.rows, rows_total=source.total, limit=cfg.input.limit,
                                    shards=len(led.shards), output_tokens=led.completion_tokens, errors=led.errors,
                                    tok_s=None, total_wall_s=prev_wall, fingerprint=fp, summary=summ)
                sinkmod.write_json_atomic(od.summary_path(), summ)
                if self.num_tasks > 1:
                    self._combined_summary(od)
            if self.retry_errors:
                hint = "; no error rows to retry"
            elif led.error_rows:
                hint = f"; {led.error_rows:,} of them failed: rerun with --retry-errors to generate those again"
            else:
                hint = ""
            self.say(
                f"nothing to do: {od.path} is complete ({led.rows:,} rows, {led.samples:,} output rows "
                f"in {len(led.shards)} shards{', task ' + str(self.task_id) if self.num_tasks > 1 else ''}){hint}"
            )
            return EXIT_OK
        if retry:
            self.say(f"retrying {len(retry):,} error row(s) of {od.path}: their new rows replace the old ones in the "
                     f"{len(set(retry.values()))} shard(s) that hold them")
        elif led.rows:
            left = f" of {source.total:,}" if source.total is not None else ""
            self.say(f"resuming {od.path}: {led.rows:,} rows{left} already done in {len(led.shards)} shards"
                     + (f" (removed {removed} unfinished temp shard(s))" if removed else ""))

        # tokenizer first: a bad model path or chat template fails before the model loads
        tok = self._tokenizer
        if tok is None and self._engine is not None:
            tok = getattr(self._engine, "tokenizer", None)
        if tok is None:
            tok = load_tokenizer(cfg)
        builder = PromptBuilder(cfg, tok)

        writer: ShardWriter | None = None
        prog: Progress | None = None

        def progress_file(state: str, **kw: Any) -> None:
            live = writer.ledger if writer is not None else led
            run_tokens = prog.out_tokens if prog is not None else 0
            try:
                write_task_progress(
                    od.progress_path(),
                    task_id=self.task_id,
                    num_tasks=self.num_tasks,
                    state=state,
                    rows_done=live.rows,
                    rows_total=source.total,
                    limit=cfg.input.limit,
                    shards=len(live.records),
                    output_tokens=live.completion_tokens,
                    errors=live.errors,
                    tok_s=round(prog.tok_s, 2) if prog is not None and run_tokens else None,
                    run_started_unix=time.time() - (time.monotonic() - t_start),
                    total_wall_s=round(prev_wall + time.monotonic() - t_start, 3),
                    fingerprint=fp,
                    **kw,
                )
            except LinkError:
                raise
            except WriteError as e:  # progress is advisory: a commit that can't be made stops the job
                if not self._progress_warned:
                    self._progress_warned = True
                    self.say(f"warning: {e}")

        progress_file("loading")
        if self._stop.is_set():  # stopped (e.g. a Slurm signal) before the model loaded
            progress_file("stopped", reason=self.stop_reason)
            for cb in self.on_stop:
                cb(self)
            self.say(f"{self.stop_reason}: stopped before loading the model; run the same command to resume")
            return self._stop_code
        engine = self._engine
        if engine is None:
            self.say(f"loading model {cfg.model.path} ...")
            try:
                engine = self._engine_factory(cfg)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001
                from_ms = _model_source_error(e)
                if from_ms:
                    raise ConfigError(f"{cfg.source_path}: model.path: {from_ms}") from None
                progress_file("failed", error=f"{type(e).__name__}: {e}")
                raise
            if hasattr(engine, "describe"):
                self.say(f"engine: {engine.describe()}")
        try:
            max_len = getattr(engine, "max_model_len", None)
            builder = PromptBuilder(cfg, tok, max_len)
            writer = ShardWriter(
                od, schema, self._footer(source),
                rows_per_shard=cfg.output.rows_per_shard, compression=cfg.output.compression,
                flush_seconds=cfg.output.flush_seconds, ledger=led, retry=retry,
            )
            self._writer = writer
            prog = Progress(source.total, len(skip) if source.total is not None else led.rows,
                            mode=self.progress_mode, log_every=self.log_every, stream=self.out, label=label)
            self._prog = prog
            old = self._install_signals()
            try:
                code = self._loop(source, skip, builder, engine, writer, prog, progress_file)
            except OutputError as e:  # a commit refused or failed (disk full, a link, the output replaced)
                self._set_fatal(e)
                self._dropped += writer.discard()
                code = self._fatal_code
            except InputError as e:  # an input file unreadable or changed mid-run: one line naming it, rows done kept
                self._fatal, self._fatal_code, self._fatal_hint = str(e), EXIT_USAGE, ""
                code = EXIT_USAGE
            except Exception as e:  # noqa: BLE001 - flush what is complete, then report
                import traceback

                traceback.print_exc(file=self.out)
                self._fatal = f"{type(e).__name__}: {e}"
                code = EXIT_FAILED
            finally:
                self._restore_signals(old)
        finally:
            if self._engine is None and engine is not None:
                try:
                    engine.close()
                except Exception:  # noqa: BLE001
                    pass
        return self._finish(code, od, source, led, writer, prog, engine, progress_file, t_start, prev_wall)

    def _row_values(self, schema: pa.Schema, pos: int, idx: int, row: dict) -> tuple[Any, dict, str | None]:
        """(id, copied columns, error) of one input row as the output holds them. An id is never
        null: a row without a usable one (not readable, a null id, an id its column can't hold:
        an error row) gets one from its position in the input, so (id, sample_index) stays
        unique; a copied value its column can't hold makes the row an error row that says so."""
        cfg = self.cfg
        id_col = cfg.input.id_column
        raw = row.get(id_col) if id_col else idx
        id_type = schema.field("id").type
        err = None
        fits, rid = column_value(raw, id_type)
        if raw is None or not fits:  # a row that could not be read, a null id, an id of another type
            ok, rid = column_value(position_id(id_type, idx), id_type)
            if not ok:  # an id column typed by an older batchgen (e.g. int32): never write a null instead
                raise OutputError(f"row {idx} has no usable id, and this output's id column ({id_type}, set by an "
                                  "older batchgen) can't hold one made from its position: write to a new output.path")
            if ROW_ERROR not in row:
                err = (f"id column '{id_col}' " + ("is null" if raw is None else
                       f"value {_short(raw)} does not fit the output's id column ({id_type})")
                       + f"; the row's id {rid!r} is made from its position in the input")
        copied: dict[str, Any] = {}
        for c in cfg.input.columns:
            t = schema.field(c).type
            fits, v = column_value(row.get(c), t)
            copied[c] = v if fits else None
            if not fits and err is None:
                err = (f"input.columns '{c}': value {_short(row.get(c))} does not fit the column's type {t} (taken from "
                       "the first rows of the input); the row was not generated")
        return rid, copied, err

    def _loop(self, source: Source, skip: IntervalSet, builder: PromptBuilder, engine: Any, writer: ShardWriter,
              prog: Progress, progress_file: Callable[..., None]) -> int:
        from .engine.request import GenerationRequest

        cfg = self.cfg
        n = cfg.sampling.n
        schema = writer.schema
        reasoning_tags = (tuple(cfg.output.reasoning_tags) if cfg.output.reasoning_tags else
                          reasoning_tags_of(builder.tok) or DEFAULT_TAGS) if cfg.output.reasoning else None
        pending: dict[int, tuple[Any, dict, int | None]] = {}
        self._in_flight = pending
        side = {"rows": 0, "errors": 0}
        side_lock = threading.Lock()
        self._exhausted = False

        def error_rows(rid: Any, copied: dict, ptoks: int | None, msg: str) -> list[dict]:
            return [
                {"id": rid, "sample_index": j, **copied, "completion": None, "finish_reason": "error",
                 "prompt_tokens": ptoks, "completion_tokens": 0, "error": msg}
                for j in range(n)
            ]

        def admit(chunk: list[tuple[int, int, dict]]) -> Iterator[Any]:
            prompts = builder.build_many([row for _, _, row in chunk])
            for (pos, idx, row), p in zip(chunk, prompts):
                if self._stop.is_set():
                    return
                rid, copied, err = self._row_values(schema, pos, idx, row)
                if p.fatal:
                    self._fatal = f"row id={rid!r}: prompt too long: {p.error} (on_too_long: error); the job stops"
                    self.request_stop("a prompt is too long", exit_code=EXIT_FAILED)
                    return
                err = p.error or err
                if err is not None:
                    writer.add(pos, error_rows(rid, copied, p.n_tokens, err),
                               {"error_rows": 1, "errors": n, "prompt_tokens": 0, "completion_tokens": 0})
                    with side_lock:
                        side["rows"] += 1
                        side["errors"] += 1
                    if writer.due():
                        writer.flush()
                    continue
                seed_id = row.get(cfg.input.id_column) if cfg.input.id_column else idx
                try:
                    params = sampling_params(cfg, row_seed(cfg.sampling.seed, seed_id), row)
                except RowParamsError as e:  # a bad per-row sampling value fails its row only
                    writer.add(pos, error_rows(rid, copied, p.n_tokens, str(e)),
                               {"error_rows": 1, "errors": n, "prompt_tokens": 0, "completion_tokens": 0})
                    with side_lock:
                        side["rows"] += 1
                        side["errors"] += 1
                    continue
                pending[pos] = (rid, copied, p.n_tokens)
                yield GenerationRequest(prompt=p.token_ids, params=params, request_id=pos)

        def requests() -> Iterator[Any]:
            start = skip.prefix_end()
            chunk: list[tuple[int, int, dict]] = []
            for item in source.iter_rows(start=start):
                if self._stop.is_set():
                    return
                if item[0] in skip:
                    continue
                chunk.append(item)
                if len(chunk) >= self.tokenize_batch:
                    yield from admit(chunk)
                    chunk = []
                    if self._stop.is_set():
                        return
            if chunk:
                yield from admit(chunk)
            if not self._stop.is_set():
                self._exhausted = True

        last_prog_file = time.monotonic()
        prog.start_clock()
        # tokens counted as they are sampled, not when a row's last sample finishes
        prog.track_tokens(lambda: int(getattr(engine, "generated_tokens", 0) or 0),
                          tokens_per_row=n * cfg.sampling.max_new_tokens)
        progress_file("running")
        stream = engine.stream(requests())
        clean_end = False
        try:
            self._in_stream = True
            for out in stream:
                self._in_stream = False
                if self._notice is not None:  # the signal handler could not print it
                    prog.message(self._notice)
                    self._notice = None
                pos = out.request_id
                rid, copied, ptoks = pending.pop(pos)
                by_index = {c.index: c for c in out.outputs}
                rows = []
                errs = 0
                ctoks = 0
                for j in range(n):
                    c = by_index.get(j)
                    if c is None:
                        rows.append(error_rows(rid, copied, ptoks, f"the engine returned no sample {j}")[j])
                        errs += 1
                        continue
                    ct = len(c.token_ids or [])
                    ctoks += ct
                    failed = c.finish_reason == "error" or c.error is not None
                    errs += int(failed)
                    rows.append({
                        "id": rid, "sample_index": j, **copied,
                        "completion": None if failed and not c.text else c.text,
                        "finish_reason": c.finish_reason,
                        "prompt_tokens": len(out.prompt_token_ids) if out.prompt_token_ids else ptoks,
                        "completion_tokens": ct,
                        "error": (c.error or "generation failed") if failed else None,
                        **generation_extras(cfg, c, failed, reasoning_tags),
                    })
                ptok_count = (len(out.prompt_token_ids) if out.prompt_token_ids else (ptoks or 0)) if errs < n else 0
                writer.add(pos, rows, {"error_rows": int(errs > 0), "errors": errs,
                                       "prompt_tokens": ptok_count, "completion_tokens": ctoks})
                with side_lock:
                    srows, serrs = side["rows"], side["errors"]
                    side["rows"] = side["errors"] = 0
                prog.update(1 + srows, ctoks, int(errs > 0) + serrs)
                if writer.due():
                    writer.flush()
                    progress_file("running")
                    last_prog_file = time.monotonic()
                elif time.monotonic() - last_prog_file > 10:
                    progress_file("running")
                    last_prog_file = time.monotonic()
                if self._hard.is_set():
                    break
                if self._stop.is_set() and self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                    self._hard.set()
                    break
                self._in_stream = True
            else:
                clean_end = True
        except _HardStop:
            pass
        finally:
            self._in_stream = False
            close = getattr(stream, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException:  # noqa: BLE001 - an engine unwinding after a hard stop
                    pass
        with side_lock:
            prog.update(side["rows"], 0, side["errors"])
            side["rows"] = side["errors"] = 0
        self._pending_left = len(pending)
        if clean_end and self._exhausted and not pending and not self._fatal:
            return EXIT_OK  # complete, even if a stop came in after the last row was admitted
        if self._fatal:
            return self._fatal_code
        if self._stop.is_set():
            return self._stop_code
        return EXIT_FAILED

    def _check_ids_unique(self, od: OutputDir, summ: dict) -> None:
        """input.id_column values should name one row each: say so (and record it) when they do not.
        Checked on the finished output, so repeats across tasks and input files are seen too."""
        col = self.cfg.input.id_column
        if not col:
            return  # ids are row positions: unique by construction
        n, examples = sinkmod.repeated_ids(od.shard_files())
        summ["repeated_ids"] = n
        if n:
            self.say(f"warning: input.id_column '{col}' is not unique: {n:,} id(s) name more than one input row "
                     f"(e.g. {', '.join(map(repr, examples))}); each row is in the output, so these ids repeat there")

    def _combined_summary(self, od: OutputDir) -> None:
        """When every task of the job is done, write the job's summary.json (any task may be last)."""
        parts = []
        for t in range(self.num_tasks):
            prog = sinkmod.read_json(od.progress_path(t))
            if not isinstance(prog, dict) or prog.get("state") != "done" or not isinstance(prog.get("summary"), dict):
                return
            parts.append(prog["summary"])
        summ = combine_summaries(parts, self.cfg.cost_per_hour)
        self._check_ids_unique(od, summ)
        sinkmod.write_json_atomic(od.meta / "summary.json", summ)
        self._write_card(od, None, summ)
        self.say(f"all {self.num_tasks} tasks are done: {summ['rows']:,} rows, {summ['errors']:,} errors, "
                 f"{summ['output_tokens']:,} output tokens; summary: {od.meta / 'summary.json'}")

    def _write_card(self, od: OutputDir, source: Source | None, summ: dict) -> None:
        """The finished output's dataset card (OUT/README.md) when output.dataset_card; a failure costs no row."""
        from .card import write_card

        if not self.cfg.output.dataset_card:
            return
        footer = {"model": {"path": self.cfg.model.path}, "prompt": self.cfg.to_dict()["prompt"],
                  "sampling": self.cfg.to_dict()["sampling"], "batchgen_version": _version()}
        try:
            write_card(od.path, Path(self.cfg.source_path).stem if self.cfg.source_path else "batchgen output",
                       footer, summ)
        except OSError as e:
            self.say(f"warning: the dataset card {od.path / 'README.md'} was not written: {e}")

    def _set_fatal(self, e: OutputError) -> None:
        """A commit that could not be made: one line, no traceback. Exit 1 when the file system
        refused (resumable once fixed), 2 when the output can't be used (a link, replaced)."""
        self._fatal = str(e)
        self._fatal_code = EXIT_FAILED if isinstance(e, WriteError) else EXIT_USAGE
        self._fatal_hint = "; free some space (or fix the file system), then run the same command to resume" \
            if isinstance(e, WriteError) else ""

    def _final_flush(self, writer: ShardWriter | None, progress_file: Callable[..., None]) -> None:
        if writer is None:
            return
        try:
            writer.flush()
        except OutputError as e:  # the disk filled up at the last commit, a link appeared...
            if not self._fatal:
                self._set_fatal(e)
            self._dropped += writer.discard()
        except BaseException:  # noqa: BLE001
            progress_file("failed", error="flushing the last shard failed")
            raise

    def _finish(self, code: int, od: OutputDir, source: Source, led: Ledger, writer: ShardWriter | None,
                prog: Progress | None, engine: Any, progress_file: Callable[..., None],
                t_start: float, prev_wall: float) -> int:
        cfg = self.cfg
        self._final_flush(writer, progress_file)
        if self._fatal and code == EXIT_OK:
            code = self._fatal_code
        if prog is not None:
            prog.close()
        tot = writer.ledger if writer is not None else led
        committed = writer.committed if writer is not None else []
        self.rows_committed_this_run = sum(int(m.get("rows", 0)) for m in committed) + (writer.rewritten if writer else 0)
        stats = getattr(engine, "stats", None) or {}
        wall = time.monotonic() - t_start
        gen_s = prog.elapsed if prog is not None else wall
        summ = summary_dict(
            rows=tot.rows, samples=tot.samples, errors=tot.errors, error_rows=tot.error_rows,
            prompt_tokens=tot.prompt_tokens, completion_tokens=tot.completion_tokens,
            wall_s=wall, gen_s=gen_s, run_completion_tokens=prog.out_tokens if prog else 0,
            gpu_busy=stats.get("gpu_busy_fraction") if isinstance(stats, dict) else None,
            cost_per_hour=cfg.cost_per_hour, total_wall_s=prev_wall + wall,
            extra={
                "task_id": self.task_id, "num_tasks": self.num_tasks, "rows_total": source.total,
                "shards": len(tot.records), "output": str(od.path),
                "state": "done" if code == EXIT_OK else ("stopped" if self._stop.is_set() and not self._fatal else "failed"),
                "engine_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, type(None)))}
                if isinstance(stats, dict) else {},
            },
        )
        if writer is not None and writer.rewritten:
            summ["retried_rows"] = writer.rewritten
        summ["incomplete_samples"] = tot.totals.get("incomplete", 0)  # cut by max_new_tokens
        if any(getattr(cfg.sampling, k) not in (None, False) for k in CONSTRAINT_KEYS):
            summ["constrained_samples"] = tot.samples
        self.summary = summ
        if code == EXIT_OK:
            if self.num_tasks == 1:  # a job of several tasks checks once all are done (_combined_summary)
                self._check_ids_unique(od, summ)
            progress_file("done", summary=summ)
            sinkmod.write_json_atomic(od.summary_path(), summ)
            if self.num_tasks > 1:
                self._combined_summary(od)
            else:
                self._write_card(od, source, summ)
            self.say(("" if self.num_tasks == 1 else f"task {self.task_id}: ") + "done. " + f"{od.path}\n" + format_summary(summ)
                     + f"\nsummary: {od.summary_path()}")
            return EXIT_OK
        done_rows = tot.rows
        if self._fatal:
            with contextlib.suppress(OutputError):
                progress_file("failed", error=self._fatal)
            lost = self._dropped + getattr(self, "_pending_left", 0)
            self.say(f"error: {self._fatal}; {done_rows:,} rows are saved in {od.path} ({len(tot.records)} shards)"
                     + (f", {lost:,} rows not committed are generated again on the next run" if lost else "")
                     + self._fatal_hint)
            return self._fatal_code
        if self._stop.is_set():
            progress_file("stopped", reason=self.stop_reason)
            for cb in self.on_stop:
                try:
                    cb(self)
                except Exception as e:  # noqa: BLE001
                    self.say(f"warning: stop callback failed: {e}")
            left = getattr(self, "_pending_left", 0)
            self.say(
                f"{self.stop_reason}: saved {done_rows:,}"
                + (f" of {source.total:,}" if source.total is not None else "")
                + f" rows in {od.path}"
                + (f" ({left} in-flight rows will be redone)" if left else "")
                + "; run the same command to resume"
            )
            return code
        progress_file("failed", error="the engine stream ended early")
        self.say(f"error: the engine stopped before the input was done; {done_rows:,} rows are saved in {od.path}; rerun to resume")
        return EXIT_FAILED


def _model_source_error(e: BaseException) -> str | None:
    try:
        from .engine.model_source import ModelSourceError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(e, ModelSourceError):
        return str(e)
    return None


# --------------------------------------------------------------------------- dry run
def dry_run(cfg: JobConfig, *, task_id: int = 0, num_tasks: int = 1, preview: int = 3, sample: int = 200,
            tokenizer: Any = None, stream: TextIO | None = None) -> dict:
    """Validate, read the first rows, print rendered prompts with token counts and an estimate
    of the total tokens. Loads only the tokenizer."""
    out = stream or sys.stdout
    source = open_source(cfg, task_id, num_tasks)
    od = OutputDir(output_dir(cfg), task_id, num_tasks)
    existing = od.manifest()
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    ctx = _model_context(cfg)
    builder = PromptBuilder(cfg, tok, min(x for x in (ctx, cfg.engine.max_model_len) if x) if (ctx or cfg.engine.max_model_len) else None)
    n_seen = n_ok = tok_sum = 0
    errors: list[str] = []
    too_long = truncated = 0
    shown = n_err_shown = 0
    print(f"job {cfg.source_path}: model {cfg.model.path}, input {source.description}"
          + (f", task {task_id}/{num_tasks}" if num_tasks > 1 else ""), file=out)
    print(f"chat template: {'applied' if builder.use_chat else 'not applied'}; prompt limit {builder.limit} tokens "
          f"(on_too_long: {cfg.prompt.on_too_long})", file=out)
    for pos, idx, row in source.iter_rows():
        if n_seen >= max(sample, preview):
            break
        n_seen += 1
        rid = row.get(cfg.input.id_column) if cfg.input.id_column else idx
        p = builder.build_many([row])[0]
        if p.fatal:
            errors.append(f"id={rid!r}: too long: {p.error} (on_too_long: error would stop the job)")
            too_long += 1
        elif p.error:
            errors.append(f"id={rid!r}: {p.error}")
            too_long += int(p.too_long)
        else:
            n_ok += 1
            tok_sum += len(p.token_ids or [])
            truncated += int(p.truncated)
        if shown < preview:
            shown += 1
            n_err_shown += int(bool(p.error))
            print(f"\n--- row id={rid!r} ---", file=out)
            if p.error:
                print(f"[error] {errors[-1]}", file=out)
            else:
                print(p.text, file=out)
                print(f"--- {len(p.token_ids or [])} prompt tokens{' (truncated)' if p.truncated else ''} ---", file=out)
    avg = tok_sum / n_ok if n_ok else 0.0
    total = source.total
    rows_str = f"{total:,}" if total is not None else "unknown"
    s = cfg.sampling
    est: dict[str, Any] = {
        "rows": total, "sampled_rows": n_seen, "sampled_errors": len(errors), "avg_prompt_tokens": round(avg, 1),
        "too_long": too_long, "truncated": truncated,
    }
    print("", file=out)
    print(f"rows: {rows_str}; sampled {n_seen}: {len(errors)} would be error rows, {truncated} truncated; "
          f"mean prompt {avg:.1f} tokens", file=out)
    if total is not None:
        ok_frac = n_ok / n_seen if n_seen else 0.0
        est_in = int(avg * total * ok_frac)
        est_out = int(total * ok_frac * s.n * s.max_new_tokens)
        est.update(prompt_tokens=est_in, max_output_tokens=est_out)
        print(f"estimate: ~{est_in:,} prompt tokens, at most {est_out:,} output tokens "
              f"({s.n} sample(s) x {s.max_new_tokens} max_new_tokens)", file=out)
    for e in errors[n_err_shown:n_err_shown + 5]:
        print(f"  error row: {e}", file=out)
    if existing is not None:
        # the run's own comparison: job fingerprint, number of tasks and the input's content
        mismatch = sinkmod.manifest_mismatch(existing, {"fingerprint": job_fingerprint(cfg), "num_tasks": num_tasks,
                                                         "identity": job_identity(cfg), "source": source.identity()})
        if mismatch is None:
            state = "exists for this job (a run resumes it)"
        elif od.has_committed_rows():
            state = f"can't be resumed by this job: {mismatch} (a run is refused without --overwrite)"
        else:
            state = "holds another job that committed no rows (a run replaces it)"
        print(f"output {od.path}: {state}", file=out)
    else:
        print(f"output {od.path}: new", file=out)
    return est


def _model_context(cfg: JobConfig) -> int | None:
    """The model's context length from its config.json, without loading it (local directories
    only; None when unknown)."""
    from pathlib import Path

    try:
        p = Path(model_location(cfg))
        conf = p / "config.json"
        if conf.is_file():
            n = json.loads(conf.read_text()).get("max_position_embeddings")
            return int(n) if n else None
    except (ConfigError, OSError, ValueError, TypeError):
        return None
    return None


def run_job(cfg: JobConfig, *, retry_errors: bool = False, **kw: Any) -> int:
    """Run a job; retry_errors: generate its error rows again (see Job)."""
    return Job(cfg, retry_errors=retry_errors, **kw).run()


__all__ = ["Job", "run_job", "dry_run", "make_engine", "task_from_env", "OutputError", "IntervalSet"]

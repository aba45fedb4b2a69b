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
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, TextIO

import pyarrow as pa

from . import sink as sinkmod
from .config import ConfigError, JobConfig, job_fingerprint, job_identity, output_dir
from .progress import Progress, format_summary, summary_dict, write_task_progress
from .prompts import PromptBuilder, load_tokenizer, model_location, row_seed
from .sink import IntervalSet, Ledger, OutputDir, OutputError, ShardWriter, output_schema
from .sources import Source, open_source

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
    from .engine.engine import Engine

    e = cfg.engine
    return Engine.from_pretrained(
        model_location(cfg),
        device=e.device,
        dtype=cfg.model.dtype,
        max_num_seqs=e.max_num_seqs,
        max_batch_tokens=e.max_batch_tokens,
        kv_cache_tokens=e.kv_cache_tokens,
        block_size=e.block_size,
        prefix_caching=e.prefix_caching,
        gpu_memory_fraction=e.gpu_memory_fraction,
        overlap=e.overlap,
        cuda_graphs=e.cuda_graphs,
        attention=e.attention,
        max_model_len=e.max_model_len,
        seed=cfg.sampling.seed,
        threads=e.threads,
    )


def sampling_params(cfg: JobConfig, seed: int) -> Any:
    from .engine.request import SamplingParams

    s = cfg.sampling
    return SamplingParams(
        max_new_tokens=s.max_new_tokens,
        min_new_tokens=s.min_new_tokens,
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        seed=seed,
        n=s.n,
        stop=list(s.stop),
        stop_token_ids=list(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
    )


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
    ) -> None:
        self.cfg = cfg
        self.task_id, self.num_tasks = task_id, num_tasks
        self.overwrite = overwrite
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
        self._lock = threading.Lock()
        self.tokenize_batch = 64  # rows rendered and tokenized together
        self._writer: ShardWriter | None = None

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
        if first and self.cfg.output.stop_grace_seconds > 0:
            try:
                signal.setitimer(signal.ITIMER_REAL, self.cfg.output.stop_grace_seconds)
            except (ValueError, OSError):
                pass
        if not first or self.cfg.output.stop_grace_seconds <= 0:
            self._hard.set()
            if self._can_raise():
                raise _HardStop()

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
        id_type = source.types.get(cfg.input.id_column, pa.string()) if cfg.input.id_column else pa.int64()
        if pa.types.is_null(id_type):
            id_type = pa.string()
        copied = [(c, source.types.get(c, pa.string())) for c in cfg.input.columns]
        return output_schema(id_type, copied)

    def _footer(self) -> dict:
        cfg = self.cfg
        return {
            "format": sinkmod.FORMAT_VERSION,
            "fingerprint": job_fingerprint(cfg),
            "model": {"path": cfg.model.path, "dtype": cfg.model.dtype},
            "sampling": json.loads(json.dumps(cfg.to_dict()["sampling"])),
            "prompt": cfg.to_dict()["prompt"],
            "batchgen_version": _version(),
        }

    def _is_done(self, source: Source, led: Ledger, prev: dict | None) -> bool:
        if source.total is not None:
            return led.done.covers(source.total)
        return bool(prev and prev.get("state") == "done" and prev.get("limit") == self.cfg.input.limit)

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        t_start = time.monotonic()
        cfg = self.cfg
        source = open_source(cfg, self.task_id, self.num_tasks)  # ConfigError: files, columns
        od = OutputDir(output_dir(cfg), self.task_id, self.num_tasks)
        od.lock()  # before prepare: --overwrite must not clear a running task's output
        try:
            manifest = od.prepare(self._manifest(source, self._schema(source)), overwrite=self.overwrite)
            schema = sinkmod.schema_from_b64(manifest["schema"])
            return self._run_locked(source, od, schema, t_start)
        finally:
            od.unlock()

    def _run_locked(self, source: Source, od: OutputDir, schema: pa.Schema, t_start: float) -> int:
        cfg = self.cfg
        fp = job_fingerprint(cfg)
        removed = od.clean_tmp()
        led = od.scan(fp)
        prev = sinkmod.read_json(od.progress_path())
        prev_wall = float((prev or {}).get("total_wall_s", 0.0))
        label = f"task {self.task_id}/{self.num_tasks}" if self.num_tasks > 1 else ""
        if self._is_done(source, led, prev):
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
            self.say(
                f"nothing to do: {od.path} is complete ({led.rows:,} rows, {led.samples:,} output rows "
                f"in {len(led.shards)} shards{', task ' + str(self.task_id) if self.num_tasks > 1 else ''})"
            )
            return EXIT_OK
        if led.rows:
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

        def progress_file(state: str, **kw: Any) -> None:
            run_tokens = prog.out_tokens if prog is not None else 0
            write_task_progress(
                od.progress_path(),
                task_id=self.task_id,
                num_tasks=self.num_tasks,
                state=state,
                rows_done=led.rows + sum(m["rows"] for m in writer_committed()),
                rows_total=source.total,
                limit=cfg.input.limit,
                shards=len(led.shards) + len(writer_committed()),
                output_tokens=led.completion_tokens + sum(m["completion_tokens"] for m in writer_committed()),
                errors=led.errors + sum(m["errors"] for m in writer_committed()),
                tok_s=round(prog.tok_s, 2) if prog is not None and run_tokens else None,
                run_started_unix=time.time() - (time.monotonic() - t_start),
                total_wall_s=round(prev_wall + time.monotonic() - t_start, 3),
                fingerprint=fp,
                **kw,
            )

        writer: ShardWriter | None = None
        prog: Progress | None = None

        def writer_committed() -> list[dict]:
            return writer.committed if writer is not None else []

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
                od, schema, self._footer(),
                rows_per_shard=cfg.output.rows_per_shard, compression=cfg.output.compression,
                flush_seconds=cfg.output.flush_seconds, next_seq=led.next_seq,
            )
            self._writer = writer
            prog = Progress(source.total, led.rows, mode=self.progress_mode, log_every=self.log_every,
                            stream=self.out, label=label)
            old = self._install_signals()
            try:
                code = self._loop(source, led, builder, engine, writer, prog, progress_file)
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

    def _loop(self, source: Source, led: Ledger, builder: PromptBuilder, engine: Any, writer: ShardWriter,
              prog: Progress, progress_file: Callable[..., None]) -> int:
        from .engine.request import GenerationRequest

        cfg = self.cfg
        n = cfg.sampling.n
        id_col = cfg.input.id_column
        copy_cols = list(cfg.input.columns)
        pending: dict[int, tuple[Any, dict, int | None]] = {}
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
                rid = row.get(id_col) if id_col else idx
                copied = {c: row.get(c) for c in copy_cols}
                if p.fatal:
                    self._fatal = f"row id={rid!r}: prompt too long: {p.error} (on_too_long: error); the job stops"
                    self.request_stop("a prompt is too long", exit_code=EXIT_FAILED)
                    return
                err = p.error
                if err is None and id_col and rid is None:
                    err = f"id column '{id_col}' is null"
                if err is not None:
                    writer.add(pos, error_rows(rid, copied, p.n_tokens, err),
                               {"error_rows": 1, "errors": n, "prompt_tokens": 0, "completion_tokens": 0})
                    with side_lock:
                        side["rows"] += 1
                        side["errors"] += 1
                    if writer.due():
                        writer.flush()
                    continue
                pending[pos] = (rid, copied, p.n_tokens)
                yield GenerationRequest(prompt=p.token_ids, params=sampling_params(cfg, row_seed(cfg.sampling.seed, rid)),
                                        request_id=pos)

        def requests() -> Iterator[Any]:
            start = led.done.prefix_end()
            chunk: list[tuple[int, int, dict]] = []
            for item in source.iter_rows(start=start):
                if self._stop.is_set():
                    return
                if item[0] in led.done:
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
        progress_file("running")
        stream = engine.stream(requests())
        clean_end = False
        try:
            self._in_stream = True
            for out in stream:
                self._in_stream = False
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
            return EXIT_FAILED
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
            if not prog or prog.get("state") != "done" or not isinstance(prog.get("summary"), dict):
                return
            parts.append(prog["summary"])
        summ = combine_summaries(parts, self.cfg.cost_per_hour)
        self._check_ids_unique(od, summ)
        sinkmod.write_json_atomic(od.meta / "summary.json", summ)
        self.say(f"all {self.num_tasks} tasks are done: {summ['rows']:,} rows, {summ['errors']:,} errors, "
                 f"{summ['output_tokens']:,} output tokens; summary: {od.meta / 'summary.json'}")

    def _finish(self, code: int, od: OutputDir, source: Source, led: Ledger, writer: ShardWriter | None,
                prog: Progress | None, engine: Any, progress_file: Callable[..., None],
                t_start: float, prev_wall: float) -> int:
        cfg = self.cfg
        if writer is not None:
            try:
                writer.flush()
            except BaseException:  # noqa: BLE001
                progress_file("failed", error="flushing the last shard failed")
                raise
        if prog is not None:
            prog.close()
        committed = writer.committed if writer is not None else []
        self.rows_committed_this_run = sum(int(m.get("rows", 0)) for m in committed)
        tot = Ledger()
        tot.rows, tot.samples, tot.errors = led.rows, led.samples, led.errors
        tot.error_rows, tot.prompt_tokens, tot.completion_tokens = led.error_rows, led.prompt_tokens, led.completion_tokens
        for m in committed:
            tot.add_meta(m)
        if writer is not None and writer.coerce_warnings:
            self.say("warning: some copied values didn't fit their column's type and were written as null: "
                     + ", ".join(f"{k} ({v})" for k, v in writer.coerce_warnings.items()))
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
                "shards": len(led.shards) + len(committed), "output": str(od.path),
                "state": "done" if code == EXIT_OK else ("stopped" if self._stop.is_set() and not self._fatal else "failed"),
                "engine_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, type(None)))}
                if isinstance(stats, dict) else {},
            },
        )
        self.summary = summ
        if code == EXIT_OK:
            if self.num_tasks == 1:  # a job of several tasks checks once all are done (_combined_summary)
                self._check_ids_unique(od, summ)
            progress_file("done", summary=summ)
            sinkmod.write_json_atomic(od.summary_path(), summ)
            if self.num_tasks > 1:
                self._combined_summary(od)
            self.say(("" if self.num_tasks == 1 else f"task {self.task_id}: ") + "done. " + f"{od.path}\n" + format_summary(summ)
                     + f"\nsummary: {od.summary_path()}")
            return EXIT_OK
        done_rows = tot.rows
        if self._fatal:
            progress_file("failed", error=self._fatal)
            self.say(f"error: {self._fatal}; {done_rows:,} rows are saved in {od.path}")
            return EXIT_FAILED
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
        same = existing.get("fingerprint") == job_fingerprint(cfg)
        print(f"output {od.path}: " + ("exists for this job (a run resumes it)" if same else
                                       "holds a DIFFERENT job (a run is refused without --overwrite)"), file=out)
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


def run_job(cfg: JobConfig, **kw: Any) -> int:
    return Job(cfg, **kw).run()


__all__ = ["Job", "run_job", "dry_run", "make_engine", "task_from_env", "OutputError", "IntervalSet"]

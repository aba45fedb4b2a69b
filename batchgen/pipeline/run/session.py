"""A task's generation, from loading the model to the line that says how it ended."""
from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..config import ConfigError
from ..progress import Progress
from ..prompt.builder import PromptBuilder
from ..prompt.reasoning import DEFAULT_TAGS
from ..prompt.reasoning import reasoning_tags as reasoning_tags_of
from ..sink.ledger import Ledger
from ..sink.output_dir import OutputDir
from ..files import OutputError, WriteError
from ..sink.shard_writer import ShardWriter
from ..source.base import InputError
from . import layout
from . import engine_setup
from .engine_setup import job_tokenizer, model_source_error
from .finish import Finisher, RunFigures, engine_stats, summarize
from .intake import Intake
from .loop import LoopEnd, RunLoop
from .resume import Resume
from .rows import RowShape
from .stopping import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .task_file import TaskFile

if TYPE_CHECKING:
    from .job import Job


@dataclass
class Failure:
    """Why a run could not go on: one line, its exit code, and what to do about it."""

    message: str
    code: int = EXIT_FAILED
    hint: str = ""

    @classmethod
    def of_output(cls, e: OutputError) -> "Failure":
        """A commit that could not be made. Exit 1 when the file system refused (resumable once
        fixed), 2 when the output can't be used (a link, replaced)."""
        if isinstance(e, WriteError):
            return cls(str(e), EXIT_FAILED, "; free some space (or fix the file system), then run the same command "
                                            "to resume")
        return cls(str(e), EXIT_USAGE)


class Generation:
    def __init__(self, job: "Job", source: Any, od: OutputDir, schema: pa.Schema, led: Ledger, plan: Resume,
                 task_file: TaskFile, finisher: Finisher) -> None:
        self.job, self.cfg, self.say = job, job.cfg, job.say
        self.source, self.od, self.schema, self.led, self.plan = source, od, schema, led, plan
        self.task_file, self.finisher = task_file, finisher
        self.writer: ShardWriter | None = None
        self.prog: Progress | None = None
        self.failure: Failure | None = None
        self.dropped = 0  # rows completed but not committed (a commit failed)
        self.end = LoopEnd(complete=False, abandoned=0)
        self.loop: RunLoop | None = None

    def run(self) -> int:
        tok = job_tokenizer(self.cfg, self.job.tokenizer, self.job.engine)  # before the model: fails fast
        self.task_file.write("loading")
        stop = self.job.stop
        if stop.requested.is_set():  # stopped (e.g. a Slurm signal) before the model loaded
            self.task_file.write("stopped", reason=stop.reason)
            self._stop_callbacks()
            self.say(f"{stop.reason}: stopped before loading the model; run the same command to resume")
            return stop.exit_code
        engine = self.job.engine if self.job.engine is not None else self._load_engine()
        try:
            code = self._generate(engine, tok)
        finally:
            if self.job.engine is None:
                with contextlib.suppress(Exception):
                    engine.close()
        return self._finish(code, engine)

    def _load_engine(self) -> Any:
        self.say(f"loading model {self.cfg.model.path} ...")
        try:
            engine = (self.job.engine_factory or engine_setup.make_engine)(self.cfg)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            why = model_source_error(e)
            if why:
                raise ConfigError(f"{self.cfg.source_path}: model.path: {why}") from None
            self.task_file.write("failed", error=f"{type(e).__name__}: {e}")
            raise
        if hasattr(engine, "describe"):
            self.say(f"engine: {engine.describe()}")
        return engine

    def _generate(self, engine: Any, tok: Any) -> int:
        """Run the loop with the stop signals handled; every failure becomes self.failure."""
        cfg, stop = self.cfg, self.job.stop
        builder = PromptBuilder(cfg, tok, getattr(engine, "max_model_len", None))
        self.writer = ShardWriter(self.od, self.schema, layout.footer(cfg, self.source),
                                  rows_per_shard=cfg.output.rows_per_shard, compression=cfg.output.compression,
                                  flush_seconds=cfg.output.flush_seconds, ledger=self.led, retry=self.plan.retry)
        self.prog = self._progress()
        self.task_file.prog = self.job.progress = self.prog
        stop.urgent = self.prog.urgent
        intake = Intake(cfg, self._rows(), builder, self.schema, self._shape(builder.tok), self.job.tokenize_batch)
        old = stop.install()
        try:
            self.prog.start_clock()
            # tokens counted as they are sampled, not when a row's last sample finishes
            self.prog.track_tokens(lambda: int(getattr(engine, "generated_tokens", 0) or 0),
                                   tokens_per_row=cfg.sampling.n * cfg.sampling.max_new_tokens)
            self.task_file.write("running")
            loop = RunLoop(engine, intake, self.writer, self.prog, stop, intake.shape, self.task_file.write)
            self.loop = loop
            self.end = loop.run()
            if self.end.fatal:
                self.failure = Failure(self.end.fatal)
        except OutputError as e:  # a commit refused or failed (disk full, a link, the output replaced)
            self.failure = Failure.of_output(e)
            self.dropped += self.writer.discard()
        except InputError as e:  # an input file unreadable or changed mid-run: one line naming it, rows done kept
            self.failure = Failure(str(e), EXIT_USAGE)
        except Exception as e:  # noqa: BLE001 - flush what is complete, then report
            traceback.print_exc(file=self.job.out)
            self.failure = Failure(f"{type(e).__name__}: {e}")
        finally:
            stop.restore(old)
        return self._loop_code()

    def _loop_code(self) -> int:
        if self.end.complete and self.failure is None:
            return EXIT_OK  # complete, even if a stop came in after the last row was admitted
        if self.failure is not None:
            return self.failure.code
        return self.job.stop.exit_code if self.job.stop.requested.is_set() else EXIT_FAILED

    def _rows(self) -> Iterator[Any]:
        """This task's rows not yet done, from the first position not done."""
        skip = self.plan.skip
        for row in self.source.rows(start=skip.prefix_end()):
            if row.position not in skip:
                yield row

    def _shape(self, tok: Any) -> RowShape:
        cfg = self.cfg
        tags = None
        if cfg.output.reasoning:
            tags = tuple(cfg.output.reasoning_tags) if cfg.output.reasoning_tags else \
                reasoning_tags_of(tok) or DEFAULT_TAGS
        return RowShape(cfg.sampling.n, tags, bool(cfg.sampling.logprobs), bool(cfg.sampling.top_logprobs))

    def _progress(self) -> Progress:
        job, skip = self.job, self.plan.skip
        label = f"task {job.task_id}/{job.num_tasks}" if job.num_tasks > 1 else ""
        done = len(skip) if self.source.total is not None else self.led.rows
        return Progress(self.source.total, done, mode=job.progress_mode, log_every=job.log_every, stream=job.out,
                        label=label)

    # ------------------------------------------------------------------ the end
    def _final_flush(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.flush()
        except OutputError as e:  # the disk filled up at the last commit, a link appeared...
            if self.failure is None:
                self.failure = Failure.of_output(e)
            self.dropped += self.writer.discard()
        except BaseException:  # noqa: BLE001
            self.task_file.write("failed", error="flushing the last shard failed")
            raise

    def _finish(self, code: int, engine: Any) -> int:
        self._final_flush()
        if self.failure is not None and code == EXIT_OK:
            code = self.failure.code
        if self.prog is not None:
            self.prog.close()
        w = self.writer
        self.job.rows_committed_this_run = w.rows_committed if w is not None else 0
        stopped = self.job.stop.requested.is_set() and self.failure is None
        state = "done" if code == EXIT_OK else ("stopped" if stopped else "failed")
        wall = self.task_file.wall_s()
        run = RunFigures(wall, self.prog.elapsed if self.prog is not None else wall,
                         self.prog.out_tokens if self.prog is not None else 0, engine_stats(engine),
                         w.rewritten if w is not None else 0)
        summ = summarize(self.cfg, self.job.task_id, self.job.num_tasks, self.od, self.source, self.led, state,
                         self.plan.prev_wall_s + wall, run)
        self.job.summary = summ
        self.job.error = self.failure.message if self.failure is not None else None
        if code == EXIT_OK:
            self.finisher.done(summ, self.task_file, self.source)
            self.say(self.finisher.done_line(summ))
            return EXIT_OK
        if self.failure is not None:
            return self._failed()
        if self.job.stop.requested.is_set():
            return self._stopped(code)
        self.task_file.write("failed", error="the engine stream ended early")
        self.say(f"error: the engine stopped before the input was done; {self.led.rows:,} rows are saved in "
                 f"{self.od.path}; rerun to resume")
        return EXIT_FAILED

    def _failed(self) -> int:
        f = self.failure
        assert f is not None
        with contextlib.suppress(OutputError):
            self.task_file.write("failed", error=f.message)
        lost = self.dropped + self.end.abandoned + (self.loop.abandoned if self.loop is not None else 0)
        self.say(f"error: {f.message}; {self.led.rows:,} rows are saved in {self.od.path} ({len(self.led.records)} "
                 "shards)" + (f", {lost:,} rows not committed are generated again on the next run" if lost else "")
                 + f.hint)
        return f.code

    def _stopped(self, code: int) -> int:
        stop = self.job.stop
        self.task_file.write("stopped", reason=stop.reason)
        self._stop_callbacks()
        left = self.end.abandoned
        total = f" of {self.source.total:,}" if self.source.total is not None else ""
        self.say(f"{stop.reason}: saved {self.led.rows:,}{total} rows in {self.od.path}"
                 + (f" ({left} in-flight rows will be redone)" if left else "") + "; run the same command to resume")
        return code

    def _stop_callbacks(self) -> None:
        for cb in self.job.on_stop:
            try:
                cb(self.job)
            except Exception as e:  # noqa: BLE001
                self.say(f"warning: stop callback failed: {e}")

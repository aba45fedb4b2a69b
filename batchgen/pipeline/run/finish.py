"""The end of a run: the summary (computed once, here), the progress file's last state, the
job-wide summary once every task is done, the dataset card, and the one line that says how it ended."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..files import OutputError, write_json_atomic
from ..sink.verify import repeated_ids
from ...engine.stats import EngineStats
from ..config import CONSTRAINT_KEYS, JobConfig
from ..sink.ledger import Ledger
from ..sink.output_dir import OutputDir
from ..source.base import Source
from .layout import version
from ..task_progress import ProgressFileError, TaskProgress
from .summary import combine_summaries, format_summary, summary_dict
from .task_file import TaskFile


@dataclass
class RunFigures:
    """What this run did (a run that found nothing to do has none)."""

    wall_s: float
    gen_s: float
    output_tokens: int  # tokens of the rows this run finished
    engine_stats: dict[str, Any]
    retried_rows: int = 0


def engine_stats(engine: Any) -> dict[str, Any]:
    """The engine's figures as plain values (an engine without stats has none)."""
    stats = getattr(engine, "stats", None)
    return stats.as_dict() if isinstance(stats, EngineStats) else {}


def summarize(cfg: JobConfig, task_id: int, num_tasks: int, od: OutputDir, source: Source, led: Ledger,
              state: str, total_wall_s: float, run: RunFigures | None = None) -> dict:
    """The task's summary: the whole output's counts (from the ledger), this run's pace, the cost."""
    stats = run.engine_stats if run is not None else {}
    extra: dict[str, Any] = {"task_id": task_id, "num_tasks": num_tasks, "rows_total": source.total,
                             "shards": len(led.records), "output": str(od.path), "state": state}
    if run is not None:
        extra["engine_stats"] = stats
    summ = summary_dict(
        rows=led.rows, samples=led.samples, errors=led.errors, error_rows=led.error_rows,
        prompt_tokens=led.prompt_tokens, completion_tokens=led.completion_tokens,
        wall_s=run.wall_s if run else 0.0, gen_s=run.gen_s if run else 0.0,
        run_completion_tokens=run.output_tokens if run else 0, gpu_busy=stats.get("gpu_busy_fraction"),
        cost_per_hour=cfg.cost_per_hour, total_wall_s=total_wall_s, extra=extra)
    if run is not None:
        if run.retried_rows:
            summ["retried_rows"] = run.retried_rows
        summ["incomplete_samples"] = led.totals.get("incomplete", 0)  # cut by max_new_tokens
        if any(getattr(cfg.sampling, k) not in (None, False) for k in CONSTRAINT_KEYS):
            summ["constrained_samples"] = led.samples
    return summ


@dataclass
class Finisher:
    """Writes what a finished (or stopped, or failed) task leaves behind."""

    cfg: JobConfig
    task_id: int
    num_tasks: int
    od: OutputDir
    say: Callable[[str], None]

    def done(self, summ: dict, task_file: TaskFile, source: Source | None) -> None:
        """A task that finished: its summary and progress file, then the job's when every task is done."""
        if self.num_tasks == 1:  # a job of several tasks checks once all are done (combine)
            self.check_ids_unique(summ)
        task_file.write("done", summary=summ)
        write_json_atomic(self.od.summary_path(), summ)
        if self.num_tasks > 1:
            self.combine()
        else:
            self.write_card(summ)

    def combine(self) -> None:
        """When every task of the job is done, write the job's summary.json (any task may be last)."""
        parts = []
        for t in range(self.num_tasks):
            try:
                prog = TaskProgress.read(self.od.progress_path(t))
            except ProgressFileError:
                return  # not done (or its file is unreadable: that task's next run rewrites it)
            if prog.state != "done" or prog.summary is None:
                return
            parts.append(prog.summary)
        summ = combine_summaries(parts, self.cfg.cost_per_hour)
        self.check_ids_unique(summ)
        write_json_atomic(self.od.meta / "summary.json", summ)
        self.write_card(summ)
        self.say(f"all {self.num_tasks} tasks are done: {summ['rows']:,} rows, {summ['errors']:,} errors, "
                 f"{summ['output_tokens']:,} output tokens; summary: {self.od.meta / 'summary.json'}")

    def check_ids_unique(self, summ: dict) -> None:
        """input.id_column values should name one row each: say so (and record it) when they do not.
        Checked on the finished output, so repeats across tasks and input files are seen too."""
        col = self.cfg.input.id_column
        if not col:
            return  # ids are row positions: unique by construction
        n, examples = repeated_ids(self.od.shard_files())
        summ["repeated_ids"] = n
        if n:
            self.say(f"warning: input.id_column '{col}' is not unique: {n:,} id(s) name more than one input row "
                     f"(e.g. {', '.join(map(repr, examples))}); each row is in the output, so these ids repeat there")

    def write_card(self, summ: dict) -> None:
        """The finished output's dataset card (OUT/README.md) when output.dataset_card; a failure costs no row."""
        from ..sink.card import write_card

        if not self.cfg.output.dataset_card:
            return
        d = self.cfg.to_dict()
        footer = {"model": {"path": self.cfg.model.path}, "prompt": d["prompt"], "sampling": d["sampling"],
                  "batchgen_version": version()}
        try:
            write_card(self.od.path, Path(self.cfg.source_path).stem if self.cfg.source_path else "batchgen output",
                       footer, summ)
        except (OSError, OutputError) as e:  # a FIFO where its temp file goes, a full disk: the rows are done
            self.say(f"warning: the dataset card {self.od.path / 'README.md'} was not written: {e}")

    def done_line(self, summ: dict) -> str:
        return (("" if self.num_tasks == 1 else f"task {self.task_id}: ") + "done. " + f"{self.od.path}\n"
                + format_summary(summ) + f"\nsummary: {self.od.summary_path()}")

"""How a data-parallel run ended: one summary over its tasks, a line per task that did not finish,
and the exit code of the whole (0 only when every task is done)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..run.summary import format_summary
from .aggregate import combined_summary, read_tasks
from .workers import Worker

if TYPE_CHECKING:
    from .supervisor import Supervisor

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def kind_of(w: Worker, stop_codes: set[int]) -> str:
    """done | refused (exit 2: the job's or the output's fault) | stopped (by a stop signal, resumable) | failed."""
    rc = w.returncode
    if rc == 0:
        return "done"
    if rc == EXIT_USAGE:
        return "refused"
    if rc is not None and rc in stop_codes:
        return "stopped"
    return "failed"


def error_line(w: Worker) -> str | None:
    """The worker's last `error: ...` line (what a refused run says)."""
    for ln in reversed(w.tail(40)):
        if ln.startswith("error: "):
            return ln
    return None


class Report:
    def __init__(self, sup: "Supervisor", wall_s: float) -> None:
        self.sup, self.wall_s = sup, wall_s
        self.stop_codes = set(sup.stop_signals.values())
        self.kinds = {w.task: kind_of(w, self.stop_codes) for w in sup.workers}

    @staticmethod
    def failure_block(w: Worker) -> str:
        lines = [f"task {w.task} failed ({w.exit_text()}): worker {w.slot.index} ({w.slot.describe()}, pid {w.pid}); "
                 f"its committed rows are kept (a rerun redoes only the rest); log: {w.log}"]
        tail = w.tail()
        if tail:
            lines.append("  last lines of its log:")
            lines += [f"  | {ln}" for ln in tail]
        return "\n".join(lines)

    def code(self) -> int:
        kinds = set(self.kinds.values())
        if "failed" in kinds or self.sup.start_error:
            return EXIT_FAILED
        if "refused" in kinds:
            return EXIT_USAGE
        if self.sup.stop_reason is not None:
            return self.sup.stop_code
        stopped = [w.returncode for w in self.sup.workers if self.kinds[w.task] == "stopped"]
        if stopped:
            return int(stopped[0] or EXIT_FAILED)  # a worker stopped by a signal of its own (e.g. TERM sent to it)
        return EXIT_OK if not self.sup.queue else EXIT_FAILED

    def finish(self) -> int:
        """Say how it ended; the exit code."""
        sup = self.sup
        code = self.code()
        refused = [w for w in sup.workers if self.kinds[w.task] == "refused"]
        reasons = {error_line(w) for w in refused}
        if refused and len(refused) == len(sup.workers) and len(reasons) == 1 and None not in reasons:
            sup.say(reasons.pop() or "")  # every worker refused the same: one line, as a plain run says it
            return EXIT_USAGE
        summ = combined_summary(sup.out, sup.plan.tasks, sup.cfg.cost_per_hour, wall_s=self.wall_s)
        view = sup.view
        gen_s = view.generation_s if view is not None else None  # the machine's rate, not the workers' summed
        tokens = view.run_output_tokens() if view is not None else 0
        summ["output_tok_s"] = round(tokens / gen_s, 2) if gen_s and tokens else None
        summ["run_output_tokens"] = tokens
        n = len(sup.plan.tasks)
        head = (f"done: all {n} tasks of {sup.out}" if code == EXIT_OK else
                f"{summ['done_tasks']} of {n} tasks done in {sup.out}")
        sup.say(f"{head} ({sup.plan.workers} workers)\n" + format_summary(summ))
        if code == EXIT_OK:
            job_summary = sup.out / ".batchgen" / "summary.json"
            if job_summary.exists() and sup.plan.num_tasks == n:
                sup.say(f"summary: {job_summary}")
            return code
        self._unfinished_lines(summ)
        return code

    def _unfinished_lines(self, summ: dict) -> None:
        sup = self.sup
        progress = read_tasks(sup.out, sup.plan.tasks)
        by_task = {w.task: w for w in sup.workers}
        for t in sup.plan.tasks:
            p = progress.get(t)
            if p is not None and p.state == "done":
                continue
            w = by_task.get(t)
            rows = f"{p.rows_done:,}" + (f"/{p.rows_total:,}" if p.rows_total is not None else "") if p else "0"
            how = "not started" if w is None else w.exit_text()
            log = f"; log: {w.log}" if w is not None else ""
            sup.say(f"  task {t}: {how}, {rows} rows saved{log}")
        if sup.stop_reason is not None and not sup.start_error:
            what = f"{sup.stop_reason}"
        else:
            what = "error: not every task finished"
        sup.say(f"{what}: {summ['rows']:,} rows are saved in {sup.out}; run the same command to resume (only the "
                "unfinished tasks' rows are generated)")

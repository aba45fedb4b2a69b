"""The Slurm wing, beside the pipeline: `batchgen submit` (submit.py, sbatch.py), stop and
self-requeue inside a task (requeue.py), `batchgen status` (status.py, status_view.py).

How a batchgen array job behaves (the contract the tests check):

- `batchgen submit job.yaml --tasks N` writes OUT/.batchgen/slurm/<name>-<stamp>.sbatch and
  submits it: `--array=0-(N-1)[%M]`, `--requeue`, `--signal=B:USR1@<grace>`, one log per task
  (OUT/.batchgen/slurm/logs/<arrayjob>_<task>.log, appended across requeues) and a last line
  that `exec`s the absolute path of the batchgen that submitted it, so the batchgen process
  *is* the batch shell and receives the signals Slurm sends to it.
- Each task reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (batchgen.slurm.array_task.task_from_env).
- USR1 (the time-limit warning asked for by `--signal=B:USR1@grace`): the run stops admitting,
  commits what is complete, then (`requeue_on_usr1`, a Job.on_stop callback) runs
  `scontrol requeue <arrayjob>_<task>` and exits 138 (128 + USR1). Not when a restarted task
  (SLURM_RESTART_COUNT > 0) committed no rows in its run: another run would only repeat it
  (time limit shorter than loading the model, or than one batch), so it says so and stays stopped.
- TERM (preemption, `scontrol requeue` by anyone, scancel, the time limit itself): stop
  admitting, commit, exit 143. No self-requeue: when Slurm is requeueing the task
  (preemption with PreemptMode=REQUEUE, scontrol requeue) it restarts it on its own, and
  after a scancel the user wants it to stay stopped.
- Requeueing sends TERM to the task itself, after the final commit: a second signal while
  stopping only makes the stop "hard" (nothing left to abandon by then).
- A restarted task (SLURM_RESTART_COUNT > 0) resumes from its committed shards.
- Data parallel inside a task (`--gpus-per-task G`: `batchgen run --data-parallel G`, or
  `--data-parallel D`): the batch shell is the supervisor (batchgen.pipeline.parallel), its workers
  are tasks i*D .. i*D+D-1 of N*D. USR1 reaches the supervisor, which forwards it to its workers
  (attached with requeue=False: they stop, exit 138, never requeue) and, once all have exited,
  requeues the array task once, under the same no-progress rule. TERM from Slurm reaches every
  process of the task and is forwarded as well: a worker takes the copy as the same stop.

Exit codes of `batchgen run`: 0 = this task's part is complete; 128 + signal (138 USR1,
143 TERM, 130 INT) = stopped by that signal with everything complete committed (a rerun or
requeue resumes); 1 = failed; 2 = refused (bad job file, output of another job).
"""
from __future__ import annotations

from .array_task import task_from_env  # noqa: F401
from .requeue import (  # noqa: F401
    EARLY_SIGNALS, EXIT_USR1, attach_to_job, own_slurm_job, requeue_on_usr1, requeue_self, restart_count,
    restore_signals,
)
from .sbatch import SLURM_DIR, batchgen_command, render_sbatch_script, sbatch_submit, write_sbatch_script  # noqa: F401
from .submit import (  # noqa: F401
    DEFAULT_GRACE_S, JobRefused, SubmitOptions, job_output_dir, submit_command, time_limit_seconds,
)

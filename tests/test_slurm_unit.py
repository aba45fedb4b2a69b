"""Unit tests of batchgen.slurm: submit, the sbatch script, stop and requeue (no cluster needed);
`batchgen status` is tests/test_slurm_status.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen import slurm
from batchgen.pipeline.task_progress import PROGRESS_DIR, TaskProgress
from batchgen.slurm import requeue, sbatch
from batchgen.slurm.status import status_command


# ------------------------------------------------------------------------- helpers
def write_job(tmp_path: Path, out: str = "out") -> Path:
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(
        "model:\n  path: some-model\n"
        "input:\n  files: [in.jsonl]\n"
        "prompt:\n  column: prompt\n"
        f"output:\n  path: {out}\n"
    )
    return job


def dry_run(job: Path, *args: str) -> str:
    r = CliRunner().invoke(slurm.submit_command, [str(job), *args, "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def sbatch_lines(script: str) -> list[str]:
    return [ln[len("#SBATCH "):] for ln in script.splitlines() if ln.startswith("#SBATCH ")]


def write_progress(out: Path, tasks: list[dict]) -> None:
    """Progress files as the run loop writes them (tests/test_slurm_status.py reads them)."""
    for t in tasks:
        TaskProgress(**t).write(out / PROGRESS_DIR / f"task-{t['task_id']:05d}.json")


def run_status(out: Path, *args: str):
    return CliRunner().invoke(status_command, [str(out), *args], catch_exceptions=False)


# ------------------------------------------------------------------------- the sbatch script
def test_dry_run_script(tmp_path):
    job = write_job(tmp_path)
    script = dry_run(job, "--tasks", "4", "--gpus-per-task", "2", "--cpus-per-task", "8", "--partition", "gpu",
                     "--time", "4:00:00", "--max-parallel", "2", "--sbatch-arg=--mem=64G",
                     "--sbatch-arg", "--account=abc", "--grace", "300")
    assert script.startswith("#!/bin/bash\n")
    opts = sbatch_lines(script)
    out = (tmp_path / "out").resolve()
    assert "--array=0-3%2" in opts
    assert "--requeue" in opts
    assert "--signal=B:USR1@300" in opts
    assert f"--output={out}/.batchgen/slurm/logs/%A_%a.log" in opts  # one log per task, beside the output
    assert "--open-mode=append" in opts  # a requeued task appends to its log
    assert "--gres=gpu:2" in opts and "--cpus-per-task=8" in opts
    assert "--partition=gpu" in opts and "--time=4:00:00" in opts
    assert opts[-2:] == ["--mem=64G", "--account=abc"]  # user's args last: they win
    last = [ln for ln in script.splitlines() if ln.strip()][-1]
    # a task's 2 GPUs: data parallel over them (2 workers, each a task of the output)
    assert last.startswith("exec /") and last.endswith(f"run {job.resolve()} --data-parallel 2")
    cmd = last.split()[1]
    assert os.path.isabs(cmd)
    # dry run writes nothing
    assert not (tmp_path / "out").exists()
    # and bash can parse it
    p = tmp_path / "s.sh"
    p.write_text(script)
    subprocess.run(["bash", "-n", str(p)], check=True)


def test_dry_run_cpu_only_and_defaults(tmp_path):
    script = dry_run(write_job(tmp_path), "--tasks", "3", "--gpus-per-task", "0")
    opts = sbatch_lines(script)
    assert "--array=0-2" in opts
    assert not any(o.startswith(("--gres", "--gpus")) for o in opts)
    assert not any(o.startswith(("--partition", "--time", "--cpus-per-task")) for o in opts)
    assert f"--signal=B:USR1@{slurm.DEFAULT_GRACE_S}" in opts


def run_line(script: str) -> str:
    return [ln for ln in script.splitlines() if ln.strip()][-1]


def test_data_parallel_per_task(tmp_path):
    """One worker per GPU of the task unless --data-parallel says; CPU-only tasks take the job's key."""
    job = write_job(tmp_path)
    assert run_line(dry_run(job, "--tasks", "2")).endswith("--data-parallel 1")  # 1 GPU: a plain run
    assert run_line(dry_run(job, "--tasks", "2", "--gpus-per-task", "4")).endswith("--data-parallel 4")
    assert run_line(dry_run(job, "--tasks", "2", "--gpus-per-task", "4", "--data-parallel", "2")).endswith(
        "--data-parallel 2")
    assert run_line(dry_run(job, "--tasks", "2", "--gpus-per-task", "0")).endswith("--data-parallel 1")
    job.write_text(job.read_text() + "engine:\n  device: cpu\n  data_parallel: 3\n")
    assert run_line(dry_run(job, "--tasks", "2", "--gpus-per-task", "0")).endswith("--data-parallel 3")
    job.write_text(job.read_text().replace("data_parallel: 3", "data_parallel: all"))
    assert run_line(dry_run(job, "--tasks", "2", "--gpus-per-task", "0")).endswith("--data-parallel 1")


def test_data_parallel_submit_refusals(tmp_path):
    job = write_job(tmp_path)
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--gpus-per-task", "2",
                                                  "--data-parallel", "3", "--dry-run"])
    assert r.exit_code == 2 and "--data-parallel 3 needs 3 GPUs per task" in r.output
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--data-parallel", "0", "--dry-run"])
    assert r.exit_code == 2 and "--data-parallel must be >= 1" in r.output
    # the output's task count is tasks x workers: 4 = 2 x 2 resubmits, 2 x 1 does not
    write_progress(tmp_path / "out", [dict(task_id=0, num_tasks=4, state="running", rows_done=1)])
    dry_run(job, "--tasks", "2", "--gpus-per-task", "2")
    dry_run(job, "--tasks", "4", "--gpus-per-task", "1")
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--dry-run"])
    assert r.exit_code == 2 and "--tasks 4" in r.output
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "4", "--gpus-per-task", "2", "--dry-run"])
    assert r.exit_code == 2 and "4 tasks in all" in r.output and "4 x 2 (--tasks x --data-parallel) = 8" in r.output


def test_batchgen_command_is_absolute(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "batchgen"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(fake), "submit"])
    assert slurm.batchgen_command() == [str(fake)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bin/batchgen", "submit"])
    assert slurm.batchgen_command() == [str(fake)]
    monkeypatch.setattr(sys, "argv", ["pytest"])
    cmd = slurm.batchgen_command()
    assert os.path.isabs(cmd[0])


@pytest.mark.parametrize("args, msg", [
    (["--tasks", "0"], "--tasks"),
    (["--tasks", "2", "--gpus-per-task", "-1"], "--gpus-per-task"),
    (["--tasks", "2", "--max-parallel", "0"], "--max-parallel"),
    (["--tasks", "2", "--time", "1", "--grace", "120"], "grace"),
])
def test_submit_rejects(tmp_path, args, msg):
    r = CliRunner().invoke(slurm.submit_command, [str(write_job(tmp_path)), *args, "--dry-run"])
    assert r.exit_code == 2 and msg in r.output


def test_submit_bad_job_file(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  path: m\n")
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--dry-run"])
    # refused like `batchgen run` refuses it: exit 2, one line
    assert r.exit_code == 2 and r.output.startswith("error: ") and "input" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_submit_refuses_other_task_count(tmp_path):
    job = write_job(tmp_path)
    write_progress(tmp_path / "out", [dict(task_id=0, num_tasks=4, state="running", rows_done=1)])
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "3", "--dry-run"])
    assert r.exit_code == 2 and "--tasks 4" in r.output
    dry_run(job, "--tasks", "4")


def test_submit_writes_script_and_calls_sbatch(tmp_path, monkeypatch):
    job = write_job(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho "4242;cluster"\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--gpus-per-task", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == "4242"
    scripts = list((tmp_path / "out" / ".batchgen" / "slurm").glob("*.sbatch"))
    assert len(scripts) == 1 and os.access(scripts[0], os.X_OK)
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(scripts[0])]
    assert (tmp_path / "out" / ".batchgen" / "slurm" / "logs").is_dir()


@pytest.mark.parametrize("t, s", [("10", 600), ("1:30", 90), ("2:00:00", 7200), ("1-0", 86400),
                                  ("1-2:03", 93780), ("1-2:03:04", 93784), ("INFINITE", None), ("x", None)])
def test_time_limit_seconds(t, s):
    assert slurm.time_limit_seconds(t) == s


# ------------------------------------------------------------------------- identity
def test_identity_helpers():
    assert slurm.restart_count({"SLURM_RESTART_COUNT": "3"}) == 3
    assert slurm.restart_count({}) == 0
    assert slurm.own_slurm_job({"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "9"}) == "7_2"
    assert slurm.own_slurm_job({"SLURM_JOB_ID": "9"}) == "9"
    assert slurm.own_slurm_job({}) is None


# ------------------------------------------------------------------------- stop and requeue
class FakeJob:
    def __init__(self):
        self.stop_signals = {signal.SIGTERM: 143, signal.SIGINT: 130}
        self.on_stop = []
        self.stopped_by = None
        self.said = []

    def say(self, m):
        self.said.append(m)


def test_attach_requeues_only_on_usr1_inside_slurm(monkeypatch):
    calls = []
    monkeypatch.setattr(requeue, "requeue_self", lambda env=None, **k: calls.append(env) or True)
    env = {"SLURM_ARRAY_JOB_ID": "3", "SLURM_ARRAY_TASK_ID": "1"}
    job = slurm.attach_to_job(FakeJob(), env)
    assert job.stop_signals[signal.SIGUSR1] == 128 + signal.SIGUSR1
    assert job.stop_signals[signal.SIGTERM] == 143  # left as the pipeline set it
    (cb,) = job.on_stop
    job.stopped_by = signal.SIGTERM
    cb(job)
    assert calls == []  # TERM: Slurm requeues (or the user cancelled): no self-requeue
    job.stopped_by = signal.SIGUSR1
    cb(job)
    assert calls == [env]
    outside = slurm.attach_to_job(FakeJob(), {})
    outside.stopped_by = signal.SIGUSR1
    assert outside.on_stop[0](outside) is False and calls == [env]  # not in Slurm: just stop


def test_usr1_requeue_needs_progress_after_a_restart(monkeypatch):
    calls = []
    monkeypatch.setattr(requeue, "requeue_self", lambda env=None, **k: calls.append(env) or True)
    job = FakeJob()
    job.stopped_by, job.rows_committed_this_run = signal.SIGUSR1, 0
    first = {"SLURM_ARRAY_JOB_ID": "3", "SLURM_ARRAY_TASK_ID": "1"}
    assert slurm.requeue_on_usr1(job, first) and calls == [first]  # first run: may have paid a cold start
    again = first | {"SLURM_RESTART_COUNT": "2"}
    assert not slurm.requeue_on_usr1(job, again) and calls == [first]
    assert "not requeueing 3_1: restart 2 committed no rows" in job.said[-1]
    job.rows_committed_this_run = 7
    assert slurm.requeue_on_usr1(job, again) and calls == [first, again]


def test_requeue_self_runs_scontrol(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/args\n')
    (bindir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert slurm.requeue_self({"SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}, log=lambda m: None)
    assert (tmp_path / "args").read_text() == "requeue 12_3\n"
    assert not slurm.requeue_self({}, log=lambda m: None)
    (bindir / "scontrol").write_text("#!/bin/sh\necho nope >&2; exit 1\n")
    msgs = []
    assert not slurm.requeue_self({"SLURM_JOB_ID": "4"}, log=msgs.append)
    assert "nope" in msgs[0]


def test_status_and_submit_use_the_manifest_task_count(tmp_path):
    job = write_job(tmp_path)
    out = tmp_path / "out"
    write_progress(out, [dict(task_id=0, state="done", rows_done=3, rows_total=3)])
    (out / ".batchgen" / "manifest.json").write_text(json.dumps({"num_tasks": 3, "fingerprint": "f"}))
    r = run_status(out)
    assert r.exit_code == 1 and r.output.count("pending") == 2
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--dry-run"])
    assert r.exit_code == 2 and "--tasks 3" in r.output


def test_submit_without_sbatch_keeps_the_script(tmp_path, monkeypatch):
    job = write_job(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2"])
    assert r.exit_code == 1 and "sbatch not found" in r.output and ".sbatch" in r.output
    assert len(list((tmp_path / "out" / ".batchgen" / "slurm").glob("*.sbatch"))) == 1


def test_cluster_harness_skips_with_a_reason(monkeypatch, tmp_path):
    try:
        import slurm_cluster as sc
    except ImportError:  # tests/ imported as a package
        from tests import slurm_cluster as sc
    monkeypatch.setattr(sc, "BINARIES", ("no-such-slurm-binary",))
    reason = sc.slurm_unavailable_reason()
    assert "not installed" in reason and "slurm-setup.sh" in reason
    monkeypatch.delenv("BATCHGEN_REQUIRE_SLURM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        sc.start_cluster(tmp_path)
    monkeypatch.setenv("BATCHGEN_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception, match="BATCHGEN_REQUIRE_SLURM"):
        sc.start_cluster(tmp_path)


# ------------------------------------------------------------------------- hostile names (issue 11, case 8)
HOSTILE = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "`touch PWNED`", "x;touch PWNED", "line\nbreak; touch PWNED",
           "-rf", "--help", "$HOME", "a\\b", "%A_%a", "*", "~root", "!!", "tab\there", "${IFS}touch${IFS}PWNED"]


def _fake_tools(tmp_path: Path) -> tuple[Path, Path]:
    """A bin/ dir whose sbatch and scontrol leave a mark if anything calls them, and a fake
    batchgen (in a hostile directory itself) that records its argv and working directory."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in ("sbatch", "scontrol"):
        (bindir / tool).write_text(f"#!/bin/sh\ntouch {tmp_path}/CALLED-{tool}\n")
        (bindir / tool).chmod(0o755)
    fake_dir = tmp_path / "venv $(touch PWNED) `touch PWNED`" / "bin"
    fake_dir.mkdir(parents=True, exist_ok=True)
    fake = fake_dir / "batchgen"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "open(os.environ['RECORD'], 'a').write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd()}) + '\\n')\n")
    fake.chmod(0o755)
    return bindir, fake


def _run_script(tmp_path: Path, script: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    bindir = tmp_path / "bin"
    path = tmp_path / "s.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    record = tmp_path / "record.jsonl"
    record.unlink(missing_ok=True)
    cwd = tmp_path / "node"
    cwd.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", RECORD=str(record), SLURM_ARRAY_TASK_ID="0",
               SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_JOB_ID="9", SLURM_CPUS_PER_TASK="2")
    r = subprocess.run(["bash", str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []
    return r, calls


def _no_injection(tmp_path: Path) -> None:
    assert not [p for p in tmp_path.rglob("PWNED*")], "a command in a name ran"
    assert not list(tmp_path.glob("CALLED-*")), "the script ran sbatch/scontrol"
    assert not (Path.home() / "PWNED").exists()


@pytest.mark.parametrize("exists", [True, False], ids=["workdir-exists", "workdir-missing"])
@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[1:12])
def test_script_runs_hostile_names_as_data(tmp_path, name, exists):
    """The batch script's shell lines, executed: a name with $(...), backticks, quotes, newlines or
    leading dashes reaches batchgen as the very same string and runs nothing."""
    _, fake = _fake_tools(tmp_path)
    workdir = tmp_path / "work" / name
    if exists:
        workdir.mkdir(parents=True)
    job_file = tmp_path / "jobs" / name / "job.yaml"
    run_args = ["--set", f"prompt.system={name}"]
    script = slurm.render_sbatch_script(job_file, tmp_path / "out", slurm.SubmitOptions(tasks=2), command=[str(fake)],
                                        workdir=workdir, run_args=run_args)
    r, calls = _run_script(tmp_path, script)
    assert r.returncode == 0, r.stderr
    _no_injection(tmp_path)
    assert calls == [{"argv": ["run", str(job_file), *run_args], "cwd": str(workdir if exists else tmp_path / "node")}]
    if not exists:
        assert f"batchgen: warning: no directory {workdir} here" in r.stderr


@pytest.mark.parametrize("name", ["$(touch${IFS}PWNED)", "`touch${IFS}PWNED`", "a;touch${IFS}PWNED", "100%j", "-x"])
def test_output_dir_names_in_sbatch_lines(tmp_path, name):
    """The output directory is in #SBATCH --output (read by sbatch, not a shell): kept as is, '%' escaped."""
    _, fake = _fake_tools(tmp_path)
    out = tmp_path / name
    script = slurm.render_sbatch_script(tmp_path / "job.yaml", out, slurm.SubmitOptions(tasks=1), command=[str(fake)])
    assert f"--output={str(out).replace('%', '%%')}/.batchgen/slurm/logs/%A_%a.log" in sbatch_lines(script)
    r, calls = _run_script(tmp_path, script)
    assert r.returncode == 0 and len(calls) == 1
    _no_injection(tmp_path)


@pytest.mark.parametrize("name", ["a b", "it's", 'x"y', "a\\b", "line\nbreak"])
def test_output_dir_sbatch_cannot_hold_is_one_line(tmp_path, name):
    job = write_job(tmp_path, out="placeholder")
    (tmp_path / name).mkdir()
    job.write_text(job.read_text().replace("path: placeholder", f"path: {json.dumps(str(tmp_path / name))}"))
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--dry-run"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: the output directory's path can't hold white space, quotes or backslashes")
    assert len(r.output.strip().splitlines()) == 1


def test_submit_with_hostile_cwd_and_job_path_end_to_end(tmp_path, monkeypatch):
    """batchgen submit from a hostile directory, a fake sbatch that runs the script it is given as
    a compute node would: the fake batchgen gets exactly the job file, nothing else runs."""
    bindir, fake = _fake_tools(tmp_path)
    jobdir = tmp_path / "jobs $(touch PWNED)" / "it's `touch PWNED`"
    jobdir.mkdir(parents=True)
    job = write_job(jobdir, out=str(tmp_path / "out"))
    record = tmp_path / "record.jsonl"
    (bindir / "sbatch").write_text(f"#!/bin/sh\nRECORD={record} SLURM_ARRAY_TASK_ID=0 SLURM_ARRAY_TASK_COUNT=1 "
                                   'bash "$2" >/dev/null 2>&1 || exit 1\necho "51;cluster"\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setattr(sbatch, "batchgen_command", lambda: [str(fake)])
    monkeypatch.chdir(jobdir)
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "1", "--gpus-per-task", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == "51"
    calls = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert calls == [{"argv": ["run", str(job), "--data-parallel", "1"], "cwd": str(jobdir)}]
    _no_injection(tmp_path)


def test_submit_gpus_zero_with_a_cuda_job_is_refused(tmp_path):
    job = write_job(tmp_path)
    job.write_text(job.read_text() + "engine:\n  device: cuda\n")
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--gpus-per-task", "0", "--dry-run"])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: {job}:10: engine.device: cuda needs a GPU, but --gpus-per-task 0 gives the tasks none"
    # with GPUs the login node's own lack of CUDA does not matter
    r = CliRunner().invoke(slurm.submit_command, [str(job), "--tasks", "2", "--dry-run"])
    assert r.exit_code == 0, r.output


def test_sbatch_script_is_never_written_through_a_link(tmp_path: Path) -> None:
    """A link planted at OUT/.batchgen/slurm (or its logs/) must not make submit write elsewhere."""
    import os

    import click

    from batchgen.slurm import write_sbatch_script

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / ".batchgen").mkdir(parents=True)
    os.symlink(elsewhere, out / ".batchgen" / "slurm")
    with pytest.raises(click.ClickException, match="link"):
        write_sbatch_script(out, "#!/bin/bash\n", "job")
    assert list(elsewhere.iterdir()) == []
    os.unlink(out / ".batchgen" / "slurm")
    path = write_sbatch_script(out, "#!/bin/bash\necho hi\n", "my job")
    assert path.read_text() == "#!/bin/bash\necho hi\n" and os.access(path, os.X_OK)
    assert (out / ".batchgen/slurm/logs").is_dir() and not list(path.parent.glob("*.tmp"))

"""Faults about processes, files and signals, on real `batchgen run` subprocesses and a tiny
random-weight checkpoint: another task running while --overwrite comes, shards corrupted or
copied in, symbolic links inside the output, a full disk (RLIMIT_FSIZE), a lost or broken
manifest, progress file or ledger, and what a stop says at once.

No sleep here is sized for one machine: a signal is sent on progress observed in the output
directory (shards committed by the run being signalled); a task is held still with SIGSTOP, not
by hoping it is slow."""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

from batchgen.pipeline.sink.layout import SHARD_RE
from batchgen.pipeline.sink.shard_file import read_shard_meta
from batchgen.pipeline.sink.verify import verify_output

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 24

pytestmark = pytest.mark.slow

# commits by row count only (flush_seconds far off): which rows a shard holds never depends on machine speed
JOB = """\
model: {{path: model}}
input: {{files: [{data}], columns: [topic]}}
prompt: {{column: prompt}}
sampling: {{max_new_tokens: {tokens}, temperature: 0.9, n: 2, seed: 7}}
output: {{path: {out}, rows_per_shard: 4, flush_seconds: 3600, stop_grace_seconds: {grace}, compression: {comp}}}
engine: {{device: cpu, max_num_seqs: 4, max_batch_tokens: 256}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Any) -> Path:
    d = tmp_path_factory.mktemp("faults")
    (d / "model").symlink_to(tiny_checkpoint("smollm2"))
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(N_ROWS):
            f.write(json.dumps({"prompt": f"Write about item {i} and the sea", "topic": f"t{i % 5}"}) + "\n")
    return d


def job_file(d: Path, out: str, *, data: str = "prompts.jsonl", tokens: int = 16, grace: float = 10.0,
             comp: str = "zstd") -> Path:
    p = d / f"{out}.yaml"
    p.write_text(JOB.format(data=data, out=out, tokens=tokens, grace=grace, comp=comp))
    return p


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["TOKENIZERS_PARALLELISM"] = "false"
    return e


def cmd(job: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "batchgen.cli", "run", str(job), "--progress", "log", *args]


def run(job: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(job, *args), cwd=str(job.parent), env=env(), capture_output=True, text=True,
                          timeout=600, **kw)


def shards(out: Path, task: int | None = None) -> list[str]:
    try:
        names = sorted(n for n in os.listdir(out) if SHARD_RE.match(n))
    except FileNotFoundError:
        return []
    return [n for n in names if task is None or int(n[6:11]) == task]


def read(out: Path) -> dict[tuple, dict]:
    import pyarrow.dataset as pds

    rows = pds.dataset(str(out), format="parquet").to_table().to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated (id, sample_index)"
    return dict(zip(keys, rows))


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The run's last line: an 'error: ...' line, and no traceback anywhere."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict[tuple, dict]:
    r = run(job_file(workdir, "ref"))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = read(workdir / "ref")
    assert set(ref) == {(i, s) for i in range(N_ROWS) for s in range(2)}
    return ref


def copy_of_reference(workdir: Path, reference: dict, name: str) -> Path:
    """A copy of the finished reference output under another name (and its job file)."""
    shutil.copytree(workdir / "ref", workdir / name, symlinks=True)
    job_file(workdir, name)
    return workdir / name


# --------------------------------------------------------------------------- case 1
def test_overwrite_is_refused_while_another_task_of_the_output_runs(workdir: Path, reference: dict) -> None:
    """Task 1 of 2 is running (held still by SIGSTOP right after its first commit); task 0 of a
    changed job with --overwrite must not clear it: exit 2 naming task 1, its shards untouched,
    and task 1 then finishes the job it was asked for."""
    out = workdir / "two"
    job = job_file(workdir, "two")
    log = open(workdir / "two-task1.log", "w")
    p1 = subprocess.Popen(cmd(job, "--task-id", "1", "--num-tasks", "2"), cwd=str(workdir), env=env(),
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: bool(shards(out, 1)), p1), (workdir / "two-task1.log").read_text()[-3000:]
        p1.send_signal(signal.SIGSTOP)
        before = {n: (out / n).stat().st_mtime_ns for n in shards(out)}
        r = run(job, "--task-id", "0", "--num-tasks", "2", "--overwrite", "--set", "sampling.temperature=0.1")
        assert r.returncode == 2, r.stderr[-3000:]
        line = one_line_error(r)
        assert "is in use" in line and re.search(rf"task 1 \(pid {p1.pid} on ", line), line
        assert {n: (out / n).stat().st_mtime_ns for n in shards(out)} == before  # nothing cleared
        assert all(read_shard_meta(out / n)["sampling"]["temperature"] == 0.9 for n in before)
    finally:
        p1.send_signal(signal.SIGCONT)
    assert p1.wait(timeout=600) == 0, (workdir / "two-task1.log").read_text()[-3000:]
    r = run(job, "--task-id", "0", "--num-tasks", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    got = read(out)
    assert got == reference  # both tasks of the one job asked for: the same rows as one task
    assert verify_output(out) == []


# --------------------------------------------------------------------------- case 4
def test_corrupt_copied_and_foreign_shards_are_not_trusted(workdir: Path, reference: dict) -> None:
    out = copy_of_reference(workdir, reference, "tampered")
    job = workdir / "tampered.yaml"
    names = shards(out)
    # a copy under another sequence number, and another task's name in a one-task output: the
    # footers look fine, load_dataset reads both; the run must not say "complete"
    for extra in ("part-t00000-000099.parquet", "part-t00001-000000.parquet"):
        shutil.copy(out / names[0], out / extra)
        problems = verify_output(out)
        assert len(problems) == 1 and extra in problems[0], problems
        r = run(job)
        assert r.returncode == 2, r.stderr[-3000:]
        line = one_line_error(r)
        assert str(out / extra) in line and "move it out of" in line and "--overwrite" not in line, line
        (out / extra).rename(workdir / extra)  # what the message says to do
    assert verify_output(out) == []
    # a page flipped inside a shard: its footer still reads, its rows are wrong
    import pyarrow.parquet as pq

    victim = out / names[1]
    col = pq.ParquetFile(victim).metadata.row_group(0).column(3)  # the completions' column chunk
    data = bytearray(victim.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert read_shard_meta(victim)["rows"] == 2  # the footer reads as before
    problems = verify_output(out)
    assert len(problems) == 1 and names[1] in problems[0] and "checksum" in problems[0], problems
    r = run(job)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: {victim} does not match its sha256" in r.stderr and "moved it to" in r.stderr, r.stderr
    assert (out / ".batchgen/quarantine" / names[1]).read_bytes() == bytes(data)
    assert read(out) == reference  # its rows were generated again, the same as before
    assert verify_output(out) == []


# --------------------------------------------------------------------------- case 7
def test_symlinks_inside_the_output_are_never_followed(workdir: Path, reference: dict) -> None:
    # OUT/.batchgen a link to another folder: nothing written or deleted there, run or --overwrite
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text('{"theirs": true}\n')
    (elsewhere / "notes.json").write_text("mine\n")
    out = workdir / "linked"
    out.mkdir()
    (out / ".batchgen").symlink_to(elsewhere)
    job = job_file(workdir, "linked")
    for args in ((), ("--overwrite",)):
        r = run(job, *args)
        assert r.returncode == 2, r.stderr[-3000:]
        line = one_line_error(r)
        assert f"{out / '.batchgen'} is a symbolic link" in line, line
        assert sorted(os.listdir(elsewhere)) == ["notes.json", "summary.json"]
        assert (elsewhere / "summary.json").read_text() == '{"theirs": true}\n'
        assert shards(out) == []
    # a link where a lock file goes: its target is neither truncated nor written
    out = copy_of_reference(workdir, reference, "locklink")
    victim = workdir / "victim.txt"
    victim.write_text("do not truncate me\n")
    lock = out / ".batchgen/locks/task-00000.lock"
    lock.unlink()
    lock.symlink_to(victim)
    r = run(workdir / "locklink.yaml")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{lock} is a symbolic link" in one_line_error(r)
    assert victim.read_text() == "do not truncate me\n"


# --------------------------------------------------------------------------- case 7b
@pytest.mark.parametrize("where", ["shard", "ledger", "task lock", "manifest", "progress", "card temp file"])
def test_fifos_where_batchgen_keeps_its_files_never_block_a_run(workdir: Path, reference: dict, where: str) -> None:
    """A FIFO (as hostile as a file gets: opening it to read blocks until someone writes) where a committed shard,
    the ledger, a lock, the manifest, a progress file or the dataset card's temp file goes: the run and
    `status --verify` end (one line naming it, or going on where the file is batchgen's to replace), nothing is
    read through it and no row is lost."""
    name = f"fifo-{where.replace(' ', '-')}"
    if where == "card temp file":  # a fresh run: the card is written when the job finishes
        out = workdir / name
        out.mkdir()
        job = job_file(workdir, name)
        job.write_text(job.read_text().replace("compression: zstd", "compression: zstd, dataset_card: true"))
    else:  # a finished output, verified when the run starts
        out = copy_of_reference(workdir, reference, name)
        job = workdir / f"{name}.yaml"
    victim = {"shard": out / (shards(out) or ["-"])[0], "ledger": out / ".batchgen/ledger/task-00000.jsonl",
              "task lock": out / ".batchgen/locks/task-00000.lock", "manifest": out / ".batchgen/manifest.json",
              "progress": out / ".batchgen/progress/task-00000.json", "card temp file": out / ".README.md.tmp"}[where]
    saved = victim.read_bytes() if victim.exists() else None
    with contextlib.suppress(FileNotFoundError):
        victim.unlink()
    os.mkfifo(victim)
    r = subprocess.run(cmd(job), cwd=str(workdir), env=env(), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if where in ("shard", "ledger", "task lock"):  # what it cannot trust or hold: refused, for the user to look at
        assert r.returncode == 2, r.stderr[-3000:]
        line = one_line_error(r)
        assert f"{victim} is not a regular file" in line and "move it away" in line, line
        problems = verify_output(out)  # the same without blocking, as a list of problems (the data's: not a lock)
        if where == "task lock":
            assert problems == [], problems
        else:
            assert any(f"{victim}" in p and "not a regular file" in p for p in problems), problems
        victim.unlink()
        victim.write_bytes(saved)  # moved away and put back: the output is whole again
        assert verify_output(out) == []
    else:  # batchgen's to rewrite (the manifest, a progress file) or to remove (its own temp name)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not victim.exists() if where == "card temp file" else stat.S_ISREG(os.lstat(victim).st_mode)
        if where == "card temp file":
            assert "written by batchgen" in (out / "README.md").read_text()
            (out / "README.md").unlink()  # not a shard: the dataset reader below takes every file
    assert read(out) == reference


def test_a_folder_by_a_temp_shard_name_is_one_line_and_never_deleted(workdir: Path) -> None:
    """OUT/.part-t00000-000000.parquet.tmp a directory (a crash leaves a file by that name, which goes): the run
    refuses in one line naming it, and it is still there (it was an IsADirectoryError traceback)."""
    out = workdir / "tmp-folder"
    (out / ".part-t00000-000000.parquet.tmp").mkdir(parents=True)
    (out / ".part-t00000-000000.parquet.tmp" / "keep.txt").write_text("mine\n")
    r = run(job_file(workdir, "tmp-folder"))
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_line_error(r)
    assert f"{out / '.part-t00000-000000.parquet.tmp'} is not a regular file" in line, line
    assert (out / ".part-t00000-000000.parquet.tmp" / "keep.txt").read_text() == "mine\n"


def test_a_file_where_the_ledger_folder_goes_is_one_line(workdir: Path, reference: dict) -> None:
    """OUT/.batchgen/ledger a file: the run refuses in one line naming it (it was a NotADirectoryError traceback), and
    `status --verify` lists it as a problem."""
    out = copy_of_reference(workdir, reference, "ledger-file")
    shutil.rmtree(out / ".batchgen/ledger")
    (out / ".batchgen/ledger").write_text("not a folder\n")
    r = run(workdir / "ledger-file.yaml")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{out / '.batchgen/ledger'} is not a directory" in one_line_error(r)
    assert any("ledger is not a directory" in p for p in verify_output(out)), verify_output(out)
    s = subprocess.run([sys.executable, "-m", "batchgen.cli", "status", str(out), "--verify"], cwd=str(workdir),
                       env=env(), capture_output=True, text=True, timeout=300)
    assert s.returncode == 1 and "Traceback" not in s.stderr + s.stdout, s.stderr[-3000:]
    assert "ledger is not a directory" in s.stdout + s.stderr


# --------------------------------------------------------------------------- case 12
def test_full_disk_commits_what_fits_and_resumes(workdir: Path) -> None:
    """RLIMIT_FSIZE (SIGXFSZ ignored, so a write past it fails with EFBIG): the first rows' shards
    fit, a shard of long rows does not. One line, exit 1, no temp file left, then a rerun with
    room completes the job exactly once."""
    import random

    rng = random.Random(3)
    with open(workdir / "long.jsonl", "w") as f:
        for i in range(16):
            topic = "s" if i < 6 else "".join(rng.choice("abcdefghij klmnop") for _ in range(2500))
            f.write(json.dumps({"prompt": f"item {i}", "topic": topic}) + "\n")
    job = job_file(workdir, "full", data="long.jsonl", tokens=4, comp="none")
    out = workdir / "full"
    limit = 6000  # > the manifest and a shard of short rows; < a shard holding one long row

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(job, preexec_fn=small_files)
    assert r.returncode == 1, r.stderr[-3000:]
    line = one_line_error(r)
    assert "no space left writing" in line and "rows are saved in" in line and "run the same command to resume" in line
    saved = shards(out)
    assert saved, "the shards that fit were not committed"
    leftovers = [str(p) for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert verify_output(out) == []
    r = run(job)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    got = read(out)
    assert set(got) == {(i, s) for i in range(16) for s in range(2)}
    assert all(row["error"] is None for row in got.values())


def test_lost_or_broken_manifest_progress_and_ledger(workdir: Path, reference: dict) -> None:
    """Never 'pass --overwrite' (it would delete every shard) as the way out: a manifest is
    rebuilt from the shards' footers, a progress file is only progress, a broken ledger names
    the line and says how to recover."""
    out = copy_of_reference(workdir, reference, "lost")
    job = workdir / "lost.yaml"
    manifest = out / ".batchgen/manifest.json"
    original = json.loads(manifest.read_text())
    manifest.unlink()
    r = run(job)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: {manifest} was missing; rebuilt it from the shards' footers" in r.stderr
    assert "nothing to do" in r.stderr and "--overwrite" not in r.stderr
    assert json.loads(manifest.read_text())["generation"] == original["generation"]
    manifest.write_text('{"fingerprint": "trunc')
    r = run(job)
    assert r.returncode == 0 and f"{manifest} was unreadable" in r.stderr, r.stderr[-3000:]
    assert (out / ".batchgen/manifest.json.corrupt").read_text() == '{"fingerprint": "trunc'
    progress = out / ".batchgen/progress/task-00000.json"
    progress.write_text("[1, 2]\n")
    r = run(job)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: {progress} is unreadable" in r.stderr and "nothing to do" in r.stderr
    assert json.loads(progress.read_text())["state"] == "done"
    assert read(out) == reference
    ledger = out / ".batchgen/ledger/task-00000.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:2] + ["{not a record\n"] + lines[2:]))
    r = run(job)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_line_error(r)
    assert f"{ledger}:3: not a ledger record" in line and "rebuild it" in line and "--overwrite" not in line, line
    ledger.rename(workdir / "broken-ledger.jsonl")  # what it says: the ledger is rebuilt from the footers
    r = run(job)
    assert r.returncode == 0 and "rebuilt it from the footers of" in r.stderr, r.stderr[-3000:]
    assert read(out) == reference and verify_output(out) == []


# --------------------------------------------------------------------------- case 15
def test_a_stop_says_at_once_what_it_does(workdir: Path, reference: dict) -> None:
    """Ctrl-C with the progress bar on: the notice comes before the in-flight rows finish (the
    run's last line, after them)."""
    job = job_file(workdir, "notice", tokens=48, grace=30.0)
    out = workdir / "notice"
    p = subprocess.Popen(cmd(job)[:-1] + ["bar"], cwd=str(workdir), env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: bool(shards(out)), p)
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=600)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    m = re.search(r"stopping: finishing (\d+) in-flight rows \(up to 30 s\); press Ctrl-C again to stop now", err)
    assert m and 1 <= int(m.group(1)) <= 12, err[-3000:]
    assert err.index(m.group(0)) < err.index("stopped by SIGINT: saved")


# --------------------------------------------------------------------------- the commit protocol under kill -9
CRASH = """\
import os, sys
from batchgen.pipeline.config import load_job
from batchgen.pipeline.run.job import Job

mode, k = sys.argv[2], int(sys.argv[3])
real, seen = os.replace, []

def replace(src, dst, *a, **kw):
    # the moment after a shard's ledger record is fsynced and before its rename: die like kill -9
    if os.fspath(src).endswith(".parquet.tmp") and (mode == "commit" or os.path.exists(dst)):
        seen.append(dst)
        if len(seen) == k:
            os._exit(137)
    return real(src, dst, *a, **kw)

os.replace = replace
cfg = load_job(sys.argv[1], sys.argv[4:])
sys.exit(Job(cfg, retry_errors=mode == "rewrite", progress="off").run())
"""


def crash(job: Path, mode: str, k: int, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CRASH, str(job), mode, str(k), *overrides], cwd=str(job.parent),
                          env=env(), capture_output=True, text=True, timeout=600)


def test_a_kill_between_ledger_record_and_rename_is_finished_on_resume(workdir: Path, reference: dict) -> None:
    """Killed after a shard's record reached the ledger but before its rename: the resumed run
    renames it (its temp file has the recorded sha256), generating none of its rows again."""
    job = job_file(workdir, "renamed")
    out = workdir / "renamed"
    r = crash(job, "commit", 3)
    assert r.returncode == 137, r.stderr[-3000:]
    assert shards(out) == ["part-t00000-000000.parquet", "part-t00000-000001.parquet"]
    assert (out / ".part-t00000-000002.parquet.tmp").exists()
    recorded = [json.loads(x) for x in (out / ".batchgen/ledger/task-00000.jsonl").read_text().splitlines()]
    assert [x["name"] for x in recorded][-1] == "part-t00000-000002.parquet"
    (problem,) = verify_output(out)
    assert "part-t00000-000002.parquet: an interrupted commit" in problem, problem
    r = run(job)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"resuming .*: 6 rows of 24 already done in 3 shards", r.stderr), r.stderr[-3000:]
    assert read(out) == reference and verify_output(out) == []


def test_a_kill_mid_rewrite_of_retry_errors_is_finished_on_resume(workdir: Path, reference: dict) -> None:
    """--retry-errors killed between a rewrite's record and its rename over the old shard: the
    shard is the old one (readers see each row once), the resumed retry finishes the rewrite."""
    job = job_file(workdir, "retried")
    out = workdir / "retried"
    r = run(job, "--set", "engine.kv_cache_tokens=32")  # prompt + 16 new tokens don't fit: error rows
    assert r.returncode == 0, r.stderr[-3000:]
    errors = sum(row["error"] is not None for row in read(out).values())
    assert errors >= 8, errors
    names = shards(out)
    r = crash(job, "rewrite", 2)
    assert r.returncode == 137, r.stderr[-3000:]
    assert len(read(out)) == 2 * N_ROWS  # one row per (id, sample) at the moment of the kill
    (problem,) = verify_output(out)  # an unfinished rewrite, not corruption
    assert "an interrupted rewrite" in problem and "the next run of task 0 finishes it" in problem, problem
    # the same state with the rewrite's temp file gone: the old shard is kept as it was, not quarantined
    lost = workdir / "retried-lost"
    shutil.copytree(out, lost)
    before = read(lost)
    for tmp in lost.glob(".part-*.tmp"):
        tmp.unlink()
    r = run(job, "--set", f"output.path={lost.name}")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
    assert read(lost) == before and verify_output(lost) == []
    r = crash(job, "rewrite", 10 ** 6)  # the same retry, not killed
    assert r.returncode == 0, r.stderr[-3000:]
    assert shards(out) == names
    assert read(out) == reference and verify_output(out) == []

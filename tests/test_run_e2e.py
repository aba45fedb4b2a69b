"""End to end on a tiny real checkpoint: `batchgen run` as a real subprocess, killed with SIGKILL
at several random moments and resumed, or stopped with SIGTERM / SIGINT, compared with an
uninterrupted run; the output read back with `datasets`.

No sleep here is sized for one machine: a kill or a signal is sent on progress observed in the
output directory (shards committed by the run being killed, the progress file written by its
pid), at most a small random delay after it, and the job is long enough (rows x tokens) that it
can't finish within that delay on a fast machine; a run that finished anyway is noticed and
reported, not counted as a kill."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for

ROOT = Path(__file__).resolve().parents[1]
# 60 rows x 2 samples x up to 32 tokens: a few seconds of generation even on a fast core, so a
# kill at most KILL_JITTER_S after progress was seen always lands with most of the job left
N_ROWS = 60
KILL_JITTER_S = 0.05
SHARD_RE = re.compile(r"^part-t\d{5}-\d{6}\.parquet$")

pytestmark = pytest.mark.slow

JOB = """\
model: {{path: {model}}}
input:
  files: [prompts.jsonl]
  columns: [topic]
prompt:
  column: prompt
  system: Answer briefly.
sampling: {{max_new_tokens: 32, temperature: 0.9, top_p: 0.95, n: 2, seed: 7}}
output: {{path: {out}, rows_per_shard: 4, flush_seconds: 0.05, stop_grace_seconds: {grace}}}
engine: {{device: cpu, max_num_seqs: 4, max_batch_tokens: 256}}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Any) -> Path:
    d = tmp_path_factory.mktemp("e2e")
    ck = tiny_checkpoint("smollm2")
    rng = random.Random(0)
    words = "sea sky wind robot paint poem fox dog capital France code list count".split()
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(N_ROWS):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 25)))
            f.write(json.dumps({"prompt": f"Write about {text}", "topic": words[i % len(words)]}) + "\n")
        f.write('{"prompt": null, "topic": "bad"}\n')  # an error row travels through resume too
        f.write("{broken json\n")
    (d / "model").symlink_to(ck)
    return d


def job_file(d: Path, out: str, grace: float = 10.0) -> Path:
    p = d / f"{out}.yaml"
    p.write_text(JOB.format(model="model", out=out, grace=grace))
    return p


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"  # the same float reduction order in every run
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["TOKENIZERS_PARALLELISM"] = "false"
    return e


def start(job: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "batchgen.cli", "run", str(job), "--progress", "log", "--log-interval", "1"],
        cwd=str(job.parent), env=env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )


def progress(out: Path) -> dict:
    try:
        return json.loads((out / ".batchgen/progress/task-00000.json").read_text())
    except (OSError, ValueError):
        return {}


def shards(out: Path) -> set[str]:
    """Names of the committed shards (a shard is renamed into place whole, never rewritten; a
    resumed run numbers its shards after the existing ones, so new names are this run's)."""
    try:
        return {n for n in os.listdir(out) if SHARD_RE.match(n)}
    except FileNotFoundError:
        return set()


class Committed:
    """Input rows in the committed shards, from their footers (each shard read once)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: dict[str, int] = {}

    def __call__(self) -> int:
        from batchgen.pipeline.sink.shard_file import read_shard_meta

        for n in shards(self.out) - set(self.rows):
            self.rows[n] = int(read_shard_meta(self.out / n)["rows"])
        return sum(self.rows.values())


def read(out: Path) -> dict[tuple, dict]:
    import pyarrow.dataset as pds

    rows = pds.dataset(str(out), format="parquet").to_table().to_pylist()
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated (id, sample_index)"
    return {k: r for k, r in zip(keys, rows)}


@pytest.fixture(scope="module")
def reference(workdir: Path) -> dict[tuple, dict]:
    job = job_file(workdir, "ref")
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(job), "--progress", "log"],
                       cwd=str(workdir), env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = read(workdir / "ref")
    assert set(ref) == {(i, s) for i in range(N_ROWS + 2) for s in range(2)}
    return ref


def same(a: dict[tuple, dict], b: dict[tuple, dict]) -> None:
    assert set(a) == set(b)
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"{len(diff)} rows differ, e.g. {a[diff[0]]} vs {b[diff[0]]}"


def test_uninterrupted_run_reads_back_with_datasets(workdir: Path, reference: dict[tuple, dict]) -> None:
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(workdir / "ref"), split="train")
    assert ds.num_rows == 2 * (N_ROWS + 2)
    assert ds.column_names == ["id", "sample_index", "topic", "completion", "finish_reason", "prompt_tokens",
                               "completion_tokens", "error"]
    good = [r for r in reference.values() if r["error"] is None]
    assert len(good) == 2 * N_ROWS
    assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] >= 1 for r in good)
    assert all(isinstance(r["completion"], str) for r in good)
    # two samples of one row draw from different streams
    assert sum(reference[(i, 0)]["completion"] != reference[(i, 1)]["completion"] for i in range(N_ROWS)) > N_ROWS // 2
    errs = {k[0]: r["error"] for k, r in reference.items() if r["error"]}
    assert set(errs) == {N_ROWS, N_ROWS + 1} and "null" in errs[N_ROWS] and "malformed JSON" in errs[N_ROWS + 1]
    summary = json.loads((workdir / "ref/.batchgen/summary.json").read_text())
    assert summary["rows"] == N_ROWS + 2 and summary["errors"] == 4
    assert summary["output_tokens"] == sum(r["completion_tokens"] for r in reference.values())
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(workdir / "ref.yaml")],
                       cwd=str(workdir), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "nothing to do" in r.stderr and "is complete" in r.stderr


def test_sigkill_at_random_moments_then_resume(workdir: Path, reference: dict[tuple, dict]) -> None:
    out = workdir / "killed"
    job = job_file(workdir, "killed")
    log = workdir / "killed.log"
    rng = random.Random(20240607)
    total = N_ROWS + 2
    committed = Committed(out)

    # first kill: a random moment during start-up (imports, tokenizer), at the latest as soon as
    # this run says it is about to load the model (its progress file, by its pid): never later
    p = start(job, log)
    t_kill = time.monotonic() + rng.uniform(0.1, 3.0)
    wait_for(lambda: time.monotonic() >= t_kill or progress(out).get("pid") == p.pid, p, log)
    assert p.poll() is None, f"the run ended during start-up ({p.returncode})\n{log.read_text()[-3000:]}"
    p.kill()
    assert p.wait() == -signal.SIGKILL
    assert not shards(out), "the start-up kill came after a shard was committed"

    # then kills mid-run: each resumed run is killed a moment after it committed shards of its
    # own (names that were not there when it started) and the output holds >= target rows; the
    # targets stay in the first 60% of the job, so most of it is left when the kill lands
    targets = sorted(rng.sample(range(3, int(0.6 * total)), 3))
    history: list[str] = []
    kills_mid_run = 0
    for target in targets:
        before = shards(out)
        p = start(job, log)
        seen = wait_for(lambda: bool(shards(out) - before) and committed() >= target, p, log)
        if seen:
            time.sleep(rng.uniform(0.0, KILL_JITTER_S))
        if p.poll() is not None:  # it ended before the kill could land: not a kill
            history.append(f"target {target}: the run ended by itself ({p.returncode}) at {committed()} rows")
            assert p.returncode == 0, f"{history}\n{log.read_text()[-3000:]}"
            break
        p.kill()
        assert p.wait() == -signal.SIGKILL
        rows = committed()
        history.append(f"target {target}: killed at {rows} rows, {len(shards(out) - before)} new shards")
        assert rows < total, f"killed after the last commit: the job is too short for this machine ({history})"
        kills_mid_run += 1
    assert kills_mid_run == len(targets) >= 1, f"not every kill landed mid-run: {history}"
    part = read(out)
    assert 0 < len(part) < len(reference)  # the job is really unfinished here
    for k, r in part.items():  # what survived the kills is final
        assert r == reference[k]
    p = start(job, log)
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resuming" in text and "done." in text
    same(read(out), reference)


@pytest.mark.parametrize("sig, code, grace", [(signal.SIGTERM, 143, 10.0), (signal.SIGINT, 130, 0.0)])
def test_sigterm_sigint_flush_and_resume(workdir: Path, reference: dict[tuple, dict], sig: int, code: int,
                                         grace: float) -> None:
    name = signal.Signals(sig).name.lower()
    out = workdir / name
    job = job_file(workdir, name, grace=grace)
    log = workdir / f"{name}.log"
    committed = Committed(out)
    p = start(job, log)  # a new output: every shard is this run's
    assert wait_for(lambda: committed() >= 6, p, log), log.read_text()[-3000:]
    p.send_signal(sig)
    assert p.wait(timeout=300) == code, log.read_text()[-3000:]
    last = log.read_text().strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(sig).name}" in last and "run the same command to resume" in last, last
    st = progress(out)
    assert st["pid"] == p.pid and st["state"] == "stopped" and 6 <= st["rows_done"] < N_ROWS + 2
    part = read(out)
    assert len(part) == 2 * st["rows_done"]  # everything completed was flushed
    for k, r in part.items():
        assert r == reference[k]
    p = start(job, log)
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]
    same(read(out), reference)


def test_dry_run_on_the_cli(workdir: Path) -> None:
    job = job_file(workdir, "dry")
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", "--dry-run", str(job), "--preview", "1"],
                       cwd=str(workdir), env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in r.stdout
    assert "prompt tokens" in r.stdout and "estimate:" in r.stdout and "output" in r.stdout
    assert not (workdir / "dry").exists()
    assert "loading model" not in r.stderr


def test_engine_rejected_requests_become_error_rows(workdir: Path) -> None:
    """A request the real engine can't fit (KV cache smaller than prompt + max_new_tokens)."""
    from batchgen.pipeline.config import load_job
    from batchgen.pipeline.run.job import Job

    with open(workdir / "mixed.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"prompt": "hi there" if i % 2 == 0 else "the sea and the sky " * 25, "topic": "t"}) + "\n")
    job = job_file(workdir, "rejected")
    cfg = load_job(job, ["input.files=[mixed.jsonl]", "engine.kv_cache_tokens=64", "sampling.n=1",
                         "sampling.max_new_tokens=8", "prompt.system=null"])
    assert Job(cfg, progress="off").run() == 0
    out = read(workdir / "rejected")
    assert set(out) == {(i, 0) for i in range(6)}
    for (i, _), r in out.items():
        if i % 2:
            assert r["error"] and r["finish_reason"] == "error" and r["completion_tokens"] == 0, r
        else:
            assert r["error"] is None and r["completion_tokens"] >= 1, r
    summary = json.loads((workdir / "rejected/.batchgen/summary.json").read_text())
    assert summary["error_rows"] == 3

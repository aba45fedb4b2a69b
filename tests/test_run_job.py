"""The run loop on the real engine and a tiny random-weight checkpoint: sources, partition,
ledger, resume, stop, bad rows, refusals, progress files. One engine is shared by the module;
runs that abandon in-flight rows (a crash) get their own, built by the job's make_engine.
Faults are injected by a thin wrapper around the real Engine.stream (see Tap). `batchgen run`
as a subprocess, killed and resumed, is in test_run_e2e.py."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from engine_tap import EngineTap

from batchgen.pipeline.config import ConfigError, load_job
from batchgen.engine.engine import Engine
from batchgen.engine.request import GenerationRequest, RequestOutput, SamplingParams
from batchgen.pipeline.run.job import Job
from batchgen.pipeline.run.dry_run import dry_run
from batchgen.pipeline.run.engine_setup import make_engine
from batchgen.pipeline.prompt.seeds import row_seed
from batchgen.pipeline.sink.intervals import IntervalSet
from batchgen.pipeline.sink.output_dir import OutputDir
from batchgen.pipeline.files import OutputError
from batchgen.pipeline.sink.shard_file import read_shard_meta
from batchgen.pipeline.source import open_source

# the engine section of every job file below, and of the module's shared engine: a few rows at
# a time, so outputs arrive over many steps and not in submission order
ENGINE = dict(device="cpu", max_num_seqs=4, max_batch_tokens=256)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("smollm2")


@pytest.fixture(autouse=True)
def _model_link(tmp_path: Path, checkpoint: Path) -> None:
    """Every job file names `model: {path: model}`: the tiny checkpoint, linked into tmp_path."""
    (tmp_path / "model").symlink_to(checkpoint)


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[Engine]:
    eng = Engine.from_pretrained(str(checkpoint), dtype="float32", **ENGINE)
    yield eng
    eng.close()


Tap = EngineTap  # the real engine with a record of what the job sent, and faults on demand


@pytest.fixture
def shared(engine: Engine) -> Iterator[Callable[..., Tap]]:
    """shared(**faults) -> the module's engine in a new Tap. Only for runs that end with the
    engine drained (done, or a graceful stop): checked after the test."""
    yield lambda **kw: Tap(engine, **kw)
    assert not engine.scheduler.has_work(), "a run left work in the shared engine"


def own_engine(**faults: Any) -> Callable[[Any], Tap]:
    """An engine_factory: the job loads its own engine from its file (make_engine), wrapped in a
    Tap; the job closes it. For runs that abandon in-flight rows."""
    return lambda cfg: Tap(make_engine(cfg), **faults)


def make_job(tmp: Path, body: str, name: str = "job.yaml") -> Path:
    p = tmp / name
    p.write_text(body)
    return p


def jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_out(out: Path) -> list[dict]:
    import pyarrow.dataset as pds

    return pds.dataset(str(out), format="parquet").to_table().to_pylist()


def keyset(rows: list[dict]) -> list[tuple]:
    return sorted((r["id"], r["sample_index"]) for r in rows)


def run(cfg_path: Path, engine: Any = None, **kw: Any) -> tuple[int, Job]:
    """Run a job file on `engine`; None: the job loads its own from the file (make_engine)."""
    cfg = load_job(cfg_path, kw.pop("overrides", None))
    job = Job(cfg, engine=engine, progress="off", **kw)
    return job.run(), job


# the stop string ends about half the samples early, so rows finish out of submission order
BASIC = """\
model: {path: model, dtype: float32}
input: {files: [in.jsonl], columns: [cat]}
prompt: {column: prompt}
sampling: {n: 2, max_new_tokens: 4, stop: [" "]}
output: {path: out, rows_per_shard: 6, flush_seconds: 3600}
engine: {%s}
""" % ", ".join(f"{k}: {v}" for k, v in ENGINE.items())


def test_basic_run_bad_rows_and_readback(tmp_path: Path, shared: Callable[..., Tap], engine: Engine) -> None:
    rows: list[Any] = [{"prompt": f"question {i}", "cat": i % 3} for i in range(20)]
    rows += ["{not json", {"prompt": None, "cat": 1}, {"prompt": "", "cat": 2}, {"prompt": "  ", "cat": 2},
             {"prompt": 42, "cat": 0}, {"prompt": ["a"], "cat": 0}, "[1, 2]", {"cat": 5}]
    jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, BASIC)
    eng = shared()
    code, j = run(job, eng)
    assert code == 0
    assert eng.yielded != sorted(eng.yielded)  # outputs came out of order: the job maps them by request id
    out = read_out(tmp_path / "out")
    assert keyset(out) == sorted((i, s) for i in range(len(rows)) for s in range(2))
    errs = {r["id"]: r["error"] for r in out if r["error"]}
    assert set(errs) == set(range(20, 28))
    assert "malformed JSON" in errs[20] and "null" in errs[21] and "empty" in errs[22] and "empty" in errs[23]
    assert "must be a string" in errs[24] and "not a JSON object" in errs[26] and "null" in errs[27]
    for r in out:
        if r["error"]:
            assert r["finish_reason"] == "error" and r["completion"] is None and r["completion_tokens"] == 0
        else:
            assert r["finish_reason"] in ("length", "stop") and isinstance(r["completion"], str)
            assert 1 <= r["completion_tokens"] <= 4 and r["prompt_tokens"] > 0
            assert r["finish_reason"] == "stop" or r["completion_tokens"] == 4
    assert {r["finish_reason"] for r in out if not r["error"]} == {"stop", "length"}
    # each row's samples are the engine's own generation for that row's prompt and seed (the
    # engine finished rows out of order; the job must not mix them up)
    tk = engine.tokenizer
    chats = [tk.apply_chat_template([{"role": "user", "content": f"question {i}"}], tokenize=False,
                                    add_generation_prompt=True) for i in range(20)]
    ids = [tk(c, add_special_tokens=False)["input_ids"] for c in chats]
    want = engine.generate(ids, [SamplingParams(max_new_tokens=4, temperature=0.7, n=2, seed=row_seed(0, i), stop=[" "])
                                 for i in range(20)])
    by_key = {(r["id"], r["sample_index"]): r for r in out}
    for i in range(20):
        got = [by_key[(i, j)] for j in range(2)]
        assert [(r["completion"], r["finish_reason"], r["completion_tokens"], r["prompt_tokens"]) for r in got] == [
            (c.text, c.finish_reason, len(c.token_ids), len(ids[i])) for c in want[i].outputs], i
    assert {r["cat"] for r in out if r["id"] == 4} == {1}
    s = json.loads((tmp_path / "out/.batchgen/summary.json").read_text())
    assert s["rows"] == 28 and s["samples"] == 56 and s["errors"] == 16 and s["error_rows"] == 8
    assert s["output_tokens"] == sum(r["completion_tokens"] for r in out)
    # shards: named by task and sequence, at most rows_per_shard rows, whole input rows
    names = sorted(os.listdir(tmp_path / "out"))
    assert names[0] == ".batchgen" and names[1] == "part-t00000-000000.parquet"
    for n in names[1:]:
        t = pq.read_table(tmp_path / "out" / n)
        assert t.num_rows <= 6 and t.num_rows % 2 == 0
        meta = read_shard_meta(tmp_path / "out" / n)
        assert meta["sampling"]["n"] == 2 and meta["model"]["path"] == "model"
    # datasets reads the directory directly
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"), split="train")
    assert ds.num_rows == 56 and ds.column_names[:3] == ["id", "sample_index", "cat"]
    # a finished job does nothing
    eng = shared()
    code, _ = run(job, eng)
    assert code == 0 and eng.seen == []


def test_seeds_depend_on_id_not_order(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"k": f"r{i}", "prompt": f"q {i}"} for i in range(9)])
    # 8 tokens at temperature 1, no stop string: 18 distinct streams give 18 distinct texts (a few
    # tokens of a random model sometimes decode to the same replacement characters)
    body = BASIC.replace("columns: [cat]", "id_column: k")
    make_job(tmp_path, body.replace('max_new_tokens: 4, stop: [" "]', "max_new_tokens: 8, temperature: 1.0"))
    code, _ = run(tmp_path / "job.yaml", shared())
    a = {(r["id"], r["sample_index"]): r["completion"] for r in read_out(tmp_path / "out")}
    jsonl(tmp_path / "in.jsonl", [{"k": f"r{i}", "prompt": f"q {i}"} for i in reversed(range(9))])
    code, _ = run(tmp_path / "job.yaml", shared(), overrides=["output.path=out2"])
    b = {(r["id"], r["sample_index"]): r["completion"] for r in read_out(tmp_path / "out2")}
    assert a == b and len(set(a.values())) == 18


def test_crash_then_resume_is_exactly_once(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}", "cat": i} for i in range(40)] + ["oops"])
    make_job(tmp_path, BASIC.replace("path: out,", "path: ref,"), "ref.yaml")
    run(tmp_path / "ref.yaml", shared())
    ref = read_out(tmp_path / "ref")
    job = make_job(tmp_path, BASIC)
    code, j = run(job, engine_factory=own_engine(crash_after=17))  # in-flight rows die with the engine
    assert code == 1
    prog = json.loads((tmp_path / "out/.batchgen/progress/task-00000.json").read_text())
    assert prog["state"] == "failed" and "simulated engine crash" in prog["error"]
    part = read_out(tmp_path / "out")
    assert 0 < len(part) < len(ref)  # completed rows were flushed before exiting
    # a temp shard left by a kill is removed, a committed one never rewritten
    (tmp_path / "out/.part-t00000-000099.parquet.tmp").write_bytes(b"garbage")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    code, _ = run(job, engine_factory=own_engine(crash_after=9))
    assert code == 1
    assert not (tmp_path / "out/.part-t00000-000099.parquet.tmp").exists()
    eng = shared()
    code, _ = run(job, eng)
    assert code == 0
    done_before = {r["id"] for r in part}
    assert not done_before & set(eng.seen)  # nothing done is generated again
    out = read_out(tmp_path / "out")
    assert keyset(out) == keyset(ref)
    key = lambda r: (r["id"], r["sample_index"])  # noqa: E731
    assert sorted(out, key=key) == sorted(ref, key=key)
    for p, m in before.items():
        assert p.stat().st_mtime_ns == m


def test_request_stop_flushes_and_resumes(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(30)])
    job = make_job(tmp_path, BASIC)
    holder: dict[str, Job] = {}
    # a graceful stop: in-flight rows finish (stop_grace_seconds), so the shared engine drains
    eng = shared(on_output=lambda n: n == 7 and holder["job"].request_stop("stopped by test", exit_code=99))
    cfg = load_job(job)
    j = Job(cfg, engine=eng, progress="off")
    holder["job"] = j
    called = []
    j.on_stop.append(lambda jj: called.append(jj.stop_reason))
    assert j.run() == 99
    assert called == ["stopped by test"]
    prog = json.loads((tmp_path / "out/.batchgen/progress/task-00000.json").read_text())
    assert prog["state"] == "stopped" and prog["rows_done"] == len(read_out(tmp_path / "out")) // 2
    assert 7 <= prog["rows_done"] < 30
    code, _ = run(job, shared())
    assert code == 0 and keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(30) for s in range(2))


@pytest.mark.parametrize("damage", [b"\x00garbage{", b"[1, 2]", b'{"task_id": 0, "state": "stopped", "total_wall_s": "ten"}'])
def test_a_damaged_progress_file_is_said_and_rewritten(tmp_path: Path, shared: Callable[..., Tap],
                                                       capsys: pytest.CaptureFixture[str], damage: bytes) -> None:
    """The progress file only reports progress (the ledger is the checkpoint): one that is not a
    task's progress (bytes, another shape, a field of the wrong type) is said once, the run resumes
    from its shards, and the file is written again whole."""
    from batchgen.pipeline.task_progress import TaskProgress

    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(30)])
    job = make_job(tmp_path, BASIC)
    holder: dict[str, Job] = {}
    eng = shared(on_output=lambda n: n == 4 and holder["job"].request_stop("stopped by test", exit_code=99))
    holder["job"] = Job(load_job(job), engine=eng, progress="off")
    assert holder["job"].run() == 99
    path = tmp_path / "out/.batchgen/progress/task-00000.json"
    path.write_bytes(damage)
    capsys.readouterr()
    assert run(job, shared())[0] == 0
    err = capsys.readouterr().err
    assert f"warning: {path} is unreadable (" in err and "so it is written again" in err, err
    assert "resuming" in err
    again = TaskProgress.read(path)
    assert again.state == "done" and again.rows_done == 30
    assert keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(30) for s in range(2))


def test_changed_job_refused_unless_overwrite(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(5)])
    job = make_job(tmp_path, BASIC)
    assert run(job, shared())[0] == 0
    (tmp_path / "out" / "_notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"different job \(changed: sampling.temperature 0.7 -> 0.1\).*--overwrite"):
        run(job, shared(), overrides=["sampling.temperature=0.1"])
    with pytest.raises(OutputError, match="prompt.system"):
        run(job, shared(), overrides=["prompt.system=hi"])
    # engine and output settings are not part of the job: it's simply complete
    eng = shared()
    assert run(job, eng, overrides=["engine.max_num_seqs=3", "output.rows_per_shard=2"])[0] == 0
    assert eng.seen == []
    code, _ = run(job, shared(), overrides=["sampling.temperature=0.1"], overwrite=True)
    assert code == 0
    out = read_out(tmp_path / "out")
    assert keyset(out) == sorted((i, s) for i in range(5) for s in range(2))
    assert (tmp_path / "out" / "_notes.txt").read_text() == "mine"  # only batchgen's files are removed
    assert read_shard_meta(next((tmp_path / "out").glob("part-*.parquet")))["sampling"]["temperature"] == 0.1
    # a different number of tasks is refused too
    with pytest.raises(OutputError, match="same --num-tasks"):
        run(job, shared(), overrides=["sampling.temperature=0.1"], task_id=0, num_tasks=2)


def test_limit_extends_the_same_output(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(25)])
    job = make_job(tmp_path, BASIC)
    assert run(job, shared(), overrides=["input.limit=10"])[0] == 0
    assert keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(10) for s in range(2))
    eng = shared()
    assert run(job, eng, overrides=["input.limit=18"])[0] == 0
    assert len(eng.seen) == 8
    assert run(job, shared())[0] == 0
    assert keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(25) for s in range(2))


def test_too_long_policies_and_engine_rejects(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    long = "the quick brown fox jumps over the lazy dog " * 30
    jsonl(tmp_path / "in.jsonl", [{"prompt": "short one", "cat": 0}, {"prompt": long, "cat": 1},
                                  {"prompt": "medium " * 6, "cat": 2}])
    job = make_job(tmp_path, BASIC.replace("prompt: {column: prompt}", "prompt: {column: prompt, max_tokens: 40}"))
    # skip: an error row, counted
    assert run(job, shared())[0] == 0
    out = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out")}
    assert "prompt too long" in out[(1, 0)]["error"] and out[(1, 0)]["prompt_tokens"] > 40
    assert out[(0, 0)]["error"] is None
    # truncate: generated from a cut prompt that fits
    eng = shared()
    assert run(job, eng, overrides=["prompt.on_too_long=truncate", "output.path=out_t"])[0] == 0
    out = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out_t")}
    assert out[(1, 0)]["error"] is None and out[(1, 0)]["prompt_tokens"] <= 40
    # error: the job stops with a message naming the row; completed rows are kept
    code, j = run(job, shared(), overrides=["prompt.on_too_long=error", "output.path=out_e"])
    assert code == 1 and "id=1" in j.error
    assert (1, 0) not in {(r["id"], r["sample_index"]) for r in read_out(tmp_path / "out_e")}
    # the engine rejecting a request: an error row, not a crash. A 32-token KV cache (the job
    # loads this engine itself) holds row 0 (14 prompt + 4 new tokens) but not row 2 (40 + 4)
    assert run(job, overrides=["output.path=out_r", "engine.kv_cache_tokens=32"])[0] == 0
    out = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out_r")}
    assert "does not fit the KV cache" in out[(2, 1)]["error"] and out[(2, 1)]["finish_reason"] == "error"
    assert out[(0, 0)]["error"] is None and out[(0, 1)]["completion_tokens"] > 0
    s = json.loads((tmp_path / "out_r/.batchgen/summary.json").read_text())
    assert s["error_rows"] == 2 and s["errors"] == 4


def test_max_model_len_bounds_prompts(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": "word " * 60, "cat": 0}])
    job = make_job(tmp_path, BASIC)
    assert run(job, overrides=["engine.max_model_len=40"])[0] == 0  # the job loads this engine itself
    (r,) = [r for r in read_out(tmp_path / "out") if r["sample_index"] == 0]
    assert "limit of 36" in r["error"]  # 40 - max_new_tokens 4


def _parquet_files(d: Path, sizes: list[int], row_group: int = 7) -> None:
    d.mkdir(parents=True, exist_ok=True)
    k = 0
    for i, n in enumerate(sizes):
        t = pa.table({"prompt": [f"p {k + j}" for j in range(n)], "cat": list(range(k, k + n))})
        pq.write_table(t, d / f"f{i:02d}.parquet", row_group_size=row_group)
        k += n


@pytest.mark.parametrize("sizes, tasks", [([10, 13, 5, 9], 3), ([30, 11], 4), ([17], 1), ([8, 8, 8], 3)])
def test_tasks_partition_exactly_and_match_single_task(tmp_path: Path, shared: Callable[..., Tap], sizes: list[int],
                                                       tasks: int) -> None:
    _parquet_files(tmp_path / "data", sizes)
    body = BASIC.replace("files: [in.jsonl]", "files: [data]").replace("{n: 2,", "{n: 1,")
    make_job(tmp_path, body)
    total = sum(sizes)
    assert run(tmp_path / "job.yaml", shared(), overrides=["output.path=single"])[0] == 0
    single = read_out(tmp_path / "single")
    for t in range(tasks):
        assert run(tmp_path / "job.yaml", shared(), overrides=["output.path=multi"], task_id=t, num_tasks=tasks)[0] == 0
    multi = read_out(tmp_path / "multi")
    assert keyset(multi) == [(i, 0) for i in range(total)]
    assert all(r["cat"] == r["id"] for r in multi)  # default id = index in source order
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(multi, key=key) == sorted(single, key=key)
    names = {n[:11] for n in os.listdir(tmp_path / "multi") if n.startswith("part-")}
    assert names <= {f"part-t{t:05d}" for t in range(tasks)}
    for t in range(tasks):
        p = json.loads((tmp_path / f"multi/.batchgen/progress/task-{t:05d}.json").read_text())
        assert p["state"] == "done" and p["num_tasks"] == tasks
    summ = json.loads((tmp_path / "multi/.batchgen/summary.json").read_text())
    assert summ["rows"] == total and summ["samples"] == total


def test_repeated_ids_are_reported(tmp_path: Path, shared: Callable[..., Tap], capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"rid": f"r{i % 7}", "prompt": f"question {i}", "cat": i} for i in range(10)]  # r0, r1, r2 twice
    jsonl(tmp_path / "in.jsonl", rows)
    make_job(tmp_path, BASIC.replace("columns: [cat]}", "columns: [cat], id_column: rid}"))
    assert run(tmp_path / "job.yaml", shared())[0] == 0
    assert sorted(r["cat"] for r in read_out(tmp_path / "out")) == sorted(2 * list(range(10)))  # nothing dropped
    assert json.loads((tmp_path / "out/.batchgen/summary.json").read_text())["repeated_ids"] == 3
    err = capsys.readouterr().err
    assert "input.id_column 'rid' is not unique: 3 id(s)" in err and "'r0', 'r1', 'r2'" in err
    # two tasks: the repeats fall in different tasks' parts; found once both are done
    for t in range(2):
        assert run(tmp_path / "job.yaml", shared(), overrides=["output.path=multi"], task_id=t, num_tasks=2)[0] == 0
        assert ("not unique" in capsys.readouterr().err) == (t == 1)
    assert json.loads((tmp_path / "multi/.batchgen/summary.json").read_text())["repeated_ids"] == 3
    # unique ids: recorded as 0, no warning
    jsonl(tmp_path / "in.jsonl", [{**r, "rid": f"u{i}"} for i, r in enumerate(rows)])
    assert run(tmp_path / "job.yaml", shared(), overrides=["output.path=unique"])[0] == 0
    assert json.loads((tmp_path / "unique/.batchgen/summary.json").read_text())["repeated_ids"] == 0
    assert "not unique" not in capsys.readouterr().err


@pytest.mark.parametrize("start", [0, 1, 6, 7, 13, 29, 30, 31])
def test_source_skip_start_parquet_and_jsonl(tmp_path: Path, start: int) -> None:
    _parquet_files(tmp_path / "data", [13, 17], row_group=4)
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"p {i}"} for i in range(12)] + [""] + [{"prompt": f"p {i}"} for i in range(12, 30)])
    for files in ("data", "in.jsonl"):
        body = BASIC.replace("files: [in.jsonl]", f"files: [{files}]").replace("columns: [cat]", "columns: []")
        cfg = load_job(make_job(tmp_path, body))
        src = open_source(cfg)
        assert src.total == 30
        got = list(src.rows(start=start))
        assert [(r.position, r.index) for r in got] == [(k, k) for k in range(start, 30)]
        assert [r.values["prompt"] for r in got] == [f"p {k}" for k in range(start, 30)]


def test_save_to_disk_dataset_input(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    import datasets

    d = datasets.Dataset.from_dict({"q": [f"q {i}" for i in range(11)], "uid": [f"u{i}" for i in range(11)],
                                    "msgs": [[{"role": "user", "content": f"hello {i}"}] for i in range(11)]})
    datasets.DatasetDict({"train": d, "test": d.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    d.save_to_disk(str(tmp_path / "single"))
    body = """\
model: {path: fake}
input: {dataset: dd, split: test, id_column: uid, columns: [q]}
prompt: {messages_column: msgs}
sampling: {max_new_tokens: 4}
output: {path: out}
"""
    job = make_job(tmp_path, body)
    assert run(job, shared())[0] == 0
    assert keyset(read_out(tmp_path / "out")) == [("u0", 0), ("u1", 0), ("u2", 0)]
    with pytest.raises(ConfigError, match="available splits: train, test"):
        run(job, shared(), overrides=["input.split=validation", "output.path=o2"])
    for t in range(2):
        assert run(job, shared(), overrides=["input.dataset=single", "input.split=null", "output.path=o3"],
                   task_id=t, num_tasks=2)[0] == 0
    out = read_out(tmp_path / "o3")
    assert sorted(r["id"] for r in out) == sorted(f"u{i}" for i in range(11))
    with pytest.raises(ConfigError, match="'prompt'.*available columns: q, uid, msgs"):
        run(job, shared(), overrides=["input.dataset=single", "prompt.messages_column=null", "prompt.column=prompt"])


def test_streaming_modulo_partition(tmp_path: Path) -> None:
    """A streaming (iterable) dataset of unknown length: rows index % num_tasks == task."""
    import datasets

    from batchgen.pipeline.source import DatasetSource

    jsonl(tmp_path / "a.jsonl", [{"prompt": f"p {i}"} for i in range(23)])
    body = f"""\
model: {{path: fake}}
input: {{dataset: json, data_files: {tmp_path / 'a.jsonl'}, streaming: true}}
prompt: {{column: prompt}}
output: {{path: out}}
"""
    cfg = load_job(make_job(tmp_path, body))
    seen = []
    for t in range(3):
        src = DatasetSource(cfg, t, 3)
        assert isinstance(src.ds, datasets.IterableDataset)
        rows = list(src.rows())
        assert [r.position for r in rows] == list(range(len(rows)))
        assert all(r.index % 3 == t for r in rows)
        seen += [r.index for r in rows]
        # resuming at position 2 skips exactly the first two of this task's rows
        assert [r.index for r in src.rows(start=2)] == [r.index for r in rows][2:]
    assert sorted(seen) == list(range(23))


def test_dry_run_loads_only_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}", "cat": i} for i in range(50)] + [{"prompt": None}])
    job = make_job(tmp_path, BASIC.replace("prompt: {column: prompt}",
                                           "prompt: {column: prompt, template: 'Answer: {prompt}', system: Be brief.}"))
    cfg = load_job(job)
    est = dry_run(cfg, preview=2)  # the checkpoint's tokenizer
    out = capsys.readouterr().out
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer: question 0<|im_end|>" in out
    assert "prompt tokens" in out and "estimate:" in out and "rows: 51" in out
    assert est["rows"] == 51 and est["sampled_errors"] == 1 and est["avg_prompt_tokens"] > 5
    assert not (tmp_path / "out").exists()


def test_dry_run_says_when_the_input_changed(tmp_path: Path, shared: Callable[..., Tap],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The dry run judges an existing output as the run would: an edited input file is named, not "resumes"."""
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(6)])
    job = make_job(tmp_path, BASIC)
    assert run(job, shared())[0] == 0
    capsys.readouterr()
    dry_run(load_job(job), preview=0)
    assert "exists for this job (a run resumes it)" in capsys.readouterr().out
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}" if i != 2 else "edited", "cat": i} for i in range(6)])
    dry_run(load_job(job), preview=0)
    out = capsys.readouterr().out
    assert "can't be resumed by this job: its input changed" in out and "in.jsonl" in out, out


def test_progress_log_lines(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    import io

    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(10)])
    cfg = load_job(make_job(tmp_path, BASIC))
    buf = io.StringIO()
    j = Job(cfg, engine=shared(), progress="log", log_every=0.0, stream=buf)
    assert j.run() == 0
    text = buf.getvalue()
    assert "10/10 rows (100.0%)" in text and "output tok/s" in text and "ETA" in text
    assert "rows            10 (20 samples)" in text


def test_open_regular_refuses_what_is_not_a_regular_file_without_blocking(tmp_path: Path) -> None:
    """files.open_regular: a FIFO (for reading: the open would block; for writing with no reader: ENXIO), a directory,
    a device are refused with NotRegularError naming them; a link is never followed (ELOOP); a file opens, blocking."""
    import errno
    import os

    from batchgen.pipeline.files import NotRegularError, open_regular, read_json_checked

    fifo, d, f, link = tmp_path / "fifo", tmp_path / "dir", tmp_path / "file.json", tmp_path / "link"
    os.mkfifo(fifo)
    d.mkdir()
    f.write_text('{"a": 1}')
    link.symlink_to(f)
    for path, flags in ((fifo, os.O_RDONLY), (fifo, os.O_WRONLY | os.O_APPEND), (fifo, os.O_RDWR | os.O_CREAT),
                        (d, os.O_RDONLY), (Path("/dev/null"), os.O_RDONLY)):
        with pytest.raises(NotRegularError, match=f"{path} is not a regular file"):
            open_regular(path, flags)
    with pytest.raises(OSError) as e:
        open_regular(link)
    assert e.value.errno == errno.ELOOP
    fd = open_regular(f)
    try:
        assert os.get_blocking(fd) and os.read(fd, 100) == b'{"a": 1}'
    finally:
        os.close(fd)
    assert read_json_checked(fifo) == (None, "not a regular file") and read_json_checked(f) == ({"a": 1}, None)


def test_interval_set() -> None:
    s = IntervalSet.from_points([0, 1, 2, 5, 6, 9])
    assert s.ranges() == [[0, 3], [5, 7], [9, 10]] and s.prefix_end() == 3 and len(s) == 6
    assert 5 in s and 4 not in s and 9 in s and 10 not in s
    s.update(IntervalSet([[3, 5], [7, 9]]))
    assert s.ranges() == [[0, 10]] and s.covers(10) and not s.covers(11)


def test_output_dir_lock_and_unknown_shards(tmp_path: Path) -> None:
    a = OutputDir(tmp_path / "o")
    a.prepare({"fingerprint": "x", "num_tasks": 1})
    a.lock()
    b = OutputDir(tmp_path / "o")
    with pytest.raises(OutputError, match="already running"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()
    d = tmp_path / "p"
    d.mkdir()
    pq.write_table(pa.table({"x": [1]}), d / "part-t00000-000000.parquet")
    with pytest.raises(OutputError, match="no .batchgen/manifest.json"):
        OutputDir(d).prepare({"fingerprint": "x", "num_tasks": 1})


def test_concurrent_overwrite_keeps_every_new_tasks_shards(tmp_path: Path) -> None:
    """Six tasks start together with --overwrite on another job's output: each clears it or finds
    the new manifest, never clearing what another task already wrote for the new job."""
    import subprocess
    import time

    out = tmp_path / "out"
    OutputDir(out).prepare({"fingerprint": "old", "identity": {"v": 1}})
    (out / "part-t00009-000000.parquet").write_bytes(b"old")
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from batchgen.pipeline.sink.output_dir import OutputDir\n"
        "out, t, gate = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])\n"
        "(gate / f'ready-{t}').touch()\n"
        "while not (gate / 'go').exists(): time.sleep(0.0005)\n"
        "OutputDir(out, t, 6).prepare({'fingerprint': 'new', 'identity': {'v': 2}, 'num_tasks': 6}, overwrite=True)\n"
        "(out / f'part-t{t:05d}-000000.parquet').write_bytes(b'new')\n"
    )
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(t), str(gate)]) for t in range(6)]
    # released together once every interpreter says it is past its start-up (imports): all race
    # for prepare() at once however long start-up takes on this machine
    try:
        deadline = time.monotonic() + 300
        while len(list(gate.glob("ready-*"))) < 6:
            assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
            assert time.monotonic() < deadline, "the tasks never got past their imports"
            time.sleep(0.01)
        (gate / "go").touch()
        assert [p.wait(timeout=300) for p in procs] == [0] * 6
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(p.name for p in OutputDir(out).shard_files()) == [f"part-t{t:05d}-000000.parquet" for t in range(6)]
    assert OutputDir(out).manifest()["fingerprint"] == "new"


def test_jsonl_bom_gz_and_globs(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p 0"}).encode() + b"\n")
    with gzip.open(tmp_path / "d/b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "p 1"}) + "\n\n" + json.dumps({"prompt": "p 2"}) + "\n")
    (tmp_path / "d/_skip.jsonl").write_text(json.dumps({"prompt": "no"}) + "\n")
    (tmp_path / "d/readme.txt").write_text("not data")
    for files in ("d", "'d/[ab].json*'", "'d/**/[ab].jsonl*'"):  # directories skip _ and . files
        body = BASIC.replace("files: [in.jsonl]", f"files: [{files}]").replace("columns: [cat]", "columns: []")
        src = open_source(load_job(make_job(tmp_path, body)))
        assert [(r.index, r.values["prompt"]) for r in src.rows()] == [(0, "p 0"), (1, "p 1"), (2, "p 2")], files
        assert src.total == 3


def test_changed_input_files_refused(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    (tmp_path / "d").mkdir()
    jsonl(tmp_path / "d/b.jsonl", [{"prompt": f"q {i}"} for i in range(4)])
    job = make_job(tmp_path, BASIC.replace("files: [in.jsonl]", "files: [d]").replace("columns: [cat]", "columns: []"))
    assert run(job, shared())[0] == 0
    jsonl(tmp_path / "d/a.jsonl", [{"prompt": "new"}])  # sorts first: every position would shift
    with pytest.raises(OutputError, match="input changed since it was started"):
        run(job, shared())
    assert run(job, shared(), overwrite=True)[0] == 0
    assert keyset(read_out(tmp_path / "out")) == [(i, s) for i in range(5) for s in range(2)]


def test_done_after_a_kill_past_the_last_commit(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(6)])
    job = make_job(tmp_path, BASIC)
    assert run(job, shared())[0] == 0
    prog = tmp_path / "out/.batchgen/progress/task-00000.json"
    p = json.loads(prog.read_text())
    p["state"] = "running"  # as if killed between the last commit and the final progress write
    prog.write_text(json.dumps(p))
    (tmp_path / "out/.batchgen/summary.json").unlink()
    eng = shared()
    assert run(job, eng)[0] == 0 and eng.seen == []
    assert json.loads(prog.read_text())["state"] == "done"
    assert json.loads((tmp_path / "out/.batchgen/summary.json").read_text())["rows"] == 6


# --------------------------------------------------------------------------- issue 11: output that can't be silently wrong
def test_ids_are_never_null_and_always_unique(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    """Ids and copied values typed from the first 100 JSONL lines: a later row whose id is a
    string, a copied value of another type, a malformed line and a null id are error rows that
    say why, each with an id (from its position) that no other row has."""
    rows: list[Any] = [{"k": i, "prompt": f"q {i}", "cat": i} for i in range(101)]
    rows += [{"k": "abc", "prompt": "q x", "cat": 1}, {"k": 500, "prompt": "q y", "cat": "zz"}, "{broken",
             {"k": None, "prompt": "q z", "cat": 2}, {"prompt": "q w", "cat": 3}]
    jsonl(tmp_path / "in.jsonl", rows)
    make_job(tmp_path, BASIC.replace("columns: [cat]}", "columns: [cat], id_column: k}")
             .replace('max_new_tokens: 4, stop: [" "]', "max_new_tokens: 1"))
    assert run(tmp_path / "job.yaml", shared())[0] == 0
    out = read_out(tmp_path / "out")
    assert len(out) == 2 * len(rows)
    keys = [(r["id"], r["sample_index"]) for r in out]
    assert None not in [k[0] for k in keys] and len(set(keys)) == len(keys)
    by_id = {r["id"]: r for r in out if r["sample_index"] == 0}
    assert all(by_id[i]["error"] is None and by_id[i]["cat"] == i for i in range(101))
    assert by_id[500]["error"] and "'cat'" in by_id[500]["error"] and "'zz'" in by_id[500]["error"]
    for idx, why in ((101, "abc"), (103, "malformed"), (104, "null"), (105, "null")):  # ids -(index + 1)
        assert why in by_id[-(idx + 1)]["error"], by_id[-(idx + 1)]
    s = json.loads((tmp_path / "out/.batchgen/summary.json").read_text())
    assert s["repeated_ids"] == 0 and s["error_rows"] == 5 and s["errors"] == 10


def test_a_failed_model_load_binds_nothing(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    """A typo in model.path fails before any row: fixing it is the same output, not 'a different job'."""
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(4)])
    job = make_job(tmp_path, BASIC)
    with pytest.raises(ConfigError, match="model.path"):
        run(job, overrides=["model.path=modle"])
    assert (tmp_path / "out/.batchgen/manifest.json").exists()  # written, but it binds no row
    code, _ = run(job, shared())
    assert code == 0 and keyset(read_out(tmp_path / "out")) == [(i, s) for i in range(4) for s in range(2)]
    # once a row is committed, the output is that job's
    with pytest.raises(OutputError, match="different job"):
        run(job, shared(), overrides=["sampling.temperature=0.2"])


def test_retry_errors_replaces_error_rows_exactly_once(tmp_path: Path, shared: Callable[..., Tap],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Rows the engine rejected (a 32-token KV cache) are regenerated with --retry-errors on a
    bigger engine: their new rows replace the old in the shards that held them (same names),
    each (row, sample) once; a row whose input is bad stays one error row."""
    import datasets

    rows = [{"prompt": "short one" if i % 3 else "medium " * 6, "cat": i} for i in range(9)] + [{"prompt": None, "cat": 9}]
    jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, BASIC)
    assert run(job, overrides=["engine.kv_cache_tokens=32"])[0] == 0  # its own small engine
    first = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out")}
    failed = sorted({k[0] for k, r in first.items() if r["error"]})
    assert failed == [0, 3, 6, 9]
    names = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    capsys.readouterr()
    eng = shared()
    assert run(job, eng)[0] == 0 and eng.seen == []  # a bigger engine alone changes nothing
    assert "4 of them failed: rerun with --retry-errors" in capsys.readouterr().err
    eng = shared()
    code, j = run(job, eng, retry_errors=True)
    assert code == 0 and sorted(eng.seen) == [0, 3, 6]  # the null prompt fails before the engine
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == names
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"), split="train")
    keys = list(zip(ds["id"], ds["sample_index"]))
    assert sorted(keys) == [(i, s) for i in range(10) for s in range(2)]
    after = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out")}
    assert [k for k, r in after.items() if r["error"]] == [(9, 0), (9, 1)]
    assert all(after[k] == first[k] for k in first if k[0] not in failed)  # the others untouched
    make_job(tmp_path, BASIC.replace("path: out,", "path: ref,"), "ref.yaml")
    assert run(tmp_path / "ref.yaml", shared())[0] == 0
    ref = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "ref")}
    assert after == ref  # the same rows as a run that never failed
    s = json.loads((tmp_path / "out/.batchgen/summary.json").read_text())
    assert s["error_rows"] == 1 and s["errors"] == 2 and s["retried_rows"] == 3
    assert s["output_tokens"] == sum(r["completion_tokens"] for r in after.values())
    from batchgen.pipeline.sink.verify import verify_output

    assert verify_output(tmp_path / "out") == []
    eng = shared()
    assert run(job, eng, retry_errors=True)[0] == 0 and eng.seen == []  # only the bad input is left
    assert "retrying 1 error row(s)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == names


def test_disk_full_mid_run_keeps_what_was_committed(tmp_path: Path, shared: Callable[..., Tap],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC at the 4th shard (its bytes, its fsync, or its ledger record): exit 1 and one line
    saying what is saved and how to resume, no traceback, no temp file, the ledger whole; the
    rerun completes the job exactly once."""
    import errno
    import io

    from batchgen.pipeline import files
    from batchgen.pipeline.sink import ledger, shard_writer
    from batchgen.pipeline.sink.verify import verify_output

    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(20)])
    job = make_job(tmp_path, BASIC.replace("rows_per_shard: 6", "rows_per_shard: 4"))
    for where in ("bytes", "fsync", "ledger"):
        out = tmp_path / f"out-{where}"
        opened = []
        real_open, real_fsync, real_append = files.open_new, os.fsync, ledger.LedgerFile.append

        def full() -> OSError:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def open_new(root: Path, path: Path) -> Any:
            f = real_open(root, path)
            if path.name.endswith(".parquet.tmp"):
                opened.append(path)
                if where == "bytes" and len(opened) == 4:
                    def write(b: Any) -> int:
                        raise full()
                    f.write = write  # type: ignore[method-assign]
            return f

        def fsync(fd: int) -> None:
            if where == "fsync" and len(opened) == 4:
                raise full()
            real_fsync(fd)

        def append(self: Any, rec: Any) -> None:
            if where == "ledger" and len(opened) == 4:
                raise files.write_error(full(), self.path)
            real_append(self, rec)

        monkeypatch.setattr(shard_writer, "open_new", open_new)  # where the shard writer looks it up
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(ledger.LedgerFile, "append", append)
        cfg = load_job(job, [f"output.path={out.name}"])
        buf = io.StringIO()
        j = Job(cfg, engine=shared(), progress="off", stream=buf)
        code = j.run()
        monkeypatch.undo()
        text = buf.getvalue()
        assert code == 1 and "Traceback" not in text, text
        last = text.strip().splitlines()[-1]
        assert last.startswith("error: no space left writing") and "6 rows are saved in" in last, last
        assert "run the same command to resume" in last
        assert [p.name for p in out.rglob("*.tmp")] == [] and len(list(out.glob("part-*.parquet"))) == 3
        assert verify_output(out) == []
        assert run(job, shared(), overrides=[f"output.path={out.name}"])[0] == 0
        assert keyset(read_out(out)) == [(i, s) for i in range(20) for s in range(2)]


def test_a_commit_into_an_output_replaced_meanwhile_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without locks another process's --overwrite can't be kept out: the
    running task sees at its next commit that the output is not the one it started in (the
    manifest's generation) and stops, writing nothing there."""
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(20)])
    job = make_job(tmp_path, BASIC.replace("rows_per_shard: 6", "rows_per_shard: 2"))
    out = tmp_path / "out"
    seen: list[list[str]] = []

    def overwrite_from_elsewhere(k: int) -> None:
        if k == 4:
            seen.append(sorted(p.name for p in out.glob("part-*.parquet")))
            OutputDir(out).prepare({"fingerprint": "other", "identity": {"v": 2}, "num_tasks": 1}, overwrite=True)
            seen.append(sorted(p.name for p in out.glob("part-*.parquet")))

    code, j = run(job, engine_factory=own_engine(on_output=overwrite_from_elsewhere))
    assert code == 2 and "was replaced while this task ran" in j.error
    assert seen[0] and seen[1] == []
    assert list(out.glob("part-*.parquet")) == []  # nothing of the old job after the clear
    assert OutputDir(out).manifest()["fingerprint"] == "other"


@pytest.mark.parametrize("rel", [
    ".batchgen/manifest.json", ".batchgen/progress/task-00000.json", ".batchgen/summary.json",
    ".batchgen/ledger/task-00000.jsonl", ".batchgen/locks/output.lock", ".batchgen/locks/prepare.lock",
    ".part-t00000-000002.parquet.tmp", "part-t00000-000002.parquet", "part-t00000-000000.parquet",
])
def test_no_write_truncate_or_delete_through_a_link(tmp_path: Path, shared: Callable[..., Tap], rel: str) -> None:
    """A link at any path batchgen writes under OUT: the run and --overwrite refuse naming it,
    and the link's target is never written, truncated or deleted."""
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(8)])
    job = make_job(tmp_path, BASIC)
    assert run(job, shared(), overrides=["input.limit=4"])[0] == 0  # two shards; the job goes on to 8 rows
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    link = tmp_path / "out" / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists():
        link.unlink()
    link.symlink_to(victim)
    for kw in ({}, {"overwrite": True, "overrides": ["sampling.temperature=0.3"]}):
        with pytest.raises(OutputError, match=f"{re.escape(str(link))} is a symbolic link"):
            run(job, shared(), **kw)
        assert victim.read_text() == "victim\n" and link.is_symlink()


def test_overwrite_deletes_only_batchgens_own_files(tmp_path: Path, shared: Callable[..., Tap]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(4)])
    job = make_job(tmp_path, BASIC)
    assert run(job, shared())[0] == 0
    mine = {".batchgen/notes.json": "n", ".batchgen/progress/mine.txt": "m", ".batchgen/ledger/README": "r",
            "part-2.parquet": "p", ".batchgen/old.tmp": "t"}
    for rel, text in mine.items():
        (tmp_path / "out" / rel).write_text(text)
    assert run(job, shared(), overwrite=True, overrides=["sampling.temperature=0.3"])[0] == 0
    assert {rel: (tmp_path / "out" / rel).read_text() for rel in mine} == mine
    assert read_shard_meta(next((tmp_path / "out").glob("part-t*.parquet")))["sampling"]["temperature"] == 0.3


def test_progress_follows_the_engines_live_token_count(tmp_path: Path, engine: Engine) -> None:
    """tok/s and the ETA count tokens as the engine samples them (engine.generated_tokens), not
    only when a row's last sample finishes."""
    import io

    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(6)])
    j = Job(load_job(make_job(tmp_path, BASIC)), engine=engine, progress="log", log_every=0.0, stream=io.StringIO())
    assert j.run() == 0
    assert j.progress is not None and j.progress.live
    assert not engine.scheduler.has_work()

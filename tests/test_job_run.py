"""The run loop on a fake engine (fast, no model): sources, partition, ledger, resume, stop,
bad rows, refusals, progress files. End-to-end runs on real tiny checkpoints are in
test_job_e2e.py."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.config import ConfigError, load_job
from batchgen.engine.request import CompletionOutput, GenerationRequest, RequestOutput
from batchgen.job import Job, dry_run
from batchgen.sink import IntervalSet, OutputDir, OutputError, read_shard_meta
from batchgen.sources import open_source


@pytest.fixture(scope="module")
def tok() -> Any:
    from conftest import build_tokenizer

    return build_tokenizer()


class FakeEngine:
    """Engine.stream's contract: pulls requests lazily (bounded lookahead), yields outputs in
    completion order (here: reversed groups of 3), text determined by (seed, sample index)."""

    def __init__(self, tokenizer: Any, *, max_model_len: int = 512, reject_over: int | None = None,
                 crash_after: int | None = None, on_output: Any = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.reject_over = reject_over
        self.crash_after = crash_after
        self.on_output = on_output
        self.seen: list[Any] = []
        self.stats = {"gpu_busy_fraction": None, "output_tokens": 0}

    def _out(self, r: GenerationRequest) -> RequestOutput:
        self.seen.append(r.request_id)
        p = r.params
        if self.reject_over is not None and len(r.prompt) > self.reject_over:
            outs = [CompletionOutput(j, [], "", "error", error="prompt + max_new_tokens exceed the cache") for j in range(p.n)]
        else:
            outs = [CompletionOutput(j, [5] * (1 + (p.seed + j) % 4), f"s{p.seed % 99991}-{j}", "length") for j in range(p.n)]
        return RequestOutput(r.request_id, list(r.prompt), outs)

    def stream(self, requests: Iterable[GenerationRequest]) -> Iterator[RequestOutput]:
        buf: list[GenerationRequest] = []
        done = 0
        for r in requests:
            buf.append(r)
            if len(buf) == 3:
                for q in reversed(buf):
                    if self.crash_after is not None and done >= self.crash_after:
                        raise RuntimeError("simulated engine crash")
                    done += 1
                    yield self._out(q)
                    if self.on_output:
                        self.on_output(done)
                buf = []
        for q in reversed(buf):
            if self.crash_after is not None and done >= self.crash_after:
                raise RuntimeError("simulated engine crash")
            done += 1
            yield self._out(q)

    def close(self) -> None:
        pass


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


def run(cfg_path: Path, tok: Any, engine: Any = None, **kw: Any) -> tuple[int, Job]:
    cfg = load_job(cfg_path, kw.pop("overrides", None))
    eng = engine or FakeEngine(tok)
    job = Job(cfg, engine=eng, progress="off", **kw)
    return job.run(), job


BASIC = """\
model: {path: unused-fake}
input: {files: [in.jsonl], columns: [cat]}
prompt: {column: prompt}
sampling: {n: 2, max_new_tokens: 4}
output: {path: out, rows_per_shard: 6, flush_seconds: 3600}
"""


def test_basic_run_bad_rows_and_readback(tmp_path: Path, tok: Any) -> None:
    rows: list[Any] = [{"prompt": f"question {i}", "cat": i % 3} for i in range(20)]
    rows += ["{not json", {"prompt": None, "cat": 1}, {"prompt": "", "cat": 2}, {"prompt": "  ", "cat": 2},
             {"prompt": 42, "cat": 0}, {"prompt": ["a"], "cat": 0}, "[1, 2]", {"cat": 5}]
    jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, BASIC)
    code, j = run(job, tok)
    assert code == 0
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
            assert r["finish_reason"] == "length" and r["completion"].startswith("s") and r["prompt_tokens"] > 0
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
        assert meta["sampling"]["n"] == 2 and meta["model"]["path"] == "unused-fake"
    # datasets reads the directory directly
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out"), split="train")
    assert ds.num_rows == 56 and ds.column_names[:3] == ["id", "sample_index", "cat"]
    # a finished job does nothing
    eng = FakeEngine(tok)
    code, _ = run(job, tok, engine=eng)
    assert code == 0 and eng.seen == []


def test_seeds_depend_on_id_not_order(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"k": f"r{i}", "prompt": f"q {i}"} for i in range(9)])
    make_job(tmp_path, BASIC.replace("columns: [cat]", "id_column: k"))
    code, _ = run(tmp_path / "job.yaml", tok)
    a = {(r["id"], r["sample_index"]): r["completion"] for r in read_out(tmp_path / "out")}
    jsonl(tmp_path / "in.jsonl", [{"k": f"r{i}", "prompt": f"q {i}"} for i in reversed(range(9))])
    code, _ = run(tmp_path / "job.yaml", tok, overrides=["output.path=out2"])
    b = {(r["id"], r["sample_index"]): r["completion"] for r in read_out(tmp_path / "out2")}
    assert a == b and len(set(a.values())) == 18


def test_crash_then_resume_is_exactly_once(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}", "cat": i} for i in range(40)] + ["oops"])
    make_job(tmp_path, BASIC.replace("path: out,", "path: ref,"), "ref.yaml")
    run(tmp_path / "ref.yaml", tok)
    ref = read_out(tmp_path / "ref")
    job = make_job(tmp_path, BASIC)
    code, j = run(job, tok, engine=FakeEngine(tok, crash_after=17))
    assert code == 1
    part = read_out(tmp_path / "out")
    assert 0 < len(part) < len(ref)  # completed rows were flushed before exiting
    # a temp shard left by a kill is removed, a committed one never rewritten
    (tmp_path / "out/.part-t00000-000099.parquet.tmp").write_bytes(b"garbage")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("part-*.parquet")}
    eng = FakeEngine(tok, crash_after=9)
    code, _ = run(job, tok, engine=eng)
    assert code == 1
    assert not (tmp_path / "out/.part-t00000-000099.parquet.tmp").exists()
    eng = FakeEngine(tok)
    code, _ = run(job, tok, engine=eng)
    assert code == 0
    done_before = {r["id"] for r in part}
    assert not done_before & set(eng.seen)  # nothing done is generated again
    out = read_out(tmp_path / "out")
    assert keyset(out) == keyset(ref)
    key = lambda r: (r["id"], r["sample_index"])  # noqa: E731
    assert sorted(out, key=key) == sorted(ref, key=key)
    for p, m in before.items():
        assert p.stat().st_mtime_ns == m


def test_request_stop_flushes_and_resumes(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(30)])
    job = make_job(tmp_path, BASIC)
    holder: dict[str, Job] = {}
    eng = FakeEngine(tok, on_output=lambda n: n == 7 and holder["job"].request_stop("stopped by test", exit_code=99))
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
    code, _ = run(job, tok)
    assert code == 0 and keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(30) for s in range(2))


def test_changed_job_refused_unless_overwrite(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(5)])
    job = make_job(tmp_path, BASIC)
    assert run(job, tok)[0] == 0
    (tmp_path / "out" / "_notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"different job \(changed: sampling.temperature 0.7 -> 0.1\).*--overwrite"):
        run(job, tok, overrides=["sampling.temperature=0.1"])
    with pytest.raises(OutputError, match="prompt.system"):
        run(job, tok, overrides=["prompt.system=hi"])
    # engine and output settings are not part of the job: it's simply complete
    eng = FakeEngine(tok)
    assert run(job, tok, engine=eng, overrides=["engine.max_num_seqs=3", "output.rows_per_shard=2"])[0] == 0
    assert eng.seen == []
    code, _ = run(job, tok, overrides=["sampling.temperature=0.1"], overwrite=True)
    assert code == 0
    out = read_out(tmp_path / "out")
    assert keyset(out) == sorted((i, s) for i in range(5) for s in range(2))
    assert (tmp_path / "out" / "_notes.txt").read_text() == "mine"  # only batchgen's files are removed
    assert read_shard_meta(next((tmp_path / "out").glob("part-*.parquet")))["sampling"]["temperature"] == 0.1
    # a different number of tasks is refused too
    with pytest.raises(OutputError, match="same --num-tasks"):
        run(job, tok, overrides=["sampling.temperature=0.1"], task_id=0, num_tasks=2)


def test_limit_extends_the_same_output(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(25)])
    job = make_job(tmp_path, BASIC)
    assert run(job, tok, overrides=["input.limit=10"])[0] == 0
    assert keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(10) for s in range(2))
    eng = FakeEngine(tok)
    assert run(job, tok, engine=eng, overrides=["input.limit=18"])[0] == 0
    assert len(eng.seen) == 8
    assert run(job, tok)[0] == 0
    assert keyset(read_out(tmp_path / "out")) == sorted((i, s) for i in range(25) for s in range(2))


def test_too_long_policies_and_engine_rejects(tmp_path: Path, tok: Any) -> None:
    long = "the quick brown fox jumps over the lazy dog " * 30
    jsonl(tmp_path / "in.jsonl", [{"prompt": "short one", "cat": 0}, {"prompt": long, "cat": 1},
                                  {"prompt": "medium " * 6, "cat": 2}])
    job = make_job(tmp_path, BASIC.replace("prompt: {column: prompt}", "prompt: {column: prompt, max_tokens: 40}"))
    # skip: an error row, counted
    assert run(job, tok)[0] == 0
    out = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out")}
    assert "prompt too long" in out[(1, 0)]["error"] and out[(1, 0)]["prompt_tokens"] > 40
    assert out[(0, 0)]["error"] is None
    # truncate: generated from a cut prompt that fits
    eng = FakeEngine(tok)
    assert run(job, tok, engine=eng, overrides=["prompt.on_too_long=truncate", "output.path=out_t"])[0] == 0
    out = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out_t")}
    assert out[(1, 0)]["error"] is None and out[(1, 0)]["prompt_tokens"] <= 40
    # error: the job stops with a message naming the row; completed rows are kept
    code, j = run(job, tok, overrides=["prompt.on_too_long=error", "output.path=out_e"])
    assert code == 1 and "id=1" in j._fatal
    assert (1, 0) not in {(r["id"], r["sample_index"]) for r in read_out(tmp_path / "out_e")}
    # the engine rejecting a request: an error row, not a crash
    eng = FakeEngine(tok, reject_over=15)
    assert run(job, tok, engine=eng, overrides=["output.path=out_r"])[0] == 0
    out = {(r["id"], r["sample_index"]): r for r in read_out(tmp_path / "out_r")}
    assert "exceed" in out[(2, 1)]["error"] and out[(2, 1)]["finish_reason"] == "error"
    s = json.loads((tmp_path / "out_r/.batchgen/summary.json").read_text())
    assert s["error_rows"] == 2 and s["errors"] == 4


def test_max_model_len_bounds_prompts(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": "word " * 60, "cat": 0}])
    job = make_job(tmp_path, BASIC)
    assert run(job, tok, engine=FakeEngine(tok, max_model_len=40))[0] == 0
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
def test_tasks_partition_exactly_and_match_single_task(tmp_path: Path, tok: Any, sizes: list[int], tasks: int) -> None:
    _parquet_files(tmp_path / "data", sizes)
    body = BASIC.replace("files: [in.jsonl]", "files: [data]").replace("{n: 2,", "{n: 1,")
    make_job(tmp_path, body)
    total = sum(sizes)
    assert run(tmp_path / "job.yaml", tok, overrides=["output.path=single"])[0] == 0
    single = read_out(tmp_path / "single")
    for t in range(tasks):
        assert run(tmp_path / "job.yaml", tok, overrides=["output.path=multi"], task_id=t, num_tasks=tasks)[0] == 0
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


@pytest.mark.parametrize("start", [0, 1, 6, 7, 13, 29, 30, 31])
def test_source_skip_start_parquet_and_jsonl(tmp_path: Path, start: int) -> None:
    _parquet_files(tmp_path / "data", [13, 17], row_group=4)
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"p {i}"} for i in range(12)] + [""] + [{"prompt": f"p {i}"} for i in range(12, 30)])
    for files in ("data", "in.jsonl"):
        body = BASIC.replace("files: [in.jsonl]", f"files: [{files}]").replace("columns: [cat]", "columns: []")
        cfg = load_job(make_job(tmp_path, body))
        src = open_source(cfg)
        assert src.total == 30
        got = list(src.iter_rows(start=start))
        assert [(p, i) for p, i, _ in got] == [(k, k) for k in range(start, 30)]
        assert [r["prompt"] for _, _, r in got] == [f"p {k}" for k in range(start, 30)]


def test_save_to_disk_dataset_input(tmp_path: Path, tok: Any) -> None:
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
    assert run(job, tok)[0] == 0
    assert keyset(read_out(tmp_path / "out")) == [("u0", 0), ("u1", 0), ("u2", 0)]
    with pytest.raises(ConfigError, match="available splits: train, test"):
        run(job, tok, overrides=["input.split=validation", "output.path=o2"])
    for t in range(2):
        assert run(job, tok, overrides=["input.dataset=single", "input.split=null", "output.path=o3"],
                   task_id=t, num_tasks=2)[0] == 0
    out = read_out(tmp_path / "o3")
    assert sorted(r["id"] for r in out) == sorted(f"u{i}" for i in range(11))
    with pytest.raises(ConfigError, match="'prompt'.*available columns: q, uid, msgs"):
        run(job, tok, overrides=["input.dataset=single", "prompt.messages_column=null", "prompt.column=prompt"])


def test_streaming_modulo_partition(tmp_path: Path) -> None:
    """A streaming (iterable) dataset of unknown length: rows index % num_tasks == task."""
    import datasets

    from batchgen.sources import DatasetSource

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
        rows = list(src.iter_rows())
        assert [p for p, _, _ in rows] == list(range(len(rows)))
        assert all(i % 3 == t for _, i, _ in rows)
        seen += [i for _, i, _ in rows]
        # resuming at position 2 skips exactly the first two of this task's rows
        assert [i for _, i, _ in src.iter_rows(start=2)] == [i for _, i, _ in rows][2:]
    assert sorted(seen) == list(range(23))


def test_dry_run_loads_only_the_tokenizer(tmp_path: Path, tok: Any, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"question {i}", "cat": i} for i in range(50)] + [{"prompt": None}])
    job = make_job(tmp_path, BASIC.replace("prompt: {column: prompt}",
                                           "prompt: {column: prompt, template: 'Answer: {prompt}', system: Be brief.}"))
    cfg = load_job(job)
    est = dry_run(cfg, tokenizer=tok, preview=2)
    out = capsys.readouterr().out
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAnswer: question 0<|im_end|>" in out
    assert "prompt tokens" in out and "estimate:" in out and "rows: 51" in out
    assert est["rows"] == 51 and est["sampled_errors"] == 1 and est["avg_prompt_tokens"] > 5
    assert not (tmp_path / "out").exists()


def test_progress_log_lines(tmp_path: Path, tok: Any) -> None:
    import io

    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(10)])
    cfg = load_job(make_job(tmp_path, BASIC))
    buf = io.StringIO()
    j = Job(cfg, engine=FakeEngine(tok), progress="log", log_every=0.0, stream=buf)
    assert j.run() == 0
    text = buf.getvalue()
    assert "10/10 rows (100.0%)" in text and "output tok/s" in text and "ETA" in text
    assert "rows            10 (20 samples)" in text


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
        assert [(i, r["prompt"]) for _, i, r in src.iter_rows()] == [(0, "p 0"), (1, "p 1"), (2, "p 2")], files
        assert src.total == 3


def test_changed_input_files_refused(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "d").mkdir()
    jsonl(tmp_path / "d/b.jsonl", [{"prompt": f"q {i}"} for i in range(4)])
    job = make_job(tmp_path, BASIC.replace("files: [in.jsonl]", "files: [d]").replace("columns: [cat]", "columns: []"))
    assert run(job, tok)[0] == 0
    jsonl(tmp_path / "d/a.jsonl", [{"prompt": "new"}])  # sorts first: every position would shift
    with pytest.raises(OutputError, match="input changed since it was started"):
        run(job, tok)
    assert run(job, tok, overwrite=True)[0] == 0
    assert keyset(read_out(tmp_path / "out")) == [(i, s) for i in range(5) for s in range(2)]


def test_done_after_a_kill_past_the_last_commit(tmp_path: Path, tok: Any) -> None:
    jsonl(tmp_path / "in.jsonl", [{"prompt": f"q {i}", "cat": i} for i in range(6)])
    job = make_job(tmp_path, BASIC)
    assert run(job, tok)[0] == 0
    prog = tmp_path / "out/.batchgen/progress/task-00000.json"
    p = json.loads(prog.read_text())
    p["state"] = "running"  # as if killed between the last commit and the final progress write
    prog.write_text(json.dumps(p))
    (tmp_path / "out/.batchgen/summary.json").unlink()
    eng = FakeEngine(tok)
    assert run(job, tok, engine=eng)[0] == 0 and eng.seen == []
    assert json.loads(prog.read_text())["state"] == "done"
    assert json.loads((tmp_path / "out/.batchgen/summary.json").read_text())["rows"] == 6

"""The input side of exactly-once (issue 11): the task partition does not move when input.limit
changes, in every partition mode; the input's identity (sizes, times, content hashes) refuses a
changed input and accepts a safe append; every row, readable or not, has a unique index and
error rows say where they are. Source-level properties first, then real runs of several tasks
(the Job API with the real engine on a tiny checkpoint, and `batchgen run --task-id/--num-tasks`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from engine_tap import EngineTap

from batchgen.pipeline.config import ConfigError, load_job, parse_job
from batchgen.engine.engine import Engine
from batchgen.pipeline.run.job import Job
from batchgen.pipeline.files import OutputError
from batchgen.pipeline.source import open_source

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).absolute().parents[1]  # not resolve(): a copied tree tests its own package
ENGINE = "engine: {device: cpu, max_num_seqs: 8, max_batch_tokens: 256}\n"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def rows_of(n: int, start: int = 0) -> list[dict]:
    return [{"gid": i, "prompt": f"question {i}"} for i in range(start, start + n)]


def make_input(d: Path, mode: str, n: int) -> dict:
    """An input of n rows (column gid = global index) laid out for a partition mode; returns the
    job's input section."""
    if mode == "one-file-ranges":  # fewer files than tasks: row ranges over files
        write_jsonl(d / "in.jsonl", rows_of(n))
        return {"files": ["in.jsonl"], "columns": ["gid"]}
    if mode == "files-per-task":  # at least as many files as tasks: whole files
        (d / "data").mkdir()
        cuts = [0, n // 5, n // 2, n // 2 + 3, (4 * n) // 5, n]
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            pq.write_table(pa.Table.from_pylist(rows_of(b - a, a)), d / "data" / f"f{i}.parquet", row_group_size=4)
        return {"files": ["data"], "columns": ["gid"]}
    import datasets

    if mode == "dataset-ranges":  # a dataset of known length: row ranges
        datasets.Dataset.from_list(rows_of(n)).save_to_disk(str(d / "ds"))
        return {"dataset": "ds", "columns": ["gid"]}
    assert mode == "stream-modulo"  # a stream of unknown length: every N-th row
    write_jsonl(d / "s.jsonl", rows_of(n))
    return {"dataset": "json", "data_files": str(d / "s.jsonl"), "streaming": True, "columns": ["gid"]}


def job_cfg(d: Path, inp: dict, limit: int | None = None, **extra: Any) -> Any:
    inp = {**inp, **({"limit": limit} if limit is not None else {})}
    return parse_job({"model": {"path": "model", "dtype": "float32"}, "input": inp, "prompt": {"column": "prompt"},
                      "sampling": {"max_new_tokens": 2}, "output": {"path": "out"}, **extra}, base_dir=d)


MODES = ["one-file-ranges", "files-per-task", "dataset-ranges", "stream-modulo"]


# --------------------------------------------------------------------------- case 2: limit and partition
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_limit_changes_move_no_row_between_tasks(tmp_path: Path, mode: str, num_tasks: int) -> None:
    """Raising (or lowering) input.limit only adds (removes) positions at the end of each task's
    part; every limit's parts together are exactly the first `limit` rows."""
    total = 23
    inp = make_input(tmp_path, mode, total)
    prev: list[list[tuple[int, int]]] | None = None
    for limit in [4, 11, 17, None, 9]:
        parts = []
        for t in range(num_tasks):
            src = open_source(job_cfg(tmp_path, inp, limit), t, num_tasks)
            got = [(r.position, r.index, r.values["gid"]) for r in src.rows()]
            assert all(i == g for _, i, g in got)  # the index is the row's place in the input
            assert [p for p, _, _ in got] == list(range(len(got)))
            if src.total is not None:
                assert src.total == len(got), (limit, t)
            parts.append([(p, i) for p, i, _ in got])
        union = sorted(i for part in parts for _, i in part)
        assert union == list(range(min(total, limit if limit is not None else total))), (limit, parts)
        if prev is not None:  # positions are stable: one part is a prefix of the other
            for t in range(num_tasks):
                short, long_ = sorted([prev[t], parts[t]], key=len)
                assert long_[:len(short)] == short, (mode, limit, t, prev[t], parts[t])
        prev = parts


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Callable[..., Path]) -> Iterator[Engine]:
    eng = Engine.from_pretrained(str(tiny_checkpoint("smollm2")), dtype="float32", device="cpu", max_num_seqs=8,
                                 max_batch_tokens=256)
    yield eng
    eng.close()


Counting = EngineTap  # the real engine, with `seen`: the positions each run submitted


def read_out(out: Path) -> list[dict]:
    import pyarrow.dataset as pds

    return pds.dataset(str(out), format="parquet").to_table().to_pylist() if out.exists() else []


@pytest.mark.parametrize("mode", ["one-file-ranges", "dataset-ranges", "files-per-task", "stream-modulo"])
def test_raising_limit_with_several_tasks_is_exactly_once(tmp_path: Path, engine: Engine, mode: str,
                                                          tiny_checkpoint: Callable[..., Path]) -> None:
    """The reported bug: 2 tasks, limit raised between runs -> rows missing and rows twice, while
    every task said it was complete. Each run must generate only the rows it had not done."""
    (tmp_path / "model").symlink_to(tiny_checkpoint("smollm2"))
    total, tasks = 20, 2
    inp = make_input(tmp_path, mode, total)
    generated = 0
    for limit in [5, 12, None]:
        for t in range(tasks):
            eng = Counting(engine)
            job = Job(job_cfg(tmp_path, inp, limit), engine=eng, progress="off", task_id=t, num_tasks=tasks)
            assert job.run() == 0
            generated += len(eng.seen)
        want = min(total, limit or total)
        ids = sorted(r["id"] for r in read_out(tmp_path / "out"))
        assert ids == list(range(want)), (limit, ids)  # each row once: none lost, none twice
        assert all(r["gid"] == r["id"] for r in read_out(tmp_path / "out"))
        assert generated == want  # nothing done was generated again
        for t in range(tasks):
            p = json.loads((tmp_path / f"out/.batchgen/progress/task-{t:05d}.json").read_text())
            assert p["state"] == "done" and (p["rows_total"] is None or p["rows_done"] == p["rows_total"])
    assert not engine.scheduler.has_work()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def cli_run(d: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchgen.cli", "run", "job.yaml", "--progress", "off", *args],
                          cwd=str(d), env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_tasks_raise_limit_exactly_once(tmp_path: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    """`batchgen run --task-id/--num-tasks --set input.limit=...`: one JSONL file, two tasks (row
    ranges), the limit raised twice; the union of the output is every row once."""
    (tmp_path / "model").symlink_to(tiny_checkpoint("smollm2"))
    write_jsonl(tmp_path / "in.jsonl", rows_of(12))
    (tmp_path / "job.yaml").write_text("model: {path: model, dtype: float32}\ninput: {files: [in.jsonl]}\n"
                                       "prompt: {column: prompt}\nsampling: {max_new_tokens: 2}\n"
                                       "output: {path: out}\n" + ENGINE)
    for limit in ["3", "8", "null"]:
        for t in range(2):
            r = cli_run(tmp_path, "--task-id", str(t), "--num-tasks", "2", "--set", f"input.limit={limit}")
            assert r.returncode == 0, r.stderr[-2000:]
        want = 12 if limit == "null" else int(limit)
        assert sorted(r["id"] for r in read_out(tmp_path / "out")) == list(range(want)), limit


# --------------------------------------------------------------------------- case 3: the input's identity
def _src(d: Path, inp: dict, t: int = 0, n: int = 1) -> Any:
    return open_source(job_cfg(d, inp), t, n)


def test_identity_holds_sizes_times_and_content(tmp_path: Path) -> None:
    from batchgen.pipeline.source.files import content_hash
    from batchgen.pipeline.source.identity import identity_change

    write_jsonl(tmp_path / "in.jsonl", rows_of(30))
    ident = _src(tmp_path, {"files": ["in.jsonl"]}).identity()
    (f,) = ident["files"]
    st = os.stat(tmp_path / "in.jsonl")
    assert f == {"path": "in.jsonl", "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                 "sha": content_hash(str(tmp_path / "in.jsonl"), st.st_size)}
    assert identity_change(ident, _src(tmp_path, {"files": ["in.jsonl"]}).identity()) is None


@pytest.mark.parametrize("edit", ["insert", "delete", "same-size edit", "append, no newline before"])
def test_changed_jsonl_is_named(tmp_path: Path, edit: str) -> None:
    from batchgen.pipeline.source.identity import identity_change

    p = tmp_path / "in.jsonl"
    write_jsonl(p, rows_of(30))
    old = _src(tmp_path, {"files": ["in.jsonl"]}).identity()
    lines = p.read_text().splitlines(keepends=True)
    if edit == "insert":
        lines.insert(10, json.dumps({"gid": 99, "prompt": "new"}) + "\n")
    elif edit == "delete":
        del lines[10]
    elif edit == "same-size edit":
        lines[10] = lines[10].replace("question", "QUESTION")
    else:
        lines[-1] = lines[-1].rstrip("\n")
        p.write_text("".join(lines))
        old = _src(tmp_path, {"files": ["in.jsonl"]}).identity()
        lines.append("\n" + json.dumps({"gid": 30, "prompt": "more"}) + "\n")
    p.write_text("".join(lines))
    os.utime(p, ns=(old["files"][0]["mtime_ns"] + 10**9,) * 2)
    msg = identity_change(old, _src(tmp_path, {"files": ["in.jsonl"]}).identity())
    assert msg and msg.startswith("in.jsonl: ")
    if edit == "same-size edit":  # the sampled blocks may miss it; the time does not
        assert "modified" in msg
    elif edit.startswith("append"):
        assert "had no line end" in msg
    else:
        assert "size" in msg


def test_only_time_changed_says_how_to_restore_it(tmp_path: Path) -> None:
    from batchgen.pipeline.source.identity import identity_change

    p = write_jsonl(tmp_path / "in.jsonl", rows_of(5))
    old = _src(tmp_path, {"files": ["in.jsonl"]}).identity()
    os.utime(p, ns=(old["files"][0]["mtime_ns"] + 5 * 10**9,) * 2)
    msg = identity_change(old, _src(tmp_path, {"files": ["in.jsonl"]}).identity())
    sec, ns = divmod(old["files"][0]["mtime_ns"], 10**9)
    assert "modified" in msg and f"touch -d @{sec}.{ns:09d} in.jsonl" in msg
    os.utime(p, ns=(old["files"][0]["mtime_ns"],) * 2)
    assert identity_change(old, _src(tmp_path, {"files": ["in.jsonl"]}).identity()) is None


@pytest.mark.parametrize("layout, tasks, safe", [
    ("one file", 1, True),
    ("last of two files", 1, True),
    ("first of two files", 1, False),  # every later row's index would shift
    ("one file", 2, False),  # row ranges: the new row count moves the ranges
    ("last of four files", 2, True),  # whole files per task, owners unchanged
    ("a new file after the others", 1, True),
    ("a new file after the others", 2, True),  # whole files; the new one goes to the lighter task
    ("a new file before the others", 1, False),
    ("a new file after one file", 2, False),  # ranges over one file become whole files: all move
])
def test_append_is_accepted_only_where_no_row_moves(tmp_path: Path, layout: str, tasks: int, safe: bool) -> None:
    from batchgen.pipeline.source.identity import identity_change

    (tmp_path / "d").mkdir()
    names = ["a"] if layout in ("one file", "a new file after one file") else (
        ["a", "b"] if "two" in layout else ["b", "c", "d", "e"])
    for k, n in enumerate(names):
        write_jsonl(tmp_path / "d" / f"{n}.jsonl", rows_of(20 + 10 * (len(names) - k), 100 * k))
    inp = {"files": ["d"]}
    olds = [_src(tmp_path, inp, t, tasks).identity() for t in range(tasks)]
    if layout.startswith("a new file"):
        name = "a.jsonl" if "before" in layout else "z.jsonl"
        write_jsonl(tmp_path / "d" / name, rows_of(3, 900))
    else:
        grown = tmp_path / "d" / f"{names[0] if layout.startswith('first') else names[-1]}.jsonl"
        size = grown.stat().st_size
        with open(grown, "a") as f:
            f.write(json.dumps({"gid": 999, "prompt": "appended"}) + "\n")
        assert grown.stat().st_size > size
        name = grown.name
    for t in range(tasks):
        msg = identity_change(olds[t], _src(tmp_path, inp, t, tasks).identity())
        assert (msg is None) == safe, msg
        if not safe and "before" not in layout:
            assert msg.startswith(f"d/{name}: ") or "added after the old ones (d/z.jsonl" in msg, msg


def test_parquet_and_dataset_changes_are_named(tmp_path: Path) -> None:
    import datasets

    from batchgen.pipeline.source.identity import identity_change

    pq.write_table(pa.Table.from_pylist(rows_of(10)), tmp_path / "a.parquet")
    old = _src(tmp_path, {"files": ["a.parquet"]}).identity()
    t = pa.Table.from_pylist(rows_of(10))
    pq.write_table(t.set_column(1, "prompt", pa.array([f"Question {i}" for i in range(10)])), tmp_path / "a.parquet")
    msg = identity_change(old, _src(tmp_path, {"files": ["a.parquet"]}).identity())
    assert msg and msg.startswith("a.parquet: ")
    datasets.Dataset.from_list(rows_of(10)).save_to_disk(str(tmp_path / "ds"))
    old = _src(tmp_path, {"dataset": "ds"}).identity()
    assert identity_change(old, _src(tmp_path, {"dataset": "ds"}).identity()) is None
    datasets.Dataset.from_list(rows_of(10)).save_to_disk(str(tmp_path / "ds2"))  # the same data saved again
    os.rename(tmp_path / "ds", tmp_path / "old")
    os.rename(tmp_path / "ds2", tmp_path / "ds")
    assert identity_change(old, _src(tmp_path, {"dataset": "ds"}).identity()) is None
    edited = rows_of(10)
    edited[3]["prompt"] = "changed"
    datasets.Dataset.from_list(edited).save_to_disk(str(tmp_path / "ds3"))
    os.rename(tmp_path / "ds", tmp_path / "old2")
    os.rename(tmp_path / "ds3", tmp_path / "ds")
    msg = identity_change(old, _src(tmp_path, {"dataset": "ds"}).identity())
    assert msg and "fingerprint" in msg
    # a stream of local files: each file's size, time and content hash
    inp = make_input(tmp_path, "stream-modulo", 10)
    old = _src(tmp_path, inp).identity()
    assert [f["path"] for f in old["files"]] == [str(tmp_path / "s.jsonl")]
    assert identity_change(old, _src(tmp_path, inp).identity()) is None
    write_jsonl(tmp_path / "s.jsonl", rows_of(10)[:5] + [{"gid": 5, "prompt": "edited"}] + rows_of(10)[6:])
    msg = identity_change(old, _src(tmp_path, inp).identity())
    assert msg and msg.startswith(f"its file {tmp_path / 's.jsonl'}: size"), msg


def test_identity_of_an_older_output_compares_paths(tmp_path: Path) -> None:
    from batchgen.pipeline.source.identity import identity_change

    """Manifests written before content identities (v1: paths only) are compared as before."""
    write_jsonl(tmp_path / "in.jsonl", rows_of(3))
    new = _src(tmp_path, {"files": ["in.jsonl"]}).identity()
    assert identity_change({"files": ["in.jsonl"]}, new) is None
    assert "removed (gone.jsonl)" in identity_change({"files": ["gone.jsonl", "in.jsonl"]}, new)
    # several tasks over row ranges: the old positions depended on the old runs' limits
    ranges = _src(tmp_path, {"files": ["in.jsonl"]}, 0, 2).identity()
    assert "older batchgen" in identity_change({"files": ["in.jsonl"]}, ranges)
    whole_files = _src(tmp_path, {"files": ["in.jsonl"]}, 0, 1).identity()
    assert identity_change({"files": ["in.jsonl"]}, whole_files) is None
    # a garbled record is a refusal that says so, never a crash
    assert "can't be compared" in identity_change({"version": 2, "files": [{"size": 1}]}, whole_files)


BODY = """\
model: {path: model, dtype: float32}
input: {files: [in.jsonl], columns: [gid]}
prompt: {column: prompt}
sampling: {max_new_tokens: 2}
output: {path: out, rows_per_shard: 4}
""" + ENGINE


def test_changed_input_refused_on_resume_and_append_extends(tmp_path: Path, engine: Engine,
                                                             tiny_checkpoint: Callable[..., Path]) -> None:
    """The reported bug: a row inserted into the JSONL file between runs was dropped and another
    written twice; an edited row kept its old completion. Now both are refused, naming the file,
    until --overwrite; rows appended at the end are done exactly once."""
    (tmp_path / "model").symlink_to(tiny_checkpoint("smollm2"))
    p = write_jsonl(tmp_path / "in.jsonl", rows_of(8))
    (tmp_path / "job.yaml").write_text(BODY)
    cfg = load_job(tmp_path / "job.yaml", ["input.limit=5"])
    assert Job(cfg, engine=Counting(engine), progress="off").run() == 0
    original = p.read_text()
    lines = original.splitlines(keepends=True)
    p.write_text("".join(lines[:2] + [json.dumps({"gid": 50, "prompt": "inserted"}) + "\n"] + lines[2:]))
    with pytest.raises(OutputError, match=r"its input changed since it was started: in\.jsonl: size .*--overwrite"):
        Job(load_job(tmp_path / "job.yaml"), engine=Counting(engine), progress="off").run()
    p.write_text(original.replace("question 3", "question 9"))  # same size, edited in place
    with pytest.raises(OutputError, match=r"in\.jsonl: .*modified"):
        Job(load_job(tmp_path / "job.yaml"), engine=Counting(engine), progress="off").run()
    # appended rows (the original bytes untouched): extended exactly once, also past the old limit
    p.write_text(original + "".join(json.dumps(r) + "\n" for r in rows_of(4, 8)))
    eng = Counting(engine)
    assert Job(load_job(tmp_path / "job.yaml"), engine=eng, progress="off").run() == 0
    assert len(eng.seen) == 12 - 5
    out = read_out(tmp_path / "out")
    assert sorted(r["id"] for r in out) == list(range(12)) and all(r["id"] == r["gid"] for r in out)
    # --overwrite starts over on the changed input
    p.write_text("".join(lines[:2] + [json.dumps({"gid": 50, "prompt": "inserted"}) + "\n"] + lines[2:]))
    assert Job(load_job(tmp_path / "job.yaml"), engine=Counting(engine), progress="off", overwrite=True).run() == 0
    assert sorted(r["gid"] for r in read_out(tmp_path / "out")) == sorted([0, 1, 50] + list(range(2, 8)))


# --------------------------------------------------------------------------- case 5: where error rows are
def test_every_row_has_a_unique_index_and_error_rows_say_where(tmp_path: Path) -> None:
    """Malformed lines and null ids carry their place (file, line) and a unique index, so the run loop
    can give each output row its own id."""
    from batchgen.pipeline.source.base import RowOrigin

    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d/a.jsonl", [{"k": "x", "prompt": "p"}, "{bad", {"k": None, "prompt": "p"}, ""])
    write_jsonl(tmp_path / "d/b.jsonl", ["[1]", {"k": "y", "prompt": "p"}, {"k": [1], "prompt": "p"}])
    rows = list(_src(tmp_path, {"files": ["d"], "id_column": "k"}).rows())
    assert [r.index for r in rows] == list(range(6))
    errs = {r.index: r for r in rows if r.error is not None}
    assert {i: r.origin for i, r in errs.items()} == {
        1: RowOrigin("d/a.jsonl", 1, 2), 2: RowOrigin("d/a.jsonl", 2, 3),
        3: RowOrigin("d/b.jsonl", 0, 1), 5: RowOrigin("d/b.jsonl", 2, 3)}
    assert "d/a.jsonl:2" in errs[1].error and "id column 'k' is null" in errs[2].error
    assert "not a JSON object" in errs[3].error and "is a list" in errs[5].error
    assert all(r.values == {} for r in errs.values())  # no value of a bad row travels on


def test_rows_are_typed_source_rows(tmp_path: Path) -> None:
    """Source.rows() yields SourceRow(position, index, values, error, origin); start skips."""
    from batchgen.pipeline.source.base import RowOrigin, SourceRow

    write_jsonl(tmp_path / "in.jsonl", [{"k": "x", "prompt": "p"}, "{bad", {"k": None, "prompt": "q"},
                                        {"k": "z", "prompt": "r"}])
    src = _src(tmp_path, {"files": ["in.jsonl"], "id_column": "k"})
    rows = list(src.rows())
    assert all(isinstance(r, SourceRow) for r in rows)
    assert [(r.position, r.index) for r in rows] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert rows[0].values == {"prompt": "p", "k": "x"} and rows[0].error is None and rows[0].origin is None
    assert rows[1].values == {} and "malformed JSON at in.jsonl:2" in rows[1].error
    assert rows[1].origin == RowOrigin("in.jsonl", 1, 2)
    assert "id column 'k' is null" in rows[2].error and rows[2].origin == RowOrigin("in.jsonl", 2, 3)
    assert rows[2].values == {}
    assert [(r.position, r.values) for r in src.rows(start=3)] == [(3, {"prompt": "r", "k": "z"})]


def test_id_values_the_id_column_cannot_hold_are_error_rows(tmp_path: Path) -> None:
    """JSONL ids are typed from the first rows; a later id of another kind would be written as
    null (lost), so it is an error row naming it."""
    write_jsonl(tmp_path / "in.jsonl", [{"k": i, "prompt": "p"} for i in range(100)]
                + [{"k": "x7", "prompt": "p"}, {"k": 2**70, "prompt": "p"}, {"k": 1.5, "prompt": "p"},
                   '{"k": NaN, "prompt": "p"}', {"k": True, "prompt": "p"}])
    rows = list(_src(tmp_path, {"files": ["in.jsonl"], "id_column": "k"}).rows())
    assert [r.values["k"] for r in rows[:100]] == list(range(100))
    msgs = [r.error or "" for r in rows[100:]]
    assert "is a str ('x7'), but this input's ids are int64" in msgs[0]
    assert "out of the range of int64" in msgs[1] and "is a float" in msgs[2]
    assert "is nan" in msgs[3] and "is a boolean" in msgs[4]


def test_list_or_struct_id_column_is_refused_up_front(tmp_path: Path) -> None:
    pq.write_table(pa.table({"k": [[1], [2]], "prompt": ["a", "b"]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"input.id_column: column 'k' holds list<.*> values in "
                                          r"input file a.parquet; an id must be a string or a number"):
        _src(tmp_path, {"files": ["a.parquet"], "id_column": "k"})
    write_jsonl(tmp_path / "in.jsonl", [{"k": {"a": 1}, "prompt": "p"}])
    with pytest.raises(ConfigError, match=r"holds struct<a: int64> values"):
        _src(tmp_path, {"files": ["in.jsonl"], "id_column": "k"})
    import datasets

    datasets.Dataset.from_dict({"k": [[1, 2]], "prompt": ["p"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"holds list<.*> values in dataset ds"):
        _src(tmp_path, {"dataset": "ds", "id_column": "k"})


def test_new_files_after_the_old_ones_extend_a_two_task_job(tmp_path: Path, engine: Engine,
                                                            tiny_checkpoint: Callable[..., Path]) -> None:
    """Whole files per task: a new shard of data that sorts last is done once, by one task,
    and nothing done is redone."""
    (tmp_path / "model").symlink_to(tiny_checkpoint("smollm2"))
    (tmp_path / "d").mkdir()
    for k, n in enumerate("abc"):
        write_jsonl(tmp_path / "d" / f"{n}.jsonl", rows_of(4 - k, 10 * k))
    inp = {"files": ["d"], "columns": ["gid"]}
    for t in range(2):
        assert Job(job_cfg(tmp_path, inp), engine=Counting(engine), progress="off", task_id=t, num_tasks=2).run() == 0
    write_jsonl(tmp_path / "d" / "y.jsonl", rows_of(5, 80))  # the largest file: the tasks' files would move
    with pytest.raises(OutputError, match=r"added after the old ones \(d/y.jsonl .*balanced by size"):
        Job(job_cfg(tmp_path, inp), engine=Counting(engine), progress="off", task_id=0, num_tasks=2).run()
    os.unlink(tmp_path / "d" / "y.jsonl")
    write_jsonl(tmp_path / "d" / "z.jsonl", rows_of(1, 90))  # the smallest: assigned last, nothing moves
    seen = 0
    for t in range(2):
        eng = Counting(engine)
        assert Job(job_cfg(tmp_path, inp), engine=eng, progress="off", task_id=t, num_tasks=2).run() == 0
        seen += len(eng.seen)
    assert seen == 1
    out = read_out(tmp_path / "out")
    assert sorted(r["gid"] for r in out) == [0, 1, 2, 3, 10, 11, 12, 20, 21, 90]
    assert sorted(r["id"] for r in out) == list(range(10))


def test_the_output_directory_is_never_input(tmp_path: Path) -> None:
    """output.path inside an input directory (or under an input glob): the job's own shards are
    not rows of its next run."""
    (tmp_path / "data/out").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows_of(3)), tmp_path / "data/a.parquet")
    pq.write_table(pa.table({"id": [0], "completion": ["x"]}), tmp_path / "data/out/part-t00000-000000.parquet")
    for spec in ["data", "data/**/*.parquet", "data/out/part-t00000-000000.parquet"]:
        cfg = parse_job({"model": {"path": "m"}, "input": {"files": [spec]}, "prompt": {"column": "prompt"},
                         "output": {"path": "data/out"}}, base_dir=tmp_path)
        if spec.startswith("data/out"):
            with pytest.raises(ConfigError, match=r"holds no .parquet or .jsonl file \(only files in output.path"):
                open_source(cfg)
            continue
        src = open_source(cfg)
        assert [Path(f.path).name for f in src.files] == ["a.parquet"], spec

"""Bad input, end to end (issue 11): `batchgen run` as a real subprocess on inputs that are broken
in the ways files break. A bad row becomes an error row and the job completes; a file that can't be
read is one clear line (exit 2, no traceback), found before the model loads where that is cheap,
and what was committed stays; a changed input is refused naming the file.

No sleep here is sized for one machine: every fault is in the input before the run starts (or is
made between two runs)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
from engine_tap import EngineTap
import pytest

ROOT = Path(__file__).absolute().parents[1]  # not resolve(): a copied tree tests its own package
JOB = """\
model: {{path: model, dtype: float32}}
input: {{{input}}}
prompt: {{column: prompt}}
sampling: {{max_new_tokens: 2}}
output: {{path: out, rows_per_shard: 4}}
engine: {{device: cpu, max_num_seqs: 8, max_batch_tokens: 256}}
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def d(tmp_path: Path, tiny_checkpoint: Callable[..., Path]) -> Path:
    (tmp_path / "model").symlink_to(tiny_checkpoint("smollm2"))
    return tmp_path


def job(d: Path, inp: str) -> None:
    (d / "job.yaml").write_text(JOB.format(input=inp))


def run(d: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "batchgen.cli", "run", "job.yaml", "--progress", "off", *args],
                          cwd=str(d), env=env, capture_output=True, text=True, timeout=600)


def one_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """A refusal: exit `code`, no traceback, exactly one line (before the model loaded)."""
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


def read_out(out: Path) -> list[dict]:
    import pyarrow.dataset as pds

    return pds.dataset(str(out), format="parquet").to_table().to_pylist()


def good(i: int) -> dict:
    return {"prompt": f"question {i}", "cat": i}


# --------------------------------------------------------------------------- case 9: bad lines
def test_bad_jsonl_lines_are_error_rows_and_the_job_completes(d: Path) -> None:
    """The reported bug: one line nested 100,000 levels deep raised RecursionError on every
    rerun. It and its siblings are error rows; the good lines around them are generated."""
    from batchgen.pipeline.source.checks import MAX_DEPTH
    from batchgen.pipeline.source.lines import MAX_LINE_BYTES

    lines: list[bytes] = [b"\xef\xbb\xbf" + json.dumps(good(0)).encode()]  # a byte order mark first
    bad: dict[int, str] = {}

    def add(raw: bytes, why: str | None = None) -> None:
        if why:
            bad[len(lines)] = why
        lines.append(raw)

    add(b'{"prompt": "' + b"[" * 200 + b'", "cat": 1}')  # brackets in a string are fine
    add(b'{"prompt": "p", "cat": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply")
    add(b'{"prompt": "p", "cat": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", "nested deeper than")
    add(b'{"prompt": "' + b"x" * MAX_LINE_BYTES + b'"}', "over the limit")
    add(b'{"prompt": "caf\xe9"}', "not valid UTF-8")
    add(b"[1, 2]", "not a JSON object")
    add(b'"just a string"', "not a JSON object")
    add(b'{"prompt": "a", "prompt": "b"}', "key 'prompt' appears more than once")
    add(b'{"prompt": "lone \\ud800 surrogate"}', "unpaired surrogate")
    add(b'{"prompt": "pair \\ud83d\\ude00 is fine", "cat": NaN}')  # NaN: Python's JSON; a float column
    add(json.dumps(good(11)).encode() + b"\r")  # CRLF line end
    add(b"{broken", "malformed JSON")
    add(json.dumps(good(13)).encode())
    with open(d / "in.jsonl", "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    job(d, "files: [in.jsonl], columns: [cat]")
    r = run(d)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {row["id"]: row for row in read_out(d / "out")}
    assert sorted(out) == list(range(len(lines)))  # every line once
    for i, row in out.items():
        if i in bad:
            assert row["error"] and bad[i] in row["error"] and f"in.jsonl:{i + 1}" in row["error"], (i, row)
            assert row["finish_reason"] == "error" and row["completion"] is None
        else:
            assert row["error"] is None and row["completion_tokens"] >= 1, (i, row)
    assert out[10]["cat"] != out[10]["cat"]  # NaN went through as NaN
    summary = json.loads((d / "out/.batchgen/summary.json").read_text())
    assert summary["error_rows"] == len(bad)
    r = run(d)
    assert r.returncode == 0 and "nothing to do" in r.stderr


def _corrupt_row_group(path: Path, group: int) -> None:
    md = pq.read_metadata(path)
    off = md.row_group(group).column(0).data_page_offset
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(b"\xff" * 12)  # the data page header: undecodable


def test_corrupt_parquet_row_group_is_error_rows(d: Path) -> None:
    """A Parquet file whose footer is fine but one row group's pages are not: that group's rows
    are error rows (the footer says how many), the others are generated, exactly once."""
    (d / "data").mkdir()
    pq.write_table(pa.Table.from_pylist([good(i) for i in range(12)]), d / "data/a.parquet", row_group_size=4,
                   compression="none", use_dictionary=False)
    _corrupt_row_group(d / "data/a.parquet", 1)
    pq.write_table(pa.Table.from_pylist([good(i) for i in range(12, 15)]), d / "data/b.parquet")
    job(d, "files: [data], columns: [cat]")
    r = run(d)
    assert r.returncode == 0, r.stderr[-3000:]
    out = {row["id"]: row for row in read_out(d / "out")}
    assert sorted(out) == list(range(15))
    for i, row in out.items():
        if 4 <= i < 8:
            assert f"data/a.parquet row {i}: row group 1 can't be read" in row["error"], row
        else:
            assert row["error"] is None and row["cat"] == i, row
    assert run(d).returncode == 0


# --------------------------------------------------------------------------- case 12: one clear line
def test_zero_row_saved_dataset_is_one_line(d: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(d / "empty"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]}),
                          "test": datasets.Dataset.from_dict({"prompt": []})}).save_to_disk(str(d / "dd"))
    job(d, "dataset: empty")
    assert "the dataset saved at empty holds no rows" in one_line(run(d))
    job(d, "dataset: dd, split: test")
    assert "split 'test' of the dataset saved at dd holds no rows" in one_line(run(d))
    job(d, "dataset: dd, split: train")  # the other split is fine and loads without the empty one
    assert run(d).returncode == 0


@pytest.mark.parametrize("fault, says", [
    ("parquet cut short", "data/b.parquet: not a Parquet file: no PAR1 footer"),
    ("gzip that is not gzip", "input file data/b.jsonl.gz: can't be read after line 0"),
    ("binary as jsonl", "input file data/b.jsonl: not JSON Lines"),
    ("utf-16 jsonl", "it looks like UTF-16"),
    ("json array", "a JSON array?"),
    ("parquet missing a column", "input file data/b.parquet has no column 'prompt'"),
    ("parquet with another id type", "column 'cat' is string in data/b.parquet but int64 in data/a.parquet"),
])
def test_corrupt_second_file_is_one_line_before_the_model_loads(d: Path, fault: str, says: str) -> None:
    (d / "data").mkdir()
    rows = [good(i) for i in range(5)]
    kind = "parquet" if "parquet" in fault else "jsonl"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), d / "data/a.parquet")
        bad = d / "data/b.parquet"
        if fault == "parquet missing a column":
            pq.write_table(pa.table({"text": ["x"], "cat": [1]}), bad)
        elif fault == "parquet with another id type":
            pq.write_table(pa.table({"prompt": ["x"], "cat": ["1"]}), bad)
        else:
            pq.write_table(pa.Table.from_pylist(rows), bad)
            bad.write_bytes(bad.read_bytes()[:-20])
    else:
        (d / "data/a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if fault == "gzip that is not gzip":
            (d / "data/b.jsonl.gz").write_bytes(b"\x1f\x8b\x08garbage" * 50)
        elif fault == "binary as jsonl":
            (d / "data/b.jsonl").write_bytes(bytes(range(256)) * 40)
        elif fault == "utf-16 jsonl":
            (d / "data/b.jsonl").write_bytes(text.encode("utf-16"))
        else:
            (d / "data/b.jsonl").write_text(json.dumps(rows, indent=2))
    job(d, "files: [data], id_column: cat" if "id type" in fault else "files: [data], columns: [cat]")
    line = one_line(run(d))
    assert says in line, line


@pytest.mark.parametrize("named", ["by path", "in a directory"])
def test_a_fifo_as_input_is_one_line_instead_of_a_run_that_never_starts(d: Path, named: str) -> None:
    """A FIFO with a .jsonl name, named or found in an input directory: opening it would block until someone writes
    (and a resume could never read the same rows again), so it is refused in one line before the model loads."""
    (d / "data").mkdir()
    (d / "data" / "a.jsonl").write_text('{"prompt": "hi"}\n')
    fifo = d / "data" / "b.jsonl"
    os.mkfifo(fifo)
    job(d, "files: [data/b.jsonl]" if named == "by path" else "files: [data]")
    for args in ((), ("--dry-run",)):
        line = one_line(run(d, *args))
        assert f"{fifo} is not a regular file" in line and "input.files" in line, line
    assert not (d / "out").exists() or not any((d / "out").glob("part-*"))


def test_list_id_column_is_one_line(d: Path) -> None:
    pq.write_table(pa.table({"prompt": ["a", "b"], "k": [[1], [2]]}), d / "in.parquet")
    job(d, "files: [in.parquet], id_column: k")
    assert "input.id_column: column 'k' holds list" in one_line(run(d))


def test_truncated_gzip_is_one_line_before_the_model_loads(d: Path) -> None:
    """A .gz whose compressed stream stops halfway: its start reads, its end does not. Start-up
    counts the rows of every file, so it is found there: one line naming the file and line."""
    (d / "data").mkdir()
    (d / "data/a.jsonl").write_text("".join(json.dumps(good(i)) + "\n" for i in range(8)))
    text = "".join(json.dumps({"prompt": f"q {i} " + "abcdefgh"[i % 8] * (i % 300)}) + "\n" for i in range(2000))
    blob = gzip.compress(text.encode())
    (d / "data/b.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    job(d, "files: [data]")
    line = one_line(run(d))
    assert "input file data/b.jsonl.gz: can't be read after line" in line and "end-of-stream" in line, line


def change_input(engine: Any, change: Callable[[], None]) -> EngineTap:
    """The real engine; once the job has its first output, `change()` runs (the input changes under
    the running job). The source opens the second file only after dozens of outputs (the job reads
    64 rows at a time and keeps at most 3 x max_num_seqs rows in the engine), so the change always
    comes before that file is opened."""
    return EngineTap(engine, on_output=lambda k: k == 1 and change())


def _changed_mid_run(d: Path, tiny_checkpoint: Callable[..., Path]) -> tuple[int, str, Path]:
    import io

    from batchgen.pipeline.config import load_job
    from batchgen.pipeline.run.job import Job
    from batchgen.pipeline.run.engine_setup import make_engine

    (d / "data").mkdir()
    (d / "data/a.jsonl").write_text("".join(json.dumps(good(i)) + "\n" for i in range(100)))
    b = d / "data/b.jsonl"
    b.write_text("".join(json.dumps(good(i)) + "\n" for i in range(100, 110)))
    job(d, "files: [data]")
    buf = io.StringIO()
    cfg = load_job(d / "job.yaml")
    j = Job(cfg, progress="off", stream=buf,
            engine_factory=lambda c: change_input(make_engine(c), lambda: b.write_text(b.read_text()[:-40])))
    return j.run(), buf.getvalue(), d / "out"


def test_input_changed_mid_run_is_one_line_naming_the_file_and_committed_rows_stay(
        d: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    code, log, out = _changed_mid_run(d, tiny_checkpoint)
    assert code != 0
    last = log.strip().splitlines()[-1]
    assert "input file data/b.jsonl changed while the job was running" in last, log[-3000:]
    done = {row["id"] for row in read_out(out)}
    assert done and done <= set(range(100))  # a.jsonl's finished rows were committed
    assert len(done) == json.loads((out / ".batchgen/progress/task-00000.json").read_text())["rows_done"]


def test_input_changed_mid_run_is_exit_2_without_a_traceback(d: Path, tiny_checkpoint: Callable[..., Path]) -> None:
    code, log, _ = _changed_mid_run(d, tiny_checkpoint)
    assert code == 2 and "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------- case 3 on the command line
def test_changed_input_is_refused_in_one_line_and_overwrite_starts_over(d: Path) -> None:
    p = d / "in.jsonl"
    p.write_text("".join(json.dumps(good(i)) + "\n" for i in range(6)))
    job(d, "files: [in.jsonl], columns: [cat]")
    assert run(d).returncode == 0
    shards = {q.name: q.read_bytes() for q in (d / "out").glob("part-*.parquet")}
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:3] + [json.dumps(good(99)) + "\n"] + lines[3:]))
    line = one_line(run(d))
    assert "its input changed since it was started: in.jsonl: size" in line and "--overwrite" in line
    assert {q.name: q.read_bytes() for q in (d / "out").glob("part-*.parquet")} == shards  # nothing lost
    r = run(d, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(row["cat"] for row in read_out(d / "out")) == [0, 1, 2, 3, 4, 5, 99]


# --------------------------------------------------------------------------- a file changing under a running job
def _cfg(d: Path, files: str) -> Any:
    from batchgen.pipeline.config import parse_job

    return parse_job({"model": {"path": "m"}, "input": {"files": [files]}, "prompt": {"column": "prompt"},
                      "output": {"path": "out"}}, base_dir=d)


def test_a_file_growing_while_read_is_read_as_it_was(tmp_path: Path) -> None:
    """Rows appended while the job runs (a producer still writing) are left for the next run,
    which sees a safe append; a file rewritten before the job reads it is a clear error."""
    from batchgen.pipeline.source.base import InputError
    from batchgen.pipeline.source.identity import identity_change
    from batchgen.pipeline.source import open_source

    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(good(i)) + "\n" for i in range(5)))
    src = open_source(_cfg(tmp_path, "in.jsonl"))
    with open(p, "a") as f:
        f.write(json.dumps(good(5)) + "\n" + '{"prompt": "half a li')  # the producer is mid-line
    assert [r.values["prompt"] for r in src.rows()] == [f"question {i}" for i in range(5)]
    with open(p, "a") as f:
        f.write('ne"}\n')
    later = open_source(_cfg(tmp_path, "in.jsonl"))
    assert identity_change(src.identity(), later.identity()) is None
    assert [r.values.get("prompt") for r in later.rows(start=5)] == ["question 5", "half a line"]
    # rewritten in place between start-up and reading
    src = open_source(_cfg(tmp_path, "in.jsonl"))
    p.write_text(p.read_text().replace("question 1", "question 7"))
    os.utime(p, ns=(os.stat(p).st_mtime_ns + 10**9,) * 2)
    with pytest.raises(InputError, match="in.jsonl changed while the job was running"):
        list(src.rows())


def test_nesting_is_judged_the_same_in_every_run(tmp_path: Path) -> None:
    """json's own recursion limit depends on the call stack's depth at that moment; a line is
    refused by its own nesting instead, so the same line reads the same in every run."""
    import sys as _sys

    from batchgen.pipeline.source.jsonl import MAX_PARSE_DEPTH
    from batchgen.pipeline.source import open_source

    deep = MAX_PARSE_DEPTH + 1
    rows = [b'{"prompt": "ok", "other": ' + b"[" * (MAX_PARSE_DEPTH - 1) + b"]" * (MAX_PARSE_DEPTH - 1) + b"}",
            b'{"prompt": "no", "other": ' + b"[" * deep + b"]" * deep + b"}",
            b'{"prompt": "' + b"[" * 5000 + b'"}']  # brackets in a string are text
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(rows) + b"\n")

    def read(nested_calls: int) -> list[str | None]:
        if nested_calls:
            return read(nested_calls - 1)
        return [r.error for r in open_source(_cfg(tmp_path, "in.jsonl")).rows()]

    shallow, deeper = read(0), read(_sys.getrecursionlimit() - MAX_PARSE_DEPTH - 200)  # 600 frames more
    assert shallow == deeper
    assert shallow[0] is None and shallow[2] is None and "nested too deeply" in shallow[1]

"""Properties of the task partition (batchgen.pipeline.source) that array jobs rely on:
deterministic, balanced, stable across restarts, and the parts of all tasks together are
exactly the input (no row lost, none twice). No cluster needed."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.pipeline.config import parse_job
from batchgen.pipeline.source import open_source


def make_inputs(d: Path, sizes: list[int], kind: str) -> None:
    """Files of `sizes` rows each; every row carries its global index in column 'gid'."""
    g = 0
    for i, n in enumerate(sizes):
        rows = [{"gid": g + k, "prompt": f"row {g + k} " + "x" * ((g + k) % 7)} for k in range(n)]
        g += n
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("gid", pa.int64()), ("prompt", pa.string())])),
                           d / f"part-{i:03d}.parquet", row_group_size=3)
        else:
            with open(d / f"part-{i:03d}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
                    if r["gid"] % 5 == 0:
                        f.write("\n")  # blank lines are not rows


def cfg_for(d: Path, limit: int | None = None):
    inp = {"files": [str(d)], "columns": ["gid"]}
    if limit is not None:
        inp["limit"] = limit
    return parse_job({"model": {"path": "m"}, "input": inp, "prompt": {"column": "prompt"},
                      "output": {"path": str(d / "_out")}}, base_dir=d)


def task_rows(cfg, t: int, n: int, start: int = 0) -> list[tuple[int, int, int]]:
    src = open_source(cfg, t, n)
    return [(r.position, r.index, r.values["gid"]) for r in src.rows(start=start)]


CASES = [
    ([40], "jsonl"),               # one file, many tasks: row ranges
    ([7, 0, 13], "jsonl"),         # fewer files than tasks, an empty file
    ([10, 3, 25, 1, 9, 14], "parquet"),  # at least as many files as tasks: whole files
    ([5] * 8, "jsonl"),
    ([17, 2], "parquet"),
]


@pytest.mark.parametrize("sizes, kind", CASES)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("limit", [None, 11])
def test_partition_is_exact_stable_and_resumable(tmp_path, sizes, kind, num_tasks, limit):
    make_inputs(tmp_path, sizes, kind)
    cfg = cfg_for(tmp_path, limit)
    total = sum(sizes) if limit is None else min(sum(sizes), limit)
    seen: list[int] = []
    for t in range(num_tasks):
        rows = task_rows(cfg, t, num_tasks)
        src = open_source(cfg, t, num_tasks)
        # positions are 0..k-1; the index is the row's place in the whole input
        assert [p for p, _, _ in rows] == list(range(len(rows)))
        assert all(idx == gid for _, idx, gid in rows), rows
        if src.total is not None:
            assert src.total == len(rows)
        # stable: a second open (a restart) sees the same rows; a resume from k sees the tail
        assert task_rows(cfg, t, num_tasks) == rows
        for k in (0, 1, len(rows) // 2, len(rows), len(rows) + 3):
            assert task_rows(cfg, t, num_tasks, start=k) == rows[k:]
        seen += [gid for _, _, gid in rows]
    assert sorted(seen) == list(range(total))  # exactly the input: nothing lost, nothing twice


@pytest.mark.parametrize("num_tasks", [3, 4, 5])
def test_row_ranges_are_balanced(tmp_path, num_tasks):
    make_inputs(tmp_path, [23, 6], "jsonl")  # fewer files than tasks -> row ranges
    cfg = cfg_for(tmp_path)
    counts = [len(task_rows(cfg, t, num_tasks)) for t in range(num_tasks)]
    assert sum(counts) == 29 and max(counts) - min(counts) <= 1, counts


def test_whole_files_are_balanced_by_size(tmp_path):
    sizes = [30, 20, 20, 10, 10, 10, 5, 5, 5, 5]
    make_inputs(tmp_path, sizes, "parquet")
    cfg = cfg_for(tmp_path)
    srcs = [open_source(cfg, t, 3) for t in range(3)]
    files = [{Path(s.files[i].path).name for i, *_ in s.segments} for s in srcs]
    assert set().union(*files) == {f"part-{i:03d}.parquet" for i in range(len(sizes))}
    assert sum(len(f) for f in files) == len(sizes)  # each file belongs to exactly one task
    counts = [s.total for s in srcs]
    assert sum(counts) == sum(sizes)
    assert max(counts) <= 2 * min(counts), counts  # greedy by size: roughly balanced


def test_bad_task_ids(tmp_path):
    make_inputs(tmp_path, [3], "jsonl")
    cfg = cfg_for(tmp_path)
    with pytest.raises(ValueError):
        open_source(cfg, 2, 2)
    with pytest.raises(ValueError):
        open_source(cfg, -1, 2)


def _dataset_cfg(spec: str, base: Path, streaming: bool, limit: int | None = None):
    inp = {"dataset": spec, "streaming": streaming, "columns": ["gid"]}
    if limit is not None:
        inp["limit"] = limit
    return parse_job({"model": {"path": "m"}, "input": inp, "prompt": {"column": "prompt"},
                      "output": {"path": str(base / "_out")}}, base_dir=base)


@pytest.mark.parametrize("how", ["saved", "streaming"])
@pytest.mark.parametrize("limit", [None, 9])
def test_dataset_partition_is_exact(tmp_path, how, limit):
    datasets = pytest.importorskip("datasets")
    rows = [{"gid": i, "prompt": f"row {i}"} for i in range(23)]
    if how == "saved":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    else:
        (tmp_path / "ds").mkdir()
        with open(tmp_path / "ds" / "train.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = _dataset_cfg(str(tmp_path / "ds"), tmp_path, streaming=(how == "streaming"), limit=limit)
    total = 23 if limit is None else limit
    for n in (1, 3, 4):
        seen = []
        for t in range(n):
            got = task_rows(cfg, t, n)
            assert [p for p, _, _ in got] == list(range(len(got)))
            assert all(idx == gid for _, idx, gid in got)
            if got:
                assert task_rows(cfg, t, n, start=1) == got[1:]
            seen += [gid for *_, gid in got]
        assert sorted(seen) == list(range(total)), (n, seen)

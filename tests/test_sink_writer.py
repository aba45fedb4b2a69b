"""The sink package on its own: ShardWriter's progress count comes from its ledger, each module
imports alone (no import circle)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.pipeline.sink.columns import output_schema, row_stats
from batchgen.pipeline.sink.output_dir import OutputDir
from batchgen.pipeline.sink.shard_writer import ShardWriter
from batchgen.pipeline.sink.verify import verify_output

MODULES = ["files", "sink", "sink.layout", "sink.intervals", "sink.columns", "sink.shard_file", "sink.ledger",
           "sink.paths", "sink.manifest", "sink.locks", "sink.resume", "sink.output_dir", "sink.shard_writer",
           "sink.verify"]


def _row(i: int, error: str | None = None) -> dict:
    return {"id": i, "sample_index": 0, "completion": None if error else f"c{i}", "finish_reason": None if error
            else "stop", "prompt_tokens": 3, "completion_tokens": 0 if error else 2, "error": error}


def _writer(out: Path, retry: dict[int, str] | None = None) -> ShardWriter:
    od = OutputDir(out)
    od.prepare({"fingerprint": "f", "num_tasks": 1})
    led, _ = od.open_ledger("f")
    return ShardWriter(od, output_schema(pa.int64(), []), {"fingerprint": "f"}, rows_per_shard=2,
                       compression="none", flush_seconds=1e9, ledger=led, retry=retry)


def test_rows_committed_counts_this_runs_commits_and_rewrites(tmp_path: Path) -> None:
    out = tmp_path / "out"
    w = _writer(out)
    for i in range(5):
        rows = [_row(i, "boom" if i == 1 else None)]
        w.add(i, rows, row_stats([rows]))
        if w.due():
            w.flush(all_rows=False)
    assert w.rows_committed == 4 == sum(r.rows for r in w.ledger.records.values())
    w.flush()
    assert w.rows_committed == 5 == w.ledger.rows
    w.out.unlock()

    shard = next(n for n, r in w.ledger.records.items() if r.error_rows)
    w2 = _writer(out, retry={1: shard})
    assert w2.rows_committed == 0
    w2.add(1, [_row(1)], row_stats([[_row(1)]]))
    assert w2.due()
    w2.flush()
    assert w2.rewritten == 1 and w2.rows_committed == 1 and w2.ledger.rows == 5 and w2.ledger.error_rows == 0
    w2.out.unlock()
    assert verify_output(out) == []
    assert pq.read_table(out / shard).column("error").to_pylist() == [None, None]


@pytest.mark.parametrize("name", MODULES)
def test_each_module_imports_alone(name: str) -> None:
    subprocess.run([sys.executable, "-c", f"import batchgen.pipeline.{name}"], check=True)

"""`batchgen show`: rows printed readably, filters, JSON pretty-printing for JSON-constrained jobs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from batchgen.show import show_command


def write_shard(out: Path, name: str, rows: list[dict], sampling: dict) -> None:
    meta = {b"batchgen": json.dumps({"sampling": sampling}).encode()}
    table = pa.Table.from_pylist(rows).replace_schema_metadata(meta)
    pq.write_table(table, out / name)


def row(i: int, completion: str | None, reason: str = "stop", error: str | None = None) -> dict:
    return dict(id=i, sample_index=0, topic=f"topic {i}", completion=completion, finish_reason=reason,
                prompt_tokens=10, completion_tokens=5, error=error)


def test_show_prints_rows_filters_and_pretty_json(tmp_path: Path) -> None:
    write_shard(tmp_path, "part-t00000-000000.parquet",
                [row(1, '{"a": 1, "b": [1, 2]}'), row(2, None, "error", "prompt too long"), row(3, '{"a": 3}')],
                {"json_schema": {"type": "object"}})
    (tmp_path / ".part-t00000-000001.parquet.tmp").write_bytes(b"junk")  # not a shard: never read
    run = CliRunner().invoke
    r = run(show_command, [str(tmp_path), "--n", "2"])
    assert r.exit_code == 0, r.output
    assert "id 1 · sample 0 · stop · 10 prompt + 5 completion tokens" in r.output
    assert '"b": [\n' in r.output.replace("    ", "") or '"b": [' in r.output  # indented JSON
    assert "topic: topic 1" in r.output and "id 3" not in r.output  # --n 2
    r = run(show_command, [str(tmp_path), "--errors"])
    assert "prompt too long" in r.output and "id 1" not in r.output
    r = run(show_command, [str(tmp_path), "--id", "3"])
    assert "id 3" in r.output and "id 1 " not in r.output
    r = run(show_command, [str(tmp_path), "--id", "99"])
    assert r.exit_code == 0 and "no rows with id 99" in r.output


def test_show_plain_text_and_missing_output(tmp_path: Path) -> None:
    write_shard(tmp_path, "part-t00000-000000.parquet", [row(1, "line one\nline two")], {"temperature": 0.7})
    r = CliRunner().invoke(show_command, [str(tmp_path)])
    assert "  line one\n  line two" in r.output
    r = CliRunner().invoke(show_command, [str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no such output directory" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(show_command, [str(empty)])
    assert r.exit_code == 1 and "no committed shards yet" in r.output

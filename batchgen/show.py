"""`batchgen show OUT`: print a few output rows readably, to look at what a job produced.

Rows are read shard by shard (record batches, never the whole output), so showing five rows of a
100 GB output is instant. A job whose sampling had a JSON constraint gets its completions
pretty-printed as JSON.
"""
from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from .pipeline.sink.columns import OWN_COLUMNS  # anything else was copied from the input


def shard_paths(out: Path) -> list[Path]:
    """The committed shards, in task / sequence order (hidden temp files and .batchgen/ are not shards)."""
    return sorted(p for p in out.glob("part-t*-*.parquet") if p.is_file() and not p.is_symlink())


def _wants_json(shard: Path) -> bool:
    """Whether the job that wrote this shard constrained its completions to JSON (its footer's sampling)."""
    import pyarrow.parquet as pq

    raw = (pq.read_schema(shard).metadata or {}).get(b"batchgen")
    sampling = (json.loads(raw).get("sampling") or {}) if raw else {}
    return bool(sampling.get("json_schema") or sampling.get("json_object") or sampling.get("json_schema_column"))


def iter_rows(out: Path, ids: tuple[str, ...] = (), errors: bool = False) -> Iterator[tuple[dict[str, Any], bool]]:
    """(row, the job asked for JSON) for each output row matching the filters, shard by shard."""
    import pyarrow.parquet as pq

    for shard in shard_paths(out):
        as_json = _wants_json(shard)
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                if ids and str(row.get("id")) not in ids:
                    continue
                if errors and row.get("finish_reason") != "error" and row.get("error") is None:
                    continue
                yield row, as_json


def render_row(row: dict[str, Any], as_json: bool, width: int = 100) -> str:
    head = (f"── id {row.get('id')!r} · sample {row.get('sample_index')} · {row.get('finish_reason')} · "
            f"{row.get('prompt_tokens')} prompt + {row.get('completion_tokens')} completion tokens")
    lines = [head]
    for k, v in row.items():
        if k not in OWN_COLUMNS:
            lines.append(f"  {k}: {_short(v, width - len(k) - 4)}")
    if row.get("error") is not None:
        lines.append(f"  error: {row['error']}")
    if row.get("reasoning"):
        lines.append("  reasoning: " + _short(row["reasoning"], width - 13))
    text = row.get("completion")
    if text is not None:
        lines += ["  " + ln for ln in _pretty(text, as_json, width - 2).splitlines() or [""]]
    return "\n".join(lines)


def _pretty(text: str, as_json: bool, width: int) -> str:
    if as_json:
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass  # an incomplete ("length") completion: shown as it is
    return "\n".join(textwrap.fill(p, width, replace_whitespace=False) if p else "" for p in text.split("\n"))


def _short(v: Any, width: int) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    s = s.replace("\n", " ")
    return s if len(s) <= max(width, 20) else s[: max(width, 20) - 1] + "…"


@click.command("show")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=5, show_default=True, help="rows to show")
@click.option("--id", "ids", multiple=True, help="only rows with this id (repeatable)")
@click.option("--errors", is_flag=True, help="only rows that failed")
def show_command(out: Path, n: int, ids: tuple[str, ...], errors: bool) -> None:
    """Print N rows of the output directory OUT readably."""
    if not out.is_dir():
        raise click.ClickException(f"{out}: no such output directory")
    if not shard_paths(out):
        raise click.ClickException(f"{out}: no committed shards yet")
    shown = 0
    for row, as_json in iter_rows(out, ids, errors):
        click.echo(render_row(row, as_json))
        shown += 1
        if shown >= n:
            break
    if not shown:
        what = ("error rows" if errors else "rows") + (f" with id {', '.join(ids)}" if ids else "")
        click.echo(f"no {what} in {out}")

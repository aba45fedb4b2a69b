"""`batchgen status --verify`: an output directory checked against its manifest and its tasks'
ledgers, and the ids that more than one input row wrote."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ..files import LinkError, NotRegularError, OutputError, is_link
from .intervals import IntervalSet, fmt_range
from .layout import SHARD_RE
from .ledger import Ledger, LedgerFile, ShardRecord
from .paths import OutputPaths
from .shard_file import file_digest, read_shard_meta


def verify_output(out_dir: Path) -> list[str]:
    """Check an output directory against its manifest and its tasks' ledgers; one line per
    problem (none: every shard there is one a task committed, whole, each position once).
    Reads every shard once (sha256). For `batchgen status --verify`."""
    out = Path(out_dir)
    od = OutputPaths(out)
    problems: list[str] = []
    try:
        manifest, why = od.read_manifest()
    except LinkError as e:
        return [str(e)]
    if manifest is None:
        problems.append(f"{od.manifest_path} is {why}")
    names = [p.name for p in od.shard_files()]
    tasks_seen = {int(SHARD_RE.match(n).group(1)) for n in names}  # type: ignore[union-attr]
    num_tasks = manifest.get("num_tasks") if manifest else None
    if not isinstance(num_tasks, int) or num_tasks < 1:
        num_tasks = max(tasks_seen, default=-1) + 1
    generation = str((manifest or {}).get("generation") or "")
    known: set[str] = set()  # shards some task's ledger lists (a ledger may list another task's)
    for t in range(num_tasks):
        problems += _check_task(od, t, [n for n in names if int(n[6:11]) == t], generation, known)
    for n in names:
        t = int(n[6:11])
        if t >= num_tasks:
            problems.append(f"{out / n} is a shard of task {t}, but the output has {num_tasks} task(s)")
    return problems


def _check_task(od: OutputPaths, t: int, mine: list[str], generation: str, known: set[str]) -> list[str]:
    """Task t's problems: its ledger, the shards it lists (added to `known`), and its shards
    (`mine`) that no ledger lists."""
    out = od.path
    problems: list[str] = []
    lf = LedgerFile(out, od.ledger_path(t))
    try:
        recs = lf.read(strict=True)
    except OutputError as e:
        problems.append(str(e))
        try:
            recs = lf.read(strict=False)  # the records around a bad line
        except OutputError:  # nothing to read records from: a link, not a regular file, not in a folder
            return problems
    if recs is None:
        if mine:
            problems.append(f"task {t} has no ledger ({lf.path}): its {len(mine)} shard(s) can't be verified")
        return problems
    led = Ledger.from_records(recs)
    for rec in sorted(led.records.values(), key=lambda r: r.seq):
        problems += _check_record(out, rec, generation)
        known.add(rec.name)
    overlap = led.first_overlap()
    if overlap:
        problems.append(f"task {t}: {overlap} (duplicate positions)")
    held = led.done
    for n in mine:
        if n in known:
            continue
        line = f"{out / n} is not in task {t}'s ledger (not committed there by batchgen)"
        with contextlib.suppress(Exception):
            r = IntervalSet(read_shard_meta(out / n).get("positions", [])).overlap(held)
            if r is not None:
                line += f"; it repeats positions {fmt_range(r)} of task {t} (duplicate rows)"
        problems.append(line)
    return problems


def _check_record(out: Path, rec: ShardRecord, generation: str) -> list[str]:
    p = out / rec.name
    if rec.generation != generation:
        return [f"{p}: its ledger record is from another output at this path (generation {rec.generation or 'none'})"]
    if is_link(p):
        return [f"{p} is a symbolic link"]
    try:
        got: tuple[int, str] | None = file_digest(p)
    except FileNotFoundError:
        got = None
    except NotRegularError as e:
        return [str(e)]
    except OSError as e:
        return [f"{p} can't be read ({e.strerror or e})"]
    if got != (rec.bytes, rec.sha256):
        with contextlib.suppress(OSError, NotRegularError):
            if file_digest(out / f".{rec.name}.tmp") == (rec.bytes, rec.sha256):
                what = "commit" if got is None else "rewrite (--retry-errors; the old shard is still in place)"
                return [f"{p}: an interrupted {what}: its temp file holds the recorded shard; the next run of task "
                        f"{rec.task} finishes it"]
    if got is None:
        return [f"{p} is in the ledger but missing ({rec.rows:,} rows)"]
    size, sha = got
    if size != rec.bytes:
        return [f"{p} is {size:,} bytes, the ledger says {rec.bytes:,} (truncated or replaced)"]
    if sha != rec.sha256:
        return [f"{p}: bad checksum (sha256 {sha[:12]}..., the ledger says {rec.sha256[:12]}...)"]
    return []


def repeated_ids(shards: list[Path], examples: int = 3) -> tuple[int, list[Any]]:
    """Ids written by more than one input row (a row's first sample counts): (how many ids, a few
    of them). Reads only the id column, vectorised."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pds

    if not shards:
        return 0, []
    ids = pds.dataset([str(p) for p in shards], format="parquet").to_table(
        columns=["id"], filter=pc.field("sample_index") == 0).column("id")
    counts = pc.value_counts(pc.drop_null(ids))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    return len(repeated), repeated.slice(0, examples).to_pylist()

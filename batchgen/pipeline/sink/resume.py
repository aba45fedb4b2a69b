"""A task's ledger verified when it starts (or resumes): what it trusts is there, whole, and
nothing of it is there that it does not list. Without a ledger it is rebuilt from the footers."""
from __future__ import annotations

import contextlib
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from ..files import OutputError, fsync_dir, is_link, link_error, now_iso, replace_into, write_error
from .intervals import IntervalSet
from .layout import QUARANTINE_DIR, SHARD_RE
from .ledger import Ledger, LedgerFile, ShardRecord, first_overlap
from .paths import OutputPaths
from .shard_file import file_digest, read_shard_meta

Say = Callable[[str], None]
# a resume reads every committed byte: one thread hashes ~1.7 GB/s, a local NVMe disk or a parallel file system
# serves several times that to a few readers at once
HASH_THREADS = min(8, os.cpu_count() or 1)


def open_ledger(od: OutputPaths, fingerprint: str, say: Say) -> tuple[Ledger, int]:
    """The task's ledger, verified (see OutputDir.open_ledger); (ledger, temp shards removed)."""
    lf = od.ledger_file()
    recs = lf.read()
    if recs is None:
        recs = _records_from_footers(od, fingerprint, say)
        for r in recs:
            lf.append(r)
        if recs:
            say(f"note: {lf.path} was missing; rebuilt it from the footers of {len(recs)} shard(s)")
    led = Ledger.from_records(recs)
    stale = [r for r in led.records.values() if r.generation != od.generation]
    if stale:
        raise OutputError(f"{lf.path} lists {stale[0].name} of an earlier output at this path (generation "
                          f"{stale[0].generation or 'none'}): move the ledger away and rerun (it is rebuilt from "
                          "the shards' footers)")
    history: dict[str, list[ShardRecord]] = {}
    for r in recs:
        history.setdefault(r.name, []).append(r)
    in_order = sorted(led.records.values(), key=lambda r: r.seq)
    pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="batchgen-verify")
    try:  # the shards are read and hashed a few at once, checked one by one in commit order
        digests = [pool.submit(_digest_or_none, od.path / rec.name) for rec in in_order]
        for rec, digest in zip(in_order, digests):
            _verify(od, rec, history[rec.name], led, lf, say, digest)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a refusal does not wait for the rest to be hashed
    removed = od.clean_tmp()
    overlap = led.first_overlap()
    if overlap:
        raise OutputError(f"{lf.path}: {overlap}; move one of them out of {od.path} and its record out of the "
                          "ledger (or move the ledger away to rebuild it from the footers)")
    _refuse_foreign(od, led)
    for p in od.shard_files(od.task_id):
        led.next_seq = max(led.next_seq, int(SHARD_RE.match(p.name).group(2)) + 1)  # type: ignore[union-attr]
    return led, removed


def _digest_or_none(final: Path) -> tuple[int, str] | None:
    try:
        return file_digest(final)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"{final} can't be read to verify it ({e.strerror or e}): fix that and rerun") from None


def _finish_rename(od: OutputPaths, rec: ShardRecord, final: Path) -> bool:
    """Rename a recorded shard's temp file into place (its rename was interrupted); False when
    there is no temp file of the recorded size and sha256."""
    tmp = od.path / f".{rec.name}.tmp"
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(tmp).st_mode) and file_digest(tmp) == (rec.bytes, rec.sha256):
            try:
                replace_into(od.path, tmp, final)  # recorded, then interrupted before its rename
            except OSError as e:
                raise write_error(e, final) from None
            fsync_dir(od.path)
            return True
    return False


def _verify(od: OutputPaths, rec: ShardRecord, history: list[ShardRecord], led: Ledger, lf: LedgerFile,
            say: Say, digest: Future) -> None:
    """One recorded shard: kept when whole; else its rename finished, its earlier version kept,
    or it is retired (quarantined when corrupt) and its rows made again. digest: _digest_or_none of it, under way."""
    final = od.path / rec.name
    if is_link(final):  # before its digest is looked at: a link is refused as a link
        raise link_error(final)
    got = digest.result()
    if got == (rec.bytes, rec.sha256) or _finish_rename(od, rec, final):
        return
    earlier = next((h for h in reversed(history[:-1]) if h.kind != "retire" and (h.bytes, h.sha256) == got), None)
    if earlier is not None:  # a rewrite whose temp file is gone: the shard is as it was before it
        kept = ShardRecord(**{**asdict(earlier), "created": now_iso(), "note": "a rewrite was lost; kept as before"})
        lf.append(kept)
        led.put(kept)
        return
    if got is None:
        what = f"is listed in {lf.path} but missing"
    else:
        what = (f"is {got[0]:,} bytes, {rec.bytes:,} when committed" if got[0] != rec.bytes
                else "does not match its sha256 in the ledger (corrupted since it was committed)")
        od.quarantine(final)
        what += f"; moved it to {od.meta / QUARANTINE_DIR}/"
    lf.append(ShardRecord(rec.name, rec.task, rec.seq, kind="retire", generation=rec.generation,
                          created=now_iso(), note=what))
    led.put(ShardRecord(rec.name, rec.task, rec.seq, kind="retire"))
    say(f"warning: {final} {what}; its {rec.rows:,} row(s) will be generated again")


def _refuse_foreign(od: OutputPaths, led: Ledger) -> None:
    for p in od.shard_files():
        t = int(SHARD_RE.match(p.name).group(1))  # type: ignore[union-attr]
        if is_link(p):
            raise link_error(p)
        if t >= od.num_tasks:
            raise OutputError(f"{p} is a shard of task {t}, but this output has {od.num_tasks} task(s) "
                              f"(ids 0..{od.num_tasks - 1}); load_dataset would read it as part of this output: "
                              f"move it out of {od.path} and rerun")
        if t == od.task_id and p.name not in led.records:
            raise OutputError(f"{p} is not in task {t}'s ledger ({od.ledger_path()}): batchgen did not commit it "
                              "here (a copy, or a file of another output?), and load_dataset would read it as part "
                              f"of this output: move it out of {od.path} and rerun")


def _records_from_footers(od: OutputPaths, fingerprint: str, say: Say) -> list[ShardRecord]:
    """Ledger records for this task's shards from their footers (a ledger that is missing: an
    output of an older batchgen, or deleted). Refuses what the footers show is not this task's
    commit: another name, task, job or generation, or positions another shard holds."""
    recs: list[ShardRecord] = []
    for p in od.shard_files(od.task_id):
        if is_link(p):
            raise link_error(p)
        seq = int(SHARD_RE.match(p.name).group(2))  # type: ignore[union-attr]
        meta = _footer_of_mine(od, p, seq, fingerprint)
        positions = IntervalSet(meta.get("positions", [])).ranges()
        if meta.get("page_checksums"):
            try:
                pq.read_table(p, page_checksum_verification=True)
            except Exception as e:  # noqa: BLE001
                od.quarantine(p)
                say(f"warning: {p} is corrupt ({e}); moved it to {od.meta / QUARANTINE_DIR}/ and its rows "
                    "will be generated again")
                continue
        recs.append(_record_from_footer(od, p, seq, meta, positions))
    overlap = first_overlap((r.positions, r.name) for r in recs)
    if overlap:
        raise OutputError(f"{od.path}: {overlap} (a duplicate?): move one of them out of {od.path} and rerun")
    return recs


def _footer_of_mine(od: OutputPaths, p: Path, seq: int, fingerprint: str) -> dict:
    """The footer of shard `p`, refused unless it is this task's commit under this output."""
    try:
        meta = read_shard_meta(p)
    except Exception as e:  # noqa: BLE001
        raise OutputError(f"{p} can't be read ({e}); move it out of {od.path} and rerun: its rows "
                          "are generated again") from None
    move = f"move it out of {od.path} and rerun"
    if meta.get("task") != od.task_id or meta.get("seq") != seq:
        raise OutputError(f"{p}'s footer says it is shard {meta.get('seq')} of task {meta.get('task')}: a copy "
                          f"under another name? {move}")
    if meta.get("fingerprint") != fingerprint:
        raise OutputError(f"{p} was written by a different job; {move}")
    gen = str(meta.get("generation") or "")
    if gen != od.generation or meta.get("num_tasks", od.num_tasks) != od.num_tasks:
        raise OutputError(f"{p} was written by an earlier output at this path; {move}")
    return meta


def _record_from_footer(od: OutputPaths, p: Path, seq: int, meta: dict, positions: list[list[int]]) -> ShardRecord:
    size, sha = file_digest(p)
    return ShardRecord(
        p.name, od.task_id, seq, generation=str(meta.get("generation") or ""),
        positions=positions,
        error_positions=meta.get("error_positions", []) if meta.get("layout") == "sorted" else [],
        rows=int(meta.get("rows", 0)), samples=int(meta.get("samples", 0)), errors=int(meta.get("errors", 0)),
        error_rows=int(meta.get("error_rows", 0)), prompt_tokens=int(meta.get("prompt_tokens", 0)),
        completion_tokens=int(meta.get("completion_tokens", 0)), incomplete=int(meta.get("incomplete", 0)),
        bytes=size, sha256=sha,
        layout=str(meta.get("layout", "")), created=str(meta.get("created", "")), note="from its footer")

"""The input's identity (`Source.identity()`, stored in the output's manifest) and comparing it
on resume: every file's path, size, modification time and a content hash that reads a few KiB
(head, tail and blocks in between; a Parquet file's footer), the partition, and for datasets
their fingerprint, row count and arrow files. A changed input is refused; rows appended to the
last JSONL file are accepted when that provably moves no row (see `identity_change`)."""
from __future__ import annotations

import os
import time

from .files import content_hash

IDENTITY_VERSION = 2


def identity_change(old: dict, new: dict) -> str | None:
    """None when `new` (this run's Source.identity()) reads the same rows at the same positions as
    `old` (the one stored when the output was started), else one line naming what changed.

    New files that sort after all the old ones are accepted on the same terms as an append.
    Rows appended to the last JSONL file (not gzip) are the same input, provably: the file's
    first old-size bytes hash as before (content_hash: head, tail and blocks between), the old
    part ended with a line end (the old last line is whole), no other file changed, and the
    partition puts no old row elsewhere (one task; or whole files per task with the same owners;
    never row ranges, which the new row count moves). This reads a few KiB of that file."""
    if not old or not new:
        return None
    try:
        if old.get("version") != IDENTITY_VERSION:
            return _v1_change(old, new)
        if "files" in old and "dataset" not in old:
            return _files_change(old, new)
        return _dataset_change(old, new)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a manifest edited by hand, or garbled
        return f"the input it recorded can't be compared ({type(e).__name__}: {e})"


def _v1_change(old: dict, new: dict) -> str | None:
    """Outputs started by an older batchgen recorded paths (or the dataset) only: compare those.
    Their row ranges (several tasks over fewer files, or over a dataset) were cut from the rows
    under the limit of each run, which this one can't know: resuming them could move rows."""
    if new.get("partition", {}).get("mode") == "ranges":
        return ("it was started by an older batchgen, whose row ranges per task moved with input.limit, "
                "so its positions can't be checked; run with --overwrite to start it again")
    if "files" in old:
        paths = [f["path"] for f in new.get("files", [])] if "dataset" not in new else None
        return None if paths == old["files"] else _paths_change(old["files"], paths or [])
    part = {"ranges": "range", "modulo": "modulo"}.get(new.get("partition", {}).get("mode"))
    now = {"dataset": new.get("dataset"), **({"partition": part} if part else {})}
    diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]
    return None if not diff else "changed: " + ", ".join(f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in diff)


def _paths_change(old: list[str], new: list[str]) -> str:
    added = [p for p in new if p not in set(old)]
    removed = [p for p in old if p not in set(new)]
    parts = []
    if added:
        parts.append(f"{len(added)} file(s) added ({', '.join(added[:3])}{' ...' if len(added) > 3 else ''})")
    if removed:
        parts.append(f"{len(removed)} file(s) removed ({', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''})")
    return "; ".join(parts) or "the order of the input files changed"


def _fmt_time(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _entry_change(a: dict, b: dict) -> str | None:
    """What differs between two entries of one file (None: same size, time and content hash)."""
    what = []
    if a.get("size") != b.get("size"):
        what.append(f"size {a.get('size', 0):,} -> {b.get('size', 0):,} bytes")
    if a.get("sha") != b.get("sha") and a.get("size") == b.get("size"):
        what.append("content changed")
    if "mtime_ns" in a and a.get("mtime_ns") != b.get("mtime_ns"):
        what.append(f"modified {_fmt_time(a['mtime_ns'])} -> {_fmt_time(b.get('mtime_ns') or 0)}")
        if len(what) == 1:  # only the time: say how to put it back if the content really is the same
            sec, ns = divmod(int(a["mtime_ns"]), 10**9)
            what.append(f"size and sampled content are the same; if the file is unchanged, restore its time "
                        f"with: touch -d @{sec}.{ns:09d} {a['path']}")
    return ", ".join(what) or None


def _files_change(old: dict, new: dict) -> str | None:
    of, nf = old.get("files", []), new.get("files", [])
    op, np_ = [f["path"] for f in of], [f["path"] for f in nf]
    if np_[: len(op)] == op and len(np_) > len(op):  # files added after all the old ones
        return _added_files_problem(of, nf, old, new)
    if op != np_:
        return _paths_change(op, np_)
    changed = [(i, _entry_change(a, b)) for i, (a, b) in enumerate(zip(of, nf))]
    changed = [(i, c) for i, c in changed if c]
    if not changed:
        if old.get("partition") != new.get("partition"):
            return f"the partition changed: {old.get('partition')} -> {new.get('partition')}"
        return None
    i, what = changed[0]
    more = f" (and {len(changed) - 1} more file(s))" if len(changed) > 1 else ""
    if len(changed) == 1 and i == len(nf) - 1:
        unsafe = _append_problem(of[i], nf[i], old, new)
        if unsafe is None:
            return None
        if unsafe:
            return f"{nf[i]['path']}: rows were appended, but {unsafe}"
    return f"{nf[i]['path']}: {what}{more}"


def _added_files_problem(of: list[dict], nf: list[dict], old: dict, new: dict) -> str | None:
    """New files that sort after every old one only add rows at the end, like an append: None
    when the old files are unchanged and no old file moves to another task."""
    changed = [(a["path"], _entry_change(a, b)) for a, b in zip(of, nf)]
    changed = [(p, c) for p, c in changed if c]
    if changed:
        return f"{changed[0][0]}: {changed[0][1]}"
    added = f"{len(nf) - len(of)} file(s) added after the old ones ({nf[len(of)]['path']} ...)"
    po, pn = old.get("partition", {}), new.get("partition", {})
    if pn.get("mode") != po.get("mode") or pn.get("mode") == "ranges":
        return f"{added}, but the tasks split the rows into ranges, which the new row count moves"
    if pn.get("mode") == "files" and pn.get("owners", [])[: len(of)] != po.get("owners"):
        return f"{added}, but the tasks' files are balanced by size, and the new files move old ones to other tasks"
    return None


def _append_problem(a: dict, b: dict, old: dict, new: dict) -> str | None:
    """For the last file, grown: None when it is a safe append, "" when it is not an append at
    all (its old part changed), else why the appended rows would move rows."""
    path = b["path"]
    if not (b.get("size", 0) > a.get("size", 0) and path.lower().endswith((".jsonl", ".ndjson", ".json"))):
        return ""
    full = os.path.join(new.get("root") or ".", path)
    try:
        if content_hash(full, a["size"]) != a.get("sha"):
            return ""
        if a["size"]:
            with open(full, "rb") as fh:
                fh.seek(a["size"] - 1)
                if fh.read(1) != b"\n":
                    return "its old last line had no line end, so the appended text changed that row"
    except OSError:
        return ""
    po, pn = old.get("partition", {}), new.get("partition", {})
    if pn.get("mode") == "ranges" or po.get("mode") == "ranges":
        return ("the tasks split the rows into ranges, which the new row count moves "
                "(run with --overwrite, or put new rows in a new output)")
    if po != pn:
        return "the tasks' files are balanced by size, and the new size moves files to other tasks"
    return None


def _dataset_change(old: dict, new: dict) -> str | None:
    for key in ("dataset", "split", "fingerprint", "rows"):
        if old.get(key) != new.get(key):
            return f"the dataset's {key} changed: {old.get(key)!r} -> {new.get(key)!r}"
    of, nf = old.get("files", []), new.get("files", [])
    if [f["path"] for f in of] != [f["path"] for f in nf]:
        return "its files changed: " + _paths_change([f["path"] for f in of], [f["path"] for f in nf])
    for a, b in zip(of, nf):
        what = _entry_change(a, b)
        if what:
            return f"its file {b['path']}: {what}"
    if old.get("partition") != new.get("partition"):
        return f"the partition changed: {old.get('partition')} -> {new.get('partition')}"
    return None



"""The output's manifest (OUT/.batchgen/manifest.json): whose output this is, written once and
atomically, compared with a new run's, and rebuilt from the shards' footers when it is lost."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ..files import (FULL_ERRNOS, OutputError, check_no_links, discard, fsync_dir, is_link, link_error, make_dirs,
                     now_iso, open_new, write_error)
from .layout import FORMAT_VERSION
from .paths import OutputPaths
from .shard_file import read_shard_meta


def source_sha(source: Any) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_mismatch(old: dict, new: dict) -> str | None:
    """Why an output written under `old` can't be resumed by the job described by `new`, or None."""
    if old.get("fingerprint") == new.get("fingerprint"):
        if old.get("num_tasks") != new.get("num_tasks"):
            return (f"it was written with {old.get('num_tasks')} task(s), this run has {new.get('num_tasks')}; "
                    "rerun with the same --num-tasks")
        from ..source.identity import identity_change

        change = identity_change(old.get("source") or {}, new.get("source") or {})
        if change:
            return f"its input changed since it was started: {change}"
        return None
    changed = _diff(old.get("identity", {}), new.get("identity", {}))
    if changed:
        return "changed: " + ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
    return "its fingerprint differs"


def different_job(path: Any, problem: str) -> str:
    """What a run that finds another job's committed rows in its output says."""
    return (f"output {path} holds a different job ({problem}); pass --overwrite to replace it (its shards are "
            "deleted), or choose another output.path")


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if a != b:
        return [f"{prefix} {a!r} -> {b!r}" if len(repr(a)) + len(repr(b)) < 80 else prefix]
    return []


def write_manifest(od: OutputPaths, manifest: dict) -> dict:
    """Create the manifest, atomically; returns the one in force (an identical job's, when a task
    on a file system without locks created it first)."""
    make_dirs(od.path, od.meta)
    tmp = od.meta / f".manifest.json.{os.getpid()}.tmp"
    try:
        with open_new(od.path, tmp) as f:
            f.write((json.dumps(manifest, indent=2, default=str) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        check_no_links(od.path, od.manifest_path)
        try:
            os.link(tmp, od.manifest_path)  # atomic create: a task on a file system without locks may race us
        except FileExistsError:
            existing = od.manifest() or {}
            problem = manifest_mismatch(existing, manifest)
            if problem is not None:
                raise OutputError(f"output {od.path} was just created by a different job ({problem})") from None
            return existing
        except OSError as e:
            if e.errno in FULL_ERRNOS:
                raise
            os.replace(tmp, od.manifest_path)  # no hard links here: plain rename (same content)
    except OSError as e:
        raise write_error(e, od.manifest_path) from None
    finally:
        discard(tmp)
    fsync_dir(od.meta)
    return manifest


def manifest_from_shards(od: OutputPaths, new: dict, why: str) -> dict | None:
    """The manifest of this output rebuilt from its shards' footers when they are all this
    job's, with this task count, of one generation; None when they are another job's. Raises
    OutputError with what to do when it can't be told safely."""
    metas = []
    for p in od.shard_files():
        if is_link(p):
            raise link_error(p)
        try:
            metas.append(read_shard_meta(p))
        except Exception:  # noqa: BLE001 - not batchgen's, or unreadable: not this job's shards
            return None
    if any(m.get("fingerprint") != new.get("fingerprint") for m in metas):
        return None
    where = f"{od.manifest_path} is {why}"
    if any("num_tasks" not in m or "generation" not in m for m in metas):
        raise OutputError(f"{where}, and the shards (written by an older batchgen) don't record their task count, "
                          "so it can't be rebuilt safely: restore it from a backup, or move the shards out of "
                          f"{od.path} to start over")
    counts = {m["num_tasks"] for m in metas}
    gens = {m["generation"] for m in metas}
    if counts != {new.get("num_tasks")}:
        raise OutputError(f"{where}; its shards were written with {sorted(counts)} task(s), this run has "
                          f"{new.get('num_tasks')}: rerun with the same --num-tasks (the manifest is rebuilt)")
    if len(gens) > 1:
        raise OutputError(f"{where}, and its shards come from {len(gens)} different runs of this path: move the "
                          f"shards out of {od.path} (or restore the manifest from a backup)")
    src = source_sha(new.get("source"))
    if any(m.get("source_sha") not in (None, src) for m in metas):
        raise OutputError(f"{where}, and the input changed since the shards were written: restore the input (or "
                          "the manifest from a backup)")
    return {**new, "format": FORMAT_VERSION, "generation": gens.pop(), "rebuilt": now_iso()}

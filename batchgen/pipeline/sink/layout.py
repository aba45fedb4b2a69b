"""The names of an output directory's files (see the package docstring for the layout)."""
from __future__ import annotations

import re

from ..files import META_DIR

__all__ = ["META_DIR", "META_KEY", "SHARD_RE", "TMP_RE", "FORMAT_VERSION", "LEDGER_DIR", "PROGRESS_DIR", "LOCK_DIR",
           "QUARANTINE_DIR", "OWN_META", "shard_name"]

META_KEY = b"batchgen"  # the shard footer's metadata key
SHARD_RE = re.compile(r"^part-t(\d{5})-(\d{6})\.parquet$")
TMP_RE = re.compile(r"^\.part-t(\d{5})-(\d{6})\.parquet\.tmp$")
FORMAT_VERSION = 2  # 2: per-task ledgers, generation, sorted shards with page checksums
LEDGER_DIR, PROGRESS_DIR, LOCK_DIR, QUARANTINE_DIR = "ledger", "progress", "locks", "quarantine"

# batchgen's own files under OUT/.batchgen, by folder: the only ones clear() deletes there
OWN_META = {
    "": re.compile(r"^(manifest\.json(\.corrupt)?|summary(-t\d{5})?\.json"
                   r"|\.(manifest|summary(-t\d{5})?)(\.json)?\.\d+\.tmp)$"),
    PROGRESS_DIR: re.compile(r"^\.?task-\d{5}\.json(\.\d+\.tmp)?$"),
    LEDGER_DIR: re.compile(r"^task-\d{5}\.jsonl$"),
    QUARANTINE_DIR: re.compile(r"^part-t\d{5}-\d{6}\.parquet(\.\d+)?$"),
}


def shard_name(task: int, seq: int) -> str:
    return f"part-t{task:05d}-{seq:06d}.parquet"

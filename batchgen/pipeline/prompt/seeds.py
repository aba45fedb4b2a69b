"""The per-row sampling seed."""
from __future__ import annotations

import hashlib
from typing import Any


def row_seed(job_seed: int, row_id: Any) -> int:
    """The per-row sampling seed: a stable hash of (job seed, id); the engine derives sample j
    from (seed, j), so (job seed, id, sample_index) fixes each sample's random stream."""
    tag = "i" if isinstance(row_id, int) and not isinstance(row_id, bool) else "s"
    key = f"{job_seed}\0{tag}\0{row_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)

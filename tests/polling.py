"""Waiting on a subprocess's observed progress (never on a sleep sized for one machine)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any


def wait_for(cond: Any, proc: subprocess.Popen, log: Path | None = None, timeout: float = 300.0) -> bool:
    """Poll until cond() holds (True) or proc exits first (False). The timeout only catches a
    hang: it is far above what any machine needs; the log's tail goes into its message."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    tail = log.read_text(errors="replace")[-3000:] if log is not None else ""
    raise TimeoutError(f"condition not reached in {timeout:.0f} s\n{tail}")

"""Where things are in one output directory, as seen by one task, and the small reads and
clean-ups on them. OutputDir (output_dir.py) builds on this with prepare, locks and clear."""
from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

from ..files import (META_DIR, OutputError, check_no_links, fsync_dir, is_link, link_error, make_dirs,
                     not_regular_error, read_json, read_json_checked, write_error)
from .layout import LEDGER_DIR, OWN_META, PROGRESS_DIR, QUARANTINE_DIR, SHARD_RE, TMP_RE
from .ledger import LedgerFile


class OutputPaths:
    def __init__(self, path: str | os.PathLike[str], task_id: int = 0, num_tasks: int = 1) -> None:
        self.path = Path(path)
        self.meta = self.path / META_DIR
        self.task_id = task_id
        self.num_tasks = num_tasks
        self.generation = ""  # the manifest's, once prepare() ran: every commit checks it is still in force
        self._ledger: LedgerFile | None = None

    @property
    def manifest_path(self) -> Path:
        return self.meta / "manifest.json"

    def progress_path(self, task: int | None = None) -> Path:
        return self.meta / PROGRESS_DIR / f"task-{self.task_id if task is None else task:05d}.json"

    def summary_path(self, task: int | None = None) -> Path:
        if self.num_tasks == 1:
            return self.meta / "summary.json"
        return self.meta / f"summary-t{self.task_id if task is None else task:05d}.json"

    def ledger_path(self, task: int | None = None) -> Path:
        return self.meta / LEDGER_DIR / f"task-{self.task_id if task is None else task:05d}.jsonl"

    def ledger_file(self, task: int | None = None) -> LedgerFile:
        if task is None or task == self.task_id:
            if self._ledger is None:
                self._ledger = LedgerFile(self.path, self.ledger_path())
            return self._ledger
        return LedgerFile(self.path, self.ledger_path(task))

    def shard_files(self, task: int | None = None) -> list[Path]:
        if not self.path.is_dir():
            return []
        out = []
        for n in sorted(os.listdir(self.path)):
            m = SHARD_RE.match(n)
            if m and (task is None or int(m.group(1)) == task):
                out.append(self.path / n)
        return out

    def manifest(self) -> dict | None:
        data = read_json(self.manifest_path)
        return data if isinstance(data, dict) else None

    def read_manifest(self) -> tuple[dict | None, str | None]:
        """(manifest, None), or (None, why): "missing", "unreadable (...)", "a symbolic link"."""
        if is_link(self.meta):
            raise link_error(self.meta)
        data, why = read_json_checked(self.manifest_path)
        if why is None and not isinstance(data, dict):
            return None, "unreadable (not a JSON object)"
        if why == "a symbolic link":
            raise link_error(self.manifest_path)
        return data, why

    def has_committed_rows(self) -> bool:
        """Whether any task committed a shard here (a shard file, or a ledger with records)."""
        if self.shard_files():
            return True
        d = self.meta / LEDGER_DIR
        try:
            return any(os.lstat(d / n).st_size > 0 for n in os.listdir(d) if OWN_META[LEDGER_DIR].match(n))
        except OSError:
            return False

    def check_generation(self, generation: str) -> None:
        """Refuse to commit into an output that was cleared or replaced since this run started."""
        m = self.manifest()
        if m is None or str(m.get("generation") or "") != generation:
            raise OutputError(
                f"output {self.path} was replaced while this task ran (its manifest "
                + ("is gone" if m is None else "belongs to another run now") + ": --overwrite from another process "
                "on a file system without locks?); nothing more is written there: rerun this task to start over")

    def clean_tmp(self) -> int:
        """Delete this task's uncommitted temp shards (from a crash). Returns how many."""
        n = 0
        if not self.path.is_dir():
            return 0
        for name in os.listdir(self.path):
            m = TMP_RE.match(name)
            if m and int(m.group(1)) == self.task_id:
                p = self.path / name
                if is_link(p):
                    raise link_error(p)
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISDIR(os.lstat(p).st_mode):  # a folder by batchgen's temp name: never deleted
                        raise not_regular_error(p)
                    os.unlink(p)
                    n += 1
        return n

    def quarantine(self, p: Path) -> None:
        """Move a shard that failed verification out of the dataset, to .batchgen/quarantine/."""
        q = self.meta / QUARANTINE_DIR
        make_dirs(self.path, q)
        dst = q / p.name
        if os.path.lexists(dst):
            dst = q / f"{p.name}.{time.time_ns()}"
        check_no_links(self.path, dst)
        try:
            os.rename(p, dst)
        except OSError as e:
            raise write_error(e, dst) from None
        fsync_dir(self.path)
        fsync_dir(q)

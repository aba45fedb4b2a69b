"""OutputDir: one task's hold on an output directory. prepare() makes or checks the manifest and
holds the output shared; lock() makes this the task's only process; open_ledger() verifies what
the task committed before; clear() removes batchgen's files (to replace the output)."""
from __future__ import annotations

import contextlib
import os
import stat
import uuid
from typing import Callable

from ..files import META_DIR, OutputError, fsync_dir, is_link, link_error, make_dirs, replace_into
from .layout import FORMAT_VERSION, OWN_META, SHARD_RE, TMP_RE
from .ledger import Ledger
from .locks import OutputLocks
from .manifest import different_job, manifest_from_shards, manifest_mismatch, write_manifest
from .paths import OutputPaths
from .resume import open_ledger

Say = Callable[[str], None]


class OutputDir(OutputPaths):
    def __init__(self, path: str | os.PathLike[str], task_id: int = 0, num_tasks: int = 1) -> None:
        super().__init__(path, task_id, num_tasks)
        self.locks = OutputLocks(self.path, task_id)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.unlock()

    # setup
    def prepare(self, manifest: dict, overwrite: bool = False, say: Say | None = None) -> dict:
        """Create the manifest, or check that the existing one is this job's; then hold the output
        lock shared for as long as this object is locked (until unlock()). Returns the manifest in
        force. A different job's manifest is replaced only when no task of it is running, and
        only with `overwrite` once it has committed rows (a manifest without rows binds nothing)."""
        make_dirs(self.path, self.meta)
        say = say or (lambda m: None)
        # one task at a time: with --overwrite, a task that read the old manifest must not clear
        # what a faster task already wrote under the new one (it sees the new manifest instead)
        with self.locks.exclusive("prepare.lock"):
            m = self._prepare(dict(manifest), overwrite, say)
            self.generation = str(m.get("generation") or "")
            self.locks.hold_shared()
            return m

    def _prepare(self, new: dict, overwrite: bool, say: Say) -> dict:
        existing, why = self.read_manifest()
        committed = self.has_committed_rows()
        if existing is not None:
            problem = manifest_mismatch(existing, new)
            if problem is None:
                return existing
            if committed and not overwrite:
                raise OutputError(different_job(self.path, problem))
            self._replace_output()
            if not committed:
                say(f"note: {self.path} held a job that committed no rows ({problem}); replacing it")
        elif self.shard_files():  # rows are here: only their own footers may say whose they are
            rebuilt = manifest_from_shards(self, new, why or "missing")
            if rebuilt is not None:
                say(f"note: {self.manifest_path} was {why}; rebuilt it from the shards' footers (this job, "
                    f"{rebuilt['num_tasks']} task(s))")
                if why != "missing":
                    replace_into(self.path, self.manifest_path, self.meta / "manifest.json.corrupt")
                return write_manifest(self, rebuilt)
            if not overwrite:
                mf = f"no {META_DIR}/manifest.json" if why == "missing" else f"its {META_DIR}/manifest.json is {why}"
                raise OutputError(
                    f"output {self.path} holds part-*.parquet shards that are not this job's, and {mf}; "
                    "pass --overwrite to replace them (they are deleted), or choose another output.path")
            self._replace_output()
        elif why != "missing" or committed:  # no shard left: a manifest or ledger without rows binds nothing
            self._replace_output()
            say(f"note: {self.manifest_path} was {why} and no shard is here; starting the output again")
        new.setdefault("format", FORMAT_VERSION)
        new["generation"] = uuid.uuid4().hex  # this output's identity: a commit checks it is still in force
        return write_manifest(self, new)

    def _replace_output(self) -> None:
        """Clear the output for another job: only while no task of it runs (an exclusive hold of
        the output lock that every run holds shared), else refused naming the running tasks."""
        with self.locks.output_exclusive_now() as free:
            if not free:
                running = self.running_tasks()
                raise OutputError(
                    f"output {self.path} is in use: {', '.join(running) if running else 'another batchgen process'} "
                    "is running there, and a task writing the old job's shards would go on doing so: stop it or "
                    "let it finish, then rerun")
            self.clear()

    def running_tasks(self) -> list[str]:
        """'task N (pid P on host)' for every other task whose lock is held now."""
        return self.locks.running_tasks()

    def clear(self) -> None:
        """Remove what batchgen wrote here: shards, temp shards and its own files under .batchgen
        (by name); never another file, never a directory, never through a link (refused before
        anything is deleted)."""
        if not self.path.is_dir():
            return
        victims = [self.path / n for n in os.listdir(self.path) if SHARD_RE.match(n) or TMP_RE.match(n)]
        if is_link(self.meta):
            raise link_error(self.meta)
        for sub, rx in OWN_META.items():
            d = self.meta / sub if sub else self.meta
            if is_link(d):
                raise link_error(d)
            if d.is_dir():
                victims += [d / n for n in os.listdir(d) if rx.match(n)]
        for v in victims:
            st = os.lstat(v)
            if stat.S_ISLNK(st.st_mode):
                raise link_error(v)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{v} is not a regular file (batchgen writes only files by that name): move it away")
        victims.sort(key=lambda v: v == self.manifest_path)  # the manifest last: a clear cut short is redone
        for v in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(v)
        fsync_dir(self.path)
        fsync_dir(self.meta)

    def lock(self) -> None:
        """One process per task; raises OutputError when another one holds it."""
        self.locks.lock_task()

    def unlock(self) -> None:
        """Release the task lock, the shared output lock and the ledger."""
        if self._ledger is not None:
            self._ledger.close()
        self.locks.release()

    def open_ledger(self, fingerprint: str, say: Say | None = None) -> tuple[Ledger, int]:
        """This task's ledger, verified: every shard it lists is there at its recorded size and
        sha256 (an interrupted rename is finished; a corrupt shard is moved to .batchgen/quarantine/
        and a missing one retired, their rows to be generated again, each said in one line), and
        no shard of this task or of a task id past num_tasks is there without a record (refused:
        load_dataset would read it). Without a ledger it is rebuilt from the shards' footers.
        Returns (ledger, temp shards removed). Call after prepare()."""
        return open_ledger(self, fingerprint, say or (lambda m: None))

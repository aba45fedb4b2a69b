"""Shim for the issue-12 move: removed by the integrator.

batchgen.sink became batchgen.pipeline.files (JSON, fsync, link-safe file operations) and the
package batchgen.pipeline.sink; every name the old module had is re-exported here. Tests
monkeypatch names on this module (`sink.open_new`): a name set here is also set in the new
modules that use the same object, so the patch still reaches the shard writer."""
from __future__ import annotations

import os  # noqa: F401  (tests patch sink.os.fsync)
import sys
import types
from typing import Any

from .pipeline import files as _files
from .pipeline.files import (CLOEXEC as _CLOEXEC, FULL_ERRNOS as _FULL, META_DIR, NOFOLLOW as _NOFOLLOW,  # noqa: F401
                             DiskFullError, LinkError, OutputError, WriteError, _meta_root, check_no_links,
                             discard as _discard, fsync_dir, is_link as _is_link, link_error, make_dirs, now_iso,
                             open_new, read_json, read_json_checked, replace_into, write_error, write_json_atomic)
from .pipeline.sink import (columns as _columns, intervals as _intervals, layout as _layout, ledger as _ledger,
                            locks as _locks, manifest as _manifest, output_dir as _output_dir, paths as _paths,
                            resume as _resume, shard_file as _shard_file, shard_writer as _shard_writer,
                            verify as _verify)
from .pipeline.sink.columns import (_is_stringy, column_array as _column, column_value, output_schema,  # noqa: F401
                                    row_stats, rows_table, schema_from_b64, schema_to_b64, stringify)
from .pipeline.sink.intervals import IntervalSet, fmt_range as _fmt_range  # noqa: F401
from .pipeline.sink.layout import (FORMAT_VERSION, LEDGER_DIR, LOCK_DIR, META_KEY, OWN_META as _OWN_META,  # noqa: F401
                                   PROGRESS_DIR, QUARANTINE_DIR, SHARD_RE, TMP_RE, shard_name)
from .pipeline.sink.ledger import (COUNTERS as _COUNTERS, Ledger, LedgerFile, ShardRecord,  # noqa: F401
                                   _after_last_newline, first_overlap)
from .pipeline.sink.manifest import _diff, manifest_mismatch, source_sha  # noqa: F401
from .pipeline.sink.output_dir import OutputDir  # noqa: F401
from .pipeline.sink.shard_file import HashingWriter as _HashingWriter, file_digest, read_shard_meta  # noqa: F401
from .pipeline.sink.shard_writer import Record, ShardWriter  # noqa: F401
from .pipeline.sink.verify import _check_record, repeated_ids, verify_output  # noqa: F401

_HOMES = (_files, _layout, _intervals, _columns, _shard_file, _ledger, _paths, _manifest, _locks, _resume,
          _output_dir, _shard_writer, _verify)
_RENAMED = {"_is_link": "is_link", "_discard": "discard", "_column": "column_array", "_fmt_range": "fmt_range",
            "_HashingWriter": "HashingWriter", "_NOFOLLOW": "NOFOLLOW", "_CLOEXEC": "CLOEXEC", "_FULL": "FULL_ERRNOS",
            "_OWN_META": "OWN_META", "_COUNTERS": "COUNTERS"}
_MISSING = object()


class _ForwardingShim(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        old = self.__dict__.get(name, _MISSING)
        if old is not _MISSING:
            target = _RENAMED.get(name, name)
            for mod in _HOMES:
                if mod.__dict__.get(target, _MISSING) is old:
                    setattr(mod, target, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _ForwardingShim

"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.source import DatasetSource, FileSource, open_source  # noqa: F401
from .pipeline.source.base import ROW_ERROR, ROW_ORIGIN, InputError, RowError, RowOrigin, Source, SourceRow  # noqa: F401
from .pipeline.source.checks import (MAX_DEPTH, check_columns, check_id_type, id_problem,  # noqa: F401
                                     needed_columns, value_problem)
from .pipeline.source.files import content_hash, expand_files, parquet_footer  # noqa: F401
from .pipeline.source.identity import IDENTITY_VERSION, identity_change  # noqa: F401
from .pipeline.source.jsonl import MAX_PARSE_DEPTH, nesting, too_deep  # noqa: F401
from .pipeline.source.lines import MAX_LINE_BYTES  # noqa: F401

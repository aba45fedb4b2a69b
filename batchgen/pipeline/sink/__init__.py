"""Rows out: sharded Parquet, committed atomically; each task's ledger lists what it committed.

Layout of an output directory (everything but the shards is hidden, so
`datasets.load_dataset("parquet", data_dir=OUT)` and `pyarrow.dataset.dataset(OUT)` read only
the shards):

    OUT/part-t00000-000000.parquet          shards: task 0, sequence 0, ...
    OUT/.part-t00000-000001.parquet.tmp     a shard being written
    OUT/.batchgen/manifest.json             the job: fingerprint, config, schema, num_tasks, generation
    OUT/.batchgen/ledger/task-00000.jsonl   task 0's committed shards, one ShardRecord a line (append-only)
    OUT/.batchgen/progress/task-00000.json  per-task state, rows done, shards, tokens, tok/s
    OUT/.batchgen/summary.json              the summary of the finished job (per task: summary-t00000.json)
    OUT/.batchgen/locks/                    task-00000.lock: one process per task; output.lock: held
                                            shared by every run, exclusive to replace the output
    OUT/.batchgen/quarantine/               shards that failed verification, moved out of the dataset

A shard is committed by: write `.part-...tmp` (its sha256 computed while writing) -> fsync ->
append its ShardRecord to the task's ledger -> fsync -> rename to `part-...parquet` -> fsync the
directory. The ledger is the checkpoint: a run trusts only the shards its ledger lists, at the
recorded size and sha256 (checked on every start); a recorded shard whose rename did not happen
is renamed from its temp file. `--retry-errors` rewrites a shard in place by the same steps (a
"rewrite" record, then a rename over the old file: readers see the old or the new shard whole).

Modules, lowest first: layout (names), intervals (position sets), columns (the output row
schema), shard_file (footer, sha256), ledger (records and the task's ledger file), paths (the
output directory's places), manifest, locks, resume (a task's ledger verified on start),
output_dir (OutputDir: prepare, lock, clear), shard_writer (commits), verify (status --verify).
Link-safe file operations and JSON helpers live in batchgen.pipeline.files.
"""

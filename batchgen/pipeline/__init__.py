"""The job wing of batchgen, in the order data flows through it:

    config  -> the job file checked into a typed JobConfig
    source  -> rows from JSONL / Parquet / datasets, this task's share of them
    prompt  -> a row's prompt token ids and SamplingParams
    run     -> the run loop: top up the engine, step, turn outputs into rows, commit, stop
    sink    -> shards committed atomically, the task's ledger, the output directory

Nothing here imports from a later stage except run/, which ties them together.
"""

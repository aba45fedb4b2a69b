"""Peak RSS of the input -> prompt -> shard pipeline on a large Parquet input (a benchmark, not a test).

    .venv/bin/python benchmarks/input_rss.py                 # 1,000,000 rows
    .venv/bin/python benchmarks/input_rss.py --rows 200000 --chat-template

Writes a Parquet input of --rows rows (several files, 64k-row row groups), then runs the real
Job (sources, prompt rendering + tokenization, the ledger, the shard writer with fsync) with an
instant stand-in engine behind the push API the run loop drives (add / step / has_unfinished,
completion order != input order), so only the pipeline's own memory is measured. Prints RSS
samples through the run and the peak (ru_maxrss), as JSON on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_tokenizer() -> Any:
    """The tests' tiny BPE tokenizer with a ChatML template (tests/checkpoints.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import build_tokenizer as build

    return build()


class InstantEngine:
    """The engine's push API with no model: every step answers what was added, in reverse order of
    arrival (so the run loop maps outputs by their work item, not by order)."""

    def __init__(self, tokenizer: Any, max_num_seqs: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 4096
        self.max_num_seqs = max_num_seqs  # the loop keeps 3 x this many rows in the engine
        self.stats = None
        self.seen = 0
        self._added: list[Any] = []

    def add(self, requests: Iterable[Any]) -> list[Any]:
        reqs = list(requests)
        self._added += reqs
        return [r.request_id for r in reqs]

    def step(self) -> list[Any]:
        from batchgen.engine.request import CompletionOutput, RequestOutput

        done, self._added = self._added[::-1], []
        self.seen += len(done)
        text = "lorem ipsum dolor sit amet " * 6
        return [RequestOutput(r.request_id, r.prompt, [CompletionOutput(j, [7] * 48, f"completion: {text}", "length")
                                                        for j in range(r.params.n)]) for r in done]

    def has_unfinished(self) -> bool:
        return bool(self._added)

    def close(self) -> None:
        pass


def make_input(d: Path, rows: int, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    k = 0
    cats = ["science", "history", "art", "code", "math", "travel"]
    for fi in range(files):
        n = min(per, rows - k)
        if n <= 0:
            break
        w = pq.ParquetWriter(str(d / f"in-{fi:03d}.parquet"), pa.schema([("prompt", pa.string()), ("category", pa.string()),
                                                                          ("uid", pa.int64())]), compression="zstd")
        for a in range(0, n, 65536):
            b = min(n, a + 65536)
            w.write_table(pa.table({
                "prompt": [f"Summarize the following article number {k + i} about the history of science "
                           f"and art in one paragraph." for i in range(a, b)],
                "category": [cats[(k + i) % len(cats)] for i in range(a, b)],
                "uid": list(range(k + a, k + b)),
            }), row_group_size=65536)
        w.close()
        k += n


class ProbeEngine(InstantEngine):
    """The instant engine, sampling RSS into `samples` every `every` answered rows."""

    def __init__(self, tokenizer: Any, every: int, samples: list[tuple[int, float]]) -> None:
        super().__init__(tokenizer)
        self.every = every
        self.samples = samples

    def step(self) -> list[Any]:
        before = self.seen
        outs = super().step()
        if before // self.every != self.seen // self.every:
            self.samples.append((self.seen, round(rss_mb(), 1)))
        return outs


def parse_args() -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--rows-per-shard", type=int, default=10000)
    ap.add_argument("--chat-template", action="store_true", help="render every prompt through a chat template")
    ap.add_argument("--workdir", default=None, help="where input and output go (default: a temp dir, removed)")
    return ap.parse_args()


def make_job_config(args: argparse.Namespace, wd: Path) -> Any:
    """The job config: the Parquet input under wd/input, shards out to wd/out."""
    from batchgen.pipeline.config import parse_job

    return parse_job({
        "model": {"path": "stand-in"},
        "input": {"files": [str(wd / "input")], "columns": ["category"], "id_column": "uid"},
        "prompt": {"column": "prompt", "chat_template": bool(args.chat_template), "max_tokens": 512},
        "sampling": {"max_new_tokens": 64, "n": 1},
        "output": {"path": str(wd / "out"), "rows_per_shard": args.rows_per_shard, "flush_seconds": 30},
    }, where="input_rss", base_dir=wd)


def run_with_probe(cfg: Any, tok: Any, rows: int) -> tuple[float, list[tuple[int, float]], float]:
    """Run the Job on the probing stand-in engine; returns (RSS before the run, RSS samples, run seconds)."""
    from batchgen.pipeline.run.job import Job

    import gc

    gc.collect()
    base = rss_mb()
    samples: list[tuple[int, float]] = []
    eng = ProbeEngine(tok, max(rows // 20, 1), samples)
    t1 = time.time()
    code = Job(cfg, engine=eng, progress="log", log_every=30).run()
    t_run = time.time() - t1
    assert code == 0, code
    return base, samples, t_run


def count_output(wd: Path, rows: int) -> int:
    """The rows in the output shards under wd/out (asserted == rows)."""
    import pyarrow.dataset as pds

    n_out = pds.dataset(str(wd / "out"), format="parquet").count_rows()
    assert n_out == rows, (n_out, rows)
    return n_out


def report(args: argparse.Namespace, base: float, samples: list[tuple[int, float]], t_in: float, t_run: float,
           n_out: int) -> None:
    """Print the RSS samples, the summary line and the JSON result (last line)."""
    result = {
        "rows": args.rows, "input_files": args.files, "chat_template": bool(args.chat_template),
        "rss_before_run_mb": round(base, 1), "rss_samples_mb": samples, "peak_rss_mb": round(peak_mb(), 1),
        "input_write_s": round(t_in, 1), "run_s": round(t_run, 1), "rows_per_s": round(args.rows / t_run),
        "output_rows": n_out,
    }
    for i, r in samples:
        print(f"  after {i:>9,} rows: RSS {r:8.1f} MiB")
    print(f"rows {args.rows:,}: RSS before run {base:.1f} MiB, peak {peak_mb():.1f} MiB, "
          f"{args.rows / t_run:,.0f} rows/s")
    print(json.dumps(result))


def main() -> None:
    args = parse_args()
    # the pipeline (pyarrow with it) is imported up front, so input_write_s times only the writing
    import batchgen.pipeline.config  # noqa: F401
    import batchgen.pipeline.run.job  # noqa: F401

    tmp = tempfile.TemporaryDirectory(prefix="batchgen-rss-") if args.workdir is None else None
    wd = Path(args.workdir or tmp.name)  # type: ignore[union-attr]
    t0 = time.time()
    make_input(wd / "input", args.rows, args.files)
    t_in = time.time() - t0
    tok = build_tokenizer()
    cfg = make_job_config(args, wd)
    base, samples, t_run = run_with_probe(cfg, tok, args.rows)
    n_out = count_output(wd, args.rows)
    report(args, base, samples, t_in, t_run, n_out)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

"""Markdown table of the committed benchmark records (benchmarks/results/*.jsonl), for the README."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str = "benchmarks/results") -> None:
    rows = []  # (run, record): a run is one committed file; the anchor of a record is in the same run
    for f in sorted(Path(folder).glob("*.jsonl")):
        rows += [(f.stem, json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
    anchors = {(run, r["workload"]): r for run, r in rows if r["system"] == "transformers-cb"}
    print("| run | device | workload (shape) | system | overlap | output tok/s | vs transformers CB | GPU busy (decode) | decode step ms | host ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run, r in rows:
        a = anchors.get((run, r["workload"]))
        ratio = f"{r['output_tok_s'] / a['output_tok_s']:.2f}x" if a and r["system"] != "transformers-cb" else ""
        busy = r.get("decode_gpu_busy_fraction")
        print(f"| {run} | {r['device']} | {r['workload']} ({r['shape']}) | {r['system']} | "
              f"{'on' if r.get('overlap') else 'off'} | {r['output_tok_s']:,.0f} | {ratio} | "
              f"{'' if busy is None else f'{100 * busy:.2f}%'} | {r.get('mean_decode_step_ms') or ''} | "
              f"{r.get('host_ms_per_step') or ''} |")

if __name__ == "__main__":
    main(*sys.argv[1:])

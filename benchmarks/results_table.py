"""Markdown table of the committed benchmark records (benchmarks/results/*.jsonl), for the README.

    python benchmarks/results_table.py [folder]

One row per `batchgen bench` record; the ratio is against the transformers-cb record of the same
workload in the same file (one file = one run). Records of other scripts (n8_stress.py: no
"system") are skipped; an A/B record (gpu.sh ab) shows its variant after the system.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: str) -> list[tuple[str, dict]]:
    rows = []  # (run, record)
    for f in sorted(Path(folder).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if "system" in record:
                rows.append((f.stem, record))
    return rows


def main(folder: str = "benchmarks/results") -> None:
    rows = load(folder)
    anchors = {(run, r["workload"]): r for run, r in rows if r["system"] == "transformers-cb"}
    print("| run | device | workload (shape) | system | max seqs | overlap | output tok/s | vs transformers CB | GPU busy (decode) | decode step ms | host ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run, r in rows:
        a = anchors.get((run, r["workload"]))
        ratio = f"{r['output_tok_s'] / a['output_tok_s']:.2f}x" if a and r["system"] != "transformers-cb" else ""
        busy = r.get("decode_gpu_busy_fraction")
        system = r["system"] + (f" ({r['variant']})" if r.get("variant") else "")
        print(f"| {run} | {r['device']} | {r['workload']} ({r['shape']}) | {system} | {r.get('max_num_seqs') or ''} | "
              f"{'on' if r.get('overlap') else 'off'} | {r['output_tok_s']:,.0f} | {ratio} | "
              f"{'' if busy is None else f'{100 * busy:.2f}%'} | {r.get('mean_decode_step_ms') or ''} | "
              f"{r.get('host_ms_per_step') or ''} |")


if __name__ == "__main__":
    main(*sys.argv[1:])

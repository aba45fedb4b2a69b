"""The dataset card of a finished output: OUT/README.md with the Hugging Face YAML header, so the directory
can be uploaded as a dataset as it is (`huggingface-cli upload`), and `load_dataset(OUT)` finds the shards
through its `configs` entry. `load_dataset("parquet", data_dir=OUT)` still reads only the shards.

A README.md that batchgen did not write (no marker line) is left alone: the card is skipped, not forced.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..files import OutputError, open_regular

MARKER = "<!-- written by batchgen: rewritten when the job finishes again -->"


def render_card(name: str, footer: dict[str, Any], summary: dict[str, Any]) -> str:
    """The card text: YAML header (configs / data_files, tags), then what made the data and how much of it."""
    model = (footer.get("model") or {}).get("path", "?")
    header = "\n".join([
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        '    path: "part-*.parquet"',
        "tags:",
        "- synthetic",
        "- batchgen",
        "---",
    ])
    counts = {k: summary.get(k) for k in ("rows", "samples", "errors", "prompt_tokens", "output_tokens",
                                          "wall_s", "output_tok_s", "repeated_ids") if summary.get(k) is not None}
    body = [
        MARKER,
        f"# {name}",
        "",
        f"Generated offline with [batchgen](https://github.com/) {footer.get('batchgen_version', '')} "
        f"from the model `{model}`. One row per (input row, sample): `id`, `sample_index`, the copied input "
        "columns, `completion`, `finish_reason`, token counts and `error`.",
        "",
        "## Prompt",
        "```json",
        json.dumps(footer.get("prompt") or {}, indent=2, sort_keys=True, default=str),
        "```",
        "## Sampling",
        "```json",
        json.dumps(footer.get("sampling") or {}, indent=2, sort_keys=True, default=str),
        "```",
        "## Counts",
        "",
        "| what | value |",
        "|---|---|",
        *[f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in counts.items()],
        "",
    ]
    return header + "\n" + "\n".join(body)


def _ours_or_absent(path: Path) -> bool:
    """Whether README.md is missing or a regular file batchgen wrote (its marker near the top)."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            return MARKER in f.read(4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return True
    except (OSError, OutputError):  # not a regular file, a link, unreadable: not ours to replace
        return False


def write_card(out: Path, name: str, footer: dict[str, Any], summary: dict[str, Any]) -> Path | None:
    """Write OUT/README.md atomically (temp file, fsync, rename: never through a link); None when a README
    that is not batchgen's is there (a link, a FIFO or anything but a regular file counts as not batchgen's)."""
    path = out / "README.md"
    if path.is_symlink() or not _ours_or_absent(path):
        return None
    tmp = out / ".README.md.tmp"
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(tmp).st_mode):  # batchgen's own temp name: a link or FIFO there goes
            tmp.unlink()
    fd = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(render_card(name, footer, summary))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # replaces the directory entry itself: a link there would be replaced, not followed
    return path

"""The dataset card: a Hugging Face YAML header that `datasets` understands, never written over a README the
user wrote or through a link."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batchgen.pipeline.sink.card import MARKER, write_card

FOOTER = {"model": {"path": "models/x"}, "batchgen_version": "0.1.0", "prompt": {"column": "q"},
          "sampling": {"temperature": 0.7, "n": 2}}
SUMMARY = {"rows": 3, "samples": 6, "errors": 0, "output_tokens": 1234}


def shards(out: Path) -> None:
    for i in range(2):
        pq.write_table(pa.table({"id": [i], "sample_index": [0], "completion": [f"text {i}"]}),
                       out / f"part-t00000-{i:06d}.parquet")


def test_card_header_and_datasets_read_only_the_shards(tmp_path: Path) -> None:
    shards(tmp_path)
    path = write_card(tmp_path, "my-job", FOOTER, SUMMARY)
    text = path.read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["configs"][0]["data_files"][0] == {"split": "train", "path": "part-*.parquet"}
    assert MARKER in text and "models/x" in text and "| output_tokens | 1,234 |" in text
    assert not list(tmp_path.glob(".README*"))  # no temp file left
    datasets = pytest.importorskip("datasets")
    for ds in (datasets.load_dataset("parquet", data_dir=str(tmp_path), split="train"),
               datasets.load_dataset(str(tmp_path), split="train")):
        assert sorted(ds["completion"]) == ["text 0", "text 1"]
    again = write_card(tmp_path, "my-job", FOOTER, {**SUMMARY, "rows": 4})  # our own card is rewritten
    assert again == path and "| rows | 4 |" in path.read_text()


def test_a_users_readme_and_links_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# my notes\n")
    assert write_card(tmp_path, "j", FOOTER, SUMMARY) is None
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    other = tmp_path / "elsewhere.md"
    other.write_text("precious")
    link_dir = tmp_path / "linked"
    link_dir.mkdir()
    os.symlink(other, link_dir / "README.md")
    assert write_card(link_dir, "j", FOOTER, SUMMARY) is None
    assert other.read_text() == "precious"

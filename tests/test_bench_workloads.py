"""`batchgen bench`'s workloads: fixed, reproducible token-id prompts of the lengths each one names, and an
unknown workload refused by the CLI before anything loads."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from batchgen import bench


@pytest.mark.parametrize("name,n,isl,osl", [("seed", 32, 256, 1024), ("isl1000-osl1000", 2048, 1000, 1000),
                                            ("isl128-osl2048", 1024, 128, 2048)])
def test_fixed_workloads_have_their_lengths(name: str, n: int, isl: int, osl: int) -> None:
    prompts, new = bench.workload(name)
    assert len(prompts) == n and {len(p) for p in prompts} == {isl} and new == [osl] * n
    assert all(100 <= t < 100000 for p in prompts[:8] for t in p)
    assert bench.workload(name)[0] == prompts  # the same ids on every run
    assert bench.DEFAULT_SHAPE[name] == "llama-3.1-8b"


def test_nanovllm_workload_is_unchanged() -> None:
    prompts, new = bench.workload("nanovllm")
    assert len(prompts) == 256 and all(100 <= len(p) <= 1024 for p in prompts) and all(100 <= n <= 1024 for n in new)


def test_unknown_workload_is_refused() -> None:
    from batchgen.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--workload", "isl1-osl1"])
    assert result.exit_code == 2 and "isl1000-osl1000" in result.output

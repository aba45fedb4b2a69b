"""End-to-end tests on a real single-node Slurm cluster (tests/slurm_cluster.py).

Skipped, with the reason, where Slurm is not installed (CI installs it with
.ci/slurm-setup.sh and sets BATCHGEN_REQUIRE_SLURM=1 so that a missing Slurm fails).
"""
from __future__ import annotations

import time

try:
    from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
except ImportError:  # tests/ imported as a package
    from tests.slurm_cluster import slurm_cluster  # noqa: F401


def test_cluster_runs_an_array(slurm_cluster, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    job = slurm_cluster.sbatch(
        "--array=0-3", "-o", f"{out}/%A_%a.log",
        "--wrap", "echo task=$SLURM_ARRAY_TASK_ID count=$SLURM_ARRAY_TASK_COUNT restart=${SLURM_RESTART_COUNT:-0}",
    )
    states = slurm_cluster.wait_for_jobs([job], timeout=60)
    assert sorted(states.values()) == ["COMPLETED"] * 4, states
    lines = sorted(p.read_text().strip() for p in out.glob("*.log"))
    assert lines == [f"task={i} count=4 restart=0" for i in range(4)]

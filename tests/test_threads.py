"""CPU thread count (batchgen/engine/threads.py): explicit request > OMP_NUM_THREADS > the CPUs
this process may run on (its affinity mask)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchgen.engine import threads as th
from batchgen.engine.threads import apply_cpu_threads, cpu_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_explicit_request_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cpu_threads(3) == 3
    assert cpu_threads(1) == 1
    assert cpu_threads(64) == 64  # more than the machine has: asked for, so given


@pytest.mark.parametrize("bad", [0, -1, True, False, 1.5, "2", float("nan")])
def test_bad_request_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        cpu_threads(bad)  # type: ignore[arg-type]


@pytest.mark.usefixtures("no_omp")
def test_affinity_mask_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu_threads(None) == 2 and cpu_threads() == 2


@pytest.mark.usefixtures("no_omp")
def test_without_affinity_falls_back_to_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpu_threads(None) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undetermined"
    assert cpu_threads(None) == 1

    def denied(pid: int) -> set[int]:
        raise OSError("not permitted")

    monkeypatch.setattr(os, "sched_getaffinity", denied, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert cpu_threads(None) == 4


@pytest.mark.parametrize("omp, want", [("4", 4), (" 3 ", 3), ("4,2", 4), ("1", 1), ("12", 12)])
def test_omp_num_threads_is_respected(monkeypatch: pytest.MonkeyPatch, omp: str, want: int) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cpu_threads(None) == want


@pytest.mark.parametrize("omp", ["", "  ", "abc", "0", "-2", "1.5", ",4"])
def test_unusable_omp_num_threads_is_ignored(monkeypatch: pytest.MonkeyPatch, omp: str) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert cpu_threads(None) == 3


def test_apply_sets_torch_once_and_returns_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    calls: list[int] = []
    current = {"n": 7}
    monkeypatch.setattr(torch, "get_num_threads", lambda: current["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), current.update(n=n)))
    assert apply_cpu_threads(2) == 2 and calls == [2]
    assert apply_cpu_threads(2) == 2 and calls == [2]  # already 2: nothing to do
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert apply_cpu_threads(None) == 2 and calls == [2]  # no request: never above torch's current count
    current["n"] = 7
    assert apply_cpu_threads(None) == 3 and calls == [2, 3]
    with pytest.raises(ValueError):
        apply_cpu_threads(0)
    assert calls == [2, 3]


def test_apply_really_sets_torch() -> None:
    import torch

    prev = torch.get_num_threads()
    try:
        assert apply_cpu_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(prev)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_process_pinned_to_one_cpu_uses_one_thread() -> None:
    """A real process restricted (like a Slurm task or `taskset -c 0`) to one CPU, OMP_NUM_THREADS
    unset: one torch thread, whatever the machine's core count; unpinned: all of its CPUs."""
    code = (
        "import os, sys, torch\n"
        "from batchgen.engine.threads import apply_cpu_threads, cpu_threads\n"
        "full = len(os.sched_getaffinity(0))\n"
        "if sys.argv[1] == 'pin':\n"
        "    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "start = torch.get_num_threads()\n"
        "n = apply_cpu_threads(None)\n"
        "print(full, start, n, torch.get_num_threads(), cpu_threads(None), cpu_threads(2))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for mode in ("pin", "all"):
        r = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        full, start, n, torch_n, again, asked = map(int, r.stdout.split())
        want = 1 if mode == "pin" else full
        assert (again, asked) == (want, 2) and n == torch_n == min(start, want), (mode, r.stdout)
    # and OMP_NUM_THREADS, when set, is the default even when pinned
    r = subprocess.run([sys.executable, "-c", code, "pin"], capture_output=True, text=True,
                       env=env | {"OMP_NUM_THREADS": "2"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[1:5] == ["2", "2", "2", "2"], r.stdout


def test_module_imports_no_torch() -> None:
    """cpu_threads is usable where torch isn't loaded yet (torch is imported by apply only)."""
    r = subprocess.run([sys.executable, "-c", "import sys, batchgen.engine.threads as t; t.cpu_threads(None); "
                        "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    assert th.__all__ == ["cpu_threads", "apply_cpu_threads"]


def test_engine_applies_threads_on_the_cpu(tiny_checkpoint) -> None:
    """Engine(threads=N) sets torch to N; without it the engine keeps a lower count a caller chose."""
    import torch

    from batchgen import Engine

    path = tiny_checkpoint("llama")
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        eng = Engine(path, device="cpu", kv_cache_tokens=256)
        assert eng.threads == 1 and torch.get_num_threads() == 1
        eng.close()
        eng = Engine(path, device="cpu", kv_cache_tokens=256, threads=2)
        assert eng.threads == 2 and torch.get_num_threads() == 2
        eng.close()
    finally:
        torch.set_num_threads(prev)

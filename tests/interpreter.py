"""Run a test file's Triton kernel suite in Triton's CPU interpreter, in a subprocess (TRITON_INTERPRET is
read when triton is imported, so it cannot be switched on inside the pytest process)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The interpreter suites are the CPU stand-in for their files' CUDA tests: on a GPU host those run the
# kernels themselves (and the interpreter subprocess is not what is under test there).
interpreter_test = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
    reason="needs triton (its CPU interpreter) and no GPU (there the CUDA tests run the kernels)")


def run_interpreter_suite(test_file: str, ok_line: str) -> None:
    """`python test_file --interpret` with TRITON_INTERPRET=1 and no GPU; it must exit 0 and print ok_line."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, test_file, "--interpret"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert ok_line in proc.stdout

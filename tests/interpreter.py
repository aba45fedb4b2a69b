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


# The subprocess: the NumPy shim below, then the test file as __main__ with --interpret.
_RUN_SUITE = ("import runpy, sys, interpreter; interpreter.numpy_index_shim(); "
              "sys.argv = [sys.argv[1], '--interpret']; runpy.run_path(sys.argv[0], run_name='__main__')")


def numpy_index_shim() -> None:
    """Triton 3.6's interpreter holds a scalar kernel argument as a one-element 1-D array and takes int() of it
    where the kernel uses it as an index (`range(0, n, BLOCK)`); NumPy 2.4 refuses int() of a 1-D array. The
    same value through .item(), which takes any one-element array (the compiled kernels never run this)."""
    from triton.runtime import interpreter as triton_interpreter

    patch_tensor = getattr(triton_interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:  # another Triton: its interpreter as it is
        return

    def patched(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    triton_interpreter._patch_lang_tensor = patched


def run_interpreter_suite(test_file: str, ok_line: str) -> None:
    """`python test_file --interpret` with TRITON_INTERPRET=1 and no GPU (and numpy_index_shim); it must exit 0
    and print ok_line."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _RUN_SUITE, test_file], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert ok_line in proc.stdout

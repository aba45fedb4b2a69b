"""engine/switches.py: the one registry of environment switches, read once."""
from __future__ import annotations

import re
from pathlib import Path

from batchgen.engine import switches as S

ENGINE = Path(__file__).resolve().parents[1] / "batchgen" / "engine"


def test_defaults_and_parsing():
    d = S.Switches.from_env({})
    assert d == S.Switches() and d.pdl and d.fused_decode and d.skinny == ("qkv_proj", "gate_up_proj")
    assert d.skinny_prefetch == 256 and d.skinny_configs is None and not d.triton_interpret
    assert d.cache_dir == Path.home() / ".cache" / "batchgen"
    assert d.fp8_gemm_max_m == 1 << 30 and S.Switches.from_env({"BATCHGEN_FP8_GEMM_MAX_M": "64"}).fp8_gemm_max_m == 64
    s = S.Switches.from_env({"BATCHGEN_PDL": "0", "BATCHGEN_SKINNY": "o_proj,,down_proj", "BATCHGEN_FUSED_DECODE": "0",
                             "BATCHGEN_SKINNY_PREFETCH": "0", "BATCHGEN_SKINNY_CONFIGS": "/x.json",
                             "BATCHGEN_CACHE": "/tmp/c", "TRITON_INTERPRET": "1"})
    assert (s.pdl, s.fused_decode, s.skinny, s.skinny_prefetch) == (False, False, ("o_proj", "down_proj"), 0)
    assert (s.skinny_configs, s.cache_dir, s.triton_interpret) == ("/x.json", Path("/tmp/c"), True)
    assert S.Switches.from_env({"BATCHGEN_SKINNY": "0"}).skinny == ()
    assert S.Switches.from_env({"BATCHGEN_SKINNY": ""}).skinny == ()


def test_read_once_until_reload(monkeypatch):
    monkeypatch.setattr(S, "_CURRENT", None)
    monkeypatch.setenv("BATCHGEN_SKINNY_PREFETCH", "64")
    first = S.switches()
    monkeypatch.setenv("BATCHGEN_SKINNY_PREFETCH", "128")
    assert S.switches() is first and first.skinny_prefetch == 64
    assert S.reload().skinny_prefetch == 128 and S.switches().skinny_prefetch == 128


def test_no_environment_reads_outside_the_registry():
    """Only switches.py reads the environment (threads.py reads OMP_NUM_THREADS once, at engine start)."""
    for path in ENGINE.rglob("*.py"):
        if path.name in ("switches.py", "threads.py"):
            continue
        text = path.read_text()
        assert not re.search(r"os\.environ|os\.getenv", text), f"{path.relative_to(ENGINE)} reads the environment"
        assert "BATCHGEN_ROPE_KV" not in text and "BATCHGEN_DECODE=" not in text and "NORM_IN_GEMM" not in text

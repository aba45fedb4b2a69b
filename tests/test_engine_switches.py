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
    assert d.fp8_skinny_prefetch == 2 and S.Switches.from_env({"BATCHGEN_FP8_SKINNY_PREFETCH": "0"}).fp8_skinny_prefetch == 0
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


def test_bad_integer_switches_name_the_variable():
    for name, raw, says in (("BATCHGEN_FP8_DECODE_MAX_M", "abc", "must be an integer, got 'abc'"),
                            ("BATCHGEN_FP8_DECODE_MAX_M", "1e3", "must be an integer"),
                            ("BATCHGEN_FP8_DECODE_MAX_M", "300", "between 0 and 256, got 300"),
                            ("BATCHGEN_FP8_GEMM_MAX_M", "-1", ">= 0, got -1"),
                            ("BATCHGEN_SKINNY_PREFETCH", "nan", "must be an integer, got 'nan'"),
                            ("BATCHGEN_FP8_SKINNY_PREFETCH", "65", "between 0 and 64, got 65"),
                            ("BATCHGEN_FP8_SKINNY_PREFETCH", "-2", "between 0 and 64, got -2")):
        try:
            S.Switches.from_env({name: raw})
        except S.SwitchError as e:
            assert str(e).startswith(name) and says in str(e), str(e)
        else:
            raise AssertionError(f"{name}={raw!r} was accepted")
    assert S.Switches.from_env({"BATCHGEN_FP8_DECODE_MAX_M": " 32 "}).fp8_decode_max_m == 32
    assert S.Switches.from_env({"BATCHGEN_FP8_GEMM_MAX_M": ""}).fp8_gemm_max_m == 1 << 30


def test_swept_configs_file_keeps_fp8_and_16_bit_entries_apart(tmp_path):
    """BATCHGEN_SKINNY_CONFIGS: "K,N" entries are the 16-bit skinny GEMM's, "fp8:K,N" the FP8 decode GEMM's; a bad
    FP8 entry is refused with the file named."""
    import json

    import pytest

    from batchgen.engine.models.linear_layout import skinny_config
    from batchgen.engine.quant.fp8_linear import swept_decode_config

    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"fp8:4096,6144": [64, 128, 2, 4, 6], "4096,4096": [64, 256, 2, 8, 4]}))
    sw = S.Switches.from_env({"BATCHGEN_SKINNY_CONFIGS": str(path), "BATCHGEN_SKINNY": "qkv_proj,o_proj"})
    assert swept_decode_config(sw, 4096, 6144) == (64, 128, 2, 4, 6)
    assert swept_decode_config(sw, 4096, 4096) is None  # the 16-bit entry is not the FP8 kernel's
    assert skinny_config("o_proj", 4096, 4096, sw) == (64, 256, 2, 8, 4)
    assert skinny_config("qkv_proj", 4096, 6144, sw) != (64, 128, 2, 4, 6)  # nor the FP8 entry the 16-bit one's
    assert swept_decode_config(S.Switches.from_env({}), 4096, 6144) is None
    for bad, says in (([64, 128, 2, 4], "not 5 positive integers"), ([64, 64, 2, 4, 4], "BK .* must be 128")):
        path.write_text(json.dumps({"fp8:4096,6144": bad}))
        with pytest.raises(ValueError, match=rf"BATCHGEN_SKINNY_CONFIGS=.*configs\.json: entry 'fp8:4096,6144' .*{says}"):
            swept_decode_config(sw, 4096, 6144)


def test_cli_refuses_a_bad_switch_in_one_line(tmp_path):
    """Every command checks the switches first: exit 2 and one line, before a job file is even read."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "BATCHGEN_SKINNY_PREFETCH": "lots"}
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(tmp_path / "job.yaml")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: BATCHGEN_SKINNY_PREFETCH must be an integer, got 'lots'", r.stderr

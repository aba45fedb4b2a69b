"""Every environment switch the engine reads, in one typed registry read once.

`switches()` builds a frozen `Switches` from the environment on its first call and returns that
same object afterwards, so no kernel launch or layer looks at os.environ. Tests and benchmarks
that change a variable in-process call `reload()` (then re-create what read the old values: an
Engine reads its switches when it is built). Standard library only: job config code may import it.
The README's "Switches" section lists them for users.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SKINNY = ("qkv_proj", "gate_up_proj")


class SwitchError(ValueError):
    """An environment switch with a value the engine can't use; the message names the variable."""


def _int_switch(env: Mapping[str, str], name: str, default: int, lo: int, hi: int | None = None) -> int:
    """env[name] as an integer in [lo, hi] (absent or empty: default); SwitchError names the variable."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SwitchError(f"{name} must be an integer, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise SwitchError(f"{name} must be {bound}, got {value}")
    return value


@dataclass(frozen=True)
class Switches:
    pdl: bool = True  # BATCHGEN_PDL=0: no programmatic dependent launch (ablation; off before sm_90 anyway)
    skinny: tuple[str, ...] = DEFAULT_SKINNY  # BATCHGEN_SKINNY: projections on the Triton skinny GEMM ("0": none)
    skinny_configs: str | None = None  # BATCHGEN_SKINNY_CONFIGS: JSON file of swept configs {"K,N": [5 ints]}
    # (FP8 decode GEMMs: keys "fp8:K,N")
    skinny_prefetch: int = 256  # BATCHGEN_SKINNY_PREFETCH: weight rows each skinny GEMM program prefetches (0 = off)
    fused_decode: bool = True  # BATCHGEN_FUSED_DECODE=0: decode steps take the unfused layer path (ablation)
    fp8_skinny: bool = True  # BATCHGEN_FP8_SKINNY=0: every FP8 GEMM on torch._scaled_mm, neither Triton kernel
    fp8_decode_act: str = "fp8"  # BATCHGEN_FP8_DECODE_ACT: bf16 = W8A16 decode GEMMs (x not quantized), fp8 = W8A8
    fp8_skinny_prefetch: int = 2  # BATCHGEN_FP8_SKINNY_PREFETCH: 128-byte lines of each weight row an FP8 decode GEMM
    # program pulls into L2 before its PDL wait (0 = off)
    fp8_decode_max_m: int = 64  # BATCHGEN_FP8_DECODE_MAX_M: largest step (tokens, <= 256) on the FP8 decode GEMM
    fp8_gemm_max_m: int = 1 << 30  # BATCHGEN_FP8_GEMM_MAX_M: larger FP8 steps on torch._scaled_mm, not kernels/fp8_gemm.py
    tp_timeout: str = ""  # BATCHGEN_TP_TIMEOUT: seconds a tensor-parallel group's init / collective waits (parallel/group.py)
    cache_dir: Path = Path.home() / ".cache" / "batchgen"  # BATCHGEN_CACHE: where GGUF checkpoints are converted to
    triton_interpret: bool = False  # TRITON_INTERPRET=1: Triton's CPU interpreter (tests); CPU tensors take Triton ops

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Switches":
        """SwitchError for a value that can't be used (a non-integer count, a negative row count)."""
        skinny = env.get("BATCHGEN_SKINNY")
        return cls(
            pdl=env.get("BATCHGEN_PDL", "1") != "0",
            skinny=DEFAULT_SKINNY if skinny is None else tuple(p for p in skinny.split(",") if p and p != "0"),
            skinny_configs=env.get("BATCHGEN_SKINNY_CONFIGS") or None,
            skinny_prefetch=_int_switch(env, "BATCHGEN_SKINNY_PREFETCH", 256, 0),
            fused_decode=env.get("BATCHGEN_FUSED_DECODE", "1") != "0",
            fp8_skinny=env.get("BATCHGEN_FP8_SKINNY", "1") != "0",
            fp8_decode_act="bf16" if env.get("BATCHGEN_FP8_DECODE_ACT") == "bf16" else "fp8",
            fp8_skinny_prefetch=_int_switch(env, "BATCHGEN_FP8_SKINNY_PREFETCH", 2, 0, 64),
            fp8_decode_max_m=_int_switch(env, "BATCHGEN_FP8_DECODE_MAX_M", 64, 0, 256),
            fp8_gemm_max_m=_int_switch(env, "BATCHGEN_FP8_GEMM_MAX_M", 1 << 30, 0),
            tp_timeout=env.get("BATCHGEN_TP_TIMEOUT", "").strip(),
            cache_dir=Path(env["BATCHGEN_CACHE"]).expanduser() if env.get("BATCHGEN_CACHE") else cls.cache_dir,
            triton_interpret=env.get("TRITON_INTERPRET") == "1",
        )


_CURRENT: Switches | None = None


def switches() -> Switches:
    """The process's switches, read from the environment on first use."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = Switches.from_env()
    return _CURRENT


def reload() -> Switches:
    """Read the environment again (tests and benchmarks that set a variable in-process)."""
    global _CURRENT
    _CURRENT = Switches.from_env()
    return _CURRENT


def disable_nvlink_multicast() -> None:
    """NCCL_NVLS_ENABLE=0 for this process, before a NCCL group starts: never NVLink multicast (SHARP) here.
    The one place the engine writes the environment."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"

"""What the paged decode attention kernel compiles to on Hopper, without a GPU: registers, spills, shared
memory, whether its K/V loads are vectorised and pipelined (cp.async), and its conversion / MMA counts.

    python benchmarks/decode_ptx.py --kv fp8 --block-n 128 --warps 4 --stages 2 [--maxnreg 168]

Needs the triton package (its wheel carries ptxas and cuobjdump); compiles for sm_90a on any machine. The
integer and pointer arguments are given Triton's divisible-by-16 specialization, as a real launch on the
engine's caches gets: without it the K/V loads compile to single bytes and the report means nothing.
Device time is scarce; this answers "does this config spill / pipeline / fit" before spending any.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compile_decode(kv: str, block_n: int, warps: int, stages: int, maxnreg: int | None, fp8_dot_f16: bool,
                   heads: int = 32, kv_heads: int = 8, head_dim: int = 128):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from batchgen.engine.attention.triton_kernels import decode

    cache = {"fp8": "fp8e4nv", "bf16": "bf16", "fp16": "fp16"}[kv]
    sig = {"q_ptr": "*bf16", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}", "block_tables_ptr": "*i32",
           "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
           "part_lse_ptr": "*fp32", "sem_ptr": "*i32", "scale_log2": "fp32", "v_scale": "fp32", "window": "i32",
           "cap_log2": "fp32"}
    sig.update({f"stride_{n}": "i32" for n in ("qt", "qh", "ot", "oh", "kb", "kt", "kh", "vb", "vt", "vh", "bt")})
    g = heads // kv_heads
    consts = dict(G=g, G_PAD=max(16, triton.next_power_of_2(g)), HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_N=block_n,
                  NUM_SPLITS=1, USE_WINDOW=False, DOT_PREC="tf32", KV_FP8=kv == "fp8",
                  FP8_DOT_F16=kv == "fp8" and fp8_dot_f16, SOFTCAP=False, USE_PDL=True)
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n.startswith("stride_")}
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=decode._decode_split_kernel, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def report(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    count = lambda pat: len(re.findall(pat, ptx))  # noqa: E731
    out = {"shared_bytes": kernel.metadata.shared,
           "global_loads": sorted(set(re.findall(r"ld\.global[.a-z0-9]*", ptx))),
           "cp_async": count(r"cp\.async"), "cvt_e4m3_to_f16x2": count(r"cvt\.rn\.f16x2\.e4m3x2"),
           "mma_sync": count(r"mma\.sync"), "wgmma": count(r"wgmma\.mma_async"), "ex2": count(r"ex2\.approx")}
    cuobjdump = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(kernel.asm["cubin"])
        res = subprocess.run([str(cuobjdump), "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    if m:
        out["registers"], out["stack_bytes"] = int(m.group(1)), int(m.group(2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv", default="fp8", choices=["fp8", "bf16", "fp16"])
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--bf16-dots", action="store_true", help="FP8 cache: dots in bf16 (FP8_DOT_F16 off)")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("decode_ptx.py compiles for the GPU: unset TRITON_INTERPRET")
    k = compile_decode(a.kv, a.block_n, a.warps, a.stages, a.maxnreg, not a.bf16_dots)
    print({"kv": a.kv, "block_n": a.block_n, "warps": a.warps, "stages": a.stages, "maxnreg": a.maxnreg, **report(k)})


if __name__ == "__main__":
    main()

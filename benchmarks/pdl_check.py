"""Does programmatic dependent launch take effect inside a CUDA graph here, and does it shorten a
decode-like kernel chain? Times (a) a chain of tiny dependent Triton kernels and (b) 32 x
[rms_norm -> qkv-shaped skinny GEMM] with BATCHGEN_PDL on/off and the GEMM's L2 prefetch. JSON lines.
The switches are read once (engine/switches.py): each setting sets the variables and reloads them."""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from gemm_sweep import graph_us  # same folder: run as python benchmarks/pdl_check.py


@triton.jit
def _tiny(x_ptr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.arange(0, 128)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)


def main() -> None:
    x = torch.zeros(128, device="cuda")
    for pdl in (False, True):
        extra = {"launch_pdl": True} if pdl else {}

        def chain():
            for _ in range(200):
                _tiny[(4,)](x, USE_PDL=pdl, **extra)
        print(json.dumps({"test": "tiny chain", "pdl": pdl, "us_per_kernel": round(graph_us(chain, 200), 3)}), flush=True)
    K, N, layers = 4096, 6144, 32
    ws = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(layers)]
    nw = torch.ones(K, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(32, K, device="cuda", dtype=torch.bfloat16)
    for pdl, pf in (("0", 0), ("1", 0), ("1", 256), ("1", 1024), ("1", 4096)):
        os.environ["BATCHGEN_PDL"], os.environ["BATCHGEN_SKINNY_PREFETCH"] = pdl, str(pf)
        from batchgen.engine import switches
        from batchgen.engine.kernels import fused, skinny_gemm
        switches.reload()

        def layers_fn():
            for w in ws:
                skinny_gemm.skinny_gemm(fused.rms_norm(h, nw, 1e-5, None, torch.bfloat16), w,
                                        config=(64, 128, 1, 4, 5))
        print(json.dumps({"test": "rms_norm+qkv x32", "pdl": pdl, "prefetch": pf,
                          "us_per_layer": round(graph_us(layers_fn, layers), 2)}), flush=True)

        def cublas_fn():
            for w in ws:
                fused.rms_norm(h, nw, 1e-5, None, torch.bfloat16) @ w
        if pf == 0:
            print(json.dumps({"test": "rms_norm+cublas x32", "pdl": pdl,
                              "us_per_layer": round(graph_us(cublas_fn, layers), 2)}), flush=True)


if __name__ == "__main__":
    main()

"""Triton kernels that are not attention (imported only where `triton` is installed).

- fused: RMSNorm (+ residual add), SiLU-and-mul, RoPE; behind batchgen.engine.fused_ops.
- skinny_gemm: decode-size projections (x @ W for at most MAX_M rows), with gated / residual epilogues.
- pdl: programmatic dependent launch options (Hopper+), shared by every kernel here and in attention.
- counters: zeroed int32 counters for kernels whose last program merges the others' partials.
"""

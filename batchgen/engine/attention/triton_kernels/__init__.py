"""Triton kernels for the paged KV cache (imported only where `triton` is installed).

- cache_ops.write_kv: scatter the step's new K/V rows into the paged caches (slot -1 = skip);
  cache_ops.rope_write_kv: the same with RoPE applied on the way (q rotated in place).
- decode.paged_decode: one query token per sequence, split over the KV length (flash-decoding).
- prefill.paged_prefill: varlen queries (prefill chunks and mixed steps) over block tables.

Kernels that are not attention (GEMM, norms, PDL, counters) live in batchgen.engine.kernels.
"""

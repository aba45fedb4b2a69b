"""The engine on a real model: SmolLM2-135M-Instruct greedy completions equal transformers' generate."""
from __future__ import annotations

from pathlib import Path

import pytest

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does.",
    "Translate 'good morning' into Spanish.",
    "What is 12 plus 30?",
    "Give me a name for a friendly robot.",
    "Why is the sky blue? Answer briefly.",
]
MAX_NEW = 32


@pytest.mark.slow
def test_greedy_matches_transformers(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from batchgen import Engine, SamplingParams

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompts: list[list[int]] = []
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        prompts.append(tok(text, add_special_tokens=False).input_ids)

    # reference: transformers, one prompt at a time (no padding), greedy, same float32 weights
    ref_model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    expected: list[list[int]] = []
    with torch.inference_mode():
        for ids in prompts:
            out = ref_model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False)
            expected.append(out[0, len(ids):].tolist())
    del ref_model

    engine = Engine.from_pretrained("smollm2-135m-instruct", device="cpu", dtype="float32")
    try:
        assert engine.eos_token_ids == [2]  # <|im_end|> survived the GGUF conversion
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))
    finally:
        engine.close()

    assert len(outs) == len(prompts)
    for i, (out, want) in enumerate(zip(outs, expected)):
        assert out.error is None, out.error
        got = out.outputs[0]
        assert got.token_ids == want, (
            f"prompt {i} {PROMPTS[i]!r}:\n engine: {tok.decode(got.token_ids)!r}\n hf:     {tok.decode(want)!r}"
        )
        assert got.finish_reason == ("stop" if want[-1] == 2 else "length")
    # the model is real: the first answer mentions Paris
    assert "Paris" in outs[0].outputs[0].text

"""Tiny random-weight checkpoints for the tests and the CPU benchmarks: the one builder.

Each checkpoint is a real Hugging Face directory (config.json, model.safetensors, tokenizer,
generation_config.json) built offline in a few hundred ms, so engine tests can compare against
transformers on exactly the same weights (the reference is computed in the same run: nothing
compares against stored tokens, so the weights only need to be the same within one run).

    build_checkpoint("qwen3", out, seed=0)        # conftest's tiny_checkpoint fixture
    make_tiny_checkpoint("llama", path)           # the same, small init: the CUDA tests' checkpoints
    build_tokenizer()                             # the byte-level BPE tokenizer they all ship

Used by tests/conftest.py, tests/reference.py and benchmarks/host_step.py / input_rss.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
EOS_ID = 2  # <|im_end|>, as in SmolLM2 / ChatML models
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a little English + code + digits, so the BPE vocabulary has real merges and any text encodes
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "What is the capital of France? The capital of France is Paris.",
    "Write a short poem about the sea, the sky and the wind.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "Once upon a time there was a little robot who wanted to learn how to paint.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 2026",
    "Summarize the following text in one sentence: batch generation with large language models.",
    "Hello, world! How are you today? I am fine, thank you. Stop. END. ###",
    "user assistant system question answer translate explain list count",
]
_VOCAB_SIZE = 1024

# hidden 64, 2 layers, 4 q heads / 2 kv heads (head_dim 16), intermediate 128;
# large init so logits are not near-ties (the CPU float32 tests)
_BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.3,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=EOS_ID,
    pad_token_id=0,
)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    # llama3 rope scaling with a small original context so it changes prompts of a few hundred tokens
    "llama3.1": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(model_type="mistral", rope_theta=1000000.0, sliding_window=None),
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, use_sliding_window=False),  # q/k/v bias
    # q/k RMSNorm; head_dim 32 != hidden/heads (16), so code must read config.head_dim
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, head_dim=32, use_sliding_window=False),
    "smollm2": dict(model_type="llama", rope_theta=100000.0, tie_word_embeddings=True),
    # checkpoints store fused qkv_proj / gate_up_proj; partial rotary and longrope are overrides
    "phi3": dict(model_type="phi3", rope_theta=10000.0, sliding_window=None),
    # Gemma 2: GeGLU, (1 + w) norms x4 per layer, scaled embeddings, soft-capped attention (small cap, so it
    # bites) and logits, sliding window (48) on layer 0, global layer 1; query_pre_attn_scalar != head_dim.
    # Untied here (real Gemmas tie: the "-tied" test variants): tied, the scaled input embedding dominates the
    # logits of so small a model, which then mostly repeats its last token. Norm weights random (_gemma_norms).
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=24, sliding_window=48,
                   attn_logit_softcapping=5.0, final_logit_softcapping=8.0, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Gemma 3 (text): q/k norms, head_dim 32 != hidden / heads, sliding layers 0-1 (pattern 3) with the local
    # rope base, global layer 2 with rope_theta and linear scaling (as the 4B and larger models)
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=48, sliding_window_pattern=3, tie_word_embeddings=False,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Gemma3ForConditionalGeneration (model_type gemma3): the gemma3 text model inside a multimodal config, a
    # tiny SigLIP vision tower beside it (its weights are in the checkpoint; the engine skips them)
    "gemma3-mm": dict(model_type="gemma3", num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32,
                      sliding_window=48, sliding_window_pattern=3, tie_word_embeddings=False),
    # mixtures of experts: 8 experts, top-3, renormalised (no shared expert), q/k norm; and Mixtral's top-2
    "qwen3_moe": dict(model_type="qwen3_moe", rope_theta=1000000.0, head_dim=32, num_experts=8,
                      num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[], use_sliding_window=False),
    "mixtral": dict(model_type="mixtral", rope_theta=1000000.0, num_local_experts=6, num_experts_per_tok=2,
                    sliding_window=None),
    # an architecture the engine does not support (its error message is tested)
    "gpt2": dict(model_type="gpt2"),
}
# what the CUDA tests were tuned on (their bf16 tie tolerance): small weights, small logits
CUDA_TEST_INIT = 0.08


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer (~1k ids) trained in-process: any text round-trips, no hub needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_checkpoint(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random-weight checkpoint of `family` (see FAMILIES) into `out`; overrides
    replace config fields (e.g. sliding_window=...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    tokenizer = build_tokenizer()
    kw = {**_BASE, **FAMILIES[family], **overrides}
    model_type = kw.pop("model_type")
    if model_type == "gemma3":
        config = _gemma3_multimodal(AutoConfig, len(tokenizer), kw)
    else:
        config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if model_type.startswith("gemma"):
        _gemma_norms(model, seed)
    # llama3.1 ships several EOS ids; keep that shape so engines handle a list
    eos: int | list[int] = [0, EOS_ID] if family == "llama3.1" else EOS_ID
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=eos, pad_token_id=0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if family == "llama3.1":
        _legacy_rope_keys(out / "config.json")
    return out


def _gemma3_multimodal(auto_config: Any, vocab: int, kw: dict[str, Any]) -> Any:
    """A Gemma3Config: kw as its text_config, a one-layer SigLIP; the image token ids are 3 ids past the
    tokenizer's (so random prompts, drawn from the tokenizer's ids, never hold one)."""
    top = {k: kw.pop(k) for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return auto_config.for_model("gemma3", text_config=dict(kw, vocab_size=vocab + 3, **top), vision_config=vision,
                                 mm_tokens_per_image=1, boi_token_index=vocab, eoi_token_index=vocab + 1,
                                 image_token_index=vocab + 2, **top)


def _gemma_norms(model: Any, seed: int) -> None:
    """Random Gemma norm weights (transformers initialises them to 0, a scale of 1 + 0): N(0, 0.5), post-norms
    around 1 (scale ~2), so the (1 + w) scaling is exercised and the layers weigh against the embedding."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if ".post_" in name else 0.0))


def make_tiny_checkpoint(family: str, path: str | os.PathLike, seed: int = 0, **overrides: Any) -> str:
    """build_checkpoint with the CUDA tests' small init (CUDA_TEST_INIT); returns the path as a str."""
    return str(build_checkpoint(family, Path(path), seed=seed,
                                **{"initializer_range": CUDA_TEST_INIT, **overrides}))


def _legacy_rope_keys(config_json: Path) -> None:
    """Rewrite rope settings the way hub Llama 3.1 checkpoints store them (rope_theta + rope_scaling),
    so loaders are tested on that format too (transformers 5 writes rope_parameters)."""
    cfg = json.loads(config_json.read_text())
    params = cfg.pop("rope_parameters", None)
    if params is None:
        return
    params = dict(params)
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

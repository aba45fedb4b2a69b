"""Pre-quantized FP8 checkpoints (compressed-tensors and block-wise fp8) load dequantized, exactly.

Each test checkpoint is written by hand here: a tiny random llama (tests/checkpoints.py, intermediate 200
so 32- and 128-blocks are partial), its projection weights quantized to float8_e4m3fn in the test (per
channel, per tensor or per block), scales and quantization_config beside them. The reference for every
check is a plain float32 checkpoint holding the test's own dequantization of those FP8 values.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

from batchgen.engine.fp8_checkpoint import Fp8CheckpointError  # noqa: E402
from batchgen.engine.loader import load_model  # noqa: E402
from batchgen.engine.model_source import ModelSourceError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
CPU = torch.device("cpu")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# variant -> (scale kind, block, quantization_config, activations static)
def _ct(strategy: str, block: list[int] | None = None, static: bool = False) -> dict[str, Any]:
    acts = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": "tensor" if static else "token",
            "dynamic": not static, "observer": "minmax"}
    weights = {"type": "float", "num_bits": 8, "symmetric": True, "strategy": strategy, "dynamic": False,
               "group_size": None, "block_structure": block, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}


def _fp8(block: list[int]) -> dict[str, Any]:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": block,
            "modules_to_not_convert": ["lm_head"]}


VARIANTS: dict[str, tuple[str, tuple[int, int] | None, dict[str, Any], bool]] = {
    "ct-channel": ("channel", None, _ct("channel"), False),
    "ct-tensor-static": ("tensor", None, _ct("tensor", static=True), True),
    "ct-block32": ("block", (32, 32), _ct("block", [32, 32]), False),
    "fp8-block128": ("block", (128, 128), _fp8([128, 128]), False),
    "fp8-block32": ("block", (32, 32), _fp8([32, 32]), False),
    # AutoFP8 / vLLM-serialized: quant_method fp8 without blocks, per-tensor weight_scale + input_scale
    "fp8-tensor-static": ("tensor", None, {"quant_method": "fp8", "activation_scheme": "static",
                                           "ignored_layers": ["lm_head"]}, True),
}


def _scale_suffix(qconfig: dict[str, Any]) -> str:
    return "weight_scale_inv" if "weight_block_size" in qconfig else "weight_scale"


def quantize(w: torch.Tensor, kind: str, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale) with w ~= q * scale: amax / 448 per row, tensor or block."""
    if kind == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        return (w / scale).to(FP8), scale
    if kind == "tensor":
        scale = w.abs().amax() / FP8_MAX
        return (w / scale).to(FP8), scale.reshape(1)
    bn, bk = block
    rows, cols = -(-w.shape[0] // bn), -(-w.shape[1] // bk)
    scale, q = torch.empty(rows, cols), torch.empty(w.shape, dtype=FP8)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            scale[i, j] = blk.abs().amax() / FP8_MAX
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / scale[i, j]).to(FP8)
    return q, scale


def dequant_reference(q: torch.Tensor, scale: torch.Tensor, kind: str, block: tuple[int, int] | None) -> torch.Tensor:
    """The test's own float32 dequantization, element by block: q * scale of its row / tensor / block."""
    w = q.to(torch.float32)
    if kind != "block":
        return w * scale.to(torch.float32).reshape(-1, 1) if kind == "channel" else w * scale.float().reshape(())
    out, (bn, bk) = torch.empty_like(w), block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] * scale[i, j]
    return out


def _copy_dir(src: Path, dst: Path, quant_config: dict | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    if quant_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = quant_config
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def write_fp8_checkpoint(src: Path, out: Path, variant: str, scale_dtype: torch.dtype = torch.float32) -> Path:
    """out/fp8 (the FP8 checkpoint) and out/plain (float32, the test's dequantization of the same values)."""
    kind, block, qconfig, static = VARIANTS[variant]
    tensors = load_file(str(src / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    suffix = _scale_suffix(qconfig)
    for name, t in tensors.items():
        if name.endswith(tuple(f"{p}.weight" for p in PROJ)):
            q, scale = quantize(t.float(), kind, block)
            scale = scale.to(scale_dtype)
            fp8[name], fp8[name.replace(".weight", f".{suffix}")] = q, scale
            if static:
                fp8[name.replace(".weight", ".input_scale")] = torch.tensor([0.05])
            plain[name] = dequant_reference(q, scale, kind, block)
        else:
            fp8[name] = plain[name] = t
    _copy_dir(src, out / "fp8", qconfig)
    _copy_dir(src, out / "plain", None)
    save_file(fp8, str(out / "fp8" / "model.safetensors"))
    save_file(plain, str(out / "plain" / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def src(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", intermediate_size=200)


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert pa[n].dtype == pb[n].dtype and torch.equal(pa[n], pb[n]), n


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loaded_weights_are_the_exact_dequantization(src: Path, tmp_path: Path, variant: str) -> None:
    scale_dtype = torch.bfloat16 if variant == "ct-channel" else torch.float32  # llm-compressor writes bf16 scales
    d = write_fp8_checkpoint(src, tmp_path, variant, scale_dtype)
    model, _ = load_model(d / "fp8", CPU, "float32", keep_quantized=True)
    ref, _ = load_model(d / "plain", CPU, "float32")
    _same_params(model, ref)
    # directly, too: layer 1's k_proj rows of the fused qkv weight
    kind, block, qconfig, static = VARIANTS[variant]
    stored = load_file(str(d / "fp8" / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    scale = stored[name.replace(".weight", "." + _scale_suffix(qconfig))]
    q_rows = model.cfg.num_heads * model.cfg.head_dim
    k_rows = model.cfg.num_kv_heads * model.cfg.head_dim
    got = model.layers[1].self_attn.qkv_proj.weight[q_rows:q_rows + k_rows]
    assert torch.equal(got, dequant_reference(stored[name], scale, kind, block))
    assert not torch.equal(got, load_file(str(src / "model.safetensors"))[name])  # FP8 rounding did happen
    # the raw FP8 weights and scales, kept as stored, for FP8 GEMMs
    info = model.fp8_checkpoint
    assert info.dequantized == len(info.linears) == 7 * model.cfg.num_layers
    entry = info.linears[name]
    assert entry.kind == kind and entry.block == block and entry.weight.dtype == FP8
    assert torch.equal(entry.weight.view(torch.uint8), stored[name].view(torch.uint8))
    assert entry.target == "layers.1.self_attn.qkv_proj.weight" and entry.rows == (q_rows, q_rows + k_rows)
    assert torch.equal(dequantize_entry(entry), got)
    assert (entry.input_scale is not None) == static


def dequantize_entry(entry: Any) -> torch.Tensor:
    from batchgen.engine.fp8_weights import dequantize

    return dequantize(entry.weight, entry.scale, entry.kind, entry.block)


def test_qkv_bias_family_loads_exactly(tiny_checkpoint, tmp_path: Path) -> None:
    """qwen2: q/k/v biases stay as stored beside their FP8 weights."""
    d = write_fp8_checkpoint(tiny_checkpoint("qwen2"), tmp_path, "fp8-block32")
    model, _ = load_model(d / "fp8", CPU, "float32")
    ref, _ = load_model(d / "plain", CPU, "float32")
    _same_params(model, ref)
    assert model.layers[0].self_attn.qkv_proj.bias is not None


def test_scales_in_another_shard_are_found(src: Path, tmp_path: Path) -> None:
    """Sharded checkpoints: every scale in a second file, the FP8 weights in the first."""
    d = write_fp8_checkpoint(src, tmp_path, "ct-channel")
    f = d / "fp8" / "model.safetensors"
    tensors = load_file(str(f))
    f.unlink()
    scales = {n: t for n, t in tensors.items() if n.endswith("_scale")}
    weights = {n: t for n, t in tensors.items() if n not in scales}
    save_file(weights, str(d / "fp8" / "model-00001-of-00002.safetensors"))
    save_file(scales, str(d / "fp8" / "model-00002-of-00002.safetensors"))
    model, _ = load_model(d / "fp8", CPU, "float32")
    ref, _ = load_model(d / "plain", CPU, "float32")
    _same_params(model, ref)


def test_smollm2_fp8_checkpoint_generates_its_dequantized_tokens(smollm2_dir: Path, tmp_path: Path) -> None:
    """Real weights (tied embeddings, 576-wide: partial 128-blocks): block-wise FP8 SmolLM2 == its dequantization."""
    d = write_fp8_checkpoint(smollm2_dir, tmp_path, "fp8-block128")
    engines = {w: R.make_engine(d / w, max_num_seqs=4, kv_cache_tokens=1024) for w in ("fp8", "plain")}
    try:
        chat = [{"role": "user", "content": "Name three colours of the rainbow."}]
        prompt = engines["plain"].tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompts = [prompt, "The capital of France is", "def fibonacci(n):"]
        out = {w: [list(o.outputs[0].token_ids) for o in e.generate(prompts, R.greedy_params([24] * 3))]
               for w, e in engines.items()}
        model = engines["fp8"].model
        assert model.cfg.tie_word_embeddings and model.fp8_checkpoint.dequantized == 7 * model.cfg.num_layers
    finally:
        for e in engines.values():
            e.close()
    assert out["fp8"] == out["plain"]


def test_without_keep_quantized_no_fp8_copies_are_held(src: Path, tmp_path: Path) -> None:
    d = write_fp8_checkpoint(src, tmp_path, "fp8-block128")
    model, _ = load_model(d / "fp8", CPU, "float32")
    assert model.fp8_checkpoint.linears == {} and model.fp8_checkpoint.dequantized == 14
    plain, _ = load_model(src, CPU, "float32")
    assert not hasattr(plain, "fp8_checkpoint")  # a plain checkpoint loads as before


@pytest.mark.parametrize("variant", ["ct-channel", "fp8-block32"])
def test_lm_head_in_ignore_stays_unquantized(src: Path, tmp_path: Path, variant: str) -> None:
    d = write_fp8_checkpoint(src, tmp_path, variant)
    model, _ = load_model(d / "fp8", CPU, "float32", keep_quantized=True)
    original = load_file(str(src / "model.safetensors"))
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"])
    assert torch.equal(model.embed_tokens.weight, original["model.embed_tokens.weight"])
    assert not any("lm_head" in n or "embed" in n for n in model.fp8_checkpoint.linears)


@pytest.mark.parametrize("variant", ["ct-channel", "ct-tensor-static", "fp8-block128"])
def test_engine_generates_the_dequantized_checkpoints_tokens(src: Path, tmp_path: Path, variant: str) -> None:
    d = write_fp8_checkpoint(src, tmp_path, variant)
    prompts = R.random_prompts_for(str(d / "plain"), 8, max_len=60)
    max_new = R.random_max_new(len(prompts), hi=16)
    got = {}
    for which in ("fp8", "plain"):
        engine = R.make_engine(d / which, max_num_seqs=8, kv_cache_tokens=2048)
        try:
            got[which] = [list(o.outputs[0].token_ids) for o in engine.generate(prompts, R.greedy_params(max_new))]
        finally:
            engine.close()
    assert [len(t) for t in got["fp8"]] == max_new
    assert got["fp8"] == got["plain"]


def test_one_log_line_names_the_format(src: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = write_fp8_checkpoint(src, tmp_path, "ct-channel")
    with caplog.at_level(logging.INFO, logger="batchgen.engine"):
        engine = R.make_engine(d / "fp8", max_num_seqs=2, kv_cache_tokens=256)
        engine.close()
    lines = [r.getMessage() for r in caplog.records if "FP8" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "compressed-tensors float-quantized" in lines[0] and "dequantized to float32" in lines[0]
    assert "per channel" in lines[0] and "CPU has no FP8" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="batchgen.engine"):
        load_model(d / "plain", CPU, "float32")
    assert not [r for r in caplog.records if "FP8" in r.getMessage()]


def _edit(qc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    qc = json.loads(json.dumps(qc))
    *keys, last = path.split(".")
    node = qc
    for k in keys:
        node = node[k]
    node[last] = value
    return qc


W = "config_groups.group_0.weights"
A = "config_groups.group_0.input_activations"
REFUSED = {  # name -> (quantization_config, key the message must name)
    "int8-weights": (_edit(_ct("channel"), f"{W}.type", "int"), f"{W}.type"),
    "4-bit": (_edit(_ct("channel"), f"{W}.num_bits", 4), f"{W}.num_bits"),
    "group-strategy": (_edit(_ct("channel"), f"{W}.strategy", "group"), f"{W}.strategy"),
    "asymmetric": (_edit(_ct("channel"), f"{W}.symmetric", False), f"{W}.symmetric"),
    "int8-activations": (_edit(_ct("channel"), f"{A}.type", "int"), f"{A}.type"),
    "pack-quantized": (_edit(_ct("channel"), "format", "pack-quantized"), "format"),
    "int-quantized": (_edit(_ct("channel"), "format", "int-quantized"), "format"),
    "no-groups": (_edit(_ct("channel"), "config_groups", {}), "config_groups"),
    "sparse": (_edit(_ct("channel"), "sparsity_config", {"format": "sparse-24-bitmask"}), "sparsity_config.format"),
    "e5m2": (_edit(_fp8([128, 128]), "fmt", "e5m2"), "fmt"),
    "bad-block": (_edit(_fp8([128, 128]), "weight_block_size", [128]), "weight_block_size"),
    "block-static": (_edit(_fp8([128, 128]), "activation_scheme", "static"), "activation_scheme"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_config_is_refused_in_one_line(src: Path, tmp_path: Path, case: str) -> None:
    d = write_fp8_checkpoint(src, tmp_path, "ct-channel")
    qc, key = REFUSED[case]
    cfg = json.loads((d / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "fp8" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Fp8CheckpointError) as e:
        load_model(d / "fp8", CPU, "float32")
    msg = str(e.value)
    assert isinstance(e.value, ModelSourceError) and "\n" not in msg
    assert msg.startswith(f"quantization_config.{key} = "), msg


def _rewrite_tensors(d: Path, edit: Any) -> None:
    f = d / "fp8" / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


TENSOR_REFUSED = {  # name -> (edit of the stored tensors, what the message says)
    "e5m2-weight": (lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                        t["model.layers.0.mlp.up_proj.weight"].float().to(torch.float8_e5m2)}),
                    "float8_e5m2"),
    "missing-scale": (lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale"), "without its"),
    "scale-shape": (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale": torch.ones(3, 7)}),
                    r"has shape \(3, 7\)"),
    "scale-on-float-weight": (lambda t: t.update({"lm_head.weight_scale": torch.ones(1)}), "not float8_e4m3fn"),
}


@pytest.mark.parametrize("case", list(TENSOR_REFUSED))
def test_malformed_fp8_tensors_are_refused_in_one_line(src: Path, tmp_path: Path, case: str) -> None:
    d = write_fp8_checkpoint(src, tmp_path, "ct-channel")
    edit, says = TENSOR_REFUSED[case]
    _rewrite_tensors(d, edit)
    with pytest.raises(Fp8CheckpointError, match=says) as e:
        R.make_engine(d / "fp8", max_num_seqs=2, kv_cache_tokens=256)
    assert "\n" not in str(e.value)


def test_kv_cache_only_compressed_tensors_loads_as_plain(src: Path, tmp_path: Path) -> None:
    """llm-compressor's FP8 KV cache alone (no config groups): 16-bit weights, loaded as before."""
    d = tmp_path / "ckpt"
    kv = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False, "symmetric": True}
    _copy_dir(src, d, {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
                       "kv_cache_scheme": kv, "ignore": []})
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    model, _ = load_model(d, CPU, "float32")
    ref, _ = load_model(src, CPU, "float32")
    _same_params(model, ref)
    assert not hasattr(model, "fp8_checkpoint")


def test_fp8_config_without_fp8_weights_is_refused(src: Path, tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    _copy_dir(src, d, _fp8([128, 128]))
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    with pytest.raises(Fp8CheckpointError, match="holds no float8_e4m3fn weights"):
        load_model(d, CPU, "float32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["ct-channel", "fp8-block128"])
def test_cuda_load_equals_cpu_dequantization(src: Path, tmp_path: Path, variant: str) -> None:
    """On the GPU the dequantization runs there (float32 product, then bfloat16): the same values as on the CPU."""
    d = write_fp8_checkpoint(src, tmp_path, variant)
    gpu, _ = load_model(d / "fp8", torch.device("cuda"), "bfloat16")
    cpu, _ = load_model(d / "fp8", CPU, "float32")
    for (n, a), (_, b) in zip(gpu.named_parameters(), cpu.named_parameters()):
        assert torch.equal(a.cpu(), b.to(torch.bfloat16)), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_runs_the_fp8_checkpoint_as_its_dequantization(src: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """bfloat16 on the GPU: the same greedy tokens as the plain checkpoint of the dequantized weights, one log line."""
    d = write_fp8_checkpoint(src, tmp_path, "fp8-block128")
    prompts = R.random_prompts_for(str(d / "plain"), 8, max_len=60)
    max_new = R.random_max_new(len(prompts), hi=16)
    got = {}
    for which in ("fp8", "plain"):
        with caplog.at_level(logging.INFO, logger="batchgen.engine"):
            engine = R.make_engine(d / which, device="cuda", dtype="bfloat16", cuda_graphs=True,
                                   max_num_seqs=8, kv_cache_tokens=2048)
        try:
            got[which] = [list(o.outputs[0].token_ids) for o in engine.generate(prompts, R.greedy_params(max_new))]
        finally:
            engine.close()
    assert got["fp8"] == got["plain"]
    lines = [r.getMessage() for r in caplog.records if "FP8 checkpoint" in r.getMessage()]
    assert len(lines) == 1 and "dequantized to bfloat16 on cuda" in lines[0], lines


def _stored_codes(d: Path, layer: int, parts: tuple[str, ...]) -> torch.Tensor:
    """The e4m3 codes the checkpoint stores for one fused projection, its parts stacked in row order."""
    t = load_file(str(d / "model.safetensors"))
    return torch.cat([t[f"model.layers.{layer}.{p}.weight"] for p in parts])


@pytest.mark.parametrize("variant", ["ct-channel", "ct-tensor-static"])
def test_quantization_fp8_runs_the_checkpoints_own_fp8_weights(src: Path, tmp_path: Path, variant: str) -> None:
    """quantization "fp8" on an FP8 checkpoint with per-channel or per-tensor scales: the projections are
    the stored e4m3 codes and scales, not a requantization of their dequantization."""
    from batchgen.engine.quant import Fp8Linear

    d = write_fp8_checkpoint(src, tmp_path, variant)
    engine = R.make_engine(d / "fp8", max_num_seqs=4, kv_cache_tokens=1024, quantization="fp8")
    try:
        assert "from the checkpoint's FP8 weights" in engine.precision
        layer = engine.model.layers[0]
        assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
        qkv = _stored_codes(d / "fp8", 0, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        assert torch.equal(layer.self_attn.qkv_proj.weight.view(torch.uint8), qkv.view(torch.uint8))
        gate_up = _stored_codes(d / "fp8", 0, ("mlp.gate_proj", "mlp.up_proj"))
        assert torch.equal(layer.mlp.gate_up_proj.weight.view(torch.uint8), gate_up.view(torch.uint8))
        # each projection's dequantized weight is the checkpoint's own dequantization
        plain = load_file(str(d / "plain" / "model.safetensors"))
        want = torch.cat([plain[f"model.layers.0.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
        assert torch.equal(layer.mlp.gate_up_proj.dequantized_weight(), want)
        assert not engine.model.fp8_checkpoint.linears  # the host copies are freed
        out = engine.generate([[5, 6, 7, 8]], R.greedy_params([6]))[0]
        assert len(out.outputs[0].token_ids) == 6
    finally:
        engine.close()


def test_block_scaled_checkpoint_with_quantization_fp8_is_quantized_per_channel(src: Path, tmp_path: Path) -> None:
    """Block-wise scales are not the FP8 GEMM's per-row ones: such a checkpoint loads dequantized and
    quantization "fp8" quantizes its projections per channel, as for a bf16 checkpoint."""
    d = write_fp8_checkpoint(src, tmp_path, "fp8-block32")
    engine = R.make_engine(d / "fp8", max_num_seqs=4, kv_cache_tokens=1024, quantization="fp8")
    try:
        assert engine.precision.startswith("weights fp8") and "from the checkpoint" not in engine.precision
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores")
def test_cuda_fp8_checkpoint_runs_on_fp8_tensor_cores_without_being_asked(src: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """On FP8 hardware a per-channel FP8 checkpoint runs its stored weights on FP8 tensor cores (no
    dequantized line), and its greedy tokens follow the same FP8 numerics emulated on the CPU up to
    near-ties (bf16 activations against float32)."""
    d = write_fp8_checkpoint(src, tmp_path, "ct-channel")
    with caplog.at_level(logging.INFO, logger="batchgen.engine"):
        gpu = R.make_engine(d / "fp8", device="cuda", dtype="bfloat16", max_num_seqs=8, kv_cache_tokens=2048)
    try:
        assert "from the checkpoint's FP8 weights" in gpu.precision, gpu.precision
        assert gpu.model.layers[0].self_attn.qkv_proj.uses_tensor_cores
        # no "runs dequantized" line from the loader (apply_fp8 may still say that down_proj, K = 200,
        # is no multiple of 16 for _scaled_mm and runs emulated)
        assert not [r for r in caplog.records if r.getMessage().startswith("FP8 checkpoint")]
        prompts = R.random_prompts_for(str(d / "plain"), 8, max_len=60)
        max_new = R.random_max_new(len(prompts), hi=16)
        got = [list(o.outputs[0].token_ids) for o in gpu.generate(prompts, R.greedy_params(max_new))]
    finally:
        gpu.close()
    assert [len(t) for t in got] == max_new
    cpu = R.make_engine(d / "fp8", max_num_seqs=8, kv_cache_tokens=2048, quantization="fp8")
    try:
        emulated = [list(o.outputs[0].token_ids) for o in cpu.generate(prompts, R.greedy_params(max_new))]
    finally:
        cpu.close()
    first = [a[0] == b[0] for a, b in zip(got, emulated)]
    assert sum(first) >= 6, (got, emulated)  # first tokens: the same model up to bf16-sized near-ties

"""The FP8 (e4m3) KV cache on the CPU (engine/kv_fp8.py, the torch backend's emulation): the codes are the
rounding written out again here; the cache holds exactly them and attention is SDPA over their values
(checked against a loop written here); the model equals transformers whose K/V pass through e4m3 with the
same per-layer scales (a cache subclass written here), and so do the engine's greedy tokens; half the
bytes per token; k_scale / v_scale read from a checkpoint under the names llm-compressor, vLLM and AutoFP8
use; the argument's validation, the job key, the dry run, the run summary and bench.

The Triton kernels are checked against this emulation in test_kv_fp8_kernels.py (interpreter, CUDA), the
engine on a GPU in test_cuda_engine.py, SmolLM2's NLL with an FP8 cache in test_quant_fp8.py."""
from __future__ import annotations

import io
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

from batchgen.engine import kv_fp8  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FP8 = torch.float8_e4m3fn
CPU = torch.device("cpu")
KS, VS = (0.046875, 0.0390625), (0.0234375, 0.01953125)  # per layer (2 in the tiny checkpoints); exact in fp32


def ref_codes(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The recipe written out again: fp32 division, saturation at 448, round to nearest even."""
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (ref_codes(x, scale).float() * scale).to(x.dtype)


# ------------------------------------------------------------------ numerics
def test_codes_are_the_rounding_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-4, 3, 4096)  # subnormal .. saturating
    codes = kv_fp8.quantize(x, 0.037)
    assert codes.dtype == FP8 and torch.equal(codes.view(torch.uint8), ref_codes(x, 0.037).view(torch.uint8))
    back = kv_fp8.dequantize(codes, 0.037)
    assert torch.equal(back, codes.float() * 0.037)
    scaled = x.abs() / 0.037
    normal = (scaled >= 2 ** -6) & (scaled <= 448)
    assert ((back - x).abs()[normal] <= 2 ** -4 * x.abs()[normal] + 1e-12).all()  # half an ulp of 3 bits
    assert (back[scaled > 448].abs() == 448 * 0.037).all()  # saturated, not NaN
    assert (kv_fp8.quantize(torch.tensor([1e30, -1e30]), 1.0).float() == torch.tensor([448.0, -448.0])).all()
    # a 16-bit cache is a plain cast; the fp8 one is about half of bf16's bytes per token
    assert kv_fp8.bytes_per_token(2, 2, 16, FP8) * 2 == kv_fp8.bytes_per_token(2, 2, 16, torch.bfloat16) == 256


# ------------------------------------------------------------------ the torch backend
def _paged_case(seqs: list[tuple[int, int]], heads: int, kvh: int, d: int, bs: int, head_major: bool, seed: int = 0):
    """Random block placement; caches of codes (tagged with their scales); the step's new K/V and queries."""
    from batchgen.engine.attention.base import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    nblk = [-(-sl // bs) for sl, _ in seqs]
    total = sum(nblk) + 3
    perm = torch.randperm(total, generator=g)
    tables = torch.zeros(len(seqs), max(nblk) + 1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(nblk):
        tables[b, :n] = perm[at:at + n].to(torch.int32)
        at += n
    caches = []
    for scale, mult in ((KS[0], 3.0), (VS[0], 1.0)):
        c = kv_fp8.quantize(torch.randn(total, bs, kvh, d, generator=g) * mult, scale)
        c = c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3) if head_major else c
        caches.append(kv_fp8.set_scale(c, scale))
    q_lens = [ql for _, ql in seqs]
    slots = [int(tables[b, p // bs]) * bs + p % bs for b, (sl, ql) in enumerate(seqs) for p in range(sl - ql, sl)]
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    T = sum(q_lens)
    meta = AttentionMetadata(torch.tensor(slots), qsl, torch.tensor([sl for sl, _ in seqs], dtype=torch.int32),
                             tables, max(q_lens), max(sl for sl, _ in seqs), all(ql == 1 for ql in q_lens))
    new = [torch.randn(T, heads, d, generator=g)] + [torch.randn(T, kvh, d, generator=g) * 2 for _ in "kv"]
    return caches, meta, new


def _attention_loop(q, k_vals, v_vals, seqs, tables, bs, scale, window):
    """Per sequence and head, in float64: softmax(q k^T * scale) v over [0, pos] (and the window)."""
    out, row = [], 0
    group = q.shape[1] // k_vals.shape[2]
    for b, (sl, ql) in enumerate(seqs):
        idx = torch.tensor([int(tables[b, p // bs]) * bs + p % bs for p in range(sl)])
        kb = k_vals.reshape(-1, *k_vals.shape[2:])[idx].double().repeat_interleave(group, 1)  # [S, H, d]
        vb = v_vals.reshape(-1, *v_vals.shape[2:])[idx].double().repeat_interleave(group, 1)
        for i in range(ql):
            pos = sl - ql + i
            keep = torch.arange(sl) <= pos
            if window:
                keep &= torch.arange(sl) > pos - window
            s = torch.einsum("hd,shd->hs", q[row].double(), kb) * scale
            p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
            out.append(torch.einsum("hs,shd->hd", p, vb))
            row += 1
    return torch.stack(out)


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("window", [None, 7])
def test_torch_backend_stores_the_codes_and_attends_over_their_values(head_major: bool, window: int | None) -> None:
    from batchgen.engine.attention.torch_backend import TorchAttention

    seqs = [(1, 1), (23, 23), (40, 5), (17, 1)]  # a prefill, a chunk over cached context, decodes
    (kc, vc), meta, (q, k, v) = _paged_case(seqs, heads=8, kvh=2, d=16, bs=8, head_major=head_major)
    before_k, before_v = kc.clone(), vc.clone()
    be = TorchAttention()
    be.write_kv(k, v, kc, vc, meta)
    flat = lambda c: c.reshape(-1, 2, 16).view(torch.uint8)  # noqa: E731 - token-major codes
    slots = meta.slot_mapping
    assert torch.equal(flat(kc)[slots], ref_codes(k, KS[0]).view(torch.uint8))
    assert torch.equal(flat(vc)[slots], ref_codes(v, VS[0]).view(torch.uint8))
    others = torch.ones(flat(kc).shape[0], dtype=torch.bool).index_fill_(0, slots, False)
    assert torch.equal(flat(kc)[others], flat(before_k)[others]) and torch.equal(flat(vc)[others], flat(before_v)[others])
    out = be.attend(q, kc, vc, meta, 0.25, window)
    want = _attention_loop(q, kc.float() * KS[0], vc.float() * VS[0], seqs, meta.block_tables, 8, 0.25, window)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the model against transformers
def _fake_quant_cache(config, ks, vs):
    """A transformers DynamicCache whose stored K/V (post-RoPE, as attention reads them) pass through e4m3."""
    from transformers import DynamicCache

    class FakeQuantCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(fake_quant(key_states, ks[layer_idx]), fake_quant(value_states, vs[layer_idx]),
                                  layer_idx, *args, **kwargs)

    return FakeQuantCache(config=config)


def _hf(path: Path):
    return R.get_reference(str(path))


def _hf_logits(ref, ids: list[int], ks=KS, vs=VS) -> torch.Tensor:
    with torch.inference_mode():
        cache = _fake_quant_cache(ref.model.config, ks, vs)
        return ref.model(input_ids=torch.tensor([ids]), use_cache=True, **{ref._cache_kw: cache}).logits[0].float()


def engine_model_logits(model, ids: list[int], ks=KS, vs=VS, bs: int = 16, backend: str = "torch") -> torch.Tensor:
    """The engine's model over one prefill into FP8 caches with these scales, on the model's device (the torch
    backend: the emulation; "triton": the kernels): [T, vocab] float32."""
    from batchgen.engine.attention import get_backend
    from batchgen.engine.attention.base import AttentionMetadata

    cfg, T, dev = model.cfg, len(ids), model.embed_tokens.weight.device
    nb = -(-T // bs)
    caches = [tuple(kv_fp8.set_scale(torch.zeros(nb, bs, cfg.num_kv_heads, cfg.head_dim, dtype=FP8, device=dev), s)
                    for s in (ks[i], vs[i])) for i in range(cfg.num_layers)]
    i32 = dict(dtype=torch.int32, device=dev)
    meta = AttentionMetadata(torch.arange(T, device=dev), torch.tensor([0, T], **i32), torch.tensor([T], **i32),
                             torch.arange(nb, **i32)[None], T, T, False)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=dev), torch.arange(T, device=dev), caches, meta,
                       get_backend(backend, dev))
        return model.logits(hidden).float()


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])  # GQA; q/k norm, head_dim 32; fused qkv
def test_model_equals_transformers_with_quantized_kv(tiny_checkpoint, family: str) -> None:
    from batchgen.engine.loader import load_model

    path = tiny_checkpoint(family)
    model, _ = load_model(path, CPU, "float32")
    ref = _hf(path)
    ids = torch.randint(3, model.cfg.vocab_size, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    got, want = engine_model_logits(model, ids), _hf_logits(ref, ids)
    plain = ref.model(input_ids=torch.tensor([ids])).logits[0].detach()
    # the two RoPEs differ in the last bit now and then, which can move a K code by one step
    err, effect = _rel(got, want), _rel(want, plain)
    print(f"{family}: engine vs transformers, both fp8 KV: {err:.1e}; fp8 KV vs none: {effect:.1e}")
    assert err < 1e-3 and effect > 30 * err  # the quantization is what is compared
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.98


def write_kv_scales(src: Path, out: Path, names: dict[str, float], kv_only_config: bool = True) -> Path:
    """A copy of checkpoint `src` with these scale tensors added (and, like llm-compressor's FP8 KV cache
    checkpoints, a compressed-tensors config holding only a kv_cache_scheme)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    for i, (name, value) in enumerate(names.items()):
        tensors[name] = torch.tensor(value) if i % 2 else torch.tensor([value])  # [] and [1] both occur
    save_file(tensors, str(out / "model.safetensors"))
    if kv_only_config:
        cfg = json.loads((out / "config.json").read_text())
        kv = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False, "symmetric": True}
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
                                      "kv_cache_scheme": kv, "ignore": []}
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _names(template: str, ks=KS, vs=VS) -> dict[str, float]:
    return {template.format(i=i, kv=kv): s[i] for i in range(len(ks)) for kv, s in (("k", ks), ("v", vs))}


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_greedy_equals_transformers_with_quantized_kv(tiny_checkpoint, tmp_path: Path, overlap: bool) -> None:
    """The engine with the checkpoint's scales (prefill chunks, decode, preemption-free) against transformers
    decoding token by token through the fake-quantizing cache: the same tokens but for near-ties."""
    src = tiny_checkpoint("llama")
    path = write_kv_scales(src, tmp_path / "ckpt", _names("model.layers.{i}.self_attn.{kv}_scale"))
    engine = R.make_engine(path, kv_cache_dtype="fp8", overlap=overlap, max_batch_tokens=64, kv_cache_tokens=4096)
    assert engine.kv_scales.k == KS and engine.kv_scales.v == VS
    prompts = R.random_prompts(6, engine.model.cfg.vocab_size, max_len=90)
    outs = [o.outputs[0].token_ids for o in engine.generate(prompts, R.greedy_params([12] * 6))]
    engine.close()
    ref = _hf(src)
    for i, (p, got) in enumerate(zip(prompts, outs)):
        cache, x, want = _fake_quant_cache(ref.model.config, KS, VS), torch.tensor([p]), []
        with torch.inference_mode():
            for _ in range(12):
                logits = ref.model(input_ids=x, use_cache=True, **{ref._cache_kw: cache}).logits[0, -1]
                want.append(int(logits.argmax()))
                x = torch.tensor([[want[-1]]])
        k = next((j for j in range(12) if got[j] != want[j]), None)
        if k is not None:  # a near-tie may go either way: then the rest follows another history
            logits = _hf_logits(ref, p + want[:k])[-1]
            assert float(logits[want[k]] - logits[got[k]]) < R.TIE_TOL, f"prompt {i} step {k}: {got} != {want}"


# ------------------------------------------------------------------ the engine
def test_engine_fp8_cache_is_half_the_bytes_and_says_so(tiny_checkpoint) -> None:
    path = tiny_checkpoint("qwen2")
    engines = {kv: R.make_engine(path, kv_cache_dtype=kv, kv_cache_tokens=1000) for kv in ("bfloat16", "fp8", "auto")}
    nbytes = {kv: sum(c.untyped_storage().nbytes() for pair in e.runner.kv_caches for c in pair)
              for kv, e in engines.items()}
    fp8 = engines["fp8"]
    assert all(c.dtype == FP8 and kv_fp8.scale_of(c) == 1.0 for pair in fp8.runner.kv_caches for c in pair)
    assert nbytes["fp8"] * 2 == nbytes["bfloat16"] and nbytes["fp8"] * 4 == nbytes["auto"]  # auto: float32
    assert fp8.blocks.num_blocks == engines["auto"].blocks.num_blocks  # kv_cache_tokens is in tokens
    assert "KV cache 1,008 tokens (fp8 e4m3, k/v scales 1.0 (the checkpoint has none))" in fp8.describe()
    assert "(float32)" in engines["auto"].describe() and "fp8" not in engines["auto"].describe()
    assert fp8.stats.kv_cache_dtype == "fp8 e4m3" and engines["bfloat16"].stats.kv_cache_dtype == "bfloat16"
    out = fp8.generate([[5, 6, 7] * 20], R.greedy_params([8]))[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 8
    for e in engines.values():
        e.close()


SCALE_NAMES = {
    "self_attn": "model.layers.{i}.self_attn.{kv}_scale",  # compressed-tensors / llm-compressor
    "proj": "model.layers.{i}.self_attn.{kv}_proj.{kv}_scale",
    "attn": "model.layers.{i}.self_attn.attn.{kv}_scale",
    "output_scale": "model.layers.{i}.self_attn.{kv}_proj.output_scale",  # AutoFP8
}


@pytest.mark.parametrize("variant", list(SCALE_NAMES))
def test_checkpoint_scales_are_found_by_layer(tiny_checkpoint, tmp_path: Path, variant: str) -> None:
    path = write_kv_scales(tiny_checkpoint("llama"), tmp_path / variant, _names(SCALE_NAMES[variant]))
    engine = R.make_engine(path, kv_cache_dtype="fp8", kv_cache_tokens=512)
    assert engine.kv_scales == kv_fp8.KVScales(KS, VS, 2)
    assert [(kv_fp8.scale_of(k), kv_fp8.scale_of(v)) for k, v in engine.runner.kv_caches] == list(zip(KS, VS))
    assert "fp8 e4m3, k/v scales from the checkpoint" in engine.describe()
    engine.close()
    plain = R.make_engine(path, kv_cache_tokens=512)  # scales in the checkpoint change nothing without fp8
    assert plain.kv_scales is None and plain.runner.kv_caches[0][0].dtype == torch.float32
    plain.close()


def test_one_kv_scale_and_partial_scales(tiny_checkpoint, tmp_path: Path, caplog) -> None:
    src = tiny_checkpoint("llama")
    both = kv_fp8.read_kv_scales(write_kv_scales(src, tmp_path / "kv", {"model.layers.0.self_attn.kv_scale": 0.5,
                                                                         "model.layers.1.self_attn.kv_scale": 0.25}), 2)
    assert both == kv_fp8.KVScales((0.5, 0.25), (0.5, 0.25), 2)
    with caplog.at_level("INFO", logger="batchgen.engine"):
        part = kv_fp8.read_kv_scales(write_kv_scales(src, tmp_path / "part", {"model.layers.1.self_attn.k_scale": 0.5,
                                                                               "model.layers.1.self_attn.v_scale": 0.125}), 2)
    assert part == kv_fp8.KVScales((1.0, 0.5), (1.0, 0.125), 1)
    assert "for 1 of 2 layers, 1.0 elsewhere" in caplog.text
    assert kv_fp8.read_kv_scales(None, 3) == kv_fp8.KVScales.default(3)


@pytest.mark.parametrize("name, value, says", [
    ("model.layers.0.self_attn.k_scale", 0.0, "must be a finite number > 0"),
    ("model.layers.1.self_attn.v_scale", float("nan"), "must be a finite number > 0"),
    ("model.layers.7.self_attn.k_scale", 0.5, "layer 7, but the model has 2 layers"),
])
def test_bad_checkpoint_scales_are_one_line(tiny_checkpoint, tmp_path: Path, name: str, value: float, says: str) -> None:
    from batchgen.engine.fp8_checkpoint import Fp8CheckpointError

    path = write_kv_scales(tiny_checkpoint("llama"), tmp_path / "bad", {name: value})
    with pytest.raises(Fp8CheckpointError, match=says) as e:
        R.make_engine(path, kv_cache_dtype="fp8", kv_cache_tokens=512)
    assert str(e.value).startswith(name) and "\n" not in str(e.value)


def test_fp8_weights_and_fp8_kv_from_one_checkpoint(tiny_checkpoint, tmp_path: Path) -> None:
    """A compressed-tensors FP8 checkpoint with k_scale / v_scale: FP8 weights and an FP8 cache with its scales."""
    from test_fp8_checkpoints import write_fp8_checkpoint

    d = write_fp8_checkpoint(tiny_checkpoint("llama", intermediate_size=200), tmp_path / "w", "ct-channel")
    path = write_kv_scales(d / "fp8", tmp_path / "wkv", _names("model.layers.{i}.self_attn.{kv}_scale"),
                           kv_only_config=False)
    engine = R.make_engine(path, quantization="fp8", kv_cache_dtype="fp8", kv_cache_tokens=512)
    assert engine.kv_scales.k == KS and "weights fp8" in engine.describe()
    assert "fp8 e4m3, k/v scales from the checkpoint" in engine.describe()
    assert engine.generate([[4, 5, 6, 7]], R.greedy_params([5]))[0].error is None
    engine.close()


@pytest.mark.parametrize("bad, kind", [("int8", ValueError), ("FP8", ValueError), ("float32", ValueError),
                                       (None, TypeError), (8, TypeError)])
def test_bad_kv_cache_dtype_is_one_line(tiny_checkpoint, bad, kind) -> None:
    from batchgen.engine.validation import EngineArgumentError

    with pytest.raises(EngineArgumentError) as e:
        R.make_engine(tiny_checkpoint("llama"), kv_cache_dtype=bad)
    assert isinstance(e.value, kind)
    assert str(e.value) == ("Engine: kv_cache_dtype must be one of 'auto', 'bfloat16', 'float16', 'fp8', "
                            f"got {bad!r}")


def test_flash_refuses_an_fp8_cache() -> None:
    """flash-attn reads caches in the query's dtype only: the engine refuses FP8 there before loading
    (FlashAttention is built without flash-attn here: only its capability answers are asked)."""
    from batchgen.engine.attention.flash_backend import FlashAttention
    from batchgen.engine.attention.torch_backend import TorchAttention

    flash = FlashAttention.__new__(FlashAttention)
    assert "reads no FP8 KV cache" in flash.kv_dtype_problem(FP8, None, CPU)
    assert "needs the KV cache in the model dtype (bfloat16)" in flash.kv_dtype_problem(
        torch.float16, torch.bfloat16, CPU)
    assert flash.kv_dtype_problem(torch.bfloat16, torch.bfloat16, CPU) is None
    assert TorchAttention().kv_dtype_problem(FP8, torch.float32, CPU) is None
    k = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="attention 'flash' needs the KV cache in the model dtype"):
        flash.write_kv(k, k, torch.zeros(2, 4, 1, 4, dtype=FP8), torch.zeros(2, 4, 1, 4, dtype=FP8), None)


# ------------------------------------------------------------------ job file, dry run, summary, bench
JOB = """\
model: {{path: {model}}}
input: {{files: [data.jsonl]}}
prompt: {{column: prompt}}
sampling: {{max_new_tokens: 4, temperature: 0}}
output: {{path: out}}
engine: {{device: cpu, kv_cache_dtype: {kv}}}
"""


def _job(tmp_path: Path, model: str, kv: str) -> Path:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"hi {i}"}) + "\n" for i in range(3)))
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(JOB.format(model=model, kv=kv)))
    return job


def test_job_key_identity_and_dry_run(tmp_path: Path, tiny_checkpoint) -> None:
    from click.testing import CliRunner

    from batchgen.cli import cli
    from batchgen.pipeline.config import engine_kwargs, job_fingerprint, job_identity, load_job
    from batchgen.pipeline.run.dry_run import dry_run

    model = str(tiny_checkpoint("llama"))
    fp8 = load_job(_job(tmp_path, model, "fp8"))
    assert fp8.engine.kv_cache_dtype == "fp8" and engine_kwargs(fp8)["kv_cache_dtype"] == "fp8"
    auto = load_job(_job(tmp_path, model, "auto"))
    assert engine_kwargs(auto)["kv_cache_dtype"] == "auto"
    assert load_job(tmp_path / "job.yaml", ["engine.kv_cache_dtype=bfloat16"]).engine.kv_cache_dtype == "bfloat16"
    # the default keeps the identity (and fingerprint) jobs had before the key; fp8 is another job
    assert set(job_identity(auto)) == {"model", "input", "prompt", "sampling"}
    assert job_identity(fp8)["engine"] == {"kv_cache_dtype": "fp8"}
    assert job_fingerprint(auto) != job_fingerprint(fp8)
    out = io.StringIO()
    dry_run(fp8, preview=0, stream=out)
    assert "KV cache: fp8 e4m3, one k and one v scale per layer" in out.getvalue()
    out = io.StringIO()
    dry_run(auto, preview=0, stream=out)
    assert "KV cache:" not in out.getvalue()
    job = _job(tmp_path, model, "int8")
    for dry in ([], ["--dry-run"]):
        r = CliRunner().invoke(cli, ["run", *dry, str(job)])
        assert r.exit_code == 2, r.output
        assert r.output.strip() == (f"error: {job}:6: engine.kv_cache_dtype: 'int8' is not allowed (expected "
                                    "one of: auto, bfloat16, float16, fp8)"), r.output


def test_run_summary_says_which_kv_cache_ran(tmp_path: Path, tiny_checkpoint) -> None:
    from click.testing import CliRunner

    from batchgen.cli import cli

    job = _job(tmp_path, str(tiny_checkpoint("smollm2")), "fp8")
    r = CliRunner().invoke(cli, ["run", str(job)])
    assert r.exit_code == 0, r.output
    assert "(fp8 e4m3, k/v scales 1.0 (the checkpoint has none))" in r.output  # the engine line
    summary = json.loads(next((tmp_path / "out").rglob("summary.json")).read_text())
    assert summary["engine_stats"]["kv_cache_dtype"] == "fp8 e4m3" and summary["rows"] == 3


def test_bench_passes_the_kv_cache_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen import bench

    tiny = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    monkeypatch.setitem(bench.SHAPES, "tiny", tiny)
    monkeypatch.setattr(bench, "workload", lambda name: ([[5, 6, 7, 8]] * 3, [4] * 3))
    rec = bench.run_batchgen("seed", "tiny", False, False, "torch", 4, 256, kv_cache_dtype="fp8")
    assert rec["kv_cache_dtype"] == "fp8" and rec["output_tokens"] == 12

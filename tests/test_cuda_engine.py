"""CUDA-only engine checks (skipped without a GPU): the overlapped loop, decode CUDA graphs and
the Triton backend give the same greedy tokens as the synchronous loop and the transformers
reference, in float32 so that only true near-ties may differ."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return R.make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("cuda") / "qwen3")


def _engine(path: str, **kw):
    from batchgen import Engine

    base = dict(device="cuda", dtype="float32", max_num_seqs=16, max_batch_tokens=512, kv_cache_tokens=16384)
    return Engine.from_pretrained(path, **{**base, **kw})


def _greedy(engine, prompts, max_new):
    outs = engine.generate(prompts, R.greedy_params(max_new))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def work(ckpt):
    prompts = R.random_prompts_for(ckpt, 32)
    max_new = R.random_max_new(32)
    return prompts, max_new, R.cached_greedy(ckpt, prompts, max_new)


@pytest.mark.parametrize("attention", ["triton", "torch"])
def test_overlap_equals_sync_and_reference(ckpt, work, attention):
    prompts, max_new, ref = work
    overlapped = _engine(ckpt, attention=attention, overlap=True)
    assert overlapped.overlap
    got = _greedy(overlapped, prompts, max_new)
    assert overlapped.stats.gpu_busy_fraction is not None
    sync = _engine(ckpt, attention=attention, overlap=False, cuda_graphs=overlapped.cuda_graphs)
    assert _greedy(sync, prompts, max_new) == got  # same kernels, same order: bit-identical
    failures, _ = R.compare_greedy(R.get_reference(ckpt), prompts, got, ref)
    assert not failures, R.format_failures(failures, f"cuda {attention} overlap")


def test_graphs_and_preemption_match_reference(ckpt, work):
    prompts, max_new, ref = work
    eng = _engine(ckpt, attention="triton", kv_cache_tokens=1024, cuda_graphs=True)
    assert eng.cuda_graphs and eng.runner.graphs is not None
    got = _greedy(eng, prompts, max_new)
    assert eng.stats.preemptions > 0
    failures, _ = R.compare_greedy(R.get_reference(ckpt), prompts, got, ref)
    assert not failures, R.format_failures(failures, "cuda graphs + preemption")


def test_seeded_sampling_same_with_and_without_overlap(ckpt, work):
    from batchgen import SamplingParams

    prompts = work[0][:12]
    params = [SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    a = _engine(ckpt, attention="triton", overlap=True).generate(prompts, params)
    b = _engine(ckpt, attention="triton", overlap=False).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.mark.parametrize("seed", range(4))
def test_stress_overlap_equals_sync_under_preemption(ckpt, seed):
    """The CPU stress test's workloads on CUDA (Triton attention, decode graphs, overlap): constant preemption,
    n up to 8, greedy and seeded, stop strings, min_new_tokens. Every sample comes back, overlapped == sync."""
    import random

    from invariants import check_engine_idle
    from test_engine_stress import check_complete, random_config, random_requests, summary

    rng = random.Random(seed)
    conf = {**random_config(rng), "block_size": 16}
    vocab, _ = R.model_info(ckpt)
    reqs = random_requests(rng, vocab, 40)
    results = []
    for overlap in (True, False):
        eng = _engine(ckpt, attention="triton", overlap=overlap, **conf)
        outs = list(eng.stream(reqs))
        check_complete(outs, reqs)
        check_engine_idle(eng)
        results.append(summary(outs))
        eng.close()
    assert results[0] == results[1], f"overlapped != synchronous for {conf}"


@pytest.mark.parametrize("seed", range(2))
def test_constrained_overlap_equals_sync_on_cuda(tiny_checkpoint, seed):
    """Grammar masks applied between the forward and the sampling of the same step: the overlapped
    loop (masks of step N+1 built while step N's tokens come back) gives the synchronous loop's
    tokens, bit for bit, under preemption, with n > 1 and sampled rows."""
    import random

    pytest.importorskip("llguidance")
    from batchgen import GenerationRequest, SamplingParams

    path = str(tiny_checkpoint("llama"))
    rng = random.Random(seed)
    vocab, _ = R.model_info(path)
    kinds = [dict(json_object=True), dict(regex=r"[a-z ]{3,40}\."), dict(choice=["alpha", "beta"]),
             dict(grammar='start: "[" num ("," num)* "]"\nnum: /[0-9]{1,3}/'), {}]
    reqs = [GenerationRequest([rng.randrange(3, vocab) for _ in range(rng.randint(1, 60))],
                              SamplingParams(max_new_tokens=rng.randint(8, 60), n=rng.choice([1, 2, 4]),
                                             temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(99),
                                             **rng.choice(kinds)), i)
            for i in range(24)]
    results = []
    for overlap in (False, True):
        eng = _engine(path, overlap=overlap, max_num_seqs=6, kv_cache_tokens=320, max_batch_tokens=48)
        outs = sorted(eng.stream(reqs), key=lambda o: o.request_id)
        results.append([[(c.token_ids, c.finish_reason, c.error) for c in o.outputs] for o in outs])
        assert eng.stats.preemptions > 0
        eng.close()
    assert results[0] == results[1]
    assert all(err is None for r in results[0] for _, _, err in r)


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8_GPU, reason="Triton's e4m3 needs compute capability 8.9+")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_kv_cache_overlap_and_graphs_equal_sync_and_the_emulation(ckpt, work, tmp_path, dtype):
    """kv_cache_dtype fp8 with the checkpoint's k/v scales: the Triton kernels (fused RoPE + write, prefill,
    split decode) in decode CUDA graphs, overlapped, give the synchronous run's tokens bit for bit, and each
    token is the argmax of the torch emulation over the whole sequence (one prefill into FP8 caches), up to
    near-ties (bf16: the decode kernels round differently from one prefill, and a K code may flip)."""
    from test_kv_fp8 import _names, engine_model_logits, write_kv_scales

    ks, vs = (0.0234375, 0.01953125), (0.01171875, 0.009765625)  # the small-init model's K/V: |x| < ~4
    path = write_kv_scales(Path(ckpt), tmp_path / "kv", _names("model.layers.{i}.self_attn.{kv}_scale", ks, vs))
    prompts, max_new, _ = work
    runs = []
    for overlap in (True, False):
        # float32: a small cache, so preemption too. Not in bf16: overlap schedules a step ahead, so under
        # KV pressure it preempts at other steps than sync does (a finishing sequence frees its blocks a step
        # later), and a recomputed sequence's K comes from prefill GEMMs, which round differently from its
        # decode steps in bf16; through the e4m3 codes that can flip a near-tie
        eng = _engine(str(path), dtype=dtype, attention="triton", kv_cache_dtype="fp8", overlap=overlap,
                      kv_cache_tokens=2048 if dtype == "float32" else 16384)
        assert eng.kv_scales.k == ks and eng.cuda_graphs and eng.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
        runs.append(_greedy(eng, prompts, max_new))
        if overlap:
            model = eng.model
            tie = 1e-2 if dtype == "float32" else 0.15
            for i, (p, gen) in enumerate(zip(prompts[:12], runs[0][:12])):
                logits = engine_model_logits(model, p + gen[:-1], ks, vs)[len(p) - 1:]
                for j, tok in enumerate(gen):
                    best = int(logits[j].argmax())
                    if tok != best:
                        gap = float(logits[j, best] - logits[j, tok])
                        assert gap <= tie, f"prompt {i} step {j}: engine {tok}, emulation {best} (gap {gap:.3g})"
                        break
        eng.close()
    assert runs[0] == runs[1]


def test_fp8_kv_cache_holds_twice_the_tokens():
    """Sized from GPU memory, an FP8 cache holds twice the tokens of a bf16 one (random weights of a shape
    with an 8B model's KV per token and small weights: a few GiB of cache is a few thousand blocks)."""
    from batchgen import Engine
    from batchgen.engine.loader import build_model, init_random
    from batchgen.engine.models.config import ModelConfig

    shape = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=256, intermediate_size=512,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=1024,
                 max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    tokens = {}
    for kv in ("auto", "fp8"):
        model = build_model(ModelConfig.from_hf(shape), torch.device("cuda"), torch.bfloat16, qkv_bias=False)
        init_random(model)
        eng = Engine(None, model=model, device="cuda", kv_cache_dtype=kv, gpu_memory_fraction=0.08,
                     max_num_seqs=16, max_batch_tokens=512, cuda_graphs=False)
        tokens[kv] = eng.stats.kv_cache_tokens
        assert ("fp8 e4m3" in eng.describe()) == (kv == "fp8")
        out = eng.generate([[5, 6, 7, 8] * 10], R.greedy_params([4]))[0]
        assert out.error is None and len(out.outputs[0].token_ids) == 4
        eng.close()
        del model
    assert 1.9 < tokens["fp8"] / tokens["auto"] < 2.1, tokens


def test_job_on_cuda_stops_resumes_and_writes_each_row_once(tmp_path, tiny_checkpoint):
    """The run loop on the push API with the overlapped CUDA engine: a graceful stop mid-run commits
    what finished, the rerun does only the rest, every (id, sample) is in the output once, and the
    rerun's rows are (but for float32 near-ties of a different batch mix) the ones a single
    uninterrupted run writes: sampling is seeded per row."""
    import json

    import pyarrow.dataset as pds

    from batchgen.pipeline.config import load_job
    from batchgen.pipeline.run.job import Job

    rows = [{"prompt": f"question number {i}: " + "tell me more " * (i % 7), "k": f"r{i}"} for i in range(120)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def job_file(out: str) -> object:
        p = tmp_path / f"{out}.yaml"
        p.write_text(f"model: {{path: {tiny_checkpoint('llama')}, dtype: float32}}\n"
                     "input: {files: [in.jsonl], id_column: k}\n"
                     "prompt: {column: prompt, chat_template: false}\n"
                     "sampling: {max_new_tokens: 24, n: 2, temperature: 0.8, seed: 3}\n"
                     f"output: {{path: {out}, rows_per_shard: 20, stop_grace_seconds: 60}}\n"
                     "engine: {device: cuda, max_num_seqs: 16, attention: triton}\n")
        return load_job(p)

    def read(out: str) -> dict:
        t = pds.dataset(str(tmp_path / out), format="parquet").to_table().to_pylist()
        keys = [(r["id"], r["sample_index"]) for r in t]
        assert len(keys) == len(set(keys)), "a row is in the output twice"
        return {(r["id"], r["sample_index"]): (r["completion"], r["finish_reason"], r["error"]) for r in t}

    assert Job(job_file("whole"), progress="off").run() == 0
    whole = read("whole")
    assert len(whole) == 240 and all(err is None for _, _, err in whole.values())

    cfg = job_file("split")
    first = Job(cfg, progress="off")
    done = []

    class StopAfter:  # the real engine; the job is asked to stop once 30 rows came back
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def step(self):
            outs = self.engine.step()
            done.extend(outs)
            if len(done) >= 30:
                first.request_stop("stopped by test", exit_code=99)
            return outs

    from batchgen.pipeline.run.engine_setup import make_engine

    first.engine_factory = lambda c: StopAfter(make_engine(c))
    assert first.run() == 99
    part = read("split")
    assert 30 <= len(part) // 2 < 120
    assert Job(job_file("split"), progress="off").run() == 0
    split = read("split")
    assert split.keys() == whole.keys()
    # the same text where the arithmetic is the same: a different batch mix may move a float32 near-tie
    same = sum(split[k] == whole[k] for k in whole) / len(whole)
    print(f"rows with the uninterrupted run's text: {same:.1%}")
    assert same >= 0.95

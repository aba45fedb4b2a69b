"""The Triton fused MoE (kernels/fused_moe.py) against a per-expert reference, on random routings with experts
that get no token: the alignment (pairs sorted by expert into blocks), the two grouped GEMMs and the sum; and
the Triton routing (kernels/moe_route.py) against the torch one.

On the CPU: a float32 suite in a subprocess under the Triton interpreter (TRITON_INTERPRET=1), skipped when
triton is not installed (as in CI). On CUDA: bf16 at the Qwen3-30B-A3B and Mixtral-like shapes, run-to-run
determinism, capture in a CUDA graph (replayed on other routings, every pair on one expert included), and the
engine on tiny MoE checkpoints with decode CUDA graphs against transformers.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import reference as R  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
from interpreter import interpreter_test  # noqa: E402  (tests/ is on the path)
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")


# ----------------------------------------------------------------------------------------- helpers
def routing(T: int, K: int, E: int, used: int | None = None, seed: int = 0, device: str = "cpu"):
    """Random top-K of the first `used` experts (the rest get no token), with renormalised weights."""
    g = torch.Generator().manual_seed(seed)
    used = used or E
    scores = torch.rand(T, E, generator=g)
    scores[:, used:] = -1.0
    w, ids = torch.topk(torch.softmax(scores * 4, -1), K)
    return (w / w.sum(-1, keepdim=True)).to(device), ids.to(device)


def case(T, H, I, E, K, dtype, device, used=None, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, dtype)
    w, ids = routing(T, K, E, used, seed, device)
    return x, w1, w2, ids, w


def per_expert_reference(x, w1, w2, ids, w) -> torch.Tensor:
    """Expert by expert in float64 (on the inputs' device), from the same rounded inputs."""
    xd, w1d, w2d, w = x.double(), w1.double(), w2.double(), w.double()
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in range(w1.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if len(t):
            h = xd[t] @ w1d[e].t()
            out.index_add_(0, t, w[t, j, None] * ((torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2d[e].t()))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert not torch.isnan(a).any()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_align(T, K, E, bm, used=None, seed=0, device="cpu") -> None:
    """Every pair exactly once, in its expert's run of blocks, in pair order within the expert (stable);
    blocks in expert order, padded rows uncounted, unused blocks -1."""
    from batchgen.engine.kernels.fused_moe import max_blocks, moe_align

    _, ids = routing(T, K, E, used, seed, device)
    sorted_ids, block_expert, block_rows = (t.cpu() for t in moe_align(ids, E, bm))
    ids = ids.cpu().reshape(-1)
    nb = max_blocks(ids.numel(), E, bm)
    assert block_expert.numel() == nb and sorted_ids.numel() == nb * bm
    counts = torch.bincount(ids, minlength=E)
    used_blocks = int((block_expert >= 0).sum())
    assert used_blocks == int(((counts + bm - 1) // bm).sum())
    assert (block_expert[used_blocks:] == -1).all() and (block_rows[used_blocks:] == 0).all()
    assert (block_expert[:used_blocks].diff() >= 0).all()
    for e in range(E):
        blocks = (block_expert == e).nonzero().flatten().tolist()
        rows = [r for b in blocks for r in sorted_ids[b * bm: b * bm + int(block_rows[b])].tolist()]
        assert rows == (ids == e).nonzero().flatten().tolist(), f"expert {e}"
        assert all(int(block_rows[b]) == bm for b in blocks[:-1])


def check_fused_moe(T, H, I, E, K, dtype, device, used=None, bm=None, seed=0, tol=None) -> float:
    from batchgen.engine.kernels.fused_moe import fused_moe

    x, w1, w2, ids, w = case(T, H, I, E, K, dtype, device, used, seed)
    got = fused_moe(x, w1, w2, ids, w, bm=bm)
    assert got.shape == x.shape and got.dtype == dtype
    err = rel(got, per_expert_reference(x, w1, w2, ids, w))
    limit = tol or (1e-5 if dtype == torch.float32 else 1.5e-2)
    assert err < limit, f"T={T} H={H} I={I} E={E} K={K} used={used} bm={bm}: rel err {err:.2e}"
    return err


def check_route(T: int, E: int, K: int, dtype: torch.dtype, device: str, renormalise: bool, round_weights: bool,
                seed: int = 0) -> None:
    """kernels/moe_route equals models/moe.route (torch): the same chosen experts (compared through their
    probabilities, so an order among tied logits, frequent in bf16, cannot fail it) and the same weights."""
    from batchgen.engine.kernels.moe_route import moe_route
    from batchgen.engine.models.moe import route
    from batchgen.engine.models.moe_config import MoeConfig

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, E, generator=g) * 3).to(device, dtype)
    if T > 2:
        logits[1] = logits[1, 0]  # a row of E ties: the kernel's rule gives the lowest ids
    moe = MoeConfig(num_experts=E, top_k=K, intermediate_size=1, norm_topk_prob=renormalise,
                    round_weights=round_weights, sparse_layers=(True,))
    w_ref, ids_ref = route(logits, moe)
    w, ids = moe_route(logits, K, renormalise, round_weights)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and w.shape == ids.shape == (T, K)
    probs = torch.softmax(logits.float(), -1)
    torch.testing.assert_close(probs.gather(1, ids.long()), probs.gather(1, ids_ref), rtol=0, atol=0)
    assert (ids.long().sort(1).values.diff(dim=1) > 0).all()  # k distinct experts per token
    torch.testing.assert_close(w, w_ref, rtol=2e-6 if not round_weights else 8e-3, atol=1e-7)
    if T > 2:
        assert ids[1].tolist() == list(range(K))
        nan = logits.clone()
        nan[2] = float("nan")  # a diverged row: garbage weights, but expert ids the MoE kernels can index
        _, nan_ids = moe_route(nan, K, renormalise, round_weights)
        assert ((nan_ids >= 0) & (nan_ids < E)).all()


# ----------------------------------------------------------------------------------------- CPU (interpreter)
def interpreter_suite() -> None:
    for T, E, K, renorm, rnd in [(1, 8, 2, True, False), (37, 128, 8, True, True), (20, 6, 1, False, False),
                                 (9, 60, 4, False, True)]:
        check_route(T, E, K, torch.float32, "cpu", renorm, rnd, seed=T)
    for T, K, E, bm, used in [(1, 1, 4, 16, None), (5, 2, 8, 16, 3), (37, 4, 16, 16, 10), (40, 8, 128, 32, 100),
                              (200, 2, 5, 64, None), (64, 2, 4, 16, 1)]:
        check_align(T, K, E, bm, used)
    errs = []
    for T, H, I, E, K, used, bm in [(1, 64, 32, 8, 2, None, None), (5, 64, 32, 8, 3, 4, None),
                                    (37, 96, 48, 16, 4, 9, None), (64, 64, 32, 4, 2, 1, None),
                                    (33, 80, 40, 6, 2, None, 32), (20, 64, 96, 8, 2, None, 64)]:
        errs.append(check_fused_moe(T, H, I, E, K, torch.float32, "cpu", used, bm))
    check_engine_interpreted()
    print("fused moe interpreter suite ok", " ".join(f"{e:.1e}" for e in errs))


def check_engine_interpreted() -> None:
    """The engine on tiny Qwen3-MoE / Mixtral checkpoints with every MoE layer on the Triton kernels (the
    interpreter makes CPU tensors take them), chunked prefill and decode, against transformers."""
    import tempfile

    from checkpoints import build_checkpoint

    from batchgen.engine.models.moe import impl_for

    assert impl_for(torch.zeros(1)) == "triton"
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen3_moe", "mixtral"):
            path = str(build_checkpoint(family, Path(tmp) / family))
            prompts, max_new = R.random_prompts_for(path, 4, max_len=40), [5, 3, 6, 4]
            eng = R.make_engine(path, max_num_seqs=4, max_batch_tokens=64, kv_cache_tokens=2048)
            try:
                got = [list(o.outputs[0].token_ids) for o in eng.generate(prompts, R.greedy_params(max_new))]
            finally:
                eng.close()
            failures, _ = R.compare_greedy(R.get_reference(path), prompts, got, R.cached_greedy(path, prompts, max_new))
            assert not failures, R.format_failures(failures, f"interpreted {family}")


@pytest.mark.slow
@interpreter_test
def test_fused_moe_triton_interpreter_cpu():
    from interpreter import run_interpreter_suite

    run_interpreter_suite(__file__, "fused moe interpreter suite ok")


# ----------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("T", [1, 7, 64, 256, 300, 2048])
@pytest.mark.parametrize("used", [None, 100])  # 100: experts 100..127 get no token
def test_fused_moe_qwen3_30b_shape_cuda(T, used):
    check_fused_moe(T, 2048, 768, 128, 8, torch.bfloat16, "cuda", used, seed=T)


@cuda_only
@pytest.mark.parametrize("T,E,K,renorm,rnd", [(1, 128, 8, True, True), (256, 128, 8, True, True),
                                               (3000, 128, 8, True, True), (77, 8, 2, True, False),
                                               (40, 60, 4, False, False), (5, 6, 1, True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_route_equals_the_torch_routing_cuda(T, E, K, renorm, rnd, dtype):
    check_route(T, E, K, dtype, "cuda", renorm, rnd, seed=T)


@cuda_only
@pytest.mark.parametrize("T,E,K,used", [(1, 8, 2, None), (33, 8, 2, 3), (500, 8, 2, None), (4096, 6, 1, 2)])
def test_fused_moe_mixtral_like_shapes_cuda(T, E, K, used):
    check_fused_moe(T, 512, 1024, E, K, torch.bfloat16, "cuda", used, seed=T)


@cuda_only
@pytest.mark.parametrize("T,K,E,bm,used", [(1, 8, 128, 16, None), (256, 8, 128, 32, None), (300, 8, 128, 32, 7),
                                           (8192, 8, 128, 64, None), (100, 2, 6, 64, 1)])
def test_moe_align_cuda(T, K, E, bm, used):
    check_align(T, K, E, bm, used, device="cuda")


@cuda_only
@pytest.mark.parametrize("bm", [16, 32, 64])
def test_fused_moe_block_sizes_float32_cuda(bm):
    check_fused_moe(77, 256, 128, 16, 4, torch.float32, "cuda", 11, bm=bm, tol=1e-5)


@cuda_only
def test_fused_moe_is_deterministic_and_matches_the_torch_path_cuda():
    """Two runs are equal to the bit (no atomics: the sum over the top k is one fixed-order reduction), and
    the result is the torch path's (transformers' numerics) up to the order of the bf16 sum."""
    from batchgen.engine.kernels.fused_moe import fused_moe
    from batchgen.engine.models.moe import experts_torch

    x, w1, w2, ids, w = case(256, 2048, 768, 128, 8, torch.bfloat16, "cuda", seed=3)
    a, b = fused_moe(x, w1, w2, ids, w), fused_moe(x, w1, w2, ids, w)
    assert torch.equal(a, b)
    assert rel(a, experts_torch(x, w1, w2, ids, w)) < 1e-2


@cuda_only
def test_fused_moe_in_a_cuda_graph():
    """Captured once; replayed on new routings (a few experts, many experts, four experts taking every pair)
    it equals the eager call."""
    from batchgen.engine.kernels.fused_moe import fused_moe

    x, w1, w2, ids, w = case(64, 512, 256, 32, 4, torch.bfloat16, "cuda", seed=5)
    fused_moe(x, w1, w2, ids, w)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_moe(x, w1, w2, ids, w)
    for seed, used in ((6, None), (7, 5), (8, 0)):
        w_new, ids_new = routing(64, 4, 32, used or None, seed, "cuda")
        if used == 0:  # every token on experts 0..3: four experts, sixteen blocks each
            ids_new = torch.arange(4, device="cuda").repeat(64, 1)
        ids.copy_(ids_new)
        w.copy_(w_new)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.testing.assert_close(out, fused_moe(x, w1, w2, ids, w), rtol=0, atol=0)


@cuda_only
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_engine_on_cuda_with_graphs_matches_transformers(tmp_path_factory, family):
    """The engine's CUDA defaults (decode CUDA graphs, overlap) on float32 (the tests' reference dtype): the
    Triton fused MoE in every step, against transformers and the torch attention backend."""
    from batchgen import Engine

    path = R.make_tiny_checkpoint(family, tmp_path_factory.mktemp(f"cuda-{family}") / family)
    prompts = R.random_prompts_for(path, 24, max_len=300)
    max_new = R.random_max_new(len(prompts))
    base = dict(device="cuda", dtype="float32", max_num_seqs=16, max_batch_tokens=512, kv_cache_tokens=16384)
    outs = {}
    for attention in ("torch", "triton"):
        eng = Engine.from_pretrained(path, attention=attention, **base)
        try:
            # the torch attention backend is not graph-capturable (eager steps); the Triton one is
            assert eng.cuda_graphs == (attention == "triton") and "fused MoE in Triton" in eng.describe()
            outs[attention] = [list(o.outputs[0].token_ids) for o in eng.generate(prompts, R.greedy_params(max_new))]
        finally:
            eng.close()
    ref = R.get_reference(path)
    ref_results = R.cached_greedy(path, prompts, max_new)
    for attention, got in outs.items():
        failures, _ = R.compare_greedy(ref, prompts, got, ref_results)
        assert not failures, R.format_failures(failures, f"cuda {family} {attention}")


@cuda_only
def test_moe_engine_bf16_overlap_equals_sync_cuda(tmp_path_factory):
    """bf16 with graphs: the overlapped loop gives exactly the synchronous loop's tokens (deterministic MoE)."""
    from batchgen import Engine

    path = R.make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("cuda-moe-bf16") / "qwen3_moe")
    prompts = R.random_prompts_for(path, 32, max_len=200)
    max_new = R.random_max_new(len(prompts))
    got = []
    for overlap in (True, False):
        eng = Engine.from_pretrained(path, device="cuda", dtype="bfloat16", overlap=overlap, max_num_seqs=32,
                                     max_batch_tokens=512, kv_cache_tokens=16384)
        try:
            got.append([list(o.outputs[0].token_ids) for o in eng.generate(prompts, R.greedy_params(max_new))])
        finally:
            eng.close()
    assert got[0] == got[1]


if __name__ == "__main__" and "--interpret" in sys.argv:
    interpreter_suite()

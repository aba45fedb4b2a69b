"""`batchgen run --dry-run` names the implementation, attention backend and dtype the model gets, without
loading weights; an architecture the engine refuses and an unknown alias end it with one line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = """\
model: {{path: {model}}}
input: {{files: [prompts.jsonl]}}
prompt: {{column: prompt}}
output: {{path: out}}
engine: {{device: {device}}}
"""


def dry_run(tmp_path: Path, model: str, *sets: str, device: str = "cpu") -> subprocess.CompletedProcess:
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Write a haiku"}) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(model=model, device=device))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "batchgen.cli", "run", "--dry-run", str(job), "--preview", "0",
                           *args], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)


def model_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("model: ")]
    assert len(lines) == 1, r.stdout
    return lines[0]


def without_weights(ck: Path, dst: Path) -> Path:
    """The checkpoint with its weights replaced by garbage: a dry run that still works never read them."""
    shutil.copytree(ck, dst)
    for f in dst.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    return dst


@pytest.mark.parametrize("family, expect", [
    ("qwen3", "model: llama decoder (model_type qwen3, Qwen3ForCausalLM, q/k norm), attention torch on cpu, "
              "dtype float32"),
    ("llama3.1", "model: llama decoder (model_type llama, LlamaForCausalLM, rope llama3), attention torch on cpu, "
                 "dtype float32"),
    ("qwen3_moe", "model: llama decoder with MoE experts in torch (model_type qwen3_moe, Qwen3MoeForCausalLM, "
                  "q/k norm, MoE top-3 of 8 experts, renormalised), attention torch on cpu, dtype float32"),
    ("mixtral", "model: llama decoder with MoE experts in torch (model_type mixtral, MixtralForCausalLM, MoE top-2 of "
                "6 experts, renormalised), attention torch on cpu, dtype float32"),
])
def test_dry_run_names_implementation_attention_and_dtype(tiny_checkpoint: Any, tmp_path: Path, family: str,
                                                          expect: str) -> None:
    model = without_weights(tiny_checkpoint(family), tmp_path / "model")
    r = dry_run(tmp_path, "model")
    assert model_line(r) == expect
    assert "loading model" not in r.stderr and not (tmp_path / "out").exists()
    # model.dtype and engine.attention as the job sets them
    line = model_line(dry_run(tmp_path, str(model), "model.dtype=bfloat16", "engine.attention=torch"))
    assert line.endswith("attention torch on cpu, dtype bfloat16")


def test_dry_run_names_sliding_windows(tiny_checkpoint: Any, tmp_path: Path) -> None:
    without_weights(tiny_checkpoint("mistral", sliding_window=8), tmp_path / "model")
    assert "sliding window 8 on 2/2 layers" in model_line(dry_run(tmp_path, "model"))


def test_unsupported_architecture_is_refused_in_one_line(tiny_checkpoint: Any, tmp_path: Path) -> None:
    """The engine's own refusal (ModelConfig.from_hf): it names the architecture and the supported ones."""
    without_weights(tiny_checkpoint("gpt2"), tmp_path / "model")
    r = dry_run(tmp_path, "model")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "unsupported model architecture 'GPT2LMHeadModel'" in err and "'gpt2'" in err
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in err, err


def test_unknown_alias_lists_the_known_ones(tmp_path: Path) -> None:
    r = dry_run(tmp_path, "smollm2-1.7b-instruct")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "'smollm2-1.7b-instruct'" in err and "known aliases: smollm2-135m-instruct" in err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_dry_run_on_cuda_says_triton(tiny_checkpoint: Any, tmp_path: Path) -> None:
    without_weights(tiny_checkpoint("qwen3"), tmp_path / "model")
    line = model_line(dry_run(tmp_path, "model", device="cuda"))
    assert line.endswith("attention triton on cuda, dtype bfloat16"), line
    line = model_line(dry_run(tmp_path, "model", "engine.attention=torch", device="cuda"))
    assert line.endswith("attention torch on cuda, dtype bfloat16"), line
    without_weights(tiny_checkpoint("qwen3_moe"), tmp_path / "moe")
    line = model_line(dry_run(tmp_path, "moe", device="cuda"))
    assert line.startswith("model: llama decoder with fused MoE in Triton (model_type qwen3_moe"), line


def test_model_context_of_an_alias_comes_from_its_converted_config(tmp_path: Path, smollm2_dir: Path) -> None:
    """The dry run's prompt limit uses the model's own context length for an alias (its converted GGUF's
    config.json), not only for a local directory (it used the 4096 default there)."""
    from batchgen.pipeline.config import parse_job
    from batchgen.pipeline.run.engine_setup import model_context

    want = json.loads((smollm2_dir / "config.json").read_text())["max_position_embeddings"]
    for path in ("smollm2-135m-instruct", str(smollm2_dir)):
        cfg = parse_job({"model": {"path": path}, "input": {"files": ["x.jsonl"]}, "prompt": {"column": "q"},
                         "output": {"path": "out"}}, base_dir=tmp_path)
        assert model_context(cfg) == want


def test_dry_run_names_tensor_parallel_and_refuses_a_split_that_does_not_divide(tiny_checkpoint: Any,
                                                                                 tmp_path: Path) -> None:
    without_weights(tiny_checkpoint("qwen3"), tmp_path / "model")
    line = model_line(dry_run(tmp_path, "model", "engine.tensor_parallel=2"))
    assert line.endswith("attention torch on cpu, dtype float32, tensor parallel 2 (gloo)"), line
    r = dry_run(tmp_path, "model", "engine.tensor_parallel=3")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert ("engine.tensor_parallel: tensor_parallel 3 must divide num_attention_heads (4) and intermediate_size "
            "(128)") in err, err

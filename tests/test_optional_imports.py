"""The engine and a whole job run where the heavy optional packages are missing: triton, flash_attn, gguf,
datasets and llguidance blocked in a subprocess (sys.modules[name] = None makes every import of them fail),
so a machine without them loses nothing but what they are for. CI installs triton for the interpreter
suites (Makefile): without this test nothing there would run the engine without it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("triton", "flash_attn", "gguf", "datasets", "llguidance")

SCRIPT = """\
import sys
for name in {blocked!r}:
    sys.modules[name] = None
from click.testing import CliRunner
from batchgen import Engine, SamplingParams
from batchgen.cli import cli

engine = Engine({model!r}, device="cpu", kv_cache_tokens=1024)
out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=4, ignore_eos=True))
assert len(out[0].outputs[0].token_ids) == 4, out
engine.close()
result = CliRunner().invoke(cli, ["run", {job!r}, "--progress", "off"])
assert result.exit_code == 0, result.output
print("loaded:", [name for name in {blocked!r} if sys.modules.get(name) is not None])
"""


def test_engine_and_a_job_run_without_the_optional_packages(tiny_checkpoint, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    model = str(tiny_checkpoint("llama"))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(3)))
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(f"""\
        model: {{path: {model}}}
        input: {{files: [data.jsonl]}}
        prompt: {{column: prompt, chat_template: false}}
        sampling: {{max_new_tokens: 4}}
        output: {{path: out}}
        """))
    code = SCRIPT.format(blocked=BLOCKED, model=model, job=str(job))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "loaded: []" in r.stdout
    shards = sorted((tmp_path / "out").glob("*.parquet"))
    rows = [r for f in shards for r in pq.read_table(f).to_pylist()]
    assert sorted(r["id"] for r in rows) == [0, 1, 2] and all(r["error"] is None for r in rows), rows
    assert all(r["completion_tokens"] == 4 for r in rows), rows

"""Issue 11: job files and --set values that cannot make silently wrong output, checks that need
the machine (device, attention backend, output path), the sbatch script against hostile names,
dead tasks in `batchgen status`, and live progress. Every refusal is one line, exit 2, before
the model loads."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from batchgen.pipeline import config as configmod
from batchgen.pipeline.config.sections import all_rules
from batchgen.cli import cli
from batchgen.pipeline.config import ConfigError, load_job, parse_job

ROOT = Path(__file__).resolve().parents[1]

BASE = {"model": "model: {path: some-model}\n", "input": "input: {files: [data.jsonl]}\n",
        "prompt": "prompt: {column: prompt}\n", "output": "output: {path: out}\n"}


def write_job(tmp_path: Path, section: str = "", body: str = "") -> tuple[Path, int]:
    """job.yaml with `section:` holding the lines of `body`; returns it and the line of body's first key."""
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi", "x": 1}\n')
    parts = dict(BASE)
    text = "".join(v for k, v in parts.items() if k != section)
    line = None
    if section:
        line = text.count("\n") + 2
        text += f"{section}:\n" + textwrap.indent(textwrap.dedent(body), "  ")
    job = tmp_path / "job.yaml"
    job.write_text(text)
    return job, line or 0


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.output


def assert_refused(job: Path, expect: str, *extra: str) -> None:
    """`batchgen run` (and --dry-run) print exactly `error: <expect>` and exit 2, creating nothing."""
    for dry in ([], ["--dry-run"]):
        code, out = run_cli("run", *dry, str(job), *extra)
        assert code == 2, out
        assert out.strip() == f"error: {expect}", out
    assert not (job.parent / "out").exists()


# ------------------------------------------------------------------ case 6: numbers, stop, templates
BAD_VALUES = [
    # (section, key, YAML value, what the message says after "key: ")
    ("sampling", "temperature", ".nan", "must be a finite number, got nan"),
    ("sampling", "temperature", ".inf", "must be a finite number, got inf"),
    ("sampling", "temperature", "1.0e+39", "must be a finite number >= 0, got 1e+39"),  # inf in float32
    ("sampling", "top_p", ".nan", "must be a finite number, got nan"),
    ("sampling", "min_p", ".nan", "must be a finite number, got nan"),
    ("sampling", "repetition_penalty", ".nan", "must be a finite number, got nan"),
    ("sampling", "repetition_penalty", ".inf", "must be a finite number, got inf"),
    ("sampling", "repetition_penalty", "1.0e-50", "must be a finite number >= 1.18e-38, got 1e-50"),
    ("sampling", "top_k", str(2**70), f"must be <= 2147483647, got {2**70}"),
    ("sampling", "n", str(10**8), "must be an integer in [1, 4096], got 100000000"),
    ("sampling", "max_new_tokens", str(2**40), f"must be <= 2147483647, got {2**40}"),
    ("sampling", "seed", str(2**70), f"must be <= 9223372036854775807, got {2**70}"),
    ("sampling", "stop", "['']", None),
    ("sampling", "stop", "['a', '']", None),
    ("sampling", "stop_token_ids", "[-1]", None),
    ("sampling", "stop_token_ids", f"[3, {2**40}]", None),
    ("sampling", "stop_token_ids", f"[{2**70}]", None),
    ("output", "stop_grace_seconds", ".inf", "must be a finite number, got inf"),
    ("output", "stop_grace_seconds", "1.0e+12", "must be <= 86400.0, got 1000000000000.0"),
    ("output", "flush_seconds", ".nan", "must be a finite number, got nan"),
    ("output", "rows_per_shard", str(2**64), f"must be <= 9223372036854775807, got {2**64}"),
    ("engine", "gpu_memory_fraction", ".nan", "must be a finite number, got nan"),
    ("engine", "gpu_memory_fraction", ".inf", "must be a finite number, got inf"),
    ("engine", "block_size", "3", "must be a power of two >= 1 (16 is the default), got 3"),
    ("engine", "kv_cache_tokens", "1", "kv_cache_tokens=1 is smaller than one block of 16 tokens; give at "
                                       "least 16 (or None to size the cache from memory)"),
    ("engine", "max_num_seqs", str(2**40), f"must be <= 2147483647, got {2**40}"),
    ("engine", "device", "tpu", "'tpu' is not a device batchgen runs on: auto, cpu, cuda or cuda:N"),
    ("engine", "device", "gpu", "'gpu' is not a device batchgen runs on: auto, cpu, cuda or cuda:N "
                                "(did you mean 'cuda'?)"),
    ("engine", "device", "mps", "'mps' is not a device batchgen runs on: auto, cpu, cuda or cuda:N"),
    ("input", "limit", str(2**64), f"must be <= 9223372036854775807, got {2**64}"),
]


@pytest.mark.parametrize("section, key, value, words", BAD_VALUES, ids=lambda v: str(v)[:24])
def test_bad_numbers_and_lists_are_refused_before_the_model_loads(tmp_path: Path, section: str, key: str,
                                                                  value: str, words: str | None) -> None:
    body = {"input": "files: [data.jsonl]\n", "output": "path: out\n"}.get(section, "")
    job, line = write_job(tmp_path, section, body + f"{key}: {value}\n")
    line += body.count("\n")
    with pytest.raises(ConfigError) as ei:
        load_job(job)
    msg = str(ei.value)
    assert msg.startswith(f"{job}:{line}: {section}.{key}"), msg
    if words is not None:
        assert msg == f"{job}:{line}: {section}.{key}: {words}"
    else:  # a list item: the item is named
        assert f"{section}.{key}[" in msg and ("non-empty" in msg or "[0, 2147483647]" in msg
                                               or "<= 9223372036854775807" in msg), msg
    assert_refused(job, msg)


def _numeric_rules() -> list[tuple[str, str, str]]:
    return [(sec, key, r.kind) for (sec, key), r in all_rules().items() if r.kind in ("int", "float")]


def _job_data(section: str, key: str, value: Any) -> dict:
    data: dict[str, Any] = {"model": {"path": "m"}, "input": {"files": ["x.jsonl"]}, "prompt": {"column": "p"},
                            "output": {"path": "o"}}
    if section:
        data.setdefault(section, {})[key] = value
    else:
        data[key] = value
    return data


@pytest.mark.parametrize("section, key, kind", _numeric_rules(), ids=lambda v: str(v))
def test_every_numeric_key_refuses_nan_inf_and_huge(section: str, key: str, kind: str) -> None:
    """The whole class: every int and float key of every section, not only the ones seen failing."""
    name = f"{section}.{key}" if section else key
    huge = (2**70, -(2**70), 10**400) if kind == "int" else (10**400, -(10**400), 1e308 * 10)
    for value in (math.nan, math.inf, -math.inf, *huge):
        with pytest.raises(ConfigError) as ei:
            parse_job(_job_data(section, key, value), where="job.yaml")
        assert f": {name}: " in str(ei.value), (value, str(ei.value))


# the config's verdict must never be "fine" where the engine's is "error" (the two used to disagree)
GRID = {
    "temperature": [0, 0.5, 2, 1e38, 1e39, -0.0], "top_p": [1e-45, 1e-30, 0.5, 1, 1.0000001],
    "min_p": [0, 1, 1e-45], "repetition_penalty": [1e-38, 1.2e-38, 1, 1e38, 1e39],
    "top_k": [-(2**40), -1, 0, 1, 2**31 - 1, 2**31], "n": [1, 4096, 4097], "max_new_tokens": [1, 2**31 - 1],
    "min_new_tokens": [0, 5], "stop_token_ids": [[0], [2**31 - 1], [2**31]], "stop": [["x"], "x", [" "]],
}
ENGINE_GRID = {"block_size": [1, 2, 16, 48, 256], "kv_cache_tokens": [None, 1, 16, 17],
               "gpu_memory_fraction": [1e-9, 0.5, 1.0], "max_num_seqs": [1, 2**31 - 1],
               "max_model_len": [None, 1, 2**31 - 1], "threads": [None, 1]}


def test_config_accepts_nothing_the_engine_refuses() -> None:
    from batchgen.engine.validation import EngineArgumentError, check_engine_args
    from batchgen.pipeline.prompt.request_params import request_params as sampling_params

    for section, grid in (("sampling", GRID), ("engine", ENGINE_GRID)):
        for key, values in grid.items():
            for v in values:
                data = _job_data(section, key, v)
                data["engine"] = dict(data.get("engine", {}), device="cpu")
                try:
                    cfg = parse_job(data, where="job.yaml")
                except ConfigError:
                    continue
                try:  # what the job hands the engine
                    sampling_params(cfg, 7)
                    check_engine_args(**configmod.engine_kwargs(cfg))
                except EngineArgumentError as e:
                    pytest.fail(f"{section}.{key}={v!r}: the job file accepts it, the engine refuses it: {e}")


@pytest.mark.parametrize("template, words", [
    ("{prompt:>100000000000}", "format specs (':>100000000000') are not allowed"),
    ("{prompt:.99999999999}", "format specs"),
    ("{prompt:{x}}", "format specs"),
    ("{x:,}", "format specs"),
    ("{prompt.__class__}", "attribute lookups are not allowed"),
    ("{prompt!x}", "unknown conversion '!x'"),
    ("{prompt[0]b}", "is not a valid template"),
])
def test_template_format_specs_are_refused(tmp_path: Path, template: str, words: str) -> None:
    job, line = write_job(tmp_path, "prompt", f"column: prompt\ntemplate: '{template}'\n")
    with pytest.raises(ConfigError) as ei:
        load_job(job)
    msg = str(ei.value)
    assert msg.startswith(f"{job}:{line + 1}: prompt.template: is not a valid template: ") and words in msg, msg
    assert_refused(job, msg)


def test_plain_templates_still_work(tmp_path: Path) -> None:
    job, _ = write_job(tmp_path, "prompt", "column: prompt\ntemplate: 'Q {prompt!r} {x} {x[0]} {{literal}} {x:}'\n")
    assert load_job(job).prompt.template.startswith("Q {prompt!r}")
    assert configmod.template_fields("{a[k]} {b!s} {a}") == ["a", "b"]


def test_yaml_numbers_for_string_keys_keep_their_text(tmp_path: Path) -> None:
    """revision: 012345 is YAML's octal int 5349; a string key wants the text as written."""
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: m}\ninput:\n  dataset: a/b\n  revision: 012345\n  config: 2023\n"
                   "prompt: {column: p}\noutput: {path: o}\n")
    cfg = load_job(job)
    assert cfg.input.revision == "012345" and cfg.input.config == "2023"


# ------------------------------------------------------------------ case 14: --set values
@pytest.mark.parametrize("arg, key, want", [
    ("prompt.template=Q: {x}", "template", "Q: {x}"),
    ("prompt.template={prompt}", "template", "{prompt}"),
    ("prompt.template=- {prompt}", "template", "- {prompt}"),
    ("prompt.template='{prompt}: quoted'", "template", "{prompt}: quoted"),
    ("prompt.system=Reply: briefly", "system", "Reply: briefly"),
    ("prompt.system=true", "system", "true"),
    ("prompt.system=null", "system", None),
    ("input.revision=012345", "revision", "012345"),
    ("sampling.temperature=0.5", "temperature", 0.5),
    ("sampling.stop=[a, 'b: c']", "stop", ["a", "b: c"]),
    ("sampling.stop=x: y", "stop", ["x: y"]),
    ("sampling.ignore_eos=true", "ignore_eos", True),
])
def test_set_values_that_are_not_plain_scalars_are_strings(tmp_path: Path, arg: str, key: str, want: Any) -> None:
    job, _ = write_job(tmp_path)
    if key == "revision":
        job.write_text(job.read_text().replace("input: {files: [data.jsonl]}", "input: {dataset: a/b}"))
    cfg = load_job(job, [arg])
    section = arg.split(".", 1)[0]
    assert getattr(getattr(cfg, section), key) == want


@pytest.mark.parametrize("args, expect", [
    (["sampling.temperature=abc"],
     "--set sampling.temperature=abc: sampling.temperature: must be a number, got the string 'abc'"),
    (["sampling.temperature=.nan"], "--set sampling.temperature=.nan: sampling.temperature: must be a finite number, got nan"),
    (["sampling.temprature=0"], "--set sampling.temprature=0: sampling.temprature: unknown key (did you mean 'temperature'?)"),
    (["sampling.n=0"], "--set sampling.n=0: sampling.n: must be >= 1, got 0"),
    (["sampling.stop=['']"], "--set sampling.stop=['']: sampling.stop[0]: must be a non-empty str, got ''"),
    (["engine.block_size=3"], "--set engine.block_size=3: engine.block_size: must be a power of two >= 1 (16 is the default), got 3"),
    (["prompt.template={prompt:>9}"], "--set prompt.template={prompt:>9}: prompt.template: is not a valid template: "
     "{prompt:>9}: format specs (':>9') are not allowed; the template inserts column values as they are"),
    (["foo.bar=1"], "--set foo.bar=1: foo: unknown key (expected one of: model, input, prompt, sampling, output, "
     "engine, cost_per_hour)"),
    (["sampling.temperature=0", "output.flush_seconds=x\ny"],  # YAML folds the line; the message stays one
     "--set output.flush_seconds=x\\ny: output.flush_seconds: must be a number, got the string 'x y'"),
    (["prompt.system='a\n\nb'", "prompt.max_tokens='a\n\nb'"],
     "--set prompt.max_tokens='a\\n\\nb': prompt.max_tokens: must be an integer, got the string 'a\\nb'"),
])
def test_set_errors_name_the_set_argument(tmp_path: Path, args: list[str], expect: str) -> None:
    # the file sets these keys too: the error is the --set value's, not the file line's
    job, _ = write_job(tmp_path, "sampling", "temperature: 0.7\nn: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_job(job, args)
    assert str(ei.value) == expect
    if "\n" not in expect:
        code, out = run_cli("run", str(job), *[a for x in args for a in ("--set", x)])
        assert code == 2 and out.strip() == f"error: {expect}"


# ------------------------------------------------------------------ case 12: this machine
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_cuda_device_without_cuda_is_one_line(tmp_path: Path) -> None:
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    job, line = write_job(tmp_path, "engine", "device: cuda\n")
    assert_refused(job, f"{job}:{line}: engine.device: device 'cuda' needs CUDA, which is not available here")
    assert_refused(job, "--set engine.device=cuda:1: engine.device: device 'cuda:1' needs CUDA, which is not "
                        "available here", "--set", "engine.device=cuda:1")


def test_cuda_device_fails_in_a_real_process_before_loading(tmp_path: Path) -> None:
    if _cuda_available():
        pytest.skip("this machine has CUDA")
    job, line = write_job(tmp_path, "engine", "device: cuda\n")
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(job)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: {job}:{line}: engine.device: device 'cuda' needs CUDA, which is not available here"


@pytest.mark.parametrize("name, module", [("flash", "flash_attn"), ("triton", "triton")])
def test_attention_backend_not_installed(tmp_path: Path, name: str, module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    job, line = write_job(tmp_path, "engine", f"attention: {name}\n")
    code, out = run_cli("run", str(job))
    assert code == 2 and out.startswith(f"error: {job}:{line}: engine.attention: {name} needs ")
    assert "not installed" in out and len(out.strip().splitlines()) == 1


def test_attention_backend_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed, but flash/triton run on CUDA only."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "triton" else real(n, *a))
    job, line = write_job(tmp_path, "engine", "attention: triton\ndevice: cpu\n")
    assert_refused(job, f"{job}:{line}: engine.attention: triton needs a CUDA device, and engine.device: cpu is the "
                        "CPU here (attention: auto picks the torch backend)")


def test_output_path_that_is_a_file_or_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, line = write_job(tmp_path, "output", "path: data.jsonl\n")
    assert_refused(job, f"{job}:{line}: output.path: {tmp_path / 'data.jsonl'} is a file, not a directory")
    job.write_text(job.read_text().replace("path: data.jsonl", "path: data.jsonl/out"))
    assert_refused(job, f"{job}:{line}: output.path: can't create {tmp_path / 'data.jsonl' / 'out'}: "
                        f"{tmp_path / 'data.jsonl'} is a file, not a directory")
    # not writable (chmod does not stop root, so the permission answer is faked)
    job.write_text(job.read_text().replace("path: data.jsonl/out", "path: ro/out"))
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path / "ro" else real(p, mode, **kw))
    code, out = run_cli("run", "--dry-run", str(job))
    assert code == 2 and out.strip() == (f"error: {job}:{line}: output.path: can't create {tmp_path / 'ro' / 'out'}: "
                                          f"{tmp_path / 'ro'} is not writable")


def test_engine_argument_error_at_start_up_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tiny_checkpoint: Callable[..., Path]) -> None:
    """Whatever the engine still refuses when it starts becomes the job file's error, not a traceback."""
    from batchgen.pipeline.run import engine_setup as jobmod
    from batchgen.engine.validation import EngineArgumentError

    def refuse(cfg: Any) -> Any:
        raise EngineArgumentError("Engine: max_batch_tokens must be an integer >= 64 here, got 8")

    monkeypatch.setattr(jobmod, "make_engine", refuse)
    (tmp_path / "model").symlink_to(tiny_checkpoint("smollm2"))
    job, line = write_job(tmp_path, "engine", "device: cpu\nmax_batch_tokens: 8\n")
    job.write_text(job.read_text().replace("some-model", "model"))
    code, out = run_cli("run", "--progress", "off", str(job))
    assert code == 2, out
    assert out.strip().splitlines()[-1] == (f"error: {job}:{line + 1}: engine.max_batch_tokens: must be an integer "
                                            ">= 64 here, got 8")
    assert "Traceback" not in out


# ------------------------------------------------------------------ case 15: live progress
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_tok_s_and_eta_count_tokens_as_they_are_generated() -> None:
    """300 rows of ~200 tokens at 1000 tok/s (a one-minute job): the first rows to finish are the
    short ones. Counted from finished rows, 10 s in, that was 20 tok/s and an ETA of 12 minutes."""
    from batchgen.pipeline.progress import Progress

    clock, engine = FakeClock(), {"generated": 0}
    p = Progress(300, 0, mode="off", generated=lambda: engine["generated"], tokens_per_row=512, clock=clock)
    p.start_clock()
    clock.t += 5
    engine["generated"] = 5000
    assert p.tok_s == pytest.approx(1000)  # no row has finished yet
    assert p.eta() is not None and p.eta() <= 300 * 512 / 1000  # bounded by the upper bound
    clock.t += 5
    engine["generated"] = 10000
    for _ in range(4):
        p.update(1, 50)
    assert p.tok_s == pytest.approx(1000)
    assert 15 < p.eta() < 60, p.eta()  # about 50 s are left
    assert "1,000.0 output tok/s" in p.line()


def test_set_generated_pushes_the_count() -> None:
    from batchgen.pipeline.progress import Progress

    clock = FakeClock()
    p = Progress(10, 0, mode="off", clock=clock)
    p.set_generated(700)  # the engine had sampled 700 tokens before this run: not this run's
    p.start_clock()
    clock.t += 2
    p.set_generated(900)
    assert p.tok_s == pytest.approx(100) and p.generated_tokens == 200
    p.update(5, 150)
    # tokens: 30 per row, 50 already sampled for the rest -> 1 s; half the rows are done, so their pace
    # (5 rows in 2 s: 2 s for the other 5) bounds it from below
    assert p.eta() == pytest.approx(max((5 * 30 - 50) / 100, 5 / (5 / 2)))


def test_eta_never_says_nothing_is_left_while_rows_run() -> None:
    """Every row in flight and the short ones done first (make demo: 9 of 24 rows at 60 s): the in-flight rows
    already hold more tokens than the finished rows' mean predicts, so the token estimate reached 0 ("ETA 00:00"
    at 37%); the ETA then follows the finished rows' pace instead."""
    from batchgen.pipeline.progress import Progress

    clock = FakeClock()
    p = Progress(24, 0, mode="off", clock=clock, tokens_per_row=96)
    p.start_clock()
    clock.t += 60
    p.set_generated(1300)  # 15 rows still running hold ~800 tokens
    p.update(9, 500)  # the 9 finished rows were short: ~55 tokens each
    assert p.eta() == pytest.approx(15 / (9 / 60)), p.eta()  # 100 s at the finished rows' pace, never 0


def test_without_a_live_count_progress_is_as_before() -> None:
    from batchgen.pipeline.progress import Progress

    clock = FakeClock()
    p = Progress(10, 0, mode="off", clock=clock)
    p.start_clock()
    clock.t += 10
    p.update(2, 40)
    assert p.tok_s == pytest.approx(4) and p.eta() == pytest.approx(40)


@pytest.mark.parametrize("mode", ["log", "bar"])
def test_display_refreshes_while_no_row_finishes(mode: str) -> None:
    import io

    from batchgen.pipeline.progress import Progress

    buf, engine = io.StringIO(), {"generated": 0}
    p = Progress(50, 0, mode=mode, log_every=0.05, stream=buf, generated=lambda: engine["generated"],
                 tokens_per_row=100)
    p.TICK_S = 0.05
    p.start_clock()
    try:
        deadline = time.monotonic() + 20
        while not any(float(x.replace(",", "")) > 0 for x in re.findall(r"([\d,.]+) (?:output )?tok/s", buf.getvalue())):
            engine["generated"] += 50  # tokens are sampled, no row finishes
            assert time.monotonic() < deadline, buf.getvalue()
            time.sleep(0.02)
        shown = buf.getvalue()
    finally:
        p.close()
    assert p.done == 0
    assert re.search(r"ETA \d", shown), shown  # an estimate from the tokens, before any row finished


def test_urgent_prints_at_once_from_a_signal_handler_with_the_bar_on(tmp_path: Path) -> None:
    """What the run loop prints on the first Ctrl-C: written by one os.write, so it is on the terminal
    at once (no buffer to flush, no lock the interrupted code may hold), the bar redrawn after."""
    from batchgen.pipeline.progress import Progress

    out = tmp_path / "tty"
    stream = open(out, "w")  # block-buffered: a print would sit in the buffer
    p = Progress(10, 0, mode="bar", stream=stream)
    p.start_clock()
    p.update(1, 3)
    msg = "stopping: finishing 4 in-flight rows (up to 10 s); press Ctrl-C again to stop now"
    old = signal.signal(signal.SIGALRM, lambda s, f: p.urgent(msg))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        deadline = time.monotonic() + 10
        while msg.encode() not in out.read_bytes():
            assert time.monotonic() < deadline
            print("x" * 100, file=stream, end="")  # the main thread keeps writing to the same stream
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    text = out.read_bytes().decode()  # bytes: read_text() would turn each \r into \n
    assert "\r" + " " * 79 + "\r" + msg + "\n" in text  # the bar's line blanked first
    p.update(1, 3)
    p.close()
    stream.close()
    after = out.read_bytes().decode().split(msg, 1)[1]
    assert "2/10" in after and "tok/s" in after  # the bar is drawn again below the message


def test_track_tokens_after_start_clock() -> None:
    """The form the run loop uses: the engine exists only after Progress started its clock."""
    from batchgen.pipeline.progress import Progress

    clock, engine = FakeClock(), {"generated": 300}
    p = Progress(10, 0, mode="off", clock=clock)
    p.start_clock()
    p.track_tokens(lambda: engine["generated"], tokens_per_row=64)
    clock.t += 2
    engine["generated"] = 500
    assert p.tok_s == pytest.approx(100) and p.eta() == pytest.approx((10 * 64 - 200) / 100)

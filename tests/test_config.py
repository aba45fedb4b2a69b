"""Job file validation: every bad job file fails before the model loads, with one clear line
that names the key (exit code 2, no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from batchgen.cli import cli
from batchgen.pipeline.config import ConfigError, job_fingerprint, load_job

ROOT = Path(__file__).resolve().parents[1]


def write_job(tmp_path: Path, text: str, rows: int = 3) -> Path:
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"hi {i}", "cat": i}) + "\n" for i in range(rows)))
    job = tmp_path / "job.yaml"
    job.write_text(textwrap.dedent(text))
    return job


GOOD = """\
model: {path: smollm2-135m-instruct}
input:
  files: [data.jsonl]
  columns: [cat]
prompt:
  column: prompt
output:
  path: out
"""


def run_cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.output


def test_good_job_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_job(write_job(tmp_path, GOOD))
    assert cfg.sampling.max_new_tokens == 512 and cfg.sampling.temperature == 0.7
    assert cfg.output.rows_per_shard == 10000 and cfg.output.compression == "zstd"
    assert cfg.engine.max_num_seqs == 256 and cfg.prompt.on_too_long == "skip"
    assert cfg.input.columns == ["cat"] and cfg.cost_per_hour is None


def test_example_and_demo_jobs_are_valid() -> None:
    for name in ("example.yaml", "demo.yaml"):
        cfg = load_job(ROOT / "jobs" / name)
        assert cfg.model.path


@pytest.mark.parametrize(
    "patch, expect",
    [
        ("sampling: {temprature: 0.5}\n", ["sampling.temprature", "unknown key", "did you mean 'temperature'"]),
        ("outptu: {path: x}\n", ["outptu", "did you mean 'output'"]),
        ("sampling: {max_new_tokens: many}\n", ["sampling.max_new_tokens", "must be an integer", "many"]),
        ("sampling: {temperature: -1}\n", ["sampling.temperature", ">= 0"]),
        ("sampling: {top_p: 0}\n", ["sampling.top_p", "> 0"]),
        ("sampling: {n: true}\n", ["sampling.n", "must be an integer"]),
        ("engine: {overlap: maybe}\n", ["engine.overlap", "true or false"]),
        ("engine: {attention: trition}\n", ["engine.attention", "did you mean 'triton'"]),
        ("output: {path: out, compression: zip}\n", ["output.compression", "'zip'"]),
        ("prompt: {column: prompt, on_too_long: cut}\n", ["prompt.on_too_long", "'cut'"]),
        ("prompt: {column: prompt, messages_column: m}\n", ["prompt", "exactly one of prompt.column and prompt.messages_column"]),
        ("prompt: {template: 'x {prompt}'}\n", ["prompt", "neither is set"]),
        ("input: {files: [data.jsonl], dataset: foo/bar}\n", ["input", "exactly one of input.dataset and input.files"]),
        ("input: {files: [data.jsonl], split: train}\n", ["input.split", "only applies to input.dataset"]),
        ("input: {files: [data.jsonl], limit: -3}\n", ["input.limit", ">= 0"]),
        ("prompt: {column: prompt, template: 'a {} b'}\n", ["prompt.template", "name a column"]),
        ("cost_per_hour: cheap\n", ["cost_per_hour", "must be a number"]),
        ("model: 5\n", ["model", "must be a mapping"]),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, patch: str, expect: list[str]) -> None:
    base = {k: v for k, v in [("model", "model: {path: smollm2-135m-instruct}\n"),
                              ("input", "input: {files: [data.jsonl]}\n"),
                              ("prompt", "prompt: {column: prompt}\n"),
                              ("output", "output: {path: out}\n")]}
    key = patch.split(":", 1)[0]
    if key in base:
        base[key] = patch
        text = "".join(base.values())
    else:
        text = "".join(base.values()) + patch
    job = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_job(job)
    msg = str(ei.value)
    assert "\n" not in msg
    for e in expect:
        assert e in msg, msg
    code, out = run_cli("run", str(job))
    assert code == 2
    assert out.strip().startswith("error: ") and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    job = write_job(tmp_path, "model: {path: x}\ninput:\n  files: [data.jsonl\nprompt: {column: prompt}\n")
    code, out = run_cli("run", str(job))
    assert code == 2 and "YAML syntax error" in out and "job.yaml:" in out
    with pytest.raises(ConfigError, match=r"job\.yaml:\d+: YAML syntax error"):
        load_job(job)


def test_duplicate_key_and_line_numbers(tmp_path: Path) -> None:
    job = write_job(tmp_path, GOOD + "sampling:\n  n: 2\n  n: 3\n")
    with pytest.raises(ConfigError, match="duplicate key 'n'"):
        load_job(job)
    job = write_job(tmp_path, GOOD + "sampling:\n  seed: 1\n  tempreature: 0\n")
    with pytest.raises(ConfigError, match=r"job\.yaml:11: sampling\.tempreature"):
        load_job(job)


def test_missing_sections_and_required_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="output: missing section"):
        load_job(write_job(tmp_path, "model: {path: x}\ninput: {files: [data.jsonl]}\nprompt: {column: prompt}\n"))
    with pytest.raises(ConfigError, match=r"model\.path: missing"):
        load_job(write_job(tmp_path, "model: {dtype: auto}\ninput: {files: [data.jsonl]}\nprompt: {column: prompt}\noutput: {path: o}\n"))
    with pytest.raises(ConfigError, match="empty"):
        load_job(write_job(tmp_path, ""))
    with pytest.raises(ConfigError, match="no such job file"):
        load_job(tmp_path / "nope.yaml")


def test_missing_input_file_and_column(tmp_path: Path) -> None:
    job = write_job(tmp_path, GOOD.replace("data.jsonl", "missing.jsonl"))
    code, out = run_cli("run", str(job))
    assert code == 2 and "input.files" in out and "no such file" in out
    job = write_job(tmp_path, GOOD.replace("data.jsonl", "nomatch/*.parquet"))
    code, out = run_cli("run", str(job))
    assert code == 2 and "matches no file" in out
    job = write_job(tmp_path, GOOD.replace("column: prompt", "column: promt"))
    code, out = run_cli("run", str(job))
    assert code == 2 and "prompt.column" in out and "'promt'" in out
    assert "available columns: prompt, cat" in out and "did you mean 'prompt'" in out
    job = write_job(tmp_path, GOOD.replace("columns: [cat]", "columns: [cat, dog]"))
    code, out = run_cli("run", str(job))
    assert code == 2 and "input.columns" in out and "'dog'" in out
    job = write_job(tmp_path, GOOD.replace("column: prompt", "column: prompt\n  template: '{prompt} {lang}'"))
    code, out = run_cli("run", str(job))
    assert code == 2 and "prompt.template" in out and "'lang'" in out


def test_missing_model_fails_before_loading(tmp_path: Path) -> None:
    job = write_job(tmp_path, GOOD.replace("smollm2-135m-instruct", "./models/nothing-here"))
    code, out = run_cli("run", str(job))
    assert code == 2 and "model.path" in out and "no such file" in out, out
    job = write_job(tmp_path, GOOD.replace("smollm2-135m-instruct", "weights/missing.gguf"))
    code, out = run_cli("run", "--dry-run", str(job))
    assert code == 2 and "model.path" in out, out


def test_set_overrides_and_fingerprint(tmp_path: Path) -> None:
    job = write_job(tmp_path, GOOD)
    a = load_job(job)
    b = load_job(job, ["sampling.temperature=0", "input.limit=2", "output.rows_per_shard=7"])
    assert b.sampling.temperature == 0.0 and b.input.limit == 2 and b.output.rows_per_shard == 7
    # limit, output and engine settings don't change what is generated
    assert job_fingerprint(a) == job_fingerprint(load_job(job, ["input.limit=2", "engine.max_num_seqs=3"]))
    assert job_fingerprint(a) == job_fingerprint(load_job(job, ["engine.tensor_parallel=2"]))  # same tokens
    assert job_fingerprint(a) != job_fingerprint(b)
    assert job_fingerprint(a) != job_fingerprint(load_job(job, ["prompt.system=Be brief."]))
    with pytest.raises(ConfigError, match="sampling.temprature"):
        load_job(job, ["sampling.temprature=0"])


def test_paths_relative_to_job_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchgen.pipeline.config import output_dir

    job = write_job(tmp_path, GOOD)
    monkeypatch.chdir("/")
    cfg = load_job(job)
    assert output_dir(cfg) == (tmp_path / "out").resolve()


def test_cli_error_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    job = write_job(tmp_path, GOOD.replace("column: prompt", "colum: prompt"))
    r = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(job)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {job}:6: prompt.colum: unknown key (did you mean 'column'?)"
    assert r.stdout == ""


# ------------------------------------------------------------------ engine.threads / engine.overlap
@pytest.mark.parametrize("value, want", [("1", 1), ("3", 3), ("null", None), ("~", None)])
def test_engine_threads_good(tmp_path: Path, value: str, want: int | None) -> None:
    cfg = load_job(write_job(tmp_path, GOOD + f"engine:\n  threads: {value}\n"))
    assert cfg.engine.threads == want
    assert load_job(write_job(tmp_path, GOOD)).engine.threads is None  # default: automatic
    assert load_job(write_job(tmp_path, GOOD), ["engine.threads=2"]).engine.threads == 2


@pytest.mark.parametrize("value, words", [
    ("0", "must be >= 1, got 0"),
    ("-1", "must be >= 1, got -1"),
    ("1.5", "must be an integer, got a number"),
    (".nan", "must be an integer, got a number"),
    ("two", "must be an integer, got the string 'two'"),
    ("'2'", "must be an integer, got the string '2'"),
    ("true", "must be an integer, got a boolean"),
    ("[2]", "must be an integer, got a list"),
])
def test_engine_threads_bad(tmp_path: Path, value: str, words: str) -> None:
    job = write_job(tmp_path, GOOD + f"engine:\n  max_num_seqs: 4\n  threads: {value}\n")
    with pytest.raises(ConfigError) as ei:
        load_job(job)
    assert str(ei.value) == f"{job}:11: engine.threads: {words}"
    code, out = run_cli("run", str(job))
    assert code == 2 and out.strip() == f"error: {job}:11: engine.threads: {words}"


@pytest.mark.parametrize("value, want", [("auto", "auto"), ("'auto'", "auto"), ("true", True), ("false", False),
                                         ("yes", True)])  # unquoted yes is YAML 1.1's true, as for every bool key
def test_engine_overlap_good(tmp_path: Path, value: str, want: object) -> None:
    cfg = load_job(write_job(tmp_path, GOOD + f"engine:\n  overlap: {value}\n"))
    assert cfg.engine.overlap == want and type(cfg.engine.overlap) is type(want)
    assert load_job(write_job(tmp_path, GOOD)).engine.overlap == "auto"  # the default


@pytest.mark.parametrize("value, got", [
    ("'yes'", "the string 'yes'"),
    ("Auto", "the string 'Auto'"),
    ("''", "the string ''"),
    ("1", "an integer"),
    ("0", "an integer"),
    ("null", "null"),
    ("~", "null"),
    ("[true]", "a list"),
])
def test_engine_overlap_bad(tmp_path: Path, value: str, got: str) -> None:
    job = write_job(tmp_path, GOOD + f"engine:\n  overlap: {value}\n")
    msg = f"{job}:10: engine.overlap: must be auto, true or false, got {got}"
    with pytest.raises(ConfigError) as ei:
        load_job(job)
    assert str(ei.value) == msg
    code, out = run_cli("run", str(job))
    assert code == 2 and out.strip() == f"error: {msg}"


@pytest.mark.parametrize("extra, threads, overlap", [
    ("", None, "auto"),
    ("engine: {device: cpu, threads: 2, overlap: true}\n", 2, True),
    ("engine: {device: cpu, overlap: false}\n", None, False),
])
def test_make_engine_passes_threads_and_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str,
                                                threads: int | None, overlap: object) -> None:
    from batchgen.engine import engine as engmod
    from batchgen.pipeline.run import engine_setup as jobmod

    seen: dict = {}
    monkeypatch.setattr(engmod.Engine, "from_pretrained", classmethod(lambda cls, path, **kw: seen.update(kw)))
    monkeypatch.setattr(jobmod, "model_location", lambda cfg: "m")
    jobmod.make_engine(load_job(write_job(tmp_path, GOOD + extra)))
    assert seen["overlap"] == overlap and type(seen["overlap"]) is type(overlap)
    assert "threads" in seen and seen["threads"] == threads


# ------------------------------------------------------------------ structured output, per-row keys, reasoning
@pytest.mark.parametrize("patch,words", [
    ("sampling: {regex: '[a-'}\n", ["sampling.regex", "does not compile", "unclosed character class"]),
    ("sampling: {grammar: 'start: nowhere'}\n", ["sampling.grammar", "does not compile"]),
    ("sampling: {json_schema: {type: object, properties: {a: {$ref: '#/x'}}}}\n", ["sampling.json_schema", "/x"]),
    ("sampling: {json_schema: missing.json}\n", ["sampling.json_schema", "can't read the schema file missing.json"]),
    ("sampling: {json_schema: 5}\n", ["sampling.json_schema", "must be a JSON schema"]),
    ("sampling: {regex: a, choice: [a]}\n", ["sampling.choice", "at most one", "sampling.regex"]),
    ("sampling: {choice: [a, '']}\n", ["sampling.choice"]),
    ("sampling: {choice: [yes, no]}\n", ["sampling.choice[0]", "quote it"]),
    ("sampling: {top_logprobs: 100}\n", ["sampling.top_logprobs", "<= 64"]),
    ("sampling: {from_columns: {n: k}}\n", ["sampling.from_columns.n", "can't come from a column"]),
    ("sampling: {from_columns: {temprature: t}}\n", ["sampling.from_columns.temprature", "temperature"]),
    ("sampling: {from_columns: [temperature]}\n", ["sampling.from_columns", "must be a mapping"]),
    ("output: {path: out, reasoning: yes-please}\n", ["output.reasoning", "not allowed"]),
    ("output: {path: out, reasoning_tags: [only-one]}\n", ["output.reasoning_tags", "two non-empty"]),
    ("prompt: {column: prompt, chat_template_kwargs: [x]}\n", ["prompt.chat_template_kwargs", "must be a mapping"]),
])
def test_structured_output_keys_bad(tmp_path: Path, patch: str, words: list[str]) -> None:
    section = patch.split(":", 1)[0]
    text = "".join(ln + "\n" for ln in GOOD.splitlines() if not ln.startswith(section) and
                   not (section in ("prompt", "output") and ln.startswith("  ") and _in_section(GOOD, ln, section)))
    with pytest.raises(ConfigError) as e:
        load_job(write_job(tmp_path, text + patch))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def _in_section(text: str, line: str, section: str) -> bool:
    current = None
    for ln in text.splitlines():
        if not ln.startswith(" "):
            current = ln.split(":", 1)[0]
        if ln == line:
            return current == section
    return False


def test_structured_output_keys_good(tmp_path: Path) -> None:
    (tmp_path / "person.json").write_text(json.dumps({"type": "object", "required": ["name"],
                                                      "properties": {"name": {"type": "string"}}}))
    cfg = load_job(write_job(tmp_path, GOOD + textwrap.dedent("""\
        sampling:
          json_schema: person.json
          top_logprobs: 3
          logprobs: true
          from_columns: {temperature: temp, max_new_tokens: budget}
        """)))
    assert cfg.sampling.json_schema["required"] == ["name"]  # the file's content, not its name
    assert cfg.sampling.top_logprobs == 3 and cfg.sampling.from_columns == {"temperature": "temp", "max_new_tokens": "budget"}
    before = job_fingerprint(cfg)
    (tmp_path / "person.json").write_text(json.dumps({"type": "object"}))
    assert job_fingerprint(load_job(tmp_path / "job.yaml")) != before, "a changed schema file is a changed job"
    for extra in ("sampling: {regex: '[0-9]+'}\n", "sampling: {choice: ['yes', 'no']}\n", "sampling: {json_object: true}\n",
                  "sampling: {grammar: 'start: \"a\" | \"b\"'}\n", "sampling: {json_schema_column: schema}\n"):
        load_job(write_job(tmp_path, GOOD + extra))


# ------------------------------------------------------------------ one description per key
def test_every_key_has_one_rule_with_a_description() -> None:
    """The sections' fields are the only table of keys: each carries its rule and description."""
    from dataclasses import fields

    from batchgen.pipeline.config import SECTIONS, JobConfig, all_rules, rule_of

    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert rule_of(f).doc, f"{name}.{f.name} has no description"
    assert rule_of(next(f for f in fields(JobConfig) if f.name == "cost_per_hour")).kind == "float"
    assert len(all_rules()) == sum(len(fields(c)) for c in SECTIONS.values()) + 1


def test_example_yaml_names_every_key() -> None:
    from dataclasses import fields

    from batchgen.pipeline.config import SECTIONS

    text = (ROOT / "jobs" / "example.yaml").read_text()
    sections = {}
    current = None
    for ln in text.splitlines():
        if ln and not ln.startswith((" ", "#")):
            current = ln.split(":", 1)[0]
        elif current is not None:
            sections.setdefault(current, []).append(ln.lstrip(" #"))
    for name, cls in SECTIONS.items():
        for f in fields(cls):
            assert any(ln.startswith(f"{f.name}:") for ln in sections.get(name, [])), f"{name}.{f.name}"


def test_engine_and_sampling_arguments_come_from_the_fields(tmp_path: Path) -> None:
    """Every Engine argument the job file has a key for is passed, and every SamplingParams field
    the sampling section has (constraints aside): nothing is copied by hand, so none can be forgotten."""
    import dataclasses
    import inspect

    from batchgen.engine.request import SamplingParams
    from batchgen.engine.validation import check_engine_args
    from batchgen.pipeline.config import CONSTRAINT_KEYS, engine_kwargs, sampling_kwargs

    cfg = load_job(write_job(tmp_path, GOOD + "engine: {threads: 2, block_size: 32, tensor_parallel: 2}\n"
                             "sampling: {seed: 5, stop: [x], logprobs: true}\n"))
    kw = engine_kwargs(cfg)
    assert set(kw) == set(inspect.signature(check_engine_args).parameters)
    assert kw["threads"] == 2 and kw["block_size"] == 32 and kw["tensor_parallel"] == 2 and kw["seed"] == 5 and kw["dtype"] == cfg.model.dtype
    skw = sampling_kwargs(cfg.sampling)
    ours = {f.name for f in dataclasses.fields(cfg.sampling)}
    assert set(skw) == {f.name for f in dataclasses.fields(SamplingParams)} & ours - set(CONSTRAINT_KEYS)
    assert skw["stop"] == ["x"] and skw["stop"] is not cfg.sampling.stop and skw["logprobs"] is True
    SamplingParams(**skw)

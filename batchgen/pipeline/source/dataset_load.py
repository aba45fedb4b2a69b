"""Loading input.dataset with the `datasets` package (imported only when a job reads a dataset):
a save_to_disk directory (of one dataset or of a DatasetDict), a local dataset directory or
files, or a hub id."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import ConfigError, JobConfig, resolve_path
from .describe import first_line


def import_datasets(cfg: JobConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{cfg.source_path}: input.dataset: reading a dataset needs the 'datasets' package: "
            "pip install datasets (or: pip install 'batchgen[datasets]')"
        ) from None
    return datasets


def saved_files(d: Path) -> list[str] | None:
    """The arrow files of a save_to_disk directory of one split (state.json), None if unknown."""
    try:
        state = json.loads((d / "state.json").read_text())
        return [x["filename"] for x in state.get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(cfg: JobConfig, ds_lib: Any) -> tuple[Any, Path | None]:
    """(the dataset, its save_to_disk directory or None). ConfigError when it can't be loaded
    or holds no rows."""
    inp = cfg.input
    spec = inp.dataset or ""
    local = resolve_path(cfg, spec, must_exist=True)
    if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()
                           or (local / "state.json").is_file()):
        return _load_saved(cfg, ds_lib, local)
    if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ConfigError(f"{cfg.source_path}: input.dataset: no such directory: {local}")
    name = str(local) if local.exists() else spec
    kwargs: dict[str, Any] = dict(split=inp.split or "train", streaming=inp.streaming)
    if inp.config is not None:
        kwargs["name"] = inp.config
    if inp.revision is not None:
        kwargs["revision"] = inp.revision
    if inp.data_files is not None:
        kwargs["data_files"] = inp.data_files
    try:
        ds = ds_lib.load_dataset(name, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{cfg.source_path}: input.dataset: can't load '{spec}': {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - hub/network errors of many kinds
        raise ConfigError(f"{cfg.source_path}: input.dataset: can't load '{spec}': {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(ds, ds_lib.IterableDataset) and len(ds) == 0:
        raise ConfigError(f"{cfg.source_path}: input.dataset: '{spec}' (split {kwargs['split']}) holds no rows")
    return ds, None


def _saved_split(cfg: JobConfig, local: Path) -> tuple[Path, str]:
    """(directory, label) of the split asked for in a saved DatasetDict, or of a saved dataset."""
    inp, spec = cfg.input, cfg.input.dataset
    if not (local / "dataset_dict.json").is_file():
        return local, f"the dataset saved at {spec}"
    try:
        splits = list(json.loads((local / "dataset_dict.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg.source_path}: input.dataset: can't read {local / 'dataset_dict.json'}: "
                          f"{first_line(e)}") from None
    split = inp.split or ("train" if "train" in splits else None)
    if split is None or split not in splits:
        raise ConfigError(f"{cfg.source_path}: input.split: '{inp.split}' is not a split of {spec}; "
                          f"available splits: {', '.join(splits)}")
    return local / split, f"split '{split}' of the dataset saved at {spec}"


def _load_saved(cfg: JobConfig, ds_lib: Any, local: Path) -> tuple[Any, Path]:
    """A save_to_disk directory: of one dataset, or of a DatasetDict (only the split asked for
    is loaded). ConfigError for a missing split, an empty or unreadable dataset."""
    inp, spec = cfg.input, cfg.input.dataset
    where = f"{cfg.source_path}: input.dataset"
    local, label = _saved_split(cfg, local)
    if saved_files(local) == []:  # datasets can't load a saved dataset of no rows
        raise ConfigError(f"{where}: {label} holds no rows")
    try:
        ds = ds_lib.load_from_disk(str(local))
    except Exception as e:  # noqa: BLE001 - missing/corrupt arrow files, bad JSON, ...
        raise ConfigError(f"{where}: can't load {label}: {type(e).__name__}: {first_line(e)}") from None
    if isinstance(ds, ds_lib.DatasetDict):  # a dict saved without dataset_dict.json: cannot happen, but be clear
        raise ConfigError(f"{where}: {label} is a DatasetDict; set input.split")
    if (local / "state.json").is_file() and not (local.parent / "dataset_dict.json").is_file():
        if inp.split not in (None, "train") and ds.split is not None and str(ds.split) != inp.split:
            raise ConfigError(f"{cfg.source_path}: input.split: the dataset saved at {spec} holds split "
                              f"'{ds.split}', not '{inp.split}'")
    if len(ds) == 0:
        raise ConfigError(f"{where}: {label} holds no rows")
    return ds, local

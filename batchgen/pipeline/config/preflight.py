"""What the job file can't say alone, checked before the model loads: the output path can be
written, the attention backend is installed, and (on the machine that runs the job) the engine's
full argument check including the device."""
from __future__ import annotations

import os

from ...engine import validation as engine_rules
from .engine_args import engine_config_error, engine_kwargs
from .errors import ConfigError
from .identity import output_dir
from .sections import JobConfig

# attention backends that need a package beyond torch: name -> (module, what to install)
ATTENTION_PACKAGES = {"flash": ("flash_attn", "the flash-attn package (pip install 'batchgen[flash]')"),
                      "triton": ("triton", "the triton package")}


def preflight(cfg: JobConfig, *, local: bool = True) -> None:
    """What the job file can't say alone, checked before the model loads: the output path can be
    written, the attention backend is installed and, when `local` (this machine runs the job:
    `batchgen run`, --dry-run), the engine's full argument check including the device (imports
    torch). `batchgen submit` passes local=False: the login node may have no GPU. ConfigError."""
    check_output_path(cfg)
    check_attention_installed(cfg)
    if not local:
        return
    try:
        engine_rules.check_engine_args(**engine_kwargs(cfg))
    except engine_rules.EngineArgumentError as e:
        raise engine_config_error(cfg, e) from None
    check_attention_device(cfg)


def check_output_path(cfg: JobConfig) -> None:
    key = "output.path"
    out = output_dir(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{cfg.where(key)}: {key}: {out} is a file, not a directory")
    top = out
    while not top.exists() and top != top.parent:  # the nearest existing directory: where mkdir starts
        top = top.parent
    if not top.is_dir():
        raise ConfigError(f"{cfg.where(key)}: {key}: can't create {out}: {top} is a file, not a directory")
    if not os.access(top, os.W_OK | os.X_OK):
        what = f"{out} is not writable" if top == out else f"can't create {out}: {top} is not writable"
        raise ConfigError(f"{cfg.where(key)}: {key}: {what}")


def check_attention_installed(cfg: JobConfig) -> None:
    import importlib.util

    name = cfg.engine.attention
    if name not in ATTENTION_PACKAGES:
        return
    module, package = ATTENTION_PACKAGES[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"{cfg.where('engine.attention')}: engine.attention: {name} needs {package}, "
                          "which is not installed here (attention: auto picks what is)")


def check_attention_device(cfg: JobConfig) -> None:
    """flash and triton run on CUDA only (attention.get_backend)."""
    import torch

    name, device = cfg.engine.attention, cfg.engine.device
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if name in ATTENTION_PACKAGES and not on_cuda:
        raise ConfigError(f"{cfg.where('engine.attention')}: engine.attention: {name} needs a CUDA device, "
                          f"and engine.device: {device} is the CPU here (attention: auto picks the torch backend)")

"""A job file -> JobConfig: every key through its rule (values.py), then the checks across keys
(checks.py) and the engine's own argument checks (engine_args.py)."""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from .checks import cross_checks
from .engine_args import engine_checks
from .errors import ConfigError, Ctx, did_you_mean, type_name
from .overrides import apply_overrides
from .rules import REQUIRED, rule_of
from .sections import SECTIONS, TOP_SCALARS, JobConfig, top_rule
from .values import check_value
from .yaml_lines import yaml_load

REQUIRED_SECTIONS = ("model", "input", "prompt", "output")


def load_job(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Read, parse and validate a job file. Raises ConfigError with one clear line."""
    p = Path(path)
    where = str(path)
    if not p.exists():
        raise ConfigError(f"{where}: no such job file")
    if p.is_dir():
        raise ConfigError(f"{where}: is a directory, not a job file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: can't read the job file: {e}") from None
    data = yaml_load(text, where)
    origins = apply_overrides(data, list(overrides or []), where)
    return parse_job(data, where=where, base_dir=p.resolve().parent, origins=origins)


def parse_job(data: Any, where: str = "job file", base_dir: str | os.PathLike[str] = ".",
              origins: dict[str, str] | None = None) -> JobConfig:
    """Validate a parsed job mapping (as from YAML) and build a JobConfig. `origins` maps the keys
    that --set gave (see apply_overrides) to their argument, so errors in them name it."""
    ctx = Ctx(where, origins, base_dir)
    _check_top(ctx, data)
    lines = getattr(data, "lines", {})
    locations = {k: ctx.loc(k, lines.get(k)) for k in data}
    sections: dict[str, Any] = {}
    key_lines: dict[str, dict] = {}
    for name, cls in SECTIONS.items():
        sections[name], key_lines[name] = _parse_section(ctx, name, cls, data.get(name), lines.get(name), locations)
    cost = None
    if "cost_per_hour" in data:
        cost = check_value(ctx, "cost_per_hour", data["cost_per_hour"], top_rule("cost_per_hour"),
                           lines.get("cost_per_hour"))
    cfg = JobConfig(**sections, cost_per_hour=cost, source_path=where, base_dir=str(base_dir), locations=locations)
    cross_checks(ctx, cfg, key_lines, {name: lines.get(name) for name in SECTIONS})
    engine_checks(cfg)
    return cfg


def _check_top(ctx: Ctx, data: Any) -> None:
    """The job file is a mapping of known sections, with the required ones present."""
    if data is None:
        raise ConfigError(f"{ctx.where}: the job file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{ctx.where}: the job file must be a mapping of sections, got {type_name(data)}")
    lines = getattr(data, "lines", {})
    known = list(SECTIONS) + sorted(TOP_SCALARS)
    for k in data:
        if k not in SECTIONS and k not in TOP_SCALARS:
            raise ctx.err(str(k), f"unknown key{did_you_mean(str(k), known)}", lines.get(k))
    for required in REQUIRED_SECTIONS:
        if required not in data or data[required] is None:
            raise ConfigError(f"{ctx.loc(required, None)}: {required}: missing section (see jobs/example.yaml)")


def _parse_section(ctx: Ctx, name: str, cls: type, raw: Any, sec_line: int | None,
                   locations: dict[str, str]) -> tuple[Any, dict]:
    """One section's mapping -> (its dataclass, key -> line); records where each key was set in `locations`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ctx.err(name, f"must be a mapping of keys, got {type_name(raw)}", sec_line)
    raw_lines = getattr(raw, "lines", {})
    texts = getattr(raw, "texts", {})
    names = [f.name for f in fields(cls)]
    for k in raw:
        if k not in names:
            raise ctx.err(f"{name}.{k}", f"unknown key{did_you_mean(str(k), names)}", raw_lines.get(k))
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{name}.{f.name}"
        if f.name not in raw:
            if f.default is REQUIRED:
                raise ctx.err(key, "missing (required)", sec_line)
            continue
        locations[key] = ctx.loc(key, raw_lines.get(f.name))
        rule = rule_of(f)
        value = check_value(ctx, key, raw[f.name], rule, raw_lines.get(f.name),
                            None if key in ctx.origins else texts.get(f.name))
        if value is None and rule.null_default:
            continue
        kwargs[f.name] = value
    return cls(**kwargs), raw_lines

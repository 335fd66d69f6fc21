"""Reading and writing configs: YAML presets, `--set a.b=value` overrides, building and saving."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from relay.config.fields import ConfigError
from relay.config.ppo import PPOConfig
from relay.config.rules import validate
from relay.config.schema import parse
from relay.config.train import DPOConfig, RMConfig, SFTConfig

PIPELINES: dict[str, type] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig}


def build(cls: type, data: dict[str, Any] | None = None) -> Any:
    """Build dataclass `cls` from a (nested) mapping, checking every field's type and range; unknown keys are
    errors that suggest the closest field."""
    return parse(cls, dict(data or {}))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _override_keys(overrides: list[str]) -> dict[str, str]:
    """field path -> the `--set` item that sets it."""
    return {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars/lists) to a nested mapping."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. learner.plugin=zero2")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a group of fields")
        node[parts[-1]] = _parse_scalar(text)
    return data


def _read_yaml(p: Path) -> dict[str, Any]:
    import yaml

    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p}: invalid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return loaded or {}


def load_config(pipeline: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Read a YAML preset (optional), apply overrides, build the typed config and validate it. A ConfigError
    names the file and each invalid field, and which ones came from `--set`."""
    if pipeline not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; choose one of {sorted(PIPELINES)}")
    data = _read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    try:
        cfg = build(PIPELINES[pipeline], data)
        validate(cfg)
    except ConfigError as err:
        if not err.problems:
            raise
        raise ConfigError.invalid(err.problems, str(path) if path else None, _override_keys(overrides or [])) from None
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path

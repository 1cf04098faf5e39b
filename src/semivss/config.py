"""Experiment configuration: one validated YAML file per experiment.

Each module owns the pydantic model of its section (``extra="forbid"``); this file composes them.
An unknown or mistyped key is a :class:`~semivss.errors.ConfigError` naming the key and the file.
Values can be overridden on the command line with ``--set section.key=value`` (value parsed as YAML).
A file may inherit from others with a top-level ``_base_:`` (a path or a list of paths, relative to
that file): the bases are deep-merged in order, then the file's own keys, then the overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from semivss.data.config import DataConfig
from semivss.engine.config import OptimConfig, ScheduleConfig, TrainConfig
from semivss.errors import ConfigError
from semivss.inference.config import EvalConfig
from semivss.models.config import ModelConfig
from semivss.sections import Section, load_yaml


class ExperimentConfig(Section):
    """A whole experiment: data, model, method, optimiser, schedule, training and evaluation."""

    name: str = "experiment"
    out_dir: Path = Path("runs/experiment")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    # ``name`` picks the method; every other key is validated by that method's own Config.
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "supervised"})
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_method(self) -> "ExperimentConfig":
        from semivss.registry import METHODS

        name = self.method.get("name", "supervised")
        if not isinstance(name, str) or name not in METHODS:
            raise ValueError(METHODS.unknown(name))
        params = {k: v for k, v in self.method.items() if k != "name"}
        try:
            METHODS[name].Config(**params)
        except ValidationError as exc:
            raise ValueError(_format_errors(exc, prefix="method")) from None
        return self

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "supervised"))

    @property
    def method_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}


def yaml_reason(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: its problem and where (line and column, 1-based)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _printable(text: str) -> str:
    """A key as one line: control characters escaped (``\n`` stays visible, never a line break)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(_printable(str(p)) for p in err["loc"])
        key = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"'{key}': {msg}")
    return "; ".join(lines)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = load_yaml(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_reason(exc)})") from None
    return raw


def parse_config(raw: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Validate a nested dict; errors name the source and every bad key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        messages = []
        for err in exc.errors():
            if err["type"] == "value_error" and not err["loc"]:
                messages.append(str(err["ctx"]["error"]) if "ctx" in err else err["msg"])
        detail = "; ".join(messages) if messages else _format_errors(exc)
        raise ConfigError(f"{source}: {detail}") from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``: nested mappings merge, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping and resolve its ``_base_`` files (relative to it), recursively."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: '_base_' cycle ({chain})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a config is a YAML text file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_reason(exc)})") from None
    if not isinstance(raw, dict):
        named_by = f" (named in '_base_' of {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: the top level must be a mapping of sections{named_by}")
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '_base_' must be a file path or a list of file paths")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: '_base_' file not found: {base_path}")
        merged = deep_merge(merged, _read_yaml_tree(base_path, (*seen, path.resolve())))
    return deep_merge(merged, raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment file (with its ``_base_`` files), apply overrides and validate it."""
    path = Path(path)
    raw = _read_yaml_tree(path)
    apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write the resolved config next to the run's outputs (JSON-compatible YAML)."""
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

"""Experiment config: validation errors name the key and file; overrides; method params."""

from pathlib import Path

import pytest
import yaml

from semivss.config import apply_overrides, load_config
from semivss.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BASE = {"data": {"format": "synthetic", "root": "data/synthetic"}}


def test_shipped_configs_validate() -> None:
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for path in files:
        cfg = load_config(path)
        assert cfg.schedule.iters > 0, path


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {**BASE, "optim": {"lr": 0.01, "lr_mult": 3}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "optim.lr_mult" in str(exc.value) and str(path) in str(exc.value)


def test_unknown_top_level_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(_write(tmp_path, {**BASE, "optimiser": {}}))


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"schedule\.iters"):
        load_config(_write(tmp_path, {**BASE, "schedule": {"iters": "many"}}))


def test_unknown_method_and_method_param(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method.name"):
        load_config(_write(tmp_path, {**BASE, "method": {"name": "magic"}}))
    with pytest.raises(ConfigError, match=r"method\.temperature"):
        load_config(_write(tmp_path, {**BASE, "method": {"name": "supervised", "temperature": 0.5}}))


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), ["schedule.iters=7", "data.crop_size=[32, 48]", "train.grad_clip=null"])
    assert cfg.schedule.iters == 7
    assert tuple(cfg.data.crop_size) == (32, 48)
    assert cfg.train.grad_clip is None
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["schedule.iters"])


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")

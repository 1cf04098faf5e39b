"""Experiment config: validation errors name the key and file; overrides; method params."""

from pathlib import Path

import pytest
import yaml

from semivss.config import apply_overrides, deep_merge, dump_config, load_config
from semivss.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BASE = {"data": {"format": "synthetic", "root": "data/synthetic"}}


def test_shipped_configs_validate() -> None:
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 18, "configs missing"
    for path in files:
        cfg = load_config(path)
        assert cfg.schedule.iters > 0, path
        if path.name != "_base_.yaml":  # every experiment names its own run folder
            assert cfg.out_dir == Path("runs") / cfg.name, path


def test_shipped_configs_inherit_protocol_base() -> None:
    camvid = ROOT / "configs" / "camvid-ssvs"
    ifr16 = load_config(camvid / "ifr_1-16.yaml")
    assert (ifr16.data.split.mode, ifr16.data.split.k) == ("every_kth", 16)  # nested merge keeps mode
    assert ifr16.data.unlabeled_batch_size == 1 and ifr16.data.root == Path("../shared/data/camvid")
    assert ifr16.method["source_offsets"] == [-8, 8] and ifr16.schedule.iters == 1000
    teacher = load_config(camvid / "recipe" / "teacher.yaml", ["data.root=/elsewhere"])
    assert teacher.model.output_stride == 8 and teacher.model.backbone == "mobilenet_v2"
    assert (teacher.optim.lr, teacher.optim.momentum, teacher.schedule.iters) == (0.005, 0.9, 300)
    assert teacher.data.root == Path("/elsewhere")
    u2pl = load_config(ROOT / "configs" / "synthetic" / "u2pl.yaml")
    assert u2pl.model.rep_head and u2pl.data.crop_size == (128, 128) and u2pl.method_name == "u2pl"


def _yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_deep_merge_nested_and_replace() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = deep_merge(base, {"a": {"c": [3]}, "e": {"f": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # inputs untouched


def test_base_merge_order(tmp_path: Path) -> None:
    _yaml(tmp_path / "bases" / "one.yaml", {
        **BASE, "schedule": {"iters": 10, "warmup_iters": 3}, "data": {**BASE["data"], "batch_size": 4},
        "optim": {"lr": 0.5, "momentum": 0.5},
    })
    _yaml(tmp_path / "bases" / "two.yaml", {"schedule": {"iters": 20}, "data": {"crop_size": [32, 32]}})
    exp = _yaml(tmp_path / "exp" / "run.yaml", {
        "_base_": ["../bases/one.yaml", "../bases/two.yaml"], "name": "run",
        "schedule": {"iters": 30}, "optim": {"lr": 0.1},
    })
    cfg = load_config(exp)
    assert cfg.name == "run"
    assert (cfg.schedule.iters, cfg.schedule.warmup_iters) == (30, 3)  # own keys win, nested keys kept
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.1, 0.5)
    assert cfg.data.batch_size == 4 and tuple(cfg.data.crop_size) == (32, 32)  # later base adds
    assert cfg.data.root == Path("data/synthetic")
    cfg = load_config(exp, ["schedule.iters=40", "optim.momentum=0.7", "data.root=/other"])
    assert (cfg.schedule.iters, cfg.schedule.warmup_iters, cfg.optim.momentum) == (40, 3, 0.7)  # --set wins
    assert cfg.data.root == Path("/other")
    # later base beats an earlier one; a list replaces, it does not append
    _yaml(tmp_path / "exp" / "swap.yaml", {"_base_": ["../bases/two.yaml", "../bases/one.yaml"]})
    cfg = load_config(tmp_path / "exp" / "swap.yaml")
    assert cfg.schedule.iters == 10 and tuple(cfg.data.crop_size) == (32, 32)


def test_base_recursive_and_string(tmp_path: Path) -> None:
    _yaml(tmp_path / "root.yaml", {**BASE, "schedule": {"iters": 5}, "eval": {"size": [64, 64]}})
    _yaml(tmp_path / "mid" / "mid.yaml", {"_base_": "../root.yaml", "schedule": {"iters": 6, "warmup_iters": 2}})
    leaf = _yaml(tmp_path / "mid" / "leaf" / "leaf.yaml", {"_base_": "../mid.yaml", "train": {"log_interval": 3}})
    cfg = load_config(leaf)
    assert (cfg.schedule.iters, cfg.schedule.warmup_iters, cfg.train.log_interval) == (6, 2, 3)
    assert tuple(cfg.eval.size) == (64, 64) and cfg.data.format == "synthetic"


def test_base_absent_from_dumped_config(tmp_path: Path) -> None:
    _yaml(tmp_path / "base.yaml", {**BASE, "schedule": {"iters": 9}})
    cfg = load_config(_yaml(tmp_path / "exp.yaml", {"_base_": "base.yaml", "name": "x"}))
    dump_config(cfg, tmp_path / "config.yaml")
    dumped = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "_base_" not in dumped and dumped["schedule"]["iters"] == 9 and dumped["name"] == "x"
    assert load_config(tmp_path / "config.yaml") == cfg  # the dump is a self-contained config


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    a = _yaml(tmp_path / "a.yaml", {**BASE, "_base_": "b.yaml"})
    _yaml(tmp_path / "b.yaml", {"_base_": ["a.yaml"]})
    with pytest.raises(ConfigError, match="'_base_' cycle") as exc:
        load_config(a)
    assert "a.yaml" in str(exc.value) and "b.yaml" in str(exc.value) and "\n" not in str(exc.value)
    self_ref = _yaml(tmp_path / "self.yaml", {**BASE, "_base_": "self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(self_ref)


def test_base_shared_twice_is_not_a_cycle(tmp_path: Path) -> None:
    _yaml(tmp_path / "common.yaml", {**BASE, "schedule": {"iters": 11}})
    _yaml(tmp_path / "x.yaml", {"_base_": "common.yaml", "optim": {"lr": 0.2}})
    _yaml(tmp_path / "y.yaml", {"_base_": "common.yaml", "train": {"log_interval": 7}})
    cfg = load_config(_yaml(tmp_path / "exp.yaml", {"_base_": ["x.yaml", "y.yaml"]}))
    assert (cfg.schedule.iters, cfg.optim.lr, cfg.train.log_interval) == (11, 0.2, 7)


def test_base_errors_name_file_and_key(tmp_path: Path) -> None:
    exp = _yaml(tmp_path / "exp.yaml", {**BASE, "_base_": "missing/base.yaml"})
    with pytest.raises(ConfigError) as exc:
        load_config(exp)
    msg = str(exc.value)
    assert str(exp) in msg and "'_base_'" in msg and "missing/base.yaml" in msg and "\n" not in msg
    for bad in (3, None, ["ok.yaml", 1], {"path": "b.yaml"}):
        with pytest.raises(ConfigError, match=r"exp\.yaml: '_base_' must be a file path"):
            load_config(_yaml(tmp_path / "exp.yaml", {**BASE, "_base_": bad}))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping.*'_base_' of .*exp\.yaml"):
        load_config(_yaml(tmp_path / "exp.yaml", {**BASE, "_base_": "list.yaml"}))


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


@pytest.mark.parametrize(("override", "message"), [
    ("schedule.iters=true", "'schedule.iters': expected a number, got the boolean True"),
    ("optim.lr='0.01'", "'optim.lr': expected a number, got the string '0.01'"),
    ("schedule.iters=1.5", "'schedule.iters': expected an integer, got 1.5"),
    ("data.crop_size=[240, '320']", "'data.crop_size': expected a number, got the string '320'"),
    ("method.name=unimatch", None),
])
def test_numbers_are_not_coerced_from_bools_or_strings(tmp_path: Path, override: str, message: str | None) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {format: synthetic, root: x}\n")
    if message is None:
        load_config(path, [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert message in str(info.value) and str(path) in str(info.value)


def test_yaml_exponent_floats_are_numbers(tmp_path: Path) -> None:
    """PyYAML's YAML 1.1 rules read ``1e-4`` as a string; configs read it as YAML 1.2 does."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {format: synthetic, root: x}\noptim: {lr: 1e-4, weight_decay: 5E-4}\n"
                    "schedule: {iters: 1_000}\n")
    cfg = load_config(path, ["optim.momentum=.5"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 5e-4 and cfg.optim.momentum == 0.5
    assert cfg.schedule.iters == 1000 and cfg.optim.name == "sgd"  # strings stay strings

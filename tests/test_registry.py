"""Registries of dataset formats, architectures and methods (semivss.registry)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from PIL import Image

from semivss.config import parse_config
from semivss.data.config import DataConfig, load_videosets
from semivss.data.formats import load_dataset
from semivss.errors import ConfigError
from semivss.methods import Method, build_method, seg_ce_loss
from semivss.models import build_model
from semivss.models.config import ModelConfig, cnn_archs, transformer_archs
from semivss.registry import ARCHS, FORMATS, METHODS, Registry


def _one_line(msg: str) -> bool:
    return "\n" not in msg


# ------------------------------------------------------------------ the generic registry


def test_register_get_names_and_errors() -> None:
    reg: Registry[int] = Registry("widget", "parts.widget")
    assert reg.register("b", 2) == 2

    @reg.register("a", colour="red")
    def a() -> int:
        return 1

    assert reg.get("a") is a and reg["b"] == 2 and "a" in reg and "c" not in reg
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert reg.meta("a") == {"colour": "red"} and reg.meta("b") == {}
    with pytest.raises(ConfigError) as exc:
        reg.get("c")
    assert str(exc.value) == "parts.widget: unknown widget 'c'; available: a, b"
    with pytest.raises(ConfigError, match=r"^--widget: unknown widget 'c'; available: a, b$"):
        reg.get("c", key="--widget")
    assert reg.get("c", None) is None  # dict-style default
    assert reg.unknown("c", with_key=False) == "unknown widget 'c'; available: a, b"


def test_duplicate_registration_is_an_error() -> None:
    reg: Registry[Any] = Registry("widget", "parts.widget")
    reg.register("a", int)
    reg.register("a", int)  # the same object again is harmless (a re-imported module)
    with pytest.raises(ConfigError, match=r"widget 'a' is already registered \(by builtins\.int\)"):
        reg.register("a", float)
    with pytest.raises(ConfigError, match="widget 'a' is already registered"):
        reg.register("a")(str)
    assert reg["a"] is int
    reg["a"] = float  # explicit replacement (what monkeypatch.setitem does)
    assert reg["a"] is float
    assert reg.unregister("a") is float and "a" not in reg
    with pytest.raises(ConfigError, match="non-empty"):
        reg.register(" a", int)
    reg.register("f", lambda: 1)
    with pytest.raises(ConfigError, match="widget 'f' is already registered"):
        reg.register("f", lambda: 2)  # same qualified name '<lambda>', another object


def test_builtins_are_registered() -> None:
    assert {"camvid", "folder", "synthetic", "cityscapes", "vspw"} <= set(FORMATS.names())
    assert {"deeplabv3plus", "pspnet", "segformer", "mask2former", "upernet"} <= set(ARCHS.names())
    assert set(transformer_archs()) == {"segformer", "mask2former", "upernet"}
    assert set(cnn_archs()) == {"deeplabv3plus", "pspnet"}
    assert {"supervised", "ifr", "u2pl", "cps", "unimatch", "self_training"} <= set(METHODS.names())
    for name in METHODS.names():  # the registered name is the class's own name
        assert METHODS[name].name == name


def test_unknown_names_list_the_registry() -> None:
    data = {"format": "camvid", "root": "x"}
    for raw, listing in [
        ({"data": {**data, "format": "kitti"}}, FORMATS.names()),
        ({"data": data, "model": {"arch": "vit"}}, ARCHS.names()),
        ({"data": data, "method": {"name": "nope"}}, METHODS.names()),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_config(raw, source="exp.yaml")
        msg = str(exc.value)
        assert _one_line(msg) and msg.endswith("available: " + ", ".join(listing)), msg
    with pytest.raises(ConfigError, match=r"^--format: unknown dataset format 'kitti'; available: "):
        load_dataset("kitti", "/x", "train", key="--format")
    with pytest.raises(ConfigError, match=r"^method\.name: unknown method 'nope'; available: "):
        build_method("nope", None, 3)
    with pytest.raises(ConfigError, match=r"^model\.arch: unknown architecture 'vit'; available: "):
        build_model(ModelConfig.model_construct(arch="vit"), 3)


# ------------------------------------------------------------------ a new dataset format


def _toy_dataset(root: Path) -> Path:
    (root / "classes.txt").write_text("ground\nobject\n")
    rng = np.random.default_rng(0)
    for split, videos in (("train", ("a", "b")), ("val", ("c",))):
        for video in videos:
            folder = root / split / video
            folder.mkdir(parents=True)
            for index in range(3):
                image = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / f"{index}.png")
            Image.fromarray(np.eye(8, 10, dtype=np.uint8)).save(folder / "1_label.png")
    return root


@pytest.fixture()
def toy_format():
    import toy_format as module  # tests/toy_format.py registers "toy" when imported

    yield module
    FORMATS.unregister("toy")  # leave the registry as other tests expect it
    import sys

    sys.modules.pop("toy_format", None)


def test_unknown_before_the_toy_format_is_imported() -> None:
    assert "toy" not in FORMATS
    with pytest.raises(pydantic.ValidationError, match=r"unknown dataset format 'toy'; available: "):
        DataConfig(format="toy", root="x")


def test_toy_format_is_usable_by_name(tmp_path: Path, toy_format: Any) -> None:
    root = _toy_dataset(tmp_path)
    assert "toy" in FORMATS.names() and FORMATS.get("toy") is toy_format.load_toy
    cfg = DataConfig(format="toy", root=root)
    train, val = load_videosets(cfg)
    assert [v.name for v in train.videos] == ["a", "b"] and len(train) == 6
    assert val is not None and len(val.annotated()) == 1 and val.classes == ["ground", "object"]
    assert val.read_label(val.annotated()[0]).tolist() == np.eye(8, 10).tolist()
    exp = parse_config({"data": {"format": "toy", "root": str(root)}}, source="exp.yaml")
    assert exp.data.format == "toy"
    listing = "available: camvid, cityscapes, folder, synthetic, toy, vspw"
    with pytest.raises(ConfigError, match=re.escape(listing)):
        parse_config({"data": {"format": "kittti", "root": str(root)}}, source="exp.yaml")


def test_cli_lists_registered_formats(toy_format: Any) -> None:
    from typer.testing import CliRunner

    from semivss.cli import app

    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["data", "info", "--help"])
    assert result.exit_code == 0 and "[camvid|cityscapes|folder|synthetic|toy|vspw]" in result.output
    result = runner.invoke(app, ["data", "info", "/nowhere", "--format", "kitti"])
    assert result.exit_code != 0 and "unknown dataset format 'kitti'" in result.output


# ------------------------------------------------------------------ a new method


class Doubled(Method):
    """Supervised cross-entropy counted twice (a method needs a name, a Config, a step)."""

    name = "doubled"

    class Config(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        factor: float = 2.0

    def training_step(self, models, batch, step, max_steps):  # type: ignore[no-untyped-def]
        labeled = batch["labeled"]
        out = models["model"](labeled.image)
        loss = self.cfg.factor * seg_ce_loss(out["logits"], labeled.label, self.ignore_index)
        return {"loss": loss}


def test_registered_method_is_valid_in_configs() -> None:
    raw = {"data": {"format": "synthetic", "root": "x"}, "method": {"name": "doubled", "factor": 3}}
    with pytest.raises(ConfigError, match="unknown method 'doubled'"):
        parse_config(raw)
    METHODS.register("doubled")(Doubled)
    try:
        cfg = parse_config(raw)
        assert cfg.method_name == "doubled" and cfg.method_params == {"factor": 3}
        assert build_method("doubled", cfg.method_params, 4).cfg.factor == 3
        with pytest.raises(ConfigError, match=r"method\.factr"):
            parse_config({**raw, "method": {"name": "doubled", "factr": 3}})
        with pytest.raises(ConfigError, match="available: accel, cac, cps, doubled, ifr"):
            parse_config({**raw, "method": {"name": "tripled"}})
    finally:
        METHODS.unregister("doubled")
    assert "doubled" not in METHODS


# ------------------------------------------------------------------ a new architecture


def test_registered_arch_builds_and_validates() -> None:
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, stride=4, padding=1)
            self.classifier = nn.Conv2d(4, num_classes, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            feature = self.stem(x).relu()
            return {"logits": self.classifier(feature), "feature": feature}

        def param_groups(self) -> dict[str, list[nn.Parameter]]:
            return {"backbone": list(self.stem.parameters()),
                    "head": list(self.classifier.parameters())}

    ARCHS.register("tiny")(lambda cfg, num_classes: Tiny(num_classes))
    try:
        cfg = ModelConfig(arch="tiny", pretrained=None)
        model = build_model(cfg, 3)
        assert model(torch.zeros(1, 3, 16, 16))["logits"].shape == (1, 3, 4, 4)
        assert "tiny" in cnn_archs()
        rep = r"model\.rep_head: true requires model\.arch: deeplabv3plus"
        with pytest.raises(pydantic.ValidationError, match=rep):
            ModelConfig(arch="tiny", rep_head=True)
        hf = r"model\.variant.*transformer arches \(mask2former, segformer, upernet\)"
        with pytest.raises(pydantic.ValidationError, match=hf):
            ModelConfig(arch="tiny", variant="b0")
    finally:
        ARCHS.unregister("tiny")
    with pytest.raises(pydantic.ValidationError, match="unknown architecture 'tiny'"):
        ModelConfig(arch="tiny")

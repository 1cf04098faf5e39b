"""Tests of semivss.models.hf: SegFormer / UperNet / Mask2Former from transformers behind the
SegModel contract (shapes, classify, Mask2Former semantic map, save_pretrained loading, variant
tables, config errors, gradients, state-dict + JSON round trips). Tiny configs, 64x48 inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pydantic
import pytest
import torch
import torch.nn.functional as F

from semivss.config import parse_config
from semivss.errors import ConfigError
from semivss.models import (
    HFSegModel,
    ModelConfig,
    build_model,
    hf_config_for,
    mask2former_semantic_probs,
)
from semivss.models.hf import hf_config_kwargs

C = 5
H, W = 64, 48  # non-square: catches H/W swaps
TINY_SWIN = {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4}
TINY_CONVNEXT = {"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1]}
TINY: dict[str, dict[str, Any]] = {
    "segformer": {
        "arch": "segformer",
        "hf_config": {"hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1],
                      "num_attention_heads": [1, 1, 1, 1], "decoder_hidden_size": 8},
    },
    "upernet-swin": {
        "arch": "upernet",
        "variant": "swin-tiny",
        "hf_config": {"hidden_size": 8, "pool_scales": [1, 2], "backbone_config": TINY_SWIN},
    },
    "upernet-convnext": {
        "arch": "upernet",
        "variant": "convnext-tiny",
        "hf_config": {"hidden_size": 8, "pool_scales": [1, 2], "backbone_config": TINY_CONVNEXT},
    },
    "mask2former": {
        "arch": "mask2former",
        "hf_config": {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32,
                      "encoder_feedforward_dim": 32, "dim_feedforward": 32, "encoder_layers": 1,
                      "decoder_layers": 2, "num_attention_heads": 2, "num_queries": 6,
                      "backbone_config": TINY_SWIN},
    },
}
FEATURE_DIM = {"segformer": 8, "upernet-swin": 8, "upernet-convnext": 8, "mask2former": 32}
DATA = {"format": "synthetic", "root": "data/synthetic"}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _cfg(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(**{**TINY[name], **kw})


def _build(name: str, num_classes: int = C, **kw: Any) -> HFSegModel:
    model = build_model(_cfg(name, **kw), num_classes)
    assert isinstance(model, HFSegModel)
    return model


# ------------------------------------------------------------------ shapes, strides, classify


@pytest.mark.parametrize("name", list(TINY))
def test_shapes_strides_and_groups(name: str) -> None:
    model = _build(name).eval()
    out = model(torch.randn(2, 3, H, W))
    assert model.stride == model.output_stride_total == 4
    assert out["logits"].shape == (2, C, H // 4, W // 4)
    assert out["feature"].shape == (2, FEATURE_DIM[name], H // 4, W // 4)
    assert model.num_classes == C and model.feature_dim == FEATURE_DIM[name]
    assert model.has_rep_head is False and "rep" not in out
    groups = model.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in model.encoder.parameters()} == {id(p) for p in groups["backbone"]}
    assert groups["head"] and groups["backbone"]
    # the classifier (moved out of the HF decode head / Mask2Former class head) is a head param
    head_ids = {id(p) for p in groups["head"]}
    final = model.net.class_predictor if name == "mask2former" else model.classifier
    assert all(id(p) in head_ids for p in final.parameters())


@pytest.mark.parametrize("name", ["segformer", "upernet-swin", "upernet-convnext"])
@pytest.mark.parametrize("train", [False, True])
def test_classify_feature_equals_logits(name: str, train: bool) -> None:
    model = _build(name).train(train)
    out = model(torch.randn(2, 3, H, W))
    assert torch.equal(model.classify(out["feature"]), out["logits"])
    assert model.classifier.out_channels == C
    assert model.supports_classify


def test_segformer_logits_equal_hf_forward_with_its_classifier() -> None:
    """Moving the decode head's classifier out changes nothing: put it back and compare."""
    model = _build("segformer").eval()
    x = torch.randn(1, 3, H, W)
    ours = model(x)["logits"]
    model.net.decode_head.classifier = model.classifier
    assert torch.allclose(model.net(pixel_values=x).logits, ours, atol=1e-6)


# ------------------------------------------------------------------ Mask2Former semantic map


def test_mask2former_semantic_probs_hand_computed() -> None:
    # q0: softmax([ln 2, 0, 0]) = (1/2, 1/4, 1/4); q1: uniform 1/3; masks sigmoid(0) = 1/2
    cls = torch.tensor([[[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    masks = torch.zeros(1, 2, 1, 1)
    p = mask2former_semantic_probs(cls, masks)
    # s0 = 1/4 + 1/6 = 5/12, s1 = 1/8 + 1/6 = 7/24 -> p = (10/17, 7/17)
    assert torch.allclose(p.flatten(), torch.tensor([10 / 17, 7 / 17]), atol=1e-6)
    # all masks off: s clamps at eps for every class -> uniform, still finite log
    p = mask2former_semantic_probs(cls, torch.full((1, 2, 1, 1), -80.0))
    assert torch.allclose(p.flatten(), torch.tensor([0.5, 0.5]))


def test_mask2former_normalised_semantic_map_matches_hf_outputs() -> None:
    model = _build("mask2former").eval()
    x = torch.randn(2, 3, H, W)
    out = model(x)
    probs = out["logits"].softmax(1)
    assert torch.allclose(probs.sum(1), torch.ones(2, H // 4, W // 4), atol=1e-6)
    assert torch.allclose(probs, out["probs"], atol=1e-6)
    # independent oracle: loop over queries on the HF model's own outputs, no-object dropped
    hf = model.net(pixel_values=x)
    cls, masks = hf.class_queries_logits, hf.masks_queries_logits
    assert cls.shape == (2, 6, C + 1)
    s = torch.zeros(2, C, H // 4, W // 4)
    for q in range(cls.shape[1]):
        s += cls[:, q].softmax(-1)[:, :C, None, None] * masks[:, q, None].sigmoid()
    assert torch.allclose(probs, s / s.sum(1, keepdim=True), atol=1e-5)
    assert torch.equal(out["feature"], hf.pixel_decoder_last_hidden_state)
    with pytest.raises(ConfigError, match="mask2former"):
        model.classify(out["feature"])
    assert model.supports_classify is False


# ------------------------------------------------------------------ gradients and round trips


@pytest.mark.parametrize("name", list(TINY))
def test_backward_reaches_encoder(name: str) -> None:
    model = _build(name).train()
    out = model(torch.randn(2, 3, H, W))
    target = torch.randint(0, C, (2, H // 4, W // 4))
    target[0, 0, 0] = 255
    F.cross_entropy(out["logits"], target, ignore_index=255).backward()
    backbone = model.param_groups()["backbone"]
    with_grad = [p for p in backbone if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= 0.9 * len(backbone)
    first = next(iter(model.encoder.parameters()))  # the patch embedding (stem)
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(TINY))
def test_state_dict_round_trip_through_json_meta(name: str) -> None:
    """What ``load_trained_model`` does: rebuild from ``model_dump(mode="json")`` with
    pretrained None, load the state dict, same outputs."""
    cfg = _cfg(name)
    model = build_model(cfg, C).eval()
    meta = json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert meta["hf_config"] == TINY[name]["hf_config"]
    torch.manual_seed(123)  # a different random init, overwritten by the state dict
    clone = build_model(ModelConfig(**{**meta, "pretrained": None}), C)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = torch.randn(1, 3, H, W)
    a, b = model(x), clone(x)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["feature"], b["feature"])


def _hf_net(name: str, num_classes: int) -> torch.nn.Module:
    """A plain transformers model of the tiny config, as a user would have saved it."""
    from semivss.models.hf import _config_classes

    cfg = _cfg(name)
    _, model_cls = _config_classes(cfg.arch)
    return model_cls(hf_config_for(cfg, num_classes))


def _backbone_state(name: str, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    if name == "segformer":
        return net.segformer.state_dict()
    if name == "mask2former":
        return net.model.pixel_level_module.encoder.state_dict()
    return net.backbone.state_dict()


@pytest.mark.parametrize("name", ["segformer", "upernet-swin", "mask2former"])
def test_save_pretrained_round_trip_other_class_count(name: str, tmp_path: Path) -> None:
    saved = _hf_net(name, num_classes=3)
    saved.save_pretrained(tmp_path / "hf")
    torch.manual_seed(7)
    model = build_model(_cfg(name, pretrained=str(tmp_path / "hf")), C)
    assert model.training
    ref = _backbone_state(name, saved)
    got = model.encoder.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    report = model.load_report
    assert report is not None and report.source == str(tmp_path / "hf")
    assert report.missing == [] and report.unexpected == []
    assert report.loaded > len(ref)
    if name == "mask2former":
        assert model.net.class_predictor.out_features == C + 1
        assert "class_predictor.weight" in report.ignored
    else:
        assert model.classifier.out_channels == C
        assert "decode_head.classifier.weight" in report.ignored
    out = model.eval()(torch.randn(1, 3, H, W))
    assert out["logits"].shape == (1, C, H // 4, W // 4)


def test_encoder_only_checkpoint_reports_missing_head(tmp_path: Path) -> None:
    from transformers import SegformerModel

    encoder = SegformerModel(hf_config_for(_cfg("segformer"), 2))
    encoder.save_pretrained(tmp_path / "mit")
    model = build_model(_cfg("segformer", pretrained=str(tmp_path / "mit")), C)
    state = encoder.state_dict()
    got = model.encoder.state_dict()
    assert all(torch.equal(state[k], got[k]) for k in state)
    report = model.load_report
    assert report is not None and report.missing
    assert all(k.startswith("decode_head.") for k in report.missing)
    assert "decode_head.linear_fuse.weight" in report.missing


def test_pretrained_directory_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"model.pretrained.*{missing}"):
        build_model(_cfg("segformer", pretrained=str(missing)), C)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.pretrained.*config.json"):
        build_model(_cfg("segformer", pretrained=str(tmp_path / "empty")), C)
    _hf_net("upernet-swin", 3).save_pretrained(tmp_path / "upernet")
    with pytest.raises(ConfigError, match="model.pretrained.*'upernet'.*segformer"):
        build_model(_cfg("segformer", pretrained=str(tmp_path / "upernet")), C)
    # architecture in the directory differs from variant/hf_config: named, not silently reset
    _hf_net("segformer", 3).save_pretrained(tmp_path / "sf")
    wider = {**TINY["segformer"]["hf_config"], "decoder_hidden_size": 16}
    with pytest.raises(ConfigError, match="model.pretrained.*differ in shape.*model.hf_config"):
        build_model(_cfg("segformer", hf_config=wider, pretrained=str(tmp_path / "sf")), C)


# ------------------------------------------------------------------ variant tables

MIT_PUBLISHED = {  # Xie et al. 2021 (SegFormer), Table 6 / official mmseg configs
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
    "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
    "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
    "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
    "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
}


@pytest.mark.parametrize("variant", list(MIT_PUBLISHED))
def test_segformer_variant_table(variant: str) -> None:
    hidden, depths, decoder = MIT_PUBLISHED[variant]
    kw = hf_config_kwargs(ModelConfig(arch="segformer", variant=variant), 19)
    assert kw["hidden_sizes"] == hidden and kw["depths"] == depths
    assert kw["decoder_hidden_size"] == decoder and kw["num_labels"] == 19
    assert kw["num_attention_heads"] == [1, 2, 5, 8] and kw["sr_ratios"] == [8, 4, 2, 1]


def test_variant_configs_without_building() -> None:
    b0 = hf_config_for(ModelConfig(arch="segformer", variant="b0"), 11)
    assert list(b0.hidden_sizes) == [32, 64, 160, 256] and list(b0.depths) == [2, 2, 2, 2]
    assert b0.decoder_hidden_size == 256 and b0.num_labels == 11
    assert b0.classifier_dropout_prob == 0.1
    b5 = hf_config_for(ModelConfig(arch="segformer", variant="b5", dropout=0.2), 11)
    assert list(b5.hidden_sizes) == [64, 128, 320, 512] and list(b5.depths) == [3, 6, 40, 3]
    assert b5.decoder_hidden_size == 768 and list(b5.sr_ratios) == [8, 4, 2, 1]
    assert b5.classifier_dropout_prob == 0.2
    m2f = hf_config_for(ModelConfig(arch="mask2former", variant="swin-large"), 7)
    bb = m2f.backbone_config
    assert bb.model_type == "swin" and bb.embed_dim == 192 and bb.window_size == 12
    assert list(bb.depths) == [2, 2, 18, 2] and list(bb.num_heads) == [6, 12, 24, 48]
    assert m2f.num_labels == 7
    up = hf_config_for(ModelConfig(arch="upernet", variant="convnext-base"), 7)
    assert up.backbone_config.model_type == "convnext" and up.use_auxiliary_head is False
    assert list(up.backbone_config.hidden_sizes) == [128, 256, 512, 1024]
    assert list(up.backbone_config.depths) == [3, 3, 27, 3]
    # overrides merge into the variant: unspecified backbone keys keep the variant's values
    tiny = hf_config_for(ModelConfig(arch="upernet", variant="swin-base",
                                     hf_config={"backbone_config": {"depths": [1, 1, 1, 1]}}), 3)
    assert tiny.backbone_config.embed_dim == 128 and list(tiny.backbone_config.depths) == [1] * 4


def test_defaults_for_hf_arches() -> None:
    cfg = ModelConfig(arch="segformer")
    assert cfg.pretrained is None and cfg.variant == "b0"  # "imagenet" default dropped
    assert ModelConfig(arch="mask2former").variant == "swin-tiny"
    assert ModelConfig(arch="upernet", pretrained="none").pretrained is None
    # CNN configs are unchanged, and old metas without the new keys still load
    cnn = ModelConfig()
    assert cnn.pretrained == "imagenet" and cnn.variant is None and cnn.hf_config == {}
    old = {k: v for k, v in cnn.model_dump(mode="json").items()
           if k not in ("variant", "hf_config")}
    assert ModelConfig(**old) == cnn


# ------------------------------------------------------------------ config errors


def _all_routes_fail(match: str, **kw: Any) -> None:
    """The same bad model section fails in ModelConfig, in the experiment YAML (ConfigError) and
    in build_model on an unvalidated config (ConfigError), each message naming the key."""
    with pytest.raises(pydantic.ValidationError, match=match):
        ModelConfig(**kw)
    with pytest.raises(ConfigError, match=match):
        parse_config({"data": DATA, "model": kw}, source="exp.yaml")
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig.model_construct(**kw), C)


def test_unknown_variant() -> None:
    _all_routes_fail(r"model\.variant.*'b9'", arch="segformer", variant="b9", pretrained=None)
    _all_routes_fail(r"model\.variant.*'convnext-tiny'", arch="mask2former",
                     variant="convnext-tiny", pretrained=None)


def test_rep_head_with_segformer() -> None:
    _all_routes_fail(r"model\.rep_head", arch="segformer", rep_head=True, pretrained=None)


def test_imagenet_pretrained_with_segformer() -> None:
    _all_routes_fail(r"model\.pretrained.*imagenet", arch="segformer", pretrained="imagenet")


def test_cnn_only_and_hf_only_keys() -> None:
    _all_routes_fail(r"model\.variant", arch="deeplabv3plus", variant="b0", pretrained=None)
    _all_routes_fail(r"model\.hf_config", arch="pspnet", hf_config={"depths": [1]},
                     pretrained=None)
    _all_routes_fail(r"model\.backbone", arch="upernet", backbone="resnet18", pretrained=None)
    _all_routes_fail(r"model\.output_stride", arch="segformer", output_stride=8,
                     pretrained=None)
    _all_routes_fail(r"model\.dropout", arch="mask2former", dropout=0.3, pretrained=None)
    _all_routes_fail(r"model\.hf_config\.num_labels", arch="segformer",
                     hf_config={"num_labels": 3}, pretrained=None)
    _all_routes_fail(r"model\.hf_config\.backbone_config\.model_type", arch="upernet",
                     hf_config={"backbone_config": {"model_type": "resnet"}}, pretrained=None)


def test_unknown_or_bad_hf_config_keys() -> None:
    with pytest.raises(ConfigError, match=r"model\.hf_config\.hiden_sizes"):
        build_model(ModelConfig(arch="segformer", hf_config={"hiden_sizes": [8, 8, 8, 8]}), C)
    with pytest.raises(ConfigError, match=r"model\.hf_config\.backbone_config\.embed_dims"):
        build_model(ModelConfig(arch="upernet", hf_config={"backbone_config": {"embed_dims": 8}}),
                    C)
    with pytest.raises(ConfigError, match=r"model\.hf_config.*hidden_sizes"):
        build_model(ModelConfig(arch="segformer", hf_config={"hidden_sizes": "wide"}), C)
    bad_groups = {**TINY["mask2former"]["hf_config"], "feature_size": 16}  # GroupNorm(32, 16)
    with pytest.raises(ConfigError, match=r"model\.hf_config.*mask2former"):
        build_model(ModelConfig(arch="mask2former", hf_config=bad_groups), C)

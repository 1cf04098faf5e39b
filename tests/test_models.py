"""Tests of semivss.models: shapes/strides, torchvision key names, weight loading, heads."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pydantic
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from semivss.errors import ConfigError, DataError
from semivss.models import (
    MobileNetV2,
    ModelConfig,
    ResNet,
    build_encoder,
    build_model,
    count_parameters,
    imagenet_weights_path,
    load_encoder_weights,
    load_model_weights,
    read_state_dict,
    save_weights,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def mobilenet_file() -> dict[str, torch.Tensor]:
    return torch.load(imagenet_weights_path("mobilenet_v2"), map_location="cpu", weights_only=True)


def _cfg(**kw: object) -> ModelConfig:
    kw.setdefault("pretrained", None)
    return ModelConfig(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ shapes and strides

COMBOS = [
    (arch, bb, os_)
    for arch in ("deeplabv3plus", "pspnet")
    for bb in ("mobilenet_v2", "resnet18")
    for os_ in (8, 16)
] + [("deeplabv3plus", "resnet50", 16)]


@pytest.mark.parametrize(("arch", "backbone", "output_stride"), COMBOS)
def test_shapes_and_strides(arch: str, backbone: str, output_stride: int) -> None:
    h, w = 64, 96  # non-square: catches H/W swaps
    model = build_model(_cfg(arch=arch, backbone=backbone, output_stride=output_stride), 7).eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        low, high = model.encoder(x)
        out = model(x)
    enc = model.encoder
    assert low.shape == (1, enc.low_channels, h // 4, w // 4)
    assert high.shape == (1, enc.high_channels, h // output_stride, w // output_stride)
    expected_stride = 4 if arch == "deeplabv3plus" else output_stride
    assert model.stride == model.output_stride_total == expected_stride
    hs, ws = h // expected_stride, w // expected_stride
    expected_dim = 256 if arch == "deeplabv3plus" else (128 if backbone == "resnet18" else 512)
    assert model.feature_dim == expected_dim and model.num_classes == 7
    assert out["logits"].shape == (1, 7, hs, ws)
    assert out["feature"].shape == (1, expected_dim, hs, ws)
    assert "rep" not in out
    channels = {"mobilenet_v2": (24, 320), "resnet18": (64, 512), "resnet50": (256, 2048)}
    assert (enc.low_channels, enc.high_channels) == channels[backbone]


def test_logits_size_is_ceil_for_odd_inputs() -> None:
    model = build_model(_cfg(), 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 45, 70))
    assert out["logits"].shape[-2:] == (math.ceil(45 / 4), math.ceil(70 / 4))


def test_aspp_rates_follow_output_stride() -> None:
    for os_, rates in ((16, (6, 12, 18)), (8, (12, 24, 36))):
        aspp = build_model(_cfg(output_stride=os_), 3).decoder.aspp
        assert tuple(aspp.convs[i][0].dilation[0] for i in (1, 2, 3)) == rates
        assert len(aspp.convs) == 5  # 1x1, three atrous, image pooling


def test_feature_dim_override_and_pspnet_defaults() -> None:
    assert build_model(_cfg(arch="pspnet", backbone="resnet18"), 3).feature_dim == 128
    assert build_model(_cfg(arch="pspnet", feature_dim=64), 3).classifier.in_channels == 64
    model = build_model(_cfg(feature_dim=96), 3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32))["feature"].shape[1] == 96


def test_parameter_counts_match_torchvision() -> None:
    # torchvision's documented totals minus the classifier parts we do not build:
    # resnets minus fc (512|2048 * 1000 + 1000); mobilenet_v2 3,504,872 minus
    # classifier (1,281,000) and features.18 (320*1280 conv + 2*1280 BN = 412,160)
    expected = {
        "resnet18": 11_689_512 - 513_000,
        "resnet34": 21_797_672 - 513_000,
        "resnet50": 25_557_032 - 2_049_000,
        "resnet101": 44_549_160 - 2_049_000,
        "mobilenet_v2": 3_504_872 - 1_281_000 - 412_160,
    }
    for name, n in expected.items():
        assert count_parameters(build_encoder(name, 16)) == n, name


# ------------------------------------------------------------------ SegModel API


@pytest.mark.parametrize("arch", ["deeplabv3plus", "pspnet"])
def test_classify_feature_equals_logits(arch: str) -> None:
    model = build_model(_cfg(arch=arch), 5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.classify(out["feature"]), out["logits"])
    model.train()  # dropout sits before `feature`, so this also holds while training
    out = model(x)
    assert torch.equal(model.classify(out["feature"]), out["logits"])
    assert model.classify is not None and model.classifier.out_channels == 5


def test_param_groups_partition_all_parameters() -> None:
    model = build_model(_cfg(rep_head=True), 4)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "head"}
    ids_b = [id(p) for p in groups["backbone"]]
    ids_h = [id(p) for p in groups["head"]]
    assert len(set(ids_b)) == len(ids_b) and len(set(ids_h)) == len(ids_h)
    assert not set(ids_b) & set(ids_h)
    assert set(ids_b) | set(ids_h) == {id(p) for p in model.parameters()}
    assert set(ids_b) == {id(p) for p in model.encoder.parameters()}
    head_ids = set(ids_h)
    assert id(model.classifier.weight) in head_ids
    rep = model.decoder.rep
    assert rep is not None and all(id(p) in head_ids for p in rep.parameters())


def test_rep_head_shape_and_gradients() -> None:
    model = build_model(_cfg(rep_head=True), 4)
    out = model(torch.randn(2, 3, 64, 80))
    assert out["rep"].shape == (2, 256, 16, 20)
    assert out["logits"].shape == (2, 4, 16, 20) and model.has_rep_head
    out["rep"].pow(2).mean().backward()
    rep = model.decoder.rep
    assert rep is not None and rep.head[-1].weight.grad is not None
    assert rep.head[-1].bias is not None  # final 1x1 has a bias (U2PL)
    assert model.classifier.weight.grad is None  # rep head does not feed the classifier


def test_rep_head_requires_deeplab() -> None:
    with pytest.raises(pydantic.ValidationError, match="rep_head"):
        ModelConfig(arch="pspnet", rep_head=True)
    bad = ModelConfig.model_construct(arch="pspnet", rep_head=True, backbone="resnet18",
                                      output_stride=8, pretrained=None, feature_dim=None,
                                      dropout=0.1)
    with pytest.raises(ConfigError, match="model.rep_head"):
        build_model(bad, 3)


def test_model_config_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="unknown_key"):
        ModelConfig(unknown_key=1)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError, match="output_stride"):
        ModelConfig(output_stride=32)  # type: ignore[arg-type]
    with pytest.raises(pydantic.ValidationError, match="backbone"):
        ModelConfig(backbone="vgg16")  # type: ignore[arg-type]
    assert ModelConfig(pretrained="none").pretrained is None
    assert ModelConfig(pretrained="None").pretrained is None
    assert ModelConfig().pretrained == "imagenet"
    with pytest.raises(ConfigError, match="num_classes"):
        build_model(_cfg(), 0)


def test_head_init_kaiming_and_bn() -> None:
    model = build_model(_cfg(), 3)
    bn = model.decoder.fuse[0][1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    conv = model.decoder.fuse[0][0]  # kaiming normal, fan_in: std = sqrt(2 / fan_in)
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert torch.equal(model.classifier.bias, torch.zeros_like(model.classifier.bias))


def test_bf16_autocast_channels_last_forward_backward() -> None:
    model = build_model(_cfg(rep_head=True), 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)["logits"]
    model = model.to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = model(xc)["logits"].float()
    # bf16 keeps ~3 significant digits: the eval logits agree closely with fp32
    corr = torch.corrcoef(torch.stack([low_precision.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.99
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xc)
    assert out["logits"].dtype == torch.bfloat16 and out["rep"].shape == (2, 256, 16, 16)
    target = torch.randint(0, 5, (2, 64, 64))
    logits = F.interpolate(out["logits"].float(), size=(64, 64), mode="bilinear")
    loss = F.cross_entropy(logits, target) + out["rep"].float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------ torchvision key names


def test_torchvision_key_names() -> None:
    r18 = ResNet("resnet18").state_dict()
    assert "layer4.1.bn2.running_var" in r18 and "layer2.0.downsample.1.weight" in r18
    assert "layer1.0.downsample.0.weight" not in r18
    assert len(r18) == 120  # torchvision resnet18 state dict has 122 entries incl. fc.{weight,bias}
    r50 = ResNet("resnet50")
    assert len(list(r50.parameters())) == 161 - 2  # torchvision: 161 parameters incl. fc
    sd50 = r50.state_dict()
    assert "layer1.0.downsample.0.weight" in sd50 and "layer4.2.conv3.weight" in sd50
    assert sd50["layer3.0.conv2.weight"].shape == (256, 256, 3, 3)
    mb = MobileNetV2().state_dict()
    assert "features.17.conv.2.weight" in mb and "features.17.conv.3.running_mean" in mb
    assert "features.1.conv.2.running_var" in mb  # expand ratio 1: no expansion conv
    assert not any(k.startswith(("features.18", "classifier")) for k in mb)


def test_output_stride_does_not_change_parameters() -> None:
    for name in ("mobilenet_v2", "resnet18"):
        a, b = build_encoder(name, 8).state_dict(), build_encoder(name, 16).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


# ------------------------------------------------------------------ real MobileNetV2 file


def test_real_mobilenet_file_keys_and_values(mobilenet_file: dict[str, torch.Tensor]) -> None:
    encoder = MobileNetV2(16)
    ours = set(encoder.state_dict())
    dropped = {k for k in mobilenet_file if k.startswith(("features.18.", "classifier."))}
    assert dropped and set(mobilenet_file) - dropped == ours
    report = load_encoder_weights(encoder, "imagenet")
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.ignored) == sorted(dropped)
    assert report.loaded == len(ours)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, mobilenet_file[key]), key
    n_file = sum(
        v.numel() for k, v in mobilenet_file.items()
        if k not in dropped
        and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert n_file == count_parameters(encoder)


def test_build_model_default_loads_imagenet(mobilenet_file: dict[str, torch.Tensor]) -> None:
    model = build_model(ModelConfig(), 11)
    assert model.load_report is not None and model.load_report.missing == []
    w = model.encoder.features[17].conv[2].weight
    assert torch.equal(w, mobilenet_file["features.17.conv.2.weight"])


def _reference_mobilenet_v2(
    sd: dict[str, torch.Tensor], x: torch.Tensor, blocks: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional MobileNetV2 straight from the torchvision state dict (independent oracle).

    ``blocks[i-1] = (expand_ratio, stride, dilation)`` of ``features.i``, written by hand.
    """

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                            sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)

    def conv(t: torch.Tensor, w: torch.Tensor, stride: int = 1, dil: int = 1,
             groups: int = 1) -> torch.Tensor:
        return F.conv2d(t, w, None, stride, dil * (w.shape[-1] - 1) // 2, dil, groups)

    x = bn(conv(x, sd["features.0.0.weight"], 2), "features.0.1").clamp(0, 6)
    low = x
    for i, (t, s, d) in enumerate(blocks, start=1):
        p, j, h = f"features.{i}.conv", 0, x
        if t != 1:
            h = bn(conv(h, sd[f"{p}.0.0.weight"]), f"{p}.0.1").clamp(0, 6)
            j = 1
        h = bn(conv(h, sd[f"{p}.{j}.0.weight"], s, d, h.shape[1]), f"{p}.{j}.1").clamp(0, 6)
        h = bn(conv(h, sd[f"{p}.{j + 1}.weight"]), f"{p}.{j + 2}")
        x = x + h if s == 1 and x.shape == h.shape else h
        if i == 3:
            low = x
    return low, x


# (t, stride, dilation) for features.1..17, by hand from the torchvision table
# [t,c,n,s] = [1,16,1,1] [6,24,2,2] [6,32,3,2] [6,64,4,2] [6,96,3,1] [6,160,3,2] [6,320,1,1]
_OS16 = [(1, 1, 1), (6, 2, 1), (6, 1, 1), (6, 2, 1), (6, 1, 1), (6, 1, 1), (6, 2, 1),
         (6, 1, 1), (6, 1, 1), (6, 1, 1), (6, 1, 1), (6, 1, 1), (6, 1, 1),
         (6, 1, 1), (6, 1, 2), (6, 1, 2), (6, 1, 2)]
_OS8 = [(1, 1, 1), (6, 2, 1), (6, 1, 1), (6, 2, 1), (6, 1, 1), (6, 1, 1), (6, 1, 1),
        (6, 1, 2), (6, 1, 2), (6, 1, 2), (6, 1, 2), (6, 1, 2), (6, 1, 2),
        (6, 1, 2), (6, 1, 4), (6, 1, 4), (6, 1, 4)]


@pytest.mark.parametrize(("output_stride", "table"), [(16, _OS16), (8, _OS8)])
def test_mobilenet_forward_matches_functional_oracle(
    mobilenet_file: dict[str, torch.Tensor], output_stride: int, table: list[tuple[int, int, int]]
) -> None:
    encoder = MobileNetV2(output_stride)
    load_encoder_weights(encoder, "imagenet")
    encoder.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        low, high = encoder(x)
        ref_low, ref_high = _reference_mobilenet_v2(mobilenet_file, x, table)
    torch.testing.assert_close(low, ref_low, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(high, ref_high, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ file round trips


def _perturbed_resnet18() -> ResNet:
    enc = ResNet("resnet18", 16)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-default stats must round-trip too
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.1, 0.1)
    return enc.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_resnet18_round_trip(tmp_path: Path, fmt: str) -> None:
    src = _perturbed_resnet18()
    state = src.state_dict()
    if fmt == "pth":
        path = tmp_path / "r18.pth"
        torch.save(state, path)
    elif fmt == "safetensors":
        path = tmp_path / "r18.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # DDP + training checkpoint wrapper, with torchvision's fc that we ignore
        path = tmp_path / "ckpt.pt"
        wrapped = {f"module.{k}": v for k, v in state.items()}
        wrapped["module.fc.weight"] = torch.zeros(1000, 512)
        wrapped["module.fc.bias"] = torch.zeros(1000)
        torch.save({"state_dict": wrapped, "epoch": 3}, path)
    dst = ResNet("resnet18", 8)  # weights do not depend on the output stride
    report = load_encoder_weights(dst, path, strict=True)
    assert report.missing == [] and report.unexpected == []
    assert report.ignored == (["fc.weight", "fc.bias"] if fmt == "wrapped" else [])
    for key, value in dst.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(1, 3, 32, 32)
    reference = ResNet("resnet18", 8).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x)[1], reference(x)[1], rtol=0, atol=0)


def test_build_model_with_local_checkpoint(tmp_path: Path) -> None:
    path = save_weights(_perturbed_resnet18(), tmp_path / "r18.safetensors")
    model = build_model(_cfg(arch="pspnet", backbone="resnet18", output_stride=8,
                             pretrained=str(path)), 3)
    assert model.load_report is not None and model.load_report.missing == []
    assert torch.equal(model.encoder.layer4[1].bn2.running_var,
                       read_state_dict(path)["layer4.1.bn2.running_var"])


def test_partial_checkpoint_reports_missing(tmp_path: Path) -> None:
    state = {k: v for k, v in ResNet("resnet18").state_dict().items() if not k.startswith("layer4")}
    path = tmp_path / "partial.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in state.items()}}, path)
    report = load_encoder_weights(ResNet("resnet18"), path)
    assert "layer4.1.bn2.weight" in report.missing
    assert all(k.startswith("layer4.") for k in report.missing)
    with pytest.raises(DataError, match="partial.pth"):
        load_encoder_weights(ResNet("resnet18"), path, strict=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_whole_model_round_trip(tmp_path: Path, suffix: str) -> None:
    src = build_model(_cfg(rep_head=True), 4)
    src(torch.randn(2, 3, 32, 32))  # update BN running stats
    path = save_weights(src, tmp_path / f"model{suffix}")
    dst = build_model(_cfg(rep_head=True), 4)
    report = load_model_weights(dst, path)
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x)["logits"], src.eval()(x)["logits"])
    with pytest.raises(DataError, match=rf"model{suffix}.*classifier\.(weight|bias).*expects \(6,"):
        load_model_weights(build_model(_cfg(rep_head=True), 6), path)
    plain = save_weights(build_model(_cfg(), 4), tmp_path / f"plain{suffix}")
    with pytest.raises(DataError, match=f"plain{suffix}.*missing keys.*decoder.rep"):
        load_model_weights(build_model(_cfg(rep_head=True), 4), plain)
    with pytest.raises(DataError, match=f"model{suffix}.*unexpected keys.*decoder.rep"):
        load_model_weights(build_model(_cfg(), 4), path)
    assert load_model_weights(build_model(_cfg(), 4), path, strict=False).unexpected


# ------------------------------------------------------------------ errors


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="nope.pth"):
        load_encoder_weights(MobileNetV2(), path)
    with pytest.raises(ConfigError, match="nope.pth"):
        build_model(_cfg(pretrained=str(path)), 3)
    with pytest.raises(ConfigError, match="weights.bin.*suffix"):
        load_encoder_weights(MobileNetV2(), tmp_path / "weights.bin")


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors"])
def test_garbage_file_is_data_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(DataError, match=name):
        load_encoder_weights(MobileNetV2(), path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:  # weights_only=True must refuse arbitrary objects
        pickle.dump({"state_dict": {"x": Path("/")}, "hook": print}, fh, protocol=2)
    with pytest.raises(DataError, match="evil.pt"):
        read_state_dict(path)


def test_non_matching_and_mismatched_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3), "bar.bias": torch.zeros(2)}, path)
    with pytest.raises(DataError, match="other.pth.*none of its 2 keys"):
        load_encoder_weights(ResNet("resnet18"), path)
    path = tmp_path / "r50.pth"  # a ResNet-50 file loaded into a ResNet-18
    torch.save(ResNet("resnet50").state_dict(), path)
    with pytest.raises(DataError, match="r50.pth.*layer1.0.conv1.weight"):
        load_encoder_weights(ResNet("resnet18"), path)
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(DataError, match="tensor.pt.*not a state dict"):
        read_state_dict(path)


def test_resnet_imagenet_needs_local_file() -> None:
    with pytest.raises(ConfigError, match="model.pretrained.*resnet18.*local torchvision"):
        load_encoder_weights(ResNet("resnet18"), "imagenet")
    with pytest.raises(ConfigError, match="model.pretrained.*resnet101.*local torchvision"):
        imagenet_weights_path("resnet101")
    with pytest.raises(ConfigError, match="model.pretrained.*resnet18"):
        build_model(ModelConfig(backbone="resnet18"), 3)  # default pretrained: imagenet


def test_init_from_loads_a_trained_model_and_keeps_new_heads(tmp_path: Path) -> None:
    """model.init_from starts a model from trained weights (exported safetensors or a training
    checkpoint); a representation head absent from the file keeps its init; a misfit is an error."""
    from semivss.engine.checkpoint import save_checkpoint
    from semivss.errors import ConfigError
    from semivss.models import save_weights

    torch.manual_seed(0)
    base = ModelConfig(backbone="mobilenet_v2", pretrained=None)
    trained = build_model(base, 5)
    for p in trained.parameters():
        p.data.uniform_(-0.1, 0.1)
    st = save_weights(trained, tmp_path / "model.safetensors")
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"models": {"model": trained.state_dict()},
                           "meta": {"inference_model": "model"}})
    for path in (st, ckpt):
        student = build_model(base.model_copy(update={"init_from": str(path), "rep_head": True}), 5)
        for k, v in trained.state_dict().items():
            torch.testing.assert_close(student.state_dict()[k], v, msg=k)
        assert student.init_report.missing and all(k.startswith("decoder.rep") for k in
                                                    student.init_report.missing)
    with pytest.raises(ConfigError, match=r"model\.init_from.*does not have"):
        build_model(ModelConfig(arch="pspnet", feature_dim=256, pretrained=None,
                                init_from=str(st)), 5)
    with pytest.raises(ConfigError, match=r"model\.init_from.*has shape"):
        build_model(ModelConfig(backbone="mobilenet_v2", pretrained=None, output_stride=8,
                                feature_dim=128, init_from=str(st)), 5)
    with pytest.raises(ConfigError, match=r"model\.init_from.*missing\.pt"):
        build_model(base.model_copy(update={"init_from": str(tmp_path / "missing.pt")}), 5)


def test_representation_head_at_stride_8() -> None:
    """model.rep_stride: 8 pools the head's inputs 2x2: same channels, half the resolution of
    the stride-4 head, and a U2PL step runs on it."""
    from semivss.methods import build_method

    x = torch.randn(2, 3, 64, 96)
    m4 = build_model(ModelConfig(pretrained=None, rep_head=True), 5).eval()
    m8 = build_model(ModelConfig(pretrained=None, rep_head=True, rep_stride=8), 5).eval()
    with torch.no_grad():
        r4, r8 = m4(x)["rep"], m8(x)["rep"]
    assert r4.shape == (2, 256, 16, 24) and r8.shape == (2, 256, 8, 12)
    assert m8(x)["logits"].shape == m4(x)["logits"].shape  # the segmentation path is unchanged
    with pytest.raises(ValueError, match="rep_stride"):
        ModelConfig(pretrained=None, rep_stride=8)
    u2pl = build_method("u2pl", {}, 5)
    models = u2pl.build_models(lambda: build_model(ModelConfig(pretrained=None, rep_head=True, rep_stride=8), 5))
    from semivss.data.batch import LabeledBatch, UnlabeledBatch

    batch = {"labeled": LabeledBatch(x, torch.randint(0, 5, (2, 64, 96)), torch.ones(2, 64, 96, dtype=torch.bool)),
             "unlabeled": UnlabeledBatch(torch.randn(2, 1, 3, 64, 96), torch.zeros(2, 1, dtype=torch.int64),
                                         torch.ones(2, 1, 64, 96, dtype=torch.bool))}
    losses = u2pl.training_step(models, batch, 5, 10)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])

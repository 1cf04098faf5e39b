"""Transformer segmentation networks from ``transformers`` behind the SegModel contract.

``model.arch`` ``segformer`` (MiT-b0..b5 + all-MLP decoder), ``upernet`` (Swin or ConvNeXt +
UperNet head) and ``mask2former`` (Swin + masked-attention decoder), built from a transformers
config (no download: :func:`hf_config_for`) and optionally loaded from a local
``save_pretrained`` directory. ``forward(x)`` takes an ImageNet-normalised ``(B,3,H,W)`` tensor
and returns ``{"logits", "feature"}`` at stride 4. SegFormer / UperNet expose their 1x1
classifier (``classify``, so IFR works); Mask2Former returns ``logits = log p`` of its
class-normalised semantic map and has no ``classify``.
Details and reasons: docs/methods.md#73-transformer-models-and-label-maps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from semivss.errors import ConfigError
from semivss.models.config import (
    CONVNEXT_VARIANTS,
    SEGFORMER_VARIANTS,
    SWIN_VARIANTS,
    ModelConfig,
    arch_variants,
    archs_with,
    config_problem,
    transformer_archs,
)
from semivss.models.weights import LoadReport
from semivss.registry import ARCHS

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = [
    "CONVNEXT_SIZES",
    "MIT_SIZES",
    "SEMANTIC_EPS",
    "SWIN_SIZES",
    "HFSegModel",
    "Mask2FormerSegModel",
    "SegformerSegModel",
    "UperNetSegModel",
    "build_hf_model",
    "hf_config_for",
    "hf_config_kwargs",
    "mask2former_semantic_probs",
]

log = logging.getLogger(__name__)

#: Mix Transformer sizes of SegFormer (Xie et al. 2021, Table 6 / the official configs).
MIT_SIZES: dict[str, dict[str, Any]] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2]},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2]},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3]},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3]},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3]},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3]},
}
for _name, _size in MIT_SIZES.items():  # decoder width 256 for b0-b1, 768 for b2-b5
    _size["decoder_hidden_size"] = 256 if _name in ("b0", "b1") else 768
for _size in MIT_SIZES.values():  # shared by all MiT sizes
    _size.update(num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4],
                 patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], drop_path_rate=0.1)

_STAGES = ["stage1", "stage2", "stage3", "stage4"]
#: Swin sizes (Liu et al. 2021; window 12 for the 384-pretrained base/large of the official
#: Mask2Former/UperNet checkpoints).
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "swin-tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24],
                  "window_size": 7},
    "swin-small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24],
                   "window_size": 7},
    "swin-base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                  "window_size": 12},
    "swin-large": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48],
                   "window_size": 12},
}
for _size in SWIN_SIZES.values():
    _size.update(model_type="swin", patch_size=4, drop_path_rate=0.3, out_features=_STAGES)

#: ConvNeXt sizes (Liu et al. 2022) with the drop-path rates of the mmseg UperNet configs.
CONVNEXT_SIZES: dict[str, dict[str, Any]] = {
    "convnext-tiny": {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3],
                      "drop_path_rate": 0.4},
    "convnext-small": {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 27, 3],
                       "drop_path_rate": 0.3},
    "convnext-base": {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3],
                      "drop_path_rate": 0.4},
    "convnext-large": {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3],
                       "drop_path_rate": 0.4},
}
for _size in CONVNEXT_SIZES.values():
    _size.update(model_type="convnext", patch_size=4, out_features=_STAGES)

assert tuple(MIT_SIZES) == SEGFORMER_VARIANTS and tuple(SWIN_SIZES) == SWIN_VARIANTS
assert tuple(CONVNEXT_SIZES) == CONVNEXT_VARIANTS

#: Lower clamp of the unnormalised Mask2Former semantic score before normalisation.
SEMANTIC_EPS = 1e-6
_BACKBONE_EXTRA_KEYS = ("out_features", "out_indices")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _wrapper(arch: str) -> type[HFSegModel]:
    """The wrapper class registered for the transformers arch ``arch``."""
    wrapper = ARCHS.meta(arch).get("wrapper") if arch in ARCHS else None
    if wrapper is None:
        raise ConfigError(
            f"model.arch: {arch!r} is not a transformers arch ({', '.join(transformer_archs())})"
        )
    return wrapper


def _config_classes(arch: str) -> tuple[type, type]:
    """(config class, model class) of ``arch`` (imports transformers lazily: ~4 s)."""
    import transformers as tf

    config_name, model_name = _wrapper(arch).hf_classes
    return getattr(tf, config_name), getattr(tf, model_name)


def _allowed_keys(config_cls: type, extra: tuple[str, ...] = ()) -> set[str]:
    names = {f.name for f in dataclasses.fields(config_cls) if not f.name.startswith("_")}
    return names | set(getattr(config_cls, "attribute_map", {})) | set(extra)


def _check_keys(given: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key (valid keys: {sorted(allowed)})"
        )


def _variant(cfg: ModelConfig) -> str:
    return cfg.variant if cfg.variant is not None else arch_variants(cfg.arch)[0]


def hf_config_kwargs(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """Keyword arguments of the transformers config of ``cfg`` (no transformers import): the
    published size of ``cfg.variant``, then ``cfg.hf_config`` (``backbone_config`` merged key by
    key), then what semivss fixes (``num_labels`` = ``num_classes``, no auxiliary head)."""
    problem = config_problem(cfg)
    if problem is not None:
        raise ConfigError(problem)
    variant = _variant(cfg)
    overrides = json.loads(json.dumps(cfg.hf_config))  # deep copy; never mutate cfg
    kwargs: dict[str, Any]
    if cfg.arch == "segformer":
        kwargs = json.loads(json.dumps(MIT_SIZES[variant]))
        kwargs["classifier_dropout_prob"] = cfg.dropout
        kwargs.update(overrides)
    else:
        table = SWIN_SIZES if variant in SWIN_SIZES else CONVNEXT_SIZES
        backbone = json.loads(json.dumps(table[variant]))
        backbone.update(overrides.pop("backbone_config", {}))
        kwargs = {**overrides, "backbone_config": backbone}
        if cfg.arch == "upernet":
            kwargs["use_auxiliary_head"] = False
    kwargs["num_labels"] = num_classes
    return kwargs


def hf_config_for(cfg: ModelConfig, num_classes: int) -> PreTrainedConfig:
    """The transformers config of ``cfg`` (see :func:`hf_config_kwargs`); unknown or badly typed
    ``hf_config`` keys raise :class:`ConfigError` naming ``model.hf_config.<key>``."""
    kwargs = hf_config_kwargs(cfg, num_classes)
    config_cls, _ = _config_classes(cfg.arch)
    _check_keys({k: v for k, v in kwargs.items() if k != "num_labels"},
                _allowed_keys(config_cls), "model.hf_config")
    if "backbone_config" in kwargs:
        import transformers as tf

        backbone_cls = tf.SwinConfig if kwargs["backbone_config"]["model_type"] == "swin" \
            else tf.ConvNextConfig
        given = {k: v for k, v in kwargs["backbone_config"].items() if k != "model_type"}
        _check_keys(given, _allowed_keys(backbone_cls, _BACKBONE_EXTRA_KEYS),
                    "model.hf_config.backbone_config")
    from huggingface_hub.errors import StrictDataclassError

    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError, StrictDataclassError) as exc:
        raise ConfigError(f"model.hf_config: invalid {cfg.arch} config: {exc}") from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load tables and progress bars (semivss logs its own report)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def _load_pretrained(
    arch: str, config: PreTrainedConfig, source: str
) -> tuple[PreTrainedModel, LoadReport]:
    """Load a local ``save_pretrained`` directory into the model of ``config`` (the architecture
    comes from ``model.variant``/``model.hf_config``, the file supplies weights). Classifier
    tensors of another class count are re-initialised and listed in ``report.ignored``."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.pretrained: {path} is not a directory; for arch {arch!r} it must be a local "
            "directory written by transformers' save_pretrained (config.json + weights)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.pretrained: {path} has no config.json (not a save_pretrained "
                          "directory)")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ConfigError(f"model.pretrained: {path} holds no weights (expected one of "
                          f"{list(_WEIGHT_FILES)})")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model.pretrained: {config_file} is not a valid JSON config: {exc}") \
            from None
    if model_type != _wrapper(arch).arch:
        raise ConfigError(
            f"model.pretrained: {config_file} is a {model_type!r} model, model.arch is {arch!r}"
        )
    _, model_cls = _config_classes(arch)
    with _quiet_transformers():
        net, info = model_cls.from_pretrained(
            str(path), config=config, local_files_only=True, ignore_mismatched_sizes=True,
            output_loading_info=True, dtype=torch.float32,
        )
    class_keys = _wrapper(arch).class_keys
    mismatched = sorted(str(item[0]) for item in info.get("mismatched_keys", ()))
    wrong = [k for k in mismatched if not k.startswith(class_keys)]
    if wrong:
        raise ConfigError(
            f"model.pretrained: {path}: {len(wrong)} tensors differ in shape from the model built "
            f"from model.variant/model.hf_config (e.g. {wrong[:4]}); set model.variant and "
            "model.hf_config to the checkpoint's architecture"
        )
    unexpected = sorted(str(k) for k in info.get("unexpected_keys", ()))
    own = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    missing = sorted(str(k) for k in info.get("missing_keys", ())
                     if not str(k).endswith("num_batches_tracked"))
    report = LoadReport(
        missing=missing,
        unexpected=[k for k in unexpected if not k.startswith(class_keys)],
        ignored=mismatched + [k for k in unexpected if k.startswith(class_keys)],
        source=str(path),
    )
    report.loaded = len(set(own) - set(missing) - set(mismatched))
    if report.loaded == 0:
        raise ConfigError(f"model.pretrained: none of the tensors in {path} match the {arch} "
                          "model (wrong model class or key names)")
    if missing:
        log.warning("pretrained %s lacks %d %s keys (initialised at random): %s", path,
                    len(missing), arch, missing[:8])
    if report.unexpected:
        log.warning("pretrained %s: %d keys match nothing in the %s model: %s", path,
                    len(report.unexpected), arch, report.unexpected[:8])
    return net, report


class HFSegModel(nn.Module):
    """Base of the transformers wrappers: the attributes of ``SegModel`` (``num_classes``,
    ``feature_dim``, ``stride``, ``output_stride_total``, ``has_rep_head = False``,
    ``load_report``) and ``param_groups``. ``net`` is the transformers model.

    A subclass decorated with :func:`_transformers_arch` is the arch ``arch`` (also the
    ``model_type`` of its ``config.json``), built from the transformers classes named in
    ``hf_classes`` (config, model), sized by ``variants`` (the first is the default);
    ``class_keys`` prefix the checkpoint tensors whose shape depends on the class count."""

    has_rep_head = False
    supports_classify = True
    arch: ClassVar[str]
    hf_classes: ClassVar[tuple[str, str]]
    variants: ClassVar[tuple[str, ...]]
    class_keys: ClassVar[tuple[str, ...]]

    def __init__(self, net: PreTrainedModel, num_classes: int, feature_dim: int,
                 stride: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.stride = stride
        self.load_report: LoadReport | None = None

    @property
    def output_stride_total(self) -> int:
        """Stride of ``logits`` relative to the input (alias of ``stride``)."""
        return self.stride

    @property
    def encoder(self) -> nn.Module:
        """The backbone (its parameters form the ``backbone`` group)."""
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` = encoder parameters, ``head`` = the rest (decoder(s), classifier)."""
        backbone = list(self.encoder.parameters())
        ids = {id(p) for p in backbone}
        return {"backbone": backbone, "head": [p for p in self.parameters() if id(p) not in ids]}

    def classify(self, feature: Tensor) -> Tensor:
        """The final 1x1 classifier (the module ``forward`` uses) on a feature map."""
        return self.classifier(feature)


def _detach_classifier(net: PreTrainedModel) -> nn.Conv2d:
    """Take the decode head's final 1x1 conv out (replaced by identity) so that the head's
    forward returns the classifier input."""
    classifier = net.decode_head.classifier
    net.decode_head.classifier = nn.Identity()
    return classifier


def _build_registered(cfg: ModelConfig, num_classes: int) -> HFSegModel:
    return build_hf_model(cfg, num_classes)


def _transformers_arch(wrapper: type[HFSegModel]) -> type[HFSegModel]:
    """Class decorator: register ``wrapper`` as the transformers arch ``wrapper.arch`` in
    :data:`semivss.registry.ARCHS` (built by :func:`build_hf_model`; transformers is imported
    only then)."""
    ARCHS.register(wrapper.arch, _build_registered, transformer=True, variants=wrapper.variants,
                   classify=wrapper.supports_classify, wrapper=wrapper)
    return wrapper


@_transformers_arch
class SegformerSegModel(HFSegModel):
    """SegFormer (Xie et al. 2021): MiT encoder, all-MLP decode head; ``feature`` = fused map
    after BN, ReLU and dropout (``decoder_hidden_size`` channels, stride 4)."""

    arch = "segformer"
    hf_classes = ("SegformerConfig", "SegformerForSemanticSegmentation")
    variants = SEGFORMER_VARIANTS
    class_keys = ("decode_head.classifier.",)

    def __init__(self, net: PreTrainedModel, num_classes: int) -> None:
        cfg = net.config
        super().__init__(net, num_classes, cfg.decoder_hidden_size, cfg.strides[0])
        self.classifier = _detach_classifier(net)

    @property
    def encoder(self) -> nn.Module:
        return self.net.segformer

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hidden = self.net.segformer(x, output_hidden_states=True).hidden_states
        feature = self.net.decode_head(hidden)
        return {"logits": self.classifier(feature), "feature": feature}


@_transformers_arch
class UperNetSegModel(HFSegModel):
    """UperNet (Xiao et al. 2018) on Swin/ConvNeXt: PPM + FPN; ``feature`` = the
    ``fpn_bottleneck`` output (``hidden_size`` channels, stride 4). No auxiliary head."""

    arch = "upernet"
    hf_classes = ("UperNetConfig", "UperNetForSemanticSegmentation")
    variants = SWIN_VARIANTS + CONVNEXT_VARIANTS
    class_keys = ("decode_head.classifier.", "auxiliary_head.")

    def __init__(self, net: PreTrainedModel, num_classes: int) -> None:
        cfg = net.config
        super().__init__(net, num_classes, cfg.hidden_size, cfg.backbone_config.patch_size)
        self.classifier = _detach_classifier(net)

    @property
    def encoder(self) -> nn.Module:
        return self.net.backbone

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feature = self.net.decode_head(self.net.backbone(x).feature_maps)
        return {"logits": self.classifier(feature), "feature": feature}


def mask2former_semantic_probs(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """Normalised Mask2Former semantic map (docs/methods.md#73-transformer-models-and-label-maps):
    ``s = einsum(softmax(class)[..., :C], sigmoid(mask))`` over queries, ``p = s / sum_c s`` with
    ``s`` clamped at :data:`SEMANTIC_EPS`. ``class_logits`` (B,Q,C+1), ``mask_logits`` (B,Q,h,w)
    -> (B,C,h,w), computed in float32."""
    with torch.autocast(device_type=class_logits.device.type, enabled=False):
        cls = class_logits.float().softmax(-1)[..., :-1]
        score = torch.einsum("bqc,bqhw->bchw", cls, mask_logits.float().sigmoid())
        score = score.clamp_min(SEMANTIC_EPS)
        return score / score.sum(1, keepdim=True)


@_transformers_arch
class Mask2FormerSegModel(HFSegModel):
    """Mask2Former (Cheng et al. 2022) on Swin. ``forward`` returns ``logits = log p`` with ``p``
    the normalised semantic map (:func:`mask2former_semantic_probs`), ``probs = p`` and
    ``feature`` = the pixel decoder's mask embedding (``mask_feature_size`` channels, stride 4).
    ``classify`` raises: there is no per-pixel classifier."""

    supports_classify = False
    arch = "mask2former"
    hf_classes = ("Mask2FormerConfig", "Mask2FormerForUniversalSegmentation")
    variants = SWIN_VARIANTS
    class_keys = ("class_predictor.", "criterion.empty_weight")

    def __init__(self, net: PreTrainedModel, num_classes: int) -> None:
        cfg = net.config
        super().__init__(net, num_classes, cfg.mask_feature_size, cfg.backbone_config.patch_size)

    @property
    def encoder(self) -> nn.Module:
        return self.net.model.pixel_level_module.encoder

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.net(pixel_values=x, output_auxiliary_logits=False)
        probs = mask2former_semantic_probs(out.class_queries_logits, out.masks_queries_logits)
        return {"logits": probs.log(), "feature": out.pixel_decoder_last_hidden_state,
                "probs": probs}

    def classify(self, feature: Tensor) -> Tensor:
        raise ConfigError(
            f"model.arch: {self.arch}'s semantic map is not a function of the per-pixel feature "
            "alone (it mixes query class scores and query masks), so IFR-style feature "
            f"classification (model.classify) is not available for {self.arch}; use one of "
            f"{', '.join(archs_with('classify', default=True))}"
        )


def build_hf_model(cfg: ModelConfig, num_classes: int) -> HFSegModel:
    """Build the transformers network of ``cfg`` for ``num_classes`` classes (random init with
    the transformers initialisers, drawn from torch's global RNG) or load ``cfg.pretrained`` (a
    local ``save_pretrained`` directory; ``model.load_report`` says what was loaded). Returned
    in train mode."""
    wrapper = _wrapper(cfg.arch)
    config = hf_config_for(cfg, num_classes)
    report: LoadReport | None = None
    pretrained = cfg.pretrained
    if pretrained is not None and pretrained.strip().lower() not in ("", "none", "null"):
        net, report = _load_pretrained(cfg.arch, config, pretrained)
    else:
        _, model_cls = _config_classes(cfg.arch)
        try:
            net = model_cls(config)
        except (TypeError, ValueError) as exc:  # e.g. widths not divisible by groups/heads
            raise ConfigError(
                f"model.hf_config: cannot build {cfg.arch} {_variant(cfg)}: {exc}"
            ) from None
    model = wrapper(net, num_classes)
    model.load_report = report
    return model.train()


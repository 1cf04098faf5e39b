"""Config section ``model`` (see docs/ARCHITECTURE.md, semivss.models)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from semivss.registry import ARCHS
from semivss.sections import Section

Backbone = Literal["mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101"]

SEGFORMER_VARIANTS: tuple[str, ...] = ("b0", "b1", "b2", "b3", "b4", "b5")
SWIN_VARIANTS: tuple[str, ...] = ("swin-tiny", "swin-small", "swin-base", "swin-large")
CONVNEXT_VARIANTS: tuple[str, ...] = (
    "convnext-tiny", "convnext-small", "convnext-base", "convnext-large",
)
#: ``hf_config`` keys semivss sets itself (from the dataset / the wrapper contract).
RESERVED_HF_KEYS: tuple[str, ...] = (
    "num_labels", "id2label", "label2id", "use_auxiliary_head", "model_type", "return_dict",
)
_CNN_DEFAULTS: dict[str, Any] = {
    "backbone": "mobilenet_v2", "output_stride": 16, "feature_dim": None, "rep_head": False,
    "rep_stride": 4,
}


def archs_with(flag: str, default: bool = False) -> tuple[str, ...]:
    """Registered arches (:data:`semivss.registry.ARCHS`) whose registration sets ``flag``
    (``ARCHS.register(name, transformer=True, ...)``; ``default`` when it does not say).

    Flags read by semivss: ``transformer`` (built by :mod:`semivss.models.hf`: sized by
    ``model.variant``/``model.hf_config``, not by the CNN keys), ``rep_head`` (supports the U2PL
    representation head) and ``classify`` (``model.classify(feature)`` works; default true)."""
    return tuple(n for n in ARCHS.names() if ARCHS.meta(n).get(flag, default))


def transformer_archs() -> tuple[str, ...]:
    """Arches registered with ``transformer=True`` (segformer, mask2former, upernet built in)."""
    return archs_with("transformer")


def cnn_archs() -> tuple[str, ...]:
    """Arches sized by the CNN keys ``backbone``/``output_stride``/``feature_dim``."""
    hf = transformer_archs()
    return tuple(n for n in ARCHS.names() if n not in hf)


def arch_variants(arch: str) -> tuple[str, ...]:
    """Valid ``model.variant`` values of ``arch`` (registration keyword ``variants``; the first
    one is the default; empty for arches without variants)."""
    return tuple(ARCHS.meta(arch).get("variants", ()))


def _names(names: tuple[str, ...]) -> str:
    return ", ".join(names) if names else "(none)"


class ModelConfig(Section):
    """Segmentation network: encoder, decoder head and pretraining.

    ``pretrained`` is ``"imagenet"`` (the locally installed torchvision MobileNetV2 file; ResNets
    need a local checkpoint path), ``None``/``"none"`` (random init) or a path to a
    ``.pth``/``.pt``/``.safetensors`` encoder checkpoint with torchvision key names.
    ``feature_dim`` overrides the width D of the feature before the final classifier (PSPNet
    bottleneck: 128 for resnet18, 512 otherwise; DeepLabV3+ decoder: 256).

    Transformer arches (``segformer``, ``mask2former``, ``upernet``; built by
    :mod:`semivss.models.hf` from ``transformers``): ``variant`` picks the published size
    (SegFormer ``b0``..``b5``; Mask2Former ``swin-*``; UperNet ``swin-*``/``convnext-*``; default
    the first of :func:`arch_variants`), ``hf_config`` overrides keys of the transformers config (a
    ``backbone_config`` sub-dict is merged into the backbone's config), and ``pretrained`` is
    ``None`` or a local ``save_pretrained`` directory (``"imagenet"`` is an error; left unset it
    defaults to ``None``). The CNN-only keys ``backbone``, ``output_stride``, ``feature_dim`` and
    ``rep_head`` must keep their defaults; ``dropout`` is SegFormer's classifier dropout and
    must keep its default for mask2former/upernet (set their dropouts through ``hf_config``).
    """

    arch: str = "deeplabv3plus"  # a name registered in semivss.registry.ARCHS
    backbone: Backbone = "mobilenet_v2"
    output_stride: Literal[8, 16] = 16
    pretrained: str | None = "imagenet"
    feature_dim: int | None = Field(default=None, gt=0)
    rep_head: bool = False
    # stride of the representation head's output: 4 (U2PL's official head) or 8 (its inputs
    # 2x2-pooled first, a quarter of the head's FLOPs; docs/methods.md#4-u2pl)
    rep_stride: Literal[4, 8] = 4
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    variant: str | None = None
    hf_config: dict[str, Any] = Field(default_factory=dict)
    # whole-model weights to start from (model.safetensors, a training checkpoint .pt, or a
    # .pth/.safetensors state dict), applied after ``pretrained``
    init_from: str | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return ARCHS.check_name(value)

    @field_validator("pretrained", "init_from")
    @classmethod
    def _none_string(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none", "null"):
            return None
        return value

    @model_validator(mode="after")
    def _check_arch_keys(self) -> ModelConfig:
        if self.arch in transformer_archs():
            if "pretrained" not in self.model_fields_set:
                self.pretrained = None  # the CNN default "imagenet" means nothing here
            if self.variant is None and arch_variants(self.arch):
                self.variant = arch_variants(self.arch)[0]
        problem = config_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self


def config_problem(cfg: ModelConfig) -> str | None:
    """The first inconsistency between ``cfg.arch`` and the arch-specific keys, as a message
    naming the key, or ``None``. Used by the pydantic validator and again by ``build_model``
    (which raises :class:`~semivss.errors.ConfigError`) for configs built without validation."""
    if cfg.arch not in ARCHS:
        return ARCHS.unknown(cfg.arch)
    if cfg.rep_head and not ARCHS.meta(cfg.arch).get("rep_head", False):
        return (
            f"model.rep_head: true requires model.arch: {' or '.join(archs_with('rep_head'))}, "
            f"not {cfg.arch!r} (the U2PL representation head uses the ASPP output)"
        )
    if cfg.rep_stride != 4 and not cfg.rep_head:
        return "model.rep_stride applies to the representation head: set model.rep_head: true"
    hf_archs = transformer_archs()
    if cfg.arch not in hf_archs:
        if cfg.variant is not None:
            return (
                f"model.variant: {cfg.variant!r} applies to the transformer arches "
                f"({_names(hf_archs)}) only; arch {cfg.arch!r} takes model.backbone"
            )
        if cfg.hf_config:
            return (
                f"model.hf_config applies to the transformer arches ({_names(hf_archs)}) only, "
                f"not to arch {cfg.arch!r}"
            )
        return None
    for key, default in _CNN_DEFAULTS.items():
        value = getattr(cfg, key)
        if value != default:
            return (
                f"model.{key}: {value!r} applies to the CNN arches ({_names(cnn_archs())}) only; "
                f"arch "
                f"{cfg.arch!r} is sized by model.variant and model.hf_config (leave model.{key} "
                f"at its default {default!r})"
            )
    if cfg.arch != "segformer" and cfg.dropout != 0.1:
        return (
            f"model.dropout: {cfg.dropout!r} is SegFormer's classifier dropout; arch "
            f"{cfg.arch!r} has no such layer (set its dropouts through model.hf_config)"
        )
    if cfg.pretrained is not None and cfg.pretrained.strip().lower() == "imagenet":
        return (
            f"model.pretrained: 'imagenet' is meaningless for arch {cfg.arch!r}; set it to a "
            "local directory written by transformers' save_pretrained (config.json + weights), "
            "or to none"
        )
    variants = arch_variants(cfg.arch)
    variant = cfg.variant if cfg.variant is not None else (variants[0] if variants else None)
    if variant is not None and variant not in variants:
        return (
            f"model.variant: unknown variant {variant!r} for arch {cfg.arch!r}; choose one of "
            f"{list(variants)}"
        )
    return _hf_config_problem(cfg)


def _hf_config_problem(cfg: ModelConfig) -> str | None:
    """Shape checks of ``hf_config`` that need no ``transformers`` import (key names are checked
    against the transformers config classes when the model is built)."""
    try:
        json.dumps(cfg.hf_config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"model.hf_config must be JSON-serialisable (it is stored with checkpoints): {exc}"
    for key, value in cfg.hf_config.items():
        if key in RESERVED_HF_KEYS:
            return (
                f"model.hf_config.{key} is set by semivss (class count from the dataset, "
                "auxiliary head off, dict outputs, model type from model.arch/model.variant); "
                "remove it"
            )
        if key == "backbone_config":
            if cfg.arch == "segformer":
                return "model.hf_config.backbone_config: segformer has no separate backbone config"
            if not isinstance(value, dict):
                return "model.hf_config.backbone_config must be a mapping of backbone config keys"
            if "model_type" in value:
                return (
                    "model.hf_config.backbone_config.model_type is set by model.variant "
                    f"({list(arch_variants(cfg.arch))}); remove it"
                )
    both = cfg.dropout != 0.1 and "classifier_dropout_prob" in cfg.hf_config
    if cfg.arch == "segformer" and both:
        return (
            "model.dropout and model.hf_config.classifier_dropout_prob both set SegFormer's "
            "classifier dropout; set only one"
        )
    return None

"""Config section ``model`` (see docs/ARCHITECTURE.md, semivss.models)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Arch = Literal["deeplabv3plus", "pspnet"]
Backbone = Literal["mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101"]


class ModelConfig(BaseModel):
    """Segmentation network: encoder, decoder head and pretraining.

    ``pretrained`` is ``"imagenet"`` (the locally installed torchvision MobileNetV2 file; ResNets
    need a local checkpoint path), ``None``/``"none"`` (random init) or a path to a
    ``.pth``/``.pt``/``.safetensors`` encoder checkpoint with torchvision key names.
    ``feature_dim`` overrides the width D of the feature before the final classifier (PSPNet
    bottleneck: 128 for resnet18, 512 otherwise; DeepLabV3+ decoder: 256).
    """

    model_config = ConfigDict(extra="forbid")

    arch: Arch = "deeplabv3plus"
    backbone: Backbone = "mobilenet_v2"
    output_stride: Literal[8, 16] = 16
    pretrained: str | None = "imagenet"
    feature_dim: int | None = Field(default=None, gt=0)
    rep_head: bool = False
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @field_validator("pretrained")
    @classmethod
    def _none_string(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "none", "null"):
            return None
        return value

    @model_validator(mode="after")
    def _rep_head_needs_deeplab(self) -> ModelConfig:
        if self.rep_head and self.arch != "deeplabv3plus":
            raise ValueError(
                "model.rep_head: true requires model.arch: deeplabv3plus "
                f"(got arch {self.arch!r}); the U2PL representation head uses the ASPP output"
            )
        return self

"""``SegModel``: encoder + decoder + final 1x1 classifier, and ``build_model`` (ARCHITECTURE.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from semivss.errors import ConfigError, DataError
from semivss.models.backbones import Encoder, build_encoder
from semivss.models.config import ModelConfig, config_problem
from semivss.models.heads import DeepLabV3PlusDecoder, PSPDecoder, init_head
from semivss.models.weights import LoadReport, load_encoder_weights, load_model_weights
from semivss.registry import ARCHS

if TYPE_CHECKING:
    from semivss.models.hf import HFSegModel

__all__ = ["SegModel", "build_deeplabv3plus", "build_model", "build_pspnet", "default_feature_dim"]


class SegModel(nn.Module):
    """Segmentation network. ``forward(x)`` returns ``{"logits": (B,C,h,w), "feature": (B,D,h,w)}``
    plus ``"rep": (B,256,h,w)`` with a representation head, at ``stride`` (h = ceil(H/stride)).

    ``feature`` is the exact input of the final classifier, so ``classify(out["feature"])``
    equals ``out["logits"]`` (IFR reconstructs features and classifies them with this module).
    """

    def __init__(self, encoder: Encoder, decoder: DeepLabV3PlusDecoder | PSPDecoder,
                 num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.classifier = nn.Conv2d(decoder.feature_dim, num_classes, 1)
        self.num_classes = num_classes
        self.feature_dim: int = decoder.feature_dim
        self.stride: int = decoder.stride
        # Any decoder with a ``rep`` module emits the U2PL representation (``out["rep"]``).
        self.has_rep_head = getattr(decoder, "rep", None) is not None
        self.load_report: LoadReport | None = None

    @property
    def output_stride_total(self) -> int:
        """Stride of ``logits`` relative to the input (alias of ``stride``)."""
        return self.stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low, high = self.encoder(x)
        out = self.decoder(low, high)
        out["logits"] = self.classifier(out["feature"])
        return out

    def classify(self, feature: Tensor) -> Tensor:
        """Apply the final 1x1 classifier (the same module ``forward`` uses) to a feature map."""
        return self.classifier(feature)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split for per-group learning rates: ``backbone`` = encoder, ``head`` =
        everything else (decoder, representation head, classifier; LR x10 in the references)."""
        backbone = list(self.encoder.parameters())
        ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if id(p) not in ids]
        return {"backbone": backbone, "head": head}


def default_feature_dim(cfg: ModelConfig) -> int:
    """Width D of the classifier input: ``cfg.feature_dim`` if set, else 256 for DeepLabV3+ and
    for PSPNet 128 with ResNet-18 / 512 otherwise (IFR's code)."""
    if cfg.feature_dim is not None:
        return cfg.feature_dim
    if cfg.arch == "deeplabv3plus":
        return 256
    return 128 if cfg.backbone == "resnet18" else 512


def build_model(cfg: ModelConfig, num_classes: int) -> SegModel | HFSegModel:
    """Build the network of ``cfg`` for ``num_classes`` classes and load its pretrained encoder
    weights (``cfg.pretrained``); heads get Kaiming-normal init, BN weight 1 / bias 0.
    The builder registered as ``cfg.arch`` in :data:`semivss.registry.ARCHS` makes the network
    (transformer arches: :func:`semivss.models.hf.build_hf_model`, same forward contract).
    ``cfg.init_from`` then
    overwrites the whole model with a trained model's weights (a student fine-tuned from its
    supervised training, docs/methods.md#7-offline-teacher-student-self-training): every tensor of
    the file must fit; model keys the file lacks (e.g. a new representation head) keep their
    initialisation and are listed in ``model.init_report``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    problem = config_problem(cfg)  # again: ``cfg`` may have been built without validation
    if problem is not None:
        raise ConfigError(problem)
    model = ARCHS.get(cfg.arch)(cfg, num_classes)
    if cfg.init_from is not None:
        try:
            report = load_model_weights(model, cfg.init_from, strict=False)
        except (ConfigError, DataError) as exc:
            raise ConfigError(f"model.init_from: {exc}") from exc
        if report.unexpected:
            raise ConfigError(
                f"model.init_from: {cfg.init_from} holds tensors this model does not have: "
                f"{report.unexpected[:8]} ({len(report.unexpected)} in all); was it trained with "
                f"another model config?"
            )
        model.init_report = report  # type: ignore[assignment]
    return model


@ARCHS.register("deeplabv3plus", rep_head=True)
def build_deeplabv3plus(cfg: ModelConfig, num_classes: int) -> SegModel:
    """DeepLabV3+ (ASPP + low-level skip decoder) on ``cfg.backbone``; optional U2PL
    representation head (``cfg.rep_head``)."""
    encoder = build_encoder(cfg.backbone, cfg.output_stride)
    decoder = DeepLabV3PlusDecoder(
        encoder.low_channels, encoder.high_channels, cfg.output_stride, default_feature_dim(cfg),
        cfg.dropout, cfg.rep_head, cfg.rep_stride,
    )
    return _cnn_model(cfg, encoder, decoder, num_classes)


@ARCHS.register("pspnet")
def build_pspnet(cfg: ModelConfig, num_classes: int) -> SegModel:
    """PSPNet (pyramid pooling module + bottleneck) on ``cfg.backbone``."""
    encoder = build_encoder(cfg.backbone, cfg.output_stride)
    decoder = PSPDecoder(
        encoder.high_channels, cfg.output_stride, default_feature_dim(cfg), cfg.dropout
    )
    return _cnn_model(cfg, encoder, decoder, num_classes)


def _cnn_model(
    cfg: ModelConfig, encoder: Encoder, decoder: DeepLabV3PlusDecoder | PSPDecoder, num_classes: int
) -> SegModel:
    """``SegModel`` with initialised head and classifier and ``cfg.pretrained`` encoder weights."""
    model = SegModel(encoder, decoder, num_classes)
    init_head(model.decoder)
    init_head(model.classifier)
    pretrained = cfg.pretrained
    if pretrained is not None and pretrained.strip().lower() not in ("", "none", "null"):
        model.load_report = load_encoder_weights(model.encoder, pretrained)
    return model

"""Decoder heads: ASPP + DeepLabV3+ decoder, PSPNet pyramid pooling, U2PL representation head.

Each decoder maps the encoder outputs ``(low, high)`` to ``{"feature": (B,D,h,w)}`` (plus
``"rep"`` when it has a representation head); the final 1x1 classifier lives in
:class:`semivss.models.segmodel.SegModel` so that ``classify(feature)`` reuses the very module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semivss.ops import resize

__all__ = [
    "ASPP",
    "DeepLabV3PlusDecoder",
    "PSPDecoder",
    "PyramidPooling",
    "RepresentationHead",
    "aspp_rates",
    "init_head",
    "representation_off",
]


def _conv_bn_relu(inp: int, oup: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = (kernel - 1) // 2 * dilation
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """Atrous rates of DeepLabV3 (Chen et al. 2017): (6,12,18) at OS16, doubled at OS8."""
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


class _ASPPPooling(nn.Sequential):
    """Image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back."""

    def __init__(self, inp: int, oup: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(inp, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        y = super().forward(x)
        return y.expand(-1, -1, size[0], size[1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): 1x1 + three dilated 3x3 + image pooling,
    concatenated, projected by 1x1 conv to ``channels`` with BN, ReLU and dropout."""

    def __init__(
        self, inp: int, rates: Sequence[int], channels: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(inp, channels, 1)]
        branches += [_conv_bn_relu(inp, channels, 3, dilation=r) for r in rates]
        branches.append(_ASPPPooling(inp, channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.out_channels = channels

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.convs]
        # expand() views are not contiguous; cat materialises them in the input's memory format
        return self.project(torch.cat(outs, dim=1))


class RepresentationHead(nn.Module):
    """U2PL representation head (docs/methods.md#4-u2pl): concat(low-level projected to 256,
    upsampled ASPP 256) at stride 4 -> [conv3x3 256, BN, ReLU, Dropout2d] x2 -> conv1x1 ``out_channels``."""

    def __init__(
        self, low_channels: int, aspp_channels: int = 256, out_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.low_proj = _conv_bn_relu(low_channels, 256, 1)
        self.head = nn.Sequential(
            _conv_bn_relu(256 + aspp_channels, 256, 3),
            nn.Dropout2d(dropout),
            _conv_bn_relu(256, 256, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(256, out_channels, 1, bias=True),
        )
        self.out_channels = out_channels

    def forward(self, low: Tensor, aspp_up: Tensor) -> Tensor:
        return self.head(torch.cat([self.low_proj(low), aspp_up], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ (Chen et al. 2018): ASPP on the high-level map; low-level 1x1 -> 48 ch;
    concat with the ASPP output upsampled to stride 4; two 3x3 convs (BN, ReLU) -> ``feature``."""

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        output_stride: int,
        feature_dim: int = 256,
        dropout: float = 0.1,
        rep_head: bool = False,
        rep_stride: int = 4,
    ) -> None:
        super().__init__()
        if rep_stride not in (4, 8):
            raise ValueError(f"rep_stride must be 4 or 8, got {rep_stride}")
        self.rep_stride = rep_stride
        self.aspp = ASPP(high_channels, aspp_rates(output_stride), 256, dropout)
        self.low_proj = _conv_bn_relu(low_channels, 48, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(48 + 256, feature_dim, 3),
            _conv_bn_relu(feature_dim, feature_dim, 3),
        )
        self.rep: RepresentationHead | None = (
            RepresentationHead(low_channels, 256, 256, dropout) if rep_head else None
        )
        self.feature_dim = feature_dim
        self.stride = 4
        self.rep_enabled = True  # False (representation_off): a pass that needs no "rep" skips the head

    def forward(self, low: Tensor, high: Tensor) -> dict[str, Tensor]:
        aspp_up = resize(self.aspp(high), low.shape[-2:])
        out = {"feature": self.fuse(torch.cat([self.low_proj(low), aspp_up], dim=1))}
        if self.rep is not None and self.rep_enabled:
            if self.rep_stride == 8:  # the head on 2x2-pooled inputs: a quarter of its FLOPs
                out["rep"] = self.rep(F.avg_pool2d(low, 2), F.avg_pool2d(aspp_up, 2))
            else:
                out["rep"] = self.rep(low, aspp_up)
        return out


@contextmanager
def representation_off(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s representation heads are skipped (no ``out["rep"]``): for
    passes that use only the logits, e.g. U2PL's pseudo-labelling teacher pass, where the head at
    stride 4 costs more than the rest of the decoder."""
    decoders = [m for m in model.modules() if isinstance(m, DeepLabV3PlusDecoder) and m.rep is not None]
    states = [m.rep_enabled for m in decoders]
    for m in decoders:
        m.rep_enabled = False
    try:
        yield
    finally:
        for m, state in zip(decoders, states):
            m.rep_enabled = state


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling module (Zhao et al. 2017): for each bin b, adaptive average pool to
    b x b, 1x1 conv to inp/len(bins) (BN, ReLU), upsample; concatenated with the input."""

    def __init__(self, inp: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduction = inp // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(inp, reduction, 1, bias=False),
                nn.BatchNorm2d(reduction),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )
        self.out_channels = inp + reduction * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [resize(stage(x), size) for stage in self.stages], dim=1)


class PSPDecoder(nn.Module):
    """PSPNet head as in IFR's code: pyramid pooling on the encoder output, 3x3 conv to
    ``feature_dim`` (BN, ReLU), Dropout2d -> ``feature`` (stride = encoder output stride)."""

    def __init__(
        self,
        high_channels: int,
        output_stride: int,
        feature_dim: int = 512,
        dropout: float = 0.1,
        bins: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.ppm = PyramidPooling(high_channels, bins)
        self.bottleneck = nn.Sequential(
            _conv_bn_relu(self.ppm.out_channels, feature_dim, 3),
            nn.Dropout2d(dropout),
        )
        self.feature_dim = feature_dim
        self.stride = output_stride

    def forward(self, low: Tensor, high: Tensor) -> dict[str, Tensor]:
        del low
        return {"feature": self.bottleneck(self.ppm(high))}


def init_head(module: nn.Module) -> None:
    """Head initialisation: Kaiming-normal convs (zero bias), BatchNorm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

"""Encoders with torchvision parameter names (MobileNetV2, ResNet-18/34/50/101).

Written from scratch; module names follow torchvision exactly so that torchvision checkpoint files
load without key renaming (``features.N...`` for MobileNetV2; ``conv1``, ``bn1``,
``layerK.B.{conv,bn}{1,2,3}``, ``layerK.0.downsample.{0,1}`` for ResNets). Classifier parts
(MobileNetV2 ``features.18`` + ``classifier``, ResNet ``fc``) are not built.

Every encoder returns ``(low, high)``: low-level features at stride 4 and high-level features at
``output_stride`` (8 or 16, obtained by replacing strides with dilation as in DeepLabV3/PSPNet).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from semivss.errors import ConfigError

__all__ = [
    "ENCODER_NAMES",
    "BasicBlock",
    "Bottleneck",
    "Encoder",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "build_encoder",
    "count_parameters",
]


class Encoder(nn.Module):
    """Base class: ``forward(x) -> (low, high)``.

    Attributes: ``name`` (the ``model.backbone`` value), ``low_channels`` / ``high_channels``
    (channels of the two outputs), ``output_stride`` (stride of ``high``; ``low`` is always at
    stride 4) and ``ignored_prefixes`` (checkpoint key prefixes of classifier parts that this
    encoder does not build).
    """

    name: str
    low_channels: int
    high_channels: int
    output_stride: int
    ignored_prefixes: ClassVar[tuple[str, ...]] = ()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride must be 8 or 16, got {output_stride!r}")


# --------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018; torchvision layout, width 1.0)
# --------------------------------------------------------------------------------------------


def _conv_bn_relu6(
    inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Sequential:
    """torchvision ``Conv2dNormActivation``: keys ``.0`` (conv) and ``.1`` (BN)."""
    padding = (kernel - 1) // 2 * dilation
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise (dilated) -> 1x1 linear projection."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dilation: int = 1):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(Encoder):
    """MobileNetV2 encoder, ``features.0 .. features.17`` (the 1280-ch ``features.18`` is dropped).

    low = output of ``features.3`` (24 ch, stride 4); high = output of ``features.17`` (320 ch).
    Strides beyond ``output_stride`` become dilation; as in torchvision's ResNet, the first block
    of a dilated stage keeps the previous dilation.
    """

    # (expand ratio t, channels c, blocks n, stride s), torchvision's inverted_residual_setting
    SETTINGS: ClassVar[tuple[tuple[int, int, int, int], ...]] = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )
    LOW_INDEX: ClassVar[int] = 3
    ignored_prefixes: ClassVar[tuple[str, ...]] = ("features.18.", "classifier.")

    def __init__(self, output_stride: int = 16):
        super().__init__()
        _check_output_stride(output_stride)
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, stride=2)]
        inp, current_stride, dilation = 32, 2, 1
        for t, c, n, s in self.SETTINGS:
            previous_dilation = dilation
            if current_stride * s > output_stride:
                stage_stride, dilation = 1, dilation * s
            else:
                stage_stride, current_stride = s, current_stride * s
            for i in range(n):
                layers.append(
                    InvertedResidual(
                        inp,
                        c,
                        stage_stride if i == 0 else 1,
                        t,
                        previous_dilation if i == 0 else dilation,
                    )
                )
                inp = c
        self.features = nn.Sequential(*layers)
        self.name = "mobilenet_v2"
        self.low_channels = 24
        self.high_channels = 320
        self.output_stride = output_stride
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.features[: self.LOW_INDEX + 1](x)
        high = self.features[self.LOW_INDEX + 1 :](low)
        return low, high


# --------------------------------------------------------------------------------------------
# ResNet (He et al. 2016; torchvision layout, v1.5 bottleneck with stride on the 3x3 conv)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs; unlike torchvision, dilation > 1 is supported (both convs dilated)."""

    expansion: ClassVar[int] = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride, dilation) -> 1x1 expand (x4)."""

    expansion: ClassVar[int] = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        dilation: int = 1,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_RESNET_LAYOUTS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(Encoder):
    """ResNet encoder without ``avgpool``/``fc``; low = ``layer1`` (stride 4), high = ``layer4``.

    ``output_stride`` 16 dilates layer4, 8 dilates layer3 and layer4 (torchvision's
    ``replace_stride_with_dilation`` = [False, False, True] / [False, True, True]).
    """

    ignored_prefixes: ClassVar[tuple[str, ...]] = ("fc.",)

    def __init__(self, name: str = "resnet50", output_stride: int = 16):
        super().__init__()
        if name not in _RESNET_LAYOUTS:
            raise ConfigError(
                f"model.backbone: unknown ResNet {name!r}; choose from {sorted(_RESNET_LAYOUTS)}"
            )
        _check_output_stride(output_stride)
        block, layers = _RESNET_LAYOUTS[name]
        dilate = {8: (False, True, True), 16: (False, False, True)}[output_stride]
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, dilate[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, dilate[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, dilate[2])
        self.name = name
        self.low_channels = 64 * block.expansion
        self.high_channels = 512 * block.expansion
        self.output_stride = output_stride
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [
            block(self.inplanes, planes, stride, downsample, dilation=previous_dilation)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


ENCODER_NAMES: tuple[str, ...] = ("mobilenet_v2", *_RESNET_LAYOUTS)


def build_encoder(name: str, output_stride: int = 16) -> Encoder:
    """Encoder by name (``model.backbone``), randomly initialised as torchvision does."""
    if name == "mobilenet_v2":
        return MobileNetV2(output_stride)
    if name in _RESNET_LAYOUTS:
        return ResNet(name, output_stride)
    raise ConfigError(f"model.backbone: unknown backbone {name!r}; choose from {ENCODER_NAMES}")


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (for logs)."""
    return sum(int(p.numel()) for p in module.parameters())


"""semivss.models: encoders (torchvision key names), DeepLabV3+/PSPNet heads, ``build_model``."""

from semivss.models.backbones import (
    ENCODER_NAMES,
    Encoder,
    MobileNetV2,
    ResNet,
    build_encoder,
    count_parameters,
)
from semivss.models.config import ModelConfig
from semivss.models.heads import (
    ASPP,
    DeepLabV3PlusDecoder,
    PSPDecoder,
    PyramidPooling,
    RepresentationHead,
)
from semivss.models.segmodel import SegModel, build_model, default_feature_dim
from semivss.models.weights import (
    LoadReport,
    imagenet_weights_path,
    load_encoder_weights,
    load_model_weights,
    read_state_dict,
    save_weights,
)

__all__ = [
    "ASPP",
    "ENCODER_NAMES",
    "DeepLabV3PlusDecoder",
    "Encoder",
    "LoadReport",
    "MobileNetV2",
    "ModelConfig",
    "PSPDecoder",
    "PyramidPooling",
    "RepresentationHead",
    "ResNet",
    "SegModel",
    "build_encoder",
    "build_model",
    "count_parameters",
    "default_feature_dim",
    "imagenet_weights_path",
    "load_encoder_weights",
    "load_model_weights",
    "read_state_dict",
    "save_weights",
]

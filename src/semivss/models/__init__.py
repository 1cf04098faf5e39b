"""semivss.models: encoders (torchvision key names), DeepLabV3+/PSPNet heads, transformers
SegFormer/UperNet/Mask2Former wrappers (``semivss.models.hf``), ``build_model``.

Importing this package registers the built-in arches (:data:`semivss.registry.ARCHS`): the
modules imported below register theirs; a new arch module is one more import line here
(docs/extending.md)."""

from semivss.models.backbones import (
    ENCODER_NAMES,
    Encoder,
    MobileNetV2,
    ResNet,
    build_encoder,
    count_parameters,
)
from semivss.models.config import ModelConfig, arch_variants, transformer_archs
from semivss.models.heads import (
    ASPP,
    DeepLabV3PlusDecoder,
    PSPDecoder,
    PyramidPooling,
    RepresentationHead,
    representation_off,
)
from semivss.models.hf import (
    HFSegModel,
    Mask2FormerSegModel,
    SegformerSegModel,
    UperNetSegModel,
    build_hf_model,
    hf_config_for,
    mask2former_semantic_probs,
)
from semivss.models.segmodel import (
    SegModel,
    build_deeplabv3plus,
    build_model,
    build_pspnet,
    default_feature_dim,
)
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
    "HFSegModel",
    "LoadReport",
    "Mask2FormerSegModel",
    "MobileNetV2",
    "ModelConfig",
    "PSPDecoder",
    "PyramidPooling",
    "RepresentationHead",
    "ResNet",
    "SegModel",
    "SegformerSegModel",
    "UperNetSegModel",
    "arch_variants",
    "build_deeplabv3plus",
    "build_encoder",
    "build_hf_model",
    "build_model",
    "build_pspnet",
    "count_parameters",
    "default_feature_dim",
    "hf_config_for",
    "imagenet_weights_path",
    "load_encoder_weights",
    "load_model_weights",
    "mask2former_semantic_probs",
    "read_state_dict",
    "representation_off",
    "save_weights",
    "transformer_archs",
]

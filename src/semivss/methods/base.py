"""Base class of training methods: a few hooks the engine calls (in the spirit of USB's
AlgorithmBase). A method owns its losses and its models' roles; it knows nothing about files."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from semivss.data.requests import DataRequest, LabeledRequest
from semivss.errors import ConfigError
from semivss.models.ensemble import ExportSpec, build_inference_model
from semivss.ops import resize
from semivss.sections import Section


@dataclass(frozen=True)
class DataSpec:
    """What a method needs in its batches: a tuple of data requests (``semivss.data.requests``),
    each filling ``batch[request.key]``. The default is labeled frames only; a ``LabeledRequest``
    is added when a spec names none. Keys must be unique."""

    requests: tuple[DataRequest, ...] = ()

    def __post_init__(self) -> None:
        reqs = tuple(self.requests)
        if not any(r.key == "labeled" for r in reqs):
            reqs = (LabeledRequest(), *reqs)
        keys = [r.key for r in reqs]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"DataSpec: each batch key may be requested once, got {keys}")
        object.__setattr__(self, "requests", reqs)

    @classmethod
    def of(cls, *requests: DataRequest) -> DataSpec:
        """``DataSpec.of(LabeledRequest(...), UnlabeledRequest(...))``."""
        return cls(tuple(requests))

    def get(self, key: str) -> DataRequest | None:
        """The request filling ``batch[key]``, or None."""
        return next((r for r in self.requests if r.key == key), None)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(r.key for r in self.requests)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (use it to reach ``classify`` etc.)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


def seg_ce_loss(logits: Tensor, label: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-wise cross-entropy (Eq. (SUP-1)): logits (B,C,h,w) upsampled bilinearly
    (``align_corners=False``) to the label size (B,H,W), mean over non-ignored pixels, in fp32.

    A batch with no valid pixel gives 0 (with a zero gradient) instead of NaN.
    """
    logits = resize(logits, label.shape[-2:])
    total = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="sum")
    valid = (label != ignore_index).sum()
    return total / valid.clamp(min=1)


class Method:
    """A semi-supervised (or supervised) training method.

    Subclasses set ``name``, a nested pydantic ``Config`` for their own parameters, and override
    ``training_step`` (plus ``data_spec`` / ``build_models`` / ``on_step_end`` /
    ``export_spec`` as needed). Models follow the SegModel contract:
    ``forward(x) -> {"logits", "feature", ...}`` and ``param_groups()``. In ``training_step`` the
    models may be DDP-wrapped: call them for the forward pass, use :func:`unwrap` for other methods.
    """

    name: ClassVar[str] = "base"

    class Config(Section):
        """A method's settings (``method:`` in the config); the base method has none."""

    def __init__(
        self,
        cfg: BaseModel | Mapping[str, Any] | None,
        num_classes: int,
        ignore_index: int = 255,
    ) -> None:
        if cfg is None or isinstance(cfg, Mapping):
            cfg = self.parse_config(cfg)
        elif not isinstance(cfg, self.Config):
            raise ConfigError(
                f"method.{self.name}: expected a {type(self).__name__}.Config, got {type(cfg).__name__}"
            )
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1 for method '{self.name}', got {num_classes}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    unwrap = staticmethod(unwrap)

    @classmethod
    def parse_config(cls, params: Mapping[str, Any] | None) -> BaseModel:
        """Validate ``params`` with ``cls.Config``; errors -> ConfigError naming ``method.<key>``."""
        try:
            return cls.Config.model_validate(dict(params or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"method.{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"invalid parameters for method {cls.name!r}: {problems}") from exc

    def data_spec(self) -> DataSpec:
        """Batch content this method needs (default: labeled frames only)."""
        return DataSpec()

    def build_models(self, make_model: Callable[[], nn.Module]) -> nn.ModuleDict:
        """Create the networks (default: one student ``{"model": make_model()}``)."""
        return nn.ModuleDict({"model": make_model()})

    def trainable(self, models: nn.ModuleDict) -> list[str]:
        """Names of the models the optimiser updates (default: those with grad-requiring params)."""
        return [n for n, m in models.items() if any(p.requires_grad for p in m.parameters())]

    def training_step(
        self, models: nn.ModuleDict, batch: dict[str, Any], step: int, max_steps: int
    ) -> dict[str, Tensor]:
        """Losses of one iteration; must contain ``"loss"`` (the total to back-propagate)."""
        raise NotImplementedError(f"{type(self).__name__}.training_step")

    def on_step_end(self, models: nn.ModuleDict, step: int) -> None:
        """Called after the optimiser step of iteration ``step`` (e.g. EMA update)."""

    def export_spec(self, models: nn.ModuleDict) -> ExportSpec:
        """Which of ``models`` form the inference model and how they are combined (default the
        single network ``models["model"]``). The trainer records it in ``meta["export"]`` so that
        :func:`semivss.experiment.load_trained_model` rebuilds the same module from a checkpoint."""
        return ExportSpec(("model",))

    def inference_model(self, models: nn.ModuleDict) -> nn.Module:
        """The module used for evaluation and export, built from :meth:`export_spec` (override
        that, not this)."""
        spec = self.export_spec(models)
        return build_inference_model([unwrap(models[n]) for n in spec.members], spec.combine)

    def state_dict(self) -> dict[str, Any]:
        """Extra method state to checkpoint (tensors / plain containers only; default none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    @staticmethod
    def to_device(obj: Any, device: torch.device) -> Any:
        """Move nested tensors to ``device`` (helper for subclasses)."""
        if isinstance(obj, Tensor):
            return obj.to(device, non_blocking=True)
        if hasattr(obj, "map_tensors"):  # a typed batch (semivss.data.batch)
            return obj.map_tensors(lambda t: t.to(device, non_blocking=True))
        if isinstance(obj, dict):
            return {k: Method.to_device(v, device) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(Method.to_device(v, device) for v in obj)
        return obj

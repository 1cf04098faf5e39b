"""``ProbAverage``: several segmentation networks as one model (``logits = log`` of the mean of
their softmax probabilities), e.g. CPS's two networks with ``inference: average``
(docs/methods.md#5-cps); ``ExportSpec`` / ``build_inference_model``: how a method's inference
model is formed from its networks, recorded in checkpoints so that training and reloading build
the same module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ARCH_BUILDERS", "COMBINERS", "ExportSpec", "ProbAverage", "build_inference_model"]


class ProbAverage(nn.Module):
    """Ensemble of segmentation networks: ``logits = log(mean_k softmax(logits_k))`` (so softmax
    gives the averaged probabilities). Its state dict is ``nets.<k>.<key>``
    (``combine: prob_average`` of an :class:`ExportSpec`)."""

    def __init__(self, *nets: nn.Module) -> None:
        super().__init__()
        if not nets:
            raise ValueError("ProbAverage needs at least one network")
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        probs = torch.stack([torch.softmax(net(x)["logits"].float(), dim=1) for net in self.nets])
        return {"logits": probs.mean(0).clamp_min(1e-12).log()}


#: How an :class:`ExportSpec` turns its member networks into one inference model (``combine``).
#: The combined module's ``state_dict`` is what ``model.safetensors`` holds.
COMBINERS: dict[str, Callable[[list[nn.Module]], nn.Module]] = {
    "single": lambda nets: nets[0],
    "prob_average": lambda nets: ProbAverage(*nets),
}


def _build_accel(record: Mapping[str, Any], num_classes: int) -> nn.Module:
    from semivss.models.accel import build_accel

    return build_accel(record, num_classes)


#: Builders of the networks an ``ExportSpec.arch`` record describes, by its ``kind``.
ARCH_BUILDERS: dict[str, Callable[[Mapping[str, Any], int], nn.Module]] = {"accel": _build_accel}


@dataclass(frozen=True)
class ExportSpec:
    """How a method's inference model is made from its trained networks, so that it can be
    rebuilt from a checkpoint alone: ``members`` name entries of the method's model ``ModuleDict``
    (one network of the same architecture each), ``combine`` a key of :data:`COMBINERS`.
    ``arch``: the members' architecture record when it is not the experiment's ``model`` config
    (a video model such as Accel, whose ``kind`` names a builder of :data:`ARCH_BUILDERS`)."""

    members: tuple[str, ...] = ("model",)
    combine: str = "single"
    arch: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        members = (self.members,) if isinstance(self.members, str) else tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members or not all(isinstance(m, str) for m in members):
            raise ValueError(f"ExportSpec.members must be one or more model names, got {self.members!r}")
        if self.combine not in COMBINERS:
            raise ValueError(f"ExportSpec.combine must be one of {sorted(COMBINERS)}, got {self.combine!r}")
        if self.combine == "single" and len(members) != 1:
            raise ValueError(f"ExportSpec: combine 'single' takes one member, got {list(members)}")

    def to_meta(self) -> dict[str, Any]:
        """The ``meta["export"]`` record stored in checkpoints and ``model.safetensors``."""
        record: dict[str, Any] = {"members": list(self.members), "combine": self.combine}
        if self.arch is not None:
            record["arch"] = dict(self.arch)
        return record

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ExportSpec:
        """The spec recorded in ``meta["export"]``; files written before it existed carry
        ``meta["inference_model"]`` (a name, or a list of names averaged) or nothing (``model``)."""
        record = meta.get("export")
        if isinstance(record, Mapping):
            arch = record.get("arch")
            if arch is not None and (not isinstance(arch, Mapping) or arch.get("kind") not in ARCH_BUILDERS):
                raise ValueError(f"unknown architecture record {arch!r}; known kinds: {sorted(ARCH_BUILDERS)}")
            return cls(tuple(record.get("members") or ()), str(record.get("combine", "single")), arch)
        names = meta.get("inference_model", "model")  # legacy
        names = (names,) if isinstance(names, str) else tuple(names)
        return cls(names, "single" if len(names) == 1 else "prob_average")


def build_inference_model(nets: list[nn.Module], combine: str = "single") -> nn.Module:
    """One inference model from ``nets`` (the members of an :class:`ExportSpec`, in order)."""
    if combine not in COMBINERS:
        raise ValueError(f"unknown combine {combine!r}; known: {sorted(COMBINERS)}")
    if not nets or (combine == "single" and len(nets) != 1):
        raise ValueError(f"combine {combine!r} cannot take {len(nets)} networks")
    return COMBINERS[combine](list(nets))

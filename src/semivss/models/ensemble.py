"""``ProbAverage``: several segmentation networks as one model (``logits = log`` of the mean of
their softmax probabilities), e.g. CPS's two networks with ``inference: average`` (SPEC 2.4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ProbAverage"]


class ProbAverage(nn.Module):
    """Ensemble of segmentation networks: ``logits = log(mean_k softmax(logits_k))`` (so softmax
    gives the averaged probabilities). Its state dict is ``nets.<k>.<key>``, which
    :func:`semivss.experiment.load_trained_model` recognises to rebuild it."""

    def __init__(self, *nets: nn.Module) -> None:
        super().__init__()
        if not nets:
            raise ValueError("ProbAverage needs at least one network")
        self.nets = nn.ModuleList(nets)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        probs = torch.stack([torch.softmax(net(x)["logits"].float(), dim=1) for net in self.nets])
        return {"logits": probs.mean(0).clamp_min(1e-12).log()}

"""Per-class FIFO memory bank of feature vectors (U2PL negatives: 30,000 teacher features of
unreliable pixels per class, docs/methods.md#42-contrastive-loss-with-unreliable-negatives), with
a checkpointable state."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from semivss.errors import DataError

__all__ = ["BankCheckpoint", "ClassMemoryBank", "gather_rows"]


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate the rows of ``x`` (n_r, ...) of every DDP rank in rank order (row counts may
    differ); ``x`` itself outside distributed runs."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    biggest = max(max(counts), 1)  # no empty collectives
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class ClassMemoryBank:
    """``num_classes`` FIFO queues of at most ``size`` ``dim``-d feature vectors each.

    :meth:`push` appends (detached, float32) rows and keeps the newest ``size``; queues live on
    the device of the last pushed features. ``dim=None`` is fixed by the first push.
    """

    def __init__(self, num_classes: int, dim: int | None = None, size: int = 30000) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if size < 1:
            raise ValueError(f"memory bank size must be >= 1, got {size}")
        if dim is not None and dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.num_classes = num_classes
        self.dim = dim
        self.size = size
        self.queues: list[Tensor] = [torch.zeros(0, dim or 0) for _ in range(num_classes)]

    def _check_class(self, cls: int) -> None:
        if not 0 <= cls < self.num_classes:
            raise IndexError(f"class {cls} out of range for a bank of {self.num_classes} classes")

    def push(self, cls: int, feats: Tensor) -> None:
        """Append ``feats`` (n, dim) to the queue of class ``cls`` (oldest rows drop out)."""
        self._check_class(cls)
        if feats.dim() != 2:
            raise ValueError(f"features must be (n, dim), got shape {tuple(feats.shape)}")
        if self.dim is None:
            self.dim = int(feats.shape[1])
            self.queues = [q.reshape(0, self.dim) if q.numel() == 0 else q for q in self.queues]
        if feats.shape[1] != self.dim:
            raise ValueError(f"features have dim {feats.shape[1]}, the bank holds dim {self.dim}")
        if feats.shape[0] == 0:
            return
        new = feats.detach().float()
        queue = self.queues[cls].to(new.device).reshape(-1, self.dim)
        self.queues[cls] = torch.cat([queue, new])[-self.size :]

    def features(self, cls: int) -> Tensor:
        """All stored features of class ``cls`` (oldest first)."""
        self._check_class(cls)
        return self.queues[cls]

    def count(self, cls: int) -> int:
        """Number of stored features of class ``cls``."""
        self._check_class(cls)
        return int(self.queues[cls].shape[0])

    def sample(self, cls: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` features of class ``cls`` drawn uniformly with replacement (U2PL's ``randint``)."""
        queue = self.features(cls)
        if queue.shape[0] == 0:
            raise ValueError(f"memory bank of class {cls} is empty")
        idx = torch.randint(queue.shape[0], (n,), generator=generator)
        return queue[idx.to(queue.device)]

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint content (plain ints and CPU tensors)."""
        return {
            "num_classes": self.num_classes,
            "dim": -1 if self.dim is None else self.dim,
            "size": self.size,
            "queues": [q.detach().cpu().clone() for q in self.queues],
        }

    def load_state_dict(self, state: dict[str, Any], where: str = "memory bank") -> None:
        """Restore :meth:`state_dict`; a state of another shape raises DataError naming ``where``."""
        try:
            num_classes, dim, queues = int(state["num_classes"]), int(state["dim"]), state["queues"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed memory bank state ({exc!r})") from None
        if num_classes != self.num_classes:
            raise DataError(f"{where}: state has {num_classes} classes, the bank has {self.num_classes}")
        if len(queues) != num_classes:
            raise DataError(f"{where}: state has {len(queues)} queues for {num_classes} classes")
        dim_or_none = None if dim < 0 else dim
        if self.dim is not None and dim_or_none is not None and dim_or_none != self.dim:
            raise DataError(f"{where}: state holds {dim}-d features, the bank expects {self.dim}")
        restored = []
        for c, q in enumerate(queues):
            q = torch.as_tensor(q).float()
            if dim_or_none is not None and (q.dim() != 2 or q.shape[1] != dim_or_none):
                raise DataError(f"{where}: queue {c} has shape {tuple(q.shape)}, expected (n, {dim})")
            restored.append(q[-self.size :])
        if dim_or_none is not None:
            self.dim = dim_or_none
        self.queues = restored


class BankCheckpoint:
    """Method mixin: checkpoint ``self.bank`` (a :class:`ClassMemoryBank`) as the method state,
    unless the method's config says ``checkpoint_bank: false`` (then a resume starts it empty)."""

    bank: ClassMemoryBank
    cfg: Any

    def state_dict(self) -> dict[str, Any]:
        """The memory bank (needed for an exact resume); nothing with ``checkpoint_bank: false``."""
        return {"bank": self.bank.state_dict()} if self.cfg.checkpoint_bank else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bank" in state:
            self.bank.load_state_dict(state["bank"], where="checkpoint method state 'bank'")

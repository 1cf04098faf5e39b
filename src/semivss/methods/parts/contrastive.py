"""U2PL contrastive loss with unreliable pseudo-labels as negatives (Wang et al., CVPR 2022,
Eq. 8-9; official ``compute_contra_memobank_loss``): Eq. (U2PL-5) of
docs/methods.md#42-contrastive-loss-with-unreliable-negatives.

For each class c: anchors are student features of confident anchor-candidate pixels labeled c,
the positive is the mean teacher feature of those candidates, and the negatives come from a
per-class memory bank of features of pixels not labeled c for which c is an unlikely class.
Both official bugs are fixed: negatives of c are pixels NOT labeled c (issue #171), and anchors /
prototypes are looked up by class id, not by the loop counter (issue #111).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from semivss.methods.parts.memory_bank import ClassMemoryBank, gather_rows
from semivss.sections import Section

_EPS = 1e-8  # F.cosine_similarity's default eps

__all__ = ["ContrastiveSettings", "class_ranks", "cosine_logits", "u2pl_contrastive_loss", "u2pl_negative_masks"]


class ContrastiveSettings(Section):
    """Method config keys of the U2PL contrastive loss (Eq. (U2PL-5)), shared by the methods that use
    it: anchors, negatives per anchor, temperature, anchor probability threshold, the rank window
    ``[low_rank, high_rank)`` of unlikely classes and the memory bank size per class.

    ``checkpoint_bank`` (default True) stores the memory bank in ``last.pt`` so that a resumed run
    equals an uninterrupted one; a full bank is ``num_classes x memory_size x D`` float32 (~340 MB
    for CamVid's 11 classes at D = 256). False keeps checkpoints small and a resumed run refills
    the bank from empty, as the official U2PL code does."""

    num_anchors: int = Field(256, ge=1)
    num_negatives: int = Field(50, ge=1)
    temperature: float = Field(0.5, gt=0.0)
    anchor_threshold: float = Field(0.3, ge=0.0, le=1.0)
    low_rank: int = Field(3, ge=1)
    high_rank: int = Field(20, ge=2)
    memory_size: int = Field(30000, ge=1)
    checkpoint_bank: bool = True

    @model_validator(mode="after")
    def _ranks(self) -> ContrastiveSettings:
        if self.low_rank >= self.high_rank:
            raise ValueError(
                f"low_rank ({self.low_rank}) must be smaller than high_rank ({self.high_rank})"
            )
        return self


def class_ranks(prob: Tensor) -> Tensor:
    """Rank (0 = most probable) of every class at every pixel: ``(B,C,h,w)`` int64."""
    order = prob.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    c = prob.shape[1]
    src = torch.arange(c, device=prob.device).view(1, c, 1, 1).expand_as(order)
    ranks.scatter_(1, order, src)
    return ranks


def cosine_logits(anchor: Tensor, keys: Tensor, temperature: float) -> Tensor:
    """``cos(anchor[a], keys[a, j]) / temperature`` as ``(A, J)``, for anchors ``(A, D)`` and keys
    ``(A, J, D)`` (Eq. (U2PL-5)'s similarities; the official code calls ``torch.cosine_similarity``
    with the anchors broadcast over the keys). A batched product of unit vectors: the
    ``(A, J, D)`` element-wise products and their gradient are never materialised."""
    unit = F.normalize(anchor, dim=1, eps=_EPS)
    keys = F.normalize(keys, dim=2, eps=_EPS)
    return torch.bmm(keys, unit.unsqueeze(2)).squeeze(2) / temperature


def u2pl_negative_masks(
    prob: Tensor,
    label: Tensor,
    candidate: Tensor,
    is_labeled: Tensor,
    low_rank: int = 3,
    high_rank: int = 20,
    ignore_index: int = 255,
) -> Tensor:
    """``(B,C,h,w)`` bool: pixel (b, y, x) is a negative for class c (see module docstring).

    ``prob`` (B,C,h,w) teacher probabilities; ``label`` (B,h,w) ground truth (labeled samples) or
    pseudo-label; ``candidate`` (B,h,w) bool negative candidates; ``is_labeled`` (B,) bool.
    """
    b, c = prob.shape[:2]
    ranks = class_ranks(prob)
    unlikely = (ranks >= low_rank) & (ranks < high_rank)
    confusable = ranks < low_rank
    labeled = is_labeled.to(prob.device).bool().view(b, 1, 1, 1)
    cond = torch.where(labeled, confusable, unlikely)
    classes = torch.arange(c, device=prob.device).view(1, c, 1, 1)
    not_c = label.unsqueeze(1) != classes  # the fix of issue #171
    valid = (candidate.bool() & (label != ignore_index)).unsqueeze(1)
    return cond & not_c & valid


def u2pl_contrastive_loss(
    rep: Tensor,
    rep_teacher: Tensor,
    prob: Tensor,
    label: Tensor,
    anchor_mask: Tensor,
    negative_mask: Tensor,
    is_labeled: Tensor,
    bank: ClassMemoryBank,
    *,
    num_anchors: int = 256,
    num_negatives: int = 50,
    temperature: float = 0.5,
    anchor_threshold: float = 0.3,
    low_rank: int = 3,
    high_rank: int = 20,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
    gather: Callable[[Tensor], Tensor] = gather_rows,
) -> Tensor:
    """U2PL contrastive loss (module docstring); pushes this batch's negatives into ``bank`` first.

    ``rep`` (B,D,h,w) student features (with gradient), ``rep_teacher`` (B,D,h,w), ``prob``
    (B,C,h,w) teacher probabilities, ``label`` (B,h,w) int (255 = ignore), ``anchor_mask`` /
    ``negative_mask`` (B,h,w) bool candidates, ``is_labeled`` (B,) bool, all at one resolution.
    Random anchor / negative indices come from ``generator``; ``gather`` collects the new
    negatives of all DDP ranks. Fewer than two present classes give ``0 * rep.sum()`` (official).
    """
    b, d, h, w = rep.shape
    c = prob.shape[1]
    for name, t in (("rep_teacher", rep_teacher), ("prob", prob)):
        if t.shape[0] != b or tuple(t.shape[-2:]) != (h, w):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match rep {tuple(rep.shape)}")
    for name, t in (("label", label), ("anchor_mask", anchor_mask), ("negative_mask", negative_mask)):
        if tuple(t.shape) != (b, h, w):
            raise ValueError(f"{name} must have shape {(b, h, w)}, got {tuple(t.shape)}")

    prob = prob.detach().float()
    feats = rep.permute(0, 2, 3, 1)  # (B,h,w,D)
    feats_t = rep_teacher.detach().float().permute(0, 2, 3, 1)

    # 1. enqueue this batch's negatives (teacher features), gathered over ranks
    neg = u2pl_negative_masks(prob, label, negative_mask, is_labeled, low_rank, high_rank, ignore_index)
    keys = [feats_t[neg[:, k]] for k in range(c)]
    key_cls = torch.cat([torch.full((len(x),), k, dtype=torch.long, device=prob.device) for k, x in enumerate(keys)])
    all_keys = gather(torch.cat(keys))
    all_cls = gather(key_cls)
    for k in range(c):
        bank.push(k, all_keys[all_cls == k])

    # 2. prototypes and anchor candidates of the classes present (indexed by class id: issue #111)
    valid_anchor = anchor_mask.bool() & (label != ignore_index)
    present: list[int] = []
    protos: dict[int, Tensor] = {}
    anchors: dict[int, Tensor] = {}
    for k in range(c):
        seg = valid_anchor & (label == k)
        if not bool(seg.any()):
            continue
        present.append(k)
        protos[k] = feats_t[seg].mean(0)
        anchors[k] = feats[seg & (prob[:, k] > anchor_threshold)]
    if len(present) <= 1:
        return rep.sum() * 0.0

    # 3. InfoNCE per present class: positive at index 0, negatives from the bank
    loss = rep.sum() * 0.0
    target = torch.zeros(num_anchors, dtype=torch.long, device=rep.device)
    for k in present:
        cand = anchors[k]
        if cand.shape[0] == 0 or bank.count(k) == 0:
            continue
        idx = torch.randint(cand.shape[0], (num_anchors,), generator=generator).to(cand.device)
        anchor = cand[idx].float()  # (A, D)
        with torch.no_grad():
            negs = bank.sample(k, num_anchors * num_negatives, generator).to(rep.device)
            negs = negs.view(num_anchors, num_negatives, d)
            pos = protos[k].view(1, 1, d).expand(num_anchors, 1, d)
            keys_k = torch.cat([pos, negs], dim=1)  # (A, 1 + N, D)
        logits = cosine_logits(anchor, keys_k, temperature)
        loss = loss + F.cross_entropy(logits, target)
    return loss / len(present)

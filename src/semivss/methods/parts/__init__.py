"""Reusable parts of online pseudo-label methods: EMA teacher, CutMix, entropy-based reliability,
per-class memory bank, the U2PL contrastive loss and padding masks (docs/methods.md, Sections 4-6)."""

from semivss.methods.parts.class_reliability import (
    ClasswiseThreshold,
    ThresholdCheckpoint,
    classwise_reliability_split,
    confidence_weights,
    weighted_ce,
)
from semivss.methods.parts.contrastive import (
    ContrastiveSettings,
    class_ranks,
    u2pl_contrastive_loss,
    u2pl_negative_masks,
)
from semivss.methods.parts.cutmix import (
    apply_cutmix,
    batch_cutmix_boxes,
    box_mix_mask,
    cutmix_box,
    roll_permutation,
    step_generator,
)
from semivss.methods.parts.ema import EMATeacher, average_buffers, ema_decay, ema_update, make_teacher
from semivss.methods.parts.memory_bank import BankCheckpoint, ClassMemoryBank, gather_rows
from semivss.methods.parts.padding import ignore_invalid
from semivss.methods.parts.reliability import (
    alpha_schedule,
    entropy,
    entropy_rank_mask,
    reliability_split,
)

__all__ = [
    "ClasswiseThreshold",
    "ThresholdCheckpoint",
    "classwise_reliability_split",
    "confidence_weights",
    "weighted_ce",
    "BankCheckpoint",
    "ClassMemoryBank",
    "ContrastiveSettings",
    "EMATeacher",
    "average_buffers",
    "alpha_schedule",
    "apply_cutmix",
    "batch_cutmix_boxes",
    "box_mix_mask",
    "class_ranks",
    "cutmix_box",
    "ema_decay",
    "ema_update",
    "entropy",
    "entropy_rank_mask",
    "gather_rows",
    "ignore_invalid",
    "make_teacher",
    "reliability_split",
    "roll_permutation",
    "step_generator",
    "u2pl_contrastive_loss",
    "u2pl_negative_masks",
]

"""Exponential-moving-average teacher (U2PL ``train_semi.py``, Mean Teacher;
docs/methods.md#43-ema-teacher, Eq. (U2PL-6)).

The teacher is a frozen copy of the student. After every optimiser step its parameters follow
``t <- d * t + (1 - d) * s`` with ``d = min(1 - 1 / (step + 1), max_decay)`` (``step`` counted from
0, so the first update copies the student). The EMA covers parameters only: the teacher keeps its
own buffers, the BatchNorm statistics of its train-mode forward (as the official U2PL code; the
reason is in the section cited above). Under DDP, :func:`average_buffers` keeps the teachers of
all ranks identical (the official code uses SyncBN).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["EMATeacher", "average_buffers", "ema_decay", "ema_update", "make_teacher"]


def ema_decay(step: int, max_decay: float = 0.99) -> float:
    """``min(1 - 1 / (step + 1), max_decay)`` (U2PL's ramped EMA decay, Eq. (U2PL-6))."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0 - 1.0 / (step + 1), max_decay)


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` whose parameters do not require gradients."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(
    teacher: nn.Module, student: nn.Module, step: int, max_decay: float = 0.99, copy_buffers: bool = False
) -> float:
    """Update ``teacher`` in place from ``student`` (same architecture); returns the decay used.

    Parameters: ``t = d * t + (1 - d) * s`` with ``d = ema_decay(step, max_decay)``, matched by
    name. Buffers stay the teacher's own unless ``copy_buffers`` (e.g. to make the teacher a full
    copy of a warmed-up student).
    """
    decay = ema_decay(step, max_decay)
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    if s_params.keys() != t_params.keys():
        missing = sorted(set(s_params) ^ set(t_params))[:5]
        raise ValueError(f"teacher and student parameters differ (e.g. {missing})")
    for name, t in t_params.items():
        s = s_params[name].detach()
        t.mul_(decay).add_(s.to(t.dtype), alpha=1.0 - decay)
    if copy_buffers:
        s_bufs = dict(student.named_buffers())
        for name, buf in teacher.named_buffers():
            if name not in s_bufs:
                raise ValueError(f"teacher buffer {name!r} has no counterpart in the student")
            buf.copy_(s_bufs[name])
    return decay


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of ``module`` over the
    ranks of the default process group; nothing without one. Integer buffers (batch counters)
    are the same on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
        offset += n


@dataclass(frozen=True)
class EMATeacher:
    """Convenience wrapper: ``EMATeacher(0.99).create(student)`` then ``.update(t, s, step)``."""

    max_decay: float = 0.99

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_decay <= 1.0:
            raise ValueError(f"max_decay must be in [0, 1], got {self.max_decay}")

    def create(self, student: nn.Module) -> nn.Module:
        """Frozen copy of ``student`` (see :func:`make_teacher`)."""
        return make_teacher(student)

    def update(self, teacher: nn.Module, student: nn.Module, step: int) -> float:
        """EMA step (see :func:`ema_update`); returns the decay used."""
        return ema_update(teacher, student, step, self.max_decay)

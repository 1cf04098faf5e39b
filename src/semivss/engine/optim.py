"""Optimiser with per-group learning rates (backbone x1, head x ``head_lr_mult``) and the LR
schedule (poly / cosine / constant with linear warm-up) as a LambdaLR."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from semivss.engine.config import OptimConfig, ScheduleConfig
from semivss.engine.dist import unwrap_model
from semivss.errors import ConfigError


def _groups_of(name: str, model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Parameter groups of one model: its ``param_groups()`` (backbone x1, head x mult) when it has
    one, else a single group; trainable parameters the model does not list go to ``<name>.other``
    (lr x1) so that nothing is silently frozen."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    groups: list[dict] = []
    split = getattr(model, "param_groups", None)
    if callable(split):
        parts = split()
        for key, mult in (("backbone", 1.0), ("head", cfg.head_lr_mult)):
            params = []
            for p in parts.get(key, []):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            if params:
                groups.append(
                    {"params": params, "lr": cfg.lr * mult, "lr_mult": mult, "name": f"{name}.{key}"}
                )
        unknown = set(parts) - {"backbone", "head"}
        if unknown:
            raise ConfigError(
                f"model '{name}'.param_groups() returned unknown group(s) {sorted(unknown)}; "
                "expected 'backbone' and 'head'"
            )
        rest = [p for p in trainable if id(p) not in seen]
        if rest:
            groups.append({"params": rest, "lr": cfg.lr, "lr_mult": 1.0, "name": f"{name}.other"})
    elif trainable:
        groups.append({"params": trainable, "lr": cfg.lr, "lr_mult": 1.0, "name": name})
    return groups


def build_optimizer(
    models: nn.ModuleDict, trainable_names: Sequence[str], cfg: OptimConfig
) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable models, one LR group per (model, backbone/head).

    Every group carries ``name`` and ``lr_mult`` (its LR relative to ``cfg.lr``).
    """
    groups: list[dict] = []
    for name in trainable_names:
        if name not in models:
            raise ConfigError(f"trainable model '{name}' is not one of {list(models.keys())}")
        groups.extend(_groups_of(name, unwrap_model(models[name]), cfg))
    if not groups:
        raise ConfigError(f"no trainable parameters in models {list(trainable_names)}")
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, t: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR after ``t`` optimiser steps.

    Regular part r(t): poly ``(1 - t/T)^power``, cosine ``(1 + cos(pi t/T))/2`` or 1, mapped to
    ``min_ratio + (1 - min_ratio) r(t)``; during warm-up (t < W) multiplied by
    ``warmup_ratio + (1 - warmup_ratio) t/W`` (mmcv's linear warm-up).
    """
    T = cfg.iters
    t = min(max(t, 0), T)
    if cfg.policy == "poly":
        r = (1.0 - t / T) ** cfg.power
    elif cfg.policy == "cosine":
        r = 0.5 * (1.0 + math.cos(math.pi * t / T))
    else:
        r = 1.0
    factor = min_ratio + (1.0 - min_ratio) * r
    if cfg.warmup_iters > 0 and t < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * t / cfg.warmup_iters
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_factor` to every group (base-LR ratios between groups kept).

    Call ``scheduler.step()`` once per iteration, after ``optimizer.step()``.
    """
    g0 = optimizer.param_groups[0]
    base_lr = g0.get("initial_lr", g0["lr"]) / g0.get("lr_mult", 1.0)
    if cfg.min_lr > base_lr:
        raise ConfigError(f"schedule.min_lr ({cfg.min_lr}) is larger than the base LR ({base_lr})")
    min_ratio = cfg.min_lr / base_lr

    def factor(t: int) -> float:
        return lr_factor(cfg, t, min_ratio)

    fn: Callable[[int], float] = factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=fn)

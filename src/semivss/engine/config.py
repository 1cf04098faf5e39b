"""Config sections owned by the engine: optimiser, LR schedule and training loop.

Each section is a pydantic v2 model with ``extra="forbid"`` so that an unknown key is an error that
names the key; ``semivss/config.py`` composes them into the experiment config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from semivss.sections import Section


class OptimConfig(Section):
    """Optimiser (SGD momentum 0.9 wd 1e-4 with head x10 as the reference video and image SSL
    code, or AdamW as the PVUW 2024 recipe; docs/methods.md).

    ``lr`` is the base (backbone) learning rate; the head group of every trainable model gets
    ``lr * head_lr_mult``. All parameters are weight-decayed, as in the reference code.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    head_lr_mult: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.name == "sgd" and self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov=true needs momentum > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self


class ScheduleConfig(Section):
    """LR schedule over ``iters`` iterations: poly ``(1 - t/T)^power``, cosine or constant, with a
    linear warm-up of the factor from ``warmup_ratio`` to 1 over ``warmup_iters`` (mmcv convention:
    the warm-up multiplies the regular schedule). ``min_lr`` is the floor of the base LR (each group
    floors at its own multiple of it)."""

    iters: int = Field(1000, ge=1)
    policy: Literal["poly", "cosine", "constant"] = "poly"
    power: float = Field(0.9, gt=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_ratio: float = Field(1e-6, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.warmup_iters > self.iters:
            raise ValueError(
                f"warmup_iters ({self.warmup_iters}) must not exceed iters ({self.iters})"
            )
        return self


class TrainConfig(Section):
    """Training loop settings.

    ``precision="auto"``: on CPU bf16 autocast only where the CPU computes bf16 natively
    (avx512_bf16 / AMX), else fp32; on CUDA bf16 if supported, else fp16 with a GradScaler.
    ``malloc_tuning`` keeps freed activation buffers in the glibc heap (``engine.memory``). ``eval_interval=0`` evaluates only at the end. ``sync_bn`` applies on CUDA with more
    than one process only.
    """

    seed: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    log_interval: int = Field(10, ge=1)
    eval_interval: int = Field(0, ge=0)
    ckpt_interval: int = Field(100, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    sync_bn: bool = True
    find_unused_parameters: bool = False
    num_workers: int = Field(2, ge=0)
    deterministic: bool = False
    keep_best: bool = True
    malloc_tuning: bool = True
    # before the first iteration: decode every labeled training frame, its label and every
    # validation frame, and read the header of every other training frame (data/preflight.py)
    preflight: bool = True

"""semivss.engine: the training loop and its parts (config, optimiser, schedule, sampler,
checkpoints, logging, precision, distributed helpers)."""

from semivss.engine.checkpoint import load_checkpoint, save_checkpoint
from semivss.engine.config import OptimConfig, ScheduleConfig, TrainConfig
from semivss.engine.dist import (
    all_reduce_mean,
    barrier,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    pick_device,
    unwrap_model,
)
from semivss.engine.optim import build_optimizer, build_scheduler, lr_factor
from semivss.engine.sampler import InfiniteBatchSampler, sample_seed
from semivss.engine.trainer import Trainer, seed_everything

__all__ = [
    "InfiniteBatchSampler",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "Trainer",
    "all_reduce_mean",
    "barrier",
    "build_optimizer",
    "build_scheduler",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main",
    "load_checkpoint",
    "lr_factor",
    "pick_device",
    "sample_seed",
    "save_checkpoint",
    "seed_everything",
    "unwrap_model",
]

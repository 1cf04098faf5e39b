"""Process-group helpers for torchrun launches (gloo on CPU, NCCL on CUDA) and device choice."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from semivss.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of the current process (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from exc


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK).

    Does nothing for a single process. Backend: NCCL when CUDA is available, gloo otherwise; on
    CUDA the process is bound to ``cuda:LOCAL_RANK``. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank)


def is_dist() -> bool:
    """True inside an initialised process group with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (or without a process group)."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if is_dist():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; the input itself without a process group)."""
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (``[obj]`` without a process group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def pick_device(prefer: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` (``cuda:LOCAL_RANK`` if available, else CPU) or an explicit device name.

    An explicit CUDA/MPS device that is not available raises ``ConfigError`` naming it.
    """
    if isinstance(prefer, torch.device):
        prefer = str(prefer)
    if prefer == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"device {prefer!r} is not a valid device name") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {prefer!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", _env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {prefer!r} requested but MPS is not available")
    return device


def unwrap_model(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (else itself)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module

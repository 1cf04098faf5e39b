"""The iteration loop: data, autocast, backward, optimiser/schedule, hooks, logging, evaluation,
atomic checkpoints with exact resume, DDP. It receives a method, a model factory and datasets and
knows nothing about particular methods, data formats or models."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from semivss.engine.checkpoint import (
    CHECKPOINT_VERSION,
    atomic_write,
    capture_rng,
    load_checkpoint,
    remove_stale_temps,
    restore_rng,
    save_checkpoint,
)
from semivss.engine.config import OptimConfig, ScheduleConfig, TrainConfig
from semivss.engine.dist import (
    all_gather_object,
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
    pick_device,
)
from semivss.engine.logger import TrainLogger
from semivss.engine.memory import tune_malloc
from semivss.engine.optim import build_optimizer, build_scheduler
from semivss.engine.precision import Precision, images_channels_last, to_channels_last
from semivss.engine.sampler import InfiniteBatchSampler
from semivss.errors import ConfigError, DataError, TrainingError, TrainingInterrupted
from semivss.methods.base import Method

EvaluateFn = Callable[[nn.Module, int], Mapping[str, float]]


def derive_seed(*parts: int | str) -> int:
    """A 32-bit seed derived deterministically from ints and strings."""
    ints = [p if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint32)[0])


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` / numpy from the worker's torch seed."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def collate_any(samples: list[Any]) -> Any:
    """Default collate: samples with a ``collate`` classmethod (typed batches) stack themselves,
    anything else goes through ``torch.utils.data.default_collate``."""
    collate = getattr(type(samples[0]), "collate", None) if samples else None
    return collate(samples) if collate is not None else default_collate(samples)


def _plain(obj: Any, where: str) -> Any:
    """``obj`` made of weights_only-loadable values (Path -> str, numpy scalars -> python)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise ConfigError(f"{where}: key {k!r} must be a string or an int")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise ConfigError(f"{where}: a value of type {type(obj).__name__} cannot be stored in a checkpoint")

#: Checkpoint keys only a resume needs: ``best.pt`` leaves them out (a method's memory bank
#: alone can be ~330 MB on CamVid), ``last.pt`` keeps everything.
RESUME_ONLY: frozenset[str] = frozenset({"optimizer", "scheduler", "scaler", "method", "rng"})


# what a run has learned (weights) and everything it writes; a folder holding any of these is a run
RUN_WEIGHTS = ("checkpoints/last.pt", "checkpoints/best.pt", "model.safetensors")
RUN_OUTPUTS = (*RUN_WEIGHTS, "metrics.csv", "tb")


def check_run_dir(out_dir: str | Path, resume: bool) -> None:
    """Refuse a fresh run in a folder holding another run's outputs (checkpoints, exported model,
    logs), and a resume without ``checkpoints/last.pt``; DataError naming the folder and files."""
    out_dir = Path(out_dir)
    if resume:
        last = out_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            raise DataError(f"cannot resume: checkpoint {last} does not exist")
        return
    found = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if found:
        raise DataError(f"output folder {out_dir} holds another run ({', '.join(found)}); continue it with "
                        "--resume or choose another --out")


class _StopOnSignal:
    """While active (main thread only), the first SIGINT / SIGTERM sets ``requested`` so that the
    loop stops after the current step with a checkpoint; a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Window:
    """Loss terms, learning rate and busy time summed over the iterations since the last log."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.busy, self.lr_sum = 0, 0.0, 0.0

    def add(self, losses: Mapping[str, torch.Tensor], lr: float, t0: float) -> None:
        """One iteration that started at ``time.perf_counter() == t0``."""
        self.lr_sum += lr
        for k, v in losses.items():
            v = v.detach().float().mean()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.busy += time.perf_counter() - t0

    def flush(self) -> dict[str, float]:
        """The means (loss terms averaged over ranks: collective), ``lr`` and ``it_s``; resets."""
        keys = list(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / self.count)
        scalars = {k: float(v) for k, v in zip(keys, means.tolist())}
        scalars["lr"] = self.lr_sum / self.count
        scalars["it_s"] = self.count / max(self.busy, 1e-9)
        self.reset()
        return scalars


class Trainer:
    """Trains ``method`` on ``train_sets`` and writes ``out_dir/{metrics.csv, tb/, checkpoints/,
    model.safetensors}``.

    ``train_sets``: ``{"labeled": ds, ...}``; every entry becomes ``batch[name]`` (the methods ask
    for ``unlabeled`` and ``pseudo``; the engine needs only ``labeled``); datasets are indexed with
    ``(index, sample_seed)`` pairs and return dicts of tensors (collated by ``collate_fn``,
    default ``torch.utils.data.default_collate``). ``evaluate_fn(model, step)`` gets the
    inference model (eval mode, under ``torch.no_grad``) and the number of completed iterations;
    it runs on rank 0 only (pass the same ``evaluate_fn``-or-None on every rank). ``meta`` (model
    config, class names, palette, ...) is stored in every checkpoint so that the model can be
    rebuilt from the checkpoint alone; the trainer adds ``meta["export"]``, the method's
    ``export_spec`` (``{"members": [names in checkpoint["models"]], "combine": ...}``), from which
    ``method.inference_model`` (evaluated and exported to ``model.safetensors``) is built.
    """

    def __init__(
        self,
        method: Method,
        make_model: Callable[[], nn.Module],
        train_sets: Mapping[str, Dataset],
        batch_sizes: Mapping[str, int],
        optim: OptimConfig,
        schedule: ScheduleConfig,
        train: TrainConfig,
        out_dir: str | Path,
        evaluate_fn: EvaluateFn | None = None,
        metric: str = "mIoU",
        meta: Mapping[str, Any] | None = None,
        *,
        device: str | torch.device = "auto",
        collate_fn: Callable[[list[Any]], Any] | None = None,
        tensorboard: bool = True,
        progress: bool | None = None,
    ) -> None:
        if "labeled" not in train_sets:
            raise ConfigError("train sets: a 'labeled' dataset is required")
        missing = [k for k in method.data_spec().keys if k not in train_sets]
        if missing:
            raise ConfigError(f"method '{method.name}' needs the train sets {missing}, which were not given")
        for key, ds in train_sets.items():
            size = batch_sizes.get(key)
            if size is None or int(size) < 1:
                raise ConfigError(f"batch_sizes.{key}: a positive batch size is required, got {size}")
            if len(ds) == 0:  # type: ignore[arg-type]
                raise DataError(f"train set '{key}' is empty")
        self.method = method
        self.make_model = make_model
        self.train_sets = dict(train_sets)
        self.batch_sizes = {k: int(batch_sizes[k]) for k in self.train_sets}
        self.optim_cfg = optim
        self.schedule_cfg = schedule
        self.cfg = train
        self.out_dir = Path(out_dir)
        self.evaluate_fn = evaluate_fn
        self.metric = metric
        self.meta = _plain(dict(meta or {}), "meta")
        self.device_name = device
        self.collate_fn = collate_fn or collate_any
        self.tensorboard = tensorboard
        self.progress = progress
        self.models: nn.ModuleDict | None = None  # unwrapped models, available after fit()
        self.best: dict[str, Any] = {"metric": metric, "value": None, "step": None}

    # ------------------------------------------------------------------ paths
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    # ------------------------------------------------------------------ setup
    def _check_out_dir(self, resume: bool, rank: int) -> None:
        """A fresh run needs an output folder without another run's outputs (see
        :func:`check_run_dir`); a resumed one its ``last.pt``. Temp files of checkpoint writes
        that a kill interrupted are removed."""
        msg = None
        if rank == 0:
            try:
                check_run_dir(self.out_dir, resume)
            except DataError as exc:
                msg = str(exc)
            remove_stale_temps(self.ckpt_dir, "*.pt")
        msg = broadcast_object(msg)
        if msg is not None:
            raise DataError(msg)

    def _setup_backends(self, device: torch.device) -> None:
        if self.cfg.malloc_tuning:
            tune_malloc()
        if self.cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _build_loaders(self, start_iter: int, rank: int, world: int) -> dict[str, Any]:
        nw = self.cfg.num_workers
        iters = {}
        for key, ds in self.train_sets.items():
            seed = derive_seed(self.cfg.seed, "data", key)
            sampler = InfiniteBatchSampler(
                len(ds), self.batch_sizes[key], seed, rank, world, start_iter  # type: ignore[arg-type]
            )
            gen = torch.Generator()
            gen.manual_seed(derive_seed(seed, "workers", rank))
            loader = DataLoader(
                ds,
                batch_sampler=sampler,
                num_workers=nw,
                collate_fn=self.collate_fn,
                pin_memory=self._device.type == "cuda",
                persistent_workers=nw > 0,
                worker_init_fn=seed_worker if nw > 0 else None,
                generator=gen,
            )
            iters[key] = iter(loader)
        return iters

    def _to_device(self, obj: Any) -> Any:
        obj = Method.to_device(obj, self._device)
        return images_channels_last(obj) if self.cfg.channels_last else obj

    # ------------------------------------------------------------------ checkpoints
    def _state(self, step: int, metrics: dict[str, float] | None) -> dict[str, Any]:
        """Checkpoint content; collective (every rank contributes its RNG state)."""
        rngs = all_gather_object(capture_rng())
        return {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "world_size": self._world,
            "method_name": self.method.name,
            "models": {n: m.state_dict() for n, m in self._raw.items()},
            "optimizer": self._optimizer.state_dict(),
            "scheduler": self._scheduler.state_dict(),
            "scaler": self._precision.scaler.state_dict(),
            "method": _plain(self.method.state_dict(), "method state"),
            "rng": {"ranks": rngs},
            "best": dict(self.best),
            "metrics": dict(metrics or {}),
            "meta": self.meta,
            "config": {
                "optim": self.optim_cfg.model_dump(),
                "schedule": self.schedule_cfg.model_dump(),
                "train": self.cfg.model_dump(),
            },
        }

    def _save(self, path: Path, state: dict[str, Any]) -> None:
        if self._rank == 0:
            save_checkpoint(path, state)

    def _load(self, rank: int) -> tuple[int, dict[str, float]]:
        path = self.last_path
        state = load_checkpoint(path)
        if state.get("version") != CHECKPOINT_VERSION:
            raise DataError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        missing = [k for k in ("step", "models", "optimizer", "scheduler", "rng") if k not in state]
        if missing:
            raise DataError(f"checkpoint {path} lacks {missing}")
        if set(state["models"]) != set(self._raw.keys()):
            raise DataError(
                f"checkpoint {path} holds models {sorted(state['models'])}, method "
                f"'{self.method.name}' builds {sorted(self._raw.keys())}"
            )
        step = int(state["step"])
        if step > self.schedule_cfg.iters:
            raise ConfigError(
                f"schedule.iters={self.schedule_cfg.iters} is smaller than the step {step} of {path}"
            )
        try:
            for name, module in self._raw.items():
                module.load_state_dict(state["models"][name])
            self._optimizer.load_state_dict(state["optimizer"])
            self._scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"checkpoint {path} does not match this run: {exc}") from exc
        scaler_state = state.get("scaler") or {}
        if self._precision.scaler.is_enabled() and scaler_state:
            self._precision.scaler.load_state_dict(scaler_state)
        self.method.load_state_dict(state.get("method") or {})
        self.best = dict(state.get("best") or self.best)
        ranks = state["rng"]["ranks"]
        if int(state.get("world_size", 1)) != self._world:
            warnings.warn(
                f"resuming {path} (world size {state.get('world_size')}) with world size "
                f"{self._world}: data order and RNG streams are not those of the original run",
                stacklevel=2,
            )
        if rank < len(ranks):
            restore_rng(ranks[rank])
        else:
            seed_everything(derive_seed(self.cfg.seed, "train", rank, step))
        return step, dict(state.get("metrics") or {})

    def _export(self, step: int) -> None:
        """``out_dir/model.safetensors``: the inference model's weights; the header holds
        ``step``, ``method`` and ``semivss_meta`` (the meta dict as JSON)."""
        if self._rank != 0:
            return
        from safetensors.torch import save as st_save

        model = self.method.inference_model(self._raw)
        tensors = {
            k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
        }
        metadata = {
            "format": "pt",
            "step": str(step),
            "method": self.method.name,
            "semivss_meta": json.dumps(self.meta, default=str),
        }
        data = st_save(tensors, metadata=metadata)
        atomic_write(self.out_dir / "model.safetensors", lambda f: f.write(data))

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, step: int) -> dict[str, float]:
        """Run ``evaluate_fn`` on rank 0 (others wait); the RNG state is left untouched."""
        metrics: dict[str, float] | None = None
        if self._rank == 0 and self.evaluate_fn is not None:
            rng = capture_rng()
            model = self.method.inference_model(self._raw)
            modes = {m: m.training for m in self._raw.modules()}
            model.eval()
            try:
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in self.evaluate_fn(model, step).items()}
            finally:
                for m, mode in modes.items():
                    m.train(mode)
                restore_rng(rng)
        barrier()
        metrics = broadcast_object(metrics)
        if metrics is None:
            return {}
        if self.metric not in metrics:
            raise ConfigError(
                f"metric {self.metric!r} is not among the evaluation results {sorted(metrics)}"
            )
        return metrics

    # ------------------------------------------------------------------ run setup
    def _setup(self, resume: bool) -> int:
        """Everything before the first iteration: distributed init, output-directory check,
        backends, the models (identical initialisation on every rank), optimiser, schedule and
        precision; then ``last.pt`` restored when ``resume``, else the training RNG seeded.
        Returns the first step to run."""
        info = init_distributed()
        self._rank, self._world = info.rank, info.world_size
        self._device = pick_device(self.device_name)
        self._check_out_dir(resume, self._rank)
        self._setup_backends(self._device)
        seed_everything(self.cfg.seed)  # identical model initialisation on every rank
        trainable = self._build_models()
        self._optimizer = build_optimizer(self._raw, trainable, self.optim_cfg)
        self._scheduler = build_scheduler(self._optimizer, self.schedule_cfg)
        self._precision = Precision.from_config(self.cfg.precision, self._device)
        self.best = {"metric": self.metric, "value": None, "step": None}
        self._metrics: dict[str, float] = {}  # the last evaluation results
        self._scalars: dict[str, float] = {}  # the last logged training scalars
        if resume:
            start, self._metrics = self._load(self._rank)
            return start
        seed_everything(derive_seed(self.cfg.seed, "train", self._rank))
        return 0

    def _build_models(self) -> list[str]:
        """The method's models on the device (``self._raw``, also ``self.models``), wrapped in DDP
        where trained on several ranks (``self._train_models``), and ``meta["export"]``, the
        method's :class:`~semivss.models.ensemble.ExportSpec`. Returns the trainable names."""
        cfg = self.cfg
        models = self.method.build_models(self.make_model)
        if not isinstance(models, nn.ModuleDict):
            raise TypeError(f"{type(self.method).__name__}.build_models must return an nn.ModuleDict")
        models.to(self._device)
        if cfg.channels_last:
            to_channels_last(models)
        trainable = self.method.trainable(models)
        if not trainable:
            raise ConfigError(f"method '{self.method.name}' has no trainable model")
        train_models = nn.ModuleDict()
        for name, module in models.items():
            if name in trainable and self._world > 1:
                if self._device.type == "cuda" and cfg.sync_bn:
                    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
                    models[name] = module
                module = nn.parallel.DistributedDataParallel(
                    module,
                    device_ids=[self._device.index] if self._device.type == "cuda" else None,
                    find_unused_parameters=cfg.find_unused_parameters,
                )
            train_models[name] = module
        self._raw, self.models, self._train_models = models, models, train_models
        spec = self.method.export_spec(models)
        unknown = [n for n in spec.members if n not in models]
        if unknown:
            raise ConfigError(
                f"method '{self.method.name}' exports models {unknown} it does not build "
                f"({sorted(models)})"
            )
        self.meta["export"] = spec.to_meta()  # how to rebuild the inference model
        return trainable

    # ------------------------------------------------------------------ one iteration
    def _train_step(self, step: int, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], float]:
        """The method's losses (under autocast), backward, optional gradient clipping, optimiser,
        schedule and ``on_step_end``. Returns the losses and the learning rate of this step."""
        with self._precision.autocast():
            losses = self.method.training_step(self._train_models, batch, step, self.schedule_cfg.iters)
        if "loss" not in losses:
            raise TrainingError(
                f"{type(self.method).__name__}.training_step returned no 'loss' "
                f"(keys: {sorted(losses)})"
            )
        self._check_finite(step, losses)
        self._optimizer.zero_grad(set_to_none=True)
        scaler = self._precision.scaler
        scaler.scale(losses["loss"].float()).backward()
        if self.cfg.grad_clip is not None:
            scaler.unscale_(self._optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self._optimizer.param_groups for p in g["params"]], self.cfg.grad_clip
            )
        lr = self._optimizer.param_groups[0]["lr"]
        scaler.step(self._optimizer)
        scaler.update()
        self._scheduler.step()
        self.method.on_step_end(self._train_models, step)
        return losses, lr

    # ------------------------------------------------------------------ after an iteration
    def _maybe_log(self, done: int, window: _Window, logger: TrainLogger) -> None:
        """Every ``log_interval`` iterations and after the last: the window's means (loss terms
        averaged over ranks) go to the logger and ``self._scalars``."""
        if done % self.cfg.log_interval == 0 or done == self.schedule_cfg.iters:
            self._scalars = window.flush()
            logger.log_train(done, self._scalars)

    def _maybe_evaluate(self, done: int, logger: TrainLogger) -> bool:
        """Every ``eval_interval`` iterations and after the last (with an ``evaluate_fn``):
        evaluate, log, track the best value. True when ``best.pt`` should be written."""
        if self.evaluate_fn is None:
            return False
        interval = self.cfg.eval_interval
        if not (done == self.schedule_cfg.iters or (interval > 0 and done % interval == 0)):
            return False
        self._metrics = self._evaluate(done)
        logger.log_eval(done, self._metrics)
        value = self._metrics[self.metric]
        if self.best["value"] is None or value > self.best["value"]:
            self.best = {"metric": self.metric, "value": value, "step": done}
            return self.cfg.keep_best
        return False

    def _maybe_checkpoint(self, done: int, new_best: bool) -> None:
        """``best.pt`` on a new best (weights for evaluation; the training state lives in
        ``last.pt`` only); ``last.pt`` every ``ckpt_interval`` iterations and after the last."""
        save_last = done % self.cfg.ckpt_interval == 0 or done == self.schedule_cfg.iters
        if not (new_best or save_last):
            return
        state = self._state(done, self._metrics)
        if new_best:
            self._save(self.best_path, {k: v for k, v in state.items() if k not in RESUME_ONLY})
        if save_last:
            self._save(self.last_path, state)

    # ------------------------------------------------------------------ loop
    def _stop_requested(self, stop: _StopOnSignal) -> bool:
        """A SIGINT/SIGTERM arrived (on any rank: all ranks stop at the same step)."""
        flag = torch.tensor([1.0 if stop.requested else 0.0])
        if self._world > 1:
            flag = all_reduce_mean(flag.to(self._device)).cpu()
        return float(flag) > 0

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train for ``schedule.iters`` iterations (continuing ``checkpoints/last.pt`` when
        ``resume``); returns the final evaluation metrics (the last logged training scalars when
        there is no ``evaluate_fn``)."""
        start = self._setup(resume)
        max_steps = self.schedule_cfg.iters
        logger = TrainLogger(
            self.out_dir,
            max_steps,
            start_step=start,
            resume=resume,
            enabled=self._rank == 0,
            tensorboard=self.tensorboard,
            progress=self.progress,
        )
        iters: dict[str, Any] = {}
        try:
            if start < max_steps:
                iters = self._build_loaders(start, self._rank, self._world)
            self._train_models.train()
            window = _Window()
            with _StopOnSignal() as stop:
                for step in range(start, max_steps):
                    t0 = time.perf_counter()
                    batch = {k: self._to_device(next(it)) for k, it in iters.items()}
                    losses, lr = self._train_step(step, batch)
                    window.add(losses, lr, t0)
                    done = step + 1
                    logger.advance(done)
                    self._maybe_log(done, window, logger)
                    new_best = self._maybe_evaluate(done, logger)
                    self._maybe_checkpoint(done, new_best)
                    if done < max_steps and self._stop_requested(stop):
                        if done % self.cfg.ckpt_interval:  # not written by _maybe_checkpoint
                            self._save(self.last_path, self._state(done, self._metrics))
                        barrier()
                        raise TrainingInterrupted(
                            f"interrupted at step {done}/{max_steps}; {self.last_path} holds it: "
                            f"continue with `semivss train CONFIG --resume` (same --out {self.out_dir})"
                        )
            self._export(max_steps)
            barrier()
        finally:
            for it in iters.values():
                shutdown = getattr(it, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
            logger.close()
        return self._metrics if self.evaluate_fn is not None else self._scalars

    def _check_finite(self, step: int, losses: Mapping[str, torch.Tensor]) -> None:
        """Raise TrainingError naming the step and every loss term when the total is not finite
        (on any rank)."""
        finite = torch.isfinite(losses["loss"].detach()).all().float()
        if self._world > 1:
            finite = all_reduce_mean(finite.reshape(1)).reshape(())
        if float(finite) < 1.0:
            terms = ", ".join(
                f"{k}={float(v.detach().float().mean()):.6g}" for k, v in losses.items()
            )
            where = f" (rank {self._rank})" if self._world > 1 else ""
            raise TrainingError(f"non-finite loss at step {step + 1}{where} (steps count from 1, as in "
                                f"the logs): {terms}")

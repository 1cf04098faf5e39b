"""Glue: build an experiment from its config (data -> method -> trainer) and reload trained models.

This is the only place that knows every module; each module stays ignorant of the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semivss.config import ExperimentConfig, dump_config
from semivss.data import splits
from semivss.data.config import SplitConfig, build_augment, build_split, load_videosets
from semivss.data.requests import TrainSource
from semivss.data.video import FrameRef, VideoSet
from semivss.engine import dist
from semivss.engine.checkpoint import load_checkpoint
from semivss.engine.trainer import RUN_WEIGHTS, Trainer, check_run_dir
from semivss.errors import ConfigError, DataError
from semivss.inference.config import EvalConfig
from semivss.inference.evaluate import EvalResult, evaluate
from semivss.methods import DataSpec, build_method
from semivss.models import build_model
from semivss.models.config import ModelConfig
from semivss.models.ensemble import ARCH_BUILDERS, ExportSpec, build_inference_model


def build_train_sets(cfg: ExperimentConfig, videoset: VideoSet, spec: DataSpec) -> tuple[dict, dict]:
    """Datasets and batch sizes of the requests of the method's ``DataSpec``, keyed by batch key."""
    source = TrainSource(videoset, build_split(cfg.data.split, videoset), build_augment(cfg.data),
                         cfg.data, cfg.method_name)
    sets: dict[str, torch.utils.data.Dataset] = {}
    sizes: dict[str, int] = {}
    for request in spec.requests:
        sets[request.key], sizes[request.key] = request.build(source)
    return sets, sizes


def make_meta(cfg: ExperimentConfig, videoset: VideoSet) -> dict[str, Any]:
    """Everything evaluate/predict need to rebuild the model from a checkpoint alone."""
    return {
        "model": cfg.model.model_dump(mode="json"),
        "num_classes": videoset.num_classes,
        "classes": list(videoset.classes),
        "palette": [[int(v) for v in row] for row in videoset.palette],
        "method": cfg.method_name,
        "eval": cfg.eval.model_dump(mode="json"),
        "data": {"format": cfg.data.format, "root": str(cfg.data.root)},
        "experiment": cfg.model_dump(mode="json"),  # the whole resolved config, for provenance
    }


def train(cfg: ExperimentConfig, resume: bool = False) -> dict[str, float]:
    """Train the configured method; returns the final validation metrics."""
    dist.init_distributed()
    device = dist.pick_device()
    train_set, val_set = load_videosets(cfg.data)
    method = build_method(cfg.method_name, cfg.method_params, train_set.num_classes)
    sets, sizes = build_train_sets(cfg, train_set, method.data_spec())

    def make_model() -> nn.Module:
        return build_model(cfg.model, train_set.num_classes)

    evaluate_fn = None
    if val_set is not None:
        val_frames = val_set.annotated()

        def evaluate_fn(model: nn.Module, step: int) -> dict[str, float]:
            result = evaluate(model, val_set, val_frames, cfg.eval, device, progress=False)
            return result.scalars()

    out_dir = Path(cfg.out_dir)
    # --resume of a run killed before its first checkpoint (or never started) starts it from step 0
    # (every rank decides alike)
    restart = resume and not any((out_dir / name).exists() for name in RUN_WEIGHTS)
    resume = resume and not restart
    own_logs = restart and (out_dir / "config.yaml").is_file()  # this run's logs so far, dropped below
    # 1. checks that write nothing: the folder, the settings of a resumed run, then every frame
    if dist.is_main():
        if not own_logs:
            check_run_dir(out_dir, resume)  # another run is never touched
        if resume or own_logs:
            check_resume_config(cfg, out_dir)
    if cfg.train.preflight:  # every rank: a rank that raised while the others wait would hang them
        _preflight(cfg, train_set, val_set)
    # 2. the run's own files
    if dist.is_main():
        from semivss.results import git_commit, machine_info

        if own_logs:
            shutil.rmtree(out_dir / "tb", ignore_errors=True)
            (out_dir / "metrics.csv").unlink(missing_ok=True)
        if restart:
            print(f"[semivss] {out_dir} has no checkpoint yet (stopped before the first one): starting "
                  "the run from step 0", flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / ("config.resumed.yaml" if resume else "config.yaml"))
        provenance = {"commit": git_commit(Path.cwd()), "machine": machine_info(), "resume": resume}
        with (out_dir / "provenance.jsonl").open("a") as f:  # one line per start of the run
            f.write(json.dumps(provenance) + "\n")
    trainer = Trainer(
        method,
        make_model,
        sets,
        sizes,
        optim=cfg.optim,
        schedule=cfg.schedule,
        train=_train_section(cfg),
        out_dir=out_dir,
        evaluate_fn=evaluate_fn,
        metric="mIoU",
        meta=make_meta(cfg, train_set),
    )
    return trainer.fit(resume=resume)


# Keys a resumed run may change: where the data lies, logging / checkpoint / evaluation cadence,
# data-loading workers and the in-run evaluation settings. They do not change the weights' path;
# the new values are applied and recorded in config.resumed.yaml.
RESUME_SAFE = ("name", "out_dir", "data.root", "data.num_workers", "train.num_workers", "train.log_interval",
               "train.eval_interval", "train.ckpt_interval", "train.keep_best", "train.malloc_tuning", "eval.")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_resume_config(cfg: ExperimentConfig, out_dir: Path) -> None:
    """A resume must train the run that was started: every changed key outside
    :data:`RESUME_SAFE` (learning rate, schedule length, method settings, model, data split, ...)
    is a ConfigError listing the keys with their old and new values."""
    from semivss.config import load_config

    original = out_dir / "config.yaml"
    if not original.is_file():
        return
    def settings(c: ExperimentConfig) -> dict[str, Any]:
        from semivss.registry import METHODS

        tree = c.model_dump(mode="json")  # method settings with their defaults filled in
        tree["method"] = {"name": c.method_name,
                          **METHODS[c.method_name].Config(**c.method_params).model_dump(mode="json")}
        return _flatten(tree)

    old, new = settings(load_config(original)), settings(cfg)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
               and not any(k == s or (s.endswith(".") and k.startswith(s)) for s in RESUME_SAFE)]
    if changed:
        detail = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
        raise ConfigError(f"cannot resume {out_dir}: {detail} differ from its {original.name}; resume with "
                          "the run's settings, or start a new run from its weights (model.init_from)")


def _preflight(cfg: ExperimentConfig, train_set: VideoSet, val_set: VideoSet | None) -> None:
    """Read what the run will read before its first iteration (data/preflight.py): labeled
    training frames and validation frames decoded with their labels, other training frames'
    headers."""
    from semivss.data.preflight import preflight

    labeled = set(build_split(cfg.data.split, train_set).labeled)
    frames = train_set.frames()
    checks = [(train_set, [r for r in frames if r in labeled], True),
              (train_set, [r for r in frames if r not in labeled], False)]
    if val_set is not None:
        checks.append((val_set, val_set.annotated(), True))
    preflight(checks, report=dist.is_main())


def _train_section(cfg: ExperimentConfig) -> Any:
    """``cfg.train`` with the data-loading workers of ``data.num_workers`` (the documented key);
    ``train.num_workers`` is its older spelling and must agree when both are given."""
    data_set = "num_workers" in cfg.data.model_fields_set
    train_set = "num_workers" in cfg.train.model_fields_set
    if data_set and train_set and cfg.data.num_workers != cfg.train.num_workers:
        raise ConfigError(f"data.num_workers ({cfg.data.num_workers}) and train.num_workers "
                          f"({cfg.train.num_workers}) disagree; give data.num_workers only")
    if train_set and not data_set:
        return cfg.train
    return cfg.train.model_copy(update={"num_workers": cfg.data.num_workers})


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the inference model from a training checkpoint (``.pt``) or an exported
    ``model.safetensors`` (meta stored in its header): one network per member of the method's
    export record ``meta["export"]`` (:class:`~semivss.models.ensemble.ExportSpec`), combined as
    it says. Loads safely (no pickle execution)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"checkpoint {path} is a folder; give checkpoints/best.pt, last.pt or model.safetensors")
    if not path.exists():
        raise DataError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
            if "semivss_meta" not in header:
                raise DataError(f"{path}: not a semivss model file (no 'semivss_meta' in its header)")
            meta = json.loads(header["semivss_meta"])
            combined = load_file(str(path))  # the state dict of the combined module
        except (SafetensorError, json.JSONDecodeError, OSError) as exc:
            raise DataError(f"{path}: corrupt or truncated model file ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    else:
        ckpt = load_checkpoint(path)
        meta = ckpt.get("meta") or {}
        if "model" not in meta:
            raise DataError(f"{path}: checkpoint has no model meta; was it written by semivss train?")
    try:  # files written before meta["export"] carry meta["inference_model"] (see from_meta)
        spec = ExportSpec.from_meta(meta)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: invalid export record {meta.get('export')!r}: {exc}") from None
    if spec.arch is not None:  # a video model (Accel): its own architecture record
        nets = [ARCH_BUILDERS[spec.arch["kind"]](spec.arch, int(meta["num_classes"])) for _ in spec.members]
    else:
        model_cfg = ModelConfig(**{**meta["model"], "pretrained": None, "init_from": None})
        nets = [build_model(model_cfg, int(meta["num_classes"])) for _ in spec.members]
    if path.suffix == ".safetensors":
        model = build_inference_model(nets, spec.combine)
        model.load_state_dict(combined)
    else:
        missing = [n for n in spec.members if n not in ckpt["models"]]
        if missing:
            raise DataError(f"{path}: checkpoint has no model {missing[0]!r}")
        for net, name in zip(nets, spec.members):
            net.load_state_dict(ckpt["models"][name])
        model = build_inference_model(nets, spec.combine)
    model.to(device).eval()
    return model, meta


def eval_config_from(meta: dict, **overrides: Any) -> EvalConfig:
    """The evaluation settings the model was trained with, with command-line overrides."""
    base = dict(meta.get("eval") or {})
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return EvalConfig(**base)
    except Exception as exc:  # pydantic ValidationError -> user-facing error
        raise ConfigError(f"evaluation options: {exc}") from None


def labeled_offsets(videoset: VideoSet, rule: SplitConfig) -> dict[FrameRef, int]:
    """Signed position offset of every frame to the nearest labeled frame of its video under
    the label-ratio rule ``rule`` (Eq. (OFF-1), docs/methods.md#10-inner-video-overfitting)."""
    return splits.nearest_labeled_offset(build_split(rule, videoset), videoset)


def evaluate_split(
    model: nn.Module,
    videoset: VideoSet,
    cfg: EvalConfig,
    device: torch.device | str,
    offsets: dict[FrameRef, int] | None = None,
    save_dir: Path | None = None,
) -> EvalResult:
    """Evaluate a model on every annotated frame of a split."""
    return evaluate(model, videoset, videoset.annotated(), cfg, device, offsets=offsets, save_dir=save_dir)


def load_ensemble(
    paths: list[str | Path] | list[Path],
    device: torch.device | str = "cpu",
    weights: list[float] | None = None,
    **eval_overrides: Any,
) -> tuple[Any, list[dict]]:
    """Load checkpoints as one ``Predictor`` (docs/methods.md#8-test-time-augmentation-and-ensembles).

    Each member keeps its own evaluation settings (its checkpoint's ``eval`` section with
    ``eval_overrides`` such as ``scales``/``flip``/``mode``/``size``; ``None`` = keep); ``weights``
    (one per checkpoint) are normalised. All checkpoints must predict the same classes, in the same
    order; otherwise a ``ConfigError`` names the checkpoint. Returns ``(predictor, metas)``.
    """
    from semivss.inference.predict import Member, Predictor, normalise_weights

    if not paths:
        raise ConfigError("no checkpoint given")
    norm = normalise_weights(weights, len(paths))
    members, metas = [], []
    for path, weight in zip(paths, norm):
        model, meta = load_trained_model(path, device)
        if metas:
            first = metas[0]
            if int(meta["num_classes"]) != int(first["num_classes"]):
                raise ConfigError(
                    f"{path}: predicts {meta['num_classes']} classes, but {paths[0]} predicts "
                    f"{first['num_classes']}; ensemble members must share their classes"
                )
            if list(meta.get("classes", [])) != list(first.get("classes", [])):
                raise ConfigError(
                    f"{path}: classes {meta.get('classes')} differ from those of {paths[0]} "
                    f"({first.get('classes')}); ensemble members must share their classes"
                )
        cfg = eval_config_from(meta, **eval_overrides)
        members.append(Member(model, cfg, weight, str(path)))
        metas.append(meta)
    return Predictor(members), metas

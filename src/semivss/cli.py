"""Command line: ``semivss train | evaluate | predict | pseudo-label | data ...``."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from typer.core import TyperCommand  # noqa: E402

from semivss.errors import SemivssError, TrainingError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dataset tools.")
app.add_typer(data_app, name="data")
results_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Published results as data: records under results/ and their tables.")
app.add_typer(results_app, name="results")
console = Console()
err_console = Console(stderr=True)  # error and interruption lines go to stderr



def _format_name(value: str) -> str:
    """``--format`` values: a dataset format registered in :data:`semivss.registry.FORMATS`."""
    from semivss.registry import FORMATS

    if value not in FORMATS:
        raise typer.BadParameter(FORMATS.unknown(value, with_key=False))
    return value


class _FormatsCommand(TyperCommand):
    """A command with a ``--format`` option whose help lists the registered dataset formats.
    The names are read when the help is shown (the registry imports ``semivss.data``, so
    reading them at import would slow every ``semivss`` call down)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from semivss.registry import FORMATS

        for param in self.params:
            if "--format" in param.opts:
                param.metavar = "[" + "|".join(FORMATS.names()) + "]"
        super().format_help(ctx, formatter)


FORMAT_HELP = "Dataset format (docs/extending.md shows how to add one)."


def _size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """Parse ``HxW`` (e.g. ``240x320``); ``none`` means original resolution."""
    if text is None:
        return None
    if text.lower() in ("none", "orig", "original"):
        return None
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise typer.BadParameter(f"expected HxW such as 240x320, got {text!r}") from None


def _device(name: str):
    """``--device``: auto | cpu | cuda | cuda:N, checked against what this torch build has."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SemivssError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SemivssError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SemivssError(f"--device {name}: no CUDA device is available to this torch build "
                               f"({torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SemivssError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    """Parse a comma list of numbers (``0.5,0.75,1``) given to ``option``; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{option}: expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{option}: expected at least one number, got {text!r}")
    return values


def _load_predictor(
    checkpoint: Path,
    ensemble: list[Path],
    weights: Optional[str],
    scales: Optional[str],
    flip: Optional[bool],
    dev,
    **overrides,
):
    """The checkpoint (+ ``--ensemble`` members) as one Predictor with TTA; (predictor, metas)."""
    from semivss.experiment import load_ensemble

    paths = [checkpoint, *ensemble]
    return load_ensemble(
        paths, dev, weights=list(_floats(weights, "--weights") or []) or None,
        scales=_floats(scales, "--scales"), flip=flip, **overrides,
    )


def _describe(predictor) -> str:
    """One line per member: checkpoint, weight, scales, flip."""
    return "\n".join(
        f"  {m.name}: weight {m.weight:.3g}, {m.cfg.mode} at {m.cfg.size or 'original size'}, "
        f"scales {list(m.cfg.scales)}{', + flip' if m.cfg.flip else ''}"
        for m in predictor.members
    )


LABEL_MAP_HELP = "Read the labels through this lookup table (data.label_map; YAML/JSON/CSV)."
ENSEMBLE_HELP = "Another checkpoint averaged with CHECKPOINT (repeat the option for more)."
WEIGHTS_HELP = "Ensemble weights, one per checkpoint in order, comma-separated (normalised; default equal)."
SCALES_HELP = "Test-time scales of the model input size, comma-separated, e.g. 0.5,0.75,1,1.25 (default: as trained)."
FLIP_HELP = "Also average the horizontally flipped input (default: as trained)."
SMOOTH_HELP = ("Temporal smoothing of the class probabilities over each video's frames, "
               "q_t = (1 - m) p_t + m q_(t-1); 0 = off.")


KEYFRAME_HELP = ("Key-frame inference (docs/methods.md#14-accel): the reference network on every "
                 "K-th frame, its scores warped by optical flow in between (and fused with the update "
                 "branch of an Accel model). Default: an Accel model's own interval, per-frame otherwise.")
MAX_FLOW_HELP = "Adaptive key frames: also a key frame when the mean flow exceeds this many pixels."
MAX_INVALID_HELP = ("Adaptive key frames: also a key frame when this share of warped pixels comes from "
                    "outside the previous frame (0..1).")
FLOW_HELP = "Optical flow for key-frame inference: dis-ultrafast | dis-fast | dis-medium (default: the model's)."
PROPAGATION_HELP = ("Key-frame inference: chained (default, Accel: warp the carried scores frame to frame) | "
                    "composed (compose the flows since the key frame, warp its scores once).")
BIDIRECTIONAL_HELP = ("Key-frame inference, offline: also carry the next key frame's scores back to the frames "
                      "before it and average both sides by nearness (outputs lag by up to K - 1 frames).")
FUSE_FROM_AGE_HELP = ("Accel models: fuse the update branch only on frames N or more frames after their key frame; "
                      "younger frames take the carried reference scores alone (0: every frame, Accel).")
WARP_AT_HELP = ("Key-frame inference: score (default, Accel: warp on the reference's output grid) | input "
                "(upsample the key frame's scores to the input size, then warp; the fusion runs there too).")


@dataclass(frozen=True)
class KeyframeOptions:
    """The key-frame options of ``evaluate`` and ``predict`` (docs/methods.md#14-accel), by name;
    ``given()`` tells whether any was set on the command line."""

    interval: Optional[int] = None
    flow: Optional[str] = None
    max_flow: Optional[float] = None
    max_invalid: Optional[float] = None
    propagation: Optional[str] = None
    warp_at: Optional[str] = None
    bidirectional: bool = False
    fuse_from_age: int = 0

    def given(self) -> bool:
        return any(v is not None for v in (self.interval, self.flow, self.max_flow, self.max_invalid,
                                            self.propagation, self.warp_at)) or self.bidirectional \
            or self.fuse_from_age > 0


def _video_predictor(predictor: Any, num_classes: int, smooth: float, kf: KeyframeOptions) -> Any:
    """The predictor stepped through each video: an Accel model (or, with ``--keyframe-interval``,
    a per-frame model) as a key-frame predictor, then optionally smoothed (``--smooth``)."""
    from semivss.inference.video_predictor import TemporalSmoothing

    model = predictor.members[0].model
    if hasattr(model, "as_video_predictor") or kf.given():
        if len(predictor.members) > 1:
            raise SemivssError("key-frame inference takes one model, not an --ensemble")
        from semivss.inference.keyframes import KeyframePredictor
        from semivss.models.accel import AccelNet
        from semivss.models.flow import build_flow

        if kf.fuse_from_age and (not isinstance(model, AccelNet) or model.update is None):
            raise SemivssError("--fuse-from-age needs an Accel model with an update branch")
        if not isinstance(model, AccelNet):  # a per-frame model: flow propagation of its scores
            if kf.interval is None:
                raise SemivssError("--flow, --propagation, --warp-at, --bidirectional and --keyframe-max-* apply "
                                   "to key-frame inference: give --keyframe-interval K for a per-frame model")
            model = AccelNet(model, None, num_classes, keyframe_interval=kf.interval)
        predictor = KeyframePredictor(
            model, predictor.members[0].cfg, build_flow(kf.flow or model.flow),
            kf.interval or model.keyframe_interval, max_flow=kf.max_flow, max_invalid=kf.max_invalid,
            propagation=kf.propagation or "chained", warp_at=kf.warp_at or "score",
            bidirectional=kf.bidirectional, fuse_from_age=kf.fuse_from_age,
        )
    if not smooth:
        return predictor
    return TemporalSmoothing(predictor, smooth)


def _label_rule(label_every: Optional[int], label_position: Optional[int], meta: dict, ckpt: Path) -> Any:
    """The labeled-frame rule: --label-every k / --label-position p, else the rule the checkpoint
    was trained with (its ``data.split``)."""
    from pydantic import ValidationError

    from semivss.data.config import SplitConfig

    if label_every is not None and label_position is not None:
        raise SemivssError("give --label-every or --label-position, not both")
    try:
        if label_every is not None:
            return SplitConfig(mode="every_kth", k=label_every)
        if label_position is not None:
            return SplitConfig(mode="single", position=label_position)
    except ValidationError as exc:
        opt = "--label-every" if label_every is not None else "--label-position"
        raise SemivssError(f"{opt}: {exc.errors()[0]['msg']}") from None
    trained = ((meta.get("experiment") or {}).get("data") or {}).get("split")
    if trained is None:
        raise SemivssError(f"{ckpt} does not record its label-ratio rule; give --label-every or --label-position")
    return SplitConfig(**trained)


def _load_set(fmt: str, data: Path, split: str, label_map: Optional[Path], meta: dict, ckpt: Path) -> Any:
    """The video set to score or label, read through ``label_map`` (the lookup table of
    ``data.label_map``); its classes must match the checkpoint's."""
    from semivss.data import formats
    from semivss.data.remap import LabelMap

    videoset = formats.load_dataset(fmt, data, split, key="--format")
    if label_map is not None:
        videoset = LabelMap.from_file(label_map).remap_videoset(videoset)
    if videoset.num_classes != int(meta["num_classes"]):
        trained_map = ((meta.get("experiment") or {}).get("data") or {}).get("label_map")
        hint = f"; it was trained through --label-map {trained_map}" if trained_map and label_map is None else ""
        raise SemivssError(
            f"{ckpt} predicts {meta['num_classes']} classes, but {data} ({fmt}, {split}) has "
            f"{videoset.num_classes}{hint}"
        )
    return videoset


@contextlib.contextmanager
def _writing_into(folder: Path) -> Iterator[None]:
    """OS errors without a file name (a full disk under a library's own writer: TensorBoard, csv)
    name the output folder the command was writing into."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and not exc.filename:
            exc.filename = str(folder)
        raise


@app.command()
def train(
    config: Path = typer.Argument(..., help="Experiment YAML (see configs/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set schedule.iters=200"),
    resume: bool = typer.Option(False, help="Continue from OUT_DIR/checkpoints/last.pt."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Override out_dir."),
) -> None:
    """Train the method named in CONFIG (launch with torchrun for DDP)."""
    from semivss.config import load_config
    from semivss.experiment import train as run_train

    overrides = list(set_) + ([f"out_dir={out_dir}"] if out_dir else [])
    cfg = load_config(config, overrides)
    from semivss.engine.dist import is_main

    with _writing_into(Path(cfg.out_dir)):
        metrics = run_train(cfg, resume=resume)
    if metrics and is_main():
        console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


@app.command("evaluate", cls=_FormatsCommand)
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoints/best.pt, last.pt or model.safetensors"),
    data: Path = typer.Option(..., "--data", help="Dataset root folder."),
    fmt: str = typer.Option("camvid", "--format", help=FORMAT_HELP, parser=_format_name),
    split: str = typer.Option("val", help="Split to evaluate (a folder name for CamVid)."),
    mode: Optional[str] = typer.Option(None, help="whole | slide (default: as trained)."),
    size: Optional[str] = typer.Option(None, help="Resize frames to HxW before the model; 'none' = original."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: next to the checkpoint)."),
    offsets: bool = typer.Option(False, "--offsets", help="Inner-video offset analysis (docs/methods.md#10-inner-video-overfitting)."),
    train_split: str = typer.Option("train", help="Training split for the offset analysis."),
    label_every: Optional[int] = typer.Option(None, help="Offset analysis: labeled positions p % k == k // 2 "
                                               "(default: the rule the model was trained with)."),
    label_position: Optional[int] = typer.Option(None, help="Offset analysis: one labeled frame per video at this position."),
    save_preds: bool = typer.Option(False, help="Write prediction PNGs (values 0..C-1) for every frame."),
    save_stills: int = typer.Option(0, "--save-stills", min=0, help="Write N stills (image | ground truth | "
                                    "prediction | errors) of frames spread over the split into OUT/stills "
                                    "(shown by `semivss report`)."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help=LABEL_MAP_HELP),
    ensemble: list[Path] = typer.Option([], "--ensemble", help=ENSEMBLE_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    scales: Optional[str] = typer.Option(None, help=SCALES_HELP),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help=FLIP_HELP),
    smooth: float = typer.Option(0.0, "--smooth", help=SMOOTH_HELP),
    keyframe_interval: Optional[int] = typer.Option(None, "--keyframe-interval", help=KEYFRAME_HELP),
    keyframe_max_flow: Optional[float] = typer.Option(None, "--keyframe-max-flow", help=MAX_FLOW_HELP),
    keyframe_max_invalid: Optional[float] = typer.Option(None, "--keyframe-max-invalid", help=MAX_INVALID_HELP),
    flow: Optional[str] = typer.Option(None, "--flow", help=FLOW_HELP),
    propagation: Optional[str] = typer.Option(None, "--propagation", help=PROPAGATION_HELP),
    warp_at: Optional[str] = typer.Option(None, "--warp-at", help=WARP_AT_HELP),
    bidirectional: bool = typer.Option(False, "--bidirectional", help=BIDIRECTIONAL_HELP),
    fuse_from_age: int = typer.Option(0, "--fuse-from-age", min=0, help=FUSE_FROM_AGE_HELP),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Allow writing into a non-empty output folder."),
) -> None:
    """Score a trained model or an ensemble: mIoU, per-class IoU, fwIoU, pixel accuracy, VC8/VC16 (+ offsets)."""
    from semivss.experiment import labeled_offsets
    from semivss.inference.evaluate import evaluate

    kf = KeyframeOptions(interval=keyframe_interval, flow=flow, max_flow=keyframe_max_flow,
                         max_invalid=keyframe_max_invalid, propagation=propagation, warp_at=warp_at,
                         bidirectional=bidirectional, fuse_from_age=fuse_from_age)
    dev = _device(device)
    predictor, metas = _load_predictor(checkpoint, ensemble, weights, scales, flip, dev, mode=mode,
                                       **({"size": _size(size)} if size is not None else {}))
    ecfg = predictor.members[0].cfg
    videoset = _load_set(fmt, data, split, label_map, metas[0], checkpoint)
    if len(predictor.members) > 1 or predictor.members[0].cfg.scales != (1.0,) or predictor.members[0].cfg.flip:
        console.print("inference:\n" + _describe(predictor))
    from semivss.inference.writers import staged_dir

    final = out or checkpoint.parent.parent / f"eval-{split}"
    rule = _label_rule(label_every, label_position, metas[0], checkpoint) if offsets else None
    if rule is not None:
        console.print(f"offsets from the labeled frames of rule {rule.model_dump(mode='json')}")
    # Everything is written into a temporary sibling folder that replaces `final` at the end.
    with _writing_into(final), staged_dir(final, overwrite) as stage:
        # The evaluated split is scored once; its per-frame results also feed the offset analysis.
        eval_offsets = labeled_offsets(videoset, rule) if rule else None
        video_predictor = _video_predictor(predictor, int(metas[0]["num_classes"]), smooth, kf)
        result = evaluate(
            video_predictor, videoset, videoset.annotated(), ecfg, dev, offsets=eval_offsets,
            save_dir=stage / "preds" if save_preds else None,
            stills=save_stills, stills_dir=stage / "stills",
        )
        console.print(result.table(title=f"{checkpoint.name} on {data.name} ({split} split)"))
        from semivss.inference.video_predictor import video_settings
        from semivss.results import git_commit

        result.to_json(stage / "metrics.json", context={
            "checkpoint": str(checkpoint), "ensemble": [str(e) for e in ensemble] or None, "weights": weights,
            "data": str(data), "format": fmt, "split": split, "label_map": str(label_map) if label_map else None,
            "inference": {"scales": list(ecfg.scales), "flip": ecfg.flip, "size": ecfg.size, "mode": ecfg.mode},
            "video": video_settings(video_predictor), "commit": git_commit(Path.cwd())})
        if rule is not None:
            from semivss.metrics.offset import offset_table_text, plot_offsets, save_offset_tables

            train_set = _load_set(fmt, data, train_split, label_map, metas[0], checkpoint)
            train_res = evaluate(video_predictor, train_set, train_set.annotated(), ecfg, dev,
                                 offsets=labeled_offsets(train_set, rule))
            tables = {f"train videos ({train_split})": train_res.offsets, f"held-out videos ({split})": result.offsets}
            typer.echo(offset_table_text(tables))
            save_offset_tables(tables, stage / "offsets.json")
            plot_offsets(tables, stage / "offsets.png", title=f"mIoU by offset from the labeled frame ({checkpoint.name})")
    console.print(f"metrics -> {final / 'metrics.json'}")
    if rule is not None:
        console.print(f"offset analysis -> {final / 'offsets.json'}, {final / 'offsets.png'}")


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="checkpoints/best.pt, last.pt or model.safetensors"),
    source: Path = typer.Argument(..., help="A folder of frames or an mp4 file."),
    out: Path = typer.Argument(..., help="Output folder: labels/, overlays/, overlay.mp4"),
    mode: Optional[str] = typer.Option(None, help="whole | slide (default: as trained)."),
    size: Optional[str] = typer.Option(None, help="Resize frames to HxW before the model; 'none' = original."),
    fps: Optional[float] = typer.Option(None, help="Frame rate of overlay.mp4 (default: the source's, or 10)."),
    ensemble: list[Path] = typer.Option([], "--ensemble", help=ENSEMBLE_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    scales: Optional[str] = typer.Option(None, help=SCALES_HELP),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help=FLIP_HELP),
    smooth: float = typer.Option(0.0, "--smooth", help=SMOOTH_HELP),
    keyframe_interval: Optional[int] = typer.Option(None, "--keyframe-interval", help=KEYFRAME_HELP),
    keyframe_max_flow: Optional[float] = typer.Option(None, "--keyframe-max-flow", help=MAX_FLOW_HELP),
    keyframe_max_invalid: Optional[float] = typer.Option(None, "--keyframe-max-invalid", help=MAX_INVALID_HELP),
    flow: Optional[str] = typer.Option(None, "--flow", help=FLOW_HELP),
    propagation: Optional[str] = typer.Option(None, "--propagation", help=PROPAGATION_HELP),
    warp_at: Optional[str] = typer.Option(None, "--warp-at", help=WARP_AT_HELP),
    bidirectional: bool = typer.Option(False, "--bidirectional", help=BIDIRECTIONAL_HELP),
    fuse_from_age: int = typer.Option(0, "--fuse-from-age", min=0, help=FUSE_FROM_AGE_HELP),
    out_format: str = typer.Option("overlay", "--format",
                                   help="overlay: label PNGs, overlays, mp4 of one video | vspw-submission: SOURCE "
                                        "is a VSPW root, every frame of --split as <video>/<frame>.png class ids 0..123"),
    split: str = typer.Option("test", help="With --format vspw-submission: the split to predict."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Allow replacing files in OUT."),
) -> None:
    """Segment a video (folder of frames or mp4): palette label PNGs, overlays and an H.264 mp4;
    or a whole VSPW split in the submission layout."""
    import numpy as np

    from semivss.inference.video import predict_source
    from semivss.inference.writers import staged_dir

    if out_format not in ("overlay", "vspw-submission"):
        raise SemivssError(f"--format must be overlay or vspw-submission, got {out_format!r}")
    kf = KeyframeOptions(interval=keyframe_interval, flow=flow, max_flow=keyframe_max_flow,
                         max_invalid=keyframe_max_invalid, propagation=propagation, warp_at=warp_at,
                         bidirectional=bidirectional, fuse_from_age=fuse_from_age)
    dev = _device(device)
    predictor, metas = _load_predictor(checkpoint, ensemble, weights, scales, flip, dev, mode=mode,
                                       **({"size": _size(size)} if size is not None else {}))
    ecfg = predictor.members[0].cfg
    if out_format == "vspw-submission":
        from semivss.inference.score import write_submission

        videoset = _load_set("vspw", source, split, None, metas[0], checkpoint)
        vp = _video_predictor(predictor, int(metas[0]["num_classes"]), smooth, kf)
        with _writing_into(out), staged_dir(out, overwrite) as stage:
            n = write_submission(vp, videoset, stage, ecfg, dev)
        console.print(f"{n} frames of {len(videoset.videos)} videos -> {out}/<video>/<frame>.png")
        return
    palette = np.asarray(metas[0]["palette"], dtype=np.uint8)
    video_predictor = _video_predictor(predictor, int(metas[0]["num_classes"]), smooth, kf)
    # Written into a temporary sibling folder that replaces OUT only when every frame succeeded.
    with _writing_into(out), staged_dir(out, overwrite) as stage:
        summary = predict_source(video_predictor, source, stage, palette, ecfg, dev, fps=fps, overwrite=True)
    summary = {k: (str(out / Path(v).relative_to(stage)) if isinstance(v, str) and v.startswith(str(stage)) else v)
               for k, v in summary.items()}
    console.print(summary)


@app.command("score", cls=_FormatsCommand)
def score_cmd(
    pred_dir: Path = typer.Argument(..., help="Prediction PNGs: <video>/<frame stem>.png or <video>/<index:08d>.png"),
    data: Path = typer.Option(..., "--data", help="Dataset root folder (the ground truth)."),
    fmt: str = typer.Option("camvid", "--format", help=FORMAT_HELP, parser=_format_name),
    split: str = typer.Option("val", help="Split whose annotated frames are scored."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help=LABEL_MAP_HELP),
    out: Optional[Path] = typer.Option(None, help="Write the metrics as JSON here."),
    overwrite: bool = typer.Option(False, help="Allow replacing an existing --out file."),
) -> None:
    """Score a folder of prediction PNGs without a model: mIoU, per-class IoU, fwIoU, VC8, VC16."""
    from semivss.data import formats
    from semivss.data.remap import LabelMap
    from semivss.inference.score import score_predictions
    from semivss.inference.writers import check_new_output

    videoset = formats.load_dataset(fmt, data, split, key="--format")
    if label_map is not None:
        videoset = LabelMap.from_file(label_map).remap_videoset(videoset)
    if out is not None:
        check_new_output(out, overwrite)
    result = score_predictions(pred_dir, videoset)
    console.print(result.table(title=f"{pred_dir} on {data.name} ({split} split)"))
    if out is not None:
        result.to_json(out, context={"predictions": str(pred_dir), "data": str(data), "format": fmt, "split": split,
                                     "label_map": str(label_map) if label_map else None})
        console.print(f"metrics -> {out}")


@app.command("pseudo-label", cls=_FormatsCommand)
def pseudo_label_cmd(
    checkpoint: Path = typer.Argument(..., help="Teacher: checkpoints/best.pt, last.pt or model.safetensors"),
    data: Path = typer.Option(..., "--data", help="Dataset root folder."),
    out: Path = typer.Option(..., "--out", help="Pseudo-label set folder: manifest.json, labels/, entropy/"),
    fmt: str = typer.Option("camvid", "--format", help=FORMAT_HELP, parser=_format_name),
    split: str = typer.Option("train", help="Split whose unlabeled frames are labelled."),
    label_every: Optional[int] = typer.Option(None, help="Labeled frames: positions p % k == k // 2 (camvid-ssvs 1/k)."),
    label_position: Optional[int] = typer.Option(None, help="Labeled frames: one per video at this position."),
    all_frames: bool = typer.Option(False, "--all-frames", help="Label every frame of the split, labeled ones too."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help=LABEL_MAP_HELP),
    ensemble: list[Path] = typer.Option([], "--ensemble", help=ENSEMBLE_HELP),
    weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP),
    scales: Optional[str] = typer.Option(None, help=SCALES_HELP + " PVUW 2024: 0.571,0.714,0.857,1,1.143,1.286,1.429,1.571 --flip."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help=FLIP_HELP),
    mode: Optional[str] = typer.Option(None, help="whole | slide (default: as trained)."),
    size: Optional[str] = typer.Option(None, help="Model input size HxW at scale 1; 'none' = original."),
    batch_size: Optional[int] = typer.Option(None, help="Frames per forward pass (default: as trained)."),
    workers: int = typer.Option(0, help="Frame-reading worker processes."),
    resume: bool = typer.Option(False, help="Continue an interrupted set: frames whose label PNG exists are skipped."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty OUT, replacing its files."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)"),
) -> None:
    """Pseudo-label the unlabeled frames of a split with a teacher ensemble + TTA (docs/methods.md#71-pseudo-label-sets).

    Labeled frames follow the label-ratio rule (--label-every / --label-position; default: the rule
    the first checkpoint was trained with). Writes argmax label PNGs and uint8 entropy maps at each
    frame's resolution. Launch with torchrun to shard the frames over processes.
    """
    from semivss.data.config import SplitConfig, build_split
    from semivss.engine import dist
    from semivss.inference.pseudo_label import make_manifest, pseudo_label

    if sum([label_every is not None, label_position is not None, all_frames]) > 1:
        raise SemivssError("give at most one of --label-every, --label-position and --all-frames")
    if resume and overwrite:
        raise SemivssError("give --resume or --overwrite, not both")
    dist.init_distributed()
    try:
        dev = dist.pick_device(device)
        overrides = {"mode": mode, "batch_size": batch_size, **({"size": _size(size)} if size is not None else {})}
        predictor, metas = _load_predictor(checkpoint, ensemble, weights, scales, flip, dev, **overrides)
        videoset = _load_set(fmt, data, split, label_map, metas[0], checkpoint)
        if all_frames:
            frames, rule_dump = videoset.frames(), "all frames"
        else:
            rule = _label_rule(label_every, label_position, metas[0], checkpoint)
            frames, rule_dump = build_split(rule, videoset).unlabeled, rule.model_dump(mode="json")
        if not frames:
            raise SemivssError(f"{data} ({split}): no unlabeled frames under {rule_dump}")
        first = predictor.members[0].cfg

        from semivss.results import file_sha256

        def settings(cfg) -> dict:  # what shapes the outputs (not batch_size / vc)
            return cfg.model_dump(mode="json", exclude={"batch_size", "vc"})

        manifest = make_manifest(
            dataset={"format": fmt, "root": str(data.resolve()), "split": split, "labeled": rule_dump},
            classes=[str(c) for c in metas[0]["classes"]],
            # the content hash tells a replaced checkpoint file from the one the set was made with
            models=[{"path": str(Path(m.name).resolve()), "sha256": file_sha256(Path(m.name)), "weight": m.weight,
                     "eval": settings(m.cfg)} for m in predictor.members],
            scales=first.scales, flip=first.flip, eval_cfg=settings(first), frames=frames,
        )
        if dist.is_main():
            console.print(f"pseudo-labelling {len(frames)} frames of {data} ({split}) with:\n" + _describe(predictor))
        with _writing_into(out):
            counts = pseudo_label(
                predictor, videoset, frames, out, videoset.num_classes, manifest, resume=resume,
                overwrite=overwrite, device=dev, batch_size=first.batch_size, num_workers=workers,
            )
        if dist.is_main():
            console.print(counts)
            console.print(f"pseudo-labels -> {out}")
    finally:
        dist.cleanup()


@app.command("pseudo-label-quality", cls=_FormatsCommand)
def pseudo_label_quality_cmd(
    set_dir: Path = typer.Argument(..., help="Pseudo-label set written by `semivss pseudo-label`."),
    data: Path = typer.Option(..., help="Dataset root holding ground truth for (some of) the set's frames."),
    fmt: str = typer.Option("camvid", "--format", help=FORMAT_HELP, parser=_format_name),
    split: str = typer.Option("train", help="Split the set was written from."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help=LABEL_MAP_HELP),
    gamma: Optional[float] = typer.Option(None, help="Reliable iff entropy < gamma nats (default 0.5 ln C)."),
    keep: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Instead of gamma: reliable = this share "
                                         "of each frame's pixels with the lowest entropy (method.reliable "
                                         "mode percentile)."),
    classwise: bool = typer.Option(False, "--classwise", help="With --keep: that share of each pseudo-labeled "
                                   "class separately (Eq. CR-3)."),
    out: Optional[Path] = typer.Option(None, help="Also write the figures to this JSON file (never overwritten)."),
) -> None:
    """Score a pseudo-label set against ground truth the training did not use (e.g. the hidden labels
    of a 1/k split): mIoU over all pseudo-labeled pixels and over the reliable ones, and the reliable
    share of the annotated pixels."""
    import json

    from rich.table import Table

    from semivss.data import formats
    from semivss.data.remap import LabelMap
    from semivss.engine.checkpoint import atomic_write
    from semivss.inference.pseudo_label import pseudo_label_quality

    if out is not None and out.exists():
        raise SemivssError(f"{out} exists; choose another --out (results are never overwritten)")
    videoset = formats.load_dataset(fmt, data, split, key="--format")
    if label_map is not None:
        videoset = LabelMap.from_file(label_map).remap_videoset(videoset)
    rule = None
    if keep is not None or classwise:
        from semivss.methods.self_training import ReliableConfig

        if keep is None or gamma is not None:
            raise SemivssError("--classwise needs --keep, and --keep replaces --gamma")
        rule = ReliableConfig(mode="percentile", keep=keep, classwise=classwise)
    q = pseudo_label_quality(set_dir, videoset, gamma, reliable_cfg=rule)
    table = Table(title=f"{set_dir}: {q['frames']} frames with ground truth")
    for col in ("pixels", "mIoU", "pixel acc", "mAcc"):
        table.add_column(col, justify="right" if col != "pixels" else "left")
    from semivss.results import reliable_rule_text

    for name, label in (("all", "all"), ("reliable", f"reliable ({reliable_rule_text(q)})")):
        m = q[name]
        table.add_row(label, *(f"{100 * m[k]:.2f}" for k in ("mIoU", "pixel_acc", "mAcc")))
    console.print(table)
    per_class = Table(title="IoU per class (%)")
    for col in ("class", "all", "reliable"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for name, a, b in zip(videoset.classes, q["all"]["iou"], q["reliable"]["iou"]):
        per_class.add_row(name, f"{100 * a:.2f}", f"{100 * b:.2f}")
    console.print(per_class)
    console.print(f"reliable share of annotated pixels: {100 * q['reliable_share']:.2f} %")
    if out is not None:
        from semivss.results import git_commit

        record = {"set": str(set_dir), "data": str(data), "format": fmt, "split": split,
                  "label_map": str(label_map) if label_map else None,
                  "class_names": list(videoset.classes), "commit": git_commit(Path.cwd()), **q}
        atomic_write(out, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        console.print(f"figures -> {out}")


@app.command("compare-offsets")
def compare_offsets(
    tables: list[Path] = typer.Argument(..., help="offsets.json files written by `evaluate --offsets`."),
    name: list[str] = typer.Option([], "--name", help="Model name of each table, in order (default: its run folder)."),
    out: Path = typer.Option(..., help="Output PNG; the merged table is written beside it as .json/.csv."),
    overwrite: bool = typer.Option(False, help="Allow replacing existing files."),
) -> None:
    """Put the offset analyses of several models (e.g. supervised vs IFR) in one table and plot."""
    from dataclasses import replace

    from semivss.metrics.offset import OffsetTable, merge_tables, plot_offsets, save_offset_tables

    if name and len(name) != len(tables):
        raise SemivssError(f"--name given {len(name)} times for {len(tables)} tables")
    outputs = [out, out.with_suffix(".json"), out.with_suffix(".csv")]
    clobbered = [str(p) for p in outputs if p.exists()]
    if clobbered and not overwrite:
        raise SemivssError(f"{', '.join(clobbered)} exist; pass --overwrite or choose another --out")
    named = []
    for i, path in enumerate(tables):
        label = name[i] if name else path.resolve().parent.parent.name
        table = OffsetTable.from_json(path)
        named.append(OffsetTable([replace(r, model=label) for r in table.rows]))
    merged = merge_tables(named)
    typer.echo(merged.text())
    save_offset_tables(merged, out.with_suffix(".json"))
    plot_offsets(merged, out, title="mIoU by offset from the labeled frame")
    console.print(f"comparison -> {out}, {out.with_suffix('.json')}, {out.with_suffix('.csv')}")


@app.command("compare")
def compare_cmd(
    results: list[Path] = typer.Argument(..., help="metrics.json files of `semivss evaluate` (or their folders)."),
    name: list[str] = typer.Option([], "--name", help="Row name of each result, in order (default: its run folder)."),
    baseline: Optional[str] = typer.Option(None, help="Row whose training time per iteration is 1.00x (default: first timed row)."),
    per_class: bool = typer.Option(False, "--per-class", help="Add a class x model IoU table."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Read the training time of <run>/metrics.csv."),
    out: Optional[Path] = typer.Option(None, help="Also write the markdown to this file (never overwritten)."),
) -> None:
    """One markdown table of several evaluated models: mIoU, VC_n and, for evaluations inside a
    training run (<run>/eval-*/metrics.json), the run's median s/it relative to the baseline."""
    from semivss.engine.checkpoint import atomic_write
    from semivss.metrics.report import comparison_markdown, load_summary

    if name and len(name) != len(results):
        raise SemivssError(f"--name given {len(name)} times for {len(results)} results")
    if out is not None and out.exists():
        raise SemivssError(f"{out} exists; choose another --out (results are never overwritten)")
    rows = [load_summary(path, name[i] if name else None, speed) for i, path in enumerate(results)]
    text = comparison_markdown(rows, baseline=baseline, per_class=per_class)
    typer.echo(text)
    if out is not None:
        atomic_write(out, lambda f: f.write((text + "\n").encode()))
        console.print(f"table -> {out}")


@app.command("report")
def report_cmd(
    sources: list[Path] = typer.Argument(..., metavar="RUN_OR_EVAL",
                                         help="Training run folders (config.yaml, metrics.csv, eval-*/) "
                                         "or evaluation folders (metrics.json); the first is the baseline."),
    out: Path = typer.Option(..., "--out", help="HTML file to write (one self-contained file)."),
    name: list[str] = typer.Option([], "--name", help="Name of each run, in order (default: its run folder)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
) -> None:
    """One self-contained HTML report: metrics, per-class IoU, training and offset curves,
    confusion matrix, stills and config of one run, or of several runs side by side."""
    from semivss.report import write_report

    path = write_report(sources, out, names=name or None, overwrite=overwrite,
                        log=lambda msg: typer.echo(msg, err=True))
    console.print(f"report -> {path}")


@results_app.command("add")
def results_add(
    run: Path = typer.Argument(..., help="A finished training run (config.yaml, metrics.csv)."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Its evaluation folder (default RUN/eval-val)."),
    name: Optional[str] = typer.Option(None, help="Row name (default: the run folder's name)."),
    protocol: Optional[str] = typer.Option(None, help="Benchmark protocol the row belongs to."),
    notes: Optional[str] = typer.Option(None, help="A remark stored with the record."),
    out: Path = typer.Option(..., help="Record file to write (results/<protocol>/<row>.json)."),
    overwrite: bool = typer.Option(False, help="Replace an existing record."),
) -> None:
    """Write the result record of an evaluated run (metrics, per-class IoU, s/it, config, commit, machine)."""
    from semivss.results import make_record, write_record

    path = write_record(make_record(run, eval_dir, name, protocol, notes), out, overwrite=overwrite)
    console.print(f"record -> {path}")


@results_app.command("table")
def results_table(
    records: list[Path] = typer.Argument(..., help="Record files or folders of them."),
    baseline: Optional[str] = typer.Option(None, help="Row the differences and time ratios refer to."),
    per_class: bool = typer.Option(True, "--per-class/--no-per-class", help="Add the per-class IoU table."),
) -> None:
    """Print the markdown table of result records (the tables of README.md and docs/results.md)."""
    from semivss.results import load_records, results_markdown

    typer.echo(results_markdown(load_records(list(records)), baseline=baseline, per_class=per_class))


@results_app.command("update")
def results_update(
    files: list[Path] = typer.Argument(..., help="Markdown files with <!-- results: ARGS --> blocks."),
    check: bool = typer.Option(False, "--check", help="Only report files whose tables are out of date (exit 2)."),
) -> None:
    """Regenerate the results tables of markdown files (README.md, docs/results.md) from the records."""
    from semivss.engine.checkpoint import atomic_write
    from semivss.results import update_tables

    stale = []
    for path in files:
        old = path.read_text()
        new = update_tables(old)
        if new != old:
            stale.append(str(path))
            if not check:
                atomic_write(path, lambda f, new=new: f.write(new.encode()))
    if check and stale:
        raise SemivssError(f"results tables out of date in {', '.join(stale)}; run `semivss results update`")
    console.print(f"{'out of date' if stale else 'up to date'}: {', '.join(stale) or ', '.join(map(str, files))}"
                  + (" (rewritten)" if stale and not check else ""))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Output folder (folder format)."),
    videos: int = typer.Option(20, help="Number of videos."),
    frames: int = typer.Option(30, help="Frames per video."),
    height: int = typer.Option(128),
    width: int = typer.Option(256),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Allow writing into a non-empty folder."),
) -> None:
    """Generate the embedded synthetic video set (docs/protocols.md#1-benchmark-synthetic), deterministic by seed."""
    import time

    from semivss.data.synthetic import generate_synthetic

    t0 = time.perf_counter()
    path = generate_synthetic(out, videos=videos, frames=frames, height=height, width=width, seed=seed, overwrite=overwrite)
    console.print(f"wrote {videos} videos x {frames} frames ({height}x{width}) to {path} in {time.perf_counter() - t0:.1f} s")


@data_app.command("info", cls=_FormatsCommand)
def data_info(
    root: Path = typer.Argument(..., help="Dataset root."),
    fmt: str = typer.Option("camvid", "--format", help=FORMAT_HELP, parser=_format_name),
    split: str = typer.Option("train"),
    label_every: Optional[int] = typer.Option(None, help="Show the 1/k label-ratio split."),
) -> None:
    """Print the videos, frame and label counts of a split (and a label-ratio split)."""
    from rich.table import Table

    from semivss.data import formats, splits

    vs = formats.load_dataset(fmt, root, split, key="--format")
    lab = set(splits.every_kth(vs, label_every).labeled) if label_every else set()
    table = Table(title=f"{root} ({split} split): {vs.num_classes} classes")
    for col in ("video", "frames", "annotated", "labeled (1/k)"):
        table.add_column(col)
    ann = set(vs.annotated())
    for video in vs.videos:
        refs = [f for f in vs.frames() if f.video == video.name]
        table.add_row(video.name, str(len(refs)), str(sum(r in ann for r in refs)), str(sum(r in lab for r in refs)))
    console.print(table)


def _version(value: bool) -> None:
    if value:
        from semivss import __version__

        typer.echo(f"semivss {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of every error."),
) -> None:
    """semivss: semi-supervised video semantic segmentation (train, evaluate, predict, ...)."""
    if debug:
        os.environ["SEMIVSS_DEBUG"] = "1"


def error_line(exc: BaseException) -> str:
    """One line for an anticipated failure: the message of a ``semivss`` error (also when a
    DataLoader worker re-raised it with its traceback inside), an OS error with its file."""
    import errno

    if isinstance(exc, OSError) and not isinstance(exc, FileExistsError) and exc.errno is not None:
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return (f"no space left writing{where} ({exc.strerror}): free some space or raise the limit, "
                    "then run the command again")
        return f"{exc.strerror or exc}:{where}".rstrip(":")
    text = str(exc)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker process
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.replace(".", "").replace("_", "").isalnum() else last
    text = " ".join(text.split())
    return text or type(exc).__name__


def _anticipated(exc: BaseException) -> bool:
    """User input, environment and resource failures (not bugs): shown as one line, exit 2."""
    from pydantic import ValidationError

    if isinstance(exc, (SemivssError, TrainingError, FileExistsError, ValidationError)):
        return True
    if isinstance(exc, OSError):  # disk full, permissions, a file where a folder is expected, ...
        return exc.errno is not None
    if "Original Traceback" in str(exc) and "semivss.errors." in str(exc):
        return True  # a semivss error raised inside a DataLoader worker
    return False


def main() -> None:
    """Entry point: anticipated failures become one red line ``error: ...`` and exit code 2;
    Ctrl-C exits 130; a bug keeps its traceback (``--debug`` or SEMIVSS_DEBUG=1 shows it always)."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the single error boundary
        from semivss.errors import TrainingInterrupted

        if os.environ.get("SEMIVSS_DEBUG") or not _anticipated(exc):
            raise
        if isinstance(exc, TrainingInterrupted):
            err_console.print(f"[bold yellow]stopped:[/] {error_line(exc)}", soft_wrap=True)
            sys.exit(130)
        err_console.print(f"[bold red]error:[/] {error_line(exc)}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

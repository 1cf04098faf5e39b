"""Command line: ``semivss train | evaluate | predict | data ...``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from semivss.errors import SemivssError, TrainingError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dataset tools.")
app.add_typer(data_app, name="data")
console = Console()

FORMATS = "camvid | folder | synthetic | cityscapes | vspw"


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
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fresh_dir(path: Path, overwrite: bool) -> Path:
    """Create an output folder; refuse to reuse a non-empty one unless ``overwrite``."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise SemivssError(f"output folder {path} exists and is not empty; pass --overwrite or choose another")
    path.mkdir(parents=True, exist_ok=True)
    return path


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

    metrics = run_train(cfg, resume=resume)
    if metrics and is_main():
        console.print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoints/best.pt, last.pt or model.safetensors"),
    data: Path = typer.Option(..., "--data", help="Dataset root folder."),
    fmt: str = typer.Option("camvid", "--format", help=FORMATS),
    split: str = typer.Option("val", help="Split to evaluate (a folder name for CamVid)."),
    mode: Optional[str] = typer.Option(None, help="whole | slide (default: as trained)."),
    size: Optional[str] = typer.Option(None, help="Resize frames to HxW before the model; 'none' = original."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: next to the checkpoint)."),
    offsets: bool = typer.Option(False, "--offsets", help="Inner-video offset analysis (SPEC section 1)."),
    train_split: str = typer.Option("train", help="Training split for the offset analysis."),
    label_every: int = typer.Option(8, help="Offset analysis: labeled positions p % k == k // 2."),
    label_position: Optional[int] = typer.Option(None, help="Offset analysis: one labeled frame per video at this position."),
    save_preds: bool = typer.Option(False, help="Write prediction PNGs (values 0..C-1) for every frame."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Allow writing into a non-empty output folder."),
) -> None:
    """Score a trained model: mIoU, per-class IoU, fwIoU, pixel accuracy, VC8/VC16 (+ offsets)."""
    from semivss.data.config import SplitConfig
    from semivss.experiment import eval_config_from, evaluate_split, labeled_offsets, load_trained_model
    from semivss.data import formats
    dev = _device(device)
    model, meta = load_trained_model(checkpoint, dev)
    ecfg = eval_config_from(meta, mode=mode, **({"size": _size(size)} if size is not None else {}))
    videoset = formats.load_dataset(fmt, data, split)
    out = _fresh_dir(out or checkpoint.parent.parent / f"eval-{split}", overwrite)
    rule = None
    if offsets:
        rule = (
            SplitConfig(mode="single", position=label_position)
            if label_position is not None
            else SplitConfig(mode="every_kth", k=label_every)
        )
    # The evaluated split is scored once; its per-frame results also feed the offset analysis.
    eval_offsets = labeled_offsets(videoset, rule) if rule else None
    result = evaluate_split(
        model, videoset, ecfg, dev, offsets=eval_offsets, save_dir=out / "preds" if save_preds else None
    )
    console.print(result.table(title=f"{checkpoint.name} on {data.name} ({split} split)"))
    result.to_json(out / "metrics.json")
    console.print(f"metrics -> {out / 'metrics.json'}")
    if rule is not None:
        from semivss.metrics.offset import offset_table_text, plot_offsets, save_offset_tables

        train_set = formats.load_dataset(fmt, data, train_split)
        train_res = evaluate_split(model, train_set, ecfg, dev, offsets=labeled_offsets(train_set, rule))
        tables = {f"train videos ({train_split})": train_res.offsets, f"held-out videos ({split})": result.offsets}
        typer.echo(offset_table_text(tables))
        save_offset_tables(tables, out / "offsets.json")
        plot_offsets(tables, out / "offsets.png", title=f"mIoU by offset from the labeled frame ({checkpoint.name})")
        console.print(f"offset analysis -> {out / 'offsets.json'}, {out / 'offsets.png'}")


@app.command()
def predict(
    checkpoint: Path = typer.Argument(..., help="checkpoints/best.pt, last.pt or model.safetensors"),
    source: Path = typer.Argument(..., help="A folder of frames or an mp4 file."),
    out: Path = typer.Argument(..., help="Output folder: labels/, overlays/, overlay.mp4"),
    mode: Optional[str] = typer.Option(None, help="whole | slide (default: as trained)."),
    size: Optional[str] = typer.Option(None, help="Resize frames to HxW before the model; 'none' = original."),
    fps: Optional[float] = typer.Option(None, help="Frame rate of overlay.mp4 (default: the source's, or 10)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, help="Allow replacing files in OUT."),
) -> None:
    """Segment a video (folder of frames or mp4): palette label PNGs, overlays and an H.264 mp4."""
    import numpy as np

    from semivss.experiment import eval_config_from, load_trained_model
    from semivss.inference.video import predict_source

    dev = _device(device)
    model, meta = load_trained_model(checkpoint, dev)
    ecfg = eval_config_from(meta, mode=mode, **({"size": _size(size)} if size is not None else {}))
    palette = np.asarray(meta["palette"], dtype=np.uint8)
    summary = predict_source(model, source, out, palette, ecfg, dev, fps=fps, overwrite=overwrite)
    console.print(summary)


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
    """Generate the embedded synthetic video set (SPEC section 5), deterministic by seed."""
    import time

    from semivss.data.synthetic import generate_synthetic

    t0 = time.perf_counter()
    path = generate_synthetic(out, videos=videos, frames=frames, height=height, width=width, seed=seed, overwrite=overwrite)
    console.print(f"wrote {videos} videos x {frames} frames ({height}x{width}) to {path} in {time.perf_counter() - t0:.1f} s")


@data_app.command("info")
def data_info(
    root: Path = typer.Argument(..., help="Dataset root."),
    fmt: str = typer.Option("camvid", "--format", help=FORMATS),
    split: str = typer.Option("train"),
    label_every: Optional[int] = typer.Option(None, help="Show the 1/k label-ratio split."),
) -> None:
    """Print the videos, frame and label counts of a split (and a label-ratio split)."""
    from rich.table import Table

    from semivss.data import formats, splits

    vs = formats.load_dataset(fmt, root, split)
    lab = set(splits.every_kth(vs, label_every).labeled) if label_every else set()
    table = Table(title=f"{root} ({split} split): {vs.num_classes} classes")
    for col in ("video", "frames", "annotated", "labeled (1/k)"):
        table.add_column(col)
    ann = set(vs.annotated())
    for video in vs.videos:
        refs = [f for f in vs.frames() if f.video == video.name]
        table.add_row(video.name, str(len(refs)), str(sum(r in ann for r in refs)), str(sum(r in lab for r in refs)))
    console.print(table)


def main() -> None:
    """Entry point: user errors become one clear red line and exit code 2."""
    try:
        app()
    except (SemivssError, TrainingError, FileExistsError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Offline pseudo-labelling of unlabeled frames (docs/methods.md#71-pseudo-label-sets).

Every frame gets the argmax of the averaged class distribution of a :class:`Predictor` (an
ensemble of checkpoints, each with multi-scale + flip TTA) at the frame's original resolution, and
the per-pixel entropy of that distribution quantised to uint8 (Eq. (ST-1)-(ST-2)). The set on disk
(layout: docs/protocols.md#7-pseudo-label-sets) is written frame by frame, the label PNG last and
atomically, so an interrupted run resumes without writing any finished frame again. Under
``torchrun`` the frame list is sharded over ranks (:func:`shard_frames`); rank 0 owns the manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from semivss.data.video import FrameRef
from semivss.engine import dist
from semivss.engine.checkpoint import atomic_write, remove_stale_temps
from semivss.errors import ConfigError, DataError, SemivssError
from semivss.inference.evaluate import make_progress
from semivss.inference.predict import ProbFn
from semivss.inference.video_predictor import VideoPredictor, frames_until_last, run_videos
from semivss.inference.writers import OutputExistsError
from semivss.ops import class_argmax

__all__ = [
    "FORMAT",
    "IDENTITY_KEYS",
    "VERSION",
    "dequantise_entropy",
    "entropy",
    "entropy_path",
    "label_path",
    "load_manifest",
    "make_manifest",
    "pseudo_label",
    "pseudo_label_quality",
    "quantise_entropy",
    "read_pseudo_label",
    "shard_frames",
    "write_frame",
]

FORMAT = "semivss-pseudo-labels"
VERSION = 1
IDENTITY_KEYS = (
    "format", "version", "dataset", "num_classes", "classes", "models", "scales", "flip", "eval",
    "uncertainty", "quantisation", "frames",
)
"""Manifest keys that must be equal for ``resume`` to continue a set (all but ``counts``)."""

T = TypeVar("T")


# ----------------------------------------------------------------------------- entropy maps


def entropy(probs: Tensor) -> Tensor:
    """Per-pixel entropy ``H = -sum_c p_c ln p_c`` (nats) of ``(..., C, H, W)`` probabilities
    (Eq. (ST-1); ``0 ln 0 = 0``)."""
    return torch.special.entr(probs.float()).sum(dim=-3)


def _max_entropy(num_classes: int) -> float:
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    return math.log(num_classes)


def quantise_entropy(h: Tensor, num_classes: int) -> Tensor:
    """uint8 ``q = round(255 H / ln C)`` (clamped to 0..255; all zero when C = 1)."""
    hmax = _max_entropy(num_classes)
    if hmax == 0.0:
        return torch.zeros_like(h, dtype=torch.uint8)
    return torch.round(h.float() * (255.0 / hmax)).clamp_(0, 255).to(torch.uint8)


def dequantise_entropy(q: np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    """float32 entropy ``q ln C / 255`` of a quantised map (error <= ln C / 510)."""
    arr = q.cpu().numpy() if isinstance(q, Tensor) else np.asarray(q)
    return arr.astype(np.float32) * np.float32(_max_entropy(num_classes) / 255.0)


# ----------------------------------------------------------------------------- files


def label_path(out_dir: str | Path, ref: FrameRef) -> Path:
    """``<set>/labels/<video>/<index:08d>.png``."""
    return Path(out_dir) / "labels" / ref.video / f"{int(ref.index):08d}.png"


def entropy_path(out_dir: str | Path, ref: FrameRef) -> Path:
    """``<set>/entropy/<video>/<index:08d>.png``."""
    return Path(out_dir) / "entropy" / ref.video / f"{int(ref.index):08d}.png"


def _write_png_atomic(path: Path, arr: np.ndarray, compress_level: int = 1) -> None:
    """Write a uint8 (H, W) array as a single-channel ('L') PNG via a temporary file."""
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected a uint8 (H, W) array, got {arr.dtype} {arr.shape}")
    image = Image.fromarray(np.ascontiguousarray(arr))
    atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=compress_level), durable=False)


def write_frame(out_dir: Path, ref: FrameRef, label: np.ndarray, entropy_q: np.ndarray) -> None:
    """Write one frame of the set: the entropy PNG first, the label PNG (the "done" mark) last."""
    _write_png_atomic(entropy_path(out_dir, ref), entropy_q)
    _write_png_atomic(label_path(out_dir, ref), label)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def load_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a pseudo-label set (DataError naming the file if unusable)."""
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; {out_dir} is not a semivss pseudo-label set")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path}: 'format' is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise DataError(f"{path}: unsupported version {data.get('version')!r} (expected {VERSION})")
    return data


def read_pseudo_label(out_dir: str | Path, ref: FrameRef, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(label uint8 (H, W), entropy float32 (H, W) in nats)`` of one frame of a set."""
    out: list[np.ndarray] = []
    for path in (label_path(out_dir, ref), entropy_path(out_dir, ref)):
        try:
            with Image.open(path) as im:
                out.append(np.array(im))
        except (OSError, SyntaxError) as exc:
            raise DataError(f"{path}: cannot read pseudo-label PNG ({exc})") from exc
    return out[0], dequantise_entropy(out[1], num_classes)


# ----------------------------------------------------------------------------- manifest


def make_manifest(
    *,
    dataset: Mapping[str, Any],
    classes: Sequence[str],
    models: Sequence[Mapping[str, Any]],
    scales: Sequence[float],
    flip: bool,
    eval_cfg: Mapping[str, Any],
    frames: Sequence[FrameRef],
) -> dict[str, Any]:
    """The manifest of a set (``counts`` filled in by :func:`pseudo_label`), JSON-normalised.

    ``dataset``: ``{"format", "root", "split"}``; ``models``: ``[{"path", "weight"}, ...]`` (extra
    keys allowed, e.g. each member's ``eval``); ``eval_cfg``: the (first) member's EvalConfig dump.
    """
    num_classes = len(classes)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dict(dataset),
        "num_classes": num_classes,
        "classes": list(classes),
        "models": [dict(m) for m in models],
        "scales": [float(s) for s in scales],
        "flip": bool(flip),
        "eval": dict(eval_cfg),
        "uncertainty": "entropy",
        "quantisation": {"dtype": "uint8", "max": _max_entropy(num_classes)},
        "frames": [{"video": str(r.video), "index": int(r.index)} for r in frames],
        "counts": {},
    }
    return json.loads(json.dumps(manifest))


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in IDENTITY_KEYS if old.get(k) != new.get(k)]


def _prepare_output(out_dir: Path, manifest: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Check ``out_dir`` against the resume / overwrite rules and write the initial manifest."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir():  # temp files of writes a killed run left behind
        for folder in (out_dir, *out_dir.glob("labels/*"), *out_dir.glob("entropy/*")):
            remove_stale_temps(folder)
    non_empty = out_dir.is_dir() and any(out_dir.iterdir())
    if non_empty and resume:
        old = load_manifest(out_dir)
        changed = _diff_keys(old, manifest)
        if changed:
            details = []
            for k in changed:
                was, now = old.get(k), manifest[k]
                if k == "frames":
                    details.append(f"frames ({len(was or [])} listed, now {len(now)})")
                elif (isinstance(was, list) and isinstance(now, list) and len(was) == len(now)
                      and all(isinstance(x, dict) for x in was + now)):  # e.g. models: member by member
                    details.extend(f"{k}[{i}].{j} (was {_short(a.get(j))}, now {_short(b.get(j))})"
                                   for i, (a, b) in enumerate(zip(was, now))
                                   for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j))
                elif isinstance(was, dict) and isinstance(now, dict):
                    sub = sorted(j for j in set(was) | set(now) if was.get(j) != now.get(j))
                    details.append(f"{k}." + f", {k}.".join(
                        f"{j} (was {_short(was.get(j))}, now {_short(now.get(j))})" for j in sub))
                else:
                    details.append(f"{k} (was {_short(was)}, now {_short(now)})")
            raise ConfigError(
                f"{out_dir / 'manifest.json'}: cannot resume, the set was made with different "
                f"settings: {'; '.join(details)}. Use the same options, or --overwrite / another --out"
            )
        return  # keep the manifest (and its counts) until this run's counts replace them
    if non_empty and not overwrite:
        raise OutputExistsError(
            f"{out_dir}: output directory exists and is not empty (use --resume to continue the "
            "set, or --overwrite to write into it)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out_dir / "manifest.json", {**manifest, "counts": {"complete": False}})


# ----------------------------------------------------------------------------- sharding / reading


def shard_frames(frames: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``frames`` under DDP: ``frames[rank::world_size]``.

    Pure function of the full list, so every rank agrees without communication and the shards
    partition the list (each frame exactly once) whatever is already on disk.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return list(frames)[rank::world_size]


class _FrameImages(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Normalised images of ``refs`` prepared at ``size`` (labels are never read)."""

    def __init__(self, videoset: Any, refs: Sequence[FrameRef], size: tuple[int, int] | None) -> None:
        from semivss.data.transforms import EvalResize

        self.videoset = videoset
        self.refs = list(refs)
        self.resize = EvalResize(size)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, Tensor, tuple[int, int]]:
        from semivss.data.transforms import to_tensor

        image = self.videoset.read_image(self.refs[i])
        return i, to_tensor(self.resize(image)), (int(image.shape[0]), int(image.shape[1]))


class _ProbFnPredictor:
    """A plain probability function as a stateless ``VideoPredictor``."""

    temporal = False

    def __init__(self, fn: ProbFn, input_size: tuple[int, int] | None) -> None:
        self.fn, self.input_size = fn, input_size

    def reset(self) -> None:
        pass

    def eval_mode(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def step(self, images: Tensor, out_size: tuple[int, int],
             with_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        with torch.inference_mode():
            probs = self.fn(images, out_size)
            return class_argmax(probs), probs


# ----------------------------------------------------------------------------- main loop


def pseudo_label(
    predictor: VideoPredictor | ProbFn,
    videoset: Any,
    frames: Sequence[FrameRef],
    out_dir: str | Path,
    num_classes: int,
    manifest: Mapping[str, Any],
    resume: bool = False,
    overwrite: bool = False,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    input_size: tuple[int, int] | None = None,
    num_workers: int = 0,
    write_threads: int = 2,
    limit: int | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Label ``frames`` of ``videoset`` into the set ``out_dir`` (docs/methods.md#71-pseudo-label-sets).

    ``predictor``: a ``VideoPredictor`` such as :class:`Predictor` (frames prepared at its
    ``input_size``) or any :data:`ProbFn` (frames prepared at ``input_size``; its argmax is the
    label). A temporal predictor is stepped through each video from its first frame (frames
    outside ``frames`` are predicted, not written) and ranks share whole videos. ``manifest``: as
    made by :func:`make_manifest` for these ``frames``. A non-empty ``out_dir`` is refused unless
    ``resume`` (the manifest must match; frames whose label PNG exists are skipped) or
    ``overwrite`` (every frame written again). ``limit``: stop after writing that many frames
    (per rank). Frames are batched while input and output sizes agree. Under DDP (``rank`` /
    ``world_size`` default to the process group) each rank labels :func:`shard_frames` of the
    list, rank 0 writes the manifest, and all ranks meet at a barrier at the end.

    Returns the counts (summed over ranks): ``frames`` (in the set), ``written`` (this run),
    ``skipped`` (already done), ``done`` (label PNGs that exist now, over every run of the set),
    ``complete`` (every label PNG exists), ``seconds`` and ``frames_per_s`` (this run).
    """
    if resume and overwrite:
        raise ConfigError("choose one of resume and overwrite")
    if batch_size < 1 or num_workers < 0 or write_threads < 0 or (limit is not None and limit < 0):
        raise ConfigError("batch_size must be >= 1; num_workers, write_threads and limit >= 0")
    out = Path(out_dir)
    refs = [FrameRef(str(r.video), int(r.index)) for r in frames]
    if not refs:
        raise DataError(f"video set {getattr(videoset, 'name', '?')!r}: no frames to pseudo-label")
    seen: set[FrameRef] = set()
    for r in refs:
        if r in seen:
            raise DataError(f"frame {r} is listed twice")
        seen.add(r)
    for r in refs:
        videoset.frame(r)  # DataError naming an unknown video / frame
    full = {**json.loads(json.dumps(dict(manifest))), "counts": {}}
    want = [{"video": r.video, "index": r.index} for r in refs]
    if full.get("frames") != want or full.get("num_classes") != num_classes:
        raise ConfigError("manifest: 'frames' / 'num_classes' do not describe the frames labelled")

    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    error: SemivssError | None = None
    if rank == 0:
        try:
            _prepare_output(out, full, resume, overwrite)
        except SemivssError as exc:
            error = exc
    error = dist.broadcast_object(error) if world_size > 1 else error
    if error is not None:
        raise error
    dist.barrier()

    if not isinstance(predictor, VideoPredictor):
        predictor = _ProbFnPredictor(predictor, input_size)
    size = predictor.input_size
    if predictor.temporal:  # whole videos per rank
        videos = set(shard_frames(sorted({r.video for r in refs}), rank, world_size))
        mine = [r for r in refs if r.video in videos]
    else:
        mine = shard_frames(refs, rank, world_size)
    todo = [r for r in mine if not (resume and label_path(out, r).is_file())]
    skipped = len(mine) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    device = torch.device(device)
    # (frame, write): a temporal predictor also steps through the earlier frames of its videos
    want = set(todo)
    ahead = int(getattr(predictor, "lookahead", 0))  # frames a delaying predictor needs past the last one
    run = ([(r, r in want) for r in frames_until_last(videoset, todo, ahead)] if predictor.temporal
           else [(r, True) for r in todo])
    ds = _FrameImages(videoset, [r for r, _ in run], size)
    loader: Any = (
        torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers)
        if num_workers > 0 else (ds[i] for i in range(len(ds)))
    )
    pool = ThreadPoolExecutor(max_workers=write_threads) if write_threads > 0 else None
    pending: deque[Future[None]] = deque()
    written = 0
    start = time.perf_counter()

    def submit(ref: FrameRef, lab: np.ndarray, ent: np.ndarray) -> None:
        if pool is None:
            write_frame(out, ref, lab, ent)
            return
        pending.append(pool.submit(write_frame, out, ref, lab, ent))
        while len(pending) > 4 * write_threads:  # bound the frames held in memory
            pending.popleft().result()

    try:
        with predictor.eval_mode(), make_progress(progress and rank == 0) as bar:
            what = f"pseudo-label{f' (rank 0 of {world_size})' if world_size > 1 else ''}"
            task = bar.add_task(what, total=len(run))
            items = ((int(it[0]), it[1], (int(it[2][0]), int(it[2][1]))) for it in loader)
            batches = run_videos(predictor, items, video=lambda it: run[it[0]][0].video,
                                 image=lambda it: it[1], out_size=lambda it: it[2],
                                 batch_size=batch_size, device=device, with_probs=True)
            for batch, labels, probs in batches:
                assert probs is not None
                with torch.inference_mode():
                    for j, (i, _, _) in enumerate(batch):
                        ref, write = run[i]
                        if not write:
                            continue
                        q = quantise_entropy(entropy(probs[j]), num_classes)
                        submit(ref, labels[j].to("cpu", torch.uint8).numpy(), q.cpu().numpy())
                        written += 1
                bar.advance(task, len(batch))
            while pending:
                pending.popleft().result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

    seconds = time.perf_counter() - start
    local = {"written": written, "skipped": skipped, "seconds": seconds}
    gathered = dist.all_gather_object(local) if world_size > 1 else [local]
    dist.barrier()
    counts: dict[str, Any] = {
        "frames": len(refs),
        "written": sum(int(g["written"]) for g in gathered),
        "skipped": sum(int(g["skipped"]) for g in gathered),
        "seconds": max(float(g["seconds"]) for g in gathered),
    }
    counts["frames_per_s"] = counts["written"] / counts["seconds"] if counts["seconds"] > 0 else 0.0
    counts["done"] = sum(label_path(out, r).is_file() for r in refs)  # cumulative over resumes
    counts["complete"] = counts["done"] == len(refs)
    if rank == 0:
        _write_json_atomic(out / "manifest.json", {**full, "counts": counts})
    dist.barrier()
    return counts


def pseudo_label_quality(
    set_dir: str | Path, videoset: Any, gamma: float | None = None, progress: bool = True,
    reliable_cfg: Any = None,
) -> dict[str, Any]:
    """How good a pseudo-label set is where the video set has ground truth for its frames (e.g. the
    hidden labels of a label-ratio split): one confusion matrix over ALL pseudo-labeled pixels and
    one over the RELIABLE pixels only (entropy < ``gamma`` nats, default 0.5 ln C, the
    student fine-tuning's default threshold), plus the share of annotated pixels that are reliable.

    ``reliable_cfg`` (a ``method.reliable`` section, :class:`semivss.methods.self_training.ReliableConfig`)
    selects the reliable pixels as the student does instead (threshold, or the lowest-entropy
    ``keep`` share, of each pseudo-labeled class with ``classwise``); percentiles are taken per
    frame here (the student takes them per batch). Give ``gamma`` or ``reliable_cfg``, not both.

    Returns ``frames`` (frames with ground truth; frames without are skipped), ``gamma`` (None for
    percentile modes), ``reliable`` settings, ``reliable_share``, and ``all`` / ``reliable``:
    ``mIoU``, ``pixel_acc``, ``mAcc``, ``fwIoU`` and per-class ``iou``
    (``ConfusionMatrix.compute``). DataError when no frame of the set has ground truth."""
    from semivss.data.pseudo import read_pseudo_set
    from semivss.methods.self_training import ReliableConfig, default_gamma, split_reliable
    from semivss.metrics.confusion import ConfusionMatrix

    pset = read_pseudo_set(set_dir, videoset)
    c = pset.num_classes
    if reliable_cfg is not None and gamma is not None:
        raise ConfigError("give gamma or a reliability section, not both")
    if reliable_cfg is None:
        if gamma is not None and gamma <= 0:
            raise ConfigError(f"gamma must be > 0 nats, got {gamma}")
        reliable_cfg = ReliableConfig(mode="threshold", gamma=default_gamma(c) if gamma is None else float(gamma))
    gamma = reliable_cfg.gamma if reliable_cfg.mode == "threshold" else None
    mats = {"all": ConfusionMatrix(c), "reliable": ConfusionMatrix(c)}
    annotated = reliable = frames = 0
    with make_progress(progress) as bar:
        task = bar.add_task("checking pseudo-labels", total=len(pset.frames))
        for ref in pset.frames:
            bar.advance(task)
            if videoset.frame(ref).label is None:
                continue
            gt = videoset.read_label(ref)
            label, q = pset.read(ref, size=gt.shape)
            ent = torch.from_numpy(pset.decode_entropy(q))
            keep = split_reliable(ent, torch.ones_like(ent, dtype=torch.bool), reliable_cfg, c,
                                  label=torch.from_numpy(label.astype(np.int64)))[0].numpy()
            mats["all"].update(label, gt)
            mats["reliable"].update(label, np.where(keep, gt, 255).astype(gt.dtype))
            has_gt = gt != 255
            annotated += int(has_gt.sum())
            reliable += int((has_gt & keep).sum())
            frames += 1
    if frames == 0:
        raise DataError(f"no frame of pseudo-label set {set_dir} has a ground-truth label in {videoset.name!r}")
    out: dict[str, Any] = {"frames": frames, "gamma": gamma, "reliable_rule": reliable_cfg.model_dump(),
                           "reliable_share": reliable / max(annotated, 1)}
    for name, mat in mats.items():
        m = mat.compute()
        out[name] = {k: float(m[k]) for k in ("mIoU", "pixel_acc", "mAcc", "fwIoU")}
        out[name]["iou"] = [float(v) for v in m["iou"]]
    return out

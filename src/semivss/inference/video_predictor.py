"""The video inference seam: predictors that step through each video's frames in order.

A :class:`VideoPredictor` is reset at the start of every video and then given the video's frames
in order, a few consecutive frames at a time; it returns per-frame labels and class
probabilities. The per-frame :class:`~semivss.inference.predict.Predictor` (TTA, ensembles) is
the stateless implementation; :class:`TemporalSmoothing` is a stateful one (it carries the
previous frame's probabilities). :func:`run_videos` is the one loop evaluate, predict and
pseudo-label drive predictors with.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from semivss.errors import ConfigError
from semivss.ops import class_argmax

__all__ = ["TemporalSmoothing", "VideoPredictor", "finish_video", "frames_until_last", "run_videos"]

T = TypeVar("T")


@runtime_checkable
class VideoPredictor(Protocol):
    """Segments the frames of one video at a time, in frame order.

    ``temporal``: True when the predictor carries state from frame to frame, so that it must see
    every frame of a video from its first one (callers then add the unannotated frames and never
    skip a frame); ``input_size``: the (H, W) frames are prepared at (None: original size).
    """

    temporal: bool

    @property
    def input_size(self) -> tuple[int, int] | None: ...

    def reset(self) -> None:
        """Forget every state: the next frames start a new video."""

    def step(
        self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``(labels (B,H,W) int64, probs (B,C,H,W) or None)`` at ``out_size`` for ``images``
        (B,3,h,w): B consecutive frames of the current video, in order.

        A predictor that needs later frames (bidirectional key frames) may return fewer: the
        outputs of the oldest frames it has not answered yet, in order; it then has a ``finish()``
        method that returns the rest at the end of the video (:func:`finish_video`)."""

    def eval_mode(self) -> contextlib.AbstractContextManager[object]: ...


def finish_video(predictor: Any, with_probs: bool = False) -> tuple[Tensor, Tensor | None]:
    """The outputs a delaying predictor still owes at the end of a video (its ``finish()``);
    empty for one that answers every ``step`` in full."""
    finish = getattr(predictor, "finish", None)
    if finish is not None:
        return finish()  # type: ignore[no-any-return]
    return torch.zeros(0, 1, 1, dtype=torch.long), (torch.zeros(0, 1, 1, 1) if with_probs else None)


def video_settings(predictor: Any) -> dict[str, Any] | None:
    """The options a video predictor runs with over time (its ``settings()``: key frames, flow,
    propagation, smoothing); None for per-frame inference."""
    settings = getattr(predictor, "settings", None)
    return settings() if callable(settings) else None


class TemporalSmoothing:
    """Exponential smoothing of a per-frame predictor's class probabilities over time:
    ``q_t = (1 - m) p_t + m q_{t-1}`` (``q_0 = p_0``; restarted at each video and whenever the
    output size changes), labels = argmax q_t. A simple stateful :class:`VideoPredictor` that
    trades responsiveness for temporal consistency (VC_n)."""

    temporal = True

    def __init__(self, base: VideoPredictor, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"temporal smoothing momentum must be in [0, 1), got {momentum}")
        self.base = base
        self.momentum = float(momentum)
        self._state: Tensor | None = None
        self._with_probs = False  # what the last step was asked for (finish answers the same way)

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.base.input_size

    def settings(self) -> dict[str, Any]:
        """Its momentum, with the settings of the predictor it smooths."""
        return {"smooth": self.momentum, **(video_settings(self.base) or {})}

    @property
    def lookahead(self) -> int:
        """The base's (a delaying base answers frames later; smoothing adds no delay)."""
        return int(getattr(self.base, "lookahead", 0))

    def reset(self) -> None:
        self._state = None
        self.base.reset()

    def eval_mode(self) -> contextlib.AbstractContextManager[object]:
        return self.base.eval_mode()

    def step(
        self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        _, probs = self.base.step(images, out_size, with_probs=True)
        self._with_probs = with_probs
        return self._smooth(probs, with_probs)

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """The base's frames still waiting at the end of a video, smoothed (a delaying base)."""
        _, probs = finish_video(self.base, with_probs=True)
        return self._smooth(probs, self._with_probs)

    def _smooth(self, probs: Tensor | None, with_probs: bool) -> tuple[Tensor, Tensor | None]:
        assert probs is not None
        out = torch.empty_like(probs)
        m = self.momentum
        for j in range(probs.shape[0]):
            prev = self._state
            cur = probs[j]
            if prev is not None and prev.shape == cur.shape:
                cur = (1.0 - m) * cur + m * prev
            out[j] = cur
            self._state = cur
        return class_argmax(out), out if with_probs else None


def frames_until_last(videoset: Any, frames: Iterable[Any], beyond: int = 0) -> list[Any]:
    """What a temporal predictor must step through to predict ``frames``: every frame of each of
    their videos, in order, from the video's first frame up to its last frame in ``frames``, and
    ``beyond`` more frames after it where the video has them (a predictor's ``lookahead``)."""
    last: dict[str, int] = {}
    for r in frames:
        last[r.video] = max(last.get(r.video, r.index), r.index)
    out = []
    for name, hi in last.items():
        frames_of = videoset.video(name).frames
        upto = max(i for i, f in enumerate(frames_of) if f.index <= hi) + 1 + max(0, beyond)
        out += [f.ref for f in frames_of[:upto]]
    return out


def run_videos(
    predictor: VideoPredictor,
    items: Iterable[T],
    *,
    video: Callable[[T], str],
    image: Callable[[T], Tensor],
    out_size: Callable[[T], tuple[int, int]],
    batch_size: int,
    device: torch.device | str,
    with_probs: bool = False,
) -> Iterator[tuple[list[T], Tensor, Tensor | None]]:
    """Drive ``predictor`` over ``items`` ordered by video, then frame: reset a temporal one at
    each new video, batch up to ``batch_size`` consecutive frames with equal input and output sizes (of one
    video for a temporal predictor; a stateless one may get frames of two videos in one batch), and
    yield ``(items, labels, probs or None)`` per answered batch (on the predictor's device). A
    delaying predictor's answers come later, for the oldest frames first, and the rest at the end of
    each video (``finish``); the yielded items are always the frames the outputs belong to."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    batch: list[T] = []
    waiting: deque[T] = deque()  # frames given to the predictor and not answered yet
    current: str | None = None

    def key(item: T) -> tuple[str, tuple[int, ...], tuple[int, int]]:
        return (video(item) if predictor.temporal else ""), tuple(image(item).shape), out_size(item)

    def answered(labels: Tensor, probs: Tensor | None) -> Iterator[tuple[list[T], Tensor, Tensor | None]]:
        if labels.shape[0] > len(waiting):
            raise RuntimeError(f"the predictor answered {labels.shape[0]} frames, {len(waiting)} were waiting")
        if labels.shape[0]:
            yield [waiting.popleft() for _ in range(labels.shape[0])], labels, probs

    def flush() -> Iterator[tuple[list[T], Tensor, Tensor | None]]:
        images = torch.stack([image(b) for b in batch]).to(device)
        waiting.extend(batch)
        yield from answered(*predictor.step(images, out_size(batch[0]), with_probs=with_probs))

    def end_of_video() -> Iterator[tuple[list[T], Tensor, Tensor | None]]:
        if waiting:
            yield from answered(*finish_video(predictor, with_probs))
        if waiting:
            raise RuntimeError(f"the predictor left {len(waiting)} frames of a video unanswered")

    for item in items:
        if batch and (len(batch) == batch_size or key(batch[0]) != key(item)):
            yield from flush()
            batch = []
        if video(item) != current:  # a new video (a batch of a temporal predictor was flushed)
            current = video(item)
            if predictor.temporal:
                yield from end_of_video()
                predictor.reset()
        batch.append(item)
    if batch:
        yield from flush()
    yield from end_of_video()

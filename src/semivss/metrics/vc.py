"""Video consistency VC_n (VSPW official ``VC_perclip.py`` definition; docs/methods.md#9-metrics,
Eq. (MET-5)).

For a video of T annotated frames and each window start i in 0..T-n-1 (T-n windows, as the
official code; videos with T <= n contribute nothing): score_i = |pred_common & gt_common| /
|gt_common|, where gt_common / pred_common are the pixels whose ground-truth / predicted label is
constant over frames i..i+n-1; VC_n = mean over all windows of all videos, NaN windows skipped. The streaming accumulator keeps per video only the
previous frame and per-pixel run lengths of unchanged labels: O(H W) per frame whatever n is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from semivss.errors import DataError
from semivss.metrics.confusion import all_reduce_sum

ArrayLike = torch.Tensor | np.ndarray

__all__ = ["VideoConsistency", "video_consistency", "vc_window_scores"]


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


@dataclass
class _VideoState:
    prev_gt: np.ndarray
    prev_pred: np.ndarray
    run_gt: np.ndarray
    run_pred: np.ndarray
    frames: int = 1
    # score of the window ending at the latest frame, per n; committed when a later frame comes.
    pending: dict[int, float] = field(default_factory=dict)


class VideoConsistency:
    """Streaming VC_n accumulator (Eq. (MET-5)) for several window lengths ``ns`` at once.

    Feed the annotated frames of each video in temporal order with ``update(video, pred, gt)``;
    videos may be interleaved; ``finish(video)`` frees a finished video's state (one frame and
    per-pixel run lengths). ``compute()`` -> ``{n: VC_n}`` (NaN where no window was scored).
    """

    def __init__(self, ns: Iterable[int] = (8, 16)) -> None:
        self.ns: tuple[int, ...] = tuple(sorted({int(n) for n in ns}))
        if not self.ns or self.ns[0] < 1:
            raise ValueError(f"window lengths must be >= 1, got {tuple(ns)}")
        self._cap = self.ns[-1]
        self._dtype = np.uint8 if self._cap < 255 else np.uint32
        self._states: dict[str, _VideoState] = {}
        self._finished: set[str] = set()
        self._sum: dict[int, float] = {n: 0.0 for n in self.ns}
        self._count: dict[int, int] = {n: 0 for n in self.ns}
        self._nan: dict[int, int] = {n: 0 for n in self.ns}
        self._video_sum: dict[str, dict[int, float]] = {}
        self._video_count: dict[str, dict[int, int]] = {}

    def update(self, video: str, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add the next annotated frame of ``video`` (prediction and ground truth, same shape)."""
        p = _as_numpy(pred, "pred")
        g = _as_numpy(gt, "gt")
        if p.shape != g.shape:
            raise DataError(
                f"video {video!r}: prediction shape {p.shape} differs from ground truth {g.shape}"
            )
        st = self._states.get(video)
        if st is None:
            if video in self._finished:
                raise DataError(f"video {video!r} got a frame after finish(video)")
            ones = np.ones(g.shape, dtype=self._dtype)
            self._states[video] = _VideoState(
                prev_gt=g.copy(), prev_pred=p.copy(), run_gt=ones, run_pred=ones.copy()
            )
            self._video_sum[video] = {n: 0.0 for n in self.ns}
            self._video_count[video] = {n: 0 for n in self.ns}
            self._score(video, self._states[video])
            return
        if g.shape != st.prev_gt.shape:
            raise DataError(
                f"video {video!r}: frame {st.frames} has size {g.shape}, earlier frames "
                f"{st.prev_gt.shape}"
            )
        # A later frame exists, so the window ending at the previous frame counts (T-n windows).
        for n, score in st.pending.items():
            self._commit(video, n, score)
        st.pending.clear()
        self._advance(st.run_gt, g == st.prev_gt)
        self._advance(st.run_pred, p == st.prev_pred)
        st.prev_gt = g.copy()
        st.prev_pred = p.copy()
        st.frames += 1
        self._score(video, st)

    def finish(self, video: str) -> None:
        """Release the per-video state of a video that has no more frames (its last window is
        dropped, as in the T-n definition); a later ``update`` for it raises ``DataError``."""
        if video in self._states:
            del self._states[video]
            self._finished.add(video)

    def _advance(self, run: np.ndarray, same: np.ndarray) -> None:
        run += 1
        run[~same] = 1
        np.minimum(run, self._cap, out=run)

    def _score(self, video: str, st: _VideoState) -> None:
        for n in self.ns:
            if st.frames < n:
                continue
            gt_common = st.run_gt >= n
            denom = int(np.count_nonzero(gt_common))
            if denom == 0:
                st.pending[n] = math.nan
            else:
                both = np.count_nonzero(gt_common & (st.run_pred >= n))
                st.pending[n] = both / denom

    def _commit(self, video: str, n: int, score: float) -> None:
        if math.isnan(score):
            self._nan[n] += 1
            return
        self._sum[n] += score
        self._count[n] += 1
        self._video_sum[video][n] += score
        self._video_count[video][n] += 1

    def compute(self) -> dict[int, float]:
        """``{n: VC_n}``: mean over all scored windows of all videos (NaN if none)."""
        return {
            n: (self._sum[n] / self._count[n]) if self._count[n] else math.nan for n in self.ns
        }

    def window_counts(self) -> dict[int, int]:
        """``{n: number of windows averaged}`` (NaN windows excluded)."""
        return dict(self._count)

    def nan_windows(self) -> dict[int, int]:
        """``{n: number of windows skipped because gt_common was empty}``."""
        return dict(self._nan)

    def per_video(self) -> dict[str, dict[int, float]]:
        """``{video: {n: mean score of its windows}}`` (NaN for videos with no scored window)."""
        return {
            v: {n: (s[n] / self._video_count[v][n]) if self._video_count[v][n] else math.nan
                for n in self.ns}
            for v, s in self._video_sum.items()
        }

    def all_reduce(self) -> VideoConsistency:
        """Sum window scores and counts over ``torch.distributed`` ranks (videos split by rank)."""
        k = len(self.ns)
        buf = torch.tensor(
            [self._sum[n] for n in self.ns]
            + [float(self._count[n]) for n in self.ns]
            + [float(self._nan[n]) for n in self.ns],
            dtype=torch.float64,
        )
        buf = all_reduce_sum(buf)
        vals = buf.cpu().tolist()
        for j, n in enumerate(self.ns):
            self._sum[n] = vals[j]
            self._count[n] = int(round(vals[k + j]))
            self._nan[n] = int(round(vals[2 * k + j]))
        return self


def vc_window_scores(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], n: int) -> list[float]:
    """Scores of the T-n windows of one video, in order (NaN for an empty gt_common)."""
    if len(preds) != len(gts):
        raise DataError(f"{len(preds)} predictions but {len(gts)} ground-truth frames")
    acc = VideoConsistency((n,))
    scores: list[float] = []
    for p, g in zip(preds, gts):
        st = acc._states.get("v")
        if st is not None and n in st.pending:
            scores.append(st.pending[n])
        acc.update("v", p, g)
    return scores


def video_consistency(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], n: int) -> float:
    """VC_n of one video: mean of its non-NaN window scores; NaN when T <= n (Eq. (MET-5))."""
    scores = [s for s in vc_window_scores(preds, gts, n) if not math.isnan(s)]
    return float(np.mean(scores)) if scores else math.nan

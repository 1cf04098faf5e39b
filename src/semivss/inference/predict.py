"""Whole-image and sliding-window prediction, with TTA / ensemble wrappers.

Everything is built around a *probability function* ``probs(images, out_size) -> (B, C, H, W)``
softmax probabilities; multi-scale + flip test-time augmentation and model ensembles
(docs/methods.md#8-test-time-augmentation-and-ensembles) average such functions.
:class:`Predictor` is the one evaluate, predict and pseudo-labelling run through: members
``(model, EvalConfig)`` with weights, each member's TTA views (``cfg.scales`` x ``cfg.flip``)
softmaxed at the output resolution and averaged, then the members averaged with their normalised
weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semivss.errors import ConfigError
from semivss.ops import class_argmax, resize, resize_channels_last

if TYPE_CHECKING:
    from semivss.inference.video_predictor import VideoPredictor
from semivss.inference.config import EvalConfig

ProbFn = Callable[[Tensor, tuple[int, int]], Tensor]

__all__ = [
    "Member",
    "Predictor",
    "ProbFn",
    "as_predictor",
    "ensemble",
    "eval_mode",
    "input_logits",
    "make_prob_fn",
    "normalise_weights",
    "predict_probs",
    "upsample",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


upsample = resize  # the shared bilinear resize (semivss.ops), under its historical name here


def _forward(model: nn.Module, x: Tensor, amp: bool) -> Tensor:
    """Model logits upsampled to the model input size, float32 (B, C, h_in, w_in), channels-last
    (the later resizes, argmax and softmax over classes then read contiguous memory;
    :func:`~semivss.ops.resize_channels_last`)."""
    x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(x.device, amp):
        out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    return resize_channels_last(logits.float(), (x.shape[-2], x.shape[-1]))


def _scaled(hw: tuple[int, int], scale: float) -> tuple[int, int]:
    return (max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale)))


def _grid(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Window [start, end) positions covering ``length`` (>= window); the last one flush right."""
    n = max(length - window + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + window, length)
        spans.append((max(end - window, 0), end))
    return spans


def _slide(model: nn.Module, x: Tensor, cfg: EvalConfig) -> Tensor:
    """Sliding-window logits at the resolution of ``x``; overlaps averaged, small images padded."""
    b, _, h, w = x.shape
    wh, ww = cfg.window
    sh, sw = cfg.stride
    ph, pw = max(h, wh), max(w, ww)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h))  # zero = the mean colour after normalisation
    total: Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=x.device)
    for y0, y1 in _grid(ph, wh, sh):
        for x0, x1 in _grid(pw, ww, sw):
            logits = _forward(model, x[:, :, y0:y1, x0:x1], cfg.amp)
            if total is None:
                total = torch.empty(b, logits.shape[1], ph, pw, device=x.device,
                                    memory_format=torch.channels_last).zero_()  # the layout of the logits
            total[:, :, y0:y1, x0:x1] += logits
            count[:, :, y0:y1, x0:x1] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


def input_logits(model: nn.Module, images: Tensor, cfg: EvalConfig, scale: float = 1.0) -> Tensor:
    """Logits (B, C, h, w) at the model-input resolution (``cfg.size`` x ``scale`` if set).

    Whole mode: images resized to that size, one forward, logits upsampled to it. Slide mode:
    overlapping ``cfg.window`` windows every ``cfg.stride`` on the resized image.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    base = cfg.size if cfg.size is not None else (images.shape[-2], images.shape[-1])
    hw = _scaled(base, scale)
    with torch.inference_mode():
        x = upsample(images.float(), hw)
        if cfg.mode == "whole":
            return _forward(model, x, cfg.amp)
        return _slide(model, x, cfg)


def predict_probs(
    model: nn.Module,
    images: Tensor,
    out_size: tuple[int, int],
    cfg: EvalConfig,
    scale: float = 1.0,
) -> Tensor:
    """Softmax probabilities (B, C, H, W) float32 at ``out_size`` of normalised ``images``.

    Logits are upsampled to the model input size, then bilinearly to ``out_size``, then softmaxed
    (docs/protocols.md#5-evaluation). ``model`` should be in eval mode (see :func:`eval_mode`).
    """
    with torch.inference_mode():
        logits = upsample(input_logits(model, images, cfg, scale), out_size)
        return torch.softmax(logits, dim=1)


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``n`` ensemble weights summing to 1 (``None``: uniform). Weights must be ``n`` finite,
    non-negative numbers, not all zero; otherwise ``ConfigError`` naming ``weights``."""
    if n < 1:
        raise ConfigError("an ensemble needs at least one model")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"ensemble weights {list(weights)}: expected {n} numbers (one per model)")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ConfigError(f"ensemble weights {list(weights)} must be finite and non-negative")
    total = sum(w)
    if total <= 0:
        raise ConfigError(f"ensemble weights {list(weights)} are all zero")
    return [x / total for x in w]


def _views(cfg: EvalConfig) -> list[tuple[float, bool]]:
    return [(s, f) for s in cfg.scales for f in ((False, True) if cfg.flip else (False,))]


@dataclass
class Member:
    """One model of a :class:`Predictor` with its own evaluation settings (size, mode, TTA)."""

    model: nn.Module
    cfg: EvalConfig
    weight: float = 1.0
    name: str = "model"


class Predictor:
    """Averaged per-pixel class distribution of an ensemble of models with TTA (Eq. (TTA-1)-(TTA-2)).

    For each member: every view (scale s in ``cfg.scales``, and its horizontal flip when
    ``cfg.flip``) gives logits at the member's input size ``cfg.size * s`` (whole or sliding
    window); flipped logits are flipped back, upsampled bilinearly straight to the output size and
    softmaxed; the views are averaged. Members are then averaged with their normalised weights.
    Only softmax is applied to logits (a model returning ``log p`` gives ``p`` back).

    Members of weight 0 are skipped. Calling the predictor is a :data:`ProbFn`. :meth:`predict`
    also gives the argmax; with one (weighted) member and one view it is the argmax of the
    upsampled logits, exactly as single-model inference always was.
    """

    def __init__(
        self,
        members: Sequence[Member | tuple[nn.Module, EvalConfig]],
        weights: Sequence[float] | None = None,
    ) -> None:
        ms = [m if isinstance(m, Member) else Member(m[0], m[1], name=f"model {i}")
              for i, m in enumerate(members)]
        if not ms:
            raise ConfigError("a predictor needs at least one model")
        raw = [m.weight for m in ms] if weights is None else weights
        norm = normalise_weights(raw, len(ms))
        self.members = [Member(m.model, m.cfg, w, m.name) for m, w in zip(ms, norm)]

    #: stateless: each frame is predicted on its own (the ``VideoPredictor`` contract)
    temporal = False

    def reset(self) -> None:
        """Start of a new video: nothing to forget (``VideoPredictor`` contract)."""

    def step(
        self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``VideoPredictor.step``: the frames predicted independently (:meth:`predict`)."""
        return self.predict(images, out_size, with_probs)

    @classmethod
    def single(cls, model: nn.Module, cfg: EvalConfig) -> Predictor:
        """One model with the settings (and TTA) of ``cfg``."""
        return cls([Member(model, cfg)])

    @property
    def weights(self) -> list[float]:
        """Normalised member weights (sum 1)."""
        return [m.weight for m in self.members]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """Size (H, W) frames should be prepared at (``None``: original resolution).

        The members' common ``cfg.size`` when all agree and none uses multi-scale TTA (frames are
        then resized once, as evaluation always did); otherwise the original frame, which each
        member resizes to its own ``size * scale``.
        """
        sizes = {m.cfg.size for m in self.members}
        if len(sizes) == 1 and all(m.cfg.scales == (1.0,) for m in self.members):
            return next(iter(sizes))
        return None

    @property
    def active(self) -> list[Member]:
        """Members with a non-zero weight (the only ones run)."""
        return [m for m in self.members if m.weight > 0]

    @property
    def single_view(self) -> bool:
        """One (weighted) member, one scale, no flip: plain inference."""
        act = self.active
        return len(act) == 1 and len(_views(act[0].cfg)) == 1

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[Predictor]:
        """Every member model in eval mode for the block (previous modes restored after)."""
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(eval_mode(m.model))
            yield self

    def _accumulate(self, images: Tensor, out_size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """(averaged probabilities, upsampled logits when :attr:`single_view` else None)."""
        out_size = (int(out_size[0]), int(out_size[1]))
        acc: Tensor | None = None
        ups: list[Tensor] = []
        keep = self.single_view
        with torch.inference_mode():
            for m in self.active:
                views = _views(m.cfg)
                for scale, flipped in views:
                    x = images.flip(-1) if flipped else images
                    logits = input_logits(m.model, x, m.cfg, scale)
                    if flipped:
                        logits = logits.flip(-1)
                    if acc is None:
                        acc = torch.empty(logits.shape[0], logits.shape[1], *out_size, dtype=torch.float32,
                                          device=logits.device, memory_format=torch.channels_last).zero_()
                    elif logits.shape[1] != acc.shape[1]:
                        raise ConfigError(
                            f"{m.name} predicts {logits.shape[1]} classes, the first model "
                            f"{acc.shape[1]}"
                        )
                    w = m.weight / len(views)
                    for j in range(logits.shape[0]):  # per frame: bounded temporaries
                        up = upsample(logits[j : j + 1], out_size)
                        if keep:
                            ups.append(up)
                        acc[j : j + 1] += torch.softmax(up, dim=1) * w
        assert acc is not None
        return acc, torch.cat(ups) if keep else None

    def __call__(self, images: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Averaged probabilities (B, C, H, W) float32 at ``out_size`` (a :data:`ProbFn`)."""
        return self._accumulate(images, out_size)[0]

    def predict(
        self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``(labels (B, H, W) int64, probs or None)`` at ``out_size``."""
        if self.single_view and not with_probs:
            m = self.active[0]
            size = (int(out_size[0]), int(out_size[1]))
            with torch.inference_mode():
                logits = input_logits(m.model, images, m.cfg, m.cfg.scales[0])
                labels = torch.cat([class_argmax(upsample(logits[j : j + 1], size))
                                    for j in range(logits.shape[0])])
            return labels, None
        probs, logits = self._accumulate(images, out_size)
        with torch.inference_mode():
            labels = class_argmax(logits if logits is not None else probs)
        return labels, probs if with_probs else None


def as_predictor(model: nn.Module | VideoPredictor, cfg: EvalConfig) -> VideoPredictor:
    """``model`` itself when it already is a ``VideoPredictor`` (a :class:`Predictor`, a
    temporal predictor, a video model built by a method's export), else the per-frame network
    with ``cfg``."""
    from semivss.inference.video_predictor import VideoPredictor

    if isinstance(model, VideoPredictor):
        return model
    video_model = getattr(model, "as_video_predictor", None)  # e.g. Accel: key frames + flow
    if callable(video_model):
        return video_model(cfg)
    return Predictor.single(model, cfg)


def make_prob_fn(
    model: nn.Module,
    cfg: EvalConfig,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> ProbFn:
    """A probability function averaging the softmax over ``scales`` x (identity, h-flip).

    With the defaults it is exactly :func:`predict_probs`; multi-scale + flip is the TTA of
    Eq. (TTA-1): probabilities resized back to ``out_size`` and averaged.
    """
    if not scales:
        raise ConfigError("scales must not be empty")
    try:
        member_cfg = cfg.model_copy(update={"scales": tuple(float(s) for s in scales), "flip": flip})
        EvalConfig.model_validate(member_cfg.model_dump())
    except ValueError as exc:
        raise ConfigError(f"make_prob_fn: {exc}") from None
    return Predictor.single(model, member_cfg)


def ensemble(fns: Sequence[ProbFn], weights: Sequence[float] | None = None) -> ProbFn:
    """Weighted average of several probability functions (Eq. (TTA-2)); weights are
    normalised (:func:`normalise_weights`)."""
    if not fns:
        raise ConfigError("ensemble needs at least one probability function")
    w = normalise_weights(weights, len(fns))

    def probs(images: Tensor, out_size: tuple[int, int]) -> Tensor:
        acc: Tensor | None = None
        for fn, wi in zip(fns, w):
            p = fn(images, out_size) * wi
            acc = p if acc is None else acc + p
        assert acc is not None
        return acc

    return probs

"""Key-frame video inference (docs/methods.md#14-accel): a :class:`VideoPredictor` that runs the
reference network of an :class:`~semivss.models.accel.AccelNet` on key frames only, warps its
score map through the consecutive optical flows in between and fuses it with the update branch
on every frame.

Key frames: the first frame of each video, then every ``interval`` frames; adaptively also when
the flow's mean magnitude exceeds ``max_flow`` pixels or the share of warped pixels whose source
lies outside the previous frame exceeds ``max_invalid``. ``timings`` accumulates the seconds spent
in each stage (reference, flow, warp, update, fusion) for benchmarks.

Propagation: ``chained`` (Accel, Eq. (ACC-1)) warps the carried score map from frame to frame at
the reference's output resolution; ``composed`` composes the flows since the key frame
(:func:`~semivss.models.flow.compose_flows`) and warps the key frame's score map once.
``warp_at="input"`` upsamples the key frame's score map to the input size first, so thin
structures are not carried on the output-stride grid; the update branch's scores are then
resized to the input size and the fusion runs there (docs/methods.md#14-accel).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from semivss.errors import ConfigError
from semivss.inference.config import EvalConfig
from semivss.inference.predict import eval_mode
from semivss.models.accel import AccelNet
from semivss.models.flow import FlowEstimator, compose_flows, invalid_share, warp
from semivss.ops import class_argmax, resize, resize_channels_last

__all__ = ["KeyframePredictor"]


class KeyframePredictor:
    """Accel / flow propagation over each video's frames in order (the ``VideoPredictor`` contract).

    Frames arrive at ``cfg.size`` (``input_size``); outputs are upsampled to the requested size.
    ``keyframe_output``: ``fuse`` (default: key frames too are the fusion of reference and update,
    so K = 1 is the per-frame Accel) or ``reference`` (key frames are the reference alone, as in
    IFR's Accel evaluation). ``propagation``: ``chained`` (default, Accel) or ``composed``;
    ``warp_at``: ``score`` (default, the reference's output grid) or ``input`` (the input grid).
    """

    PROPAGATIONS = ("chained", "composed")
    WARP_AT = ("score", "input")

    temporal = True

    def __init__(
        self,
        net: AccelNet,
        cfg: EvalConfig,
        flow: FlowEstimator,
        interval: int = 5,
        max_flow: float | None = None,
        max_invalid: float | None = None,
        keyframe_output: str = "fuse",
        propagation: str = "chained",
        warp_at: str = "score",
    ) -> None:
        if interval < 1:
            raise ConfigError(f"--keyframe-interval must be >= 1, got {interval}")
        if cfg.mode != "whole" or cfg.scales != (1.0,) or cfg.flip:
            raise ConfigError("key-frame inference runs whole-image, single-scale, without flip "
                              f"(got mode {cfg.mode}, scales {list(cfg.scales)}, flip {cfg.flip})")
        if keyframe_output not in ("fuse", "reference"):
            raise ConfigError(f"keyframe_output must be 'fuse' or 'reference', got {keyframe_output!r}")
        if propagation not in self.PROPAGATIONS:
            raise ConfigError(f"propagation must be one of {', '.join(self.PROPAGATIONS)}, got {propagation!r}")
        if warp_at not in self.WARP_AT:
            raise ConfigError(f"warp_at must be one of {', '.join(self.WARP_AT)}, got {warp_at!r}")
        for name, v in (("max_flow", max_flow), ("max_invalid", max_invalid)):
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        self.net = net
        self.cfg = cfg
        self.flow = flow
        self.interval = int(interval)
        self.max_flow = max_flow
        self.max_invalid = max_invalid
        self.keyframe_output = keyframe_output
        self.propagation = propagation
        self.warp_at = warp_at
        self.timings: dict[str, float] = defaultdict(float)
        self.frames = 0
        self.keyframes = 0
        self.reset()

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.cfg.size

    def reset(self) -> None:
        self._score: Tensor | None = None  # the reference score map carried to the last frame
        self._key_score: Tensor | None = None  # the last key frame's score map (composed)
        self._flow_to_key: Tensor | None = None  # the last frame's flow to the key frame (composed)
        self._prev: Tensor | None = None  # the last frame (for the next flow)
        self._since_key = 0

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[KeyframePredictor]:
        with eval_mode(self.net):
            yield self

    @contextlib.contextmanager
    def _timed(self, stage: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings[stage] += time.perf_counter() - t0

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16 if device.type == "cpu" else torch.float16)

    def _keyframes(self, images: Tensor, dev: torch.device) -> tuple[list[bool], list[Tensor | None]]:
        """Which frames of ``images`` are key frames, and the flow of each other frame from its
        predecessor. Decided from the frames alone (flows, interval), so that the reference
        network then runs on all key frames of the batch at once."""
        keys: list[bool] = []
        flows: list[Tensor | None] = []
        since = self._since_key
        prev = self._prev
        for j in range(images.shape[0]):
            x = images[j : j + 1]
            key = prev is None or since >= self.interval
            flow = None
            if not key:
                assert prev is not None
                with self._timed("flow", dev):
                    flow = self.flow(x, prev)
                if self.max_flow is not None and float(flow.norm(dim=1).mean()) > self.max_flow:
                    key = True
                elif self.max_invalid is not None and float(invalid_share(flow)) > self.max_invalid:
                    key = True
            keys.append(key)
            flows.append(None if key else flow)
            since = 1 if key else since + 1
            prev = x
        return keys, flows

    def step(
        self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``VideoPredictor.step``: ``(labels (B,H,W), probs or None)`` at ``out_size``."""
        dev = images.device
        out_size = (int(out_size[0]), int(out_size[1]))
        with torch.inference_mode():
            keys, flows = self._keyframes(images, dev)
            key_idx = [j for j, k in enumerate(keys) if k]
            ref: Tensor | None = None
            if key_idx:
                with self._timed("reference", dev), self._autocast(dev):
                    ref = self.net.reference_scores(images[key_idx]).float()
                if self.warp_at == "input":
                    with self._timed("warp", dev):
                        ref = resize(ref, images.shape[-2:])
            scores = []
            for j, key in enumerate(keys):  # carry the reference scores along the flows
                if key:
                    assert ref is not None
                    # a copy: the batch's other key frames are not kept alive until the next key frame
                    self._score = self._key_score = ref[key_idx.index(j) : key_idx.index(j) + 1].clone()
                    self._flow_to_key = None
                    self._since_key = 1
                    self.keyframes += 1
                else:
                    flow = flows[j]
                    assert self._score is not None and self._key_score is not None and flow is not None
                    with self._timed("warp", dev):
                        if self.propagation == "chained":
                            self._score, _ = warp(self._score, flow)
                        else:
                            prev = self._flow_to_key
                            self._flow_to_key = flow if prev is None else compose_flows(prev, flow)
                            self._score, _ = warp(self._key_score, self._flow_to_key)
                    self._since_key += 1
                scores.append(self._score)
            self._prev = images[-1:]
            score = torch.cat(scores)
            logits = score
            if self.net.update is not None:
                use = [j for j, k in enumerate(keys) if not (k and self.keyframe_output == "reference")]
                if use:
                    with self._timed("update", dev), self._autocast(dev):
                        upd = self.net.update_scores(images[use], score.shape[-2:]).float()
                    with self._timed("fusion", dev):
                        logits = score.clone()
                        logits[use] = self.net.fuse(score[use], upd).float()
            labels, probs = [], []
            for j in range(logits.shape[0]):  # per frame: bounded temporaries at the output size
                up = resize_channels_last(logits[j : j + 1], out_size)
                labels.append(class_argmax(up))
                if with_probs:
                    probs.append(torch.softmax(up, dim=1))
            self.frames += images.shape[0]
        return torch.cat(labels), (torch.cat(probs) if with_probs else None)

    def settings(self) -> dict[str, Any]:
        """The options it runs with (written into evaluate's metrics.json)."""
        return {"keyframe_interval": self.interval, "flow": getattr(self.flow, "name", type(self.flow).__name__),
                "keyframe_max_flow": self.max_flow, "keyframe_max_invalid": self.max_invalid,
                "keyframe_output": self.keyframe_output, "propagation": self.propagation, "warp_at": self.warp_at}

    def summary(self) -> dict[str, float]:
        """Frames, key frames and seconds per stage so far."""
        return {"frames": self.frames, "keyframes": self.keyframes, **dict(self.timings)}

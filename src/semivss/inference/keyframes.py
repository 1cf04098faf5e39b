"""Key-frame video inference (docs/methods.md#14-accel): a :class:`VideoPredictor` that runs the
reference network of an :class:`~semivss.models.accel.AccelNet` on key frames only, warps its
score map through the consecutive optical flows in between and fuses it with the update branch
on every frame.

Key frames: the first frame of each video, then every ``interval`` frames; adaptively also when
the flow's mean magnitude exceeds ``max_flow`` pixels or the share of warped pixels whose source
lies outside the previous frame exceeds ``max_invalid``. ``timings`` accumulates the seconds spent
in each stage (reference, flow, warp, update, fusion; the both-sides blend counts as fusion) for
benchmarks.

Propagation: ``chained`` (Accel, Eq. (ACC-1)) warps the carried score map from frame to frame at
the reference's output resolution; ``composed`` composes the flows since the key frame
(:func:`~semivss.models.flow.compose_flows`) and warps the key frame's score map once.
``warp_at="input"`` upsamples the key frame's score map to the input size first, so thin
structures are not carried on the output-stride grid; the update branch's scores are then
resized to the input size and the fusion runs there (docs/methods.md#14-accel).

``bidirectional`` (offline): a frame between two key frames is also predicted from the *next*
key frame, whose scores are carried back along the flows towards the past; the two
class-probability maps (each fused with the update branch) are averaged with weights by
temporal nearness. Frames are then returned when the next key frame arrives (``step`` returns
the oldest frames not yet returned; :meth:`KeyframePredictor.finish` the rest at the end of a
video, predicted from the previous key frame alone), so the output lags by up to K - 1 frames.

``fuse_from_age`` = N > 0 (age-aware fusion, docs/methods.md#14-accel, Eq. ACC-5): a frame fewer
than N frames from its key frame takes the carried reference scores alone (no update branch, no
fusion); the fusion runs from age N on. Accel's fusion is trained on CamVid's one-second clips and
corrects more than a short propagation needs (benchmarks/propagation_by_age.py). Key frames (age
0) are then the reference alone. With ``bidirectional``, a frame's scores carried back from the
next key frame are fused only when that key frame is N or more frames away and the frame has an
update (computed when the frame is N or more frames from either key frame of a fixed interval).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class _Pending:
    """A frame waiting for the next key frame (bidirectional mode)."""

    logits: Tensor  # (1, C, h, w): from the previous key frame (fused with the update branch)
    update: Tensor | None  # (1, C, h, w): the update branch's scores, for fusing the other side
    age: int  # frames since the previous key frame
    ahead: Tensor | None = None  # flow of this frame towards the next one (its forward flow)


class KeyframePredictor:
    """Accel / flow propagation over each video's frames in order (the ``VideoPredictor`` contract).

    Frames arrive at ``cfg.size`` (``input_size``); outputs are upsampled to the requested size.
    ``keyframe_output``: ``fuse`` (default: key frames too are the fusion of reference and update,
    so K = 1 is the per-frame Accel) or ``reference`` (key frames are the reference alone, as in
    IFR's Accel evaluation). ``propagation``: ``chained`` (default, Accel) or ``composed``;
    ``warp_at``: ``score`` (default, the reference's output grid) or ``input`` (the input grid);
    ``bidirectional``: also carry the next key frame's scores back (offline, output delayed).
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
        bidirectional: bool = False,
        fuse_from_age: int = 0,
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
        if fuse_from_age < 0 or (fuse_from_age and fuse_from_age >= interval):
            raise ConfigError(f"fuse_from_age must be 0 (every frame) or 1..{interval - 1} (below the key-frame "
                              f"interval, else no frame is fused), got {fuse_from_age}")
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
        self.bidirectional = bool(bidirectional)
        self.fuse_from_age = int(fuse_from_age)
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
        self._pending: list[_Pending] = []  # bidirectional: frames since the last key frame
        self._out: tuple[tuple[int, int], bool, torch.device] | None = None  # (out_size, with_probs, device) of the waiting frames

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

    def _keyframes(
        self, images: Tensor, dev: torch.device
    ) -> tuple[list[bool], list[Tensor | None], list[bool], list[int]]:
        """Which frames of ``images`` are key frames, the flow of each other frame from its
        predecessor, which key frames the adaptive thresholds made (the flow from the previous
        frame failed them: a cut), and each frame's age (frames since its key frame, 0 on one).
        Decided from the frames alone (flows, interval), so that the reference network then runs
        on all key frames of the batch at once."""
        keys: list[bool] = []
        cuts: list[bool] = []
        ages: list[int] = []
        flows: list[Tensor | None] = []
        since = self._since_key
        prev = self._prev
        for j in range(images.shape[0]):
            x = images[j : j + 1]
            key = prev is None or since >= self.interval
            cut = False
            flow = None
            if not key:
                assert prev is not None
                with self._timed("flow", dev):
                    flow = self.flow(x, prev)
                if self.max_flow is not None and float(flow.norm(dim=1).mean()) > self.max_flow:
                    key = cut = True
                elif self.max_invalid is not None and float(invalid_share(flow)) > self.max_invalid:
                    key = cut = True
            keys.append(key)
            cuts.append(cut)
            ages.append(0 if key else since)
            flows.append(None if key else flow)
            since = 1 if key else since + 1
            prev = x
        return keys, flows, cuts, ages

    def step(
        self, images: Tensor, out_size: tuple[int, int], with_probs: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``VideoPredictor.step``: ``(labels (B,H,W), probs or None)`` at ``out_size``."""
        dev = images.device
        out_size = (int(out_size[0]), int(out_size[1]))
        with torch.inference_mode():
            keys, flows, cuts, ages = self._keyframes(images, dev)
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
            prev_frame = self._prev
            self._prev = images[-1:]
            score = torch.cat(scores)
            logits = score
            updates: list[Tensor | None] = [None] * len(keys)
            if self.net.update is not None:
                use = [j for j, k in enumerate(keys) if self._needs_update(k, ages[j])]
                if use:
                    with self._timed("update", dev), self._autocast(dev):
                        upd = self.net.update_scores(images[use], score.shape[-2:]).float()
                    fused = [i for i, j in enumerate(use) if self._fuses(keys[j], ages[j])]
                    if fused:
                        with self._timed("fusion", dev):
                            logits = score.clone()
                            at = [use[i] for i in fused]
                            logits[at] = self.net.fuse(score[at], upd[fused]).float()
                    for i, j in enumerate(use):
                        updates[j] = upd[i : i + 1]
            self.frames += images.shape[0]
            if not self.bidirectional:
                return self._outputs(list(logits.split(1)), out_size, with_probs, dev)
            return self._bidirectional(images, prev_frame, keys, cuts, ages, key_idx, ref, logits, updates,
                                       out_size, with_probs)

    def _fuses(self, key: bool, age: int) -> bool:
        """Whether a frame's carried reference scores are fused with its update (Eq. ACC-5)."""
        return not (key and self.keyframe_output == "reference") and age >= self.fuse_from_age

    def _needs_update(self, key: bool, age: int) -> bool:
        """Whether the update branch runs on a frame: fused now, or (both sides, fixed interval)
        far enough from the next key frame to be fused with its scores carried back."""
        ahead = self.bidirectional and not key and self.interval - age >= self.fuse_from_age
        return self._fuses(key, age) or ahead

    def _outputs(
        self, logits: list[Tensor], out_size: tuple[int, int], with_probs: bool, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        """Labels (and probabilities) at ``out_size``, frame by frame (bounded temporaries)."""
        labels, probs = [], []
        for lg in logits:
            up = resize_channels_last(lg, out_size)
            labels.append(class_argmax(up))
            if with_probs:
                probs.append(torch.softmax(up, dim=1))
        if not labels:  # nothing to return yet (bidirectional: no key frame in this batch)
            c = self.net.num_classes
            return (torch.zeros(0, *out_size, dtype=torch.long, device=device),
                    torch.zeros(0, c, *out_size, device=device) if with_probs else None)
        return torch.cat(labels), (torch.cat(probs) if with_probs else None)

    def _bidirectional(
        self, images: Tensor, prev_frame: Tensor | None, keys: list[bool], cuts: list[bool], ages: list[int],
        key_idx: list[int], ref: Tensor | None,
        logits: Tensor, updates: list[Tensor | None], out_size: tuple[int, int], with_probs: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Queue the batch's non-key frames; at each key frame, resolve the queued ones with its
        scores carried back along their forward flows (not across a cut: a key frame the adaptive
        thresholds made leaves them to the previous key frame), and return them with the key frame."""
        dev = images.device
        if self._out is not None and self._out[:2] != (out_size, with_probs):
            raise ConfigError("bidirectional key-frame inference needs one output size (and one with_probs "
                              "setting) per video; frames of different sizes: predict them without --bidirectional")
        self._out = (out_size, with_probs, dev)
        done: list[Tensor] = []
        for j, key in enumerate(keys):
            x = images[j : j + 1]
            before = images[j - 1 : j] if j > 0 else prev_frame
            if self._pending and before is not None and not cuts[j]:  # forward flow of the frame before
                with self._timed("flow", dev):
                    self._pending[-1].ahead = self.flow(before, x)
            if not key:  # copies: a waiting frame does not keep its whole batch alive
                upd = updates[j]
                self._pending.append(_Pending(logits[j : j + 1].clone(), None if upd is None else upd.clone(), ages[j]))
                continue
            if cuts[j]:
                done += [p.logits for p in self._pending]
                self._pending = []
            else:
                assert ref is not None
                done += self._resolve(ref[key_idx.index(j) : key_idx.index(j) + 1], dev)
            done.append(logits[j : j + 1])
        return self._outputs(done, out_size, with_probs, dev)

    def _resolve(self, key_score: Tensor, dev: torch.device) -> list[Tensor]:
        """The queued frames blended with ``key_score`` carried back to each of them, oldest first."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        gap = pending[-1].age + 1  # frames from the previous key frame to this one
        out: list[Tensor] = [pending[0].logits] * len(pending)
        carried, total = key_score, None
        for i in range(len(pending) - 1, -1, -1):
            p = pending[i]
            assert p.ahead is not None
            with self._timed("warp", dev):
                if self.propagation == "chained":
                    carried, _ = warp(carried, p.ahead)
                else:
                    total = p.ahead if total is None else compose_flows(total, p.ahead)
                    carried, _ = warp(key_score, total)
            ahead = carried
            if p.update is not None and gap - p.age >= self.fuse_from_age:
                with self._timed("fusion", dev):
                    ahead = self.net.fuse(carried, p.update).float()
            w = (gap - p.age) / gap  # weight of the previous key frame: the nearer, the more
            with self._timed("fusion", dev):
                blend = w * torch.softmax(p.logits, dim=1) + (1.0 - w) * torch.softmax(ahead, dim=1)
            out[i] = blend.clamp_min(1e-12).log()
        return out

    def finish(self) -> tuple[Tensor, Tensor | None]:
        """The frames still waiting at the end of a video (bidirectional mode): predicted from the
        previous key frame alone. Empty otherwise."""
        pending, self._pending = self._pending, []
        out_size, with_probs, dev = self._out if self._out is not None else ((1, 1), False, torch.device("cpu"))
        self._out = None
        return self._outputs([p.logits for p in pending], out_size, with_probs, dev)

    @property
    def lookahead(self) -> int:
        """Frames past a wanted frame this predictor must see to answer it (``evaluate`` steps
        that far beyond each video's last scored frame): up to the next key frame when bidirectional."""
        return self.interval - 1 if self.bidirectional else 0

    def settings(self) -> dict[str, Any]:
        """The options it runs with (written into evaluate's metrics.json)."""
        return {"keyframe_interval": self.interval, "flow": getattr(self.flow, "name", type(self.flow).__name__),
                "keyframe_max_flow": self.max_flow, "keyframe_max_invalid": self.max_invalid,
                "keyframe_output": self.keyframe_output, "propagation": self.propagation, "warp_at": self.warp_at,
                "bidirectional": self.bidirectional, "fuse_from_age": self.fuse_from_age}

    def summary(self) -> dict[str, float]:
        """Frames, key frames and seconds per stage so far."""
        return {"frames": self.frames, "keyframes": self.keyframes, **dict(self.timings)}

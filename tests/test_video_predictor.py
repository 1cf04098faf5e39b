"""The video inference seam: run_videos (reset per video, batches within one video),
TemporalSmoothing against hand-computed values, and evaluate / predict_source / pseudo_label
stepping a temporal predictor through every frame of each video in order."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_inference import CLASSES, Oracle, make_videoset
from test_pseudo_label import manifest_for

from semivss.data.video import FrameRef
from semivss.errors import ConfigError
from semivss.inference import EvalConfig, evaluate, predict_source
from semivss.inference.predict import Predictor
from semivss.inference.pseudo_label import label_path, pseudo_label, read_pseudo_label
from semivss.inference.video_predictor import TemporalSmoothing, VideoPredictor, run_videos


class Recorder:
    """A temporal predictor that records what it is given; frame t of a video (counted from its
    reset) gets the one-hot class ``t % C`` everywhere."""

    temporal = True

    def __init__(self, c: int = 3, size: tuple[int, int] | None = None) -> None:
        self.c, self.input_size = c, size
        self.calls: list[tuple[str, int]] = []  # ("reset", 0) or ("step", batch size)
        self.seen: list[float] = []  # first pixel value of each frame stepped
        self.t = 0

    def reset(self) -> None:
        self.calls.append(("reset", 0))
        self.t = 0

    def eval_mode(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def step(self, images, out_size, with_probs=False):
        self.calls.append(("step", images.shape[0]))
        self.seen += [float(v) for v in images[:, 0, 0, 0]]
        ts = torch.arange(self.t, self.t + images.shape[0]) % self.c
        self.t += images.shape[0]
        probs = torch.nn.functional.one_hot(ts, self.c).float()[:, :, None, None]
        probs = probs.expand(-1, -1, *out_size).contiguous()
        return probs.argmax(1), probs if with_probs else None


def test_recorder_and_predictor_satisfy_the_protocol() -> None:
    assert isinstance(Recorder(), VideoPredictor)
    assert isinstance(Predictor.single(Oracle(), EvalConfig(size=None)), VideoPredictor)
    assert not isinstance(Oracle(), VideoPredictor)


def test_as_predictor_keeps_video_models_and_wraps_per_frame_networks() -> None:
    from semivss.inference.predict import as_predictor

    class VideoModel(torch.nn.Module, Recorder):  # a network that is its own VideoPredictor
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            Recorder.__init__(self)

    video_model = VideoModel()
    assert as_predictor(video_model, EvalConfig(size=None)) is video_model
    rec = Recorder()
    assert as_predictor(rec, EvalConfig(size=None)) is rec
    wrapped = as_predictor(Oracle(), EvalConfig(size=None))
    assert isinstance(wrapped, Predictor) and not wrapped.temporal


def test_run_videos_resets_per_video_and_never_mixes_videos() -> None:
    items = [(v, i) for v, n in (("a", 5), ("b", 2), ("c", 3)) for i in range(n)]
    rec = Recorder()
    out = list(run_videos(rec, items, video=lambda it: it[0],
                          image=lambda it: torch.full((3, 2, 2), float(it[1])),
                          out_size=lambda it: (2, 2), batch_size=2, device="cpu"))
    assert [[it for it in b] for b, _, _ in out] == [
        [("a", 0), ("a", 1)], [("a", 2), ("a", 3)], [("a", 4)], [("b", 0), ("b", 1)],
        [("c", 0), ("c", 1)], [("c", 2)]]
    assert rec.calls == [("reset", 0), ("step", 2), ("step", 2), ("step", 1), ("reset", 0),
                         ("step", 2), ("reset", 0), ("step", 2), ("step", 1)]
    assert rec.seen == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2]
    # labels restart at each video: t % 3 counted from the reset
    labels = torch.cat([lab[:, 0, 0] for _, lab, _ in out]).tolist()
    assert labels == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]
    # a stateless predictor is never reset and may get two videos in one batch
    fixed = Fixed([0.5] * len(items))
    sizes = [len(b) for b, _, _ in run_videos(fixed, items, video=lambda it: it[0],
                                              image=lambda it: torch.zeros(3, 1, 1),
                                              out_size=lambda it: (1, 1), batch_size=4, device="cpu")]
    assert sizes == [4, 4, 2]
    with pytest.raises(ConfigError, match="batch_size"):
        list(run_videos(rec, items, video=lambda it: it[0], image=lambda it: torch.zeros(3, 1, 1),
                        out_size=lambda it: (1, 1), batch_size=0, device="cpu"))


class Fixed:
    """Stateless predictor returning given per-frame probabilities (C=2, 1x1 pixel) in order."""

    temporal = False
    input_size = None

    def __init__(self, p1: list[float]) -> None:
        self.p1, self.i = p1, 0

    def reset(self) -> None:
        pass

    def eval_mode(self):
        return contextlib.nullcontext()

    def step(self, images, out_size, with_probs=False):
        p = torch.tensor(self.p1[self.i: self.i + images.shape[0]])
        self.i += images.shape[0]
        probs = torch.stack([1 - p, p], dim=1)[:, :, None, None]
        return probs.argmax(1), probs


def test_temporal_smoothing_matches_hand_computed_values() -> None:
    # q0 = p0 = 0.2; q1 = 0.5*0.9 + 0.5*0.2 = 0.55; q2 = 0.5*0.9 + 0.5*0.55 = 0.725
    # then a new video restarts: q0' = 0.1
    sm = TemporalSmoothing(Fixed([0.2, 0.9, 0.9, 0.1]), momentum=0.5)
    items = [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    out = list(run_videos(sm, items, video=lambda it: it[0], image=lambda it: torch.zeros(3, 1, 1),
                          out_size=lambda it: (1, 1), batch_size=2, device="cpu", with_probs=True))
    p1 = torch.cat([probs[:, 1, 0, 0] for _, _, probs in out])
    np.testing.assert_allclose(p1.numpy(), [0.2, 0.55, 0.725, 0.1], rtol=1e-6)
    labels = torch.cat([lab[:, 0, 0] for _, lab, _ in out]).tolist()
    assert labels == [0, 1, 1, 0]
    with pytest.raises(ConfigError, match="momentum"):
        TemporalSmoothing(Fixed([]), momentum=1.0)


def test_evaluate_steps_a_temporal_predictor_through_every_frame(tmp_path: Path) -> None:
    vs, _ = make_videoset(tmp_path / "data")  # videos a, b of 10 frames; a#9 has no label
    frames = [FrameRef("a", 3), FrameRef("a", 6), FrameRef("b", 4)]
    rec = Recorder()
    res = evaluate(rec, vs, frames, EvalConfig(size=None, batch_size=4, vc=(2,)), "cpu",
                   progress=False, save_dir=tmp_path / "preds")
    # a: frames 0..6 (7 frames), b: frames 0..4 (5 frames); one reset per video
    assert rec.calls == [("reset", 0), ("step", 4), ("step", 3), ("reset", 0), ("step", 4), ("step", 1)]
    assert res["n_frames"] == 3
    # only the evaluated frames are written; their label is the frame's position t % 3
    written = sorted(str(p.relative_to(tmp_path / "preds")) for p in (tmp_path / "preds").rglob("*.png"))
    assert written == ["a/00000003.png", "a/00000006.png", "b/00000004.png"]
    with Image.open(tmp_path / "preds" / "b" / "00000004.png") as im:
        assert set(np.unique(np.array(im))) == {4 % 3}
    # a stateless predictor sees only the evaluated frames
    res2 = evaluate(Oracle(), vs, frames, EvalConfig(size=None, batch_size=4), "cpu", progress=False)
    assert res2["n_frames"] == 3 and res2["mIoU"] == 1.0


def test_temporal_smoothing_of_an_exact_model_stays_exact(tmp_path: Path) -> None:
    vs, _ = make_videoset(tmp_path / "data")
    cfg = EvalConfig(size=None, vc=(2,))
    smooth = TemporalSmoothing(Predictor.single(Oracle(), cfg), momentum=0.0)
    res = evaluate(smooth, vs, vs.annotated(), cfg, "cpu", progress=False)
    assert res["n_frames"] == 19 and res["mIoU"] == 1.0


def test_predict_source_resets_once_and_steps_in_order(tmp_path: Path) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((4, 6, 3), 10 * i, np.uint8)).save(src / f"f{i:02d}.png")
    rec = Recorder()
    summary = predict_source(rec, src, tmp_path / "out", np.eye(3, dtype=np.uint8) * 200,
                             EvalConfig(size=None, batch_size=2), "cpu", progress=False)
    assert summary["frames"] == 5
    assert rec.calls == [("reset", 0), ("step", 2), ("step", 2), ("step", 1)]
    assert rec.seen == sorted(rec.seen)  # frame order kept (brightness grows with the index)


def test_pseudo_label_with_a_temporal_predictor_writes_only_its_frames(tmp_path: Path) -> None:
    vs, _ = make_videoset(tmp_path / "data")
    frames = [FrameRef("a", 2), FrameRef("a", 5), FrameRef("b", 1)]
    rec = Recorder()
    counts = pseudo_label(rec, vs, frames, tmp_path / "pl", len(CLASSES),
                          manifest_for(frames, classes=CLASSES), batch_size=3, progress=False)
    assert counts["written"] == 3 and counts["complete"]
    # a: frames 0..5 stepped, b: frames 0..1
    assert rec.calls == [("reset", 0), ("step", 3), ("step", 3), ("reset", 0), ("step", 2)]
    lab, _ = read_pseudo_label(tmp_path / "pl", FrameRef("a", 5), len(CLASSES))
    assert set(np.unique(lab)) == {5 % 3}
    lab, _ = read_pseudo_label(tmp_path / "pl", FrameRef("b", 1), len(CLASSES))
    assert set(np.unique(lab)) == {1 % 3}
    stepped_only = [FrameRef("a", i) for i in (0, 1, 3, 4)] + [FrameRef("b", 0)]
    assert not any(label_path(tmp_path / "pl", r).exists() for r in stepped_only)

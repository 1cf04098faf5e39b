"""Inference: whole vs sliding-window prediction, TTA/ensemble wrappers, writers (palette PNG, mp4,
overwrite protection), frame sources, predict_source and evaluate() with an oracle model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from rich.console import Console
from torch import nn

from semivss.data.transforms import MEAN, STD
from semivss.data.video import Frame, FrameRef, Video, VideoSet
from semivss.errors import DataError
from semivss.inference import (
    EvalConfig,
    Mp4Writer,
    OutputExistsError,
    check_new_output,
    colorize,
    ensemble,
    evaluate,
    evaluate_items,
    input_logits,
    iter_source,
    make_prob_fn,
    overlay,
    predict_probs,
    predict_source,
    save_label_png,
)
from semivss.metrics import video_consistency

PALETTE = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200]], dtype=np.uint8)
CLASSES = ["red", "green", "blue"]


class Pointwise(nn.Module):
    """Logits a fixed per-pixel function of the input (1x1 conv, stride 1)."""

    def __init__(self, c: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, c, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(x), "feature": x}


class Stride2(nn.Module):
    """Logits at stride 2 (like a decoder stride)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(nn.functional.avg_pool2d(x, 2))}


class Oracle(nn.Module):
    """Reads the class back from the red channel (R = 40 c + 20) of a normalised image."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(c, dtype=torch.float32) * 40 + 20)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        red = x[:, :1] * STD[0] + MEAN[0]
        return {"logits": -((red - self.centres.view(1, -1, 1, 1)) ** 2) / 100.0 + 0 * self.dummy}


def encode(label: np.ndarray, void_class: int = 0) -> np.ndarray:
    """uint8 RGB image whose red channel encodes the label (void pixels as ``void_class``)."""
    lab = np.where(label == 255, void_class, label)
    img = np.zeros((*label.shape, 3), np.uint8)
    img[..., 0] = 40 * lab + 20
    img[..., 1] = 90
    img[..., 2] = (np.arange(label.shape[1]) * 7 % 255)[None, :]
    return img


def normalise(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(img).permute(2, 0, 1).float()
    return (t - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def label_video(rng: np.random.Generator, t: int, h: int, w: int) -> list[np.ndarray]:
    """A square of class 1 moving right over class 2, a static void corner, class 0 strip."""
    out = []
    for i in range(t):
        lab = np.full((h, w), 2, np.uint8)
        lab[:, :2] = 0
        x0 = 2 + i % (w - 6)
        lab[2:6, x0 : x0 + 4] = 1
        lab[:2, -3:] = 255
        out.append(lab)
    return out


# ----------------------------------------------------------------------------- config


def test_eval_config_validation() -> None:
    cfg = EvalConfig()
    assert cfg.mode == "whole" and cfg.size == (240, 320) and cfg.vc == (8, 16)
    with pytest.raises(ValidationError, match="windw"):
        EvalConfig(windw=(3, 3))  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="stride"):
        EvalConfig(mode="slide", window=(8, 8), stride=(9, 4))
    with pytest.raises(ValidationError, match="size"):
        EvalConfig(size=(0, 4))
    with pytest.raises(ValidationError, match="mode"):
        EvalConfig(mode="tiles")  # type: ignore[arg-type]
    assert EvalConfig(size=None).size is None


# ----------------------------------------------------------------------------- prediction


def test_predict_probs_whole_pointwise_and_stride() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 14)
    model = Pointwise().eval()
    cfg = EvalConfig(size=None)
    p = predict_probs(model, x, (10, 14), cfg)
    assert p.shape == (2, 3, 10, 14) and p.dtype == torch.float32
    torch.testing.assert_close(p, torch.softmax(model.conv(x), 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 10, 14))
    # resize to cfg.size, then logits upsampled to out_size
    p2 = predict_probs(Stride2().eval(), x, (20, 28), EvalConfig(size=(8, 12)))
    assert p2.shape == (2, 3, 20, 28)
    lg = input_logits(Stride2().eval(), x, EvalConfig(size=(8, 12)))
    assert lg.shape == (2, 3, 8, 12)


@pytest.mark.parametrize(
    ("hw", "size", "window", "stride"),
    [
        ((20, 30), None, (8, 12), (5, 7)),  # overlapping windows, ragged last window
        ((7, 9), None, (16, 16), (8, 8)),  # image smaller than the window: padded
        ((20, 30), (12, 18), (8, 8), (4, 6)),  # slide on the image resized to `size`
        ((9, 30), None, (16, 12), (8, 12)),  # padded in height, tiled in width
    ],
)
def test_slide_equals_whole_for_pointwise_model(hw, size, window, stride) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 3, *hw)
    model = Pointwise().eval()
    whole = predict_probs(model, x, hw, EvalConfig(size=size))
    slide = predict_probs(model, x, hw, EvalConfig(mode="slide", size=size, window=window,
                                                  stride=stride))
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-5)


def test_slide_averages_overlaps() -> None:
    class Counter(nn.Module):
        """Constant logits [k, 0] for the k-th call (k = 1, 3, ...)."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            self.calls += 1
            out = torch.zeros(x.shape[0], 2, x.shape[2], x.shape[3])
            out[:, 0] = 2 * self.calls - 1
            return {"logits": out}

    m = Counter()
    # width 6, window 4, stride 2 -> windows [0, 4) and [2, 6): values 1 and 3
    lg = input_logits(m, torch.zeros(1, 3, 4, 6), EvalConfig(mode="slide", size=None,
                                                            window=(4, 4), stride=(4, 2)))
    assert m.calls == 2
    np.testing.assert_allclose(lg[0, 0, 0].numpy(), [1, 1, 2, 2, 3, 3])
    assert (lg[0, 1] == 0).all()


def test_amp_bf16_close_to_fp32() -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 3, 8, 8)
    model = Pointwise().eval()
    p32 = predict_probs(model, x, (8, 8), EvalConfig(size=None))
    p16 = predict_probs(model, x, (8, 8), EvalConfig(size=None, amp=True))
    assert p16.dtype == torch.float32
    torch.testing.assert_close(p16, p32, rtol=0, atol=0.03)


def test_tta_and_ensemble() -> None:
    torch.manual_seed(4)
    x = torch.randn(1, 3, 12, 16)
    model = Pointwise().eval()
    cfg = EvalConfig(size=None)
    base = predict_probs(model, x, (12, 16), cfg)
    torch.testing.assert_close(make_prob_fn(model, cfg)(x, (12, 16)), base)
    # a pointwise model is flip-equivariant: flip TTA changes nothing
    torch.testing.assert_close(make_prob_fn(model, cfg, flip=True)(x, (12, 16)), base,
                               rtol=0, atol=1e-6)
    ms = make_prob_fn(model, cfg, scales=(1.0, 0.5))(x, (12, 16))
    half = predict_probs(model, x, (12, 16), cfg, scale=0.5)
    torch.testing.assert_close(ms, (base + half) / 2)

    class Const(nn.Module):
        def __init__(self, v: list[float]) -> None:
            super().__init__()
            self.v = torch.tensor(v).view(1, -1, 1, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.v.expand(x.shape[0], -1, x.shape[2], x.shape[3])}

    fa = make_prob_fn(Const([0.0, 0.0]), cfg)
    fb = make_prob_fn(Const([math.log(3.0), 0.0]), cfg)  # probs (0.75, 0.25)
    p = ensemble([fa, fb], weights=[1, 3])(x, (4, 4))
    torch.testing.assert_close(p[0, :, 0, 0], torch.tensor([(0.5 + 3 * 0.75) / 4,
                                                            (0.5 + 3 * 0.25) / 4]))
    with pytest.raises(ValueError, match="weights"):
        ensemble([fa, fb], weights=[1])


# ----------------------------------------------------------------------------- writers


def test_label_png_round_trip(tmp_path: Path) -> None:
    lab = np.array([[0, 1, 2], [255, 2, 0]], dtype=np.uint8)
    path = save_label_png(tmp_path / "sub" / "x.png", torch.from_numpy(lab), PALETTE)
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.array(im), lab)
        rgb = np.array(im.convert("RGB"))
    np.testing.assert_array_equal(rgb[0, 1], PALETTE[1])
    np.testing.assert_array_equal(rgb[1, 0], [0, 0, 0])  # void black
    np.testing.assert_array_equal(colorize(lab, PALETTE), rgb)
    with pytest.raises(DataError, match=r"bad\.png.*value 3"):
        save_label_png(tmp_path / "bad.png", np.array([[3]]), PALETTE)


def test_overlay_blend() -> None:
    img = np.full((2, 2, 3), 100, np.uint8)
    lab = np.array([[0, 255], [1, 2]])
    out = overlay(img, lab, PALETTE, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [150, 50, 50])
    np.testing.assert_array_equal(out[0, 1], [100, 100, 100])  # void: image unchanged
    np.testing.assert_array_equal(out[1, 1], [50, 50, 150])
    with pytest.raises(DataError, match="size"):
        overlay(img, np.zeros((3, 2), np.int64), PALETTE)


def test_mp4_writer(tmp_path: Path) -> None:
    path = tmp_path / "v" / "out.mp4"
    rng = np.random.default_rng(0)
    with Mp4Writer(path, fps=12) as w:
        for _ in range(5):
            w.write(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8))
        with pytest.raises(DataError, match="out.mp4"):
            w.write(np.zeros((10, 10, 3), np.uint8))
    assert w.n_frames == 5
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264"
        assert (s.codec_context.width, s.codec_context.height) == (48, 34)  # padded to even
        assert s.codec_context.pix_fmt == "yuv420p"
        assert float(s.average_rate) == pytest.approx(12)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    assert len(frames) == 5 and frames[0].shape == (34, 48, 3)


def test_check_new_output(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="a.txt") as e:
        check_new_output(f)
    assert isinstance(e.value, DataError) and isinstance(e.value, FileExistsError)
    assert check_new_output(f, overwrite=True) == f
    d = tmp_path / "d"
    d.mkdir()
    assert check_new_output(d) == d  # empty dir is fine
    (d / "x").write_text("y")
    with pytest.raises(OutputExistsError, match="not empty"):
        check_new_output(d)
    assert check_new_output(tmp_path / "new") == tmp_path / "new"


# ----------------------------------------------------------------------------- sources


def test_iter_source_folder_and_mp4(tmp_path: Path) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    sizes = {"f_10.png": (6, 8), "f_2.jpg": (6, 8), "f_1.png": (4, 6)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 50, np.uint8)).save(src / name)
    (src / "notes.txt").write_text("ignored")
    got = list(iter_source(src))
    assert [(n, i) for n, i, _ in got] == [("f_1", 0), ("f_2", 1), ("f_10", 2)]
    assert got[0][2].shape == (4, 6, 3) and got[0][2].dtype == np.uint8
    (src / "cover.png").write_bytes((src / "f_1.png").read_bytes())
    with pytest.raises(DataError, match="cover.png has no frame number"):
        list(iter_source(src))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_source(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="0.png"):
        list(iter_source(bad))

    mp4 = tmp_path / "clip.mp4"
    with Mp4Writer(mp4, fps=5) as w:
        for i in range(4):
            w.write(np.full((16, 20, 3), 40 * i, np.uint8))
    frames = list(iter_source(mp4))
    assert [n for n, _, _ in frames] == [f"clip_{i:06d}" for i in range(4)]
    assert all(f.shape == (16, 20, 3) for _, _, f in frames)


def test_predict_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    labels = label_video(rng, 3, 12, 16)
    for i, lab in enumerate(labels):
        Image.fromarray(encode(lab)).save(src / f"{i:04d}.png")
    Image.fromarray(encode(np.full((10, 14), 2))).save(src / "0003.png")  # a different size
    out = tmp_path / "out"
    cfg = EvalConfig(size=None, batch_size=2)
    summary = predict_source(Oracle(), src, out, PALETTE, cfg, "cpu", progress=False)
    assert summary["frames"] == 4 and summary["fps"] == 10.0
    for i, lab in enumerate(labels):
        with Image.open(out / "labels" / f"{i:04d}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im), np.where(lab == 255, 0, lab))
        assert (out / "overlays" / f"{i:04d}.jpg").is_file()
    with av.open(str(out / "overlay.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    with pytest.raises(OutputExistsError, match="out"):
        predict_source(Oracle(), src, out, PALETTE, cfg, "cpu", progress=False)
    s2 = predict_source(Oracle(), src, out, PALETTE, EvalConfig(size=(8, 8)), "cpu",
                        fps=4, overwrite=True, progress=False)
    assert s2["fps"] == 4.0 and s2["sizes"] == [(10, 14), (12, 16)]
    # mp4 source: frame rate taken from the video
    mp4 = tmp_path / "clip.mp4"
    with Mp4Writer(mp4, fps=6) as w:
        for lab in labels:
            w.write(encode(lab))
    s3 = predict_source(Oracle(), mp4, tmp_path / "out3", PALETTE, cfg, "cpu", progress=False)
    assert s3["frames"] == 3 and s3["fps"] == pytest.approx(6.0)
    assert sorted(p.name for p in (tmp_path / "out3" / "labels").iterdir()) == [
        f"clip_{i:06d}.png" for i in range(3)
    ]


# ----------------------------------------------------------------------------- evaluation


def fake_items(videos: dict[str, list[np.ndarray]], size: tuple[int, int] | None = None):
    for name, labels in videos.items():
        for i, lab in enumerate(labels):
            img = encode(lab)
            yield {
                "image": normalise(img) if size is None else nn.functional.interpolate(
                    normalise(img)[None], size=size, mode="bilinear", align_corners=False)[0],
                "label": torch.from_numpy(lab.astype(np.int64)),
                "video": name,
                "index": 3 * i,
            }


def test_evaluate_items_oracle_perfect() -> None:
    rng = np.random.default_rng(0)
    videos = {"a": label_video(rng, 12, 10, 14), "b": label_video(rng, 6, 8, 12)}
    res = evaluate_items(Oracle(), fake_items(videos), CLASSES, EvalConfig(size=None, vc=(2, 4)),
                         "cpu", progress=False)
    assert res["mIoU"] == 1.0 and res["fwIoU"] == 1.0 and res["pixel_acc"] == 1.0
    assert res["n_frames"] == 18
    # perfect predictions with a static void region: VC equals the GT's own consistency, 1.0
    assert res["VC2"] == 1.0 and res["VC4"] == 1.0
    assert res.metrics["vc_windows"] == {2: (12 - 2) + (6 - 2), 4: (12 - 4) + (6 - 4)}
    assert res.metrics["iou"] == {"red": 1.0, "green": 1.0, "blue": 1.0}

    # a model that is wrong on the moving square: VC matches video_consistency on its outputs
    class Shifted(Oracle):
        def forward(self, x):
            out = super().forward(x)["logits"]
            return {"logits": torch.roll(out, 1, dims=3)}

    res2 = evaluate_items(Shifted(), fake_items(videos), CLASSES, EvalConfig(size=None, vc=(4,)),
                          "cpu", progress=False)
    preds = {v: [np.roll(np.where(lab == 255, 0, lab), 1, axis=1) for lab in labs]
             for v, labs in videos.items()}
    scores = []
    for v, labs in videos.items():
        n_win = len(labs) - 4
        scores += [video_consistency(preds[v], labs, 4)] * n_win
    assert res2["VC4"] == pytest.approx(sum(scores) / len(scores))
    assert res2["mIoU"] < 1.0

    # resized input, frames of different label sizes batched together
    res3 = evaluate_items(Oracle(), fake_items(videos, size=(8, 8)), CLASSES,
                          EvalConfig(size=(8, 8), batch_size=4), "cpu", progress=False)
    assert res3["n_frames"] == 18 and 0.0 < res3["mIoU"] <= 1.0


def test_evaluate_items_order_and_empty() -> None:
    rng = np.random.default_rng(1)
    items = list(fake_items({"a": label_video(rng, 3, 8, 12)}))
    items[1], items[2] = items[2], items[1]
    with pytest.raises(DataError, match="a/3 comes after a/6"):
        evaluate_items(Oracle(), items, CLASSES, EvalConfig(size=None), "cpu", progress=False)
    two = list(fake_items({"a": label_video(rng, 2, 8, 12), "b": label_video(rng, 1, 8, 12)}))
    with pytest.raises(DataError, match="not contiguous"):
        evaluate_items(Oracle(), [two[0], two[2], two[1]], CLASSES, EvalConfig(size=None), "cpu",
                       progress=False)
    with pytest.raises(DataError, match="no annotated frames"):
        evaluate_items(Oracle(), [], CLASSES, EvalConfig(size=None), "cpu", progress=False)


def make_videoset(root: Path) -> tuple[VideoSet, dict[str, list[np.ndarray]]]:
    """Two videos (different sizes) written as PNGs; frame a#9 has no label file."""
    rng = np.random.default_rng(2)
    shapes = {"a": (10, 14), "b": (8, 12)}
    vids, labels = [], {}
    for name, (h, w) in shapes.items():
        labs = label_video(rng, 10, h, w)
        labels[name] = labs
        frames = []
        for i, lab in enumerate(labs):
            img_p, lab_p = root / name / f"{i:03d}.png", root / name / f"{i:03d}_label.png"
            img_p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(encode(lab)).save(img_p)
            Image.fromarray(lab).save(lab_p)
            has = not (name == "a" and i == 9)
            frames.append(Frame(name, i, image=img_p, label=lab_p if has else None))
        vids.append(Video(name, frames))
    return VideoSet("toy", vids, CLASSES, palette=PALETTE), labels


def test_evaluate_videoset_offsets_and_outputs(tmp_path: Path) -> None:
    vs, labels = make_videoset(tmp_path / "data")
    frames = vs.annotated() + [FrameRef("a", 9)]  # an unlabeled frame is predicted, not scored
    offsets = {FrameRef(v, i): i - 4 for v in ("a", "b") for i in range(10)}
    cfg = EvalConfig(size=None, vc=(2, 4), batch_size=3)
    res = evaluate(Oracle(), vs, frames, cfg, "cpu", offsets=offsets, progress=False,
                   save_dir=tmp_path / "preds", subset="held-out videos", model_name="oracle")
    assert res["n_frames"] == 19 and res["mIoU"] == 1.0
    assert res["VC2"] == 1.0 and res.metrics["vc_windows"][2] == (9 - 2) + (10 - 2)
    assert set(res.scalars()) == {"mIoU", "fwIoU", "pixel_acc", "mAcc", "VC2", "VC4"}
    table = res.offsets
    assert table is not None and table.offsets() == list(range(-4, 6))
    assert all(r.mIoU == 1.0 and r.subset == "held-out videos" and r.model == "oracle"
               for r in table.rows)
    assert table.get(5 - 4, "held-out videos", "oracle").n_frames == 2
    assert table.get(9 - 4, "held-out videos", "oracle").n_frames == 1  # a#9 unlabeled
    # prediction PNGs for every evaluated frame, at label resolution
    with Image.open(tmp_path / "preds" / "b" / "00000003.png") as im:
        np.testing.assert_array_equal(np.array(im), np.where(labels["b"][3] == 255, 0, labels["b"][3]))
    assert (tmp_path / "preds" / "a" / "00000009.png").is_file()
    with pytest.raises(OutputExistsError):
        evaluate(Oracle(), vs, frames, cfg, "cpu", progress=False, save_dir=tmp_path / "preds")
    # JSON and rich table
    data = json.loads(res.to_json(tmp_path / "m.json").read_text())
    assert data["metrics"]["mIoU"] == 1.0 and data["metrics"]["vc_windows"]["2"] == 15
    assert data["class_names"] == CLASSES and len(data["offsets"]) == 10
    console = Console(record=True, width=120)
    console.print(res.table(title="toy"))
    text = console.export_text()
    assert "green" in text and "100.00" in text and "VC4" in text
    assert "mIoU 100.00" in res.summary()
    # resized input: frames of both sizes go through the same batch
    res2 = evaluate(Oracle(), vs, vs.annotated(), EvalConfig(size=(6, 6), vc=(2,)), "cpu",
                    progress=False)
    assert res2["n_frames"] == 19 and 0.0 < res2["mIoU"] <= 1.0
    assert res2.metrics["vc_windows"][2] == 15  # a batch spanning both videos keeps VC per video


def test_channels_last_resize_equals_the_plain_resize() -> None:
    from semivss.ops import class_argmax, resize, resize_channels_last

    torch.manual_seed(0)
    x = torch.randn(2, 11, 15, 20) * 5
    out = resize_channels_last(x, (60, 80))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, resize(x, (60, 80)), atol=1e-5, rtol=0)
    assert torch.equal(class_argmax(resize(out, (90, 120))), resize(resize(x, (60, 80)), (90, 120)).argmax(1))


def test_class_argmax_equals_argmax_including_ties_and_layouts() -> None:
    from semivss.ops import class_argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2, 5, 7, 9), generator=g).float()  # many ties: the first maximum wins
    assert torch.equal(class_argmax(x), x.argmax(1))
    assert torch.equal(class_argmax(x.contiguous(memory_format=torch.channels_last)), x.argmax(1))
    y = torch.randn(3, 11, 16, 20, generator=g).bfloat16()
    assert torch.equal(class_argmax(y), y.argmax(1))
    tie = torch.zeros(1, 4, 1, 1)
    tie[0, 1] = tie[0, 3] = 1.0
    assert class_argmax(tie).item() == 1

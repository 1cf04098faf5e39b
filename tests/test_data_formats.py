"""Dataset readers and VideoSet validation: CamVid, folder (PNG + mp4), Cityscapes, VSPW."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from semivss.data import (
    CAMVID_CLASSES,
    FrameRef,
    load_camvid,
    load_cityscapes,
    load_dataset,
    load_folder,
    load_vspw,
)
from semivss.data.video import UNKNOWN_LABEL, default_palette, make_label_lut
from semivss.errors import ConfigError, DataError

# The project's CamVid copy lives in shared/ beside the checkout (SEMIVSS_CAMVID overrides).
CAMVID = Path(os.environ.get("SEMIVSS_CAMVID", Path(__file__).resolve().parents[2] / "shared/data/camvid"))


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = arr[:, :, ::-1] if arr.ndim == 3 else arr
    assert cv2.imwrite(str(path), out)
    return path


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _camvid_fixture(root: Path, split: str = "train") -> dict[str, np.ndarray]:
    """Tiny SegNet layout: 0001TP (2 frames, no prefix) and 0006R0 (2 frames, `f` prefix)."""
    labels = {}
    for i, stem in enumerate(["0001TP_006690", "0001TP_006720", "0006R0_f00960", "0006R0_f00930"]):
        _png(root / split / f"{stem}.png", _rgb(6, 8, i))
        lab = np.full((6, 8), i, np.uint8)
        lab[0, 0] = 11  # void
        _png(root / f"{split}annot" / f"{stem}.png", lab)
        labels[stem] = lab
    return labels


def test_camvid_parsing_prefix_order_and_void(tmp_path: Path) -> None:
    _camvid_fixture(tmp_path)
    vs = load_camvid(tmp_path, "train")
    assert [v.name for v in vs.videos] == ["0001TP", "0006R0"]
    assert vs.frames() == [
        FrameRef("0001TP", 6690), FrameRef("0001TP", 6720), FrameRef("0006R0", 930), FrameRef("0006R0", 960)
    ]
    assert vs.classes == CAMVID_CLASSES and vs.num_classes == 11 and len(vs) == 4
    lab = vs.read_label(FrameRef("0006R0", 960))  # written with value 2, void at (0,0)
    assert lab.dtype == np.uint8 and lab[0, 0] == 255 and (lab.ravel()[1:] == 2).all()
    img = vs.read_image(FrameRef("0001TP", 6720))
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, _rgb(6, 8, 1))  # RGB order preserved through BGR files


def test_camvid_missing_annotation_and_folders(tmp_path: Path) -> None:
    _camvid_fixture(tmp_path)
    (tmp_path / "trainannot" / "0006R0_f00930.png").unlink()
    with pytest.raises(DataError, match="0006R0_f00930.png"):
        load_camvid(tmp_path, "train")
    with pytest.raises(DataError, match="test"):
        load_camvid(tmp_path, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_camvid(tmp_path, "empty")
    _png(tmp_path / "bad" / "noframe.png", _rgb(2, 2, 0))
    (tmp_path / "badannot").mkdir()
    with pytest.raises(DataError, match="noframe.png"):
        load_camvid(tmp_path, "bad")


def test_label_errors_name_files(tmp_path: Path) -> None:
    _camvid_fixture(tmp_path)
    vs = load_camvid(tmp_path, "train")
    ann = tmp_path / "trainannot"
    # out-of-range raw value (12 is neither a class nor void)
    bad = np.zeros((6, 8), np.uint8)
    bad[1, 1], bad[2, 2] = 12, 40
    _png(ann / "0001TP_006690.png", bad)
    with pytest.raises(DataError, match=r"0001TP_006690\.png.*\[12, 40\]"):
        vs.read_label(FrameRef("0001TP", 6690))
    # size mismatch names both the label and the image
    _png(ann / "0001TP_006720.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(DataError, match=r"trainannot/0001TP_006720\.png.*train/0001TP_006720\.png"):
        vs.read_label(FrameRef("0001TP", 6720))
    # corrupt / truncated / missing files
    (ann / "0006R0_f00930.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="0006R0_f00930.png"):
        vs.read_label(FrameRef("0006R0", 930))
    img = tmp_path / "train" / "0006R0_f00960.png"
    img.write_bytes(img.read_bytes()[:40])
    with pytest.raises(DataError, match="0006R0_f00960.png"):
        vs.read_image(FrameRef("0006R0", 960))
    (tmp_path / "train" / "0006R0_f00930.png").unlink()
    with pytest.raises(DataError, match="not found.*0006R0_f00930.png"):
        vs.read_image(FrameRef("0006R0", 930))
    with pytest.raises(DataError, match="no frame with index 5"):
        vs.frame(FrameRef("0001TP", 5))
    # a colour label is refused with a hint
    _png(ann / "0001TP_006690.png", _rgb(6, 8, 9))
    with pytest.raises(DataError, match="single-channel"):
        vs.read_label(FrameRef("0001TP", 6690))


def test_palette_png_labels_read_as_indices(tmp_path: Path) -> None:
    from PIL import Image

    _camvid_fixture(tmp_path)
    lab = np.arange(48, dtype=np.uint8).reshape(6, 8) % 11
    im = Image.fromarray(lab, mode="P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8)))
    im.save(tmp_path / "trainannot" / "0001TP_006690.png")
    vs = load_camvid(tmp_path, "train")
    np.testing.assert_array_equal(vs.read_label(FrameRef("0001TP", 6690)), lab)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="real CamVid copy not available")
def test_camvid_real_counts() -> None:
    train = load_camvid(CAMVID, "train")
    assert {v.name: len(v) for v in train.videos} == {"0001TP": 62, "0006R0": 101, "0016E5": 204}
    assert len(train.annotated()) == 367
    assert train.videos[1].frames[0].index == 930  # 0006R0_f00930.png
    val = load_camvid(CAMVID, "val")
    assert [v.name for v in val.videos] == ["0016E5"] and len(val) == 101
    idx = [f.index for f in val.videos[0].frames]
    assert all(b - a == 2 for a, b in zip(idx, idx[1:]))  # 15 Hz
    ref = train.annotated()[100]
    img, lab = train.read_image(ref), train.read_label(ref)
    assert img.shape == (360, 480, 3) and lab.shape == (360, 480)
    assert set(np.unique(lab)) <= set(range(11)) | {255}


# ---------------------------------------------------------------------------------------------
# folder format


def _folder(root: Path, meta: str = "classes: [a, b, c]\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.yaml").write_text(meta)
    return root


def test_folder_png_frames_labels_and_splits(tmp_path: Path) -> None:
    root = _folder(tmp_path / "ds", "classes: [a, b, c]\nlabel_map: {10: a, 20: 1, 30: c}\nignore_index: [0, 255]\n")
    for i in (3, 12, 7):
        _png(root / "videos" / "cam1" / f"shot_{i}.jpg", np.full((4, 6, 3), 20 * i, np.uint8))
    _png(root / "videos" / "cam2" / "frame_0001.png", _rgb(4, 6, 1))
    _png(root / "labels" / "cam1" / "shot_7.png", np.array([[10, 20, 30, 0, 255, 10]] * 4, np.uint8))
    _png(root / "labels" / "cam1" / "000012.png", np.full((4, 6), 30, np.uint8))
    (root / "train.txt").write_text("# training videos\ncam2\n\ncam1\n")
    vs = load_folder(root)
    assert [v.name for v in vs.videos] == ["cam1", "cam2"]
    assert [f.index for f in vs.video("cam1").frames] == [3, 7, 12]  # last integer of the name
    assert vs.annotated() == [FrameRef("cam1", 7), FrameRef("cam1", 12)]
    np.testing.assert_array_equal(vs.read_label(FrameRef("cam1", 7))[0], [0, 1, 2, 255, 255, 0])
    assert (vs.read_label(FrameRef("cam1", 12)) == 2).all()
    assert abs(int(vs.read_image(FrameRef("cam1", 12)).mean()) - 240) <= 2  # JPEG
    np.testing.assert_array_equal(vs.palette, default_palette(3))
    tr = load_folder(root, "train")
    assert [v.name for v in tr.videos] == ["cam2", "cam1"] and tr.name == "ds/train"
    assert load_dataset("synthetic", root, None).frames() == vs.frames()
    with pytest.raises(DataError, match="val.txt"):
        load_folder(root, "val")
    (root / "val.txt").write_text("cam3\n")
    with pytest.raises(DataError, match=r"val\.txt.*'cam3'"):
        load_folder(root, "val")
    _png(root / "labels" / "cam1" / "000099.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(DataError, match="000099.png matches no frame"):
        load_folder(root)


@pytest.mark.parametrize(
    ("meta", "pattern"),
    [
        ("classes: [a]\ncolours: 3\n", "meta.yaml.*'colours'"),
        ("classes: []\n", "meta.yaml.*'classes'"),
        ("classes: [a, b]\npalette: [[1, 2, 3]]\n", "meta.yaml.*'palette'"),
        ("classes: [a, b]\nlabel_map: {1: z}\n", "meta.yaml.*label_map.1.*'z'"),
        ("classes: [a, b]\nlabel_map: {300: 1}\n", "meta.yaml.*label_map"),
        ("[unclosed\n", "meta.yaml"),
    ],
)
def test_folder_meta_errors(tmp_path: Path, meta: str, pattern: str) -> None:
    root = _folder(tmp_path, meta)
    _png(root / "videos" / "v" / "0.png", _rgb(2, 2, 0))
    with pytest.raises(DataError, match=pattern):
        load_folder(root)


def test_folder_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="meta.yaml"):
        load_folder(tmp_path)
    root = _folder(tmp_path)
    with pytest.raises(DataError, match="videos/ folder"):
        load_folder(root)
    (root / "videos").mkdir()
    with pytest.raises(DataError, match="contains no videos"):
        load_folder(root)
    (root / "videos" / "v").mkdir()
    with pytest.raises(DataError, match=r"videos/v contains no"):
        load_folder(root)
    _png(root / "videos" / "v" / "abc.png", _rgb(2, 2, 0))
    with pytest.raises(DataError, match="abc.png contains no frame number"):
        load_folder(root)
    (root / "videos" / "v" / "abc.png").unlink()
    _png(root / "videos" / "v" / "x1.png", _rgb(2, 2, 0))
    _png(root / "videos" / "v" / "y01.png", _rgb(2, 2, 0))
    with pytest.raises(DataError, match="two frames with index 1"):
        load_folder(root)
    (root / "videos" / "v" / "y01.png").unlink()
    _png(root / "labels" / "w" / "000001.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"labels/w belongs to no video"):
        load_folder(root)


def _write_mp4(path: Path, colours: list[int], h: int = 32, w: int = 48) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        # key frame every 3 frames and B-frames: exercises seeking and pts reordering
        s = c.add_stream("mpeg4", rate=10, options={"g": "3", "bf": "2"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for v in colours:
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), v, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_folder_mp4_video(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    colours = [10, 60, 110, 160, 210, 250, 30]
    _write_mp4(root / "videos" / "clip.mp4", colours)
    lab = np.zeros((32, 48), np.uint8)
    lab[:, 24:] = 2
    _png(root / "labels" / "clip" / "000004.png", lab)
    vs = load_folder(root)
    assert vs.frames() == [FrameRef("clip", i) for i in range(7)]
    # decode position 5 first: seeking starts at the key frame of position 3, not at the start
    assert abs(float(vs.read_image(FrameRef("clip", 5)).mean()) - colours[5]) < 4
    cached = sorted(pos for _, pos in vs._cache._items)
    assert 5 in cached and 0 not in cached
    assert vs.annotated() == [FrameRef("clip", 4)]
    np.testing.assert_array_equal(vs.read_label(FrameRef("clip", 4)), lab)
    # random access order, then compare with a fresh sequential decode
    means = {i: float(vs.read_image(FrameRef("clip", i)).mean()) for i in (5, 1, 6, 3, 0, 2, 4)}
    for i, v in enumerate(colours):
        assert abs(means[i] - v) < 4, (i, means[i], v)
    fresh = load_folder(root)
    for i in (6, 2):
        np.testing.assert_array_equal(fresh.read_image(FrameRef("clip", i)), vs.read_image(FrameRef("clip", i)))
    assert vs.image_size(FrameRef("clip", 0)) == (32, 48)
    # a pickled copy (DataLoader worker) decodes without the parent's cache
    import pickle

    clone = pickle.loads(pickle.dumps(vs))
    np.testing.assert_array_equal(clone.read_image(FrameRef("clip", 3)), vs.read_image(FrameRef("clip", 3)))
    (root / "videos" / "broken.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="broken.mp4"):
        load_folder(root)


def test_label_lut_helpers() -> None:
    lut = make_label_lut(3, {5: 0, 6: 2, 7: 255}, ignore=(0,))
    assert lut[5] == 0 and lut[6] == 2 and lut[7] == 255 and lut[0] == 255
    assert lut[1] == UNKNOWN_LABEL and lut[255] == UNKNOWN_LABEL
    assert len({tuple(c) for c in default_palette(40)}) == 40
    with pytest.raises(ConfigError, match="unknown dataset format 'kitti'"):
        load_dataset("kitti", "/x", "train")


# ---------------------------------------------------------------------------------------------
# Cityscapes and VSPW


def test_cityscapes_sequence_and_train_ids(tmp_path: Path) -> None:
    seq = tmp_path / "leftImg8bit_sequence" / "val" / "lindau"
    for f in (17, 18, 19, 20):
        _png(seq / f"lindau_000001_{f:06d}_leftImg8bit.png", _rgb(4, 4, f))
    _png(seq / "lindau_000002_000019_leftImg8bit.png", _rgb(4, 4, 0))
    # labelIds: 7 road -> 0, 26 car -> 13, 0 unlabeled -> 255, 33 bicycle -> 18
    _png(tmp_path / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png", np.array([[7, 26, 0, 33]] * 4, np.uint8))
    vs = load_cityscapes(tmp_path, "val")
    assert [v.name for v in vs.videos] == ["lindau_000001", "lindau_000002"]
    assert vs.annotated() == [FrameRef("lindau_000001", 19)]
    assert vs.num_classes == 19 and vs.classes[0] == "road" and vs.classes[13] == "car"
    np.testing.assert_array_equal(vs.read_label(FrameRef("lindau_000001", 19))[0], [0, 13, 255, 18])
    _png(tmp_path / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png", np.full((4, 4), 40, np.uint8))
    with pytest.raises(DataError, match=r"labelIds\.png.*\[40\]"):
        vs.read_label(FrameRef("lindau_000001", 19))
    _png(tmp_path / "gtFine/val/lindau/lindau_000009_000019_gtFine_labelIds.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="lindau_000009_000019_gtFine_labelIds.png has no image"):
        load_cityscapes(tmp_path, "val")


def test_vspw_layout_and_mapping(tmp_path: Path) -> None:
    (tmp_path / "val.txt").write_text("127_x\n")
    for f in (0, 1, 2):
        _png(tmp_path / "data" / "127_x" / "origin" / f"{f:08d}.jpg", _rgb(4, 4, f))
    _png(tmp_path / "data" / "127_x" / "mask" / "00000001.png", np.array([[0, 1, 124, 255]] * 4, np.uint8))
    vs = load_vspw(tmp_path, "val")
    assert vs.num_classes == 124 and vs.classes[0] == "wall" and vs.classes[-1] == "train"
    assert vs.annotated() == [FrameRef("127_x", 1)] and len(vs) == 3
    np.testing.assert_array_equal(vs.read_label(FrameRef("127_x", 1))[0], [255, 0, 123, 255])
    _png(tmp_path / "data" / "127_x" / "mask" / "00000001.png", np.full((4, 4), 125, np.uint8))
    with pytest.raises(DataError, match=r"00000001\.png.*\[125\]"):
        vs.read_label(FrameRef("127_x", 1))
    (tmp_path / "test.txt").write_text("missing_video\n")
    with pytest.raises(DataError, match="missing_video"):
        load_vspw(tmp_path, "test")

"""Clip-consistent augmentation, strong copies, clip datasets, sampler and collate."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from semivss.data import (
    MEAN,
    STD,
    ClipAugment,
    EvalFrames,
    EvalResize,
    FrameRef,
    LabeledClips,
    StrongPhotometric,
    UnlabeledClips,
    collate,
    denormalize,
    label_to_tensor,
    load_folder,
    pick_neighbours,
    to_tensor,
)
from semivss.data.batch import LabeledBatch, UnlabeledBatch
from semivss.engine.trainer import collate_any
from semivss.errors import DataError

_FIELDS_L = ("image", "label", "valid", "context", "context_offset", "context_strong")

# class colours far apart: the nearest palette colour of a pixel recovers its class
PAL = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.uint8)
FILL = np.round(MEAN).astype(np.uint8)


def _scene(seed: int, h: int = 48, w: int = 64, block: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Label of square blocks (asymmetric, so flips are visible) and an image encoding it."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 4, (h // block, w // block))
    lab = np.kron(cells, np.ones((block, block), np.int64)).astype(np.uint8)
    return PAL[lab], lab


def _decode(img: np.ndarray) -> np.ndarray:
    d = ((img[:, :, None, :].astype(np.int32) - PAL[None, None].astype(np.int32)) ** 2).sum(-1)
    return d.argmin(-1)


def _write_folder(root: Path, videos: dict[str, int], same_image: bool = False) -> Path:
    (root / "meta.yaml").write_text("classes: [a, b, c, d]\n")
    for v, n in videos.items():
        for i in range(n):
            img, lab = _scene(0 if same_image else hash((v, i)) % 1000)
            (root / "videos" / v).mkdir(parents=True, exist_ok=True)
            (root / "labels" / v).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "videos" / v / f"{i:06d}.png"), img[:, :, ::-1])
            cv2.imwrite(str(root / "labels" / v / f"{i:06d}.png"), lab)
    return root


# ---------------------------------------------------------------------------------------------
# transforms


def test_crop_flip_exact_alignment_and_shared_geometry() -> None:
    img, lab = _scene(1)
    other = np.ascontiguousarray(img[:, :, ::-1])  # a different frame of the same size
    aug = ClipAugment((32, 40), base_size=None, scale_range=(1.0, 1.0))
    flips = set()
    for seed in range(12):
        (a, b, c), (m, n, o) = aug([img, img, other], [lab, None, lab], seed)
        assert a.shape == (32, 40, 3) and m is not None and m.shape == (32, 40) and n is None
        np.testing.assert_array_equal(a, b)  # same geometry for every frame of the clip
        np.testing.assert_array_equal(a, PAL[m])  # image and label stay aligned, exactly
        np.testing.assert_array_equal(m, o)
        np.testing.assert_array_equal(c, a[:, :, ::-1])
        # find where the crop came from (plain or mirrored) in the source
        found = [
            f for f in (False, True)
            for y in range(17) for x in range(25)
            if np.array_equal((lab[:, ::-1] if f else lab)[y : y + 32, x : x + 40], m)
        ]  # fmt: skip
        assert found
        flips.add(found[0])
    assert flips == {False, True}


def test_rescale_pad_with_ignore_and_mean() -> None:
    img, lab = _scene(2, block=16)
    aug = ClipAugment((40, 56), base_size=(24, 32), scale_range=(0.5, 2.0))
    padded = 0
    for seed in range(16):
        (a,), (m,) = aug([img], [lab], seed)
        assert a.shape == (40, 56, 3) and m is not None and m.shape == (40, 56)
        assert set(np.unique(m).tolist()) <= {0, 1, 2, 3, 255}  # nearest: no invented classes
        valid = m != 255
        # away from block edges the bilinear image and the nearest-neighbour label agree
        k = np.ones((3, 3), np.uint8)
        interior = valid & (cv2.erode(m, k) == cv2.dilate(m, k))
        assert interior.sum() > 50
        assert (_decode(a)[interior] == m[interior]).mean() > 0.97
        if (~valid).any():
            padded += 1
            core = cv2.erode((~valid).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            assert (np.abs(a[core].astype(int) - FILL).max(initial=0)) <= 1
    assert padded > 0  # base 24x32 at scale < 1.75 is smaller than the crop


def test_augment_reproducible_and_checks() -> None:
    img, lab = _scene(3)
    aug = ClipAugment((24, 24), base_size=(40, 52))
    x1, y1 = aug([img], [lab], 123)
    x2, y2 = aug([img], [lab], 123)
    x3, _ = aug([img], [lab], 124)
    np.testing.assert_array_equal(x1[0], x2[0])
    np.testing.assert_array_equal(y1[0], y2[0])  # type: ignore[arg-type]
    assert not np.array_equal(x1[0], x3[0])
    with pytest.raises(DataError, match="same size"):
        aug([img, img[:40]], [None, None], 0)
    with pytest.raises(DataError, match="does not match"):
        aug([img], [lab[:40]], 0)


def test_image_with_masks_gives_every_mask_the_clip_geometry() -> None:
    """Several masks of one image (pseudo-label + entropy) get one set of parameters, the same
    as the frame-aligned call with that seed, and the image is augmented once."""
    img, lab = _scene(4, block=16)
    other = (255 - lab).astype(np.uint8)  # a second mask with different values
    aug = ClipAugment((40, 56), base_size=(40, 52), scale_range=(0.5, 2.0))
    for seed in range(8):
        a, (m, n) = aug.image_with_masks(img, [lab, other], seed)
        (ref_a, _), (ref_m, ref_n) = aug([img, img], [lab, other], seed)
        np.testing.assert_array_equal(a, ref_a)
        np.testing.assert_array_equal(m, ref_m)  # type: ignore[arg-type]
        np.testing.assert_array_equal(n, ref_n)  # type: ignore[arg-type]
        inside = m != 255
        np.testing.assert_array_equal(n[inside], 255 - m[inside])  # same geometry, exactly
    with pytest.raises(DataError, match="does not match"):
        aug.image_with_masks(img, [lab, other[:40]], 0)


def test_strong_photometric() -> None:
    img, _ = _scene(4)
    strong = StrongPhotometric()
    outs = [strong(img, s) for s in range(20)]
    np.testing.assert_array_equal(outs[3], strong(img, 3))
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    changed = [not np.array_equal(o, img) for o in outs]
    assert sum(changed) >= 15  # only ~8 % of draws leave the image untouched
    grey = [o for o in outs if (o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all()]
    assert 0 < len(grey) < 20


def test_tensor_conversion() -> None:
    img = np.zeros((2, 3, 3), np.uint8)
    img[0, 1] = (255, 0, 10)
    t = to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[0, 0, 1].item() == pytest.approx((255 - MEAN[0]) / STD[0])
    assert t[2, 0, 1].item() == pytest.approx((10 - MEAN[2]) / STD[2])
    np.testing.assert_array_equal(denormalize(t), img)
    lt = label_to_tensor(np.array([[0, 255]], np.uint8))
    assert lt.dtype == torch.int64 and lt.tolist() == [[0, 255]]
    assert EvalResize((5, 7))(np.zeros((10, 20, 3), np.uint8)).shape == (5, 7, 3)
    assert EvalResize(None)(img) is img


# ---------------------------------------------------------------------------------------------
# datasets


def test_pick_neighbours_rules() -> None:
    rng = np.random.default_rng(0)
    q = pick_neighbours(rng, 100, 50, 5, (-3, 3))
    assert len(set(q)) == 5 and all(1 <= abs(x - 50) <= 3 for x in q)
    assert set(pick_neighbours(rng, 3, 0, 4, (-29, 29))) == {1, 2}  # repeats only when needed
    assert pick_neighbours(rng, 1, 0, 2, (-29, 29)) == [0, 0]  # single frame: itself
    assert pick_neighbours(rng, 4, 1, 2, (5, 9)) == [3, 3]  # none in range: nearest to the range
    assert pick_neighbours(rng, 4, 2, 1, (-9, -5)) == [0]
    assert pick_neighbours(rng, 3, 1, 1, (5, 9)) == [2]
    assert pick_neighbours(rng, 4, 1, 0, (-1, 1)) == []


def test_labeled_clips_context_geometry_and_reproducibility(tmp_path: Path) -> None:
    vs = load_folder(_write_folder(tmp_path, {"v": 6, "single": 1}, same_image=True))
    aug = ClipAugment((32, 32), base_size=(48, 64), scale_range=(0.75, 1.5))
    refs = [FrameRef("v", 2), FrameRef("single", 0)]
    ds = LabeledClips(vs, refs, aug, context_frames=3, context_offsets=(-2, 2), context_strong=True)
    s = ds[(0, 7)]
    assert s.image.shape == (3, 32, 32) and s.label.shape == (32, 32) and s.label.dtype == torch.int64
    assert s.context.shape == (3, 3, 32, 32) and s.context_strong.shape == (3, 3, 32, 32)
    offs = s.context_offset.tolist()
    assert len(set(offs)) == 3 and all(1 <= abs(o) <= 2 for o in offs)
    for k in range(3):  # every frame is the same picture: same geometry gives identical tensors
        assert torch.equal(s.context[k], s.image)
    assert not torch.equal(s.context_strong, s.context)
    img = denormalize(s.image)
    lab = s.label.numpy()
    valid = lab != 255
    assert (_decode(img)[valid] == lab[valid]).mean() > 0.9
    s2 = ds[(0, 7)]
    assert all(torch.equal(getattr(s, k), getattr(s2, k)) for k in _FIELDS_L)
    s3 = ds[(0, 8)]
    assert not torch.equal(s.image, s3.image) or s.context_offset.tolist() != s3.context_offset.tolist()
    single = ds[(1, 0)]
    assert single.context_offset.tolist() == [0, 0, 0]
    assert ds[1].image.shape == (3, 32, 32)  # plain int index
    plain = LabeledClips(vs, refs, aug)[(0, 1)]
    assert isinstance(plain, LabeledBatch)
    assert plain.context is None and plain.context_offset is None and plain.context_strong is None


def test_labels_of_context_and_unlabeled_frames_are_never_read(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"v": 4})
    for i in (0, 1, 3):
        (root / "labels" / "v" / f"{i:06d}.png").write_bytes(b"corrupt")
    vs = load_folder(root)
    aug = ClipAugment((16, 16), base_size=None)
    LabeledClips(vs, [FrameRef("v", 2)], aug, context_frames=3)[(0, 0)]
    u = UnlabeledClips(vs, [FrameRef("v", i) for i in range(4)], aug, num_frames=3, offsets=(-1, 1),
                       strong_copies=1)
    b = u[(0, 5)]
    assert b.image.shape == (3, 3, 16, 16) and len(b.strong) == 1 and b.strong[0].shape == (3, 3, 16, 16)
    assert b.offset[0] == 0 and sorted(b.offset.tolist()) == [0, 1, 1]  # pos 0 has one neighbour
    mid = u[(2, 5)].offset.tolist()
    assert mid[0] == 0 and sorted(mid[1:]) == [-1, 1]  # distinct when possible
    with pytest.raises(DataError, match="000001.png"):
        LabeledClips(vs, [FrameRef("v", 1)], aug)[(0, 0)]


def test_dataset_errors(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"v": 2, "w": 1})
    (root / "labels" / "w" / "000000.png").unlink()
    vs = load_folder(root)
    aug = ClipAugment((16, 16))
    with pytest.raises(DataError, match="train split .* is empty"):
        LabeledClips(vs, [], aug, split_name="train")
    with pytest.raises(DataError, match="w#0 .* has no label"):
        LabeledClips(vs, [FrameRef("w", 0)], aug)
    with pytest.raises(DataError, match="no video named 'zz'"):
        UnlabeledClips(vs, [FrameRef("zz", 0)], aug)
    cv2.imwrite(str(root / "videos" / "v" / "000001.png"), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DataError, match=r"differ in size.*000001\.png"):
        LabeledClips(vs, [FrameRef("v", 0)], aug, context_frames=1)[(0, 0)]


def test_eval_frames_and_collate(tmp_path: Path) -> None:
    root = _write_folder(tmp_path, {"b": 2, "a": 3})
    (root / "labels" / "a" / "000001.png").unlink()
    vs = load_folder(root)
    ev = EvalFrames(vs, vs.frames()[::-1], size=(24, 40))
    assert [(f.video, f.index) for f in ev.frames] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    s = ev[1]
    assert s["image"].shape == (3, 24, 40) and s["label"].shape == (48, 64)
    assert not s["has_label"] and (s["label"] == -1).all()
    assert ev[0]["has_label"] and ev[0]["label"].max() <= 3
    batch = collate([ev[0], ev[1], ev[2]])
    assert batch["image"].shape == (3, 3, 24, 40) and batch["label"].shape == (3, 48, 64)
    assert batch["video"] == ["a", "a", "a"] and batch["index"].tolist() == [0, 1, 2]
    assert batch["has_label"].tolist() == [True, False, True] and batch["orig_size"].tolist()[0] == [48, 64]
    assert len(EvalFrames(vs)) == 4  # default: annotated frames
    ragged = collate([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    assert isinstance(ragged["x"], list)


def test_dataloader_batch_matches_contract(tmp_path: Path) -> None:
    vs = load_folder(_write_folder(tmp_path, {"v": 5}))
    aug = ClipAugment((16, 24), base_size=(24, 32))
    lab = LabeledClips(vs, vs.frames()[:2], aug, context_frames=2, context_strong=True)
    unl = UnlabeledClips(vs, vs.frames()[2:], aug, num_frames=2, strong_copies=1)
    pairs = [(1, 11), (0, 12)]  # (index, sample_seed) as the engine's sampler yields them
    kw = dict(sampler=pairs, batch_size=2, num_workers=0)
    b1 = next(iter(DataLoader(lab, collate_fn=LabeledBatch.collate, **kw)))  # type: ignore[arg-type]
    b2 = next(iter(DataLoader(unl, collate_fn=collate_any, **kw)))  # type: ignore[arg-type]
    assert isinstance(b1, LabeledBatch) and isinstance(b2, UnlabeledBatch)
    assert b1.image.shape == (2, 3, 16, 24) and b1.label.shape == (2, 16, 24)
    assert b1.context.shape == b1.context_strong.shape == (2, 2, 3, 16, 24)
    assert b1.context_offset.shape == (2, 2) and b1.context_offset.dtype == torch.int64
    assert len(b2.strong) == 1 and b2.image.shape == b2.strong[0].shape == (2, 2, 3, 16, 24)
    assert b2.offset.shape == (2, 2) and b2.valid.shape == (2, 2, 16, 24)
    again = next(iter(DataLoader(lab, collate_fn=collate_any, **kw)))  # type: ignore[arg-type]
    assert all(torch.equal(getattr(b1, k), getattr(again, k)) for k in _FIELDS_L)
    assert torch.equal(b1.image[1], lab[(0, 12)].image)


# ------------------------------------------------------------------ padding mask of unlabeled clips
def _coord_folder(root: Path, h: int, w: int, n: int = 2) -> Path:
    """Frames encoding their pixel coordinates: R = 4 * row, G = 4 * col, B = 255 (the padding
    fill has B = 104, so B tells frame pixels from padding)."""
    (root / "meta.yaml").write_text("classes: [a, b]\n")
    for sub in ("videos", "labels"):
        (root / sub / "v").mkdir(parents=True)
    rows, cols = np.mgrid[0:h, 0:w]
    img = np.stack([4 * rows, 4 * cols, np.full_like(rows, 255)], -1).astype(np.uint8)
    for i in range(n):
        cv2.imwrite(str(root / "videos" / "v" / f"{i:06d}.png"), img[:, :, ::-1])
        cv2.imwrite(str(root / "labels" / "v" / f"{i:06d}.png"), np.zeros((h, w), np.uint8))
    return root


def test_unlabeled_valid_is_true_exactly_on_the_frame_pixels(tmp_path: Path) -> None:
    vs = load_folder(_coord_folder(tmp_path, 20, 24))  # smaller than the crop: always padded
    aug = ClipAugment((32, 40), base_size=None, scale_range=(1.0, 1.0))
    ds = UnlabeledClips(vs, vs.frames(), aug, num_frames=2, strong_copies=1)
    flips = set()
    for seed in range(8):
        s = ds[(0, seed)]
        valid = s.valid
        assert valid.dtype == torch.bool and valid.shape == (2, 32, 40)
        assert torch.equal(valid[0], valid[1])  # one geometry per clip
        img = denormalize(s.image[0])
        np.testing.assert_array_equal(valid[0].numpy(), img[:, :, 2] == 255)
        assert not (img[~valid[0].numpy()] != FILL).any()  # padding is the fill colour
        ys, xs = np.nonzero(valid[0].numpy())
        assert valid[0].sum() == 20 * 24 and ys.max() - ys.min() == 19 and xs.max() - xs.min() == 23
        assert not valid[0, :6].any() and not valid[0, -6:].any()  # centred: 6 padded rows each side
        box = img[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(int)
        np.testing.assert_array_equal(box[:, 0, 0], 4 * np.arange(20))  # rows kept in order
        flipped = box[0, 0, 1] != 0
        np.testing.assert_array_equal(box[0, :, 1], 4 * np.arange(24)[::-1] if flipped else 4 * np.arange(24))
        flips.add(bool(flipped))
    assert flips == {True, False}


def test_unlabeled_valid_follows_down_scaling_and_random_crops(tmp_path: Path) -> None:
    vs = load_folder(_coord_folder(tmp_path, 40, 60))
    aug = ClipAugment((16, 40), base_size=None, scale_range=(0.5, 0.5))  # 20x30: crop rows, pad cols
    ds = UnlabeledClips(vs, vs.frames(), aug, num_frames=1)
    starts, flips = set(), set()
    for seed in range(8):
        s = ds[(1, seed)]
        valid = s.valid[0].numpy()
        img = denormalize(s.image[0])
        np.testing.assert_array_equal(valid, img[:, :, 2] == 255)  # bilinear keeps B = 255 inside
        assert valid[:, 5:35].all() and not valid[:, :5].any() and not valid[:, 35:].any()
        r = img[:, 20, 0].astype(int)  # row coordinate: ~8 per output row after the 0.5 rescale
        assert np.all(np.diff(r) == 8)  # consecutive source rows, not flipped vertically
        starts.add(int(r[0]))
        g = img[8, 5:35, 1].astype(int)
        flips.add(bool(g[0] > g[-1]))
        assert np.all(np.abs(np.diff(g)) == 8)
    assert len(starts) > 1 and flips == {True, False}  # the crop and the flip vary with the seed


def test_adding_the_valid_mask_leaves_images_and_draws_unchanged(tmp_path: Path) -> None:
    """Oracle: the previous code path (no mask through the augmentation) with the same draws."""
    vs = load_folder(_write_folder(tmp_path, {"v": 5, "w": 3}))
    aug = ClipAugment((40, 56), base_size=(48, 64), scale_range=(0.5, 2.0))
    ds = UnlabeledClips(vs, vs.frames(), aug, num_frames=3, offsets=(-2, 2), strong_copies=2)
    strong = StrongPhotometric()
    padded = 0
    for idx, seed in [(0, 0), (1, 12345), (4, 0), (6, 7), (7, 3), (2, 99)]:
        s = ds[(idx, seed)]
        rng = np.random.default_rng(seed)
        ref = ds.frames[idx]
        video = vs.video(ref.video)
        pos = video.position(ref.index)
        others = pick_neighbours(rng, len(video), pos, 2, (-2, 2))
        images = [vs.read_image(video.frames[q]) for q in [pos, *others]]
        imgs, _ = aug(images, [None] * 3, int(rng.integers(2**32)))
        assert torch.equal(s.image, torch.stack([to_tensor(im) for im in imgs]))
        assert s.offset.tolist() == [0] + [q - pos for q in others]
        assert len(s.strong) == 2
        for k in range(2):
            expect = torch.stack([to_tensor(strong(im, int(rng.integers(2**32)))) for im in imgs])
            assert torch.equal(s.strong[k], expect), k
        padded += int((~s.valid).any())
    assert padded > 0  # some of these samples are down-scaled and padded


def test_labeled_valid_marks_padding_and_leaves_image_and_label_unchanged(tmp_path: Path) -> None:
    """Labeled clips carry ``valid`` (H,W): False exactly in the crop padding (label 255 there),
    True on every frame pixel (void ones included); image and label equal the plain call's."""
    vs = load_folder(_coord_folder(tmp_path, 20, 24))
    labels = tmp_path / "labels" / "v"
    lab = np.zeros((20, 24), np.uint8)
    lab[:4] = 255  # void pixels of the frame stay valid
    for f in labels.iterdir():
        cv2.imwrite(str(f), lab)
    aug = ClipAugment((32, 40), base_size=None, scale_range=(1.0, 2.5))
    ds = LabeledClips(vs, vs.frames(), aug, context_frames=1, context_offsets=(-1, 1))
    padded = void_valid = 0
    for seed in range(8):
        s = ds[(0, seed)]
        valid = s.valid
        assert valid.dtype == torch.bool and valid.shape == (32, 40)
        img = denormalize(s.image)
        np.testing.assert_array_equal(valid.numpy(), img[:, :, 2] == 255)
        assert (s.label[~valid] == 255).all()
        void_valid += int((s.label[valid] == 255).any())  # void pixels of the frame are valid
        padded += int((~valid).any())
        rng = np.random.default_rng(seed)  # oracle: the plain augmentation with the same draws
        ctx = pick_neighbours(rng, 2, 0, 1, (-1, 1))
        frames = [vs.video("v").frames[q] for q in [0, *ctx]]
        imgs, masks = aug([vs.read_image(f) for f in frames], [vs.read_label(frames[0]), None],
                          int(rng.integers(2**32)))
        assert torch.equal(s.image, to_tensor(imgs[0])) and torch.equal(s.context[0], to_tensor(imgs[1]))
        np.testing.assert_array_equal(s.label.numpy(), masks[0])
    assert 0 < padded < 8 and void_valid > 0  # scales below 5/3 are padded, larger ones are not

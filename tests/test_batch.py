"""Typed training batches (semivss.data.batch) and data requests / DataSpec (semivss.data.requests)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_self_training import gt_label, random_q, write_pseudo_set

from semivss.data.batch import LabeledBatch, PseudoBatch, UnlabeledBatch
from semivss.data.clips import LabeledClips, UnlabeledClips
from semivss.data.config import DataConfig, SplitConfig, build_augment
from semivss.data.formats import load_dataset
from semivss.data.pseudo import PseudoLabeledFrames
from semivss.data.requests import LabeledRequest, PseudoRequest, TrainSource, UnlabeledRequest
from semivss.data.splits import Split, single_frame
from semivss.data.synthetic import generate_synthetic
from semivss.data.video import VideoSet
from semivss.engine.trainer import collate_any
from semivss.errors import ConfigError, DataError
from semivss.methods.base import DataSpec

H, W = 4, 5


def labeled(seed: int = 0, k: int = 0, strong: bool = False) -> LabeledBatch:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(k, 3, H, W, generator=g) if k else None
    return LabeledBatch(
        torch.randn(3, H, W, generator=g), torch.randint(0, 3, (H, W), generator=g),
        torch.rand(H, W, generator=g) > 0.3, ctx,
        torch.arange(1, k + 1, dtype=torch.int64) if k else None,
        torch.randn(k, 3, H, W, generator=g) if k and strong else None,
    )


def unlabeled(seed: int = 0, n: int = 2, copies: int = 0) -> UnlabeledBatch:
    g = torch.Generator().manual_seed(seed)
    return UnlabeledBatch(
        torch.randn(n, 3, H, W, generator=g), torch.arange(n, dtype=torch.int64),
        torch.rand(n, H, W, generator=g) > 0.3,
        [torch.randn(n, 3, H, W, generator=g) for _ in range(copies)],
    )


def pseudo(seed: int = 0, strong: bool = False) -> PseudoBatch:
    g = torch.Generator().manual_seed(seed)
    return PseudoBatch(
        torch.randn(3, H, W, generator=g), torch.randint(0, 3, (H, W), generator=g),
        torch.rand(H, W, generator=g), torch.rand(H, W, generator=g) > 0.3,
        [torch.randn(3, H, W, generator=g)] if strong else [],
    )


# ------------------------------------------------------------------ collate
def test_collate_labeled_stacks_fields_and_keeps_none() -> None:
    samples = [labeled(s) for s in range(3)]
    b = LabeledBatch.collate(samples)
    assert isinstance(b, LabeledBatch)
    assert b.image.shape == (3, 3, H, W) and b.label.shape == (3, H, W) and b.valid.shape == (3, H, W)
    assert b.valid.dtype == torch.bool and b.label.dtype == torch.int64
    assert b.context is None and b.context_offset is None and b.context_strong is None
    for i, s in enumerate(samples):
        assert torch.equal(b.image[i], s.image) and torch.equal(b.valid[i], s.valid)
    ctx = LabeledBatch.collate([labeled(s, k=2, strong=True) for s in range(3)])
    assert ctx.context.shape == ctx.context_strong.shape == (3, 2, 3, H, W)
    assert ctx.context_offset.shape == (3, 2) and ctx.context_offset.dtype == torch.int64


def test_collate_mixed_none_and_empty_are_errors() -> None:
    with pytest.raises(ValueError, match=r"LabeledBatch\.context is set in some samples only"):
        LabeledBatch.collate([labeled(0), labeled(1, k=1)])
    with pytest.raises(ValueError, match="empty"):
        UnlabeledBatch.collate([])
    with pytest.raises(ValueError, match=r"UnlabeledBatch\.strong.*different list lengths"):
        UnlabeledBatch.collate([unlabeled(0, copies=1), unlabeled(1, copies=2)])


def test_collate_unlabeled_and_pseudo_stack_list_fields() -> None:
    samples = [unlabeled(s, n=3, copies=2) for s in range(2)]
    b = UnlabeledBatch.collate(samples)
    assert b.image.shape == (2, 3, 3, H, W) and b.offset.shape == (2, 3) and b.valid.shape == (2, 3, H, W)
    assert isinstance(b.strong, list) and len(b.strong) == 2
    for k in range(2):
        assert b.strong[k].shape == (2, 3, 3, H, W)
        assert torch.equal(b.strong[k][1], samples[1].strong[k])
    assert UnlabeledBatch.collate([unlabeled(0), unlabeled(1)]).strong == []
    p = PseudoBatch.collate([pseudo(s, strong=True) for s in range(4)])
    assert p.image.shape == (4, 3, H, W) and p.entropy.shape == p.label.shape == p.valid.shape == (4, H, W)
    assert len(p.strong) == 1 and p.strong[0].shape == (4, 3, H, W)
    assert PseudoBatch.collate([pseudo(0), pseudo(1)]).strong == []


def test_collate_any_dispatches_on_the_sample_type() -> None:
    assert isinstance(collate_any([labeled(0), labeled(1)]), LabeledBatch)
    assert isinstance(collate_any([unlabeled(0), unlabeled(1)]), UnlabeledBatch)
    assert isinstance(collate_any([pseudo(0), pseudo(1)]), PseudoBatch)
    plain = collate_any([{"x": torch.zeros(2)}, {"x": torch.ones(2)}])  # anything else: default_collate
    assert plain["x"].shape == (2, 2)


# ------------------------------------------------------------------ map_tensors, frozen, shapes
def test_map_tensors_applies_to_tensors_and_list_items_and_keeps_none() -> None:
    b = UnlabeledBatch.collate([unlabeled(s, copies=2) for s in range(2)])
    half = b.map_tensors(lambda t: t[:1])
    assert isinstance(half, UnlabeledBatch) and half is not b
    assert half.image.shape[0] == half.offset.shape[0] == half.valid.shape[0] == 1
    assert [s.shape[0] for s in half.strong] == [1, 1]
    assert b.image.shape[0] == 2  # the original is unchanged
    lab = LabeledBatch.collate([labeled(0), labeled(1)]).map_tensors(lambda t: t.double())
    assert lab.image.dtype == torch.float64 and lab.context is None and lab.context_strong is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        lab.image = torch.zeros(1)  # type: ignore[misc]


def test_shape_checks_name_the_field() -> None:
    img, lab = torch.zeros(3, H, W), torch.zeros(H, W, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"LabeledBatch\.valid has shape \(4, 4\), expected \(4, 5\)"):
        LabeledBatch(img, lab, torch.ones(H, H, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"LabeledBatch\.context_strong"):
        LabeledBatch(img, lab, torch.ones(H, W, dtype=torch.bool), torch.zeros(2, 3, H, W),
                     torch.zeros(2, dtype=torch.int64), torch.zeros(1, 3, H, W))
    clip = torch.zeros(2, 3, H, W)
    with pytest.raises(ValueError, match=r"UnlabeledBatch\.valid.*expected \(2, 4, 5\)"):
        UnlabeledBatch(clip, torch.zeros(2, dtype=torch.int64), torch.ones(H, W, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"UnlabeledBatch\.strong\[1\]"):
        UnlabeledBatch(clip, torch.zeros(2, dtype=torch.int64), torch.ones(2, H, W, dtype=torch.bool),
                       [clip, clip[:1]])
    ok = torch.ones(H, W, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"PseudoBatch\.entropy"):
        PseudoBatch(img, lab, torch.zeros(H, W + 1), ok)
    with pytest.raises(ValueError, match=r"PseudoBatch\.valid"):
        PseudoBatch(img, lab, torch.zeros(H, W), ok[:, :2])
    with pytest.raises(ValueError, match=r"PseudoBatch\.strong\[0\]"):
        PseudoBatch(img, lab, torch.zeros(H, W), ok, [clip])


def test_frame_valid_reads_one_frame_as_bool() -> None:
    valid = torch.zeros(2, 3, H, W, dtype=torch.uint8)
    valid[:, 1, :2] = 1
    b = UnlabeledBatch(torch.zeros(2, 3, 3, H, W), torch.zeros(2, 3, dtype=torch.int64), valid)
    got = b.frame_valid(1)
    assert got.dtype == torch.bool and got.shape == (2, H, W)
    assert int(got.sum()) == 2 * 2 * W and not bool(b.frame_valid().any())


# ------------------------------------------------------------------ DataSpec
def test_dataspec_default_labeled_request_keys_and_get() -> None:
    assert DataSpec().requests == (LabeledRequest(),) and DataSpec().keys == ("labeled",)
    spec = DataSpec.of(UnlabeledRequest(frames=2, strong_copies=1))
    assert spec.keys == ("labeled", "unlabeled")
    assert spec.get("labeled") == LabeledRequest()
    assert spec.get("unlabeled") == UnlabeledRequest(frames=2, strong_copies=1)
    assert spec.get("pseudo") is None
    given = LabeledRequest(context_frames=2, context_strong=True)
    spec = DataSpec.of(given, PseudoRequest(strong=True))
    assert spec.keys == ("labeled", "pseudo") and spec.get("labeled") is given
    assert DataSpec.of(UnlabeledRequest()) == DataSpec.of(LabeledRequest(), UnlabeledRequest())


def test_dataspec_and_request_errors() -> None:
    with pytest.raises(ConfigError, match="requested once"):
        DataSpec.of(UnlabeledRequest(), UnlabeledRequest(frames=2))
    with pytest.raises(ConfigError, match="requested once"):
        DataSpec.of(LabeledRequest(), LabeledRequest(context_frames=1))
    with pytest.raises(ConfigError, match="context_frames"):
        LabeledRequest(context_frames=-1)
    with pytest.raises(ConfigError, match="context_offsets"):
        LabeledRequest(context_offsets=(2, -2))
    with pytest.raises(ConfigError, match="frames"):
        UnlabeledRequest(frames=0)
    with pytest.raises(ConfigError, match="strong_copies"):
        UnlabeledRequest(strong_copies=-1)
    with pytest.raises(ConfigError, match="unlabeled_offsets"):
        UnlabeledRequest(offsets=(1, 0))


# ------------------------------------------------------------------ request.build
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VideoSet]:
    root = generate_synthetic(tmp_path_factory.mktemp("synth") / "data", videos=3, frames=6, height=24,
                              width=32, seed=0, val_videos=1)
    return root, load_dataset("synthetic", root, "train")


def _source(synth: tuple[Path, VideoSet], split: Split | None = None, **data) -> TrainSource:
    root, vs = synth
    data = {"crop_size": (16, 16), "base_size": None, "batch_size": 2, "unlabeled_batch_size": 3, **data}
    cfg = DataConfig(format="synthetic", root=root, split=SplitConfig(mode="single", position=2), **data)
    return TrainSource(vs, split or single_frame(vs, 2), build_augment(cfg), cfg, "toy")


def test_requests_build_dataset_and_batch_size(synth: tuple[Path, VideoSet], tmp_path: Path) -> None:
    source = _source(synth)
    ds, size = LabeledRequest(context_frames=1, context_offsets=(-1, 1), context_strong=True).build(source)
    assert isinstance(ds, LabeledClips) and size == 2 and len(ds) == len(source.split.labeled)
    s = ds[(0, 3)]
    assert isinstance(s, LabeledBatch) and s.image.shape == (3, 16, 16)
    assert s.context.shape == s.context_strong.shape == (1, 3, 16, 16) and abs(int(s.context_offset[0])) == 1

    ds, size = UnlabeledRequest(frames=2, offsets=(-2, 2), strong_copies=2).build(source)
    assert isinstance(ds, UnlabeledClips) and size == 3 and len(ds) == len(source.split.unlabeled)
    u = ds[(1, 3)]
    assert isinstance(u, UnlabeledBatch) and u.image.shape == (2, 3, 16, 16) and len(u.strong) == 2
    assert u.valid.shape == (2, 16, 16) and u.offset[0] == 0 and 1 <= abs(int(u.offset[1])) <= 2

    with pytest.raises(ConfigError, match=r"data\.pseudo_labels.*'toy'"):
        PseudoRequest().build(source)
    pset = write_pseudo_set(tmp_path / "set", source.videoset, source.split.unlabeled,
                            gt_label(source.videoset), random_q())
    ds, size = PseudoRequest(strong=True).build(_source(synth, pseudo_labels=pset))
    assert isinstance(ds, PseudoLabeledFrames) and size == 3
    p = ds[(0, 1)]
    assert isinstance(p, PseudoBatch) and p.image.shape == (3, 16, 16) and len(p.strong) == 1


def test_request_build_errors(synth: tuple[Path, VideoSet]) -> None:
    _, vs = synth
    with pytest.raises(ConfigError, match=r"data\.unlabeled_batch_size.*'toy'"):
        UnlabeledRequest().build(_source(synth, unlabeled_batch_size=0))
    every = Split(vs.annotated(), [])
    with pytest.raises(DataError, match="no unlabeled frames.*'toy'"):
        UnlabeledRequest().build(_source(synth, split=every))

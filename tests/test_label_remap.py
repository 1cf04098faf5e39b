"""Label remapping by a lookup table (docs/methods.md#7-offline-teacher-student-self-training, PVUW 2024 section 3.1): LUT semantics (unmapped
ids and 255 -> 255), YAML / JSON / CSV files, validation errors naming the file and the entry,
and `data.label_map` applied to loaded video sets (composed with their raw-label LUT)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semivss.data.config import DataConfig, load_videosets
from semivss.data.formats import load_dataset
from semivss.data.remap import LabelMap, compose_lut
from semivss.data.synthetic import generate_synthetic
from semivss.data.video import Frame, Video, VideoSet, make_label_lut
from semivss.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ LUT semantics
def test_lut_maps_listed_ids_and_sends_everything_else_to_255() -> None:
    m = LabelMap.from_mapping({0: 1, 2: 0, 5: "car", "7": None, 8: 255}, target_classes=["road", "sky", "car"])
    lut = m.lut
    assert lut.shape == (256,) and lut.dtype == np.uint8
    expected = np.full(256, 255, np.uint8)
    expected[[0, 2, 5]] = [1, 0, 2]
    assert np.array_equal(lut, expected)
    assert m.num_classes == 3 and m.classes == ("road", "sky", "car")
    label = np.array([[0, 1, 2], [5, 7, 255], [8, 254, 3]], np.uint8)
    assert m.apply(label).tolist() == [[1, 255, 0], [2, 255, 255], [255, 255, 255]]
    assert m.apply(label.astype(np.int64)).dtype == np.uint8
    with pytest.raises(ValueError, match="0..255"):
        m.apply(np.array([[256]]))
    # names default to class<i> with a count
    assert LabelMap.from_mapping({3: 0}, num_target_classes=2).classes == ("class0", "class1")


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({0: 3}, "entry 0: target id 3 out of range"),
        ({0: -1}, "entry 0: target id -1 out of range"),
        ({"x": 0}, "source id 'x' is not an integer"),
        ({1.5: 0}, "source id 1.5 is not an integer"),
        ({255: 0}, "source id 255 is outside"),
        ({0: "bus"}, "unknown target class name 'bus'"),
        ({0: 1.5}, "target 1.5 is neither"),
    ],
)
def test_mapping_errors_name_the_entry(mapping: dict, needle: str) -> None:
    with pytest.raises(DataError, match=re.escape(needle)):
        LabelMap.from_mapping(mapping, target_classes=["a", "b", "c"], source="my map")


# ------------------------------------------------------------------ files
def test_yaml_json_and_csv_files_give_the_same_map(tmp_path: Path) -> None:
    y = write(tmp_path / "m.yaml", "target_classes: [road, sky, car]\nmap: {0: sky, 1: 0, 4: car, 6: null}\n")
    j = write(tmp_path / "m.json", json.dumps({"target_classes": ["road", "sky", "car"],
                                               "map": {"0": "sky", "1": 0, "4": 2, "6": 255}}))
    c = write(tmp_path / "m.csv", "src,tgt,name\n0,1,sky\n1,0,road\n4,2,car\n6,ignore\n")
    maps = [LabelMap.from_file(p) for p in (y, j, c)]
    for m in maps:
        assert m.classes == ("road", "sky", "car")
        assert m.mapping == {0: 1, 1: 0, 4: 2, 6: 255}
        assert np.array_equal(m.lut, maps[0].lut)
    # CSV without header or names: classes 0..max(tgt), named class<i>
    bare = LabelMap.from_file(write(tmp_path / "bare.csv", "3,1\n5,0\n"))
    assert bare.classes == ("class0", "class1") and bare.mapping == {3: 1, 5: 0}
    # CSV target names with the class list given by the caller
    named = LabelMap.from_file(write(tmp_path / "named.csv", "3,car\n"), target_classes=["road", "car"])
    assert named.mapping == {3: 1}
    # optional palette
    pal = LabelMap.from_file(write(tmp_path / "p.yml", "target_classes: [a, b]\npalette: [[1, 2, 3], [4, 5, 6]]\nmap: {0: 1}\n"))
    assert pal.palette is not None and pal.palette.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("dup.yaml", "target_classes: [a, b]\nmap:\n  1: a\n  1: b\n", "duplicate key 1"),
        ("dup2.yaml", "target_classes: [a, b]\nmap: {1: a, '1': b}\n", "duplicate source id 1"),
        ("dup.json", '{"target_classes": ["a"], "map": {"1": 0, "1": 0}}', "duplicate key '1'"),
        ("dup.csv", "1,0\n2,0\n1,0\n", "line 3: duplicate source id 1"),
        ("range.yaml", "target_classes: [a, b]\nmap: {4: 2}\n", "entry 4: target id 2 out of range"),
        ("range.csv", "src,tgt\n1,0\n2,-3\n", "line 3: target id -3 out of range"),
        ("nonint.yaml", "target_classes: [a]\nmap: {x1: 0}\n", "source id 'x1' is not an integer"),
        ("nonint.csv", "1.5,0\n", "line 1: source id '1.5' is not an integer"),
        ("nonint2.csv", "1,zero\n", "line 1: target 'zero' is not an integer id"),
        ("name.json", '{"target_classes": ["a"], "map": {"0": "b"}}', "unknown target class name 'b'"),
        ("nokey.yaml", "map: {0: 0}\n", "'target_classes'"),
        ("extra.yaml", "target_classes: [a]\nmap: {}\nmapping: {}\n", "unknown key(s) ['mapping']"),
        ("sameclass.yaml", "target_classes: [a, a]\nmap: {}\n", "duplicate target class names ['a']"),
        ("broken.json", "{nope", "cannot parse"),
        ("cols.csv", "1,2,x,y\n", "line 1: expected"),
        ("map.txt", "1,2\n", "unknown file type"),
    ],
)
def test_file_errors_name_the_file_and_entry(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=re.escape(needle)) as exc:
        LabelMap.from_file(path)
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "none.yaml"))):
        LabelMap.from_file(tmp_path / "none.yaml")


# ------------------------------------------------------------------ composition with a video set
def test_compose_with_raw_label_lut_keeps_ignore_and_unknown(tmp_path: Path) -> None:
    # raw 0..2 are classes, raw 11 is void (-> 255), everything else unknown (an error)
    base = make_label_lut(3, ignore=(11, 255))
    m = LabelMap.from_mapping({0: 1, 2: 0}, target_classes=["x", "y"], source="tiny map")
    lut = compose_lut(base, m, 3)
    assert lut[0] == 1 and lut[1] == 255 and lut[2] == 0 and lut[11] == 255 and lut[255] == 255
    assert lut[20] == 254  # still unknown
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "f.png")
    Image.fromarray(np.array([[0, 1, 2, 11, 255, 0]] * 4, np.uint8)).save(tmp_path / "l.png")
    Image.fromarray(np.array([[0, 20, 2, 11, 255, 0]] * 4, np.uint8)).save(tmp_path / "bad.png")
    vs = VideoSet("raw", [Video("v", [Frame("v", 0, image=tmp_path / "f.png", label=tmp_path / "l.png"),
                                      Frame("v", 1, image=tmp_path / "f.png", label=tmp_path / "bad.png")])],
                  ["a", "b", "c"], label_lut=base)
    out = m.remap_videoset(vs)
    assert out.classes == ["x", "y"] and out.num_classes == 2 and out.palette.shape == (2, 3)
    assert out.read_label(vs.frames()[0])[0].tolist() == [1, 255, 0, 255, 255, 1]
    with pytest.raises(DataError, match=r"raw values \[20\]"):
        out.read_label(vs.frames()[1])
    assert vs.classes == ["a", "b", "c"]  # the original set is unchanged
    with pytest.raises(DataError, match="tiny map: source ids \\[5\\] do not exist"):
        LabelMap.from_mapping({5: 0}, 2, source="tiny map").remap_videoset(vs)


def test_data_config_label_map_remaps_train_and_val_sets(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "synth", videos=3, frames=3, height=32, width=48, seed=1, val_videos=1)
    # synthetic classes: sky building vegetation road sidewalk pole car person
    lm = write(tmp_path / "map.yaml", "target_classes: [background, vehicle, human]\n"
                                      "map: {0: background, 1: background, 2: 0, 6: vehicle, 7: human}\n")
    cfg = DataConfig(format="synthetic", root=root, label_map=lm)
    train, val = load_videosets(cfg)
    src = load_dataset("synthetic", root, "train")
    assert train.classes == ["background", "vehicle", "human"] and val is not None and val.num_classes == 3
    lut = np.full(256, 255, np.uint8)
    lut[[0, 1, 2, 6, 7]] = [0, 0, 0, 1, 2]
    seen = set()
    for ref in src.annotated():
        raw = src.read_label(ref)
        got = train.read_label(ref)
        assert np.array_equal(got, lut[raw])
        seen |= set(np.unique(got).tolist())
    assert 255 in seen and seen <= {0, 1, 2, 255}
    # an entry naming a source class the dataset does not have
    bad = write(tmp_path / "bad.yaml", "target_classes: [a]\nmap: {9: a}\n")
    with pytest.raises(DataError, match=re.escape(str(bad)) + r".*source ids \[9\]"):
        load_videosets(DataConfig(format="synthetic", root=root, label_map=bad))

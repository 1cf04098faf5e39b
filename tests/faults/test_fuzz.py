"""A hypothesis-driven fuzzer over the config loader and the dataset readers: whatever the bytes,
sizes or keys, the outcome is a valid result or the project's own one-line error (ConfigError /
DataError naming the file or key), never another exception; through the CLI, exit code 2 and
nothing of the user's changed."""

from __future__ import annotations

import io
import string
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from semivss.config import load_config
from semivss.errors import ConfigError, DataError

pytestmark = pytest.mark.fault

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)

SECTIONS = {
    "data": ["format", "root", "split", "crop_size", "base_size", "scale_range", "hflip", "batch_size", "num_workers"],
    "model": ["arch", "backbone", "output_stride", "pretrained", "dropout", "init_from"],
    "method": ["name", "conf_thresh", "loss_u_weight", "ema_decay", "gamma"],
    "optim": ["name", "lr", "momentum", "weight_decay", "head_lr_mult"],
    "schedule": ["iters", "policy", "power", "warmup_iters"],
    "train": ["seed", "precision", "log_interval", "eval_interval", "ckpt_interval", "num_workers"],
    "eval": ["mode", "size", "scales", "flip", "batch_size"],
}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(sorted({k for ks in SECTIONS.values() for k in ks})), st.text(max_size=8))
sections = st.dictionaries(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6),
                           st.dictionaries(keys, values, max_size=4) | scalars, max_size=5)


def _is_one_line_error(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert text and "\n" not in text, text
    for n in needles:
        assert n in text, (n, text)


@FUZZ
@given(tree=sections)
def test_config_loader_fuzz(tree, tmp_path, record_property) -> None:
    test_config_loader_fuzz.count = getattr(test_config_loader_fuzz, "count", 0) + 1
    path = tmp_path / "fuzz.yaml"
    tree = {"data": {"format": "synthetic", "root": "x"}, **tree}
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    try:
        load_config(path)
    except ConfigError as exc:
        _is_one_line_error(exc, str(path))
    record_property("fuzz_inputs", test_config_loader_fuzz.count)


@FUZZ
@given(data=st.binary(max_size=300), override=st.text(max_size=20))
def test_config_bytes_and_overrides_fuzz(data, override, tmp_path, record_property) -> None:
    test_config_bytes_and_overrides_fuzz.count = getattr(test_config_bytes_and_overrides_fuzz, "count", 0) + 1
    path = tmp_path / "bytes.yaml"
    path.write_bytes(data)
    for overrides in ([], [override], [f"optim.{override}"]):
        try:
            load_config(path, overrides)
        except ConfigError as exc:
            _is_one_line_error(exc)
    record_property("fuzz_inputs", test_config_bytes_and_overrides_fuzz.count)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from semivss.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("fuzzset") / "s", videos=2, frames=3, height=32, width=48,
                              seed=0)


@FUZZ
@given(data=st.binary(max_size=400), mangle=st.sampled_from(["random", "truncate", "flip"]))
def test_image_and_label_readers_fuzz(data, mangle, tmp_path, record_property) -> None:
    """Random bytes, a truncated real PNG or a real PNG with flipped bytes as an image, a label
    and an mp4: a DataError naming the file, or a valid array."""
    from semivss.data.video import probe_mp4, read_image_file, read_raw_label_file
    from semivss.inference.video import iter_source

    test_image_and_label_readers_fuzz.count = getattr(test_image_and_label_readers_fuzz, "count", 0) + 1
    real = _png(np.arange(16 * 24 * 3, dtype=np.uint8).reshape(16, 24, 3))
    if mangle == "truncate":
        blob = real[: len(data) % len(real)]
    elif mangle == "flip":
        arr = bytearray(real)
        for i, b in enumerate(data[:20]):
            arr[(i * 131 + b) % len(arr)] ^= b or 1
        blob = bytes(arr)
    else:
        blob = data
    for name, read in (("f.png", read_image_file), ("l.png", read_raw_label_file), ("v.mp4", probe_mp4),
                       ("w.mp4", lambda p: list(iter_source(p)))):
        path = tmp_path / name
        path.write_bytes(blob)
        try:
            out = read(path)
        except DataError as exc:
            _is_one_line_error(exc, str(path))
            continue
        if name.endswith(".png"):
            assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    record_property("fuzz_inputs", test_image_and_label_readers_fuzz.count)


@FUZZ
@given(h=st.integers(1, 60), w=st.integers(1, 60), top=st.integers(0, 255))
@example(h=32, w=48, top=2)
def test_label_sizes_and_values_fuzz(synth, h, w, top, tmp_path, record_property) -> None:
    """A label of a random size and value range: valid only when it matches its image and holds
    known values; otherwise a DataError naming the label file."""
    import shutil

    from semivss.data.formats import load_dataset

    test_label_sizes_and_values_fuzz.count = getattr(test_label_sizes_and_values_fuzz, "count", 0) + 1
    root = tmp_path / "s"
    if not root.exists():
        shutil.copytree(synth, root)
    vs = load_dataset("synthetic", root, "train")
    ref = vs.annotated()[0]
    label = vs.frame(ref).label
    label.write_bytes(_png((np.arange(h * w) % (top + 1)).astype(np.uint8).reshape(h, w)))
    try:
        lab = vs.read_label(ref)
    except DataError as exc:
        _is_one_line_error(exc, str(label))
    else:
        assert lab.shape == (32, 48) and (h, w) == (32, 48)
    record_property("fuzz_inputs", test_label_sizes_and_values_fuzz.count)


@pytest.fixture(scope="module")
def model(synth, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from semivss.cli import app

    root = tmp_path_factory.mktemp("fuzzmodel")
    cfg = {"name": "z", "out_dir": str(root / "run"),
           "data": {"format": "synthetic", "root": str(synth), "split": {"mode": "single", "position": 1},
                    "base_size": [32, 48], "crop_size": [32, 32],
                    "batch_size": 2, "num_workers": 0},
           "model": {"backbone": "mobilenet_v2", "pretrained": None}, "schedule": {"iters": 1},
           "train": {"precision": "fp32"}, "eval": {"size": [32, 48]}}
    (root / "z.yaml").write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["train", str(root / "z.yaml")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return root / "run" / "model.safetensors"


@pytest.mark.parametrize("seed", range(3))
def test_cli_evaluate_on_fuzzed_frames(synth, model, tmp_path, seed, monkeypatch, capsys, record_property) -> None:
    """Through the command line: exit 2, one line naming the file, the dataset untouched."""
    import shutil

    from semivss.data.formats import load_dataset
    from test_cli_errors import run_main

    rng = np.random.default_rng(seed)
    root = tmp_path / "s"
    shutil.copytree(synth, root)
    vs = load_dataset("synthetic", root, "val")
    victim = vs.frame(vs.annotated()[int(rng.integers(len(vs.annotated())))])
    target = victim.image if seed != 1 else victim.label
    target.write_bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes())
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    code, out = run_main(["evaluate", model, "--data", root, "--format", "synthetic", "--out", tmp_path / "e"],
                         monkeypatch, capsys)
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in out, out
    assert len(errors) == 1 and lines[-1] == errors[0] and str(target) in errors[0], out  # progress lines before it
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "e").exists()
    record_property("fuzz_inputs", 1)

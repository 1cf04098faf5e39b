"""End to end through the command line on a tiny synthetic set: synth -> train -> evaluate
(with the offset analysis) -> predict; user errors exit with code 2 and a message naming the cause."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from semivss.cli import app, main

runner = CliRunner()


def _invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    data = root / "synth"
    _invoke(["data", "synth", data, "--videos", "4", "--frames", "10", "--height", "48", "--width", "64", "--seed", "3"])
    cfg = {
        "name": "tiny",
        "out_dir": str(root / "run"),
        "data": {
            "format": "synthetic", "root": str(data), "split": {"mode": "single", "position": 4},
            "base_size": [48, 64], "crop_size": [48, 48], "batch_size": 2, "num_workers": 0,
        },
        "model": {"backbone": "mobilenet_v2", "pretrained": None},
        "optim": {"lr": 0.01},
        "schedule": {"iters": 4},
        "train": {"log_interval": 2, "eval_interval": 2, "ckpt_interval": 2, "precision": "fp32"},
        "eval": {"size": [48, 64]},
    }
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    _invoke(["train", cfg_path])
    return {"root": root, "data": data, "run": root / "run", "cfg": cfg_path}


def test_train_outputs(tiny) -> None:
    run = tiny["run"]
    for name in ("config.yaml", "metrics.csv", "model.safetensors", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).exists(), name


def test_evaluate_with_offsets(tiny) -> None:
    out = tiny["root"] / "eval"
    _invoke(["evaluate", tiny["run"] / "checkpoints/best.pt", "--data", tiny["data"], "--format", "synthetic",
             "--split", "val", "--offsets", "--label-position", "4", "--out", out, "--save-preds"])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("mIoU", "fwIoU", "pixel_acc", "VC8"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_frames"] == 10  # one held-out video of 10 frames, every frame annotated
    assert (out / "offsets.png").stat().st_size > 1000
    rows = json.loads((out / "offsets.json").read_text())
    n_videos = {"train": 3, "val": 1}
    for split, n in n_videos.items():
        mine = [r for r in rows if f"({split})" in r["subset"]]
        # 10 frames per video labeled at position 4: offsets -4..+5, one frame per video each.
        assert sorted(r["offset"] for r in mine) == list(range(-4, 6)), split
        assert all(r["n_frames"] == n and 0.0 <= r["mIoU"] <= 1.0 for r in mine), split
    preds = sorted((out / "preds").rglob("*.png"))
    assert preds, "no prediction PNGs"
    pred = np.asarray(Image.open(preds[0]))
    assert pred.shape == (48, 64) and pred.max() < 8
    # A second run into the same folder must not clobber it.
    again = runner.invoke(app, ["evaluate", str(tiny["run"] / "model.safetensors"), "--data", str(tiny["data"]),
                                "--format", "synthetic", "--out", str(out)])
    assert again.exit_code != 0 and "exists" in str(again.exception)


def test_predict_folder_writes_pngs_overlays_and_mp4(tiny) -> None:
    video = (tiny["data"] / "val.txt").read_text().split()[0]
    out = tiny["root"] / "pred"
    _invoke(["predict", tiny["run"] / "model.safetensors", tiny["data"] / "videos" / video, out])
    assert len(list((out / "labels").glob("*.png"))) == 10
    assert len(list((out / "overlays").glob("*"))) == 10
    assert (out / "overlay.mp4").stat().st_size > 0


def test_smooth_option_steps_every_frame_and_raises_vc(tiny) -> None:
    """--smooth (a temporal VideoPredictor) through evaluate and predict: a momentum near 1 keeps
    most of the first frame's prediction, so consecutive predictions agree at least as often."""
    outs = {}
    for m in ("0", "0.9"):
        out = tiny["root"] / f"eval-smooth-{m}"
        _invoke(["evaluate", tiny["run"] / "model.safetensors", "--data", tiny["data"], "--format",
                 "synthetic", "--split", "val", "--smooth", m, "--out", out])
        outs[m] = json.loads((out / "metrics.json").read_text())["metrics"]
    assert outs["0.9"]["n_frames"] == outs["0"]["n_frames"] == 10
    assert outs["0.9"]["VC8"] >= outs["0"]["VC8"]
    video = (tiny["data"] / "val.txt").read_text().split()[0]
    out = tiny["root"] / "pred-smooth"
    _invoke(["predict", tiny["run"] / "model.safetensors", tiny["data"] / "videos" / video, out,
             "--smooth", "0.5"])
    assert len(list((out / "labels").glob("*.png"))) == 10
    bad = runner.invoke(app, ["predict", str(tiny["run"] / "model.safetensors"),
                              str(tiny["data"] / "videos" / video), str(tiny["root"] / "p2"), "--smooth", "1"])
    assert bad.exit_code != 0 and "momentum" in str(bad.exception)


def test_user_errors_exit_2_with_named_key(tiny, tmp_path, monkeypatch, capsys) -> None:
    bad = yaml.safe_load(tiny["cfg"].read_text())
    bad["train"]["learning_rate"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    monkeypatch.setattr("sys.argv", ["semivss", "train", str(path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "train.learning_rate" in capsys.readouterr().err  # errors go to stderr


def test_fresh_train_refuses_used_out_dir(tiny) -> None:
    result = runner.invoke(app, ["train", str(tiny["cfg"])])
    assert result.exit_code != 0
    assert "resume" in str(result.exception)


def test_resumed_run_equals_uninterrupted_run_on_real_pipeline(tiny, tmp_path, monkeypatch) -> None:
    """Real data pipeline (albumentations augmentation, MobileNetV2 model, a worker process):
    4 iterations straight == 2 iterations, interruption, resume to 4 — parameter for parameter."""
    import torch
    from safetensors.torch import load_file

    from semivss.config import load_config
    from semivss.engine import trainer as trainer_mod
    from semivss.experiment import train

    base = ["schedule.iters=4", "train.eval_interval=0", "train.ckpt_interval=2", "data.num_workers=1"]
    train(load_config(tiny["cfg"], base + [f"out_dir={tmp_path / 'straight'}"]))
    cfg = load_config(tiny["cfg"], base + [f"out_dir={tmp_path / 'resumed'}"])
    original = trainer_mod.Trainer._save

    def stop_after_first_save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(trainer_mod.Trainer, "_save", stop_after_first_save)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    train(cfg, resume=True)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_compare_offsets_merges_models(tiny) -> None:
    source = tiny["root"] / "eval" / "offsets.json"
    if not source.exists():  # test order: produce it the same way test_evaluate_with_offsets does
        _invoke(["evaluate", tiny["run"] / "model.safetensors", "--data", tiny["data"], "--format", "synthetic",
                 "--offsets", "--label-position", "4", "--out", tiny["root"] / "eval", "--overwrite"])
    out = tiny["root"] / "cmp" / "offsets.png"
    out.parent.mkdir()
    result = _invoke(["compare-offsets", source, source, "--name", "supervised", "--name", "ifr", "--out", out])
    assert "supervised" in result.output and "ifr" in result.output
    rows = json.loads(out.with_suffix(".json").read_text())
    single = json.loads(source.read_text())
    assert len(rows) == 2 * len(single)
    assert {r["model"] for r in rows} == {"supervised", "ifr"}
    assert out.stat().st_size > 1000
    again = runner.invoke(app, ["compare-offsets", str(source), "--out", str(out)])
    assert again.exit_code != 0 and "exist" in str(again.exception)

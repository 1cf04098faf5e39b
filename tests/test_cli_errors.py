"""The command line's error boundary: anticipated failures (bad input, environment, resources) are
one line `error: ...` with exit code 2 and no traceback; the user's files stay as they were."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from semivss.cli import main


def run_main(argv: list, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["semivss", *[str(a) for a in argv]])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def one_line_error(code: int, out: str, *needles: str) -> None:
    lines = [ln for ln in out.strip().splitlines() if ln.strip() and "━" not in ln]  # minus progress bars
    assert code == 2, out
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    assert "Traceback" not in out
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from semivss.cli import app

    root = tmp_path_factory.mktemp("errs")
    data = root / "synth"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "synth", str(data), "--videos", "3", "--frames", "6", "--height", "32",
                              "--width", "48", "--seed", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = {"name": "t", "out_dir": str(root / "run"),
           "data": {"format": "synthetic", "root": str(data), "split": {"mode": "single", "position": 2},
                    "base_size": [32, 48], "crop_size": [32, 32], "batch_size": 2, "num_workers": 0},
           "model": {"backbone": "mobilenet_v2", "pretrained": None}, "schedule": {"iters": 2},
           "train": {"precision": "fp32", "log_interval": 1, "ckpt_interval": 2, "num_workers": 0},
           "eval": {"size": [32, 48]}}
    (root / "t.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", str(root / "t.yaml")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return {"root": root, "data": data, "cfg": root / "t.yaml", "model": root / "run" / "model.safetensors"}


def test_version(monkeypatch, capsys) -> None:
    from semivss import __version__

    code, out = run_main(["--version"], monkeypatch, capsys)
    assert code == 0 and out.strip() == f"semivss {__version__}"


@pytest.mark.parametrize("device,needle", [("gpu", "expected auto, cpu, cuda"), ("cuda", "no CUDA device"),
                                           ("cuda:7", "CUDA")])
def test_bad_device(tiny, device, needle, monkeypatch, capsys) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out = run_main(["evaluate", tiny["model"], "--data", tiny["data"], "--format", "synthetic",
                          "--device", device, "--out", tiny["root"] / "e"], monkeypatch, capsys)
    one_line_error(code, out, f"--device {device}", needle)


def _corrupt_models(root: Path, model: Path) -> dict[str, Path]:
    data = model.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "random.safetensors": os.urandom(4096),
        "empty.pt": b"",
        "random.pt": os.urandom(4096),
    }
    out = {}
    for name, content in cases.items():
        (root / name).write_bytes(content)
        out[name] = root / name

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(root / "PWNED"),))

    import torch

    torch.save({"models": Evil()}, root / "evil.pt")
    out["evil.pt"] = root / "evil.pt"
    out["folder"] = root / "a_folder"
    out["folder"].mkdir(exist_ok=True)
    return out


def test_corrupt_checkpoints_are_one_line_errors(tiny, tmp_path, monkeypatch, capsys) -> None:
    for name, path in _corrupt_models(tmp_path, tiny["model"]).items():
        before = path.read_bytes() if path.is_file() else None
        code, out = run_main(["evaluate", path, "--data", tiny["data"], "--format", "synthetic",
                              "--out", tmp_path / f"e-{name}"], monkeypatch, capsys)
        one_line_error(code, out, str(path))
        assert "weights_only=False" not in out and not (tmp_path / "PWNED").exists(), name
        if before is not None:
            assert path.read_bytes() == before
    code, out = run_main(["evaluate", tmp_path / "empty.pt", "--data", tiny["data"], "--format", "synthetic",
                          "--out", tmp_path / "e2"], monkeypatch, capsys)
    assert "empty (0 bytes)" in out


def test_bad_option_values_and_out_paths(tiny, tmp_path, monkeypatch, capsys) -> None:
    code, out = run_main(["evaluate", tiny["model"], "--data", tiny["data"], "--format", "synthetic",
                          "--offsets", "--label-every", "0", "--out", tmp_path / "e"], monkeypatch, capsys)
    one_line_error(code, out, "--label-every", "greater than or equal to 1")
    afile = tmp_path / "a_file"
    afile.write_text("mine")
    code, out = run_main(["evaluate", tiny["model"], "--data", tiny["data"], "--format", "synthetic",
                          "--out", afile], monkeypatch, capsys)
    one_line_error(code, out, str(afile))
    assert afile.read_text() == "mine"


def test_bad_frame_read_in_a_dataloader_worker_is_one_line(tiny, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    data = tmp_path / "synth"
    shutil.copytree(tiny["data"], data)
    first = (data / "train.txt").read_text().split()[0]
    bad = data / "videos" / first / "000002.png"  # the labeled frame (position 2) of a training video
    bad.write_bytes(b"not a png")
    cfg = yaml.safe_load(tiny["cfg"].read_text())
    cfg["data"]["root"] = str(data)
    cfg["out_dir"] = str(tmp_path / "run")
    cfg["data"]["num_workers"] = 2  # read by the trainer (train.num_workers is the old spelling)
    del cfg["train"]["num_workers"]
    cfg["schedule"]["iters"] = 20
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run_main(["train", tmp_path / "c.yaml"], monkeypatch, capsys)
    one_line_error(code, out, "000002.png")


def test_file_size_limit_while_writing_is_one_line(tiny, tmp_path) -> None:
    """A write that the disk refuses (here RLIMIT_FSIZE, like a full disk) is one line, exit 2."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400, 400))
        sys.argv = ["semivss", "predict", {str(tiny['model'])!r}, {str(tiny['data'] / 'videos')!r} + "/" +
                    sorted(__import__('os').listdir({str(tiny['data'] / 'videos')!r}))[0], {str(tmp_path / 'p')!r}]
        from semivss.cli import main
        main()
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"})
    out = res.stdout + res.stderr
    one_line_error(res.returncode, out, "File too large", str(tmp_path / "p"))
    assert not list((tmp_path / "p").rglob("*.tmp")) and not (tmp_path / "p" / "overlay.mp4").exists()


def test_debug_shows_the_traceback(tiny, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("SEMIVSS_DEBUG", raising=False)
    with pytest.raises(Exception, match="not found"):
        run_main(["--debug", "evaluate", tmp_path / "nope.pt", "--data", tiny["data"], "--format", "synthetic"],
                 monkeypatch, capsys)
    os.environ.pop("SEMIVSS_DEBUG", None)


def test_data_num_workers_is_read_and_must_agree_with_the_old_key(tiny, tmp_path) -> None:
    from semivss.config import load_config
    from semivss.errors import ConfigError
    from semivss.experiment import _train_section

    cfg = load_config(tiny["cfg"], ["data.num_workers=3"])  # the fixture sets both keys to 0
    with pytest.raises(ConfigError, match="data.num_workers .3. and train.num_workers .0. disagree"):
        _train_section(cfg)
    raw = yaml.safe_load(tiny["cfg"].read_text())
    del raw["train"]["num_workers"]
    raw["data"]["num_workers"] = 3
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert _train_section(load_config(tmp_path / "c.yaml")).num_workers == 3


def test_offsets_default_to_the_labeled_frame_rule_the_model_was_trained_with(tiny, tmp_path, monkeypatch,
                                                                                capsys) -> None:
    import json

    code, out = run_main(["evaluate", tiny["model"], "--data", tiny["data"], "--format", "synthetic",
                          "--offsets", "--out", tmp_path / "e"], monkeypatch, capsys)
    assert code == 0, out
    rows = json.loads((tmp_path / "e" / "offsets.json").read_text())
    # trained with one labeled frame at position 2 of 6-frame videos: offsets -2..+3
    assert sorted({r["offset"] for r in rows}) == [-2, -1, 0, 1, 2, 3]
    code, out = run_main(["evaluate", tiny["model"], "--data", tiny["data"], "--format", "synthetic",
                          "--offsets", "--label-every", "0", "--label-position", "1", "--out", tmp_path / "f"],
                         monkeypatch, capsys)
    one_line_error(code, out, "not both")


def test_overwrite_replaces_the_whole_output_folder(tiny, tmp_path, monkeypatch, capsys) -> None:
    e = tmp_path / "e"
    base = ["evaluate", tiny["model"], "--data", tiny["data"], "--format", "synthetic", "--out", e]
    code, out = run_main([*base, "--offsets", "--save-preds"], monkeypatch, capsys)
    assert code == 0, out
    before = sorted(p.relative_to(e) for p in e.rglob("*"))
    assert Path("offsets.json") in before and Path("preds") in before
    code, out = run_main(base, monkeypatch, capsys)  # no --overwrite: refused, nothing touched
    one_line_error(code, out, str(e), "--overwrite")
    assert sorted(p.relative_to(e) for p in e.rglob("*")) == before
    code, out = run_main([*base, "--overwrite"], monkeypatch, capsys)
    assert code == 0, out
    assert sorted(p.name for p in e.iterdir()) == ["metrics.json"]  # old offsets and preds are gone
    assert not list(tmp_path.glob("e.*"))  # no staging or old folders left beside it


def test_failed_predict_leaves_nothing_and_does_not_block_the_rerun(tiny, tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    p = tmp_path / "p"
    code, out = run_main(["predict", tiny["model"], empty, p], monkeypatch, capsys)
    one_line_error(code, out, str(empty))
    assert not p.exists() and not list(tmp_path.glob("p.*"))
    video = tiny["data"] / "videos" / sorted(os.listdir(tiny["data"] / "videos"))[0]
    code, out = run_main(["predict", tiny["model"], video, p], monkeypatch, capsys)  # same OUT, no --overwrite
    assert code == 0, out
    mp4 = p / "overlay.mp4"
    data = mp4.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])  # a truncated video
    q = tmp_path / "q"
    code, out = run_main(["predict", tiny["model"], cut, q], monkeypatch, capsys)
    one_line_error(code, out, str(cut))
    assert not q.exists() and not list(tmp_path.glob("q.*"))


def test_staged_dir_removes_the_leftovers_of_killed_runs_only(tmp_path) -> None:
    from semivss.inference.writers import staged_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"out.partial-{dead}"
    (stale / "labels").mkdir(parents=True)
    live = tmp_path / f"out.partial-{os.getppid()}"  # a running process (pytest's parent) still writes it
    live.mkdir()
    with staged_dir(tmp_path / "out") as stage:
        (stage / "x.txt").write_text("new")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "x.txt").read_text() == "new"
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "out2") as stage:
        (stage / "half.png").write_bytes(b"")
        raise RuntimeError("boom")
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob("out2.*"))


def test_staged_dir_syncs_before_it_publishes_and_fsyncs_the_parent_after(tmp_path, monkeypatch) -> None:
    """The swap is durable: os.sync runs while only the staging folder holds the files, and the
    parent folder is fsynced once the new folder has its final name."""
    from semivss.inference import writers

    calls: list[tuple[str, bool]] = []
    out = tmp_path / "out"
    monkeypatch.setattr(writers.os, "sync", lambda: calls.append(("sync", out.exists())))
    monkeypatch.setattr(writers, "fsync_dir", lambda d: calls.append((f"fsync {d}", (out / "x.txt").exists())))
    with writers.staged_dir(out) as stage:
        (stage / "x.txt").write_text("new")
        assert calls == []
    assert calls == [("sync", False), (f"fsync {tmp_path}", True)]
    calls.clear()
    with pytest.raises(RuntimeError), writers.staged_dir(tmp_path / "out2") as stage:
        raise RuntimeError("boom")
    assert calls == []  # a failed block publishes nothing and syncs nothing


def test_resume_refuses_changed_settings_and_applies_safe_ones(tiny, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny["model"].parent, run)
    cfg = yaml.safe_load(tiny["cfg"].read_text())
    cfg["out_dir"] = str(run)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out = run_main(["train", tmp_path / "c.yaml", "--resume", "--set", "optim.lr=0.5",
                          "--set", "schedule.iters=4"], monkeypatch, capsys)
    one_line_error(code, out, f"cannot resume {run}", "optim.lr (0.01 -> 0.5)", "schedule.iters (2 -> 4)")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    code, out = run_main(["train", tmp_path / "c.yaml", "--resume", "--set", "method.name=unimatch"],
                         monkeypatch, capsys)
    one_line_error(code, out, "method.name ('supervised' -> 'unimatch')")
    # the cadence of logs and checkpoints may change: applied and recorded
    code, out = run_main(["train", tmp_path / "c.yaml", "--resume", "--set", "train.log_interval=5"],
                         monkeypatch, capsys)
    assert code == 0, out
    assert yaml.safe_load((run / "config.resumed.yaml").read_text())["train"]["log_interval"] == 5


@pytest.mark.parametrize("which", ["val", "unlabeled"])
def test_bad_frames_are_found_before_the_first_iteration(tiny, tmp_path, monkeypatch, capsys, which) -> None:
    """A truncated validation frame or a corrupt unlabeled frame stops the run before it trains
    (no checkpoint, no config written), naming the file."""
    import shutil

    data = tmp_path / "synth"
    shutil.copytree(tiny["data"], data)
    split = "val.txt" if which == "val" else "train.txt"
    video = (data / split).read_text().split()[0]
    bad = data / "videos" / video / ("000003.png" if which == "val" else "000005.png")
    if which == "val":
        bad.write_bytes(bad.read_bytes()[:40])  # truncated: its header survives, its pixels do not
    else:
        bad.write_bytes(b"not a png")
    cfg = yaml.safe_load(tiny["cfg"].read_text())
    cfg["data"]["root"] = str(data)
    cfg["out_dir"] = str(tmp_path / "run")
    cfg["schedule"]["iters"] = 50
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, out = run_main(["train", tmp_path / "c.yaml"], monkeypatch, capsys)
    one_line_error(code, out, str(bad))
    assert not (tmp_path / "run").exists()

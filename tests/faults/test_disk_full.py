"""A full disk while train / evaluate / predict / pseudo-label write: one line naming the file,
exit 2, nothing half-written left behind, the user's other files untouched. The disk is a small
tmpfs when the tests run as root (and may mount), and a file-size limit (RLIMIT_FSIZE) otherwise."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
       "COLUMNS": "300", "MPLBACKEND": "Agg"}


def _cli(args: list, limit: int | None = None) -> subprocess.CompletedProcess:
    def preexec() -> None:
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write is then EFBIG, not a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", "from semivss.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=preexec)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full")
    data = root / "synth"
    assert _cli(["data", "synth", data, "--videos", "2", "--frames", "6", "--height", "32", "--width", "48"]).returncode == 0
    cfg = {"name": "f", "data": {"format": "synthetic", "root": str(data), "split": {"mode": "single", "position": 2},
                                 "base_size": [32, 48], "crop_size": [32, 32], "batch_size": 2, "num_workers": 0},
           "model": {"backbone": "mobilenet_v2", "pretrained": None}, "schedule": {"iters": 2},
           "train": {"precision": "fp32", "ckpt_interval": 1}, "eval": {"size": [32, 48]}}
    (root / "f.yaml").write_text(yaml.safe_dump(cfg))
    res = _cli(["train", root / "f.yaml", "--out", root / "run"])
    assert res.returncode == 0, res.stdout + res.stderr
    return {"root": root, "data": data, "cfg": root / "f.yaml", "model": root / "run" / "model.safetensors"}


@pytest.fixture(params=["tmpfs", "fsize"])
def disk(request, tmp_path) -> tuple[Path, int | None]:
    """(folder on a nearly full disk, file-size limit to apply or None)."""
    where = tmp_path / "disk"
    where.mkdir()
    if request.param == "fsize":
        return where, 1500  # bytes per file: config.yaml, manifest.json, metrics.json, overlays exceed it
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
    with (where / "filler").open("wb") as f:  # leave a few pages: small files fit, a set of frames does not
        f.write(b"\0" * (64 - 12) * 1024)
    return where, None


def _one_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the failure is one line, the last on stderr (progress lines
    before it are fine)."""
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    last = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1]
    assert len(errors) == 1 and last == errors[0], out
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "pseudo-label"])
def test_disk_full(trained, disk, command, record_property) -> None:
    where, limit = disk
    mine = where / "notes.txt"
    mine.write_text("the user's own file\n")
    out = where / "out"
    if command == "train":
        args = ["train", trained["cfg"], "--out", out]
    elif command == "evaluate":
        args = ["evaluate", trained["model"], "--data", trained["data"], "--format", "synthetic", "--save-preds",
                "--out", out]
    elif command == "predict":
        video = sorted((trained["data"] / "videos").iterdir())[0]
        args = ["predict", trained["model"], video, out]
    else:
        args = ["pseudo-label", trained["model"], "--data", trained["data"], "--format", "synthetic", "--split",
                "train", "--all-frames", "--workers", "0", "--out", out]
    before = _files(trained["root"] / "run")
    res = _cli(args, limit)
    line = _one_line(res)
    assert any(k in line for k in ("No space left", "File too large", "Disk quota")), line
    assert str(where) in line  # names the file it could not write
    assert mine.read_text() == "the user's own file\n"
    assert not [p for p in where.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]
    if command in ("evaluate", "predict"):
        assert not out.exists()  # written into a temporary folder, deleted on failure
    assert _files(trained["root"] / "run") == before  # the model it read is untouched
    record_property("fault_cases", 1)

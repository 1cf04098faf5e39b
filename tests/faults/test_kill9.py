"""kill -9 at random points of a real tiny training (including inside the checkpoint write) and of
pseudo-labelling: the re-run continues and ends where an uninterrupted run ends, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
ITERS = 8


def _cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", "from semivss.cli import main; main()", *map(str, args)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill9")
    data = root / "synth"
    _cli("data", "synth", data, "--videos", "3", "--frames", "6", "--height", "32", "--width", "48", "--seed", "3")
    cfg = {"name": "k", "data": {"format": "synthetic", "root": str(data), "split": {"mode": "single", "position": 2},
                                 "base_size": [32, 48], "crop_size": [32, 32], "batch_size": 2, "num_workers": 0},
           "model": {"backbone": "mobilenet_v2", "pretrained": None}, "schedule": {"iters": ITERS},
           "train": {"precision": "fp32", "log_interval": 1, "ckpt_interval": 1, "eval_interval": 0,
                     "preflight": False}, "eval": {"size": [32, 48]}}
    (root / "k.yaml").write_text(yaml.safe_dump(cfg))
    _cli("train", root / "k.yaml", "--out", root / "straight")
    return {"root": root, "data": data, "cfg": root / "k.yaml", "straight": root / "straight" / "model.safetensors"}


def _same_weights(a: Path, b: Path) -> None:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


_KILL_IN_WRITE = textwrap.dedent("""
    import io, os, signal, sys
    import semivss.engine.checkpoint as ck
    original, at, calls = ck.atomic_write, int(sys.argv[1]), [0]
    def killing(path, write, durable=True):
        if str(path).endswith(".pt"):
            calls[0] += 1
            if calls[0] == at:  # half of the checkpoint reaches the disk, then the process dies
                def half(f):
                    buf = io.BytesIO(); write(buf); data = buf.getvalue()
                    f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(path, half, durable)
        return original(path, write, durable)
    ck.atomic_write = killing
    sys.argv = ["semivss", *sys.argv[2:]]
    from semivss.cli import main
    main()
""")


def _finish(cfg: Path, out: Path) -> int:
    """Re-run until the model exists (each re-run as a user would: --resume); returns re-runs."""
    runs = 0
    while not (out / "model.safetensors").exists():
        res = _cli("train", cfg, "--out", out, "--resume", check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        runs += 1
        assert runs < 3
    return runs


def test_kill9_inside_checkpoint_writes_resumes_bit_identical(setup, record_property) -> None:
    out = setup["root"] / "in-write"
    cases = 0
    for at in (1, 4):  # the first checkpoint (nothing to fall back to) and a later one
        res = subprocess.run([sys.executable, "-c", _KILL_IN_WRITE, str(at), "train", str(setup["cfg"]), "--out",
                              str(out), *(["--resume"] if at > 1 else [])],
                             capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == -signal.SIGKILL, res.stdout + res.stderr
        assert not (out / "model.safetensors").exists()
        cases += 1
    _finish(setup["cfg"], out)
    _same_weights(setup["straight"], out / "model.safetensors")
    assert not list((out / "checkpoints").glob("*.tmp"))  # the killed writes' temp files are gone
    record_property("fault_cases", cases)


def test_kill9_at_random_times_resumes_bit_identical(setup, record_property) -> None:
    rng = random.Random(int(os.environ.get("SEMIVSS_FAULT_SEED", "0")))
    out = setup["root"] / "random"
    kills = mid_run = 0
    for _ in range(3):
        if (out / "model.safetensors").exists():
            break
        args = [sys.executable, "-c", "from semivss.cli import main; main()", "train", str(setup["cfg"]),
                "--out", str(out)] + (["--resume"] if (out / "config.yaml").exists() else [])
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.time() + 120  # from the moment the run has started writing: any step or write
        while proc.poll() is None and not (out / "config.yaml").exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None:
            proc.kill()
            kills += 1
            mid_run += (out / "checkpoints" / "last.pt").exists()  # killed between checkpoints
        proc.wait()
    _finish(setup["cfg"], out)
    _same_weights(setup["straight"], out / "model.safetensors")
    record_property("fault_cases", kills)
    record_property("mid_run_kills", mid_run)


def test_kill9_of_pseudo_labelling_writes_every_frame_once(setup, record_property) -> None:
    root = setup["root"]
    base = ["pseudo-label", setup["straight"], "--data", setup["data"], "--format", "synthetic", "--split", "train",
            "--all-frames", "--workers", "0"]
    _cli(*base, "--out", root / "pl-straight")
    out = root / "pl-killed"
    proc = subprocess.Popen([sys.executable, "-c", "from semivss.cli import main; main()",
                             *map(str, base), "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("labels/*/*.png"))) < 3:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    written_before = len(list(out.glob("labels/*/*.png")))  # a frame is done when its label PNG exists
    assert proc.returncode == -signal.SIGKILL  # killed mid-set, not finished
    res = _cli(*base, "--out", out, "--resume")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["complete"] is True
    assert manifest["counts"]["skipped"] == written_before  # frames on disk are not redone
    assert manifest["counts"]["written"] + written_before == manifest["counts"]["frames"]
    assert not list(out.rglob("*.tmp"))
    straight = sorted(p.relative_to(root / "pl-straight") for p in (root / "pl-straight").rglob("*.png"))
    killed = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert killed == straight
    for rel in straight:
        assert (out / rel).read_bytes() == (root / "pl-straight" / rel).read_bytes(), rel
    assert res.returncode == 0
    record_property("fault_cases", 1)

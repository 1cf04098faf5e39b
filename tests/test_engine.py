"""Tests of semivss.engine: training loop, resume, checkpoints, schedule, sampler, precision."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_toy import NUM_CLASSES, TinySeg, ToyRegions, pixel_accuracy_fn
from pydantic import ValidationError
from torch import nn

from semivss.engine import (
    InfiniteBatchSampler,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    Trainer,
    build_optimizer,
    build_scheduler,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
)
from semivss.engine.checkpoint import capture_rng, restore_rng
from semivss.engine.logger import CSVLog
from semivss.engine.precision import Precision, cpu_has_native_bf16, images_channels_last
from semivss.errors import ConfigError, DataError, TrainingError, TrainingInterrupted
from semivss.methods import Supervised
from semivss.methods.base import ExportSpec


def make_model() -> nn.Module:
    return TinySeg()


def make_trainer(out: Path, method=None, iters=8, **train_kw) -> Trainer:
    train_kw.setdefault("num_workers", 0)
    train_kw.setdefault("log_interval", 2)
    train_kw.setdefault("ckpt_interval", 4)
    optim_kw = train_kw.pop("optim", {})
    return Trainer(
        method or Supervised(None, NUM_CLASSES),
        make_model,
        {"labeled": ToyRegions(n=12)},
        {"labeled": 4},
        OptimConfig(**({"lr": 0.02} | optim_kw)),
        ScheduleConfig(iters=iters),
        TrainConfig(**train_kw),
        out,
        evaluate_fn=pixel_accuracy_fn(),
        metric="acc",
        meta={"model": {"name": "tiny", "width": 8}, "classes": ["a", "b", "c", "d"],
              "root": Path("/data")},
        tensorboard=False,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# (1) learning ---------------------------------------------------------------------------------
def test_training_lowers_loss_and_beats_chance(tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = Trainer(
        Supervised(None, NUM_CLASSES),
        make_model,
        {"labeled": ToyRegions(n=16)},
        {"labeled": 4},
        OptimConfig(lr=0.02),
        ScheduleConfig(iters=80, warmup_iters=5, warmup_ratio=0.1),
        TrainConfig(num_workers=0, log_interval=10, ckpt_interval=40, eval_interval=40),
        out,
        evaluate_fn=pixel_accuracy_fn(),
        metric="acc",
        meta={"classes": ["a", "b", "c", "d"]},
    )
    untrained = pixel_accuracy_fn()(TinySeg().eval(), 0)["acc"]
    result = trainer.fit()
    rows = read_csv(out / "metrics.csv")
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0]
    # chance is 0.25 (4 classes); the colour -> class map is easy to learn
    assert result["acc"] > 0.85 and untrained < 0.6
    assert [r["val/acc"] for r in rows if r["val/acc"]] != []
    assert {r["step"] for r in rows if r["val/acc"]} == {"40", "80"}
    # outputs: checkpoints, best, tensorboard, safetensors export of the inference model
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["step"] == 80
    assert last["meta"] == {"classes": ["a", "b", "c", "d"],
                            "export": {"members": ["model"], "combine": "single"}}
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["best"]["value"] == pytest.approx(max(float(r["val/acc"]) for r in rows if r["val/acc"]))
    # best.pt holds weights for evaluation, not the training state (resume reads last.pt)
    assert {"optimizer", "scheduler", "scaler", "method", "rng"} <= set(last)
    assert not {"optimizer", "scheduler", "scaler", "method", "rng"} & set(best)
    assert set(best["models"]) == set(last["models"]) and best["meta"] == last["meta"]
    assert any((out / "tb").iterdir())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "80"
        assert json.loads(f.metadata()["semivss_meta"])["classes"] == ["a", "b", "c", "d"]
        exported = {k: f.get_tensor(k) for k in f.keys()}
    assert exported.keys() == last["models"]["model"].keys()
    for k, v in exported.items():
        torch.testing.assert_close(v, last["models"]["model"][k].contiguous())


# (2) resume equality --------------------------------------------------------------------------
class Crash(Exception):
    pass


class CrashingSupervised(Supervised):
    """Supervised that dies once at ``crash_at`` (simulates a killed job)."""

    def __init__(self, crash_at: int | None) -> None:
        super().__init__(None, NUM_CLASSES)
        self.crash_at = crash_at

    def training_step(self, models, batch, step, max_steps):
        if step == self.crash_at:
            raise Crash(step)
        return super().training_step(models, batch, step, max_steps)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted_run(tmp_path: Path, num_workers: int) -> None:
    full = make_trainer(tmp_path / "full", iters=8, num_workers=num_workers)
    full.fit()
    part = tmp_path / "part"
    with pytest.raises(Crash):
        make_trainer(part, CrashingSupervised(crash_at=4), num_workers=num_workers).fit()
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 4
    make_trainer(part, num_workers=num_workers).fit(resume=True)

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    for key, value in a["models"]["model"].items():
        torch.testing.assert_close(b["models"]["model"][key], value, rtol=0, atol=1e-6)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=0, atol=1e-6)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    # the log continues where the checkpoint was: one row per logged step, no duplicates
    steps_a = [r["step"] for r in read_csv(tmp_path / "full" / "metrics.csv")]
    steps_b = [r["step"] for r in read_csv(part / "metrics.csv")]
    assert steps_a == steps_b


def test_rng_capture_restore_roundtrip() -> None:
    import random

    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


# (3) checkpoint atomicity ---------------------------------------------------------------------
def test_interrupted_checkpoint_write_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(4.0)})
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(4)})
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left


def test_load_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="corrupt.pt"):
        load_checkpoint(bad)


class SignalAt(Supervised):
    """Sends itself ``sig`` during iteration ``at`` (0-based), as Ctrl-C or a scheduler would."""

    def __init__(self, at: int, sig: int) -> None:
        super().__init__(None, NUM_CLASSES)
        self.at, self.sig = at, sig

    def training_step(self, models, batch, step, max_steps):
        if step == self.at:
            os.kill(os.getpid(), self.sig)
        return super().training_step(models, batch, step, max_steps)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_last_checkpoint_at_the_current_step_and_resumes_exactly(tmp_path: Path, sig) -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN under nohup
    full = make_trainer(tmp_path / "full", iters=8)
    full.fit()
    part = tmp_path / "part"
    with pytest.raises(TrainingInterrupted, match=r"step 3/8.*--resume") as info:
        make_trainer(part, SignalAt(2, sig), iters=8).fit()  # ckpt_interval 4: step 3 saved only by the stop
    assert str(part / "checkpoints" / "last.pt") in str(info.value)
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    make_trainer(part, iters=8).fit(resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["models"]["model"]
    b = load_checkpoint(part / "checkpoints" / "last.pt")["models"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# (4) non-finite loss --------------------------------------------------------------------------
class NaNAtStep2(Supervised):
    def training_step(self, models, batch, step, max_steps):
        out = super().training_step(models, batch, step, max_steps)
        bad = torch.tensor(float("nan") if step == 2 else 0.0)
        return {"loss": out["loss"] + bad, "loss_sup": out["loss_sup"], "loss_aux": bad}


def test_nan_loss_raises_naming_step_and_term(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "nan", NaNAtStep2(None, NUM_CLASSES))
    # the NaN comes in the third iteration (0-based step 2): reported as step 3, as the logs count
    with pytest.raises(TrainingError, match=r"step 3 .*loss_aux=nan") as info:
        trainer.fit()
    assert "loss_sup=" in str(info.value)


# (5) schedule and parameter groups ------------------------------------------------------------
def test_poly_warmup_factors_and_head_groups() -> None:
    model = TinySeg()
    opt = build_optimizer(nn.ModuleDict({"model": model}), ["model"], OptimConfig(lr=0.01))
    assert [g["name"] for g in opt.param_groups] == ["model.backbone", "model.head"]
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.1)]
    assert len(opt.param_groups[0]["params"]) == 3 and len(opt.param_groups[1]["params"]) == 2
    sched = build_scheduler(
        opt, ScheduleConfig(iters=100, power=0.9, warmup_iters=10, warmup_ratio=0.1)
    )
    # hand values: factor(t) = (1 - t/100)^0.9 * (0.1 + 0.9 t/10) for t < 10
    expected = {0: 0.1, 5: 0.954885 * 0.55, 10: 0.909532, 50: 0.535887, 100: 0.0}
    seen = {}
    for t in range(101):
        if t in expected:
            seen[t] = [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    for t, f in expected.items():
        assert seen[t][0] == pytest.approx(0.01 * f, rel=1e-5, abs=1e-12)
        assert seen[t][1] == pytest.approx(0.1 * f, rel=1e-5, abs=1e-12)


def test_other_schedules_and_optimizer_fallbacks() -> None:
    cos = ScheduleConfig(iters=10, policy="cosine")
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 5) == pytest.approx(0.5)
    assert lr_factor(ScheduleConfig(iters=10, policy="constant"), 7) == 1.0
    # min_lr floors the base LR: 0.001 of 0.01 -> factor 0.1 + 0.9 * 0.5 at half of cosine
    assert lr_factor(cos, 5, min_ratio=0.1) == pytest.approx(0.55)
    plain = nn.Sequential(nn.Conv2d(3, 2, 1))  # no param_groups(): one group
    frozen = TinySeg().requires_grad_(False)
    models = nn.ModuleDict({"a": plain, "b": frozen})
    opt = build_optimizer(models, ["a"], OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.9)))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    assert opt.param_groups[0]["betas"] == (0.8, 0.9) and opt.param_groups[0]["lr"] == 1e-3
    sched = build_scheduler(opt, ScheduleConfig(iters=10, policy="cosine", min_lr=1e-4))
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="schedule.min_lr"):
        build_scheduler(opt, ScheduleConfig(iters=10, min_lr=1.0))
    with pytest.raises(ConfigError, match="'c'"):
        build_optimizer(models, ["c"], OptimConfig())


def test_config_sections_forbid_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="lr_typo"):
        OptimConfig(lr_typo=1)
    with pytest.raises(ValidationError, match="warmup_iters"):
        ScheduleConfig(iters=10, warmup_iters=20)
    with pytest.raises(ValidationError, match="precision"):
        TrainConfig(precision="fp8")


# (6) sampler ----------------------------------------------------------------------------------
def test_sampler_rank_slices_resume_and_seeds() -> None:
    n, b = 10, 3
    r0 = InfiniteBatchSampler(n, b, seed=7, rank=0, world_size=2)
    r1 = InfiniteBatchSampler(n, b, seed=7, rank=1, world_size=2)
    it0, it1 = iter(r0), iter(r1)
    b0 = [next(it0) for _ in range(5)]
    b1 = [next(it1) for _ in range(5)]
    # 5 iterations x 2 ranks x 3 = positions 0..29 = 3 epochs; each epoch is a permutation
    stream = []
    for x, y in zip(b0, b1):
        stream += x + y
    for e in range(3):
        assert sorted(i for i, _ in stream[e * n : (e + 1) * n]) == list(range(n))
    seeds = [s for _, s in stream]
    assert len(set(seeds)) == len(seeds)  # every position has its own seed
    # rank r, iteration i takes positions [(2i + r) * 3, +3)
    assert b1[2] == [r1.item(p) for p in range(15, 18)]
    # resume: start_iter is the whole state
    resumed = iter(InfiniteBatchSampler(n, b, seed=7, rank=1, world_size=2, start_iter=3))
    assert next(resumed) == b1[3] and next(resumed) == b1[4]
    # reproducible across instances, different for another seed
    assert next(iter(InfiniteBatchSampler(n, b, seed=7))) == next(iter(InfiniteBatchSampler(n, b, seed=7)))
    assert next(iter(InfiniteBatchSampler(n, b, seed=8))) != next(iter(InfiniteBatchSampler(n, b, seed=7)))
    with pytest.raises(ValueError, match="non-empty"):
        InfiniteBatchSampler(0, 2, seed=0)


# (7) refusing to clobber ----------------------------------------------------------------------
def test_fresh_run_into_used_out_dir_refuses(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(DataError, match="cannot resume.*last.pt"):
        make_trainer(out, iters=4).fit(resume=True)
    make_trainer(out, iters=4).fit()
    before = (out / "checkpoints" / "last.pt").read_bytes()
    assert load_checkpoint(out / "checkpoints" / "last.pt")["meta"]["root"] == "/data"  # Path -> str
    with pytest.raises(DataError, match=r"holds another run \(checkpoints/last.pt.*--resume.*another --out"):
        make_trainer(out, iters=4).fit()
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    # without its checkpoints the folder still holds a run: its exported model and logs are kept
    import shutil

    shutil.rmtree(out / "checkpoints")
    model, log = (out / "model.safetensors").read_bytes(), (out / "metrics.csv").read_bytes()
    with pytest.raises(DataError, match=r"holds another run \(model.safetensors, metrics.csv"):
        make_trainer(out, iters=4).fit()
    assert (out / "model.safetensors").read_bytes() == model and (out / "metrics.csv").read_bytes() == log
    assert not (out / "checkpoints").exists()



def test_resuming_a_finished_run_returns_its_metrics_and_stale_temp_files_go(tmp_path: Path) -> None:
    out = tmp_path / "run"
    make_trainer(out, iters=4).fit()
    stale = out / "checkpoints" / ".last.pt.abc123.tmp"  # a checkpoint write killed mid-way
    stale.write_bytes(b"x" * 100)
    again = make_trainer(out, iters=4).fit(resume=True)
    assert set(again) == {"acc", "step"} and not stale.exists()


def test_trainer_rejects_bad_inputs(tmp_path: Path) -> None:
    kw = dict(optim=OptimConfig(), schedule=ScheduleConfig(), train=TrainConfig(), out_dir=tmp_path)
    sup = Supervised(None, NUM_CLASSES)
    with pytest.raises(ConfigError, match="batch_sizes.labeled"):
        Trainer(sup, make_model, {"labeled": ToyRegions(4)}, {}, **kw)
    with pytest.raises(ConfigError, match="'labeled'"):
        Trainer(sup, make_model, {"unlabeled": ToyRegions(4)}, {"unlabeled": 2}, **kw)
    with pytest.raises(ConfigError, match="meta.root"):
        Trainer(sup, make_model, {"labeled": ToyRegions(4)}, {"labeled": 2}, **kw,
                meta={"root": object()})

    class ExportsGhost(Supervised):
        def export_spec(self, models: nn.ModuleDict) -> ExportSpec:
            return ExportSpec(("ghost",))

    with pytest.raises(ConfigError, match=r"exports models \['ghost'\]"):
        make_trainer(tmp_path / "ghost", ExportsGhost(None, NUM_CLASSES), iters=1).fit()


# (8) bf16 autocast + channels_last on CPU -----------------------------------------------------
class Probe(Supervised):
    seen: list = []

    def training_step(self, models, batch, step, max_steps):
        image = batch["labeled"].image
        conv = models["model"].backbone[0].weight
        out = models["model"](image)
        self.seen.append(
            (image.is_contiguous(memory_format=torch.channels_last),
             conv.is_contiguous(memory_format=torch.channels_last),
             out["logits"].dtype)
        )
        return super().training_step(models, batch, step, max_steps)


def test_bf16_channels_last_path_on_cpu(tmp_path: Path) -> None:
    prec = Precision.from_config("bf16", torch.device("cpu"))
    assert prec.dtype == torch.bfloat16 and not prec.scaler.is_enabled()
    auto = Precision.from_config("auto", torch.device("cpu"))
    assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    x = images_channels_last({"image": torch.zeros(2, 3, 4, 4), "label": torch.zeros(2, 4, 4)})
    assert x["image"].is_contiguous(memory_format=torch.channels_last)
    typed = images_channels_last(ToyRegions(2, size=16)[(0, 0)].map_tensors(lambda t: t[None]))
    assert typed.image.is_contiguous(memory_format=torch.channels_last) and typed.label.shape == (1, 16, 16)
    probe = Probe(None, NUM_CLASSES)
    make_trainer(tmp_path / "bf16", probe, iters=2, precision="bf16", channels_last=True).fit()
    assert probe.seen == [(True, True, torch.bfloat16)] * 2
    Probe.seen = []
    probe = Probe(None, NUM_CLASSES)
    make_trainer(tmp_path / "fp32", probe, iters=1, precision="fp32", channels_last=False).fit()
    assert probe.seen == [(False, False, torch.float32)]


def test_csv_log_grows_columns_and_truncates_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    log = CSVLog(path)
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.5, "val/acc": 0.5})
    log.write({"step": 3, "loss": 1.0})
    rows = read_csv(path)
    assert [r["val/acc"] for r in rows] == ["", "0.5", ""]
    CSVLog(path, resume_step=2).write({"step": 3, "loss": 0.9, "it_s": 4.0})
    rows = read_csv(path)
    assert [(r["step"], r["loss"], r["it_s"]) for r in rows] == [
        ("1", "2", ""), ("2", "1.5", ""), ("3", "0.9", "4")
    ]
    assert math.isclose(float(rows[1]["val/acc"]), 0.5)


_MALLINFO_SCRIPT = """
import ctypes, json, sys, torch
from semivss.engine.memory import tune_malloc
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    print("null"); sys.exit()
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    assert tune_malloc() and tune_malloc()  # applied; idempotent
steps = []
for _ in range(4):
    x = torch.ones(64 * 1024 * 1024)  # 256 MiB: allocated, filled, freed, like an activation
    live = libc.mallinfo2()
    del x
    freed = libc.mallinfo2()
    steps.append({"mmapped_live": live.hblkhd, "heap": freed.arena, "heap_free": freed.fordblks})
print(json.dumps(steps))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_malloc_reuses_freed_activation_buffers() -> None:
    """glibc's default serves a 256 MiB buffer by mmap and unmaps it on free, so every step
    faults in all its pages again; after tuning the buffer comes from the heap and stays there
    when freed. Read from malloc's own accounting (mallinfo2), which does not depend on the
    kernel's page reclaim the way page-fault counts do."""
    import json
    import subprocess

    def run(mode: str) -> list[dict[str, int]] | None:
        out = subprocess.run([sys.executable, "-c", _MALLINFO_SCRIPT, mode], capture_output=True,
                             text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.stdout.split("\n")[-2])

    mib256 = 256 << 20
    default = run("default")
    if default is None:
        pytest.skip("glibc without mallinfo2 (< 2.33)")
    assert all(s["mmapped_live"] >= mib256 and s["heap_free"] < mib256 for s in default)
    tuned = run("tuned")
    assert tuned is not None
    # served from the heap and kept there after free, ready for the next step (whether the next
    # aligned request fits that exact block depends on allocations in between, so heap growth is
    # not asserted)
    assert all(s["mmapped_live"] < mib256 and s["heap_free"] >= mib256 for s in tuned)


def test_eval_line_shows_uncomputable_metrics_as_a_dash(tmp_path: Path, capsys) -> None:
    from semivss.engine.logger import TrainLogger

    log = TrainLogger(tmp_path, total_steps=10, tensorboard=False, progress=False)
    log.log_eval(5, {"mIoU": 0.51234, "VC16": float("nan")})
    log.close()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == "[semivss] eval @ 5: mIoU 0.5123 VC16 -"


def test_progress_lines_off_a_terminal_are_periodic_with_eta(capsys) -> None:
    import io

    from semivss.progress import LineProgress, clock

    out = io.StringIO()
    with LineProgress(out, interval=0.0) as bar:  # every update prints
        task = bar.add_task("eval val", total=4)
        bar.advance(task, 1)
        bar.advance(task, 3)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[semivss] eval val: 1/4 (25%), 0:00:00 elapsed, ETA ")
    assert lines[-1] == "[semivss] eval val: 4/4 (100%), 0:00:00 elapsed"  # no ETA once done
    out = io.StringIO()
    with LineProgress(out, interval=3600) as bar:  # quiet in between, one line at the end
        task = bar.add_task("predict", total=None)
        for _ in range(50):
            bar.advance(task)
    assert out.getvalue().splitlines() == ["[semivss] predict: 50, 0:00:00 elapsed"]
    assert clock(3725) == "1:02:05"


def test_train_lines_off_a_terminal_show_the_eta(tmp_path: Path, capsys) -> None:
    from semivss.engine.logger import TrainLogger

    log = TrainLogger(tmp_path, total_steps=100, tensorboard=False, progress=False)
    log.log_train(20, {"loss": 1.0, "lr": 0.01, "it_s": 0.5})
    log.close()
    assert capsys.readouterr().out.strip().endswith("it_s 0.5 eta 0:02:40")  # 80 steps at 0.5 it/s

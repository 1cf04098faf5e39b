"""U2PL method (docs/methods.md#4-u2pl): config errors, reliable-pixel loss against a numpy oracle, EMA teacher,
memory bank in checkpoints (exact resume), training through the engine."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_toy import NUM_CLASSES, ToyRegions, make_labels, pixel_accuracy_fn, render
from torch import Tensor, nn
from torch.utils.data import Dataset

from semivss.data.batch import LabeledBatch, UnlabeledBatch
from semivss.engine import OptimConfig, ScheduleConfig, TrainConfig, Trainer, load_checkpoint
from semivss.errors import ConfigError
from semivss.methods.parts import batch_cutmix_boxes, step_generator
from semivss.methods.u2pl import U2PL, u2pl_unsup_loss
from semivss.models import ModelConfig, SegModel, build_model


# ------------------------------------------------------------------ tiny SegModel-like network
class TinyEncoder(nn.Module):
    def __init__(self, width: int, bn: bool) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(width)) if bn else nn.Identity
        self.low = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), norm(), nn.ReLU())
        self.high = nn.Sequential(nn.Conv2d(width, width, 3, 2, 1), norm(), nn.ReLU())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.low(x)
        return low, self.high(low)


class TinyDecoder(nn.Module):
    def __init__(self, width: int, bn: bool, rep: bool) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(width)) if bn else nn.Identity
        self.fuse = nn.Sequential(nn.Conv2d(2 * width, width, 3, 1, 1), norm(), nn.ReLU())
        self.rep = nn.Conv2d(width, 16, 1) if rep else None
        self.feature_dim = width
        self.stride = 2

    def forward(self, low: Tensor, high: Tensor) -> dict[str, Tensor]:
        up = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        out = {"feature": self.fuse(torch.cat([low, up], 1))}
        if self.rep is not None:
            out["rep"] = self.rep(out["feature"])
        return out


def TinySegModel(num_classes: int = NUM_CLASSES, width: int = 8, bn: bool = True,
                 rep: bool = True) -> SegModel:
    """The real SegModel (forward, classify, param_groups, has_rep_head) around a tiny encoder
    and decoder; logits at stride 2."""
    return SegModel(TinyEncoder(width, bn), TinyDecoder(width, bn, rep), num_classes)


class ToyUnlabeled(Dataset):
    """Unlabeled toy frames: ``UnlabeledBatch`` samples, ``image (1,3,H,W)``, all-True ``valid``
    and ``strong_copies`` strong copies (more noise and a brightness shift), reproducible from
    ``(index, sample_seed)``."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 7, strong_copies: int = 0) -> None:
        self.labels = make_labels(n, size, seed)
        self.strong_copies = strong_copies

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> UnlabeledBatch:
        index, seed = item
        g = torch.Generator().manual_seed(int(seed))
        image = render(self.labels[index], g)
        strong = []
        for _ in range(self.strong_copies):
            copy = image + 0.5 * torch.randn(image.shape, generator=g) + 0.3 * torch.rand((), generator=g)
            strong.append(copy[None])
        valid = torch.ones(1, *image.shape[-2:], dtype=torch.bool)
        return UnlabeledBatch(image[None], torch.zeros(1, dtype=torch.int64), valid, strong)


def toy_batch(n_l: int = 2, n_u: int = 2, size: int = 16, seed: int = 0, strong: int = 0) -> dict:
    lab = ToyRegions(n=n_l, size=size, seed=seed)
    unl = ToyUnlabeled(n=n_u, size=size, seed=seed + 1, strong_copies=strong)
    labeled = [lab[(i, i)] for i in range(n_l)]
    unlabeled = [unl[(i, 10 + i)] for i in range(n_u)]
    return {"labeled": LabeledBatch.collate(labeled), "unlabeled": UnlabeledBatch.collate(unlabeled)}


def with_valid(batch: dict, valid: Tensor, key: str = "unlabeled") -> dict:
    """``batch`` with ``batch[key].valid`` replaced (the batches are frozen dataclasses)."""
    return {**batch, key: dataclasses.replace(batch[key], valid=valid)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ configuration
def test_model_without_rep_head_raises_config_error_naming_the_key() -> None:
    method = U2PL(None, 3)
    with pytest.raises(ConfigError, match=r"model\.rep_head"):
        method.build_models(lambda: build_model(ModelConfig(pretrained=None), 3))
    with pytest.raises(ConfigError, match=r"model\.rep_head"):  # a model that never says
        models = U2PL(None, NUM_CLASSES).build_models(lambda: TinySegModel(rep=False))
        U2PL(None, NUM_CLASSES).training_step(models, toy_batch(), 0, 10)


def test_config_defaults_and_errors() -> None:
    cfg = U2PL(None, 3).cfg
    assert (cfg.contrastive_weight, cfg.ema_decay, cfg.alpha0, cfg.num_anchors, cfg.num_negatives,
            cfg.temperature, cfg.anchor_threshold, cfg.low_rank, cfg.high_rank, cfg.memory_size) == (
        0.1, 0.99, 20.0, 256, 50, 0.5, 0.3, 3, 20, 30000)
    assert cfg.eval_teacher  # the official code evaluates the teacher
    with pytest.raises(ConfigError, match=r"method\.temprature"):
        U2PL({"temprature": 0.1}, 3)
    with pytest.raises(ConfigError, match="low_rank"):
        U2PL({"low_rank": 5, "high_rank": 5}, 3)
    spec = U2PL(None, 3).data_spec()
    unl = spec.get("unlabeled")
    assert unl is not None and unl.frames == 1 and unl.strong_copies == 0


# ------------------------------------------------------------------ losses
def test_unsupervised_loss_equals_numpy_oracle() -> None:
    torch.manual_seed(0)
    method = U2PL({"cutmix_p": 0.0}, NUM_CLASSES)
    models = method.build_models(lambda: TinySegModel(bn=False))  # train mode == eval mode
    models.train()
    batch = toy_batch(n_l=2, n_u=3, size=16)
    out = method.training_step(models, batch, step=3, max_steps=12)  # alpha_t = 15 %

    x_u = batch["unlabeled"].image[:, 0]
    with torch.no_grad():
        logits = F.interpolate(models["model"](x_u)["logits"], size=(16, 16), mode="bilinear",
                               align_corners=False).double().numpy()
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    prob = np.exp(logp)
    pseudo = prob.argmax(1)
    ent = -(prob * np.log(prob + 1e-10)).sum(1).ravel()
    n = ent.size
    k = int(np.floor(0.15 * n + 0.5))
    unreliable = np.zeros(n, bool)
    unreliable[np.argsort(-ent, kind="stable")[:k]] = True
    ce = -np.take_along_axis(logp, pseudo[:, None], 1)[:, 0].ravel()
    expected = ce[~unreliable].mean() * n / (n - k)
    assert float(out["loss_unsup"]) == pytest.approx(expected, rel=1e-4)
    assert float(out["reliable_ratio"]) == pytest.approx((n - k) / n)
    total = out["loss_sup"] + out["loss_unsup"] + 0.1 * out["loss_contra"]
    assert float(out["loss"].detach()) == pytest.approx(float(total), rel=1e-6)
    assert float(out["loss_contra"]) > 0
    assert sum(method.bank.count(c) for c in range(NUM_CLASSES)) > 0
    # the bank goes into the checkpoint state unless checkpoint_bank is false
    state = method.state_dict()
    assert sum(len(q) for q in state["bank"]["queues"]) == sum(method.bank.count(c) for c in range(NUM_CLASSES))
    method.cfg = method.cfg.model_copy(update={"checkpoint_bank": False})
    assert method.state_dict() == {}


def test_teacher_update_and_inference_switch() -> None:
    torch.manual_seed(0)
    method = U2PL({"num_anchors": 8, "num_negatives": 4}, NUM_CLASSES)
    models = method.build_models(lambda: TinySegModel())
    assert method.trainable(models) == ["model"]
    assert all(not p.requires_grad for p in models["teacher"].parameters())
    models.train()
    loss = method.training_step(models, toy_batch(), 0, 10)["loss"]
    loss.backward()
    with torch.no_grad():  # a plain SGD step
        for p in models["model"].parameters():
            p -= 0.5 * p.grad
    method.on_step_end(models, 0)  # decay 0: teacher = student
    for (name, t), s in zip(models["teacher"].state_dict().items(), models["model"].state_dict().values()):
        assert torch.equal(t, s), name
    assert method.inference_model(models) is models["teacher"]
    assert U2PL({"eval_teacher": False}, NUM_CLASSES).inference_model(models) is models["model"]


def test_real_deeplab_with_rep_head_runs_a_step() -> None:
    torch.manual_seed(0)
    method = U2PL({"num_anchors": 16, "num_negatives": 8}, NUM_CLASSES)
    models = method.build_models(
        lambda: build_model(ModelConfig(pretrained=None, rep_head=True), NUM_CLASSES)
    )
    models.train()
    out = method.training_step(models, toy_batch(size=32), 0, 10)
    out["loss"].backward()
    assert torch.isfinite(out["loss"].detach()) and float(out["loss_contra"]) > 0
    assert method.bank.dim == 256


def test_pseudo_label_pass_skips_the_representation_head_with_equal_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher's pseudo-labelling pass runs without the representation head (its output is
    unused there); the step's losses equal those of a step that computes it."""
    import contextlib

    import semivss.methods.u2pl as u2pl_mod
    from semivss.models import representation_off

    model = build_model(ModelConfig(pretrained=None, rep_head=True), NUM_CLASSES).eval()
    x = torch.randn(1, 3, 32, 32)
    with representation_off(model):
        assert "rep" not in model(x)
    assert "rep" in model(x)  # restored

    def step(skip: bool) -> tuple[dict[str, Tensor], int]:
        if not skip:
            monkeypatch.setattr(u2pl_mod, "representation_off", lambda m: contextlib.nullcontext())
        torch.manual_seed(0)
        method = U2PL({"num_anchors": 16, "num_negatives": 8}, NUM_CLASSES)
        models = method.build_models(lambda: build_model(ModelConfig(pretrained=None, rep_head=True), NUM_CLASSES))
        models.train()
        calls = []
        models["teacher"].decoder.rep.register_forward_hook(lambda *_: calls.append(1))
        return method.training_step(models, toy_batch(size=32), 5, 10), len(calls)

    (skipped, n_skip), (full, n_full) = step(True), step(False)
    assert (n_skip, n_full) == (1, 2)  # the teacher's head runs in its train-mode pass only
    for key in ("loss", "loss_sup", "loss_unsup", "loss_contra", "reliable_ratio"):
        torch.testing.assert_close(skipped[key], full[key], rtol=0, atol=0)


# ------------------------------------------------------------------ padding (valid) mask
def _padding_mask(n_u: int = 3, size: int = 16) -> Tensor:
    """(B,1,H,W) validity: sample 0 has its bottom half padded, sample 1 its left 5 columns,
    sample 2 none."""
    valid = torch.ones(n_u, 1, size, size, dtype=torch.bool)
    valid[0, 0, size // 2 :] = False
    valid[1, 0, :, :5] = False
    return valid


def test_unsup_loss_on_valid_pixels_equals_the_loss_on_the_valid_half_alone() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 8, generator=g)
    pseudo = torch.randint(0, 4, (2, 6, 8), generator=g)
    ent = torch.rand(2, 6, 8, generator=g)
    valid = torch.zeros(2, 6, 8, dtype=torch.bool)
    valid[..., :4] = True  # half the pixels
    loss, rel, unrel = u2pl_unsup_loss(logits, pseudo, ent, 25.0, valid)
    half, rel_h, unrel_h = u2pl_unsup_loss(logits[..., :4], pseudo[..., :4], ent[..., :4], 25.0,
                                           torch.ones_like(valid[..., :4]))
    assert float(loss) == pytest.approx(float(half), rel=1e-6)
    assert torch.equal(rel[..., :4], rel_h) and torch.equal(unrel[..., :4], unrel_h)
    assert not rel[..., 4:].any() and not unrel[..., 4:].any()
    assert int(unrel.sum()) == 12  # 25 % of the 48 valid pixels (not of 96): percentile over valid only
    # hand formula: mean CE over reliable x (valid / reliable)
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    assert float(loss) == pytest.approx(float(ce[rel].mean() * 48 / 36), rel=1e-6)


@pytest.mark.parametrize("cutmix_p", [0.0, 1.0])
def test_unsupervised_loss_ignores_padded_pixels_numpy_oracle(cutmix_p: float) -> None:
    """The oracle of ``test_unsupervised_loss_equals_numpy_oracle`` on the valid pixels alone; with
    CutMix the validity mask is mixed with the same box as the image and the pseudo-label."""
    torch.manual_seed(0)
    method = U2PL({"cutmix_p": cutmix_p}, NUM_CLASSES)
    models = method.build_models(lambda: TinySegModel(bn=False))  # teacher == student, train == eval
    models.train()
    batch = with_valid(toy_batch(n_l=2, n_u=3, size=16), _padding_mask())
    torch.manual_seed(5)
    out = method.training_step(models, batch, step=3, max_steps=12)  # alpha_t = 15 %

    x_u = batch["unlabeled"].image[:, 0]
    valid = batch["unlabeled"].valid[:, 0]

    def logits_of(x: Tensor) -> np.ndarray:
        with torch.no_grad():
            return F.interpolate(models["model"](x)["logits"], size=(16, 16), mode="bilinear",
                                 align_corners=False).double().numpy()

    pseudo = logits_of(x_u).argmax(1)
    x_s = x_u
    if cutmix_p:
        torch.manual_seed(5)
        g = step_generator()
        torch.rand((), generator=g)  # the per-batch coin
        box = batch_cutmix_boxes(3, 16, 16, p=1.0, area=0.5, generator=g)
        perm = [1, 2, 0]
        x_s = torch.where(box[:, None], x_u[perm], x_u)
        pseudo = np.where(box.numpy(), pseudo[perm], pseudo)
        valid = torch.where(box, valid[perm], valid)
        assert (valid != batch["unlabeled"].valid[:, 0]).any()  # the box moved padding
    logits = logits_of(x_s)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    prob = np.exp(logp)
    v = valid.numpy().ravel()
    ent = -(prob * np.log(prob + 1e-10)).sum(1).ravel()[v]  # valid pixels only
    ce = -np.take_along_axis(logp, pseudo[:, None], 1)[:, 0].ravel()[v]
    n = ent.size
    k = int(np.floor(0.15 * n + 0.5))
    unreliable = np.zeros(n, bool)
    unreliable[np.argsort(-ent, kind="stable")[:k]] = True
    expected = ce[~unreliable].mean() * n / (n - k)
    assert n < 3 * 16 * 16
    assert float(out["loss_unsup"]) == pytest.approx(expected, rel=1e-4)
    assert float(out["reliable_ratio"]) == pytest.approx((n - k) / n)


def test_contrastive_candidates_exclude_padded_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    import semivss.methods.u2pl as u2pl_module

    seen: dict[str, Tensor] = {}
    real = u2pl_module.u2pl_contrastive_loss

    def spy(rep, rep_t, prob, label, anchor_mask, negative_mask, is_labeled, bank, **kw):  # type: ignore[no-untyped-def]
        seen.update(label=label, anchor=anchor_mask, negative=negative_mask)
        return real(rep, rep_t, prob, label, anchor_mask, negative_mask, is_labeled, bank, **kw)

    monkeypatch.setattr(u2pl_module, "u2pl_contrastive_loss", spy)
    torch.manual_seed(0)
    method = U2PL({"cutmix_p": 0.0, "num_anchors": 8, "num_negatives": 4, "alpha0": 60.0}, NUM_CLASSES)
    models = method.build_models(lambda: TinySegModel())
    models.train()
    batch = with_valid(toy_batch(n_l=2, n_u=3, size=16), _padding_mask())
    out = method.training_step(models, batch, 0, 10)
    assert torch.isfinite(out["loss"].detach())
    small = F.interpolate(batch["unlabeled"].valid[:, 0, None].float(), size=(8, 8), mode="nearest")
    inside = small[:, 0].bool()
    label, anchor, negative = seen["label"][2:], seen["anchor"][2:], seen["negative"][2:]
    assert (~inside).any() and (label[~inside] == 255).all() and (label[inside] != 255).all()
    assert not anchor[~inside].any() and not negative[~inside].any()
    assert anchor[inside].any() and negative[inside].any()


# ------------------------------------------------------------------ engine integration
def make_trainer(out: Path, method: U2PL, iters: int, **train_kw) -> Trainer:
    train_kw.setdefault("num_workers", 0)
    train_kw.setdefault("log_interval", 5)
    train_kw.setdefault("ckpt_interval", 100)
    return Trainer(
        method,
        lambda: TinySegModel(),
        {"labeled": ToyRegions(n=16, size=24), "unlabeled": ToyUnlabeled(n=16, size=24)},
        {"labeled": 4, "unlabeled": 4},
        OptimConfig(lr=0.02),
        ScheduleConfig(iters=iters),
        TrainConfig(precision="fp32", channels_last=False, **train_kw),
        out,
        evaluate_fn=pixel_accuracy_fn(size=24),
        metric="acc",
        tensorboard=False,
        progress=False,
    )


def small_u2pl(cls: type[U2PL] = U2PL) -> U2PL:
    return cls({"num_anchors": 32, "num_negatives": 8, "memory_size": 500}, NUM_CLASSES)


def test_engine_training_lowers_the_loss(tmp_path: Path) -> None:
    method = U2PL({"num_anchors": 32, "num_negatives": 8, "memory_size": 500, "eval_teacher": False},
                  NUM_CLASSES)  # the EMA teacher lags the student for ~1/(1-0.99) iterations
    trainer = make_trainer(tmp_path / "run", method, iters=60, log_interval=10)
    metrics = trainer.fit()
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    train = [r for r in rows if r.get("loss_sup")]
    assert float(train[-1]["loss_sup"]) < 0.7 * float(train[0]["loss_sup"])
    assert float(train[-1]["loss"]) < float(train[0]["loss"])
    assert metrics["acc"] > 0.5  # chance is 0.25
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert set(ckpt["models"]) == {"model", "teacher"}
    assert ckpt["meta"]["export"] == {"members": ["model"], "combine": "single"}
    assert any(not torch.equal(ckpt["models"]["teacher"][k], v) for k, v in ckpt["models"]["model"].items())
    assert sum(len(q) for q in ckpt["method"]["bank"]["queues"]) > 0


class Crash(RuntimeError):
    pass


class CrashingU2PL(U2PL):
    crash_at = 3

    def training_step(self, models, batch, step, max_steps):  # type: ignore[no-untyped-def]
        if step == self.crash_at:
            raise Crash(step)
        return super().training_step(models, batch, step, max_steps)


def test_resume_restores_memory_bank_and_teacher_exactly(tmp_path: Path) -> None:
    make_trainer(tmp_path / "full", small_u2pl(), iters=6, ckpt_interval=3).fit()
    with pytest.raises(Crash):
        make_trainer(tmp_path / "part", small_u2pl(CrashingU2PL), iters=6, ckpt_interval=3).fit()
    resumed = small_u2pl()
    make_trainer(tmp_path / "part", resumed, iters=6, ckpt_interval=3).fit(resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for name in ("model", "teacher"):
        for key, value in a["models"][name].items():
            torch.testing.assert_close(b["models"][name][key], value, rtol=0, atol=1e-6)
    qa, qb = a["method"]["bank"]["queues"], b["method"]["bank"]["queues"]
    assert [len(q) for q in qa] == [len(q) for q in qb] and sum(len(q) for q in qa) > 0
    for x, y in zip(qa, qb):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_supervised_only_warmup_then_teacher_restarts_from_student() -> None:
    torch.manual_seed(0)
    method = U2PL({"sup_only_iters": 2, "num_anchors": 8, "num_negatives": 4}, NUM_CLASSES)
    models = method.build_models(lambda: TinySegModel())
    models.train()
    init_teacher = {k: v.clone() for k, v in models["teacher"].state_dict().items()}
    for step in range(3):
        out = method.training_step(models, toy_batch(), step, 10)
        if step == 2:  # the teacher was reset to the warmed-up student before pseudo-labelling
            student = dict(models["model"].named_parameters())
            for k, v in models["teacher"].named_parameters():
                assert torch.equal(v, student[k]), k
        out["loss"].backward()
        with torch.no_grad():
            for p in models["model"].parameters():
                p -= 0.1 * p.grad
                p.grad = None
        if step < 2:
            assert float(out["loss_unsup"]) == 0.0 and float(out["loss_contra"]) == 0.0
            assert float(out["loss"].detach()) == pytest.approx(float(out["loss_sup"]))
            method.on_step_end(models, step)  # no EMA during the warm-up
            for k, v in models["teacher"].state_dict().items():
                assert torch.equal(v, init_teacher[k]), k
        else:
            assert float(out["loss_unsup"]) > 0
            method.on_step_end(models, step)  # first EMA step: decay 0
            for k, v in models["teacher"].state_dict().items():
                assert torch.equal(v, models["model"].state_dict()[k]), k

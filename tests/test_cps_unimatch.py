"""CPS and UniMatch (docs/methods.md#5-cps, #6-unimatch): losses against numpy oracles, two-network initialisation,
feature-perturbation hook, two strong views from the data layer, training through the engine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_toy import NUM_CLASSES, ToyRegions, pixel_accuracy_fn
from test_u2pl import TinySegModel, ToyUnlabeled, _padding_mask, toy_batch, with_valid
from torch import Tensor, nn

from semivss.data import ClipAugment, FrameRef, UnlabeledClips, load_folder
from semivss.data.requests import UnlabeledRequest
from semivss.engine import OptimConfig, ScheduleConfig, TrainConfig, Trainer
from semivss.errors import ConfigError
from semivss.methods.base import DataSpec, ExportSpec, Method
from semivss.methods.cps import CPS, ProbAverage
from semivss.methods.parts import batch_cutmix_boxes, box_mix_mask, step_generator
from semivss.methods.unimatch import UniMatch, confident_ce, feature_dropout


class Linear1x1(nn.Module):
    """Per-pixel linear classifier at full resolution (logits of a mixed image = mixed logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Conv2d(3, NUM_CLASSES, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.classifier(x)}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def _ce(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean CE over pixels whose target is not 255 (numpy oracle)."""
    logp = _log_softmax(logits)
    valid = target != 255
    t = np.where(valid, target, 0)
    nll = -np.take_along_axis(logp, t[:, None], 1)[:, 0]
    return float(nll[valid].mean())


def _np(x: Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def _linear(net: nn.Module, x: np.ndarray) -> np.ndarray:
    w = _np(net.classifier.weight)[:, :, 0, 0]
    b = _np(net.classifier.bias)
    return np.einsum("kc,nchw->nkhw", w, x) + b[None, :, None, None]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ CPS
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cutmix", [False, True])
def test_cps_loss_equals_numpy_oracle(cutmix: bool, padded: bool) -> None:
    """``padded``: the unlabeled crops carry a padding mask; the cross-supervision CE is then the
    oracle's CE on the valid pixels alone (the box-mixed mask with CutMix)."""
    torch.manual_seed(0)
    method = CPS({"cutmix": cutmix, "cps_weight": 1.5}, NUM_CLASSES)
    models = method.build_models(Linear1x1)
    batch = toy_batch(n_l=2, n_u=3, size=16)
    valid = np.ones((3, 16, 16), bool)
    if padded:
        batch = with_valid(batch, _padding_mask())
        valid = batch["unlabeled"].valid[:, 0].numpy()
    torch.manual_seed(5)
    out = method.training_step(models, batch, 0, 10)

    net1, net2 = models["model"], models["model2"]
    x_l, y = _np(batch["labeled"].image), batch["labeled"].label.numpy()
    x_u = _np(batch["unlabeled"].image[:, 0])
    sup1, sup2 = _ce(_linear(net1, x_l), y), _ce(_linear(net2, x_l), y)
    if cutmix:
        torch.manual_seed(5)
        g = step_generator()
        mask = np.stack([box_mix_mask(16, 16, 3, (0.25, 0.5), g).numpy() for _ in range(3)])
        x_mix = np.where(mask[:, None], x_u[[1, 2, 0]], x_u)
        l1, l2 = _linear(net1, x_mix), _linear(net2, x_mix)
        valid = np.where(mask, valid[[1, 2, 0]], valid)
    else:
        l1 = _linear(net1, np.concatenate([x_l, x_u]))
        l2 = _linear(net2, np.concatenate([x_l, x_u]))
        valid = np.concatenate([np.ones((2, 16, 16), bool), valid])  # labeled pixels count
    assert valid.all() != padded
    cps = _ce(l1, np.where(valid, l2.argmax(1), 255)) + _ce(l2, np.where(valid, l1.argmax(1), 255))
    assert float(out["loss_sup"]) == pytest.approx(sup1, rel=1e-5)
    assert float(out["loss_sup2"]) == pytest.approx(sup2, rel=1e-5)
    assert float(out["loss_cps"]) == pytest.approx(cps, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(sup1 + sup2 + 1.5 * cps, rel=1e-5)


def _pretrained_tiny() -> TinySegModel:
    """A 'pretrained' encoder: fixed weights loaded after the random init, as build_model does."""
    model = TinySegModel(rep=False)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_cps_networks_share_the_encoder_and_differ_in_the_heads() -> None:
    torch.manual_seed(0)
    models = CPS(None, NUM_CLASSES).build_models(_pretrained_tiny)
    a, b = models["model"].state_dict(), models["model2"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    heads = [k for k in a if a[k].dim() == 4 and not k.startswith("encoder.")]  # conv weights
    assert heads and all(not torch.equal(a[k], b[k]) for k in heads)
    torch.manual_seed(0)
    again = CPS(None, NUM_CLASSES).build_models(_pretrained_tiny)
    assert all(torch.equal(v, again["model2"].state_dict()[k]) for k, v in b.items())  # seeded
    assert CPS(None, NUM_CLASSES).trainable(models) == ["model", "model2"]


def test_cps_inference_first_or_probability_average() -> None:
    torch.manual_seed(0)
    models = CPS(None, NUM_CLASSES).build_models(Linear1x1)
    assert CPS(None, NUM_CLASSES).inference_model(models) is models["model"]
    avg = CPS({"inference": "average"}, NUM_CLASSES).inference_model(models)
    assert isinstance(avg, ProbAverage)
    assert CPS(None, NUM_CLASSES).export_spec(models) == ExportSpec(("model",))
    assert CPS({"inference": "average"}, NUM_CLASSES).export_spec(models) == ExportSpec(
        ("model", "model2"), "prob_average")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = (torch.softmax(models["model"](x)["logits"], 1)
                    + torch.softmax(models["model2"](x)["logits"], 1)) / 2
        got = torch.softmax(avg(x)["logits"], 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"method\.inference"):
        CPS({"inference": "mean"}, NUM_CLASSES)
    with pytest.raises(ConfigError, match=r"method\.prop_range"):
        CPS({"prop_range": [0.6, 0.2]}, NUM_CLASSES)


# ------------------------------------------------------------------ UniMatch
def test_feature_dropout_hook_appends_perturbed_copies() -> None:
    torch.manual_seed(0)
    model = TinySegModel(rep=False)
    x = torch.randn(3, 3, 8, 8)
    clean_low, clean_high = model.encoder(x)
    with feature_dropout(model, 0.5, start=1):
        low, high = model.encoder(x)
        logits = model(x)["logits"]
    assert low.shape[0] == high.shape[0] == logits.shape[0] == 5
    torch.testing.assert_close(low[:3], clean_low)
    for dropped, clean in ((low[3:], clean_low[1:]), (high[3:], clean_high[1:])):
        for c in range(clean.shape[1]):  # Dropout2d: a channel is zeroed or scaled by 1/(1-p)
            ch, ref = dropped[:, c], clean[:, c]
            for i in range(ch.shape[0]):
                assert torch.equal(ch[i], torch.zeros_like(ch[i])) or torch.allclose(ch[i], 2 * ref[i])
    assert model.encoder(x)[0].shape[0] == 3  # the hook is removed afterwards
    with pytest.raises(ConfigError, match="encoder"):
        with feature_dropout(Linear1x1(), 0.5):
            pass


def test_confident_ce_counts_all_pixels() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 0]]])
    conf = torch.tensor([[[0.99, 0.5]]])
    ce0 = float(-torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0])
    every = torch.ones_like(target, dtype=torch.bool)
    assert float(confident_ce(logits, target, conf, 0.95, every)) == pytest.approx(ce0 / 2)
    assert float(confident_ce(logits, target, conf, 1.0, every)) == 0.0


def test_confident_ce_counts_only_valid_pixels() -> None:
    """Pixel 1 is padding: the loss is that of pixel 0 alone (confident or not, padding excluded)."""
    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 2.0, 1.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 0, 1]]])
    conf = torch.tensor([[[0.99, 0.99, 0.5]]])
    valid = torch.tensor([[[True, False, True]]])
    ce0 = float(-torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0])
    assert float(confident_ce(logits, target, conf, 0.95, valid)) == pytest.approx(ce0 / 2)
    alone = confident_ce(logits[..., ::2], target[..., ::2], conf[..., ::2], 0.95, valid[..., ::2])
    assert float(confident_ce(logits, target, conf, 0.95, valid)) == pytest.approx(float(alone))
    none = torch.zeros_like(valid)
    assert float(confident_ce(logits, target, conf, 0.0, none)) == 0.0  # no valid pixel: 0, not NaN


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("cutmix_p", [0.0, 1.0])
def test_unimatch_loss_equals_numpy_oracle(cutmix_p: float, padded: bool) -> None:
    """``padded``: each stream's loss is the oracle's on the valid pixels alone (for the strong
    views the padding mask is mixed with that view's box)."""
    torch.manual_seed(0)
    method = UniMatch({"conf_thresh": 0.3, "fp_dropout": 0.0, "cutmix_p": cutmix_p}, NUM_CLASSES)
    models = method.build_models(lambda: TinySegModel(bn=False, rep=False))
    net = models["model"]
    batch = toy_batch(n_l=2, n_u=3, size=16, strong=2)
    valid = np.ones((3, 16, 16), bool)
    if padded:
        batch = with_valid(batch, _padding_mask())
        valid = batch["unlabeled"].valid[:, 0].numpy()
    torch.manual_seed(9)
    out = method.training_step(models, batch, 0, 10)

    def up(x: Tensor) -> np.ndarray:
        with torch.no_grad():
            return _np(F.interpolate(net(x)["logits"], size=(16, 16), mode="bilinear", align_corners=False))

    unl = batch["unlabeled"]
    s1, s2 = unl.strong[0][:, 0], unl.strong[1][:, 0]
    pw = np.exp(_log_softmax(up(unl.image[:, 0])))
    conf, mask = pw.max(1), pw.argmax(1)
    conf1 = conf2 = conf
    mask1 = mask2 = mask
    valid1 = valid2 = valid
    if cutmix_p:
        torch.manual_seed(9)
        g = step_generator()
        area, ratio = (0.02, 0.4), (0.3, 1 / 0.3)
        b1 = batch_cutmix_boxes(3, 16, 16, 1.0, area, ratio, g)
        b2 = batch_cutmix_boxes(3, 16, 16, 1.0, area, ratio, g)
        perm = [1, 2, 0]
        s1 = torch.where(b1[:, None], s1[perm], s1)
        s2 = torch.where(b2[:, None], s2[perm], s2)
        m1, m2 = b1.numpy(), b2.numpy()
        mask1, conf1 = np.where(m1, mask[perm], mask), np.where(m1, conf[perm], conf)
        mask2, conf2 = np.where(m2, mask[perm], mask), np.where(m2, conf[perm], conf)
        valid1, valid2 = np.where(m1, valid[perm], valid), np.where(m2, valid[perm], valid)
        assert not padded or (valid1 != valid).any() or (valid2 != valid).any()

    def conf_ce(logits: np.ndarray, target: np.ndarray, c: np.ndarray, v: np.ndarray) -> float:
        """Mean over the valid pixels of the confident CE (valid pixels alone)."""
        nll = -np.take_along_axis(_log_softmax(logits), target[:, None], 1)[:, 0]
        return float((nll * (c >= 0.3))[v].sum() / v.sum())

    sup = _ce(up(batch["labeled"].image), batch["labeled"].label.numpy())
    l1, l2 = conf_ce(up(s1), mask1, conf1, valid1), conf_ce(up(s2), mask2, conf2, valid2)
    lfp = conf_ce(up(unl.image[:, 0]), mask, conf, valid)  # dropout 0: the fp stream is the clean one
    expected = (sup + 0.25 * l1 + 0.25 * l2 + 0.5 * lfp) / 2
    assert float(out["loss_sup"]) == pytest.approx(sup, rel=1e-5)
    assert float(out["loss_fp"]) == pytest.approx(lfp, rel=1e-5)
    assert float(out["loss_s"]) == pytest.approx((l1 + l2) / 2, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out["mask_ratio"]) == pytest.approx(float((conf >= 0.3)[valid].mean()), rel=1e-6)


def test_unimatch_needs_two_strong_views() -> None:
    method = UniMatch(None, NUM_CLASSES)
    spec = method.data_spec()
    assert spec.get("unlabeled") == UnlabeledRequest(frames=1, strong_copies=2)
    assert method.cfg.conf_thresh == 0.95
    models = method.build_models(lambda: TinySegModel(rep=False))
    with pytest.raises(ConfigError, match="two strong copies"):
        method.training_step(models, toy_batch(strong=1), 0, 10)


def test_unlabeled_clips_give_independent_strong_copies(tmp_path: Path) -> None:
    (tmp_path / "meta.yaml").write_text("classes: [a, b]\n")
    rng = np.random.default_rng(0)
    for sub in ("videos", "labels"):
        (tmp_path / sub / "v").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(tmp_path / "videos" / "v" / f"{i:06d}.png"), rng.integers(0, 255, (16, 16, 3), np.uint8))
        cv2.imwrite(str(tmp_path / "labels" / "v" / f"{i:06d}.png"), np.zeros((16, 16), np.uint8))
    vs = load_folder(tmp_path)
    aug = ClipAugment((16, 16), base_size=None)
    refs = [FrameRef("v", i) for i in range(3)]
    one = UnlabeledClips(vs, refs, aug, num_frames=2, strong_copies=1)[(1, 42)]
    two = UnlabeledClips(vs, refs, aug, num_frames=2, strong_copies=2)[(1, 42)]
    assert len(one.strong) == 1 and len(two.strong) == 2
    assert two.strong[1].shape == two.strong[0].shape == (2, 3, 16, 16)
    for key in ("image", "offset", "valid"):  # existing outputs unchanged
        assert torch.equal(getattr(one, key), getattr(two, key))
    assert torch.equal(one.strong[0], two.strong[0])
    assert not torch.equal(two.strong[0], two.strong[1])
    with pytest.raises(ConfigError, match="strong_copies"):
        UnlabeledClips(vs, refs, aug, strong_copies=-1)
    with pytest.raises(ConfigError, match="strong_copies"):
        DataSpec.of(UnlabeledRequest(strong_copies=-1))


# ------------------------------------------------------------------ engine integration
def run_engine(out: Path, method: Method, strong_copies: int, iters: int = 60) -> dict[str, float]:
    return Trainer(
        method,
        lambda: TinySegModel(rep=False),
        {"labeled": ToyRegions(n=16, size=24),
         "unlabeled": ToyUnlabeled(n=16, size=24, strong_copies=strong_copies)},
        {"labeled": 4, "unlabeled": 4},
        OptimConfig(lr=0.02),
        ScheduleConfig(iters=iters),
        TrainConfig(precision="fp32", channels_last=False, num_workers=0, log_interval=10,
                    ckpt_interval=1000),
        out,
        evaluate_fn=pixel_accuracy_fn(size=24),
        metric="acc",
        tensorboard=False,
        progress=False,
    ).fit()


@pytest.mark.parametrize(
    "method,copies",
    [(CPS(None, NUM_CLASSES), 0), (UniMatch(None, NUM_CLASSES), 2)],
    ids=["cps", "unimatch"],
)
def test_engine_training_lowers_the_loss(tmp_path: Path, method: Method, copies: int) -> None:
    metrics = run_engine(tmp_path / "run", method, copies)
    rows = [r for r in read_csv(tmp_path / "run" / "metrics.csv") if r.get("loss_sup")]
    assert float(rows[-1]["loss_sup"]) < 0.7 * float(rows[0]["loss_sup"])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert metrics["acc"] > 0.5  # chance is 0.25


# ------------------------------------------------------------------ DDP (2 processes, gloo)
DDP_SCRIPT = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from engine_toy import NUM_CLASSES, ToyRegions
from test_u2pl import TinySegModel, ToyUnlabeled
from semivss.engine import OptimConfig, ScheduleConfig, TrainConfig, Trainer, cleanup, get_rank
from semivss.methods.cps import CPS
from semivss.methods.u2pl import U2PL
from semivss.methods.unimatch import UniMatch

out = Path({out!r})
runs = {{
    "u2pl": (U2PL({{"num_anchors": 8, "num_negatives": 4, "memory_size": 300}}, NUM_CLASSES), True, 0),
    "cps": (CPS(None, NUM_CLASSES), False, 0),
    "unimatch": (UniMatch({{"conf_thresh": 0.5}}, NUM_CLASSES), False, 2),
}}
res = {{}}
for name, (method, rep, copies) in runs.items():
    trainer = Trainer(
        method, lambda: TinySegModel(rep=rep),
        {{"labeled": ToyRegions(n=8, size=16),
          "unlabeled": ToyUnlabeled(n=8, size=16, strong_copies=copies)}},
        {{"labeled": 2, "unlabeled": 2}}, OptimConfig(lr=0.05), ScheduleConfig(iters=3),
        TrainConfig(num_workers=0, log_interval=1, ckpt_interval=3, precision="fp32",
                    channels_last=False),
        out / name, tensorboard=False, progress=False,
    )
    trainer.fit()
    res[name] = {{
        "params": {{n: dict(m.named_parameters()) for n, m in trainer.models.items()}},
        "method": method.state_dict(),
    }}
torch.save(res, out / f"rank{{get_rank()}}.pt")
cleanup()
"""


@pytest.mark.slow
def test_ddp_two_processes_keep_ranks_in_sync(tmp_path: Path) -> None:
    """Gathered U2PL negatives, CPS's several forwards per network and UniMatch's encoder hook
    all work under DDP: parameters and memory banks are identical on both ranks."""
    import os
    import socket
    import subprocess
    import sys
    import textwrap

    tests = Path(__file__).resolve().parent
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(tests), out=str(out))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    for name in ("u2pl", "cps", "unimatch"):
        for model, params in r0[name]["params"].items():
            for key, value in params.items():
                torch.testing.assert_close(r1[name]["params"][model][key], value, rtol=0, atol=1e-6)
    q0, q1 = r0["u2pl"]["method"]["bank"]["queues"], r1["u2pl"]["method"]["bank"]["queues"]
    assert sum(len(q) for q in q0) > 0
    for a, b in zip(q0, q1):
        assert torch.equal(a, b)


def test_cps_average_is_reloaded_from_checkpoint_and_export(tmp_path: Path) -> None:
    """`inference: average`: `semivss train` records both networks, and load_trained_model
    rebuilds their probability average from checkpoints/last.pt and from model.safetensors."""
    import yaml
    from typer.testing import CliRunner

    from semivss.cli import app
    from semivss.engine.checkpoint import load_checkpoint
    from semivss.experiment import load_trained_model
    from semivss.models import ModelConfig, build_model

    runner = CliRunner()
    data = tmp_path / "synth"
    res = runner.invoke(app, ["data", "synth", str(data), "--videos", "3", "--frames", "4",
                              "--height", "32", "--width", "48", "--seed", "1"])
    assert res.exit_code == 0, res.output
    cfg = {
        "name": "cps-avg", "out_dir": str(tmp_path / "run"),
        "data": {"format": "synthetic", "root": str(data), "split": {"mode": "every_kth", "k": 2},
                 "base_size": [32, 48], "crop_size": [32, 32], "batch_size": 2,
                 "unlabeled_batch_size": 2, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "pretrained": None},
        "method": {"name": "cps", "inference": "average"},
        "optim": {"lr": 0.01}, "schedule": {"iters": 2},
        "train": {"log_interval": 1, "eval_interval": 0, "ckpt_interval": 2, "precision": "fp32"},
        "eval": {"size": [32, 48]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(app, ["train", str(tmp_path / "cfg.yaml")], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["meta"]["export"] == {"members": ["model", "model2"], "combine": "prob_average"}
    nets = []
    for name in ("model", "model2"):
        net = build_model(ModelConfig(backbone="mobilenet_v2", pretrained=None), 8)
        net.load_state_dict(ckpt["models"][name])
        nets.append(net.eval())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expect = (torch.softmax(nets[0](x)["logits"], 1) + torch.softmax(nets[1](x)["logits"], 1)) / 2
        for path in (tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "run" / "model.safetensors"):
            model, meta = load_trained_model(path)
            assert isinstance(model, ProbAverage) and len(model.nets) == 2
            torch.testing.assert_close(torch.softmax(model(x)["logits"], 1), expect)

    # files written before meta["export"]: meta["inference_model"] (a list -> the average of
    # those networks, a name -> that network), safetensors holding ``nets.<k>.`` keys
    from safetensors.torch import load_file, save_file

    from semivss.engine.checkpoint import save_checkpoint

    def legacy(meta: dict, names: list[str] | str) -> dict:
        return {**{k: v for k, v in meta.items() if k != "export"}, "inference_model": names}

    save_checkpoint(tmp_path / "old_avg.pt", {**ckpt, "meta": legacy(ckpt["meta"], ["model", "model2"])})
    save_checkpoint(tmp_path / "old_one.pt", {**ckpt, "meta": legacy(ckpt["meta"], "model2")})
    tensors = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("nets.0.") for k in tensors) and any(k.startswith("nets.1.") for k in tensors)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={
        "format": "pt", "semivss_meta": json.dumps(legacy(ckpt["meta"], ["model", "model2"]))})
    with torch.no_grad():
        for path in (tmp_path / "old_avg.pt", tmp_path / "old.safetensors"):
            model, _ = load_trained_model(path)
            assert isinstance(model, ProbAverage) and len(model.nets) == 2
            torch.testing.assert_close(torch.softmax(model(x)["logits"], 1), expect)
        model, _ = load_trained_model(tmp_path / "old_one.pt")
        torch.testing.assert_close(model(x)["logits"], nets[1](x)["logits"])


@pytest.mark.parametrize(
    "method,copies",
    [(CPS({"threshold": "freematch"}, NUM_CLASSES), 0),
     (UniMatch({"threshold": "freematch", "conf_weight_gamma": 1.0}, NUM_CLASSES), 2)],
    ids=["cps", "unimatch"],
)
def test_classwise_thresholds_learn_and_are_checkpointed(tmp_path: Path, method: Method, copies: int) -> None:
    """With ``threshold: freematch`` the class thresholds move away from 1/C as the networks become
    confident, and they are part of the checkpointed method state (exact resume)."""
    run_engine(tmp_path / "run", method, copies, iters=20)
    level = float(method.thresholds.level)  # type: ignore[attr-defined]
    assert level > 1.0 / NUM_CLASSES
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["method"]
    assert float(state["thresholds"]["level"]) == pytest.approx(level)

#!/usr/bin/env python
"""Diagnostic: re-estimate BatchNorm running statistics of trained models on clean camvid-ssvs
training frames (whole frames at the eval size, cumulative average), then evaluate on val again.

    python scripts/bn_reestimate.py runs/A/model.safetensors runs/B/model.safetensors
"""
import sys, json, torch
from torch import nn
from semivss.config import load_config
from semivss.data.config import load_videosets
from semivss.data.clips import EvalFrames
from semivss.experiment import load_trained_model, eval_config_from
from semivss.inference.evaluate import evaluate

torch.manual_seed(0)
cfg = load_config("configs/camvid-ssvs/supervised_1-8.yaml")
train_set, val_set = load_videosets(cfg.data)
for path in sys.argv[1:]:
    model, meta = load_trained_model(path)
    ecfg = eval_config_from(meta)
    before = evaluate(model, val_set, val_set.annotated(), ecfg, "cpu", progress=False).scalars()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats(); m.momentum = None  # cumulative average
    ds = EvalFrames(train_set, train_set.frames(), ecfg.size)
    model.train()
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            x = torch.stack([ds[j]["image"] for j in range(i, min(i + 8, len(ds)))])
            if x.shape[0] > 1:
                model(x.contiguous(memory_format=torch.channels_last))
    model.eval()
    after = evaluate(model, val_set, val_set.annotated(), ecfg, "cpu", progress=False).scalars()
    print(path, "before", {k: round(100 * before[k], 2) for k in ("mIoU", "VC8", "VC16")},
          "after BN re-estimation on clean train frames", {k: round(100 * after[k], 2) for k in ("mIoU", "VC8", "VC16")}, flush=True)

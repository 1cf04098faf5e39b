"""A 2-process DDP run on CPU (gloo) launched with torchrun: both ranks end with identical
parameters, rank 0 writes the checkpoint with every rank's RNG state."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_toy import TinySeg

from semivss.engine import load_checkpoint, seed_everything

TESTS = Path(__file__).resolve().parent

SCRIPT = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from engine_toy import NUM_CLASSES, TinySeg, ToyRegions, pixel_accuracy_fn
from semivss.engine import OptimConfig, ScheduleConfig, TrainConfig, Trainer, cleanup, get_rank
from semivss.methods import Supervised

out = Path({out!r})
trainer = Trainer(
    Supervised(None, NUM_CLASSES), TinySeg, {{"labeled": ToyRegions(n=12)}}, {{"labeled": 2}},
    OptimConfig(lr=0.05), ScheduleConfig(iters=6),
    TrainConfig(num_workers=0, log_interval=2, ckpt_interval=3, precision="fp32"),
    out, evaluate_fn=pixel_accuracy_fn(), metric="acc", tensorboard=False,
)
result = trainer.fit()
params = {{k: v.detach().clone() for k, v in trainer.models["model"].named_parameters()}}
torch.save({{"params": params, "result": result}}, out / f"rank{{get_rank()}}.pt")
cleanup()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_cpu(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "train_ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS), out=str(out))))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    seed_everything(0)  # the trainer seeds train.seed (0) before building the models
    init = dict(TinySeg().named_parameters())
    for key, value in r0["params"].items():
        torch.testing.assert_close(r1["params"][key], value, rtol=0, atol=0)
        assert not torch.equal(value, init[key].detach())  # trained
    assert r0["result"] == r1["result"] and r0["result"]["step"] == 6.0  # metrics broadcast
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 6 and state["world_size"] == 2
    ranks = state["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    for key, value in r0["params"].items():
        torch.testing.assert_close(state["models"]["model"][key], value, rtol=0, atol=0)

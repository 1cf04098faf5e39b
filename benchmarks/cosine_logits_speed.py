"""U2PL contrastive similarities of one step: 11 per-class blocks of 256 anchors x (1 + 50) keys
x 256 dims, forward + backward through the anchors, with ``F.cosine_similarity`` broadcasting
the anchors over the keys (the official form) against ``cosine_logits`` (a batched product of
unit vectors). Inputs are drawn before the timing; best of 5 rounds. OMP_NUM_THREADS=1 for the
one-thread figure.

    python benchmarks/cosine_logits_speed.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from semivss.methods.parts.contrastive import cosine_logits


def main(classes: int = 11, anchors: int = 256, keys: int = 51, dim: int = 256) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = [(torch.randn(anchors, dim, generator=gen), torch.randn(anchors, keys, dim, generator=gen))
              for _ in range(classes)]
    target = torch.zeros(anchors, dtype=torch.long)

    def broadcast(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(a.unsqueeze(1), k, dim=2) / 0.5

    def batched(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return cosine_logits(a, k, 0.5)

    def seconds(sim) -> float:  # noqa: ANN001
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for a, k in blocks:
                a = a.clone().requires_grad_(True)
                F.cross_entropy(sim(a, k), target).backward()
            best = min(best, time.perf_counter() - t0)
        return best

    seconds(batched)  # warm-up
    print(f"{classes} blocks of {anchors} anchors x {keys} keys x {dim} dims, forward + backward "
          f"({torch.get_num_threads()} torch threads): F.cosine_similarity {seconds(broadcast):.3f} s, "
          f"cosine_logits {seconds(batched):.3f} s")


if __name__ == "__main__":
    main()

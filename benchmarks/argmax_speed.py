"""Per-frame class argmax of a (1, 11, 240, 320) score map: ``x.argmax(1)`` (a reduction over the
strided class axis) against ``semivss.ops.class_argmax`` (the same result from a channels-last
copy). Then the whole output stage of evaluation (logits of a stride-4 model, 60x80, upsampled to
the 240x320 input, then to the 360x480 labels, then the argmax) in the plain layout against
``semivss.ops.resize_channels_last``. Best of 5 rounds of 50 calls; run with OMP_NUM_THREADS=1
for the one-thread figure.

    python benchmarks/argmax_speed.py
"""

from __future__ import annotations

import time

import torch

from semivss.ops import class_argmax, resize, resize_channels_last


def _ms(f, n: int = 50) -> float:  # noqa: ANN001
    f()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n)
    return 1000 * best


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 11, 240, 320)
    assert torch.equal(class_argmax(x), x.argmax(1))
    print(f"argmax(1) {_ms(lambda: x.argmax(1)):.2f} ms, class_argmax {_ms(lambda: class_argmax(x)):.2f} ms "
          f"per 240x320 frame, 11 classes ({torch.get_num_threads()} torch threads)")
    logits = torch.randn(1, 11, 60, 80)

    def plain() -> torch.Tensor:
        return class_argmax(resize(resize(logits, (240, 320)), (360, 480)))

    def channels_last() -> torch.Tensor:
        return class_argmax(resize(resize_channels_last(logits, (240, 320)), (360, 480)))

    assert torch.equal(plain(), channels_last())
    print(f"output stage 60x80 -> 240x320 -> 360x480 + argmax: plain layout {_ms(plain):.2f} ms, "
          f"channels-last {_ms(channels_last):.2f} ms per frame")


if __name__ == "__main__":
    main()

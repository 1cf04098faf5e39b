"""Tiny network, dataset and evaluation used by the engine / method tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from semivss.data.batch import LabeledBatch

NUM_CLASSES = 4
# class colours in normalised image space; the network must learn colour -> class
COLOURS = torch.tensor(
    [[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]
)


class TinySeg(nn.Module):
    """SegModel-like: stride-2 conv + BN + ReLU (backbone), dropout, 1x1 classifier (head)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.drop = nn.Dropout2d(0.1)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.output_stride_total = 2

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.drop(self.backbone(x))
        return {"logits": self.head(f), "feature": f}

    def classify(self, feature: torch.Tensor) -> torch.Tensor:
        return self.head(feature)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.backbone.parameters()), "head": list(self.head.parameters())}


def make_labels(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` label maps: random background class plus two random rectangles; row 0 = ignore."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.empty(n, size, size, dtype=torch.int64)
    for i in range(n):
        labels[i] = int(torch.randint(NUM_CLASSES, (1,), generator=g))
        for _ in range(2):
            y0, x0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
            h, w = torch.randint(6, size // 2, (2,), generator=g).tolist()
            labels[i, y0 : y0 + h, x0 : x0 + w] = int(torch.randint(NUM_CLASSES, (1,), generator=g))
        labels[i, 0, :] = 255
    return labels


def render(label: torch.Tensor, g: torch.Generator | None, noise: float = 0.4) -> torch.Tensor:
    """Image (3,H,W) of a label map: class colour plus Gaussian noise (ignore pixels grey)."""
    colours = torch.cat([COLOURS, torch.zeros(1, 3)])
    idx = torch.where(label == 255, torch.full_like(label, NUM_CLASSES), label)
    image = colours[idx].permute(2, 0, 1).contiguous()
    if g is not None:
        image = image + noise * torch.randn(image.shape, generator=g)
    return image


class ToyRegions(Dataset):
    """In-memory labeled frames indexed by ``(index, sample_seed)``; the seed drives the noise and
    a random horizontal flip, so every draw is reproducible from the sampler alone. Samples are
    ``LabeledBatch`` es with an all-True ``valid`` (no crop padding)."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0) -> None:
        self.labels = make_labels(n, size, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> LabeledBatch:
        index, seed = item
        g = torch.Generator().manual_seed(int(seed))
        label = self.labels[index]
        image = render(label, g)
        if float(torch.rand((), generator=g)) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return LabeledBatch(image, label.clone(), torch.ones(label.shape, dtype=torch.bool))


def pixel_accuracy_fn(n: int = 8, size: int = 32, seed: int = 123):
    """An ``evaluate_fn`` scoring pixel accuracy on a fixed, noisy validation set."""
    labels = make_labels(n, size, seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([render(lbl, g) for lbl in labels])

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        logits = model(images)["logits"].float()
        logits = torch.nn.functional.interpolate(
            logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        pred = logits.argmax(1)
        valid = labels != 255
        return {"acc": float((pred == labels)[valid].float().mean()), "step": float(step)}

    return evaluate

"""Confusion-matrix segmentation metrics (VSPW official definitions; docs/methods.md#9-metrics,
Eq. (MET-1)..(MET-4)).

The matrix is accumulated over all annotated frames of a split; pixels whose ground truth is the
ignore index are dropped. Rows are ground-truth classes, columns predictions, plus one extra column
counting predictions outside ``0..C-1`` (they are wrong for their ground-truth class and a false
positive for no class).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from semivss.errors import DataError

ArrayLike = torch.Tensor | np.ndarray

__all__ = ["ConfusionMatrix", "metrics_from_matrix"]


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    return t


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ``torch.distributed`` ranks (returned on CPU; no-op when not
    initialised). NCCL needs the buffer on the current CUDA device, gloo on the CPU."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = values.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


class ConfusionMatrix:
    """Streaming confusion matrix of ``num_classes`` classes (docs/methods.md#9-metrics).

    ``update`` costs one ``bincount`` over the pixels; matrices merge with ``merge`` or ``+`` and sum
    over distributed ranks with ``all_reduce``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} lies inside the class range 0..{num_classes - 1}"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        # (C, C + 1): last column = predictions outside 0..C-1.
        self._mat = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64)

    # ------------------------------------------------------------------ accumulation
    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add a prediction/ground-truth pair of any (equal) shape; ids ``0..C-1``, target ignore.

        Raises ``DataError`` when shapes differ or the target holds a value that is neither a
        class id nor the ignore index.
        """
        p = _as_tensor(pred, "pred")
        t = _as_tensor(target, "target")
        if p.shape != t.shape:
            raise DataError(
                f"prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}"
            )
        if p.device != t.device:
            p = p.to(t.device)
        if t.numel() == 0:
            return
        c = self.num_classes
        t = t.reshape(-1).to(torch.int32)
        p = p.reshape(-1).to(torch.int32)
        lo, hi = torch.aminmax(t)
        if int(lo) < 0 or int(hi) >= c:
            bad = (t != self.ignore_index) & ((t < 0) | (t >= c))
            if bool(bad.any()):
                value = int(t[bad][0])
                raise DataError(
                    f"target contains label {value}, outside 0..{c - 1} and not the ignore "
                    f"index {self.ignore_index}"
                )
        # Ignored ground truth goes to an extra row C that is dropped afterwards.
        t = torch.where(t == self.ignore_index, c, t)
        p = torch.where((p >= 0) & (p < c), p, c)
        counts = torch.bincount(t * (c + 1) + p, minlength=(c + 1) * (c + 1))
        self._mat += counts.view(c + 1, c + 1)[:c].to(device="cpu", dtype=torch.int64)

    def update_matrix(self, matrix: ArrayLike) -> None:
        """Add a raw count matrix of shape (C, C) or (C, C+1) (last column: invalid predictions)."""
        m = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
        c = self.num_classes
        if m.shape == (c, c):
            m = torch.cat([m, torch.zeros(c, 1, dtype=m.dtype, device=m.device)], dim=1)
        if m.shape != (c, c + 1):
            raise DataError(f"confusion matrix has shape {tuple(m.shape)}, expected ({c}, {c})")
        self._mat += m.to(device="cpu", dtype=torch.int64)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix in place and return ``self``."""
        self._check_compatible(other)
        self._mat += other._mat
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out._mat = self._mat + other._mat
        return out

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def _check_compatible(self, other: ConfusionMatrix) -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge ConfusionMatrix with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge matrices of {self.num_classes} and {other.num_classes} classes"
            )

    def reset(self) -> None:
        """Zero all counts."""
        self._mat.zero_()

    def copy(self) -> ConfusionMatrix:
        """An independent copy."""
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out._mat = self._mat.clone()
        return out

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ``torch.distributed`` ranks (no-op when not initialised)."""
        self._mat = all_reduce_sum(self._mat)
        return self

    # ------------------------------------------------------------------ views
    @property
    def matrix(self) -> np.ndarray:
        """(C, C) int64 counts, rows = ground truth, columns = prediction."""
        return self._mat[:, : self.num_classes].numpy().copy()

    @property
    def invalid(self) -> np.ndarray:
        """(C,) counts of predictions outside 0..C-1, per ground-truth class."""
        return self._mat[:, self.num_classes].numpy().copy()

    @property
    def raw(self) -> np.ndarray:
        """(C, C+1) int64 counts including the invalid-prediction column."""
        return self._mat.numpy().copy()

    @property
    def total(self) -> int:
        """Number of counted (non-ignored) pixels."""
        return int(self._mat.sum())

    def compute(self) -> dict[str, Any]:
        """Metrics of the accumulated counts; see :func:`metrics_from_matrix`."""
        return metrics_from_matrix(self._mat.numpy())

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total})"


def metrics_from_matrix(raw: np.ndarray) -> dict[str, Any]:
    """IoU-family metrics of a (C, C) or (C, C+1) confusion matrix (Eq. (MET-1)..(MET-4)).

    Returns ``iou`` (C,) with IoU_c = TP/(TP+FP+FN), NaN where the class is absent from both the
    ground truth and the prediction; ``mIoU`` = mean IoU over classes present in the ground truth;
    ``fwIoU`` = sum_c freq_c IoU_c with freq_c = GT pixels of c / all GT pixels; ``pixel_acc``;
    ``class_acc`` (C,) = TP_c / GT_c (NaN where absent from the GT) and its mean ``mAcc``;
    ``gt_pixels`` (C,), ``present`` (C,) bool and ``n_pixels``. Scalars are NaN on an empty matrix.
    """
    m = np.asarray(raw, dtype=np.float64)
    c = m.shape[0]
    if m.ndim != 2 or m.shape[1] not in (c, c + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C+1), got {m.shape}")
    sq = m[:, :c]
    tp = np.diag(sq)
    gt = m.sum(axis=1)  # includes invalid predictions -> FN
    pred = sq.sum(axis=0)
    fp = pred - tp
    fn = gt - tp
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)
        class_acc = np.where(gt > 0, tp / np.where(gt > 0, gt, 1.0), np.nan)
    present = gt > 0
    total = gt.sum()
    nan = float("nan")
    miou = float(iou[present].mean()) if present.any() else nan
    fwiou = float((gt[present] / total * iou[present]).sum()) if total > 0 else nan
    pixel_acc = float(tp.sum() / total) if total > 0 else nan
    macc = float(class_acc[present].mean()) if present.any() else nan
    return {
        "mIoU": miou,
        "fwIoU": fwiou,
        "pixel_acc": pixel_acc,
        "mAcc": macc,
        "iou": iou,
        "class_acc": class_acc,
        "gt_pixels": gt.astype(np.int64),
        "present": present,
        "n_pixels": int(total),
    }

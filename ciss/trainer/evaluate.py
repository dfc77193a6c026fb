"""Evaluation: confusion matrix, mIoU (all / old / new, per class).

Metric conventions (methods.md 8.11): IoU_c = TP / (TP + FP + FN) over the whole split; a class
enters the means only if the split has ground-truth pixels of it (the others are listed under
"excluded"; a class with no ground truth but false positives is excluded too, unlike MiB's nanmean
which scores it 0). "old" = the classes of step 0, background included (VOC convention); "new" =
the classes added at steps >= 1 (None at step 0).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ciss.classmap import BACKGROUND, ClassMap
from ciss.errors import CissError
from ciss.sizes import nearest_on_stride
from ciss.trainer.models.outputs import logits_of

if TYPE_CHECKING:
    from tqdm import tqdm


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class ConfusionMatrix:
    """Counts (num_classes × num_classes) int64, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self._m: torch.Tensor | None = None  # lives on the device of the first update

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. Targets outside [0, num_classes) (255 in particular) are ignored."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        n = self.num_classes
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
        valid = (target >= 0) & (target < n)
        idx = target[valid] * n + pred[valid].clamp(0, n - 1)
        counts = torch.bincount(idx, minlength=n * n).view(n, n)
        self._m = counts if self._m is None else self._m + counts.to(self._m.device)

    def reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> "ConfusionMatrix":
        """Sum over processes (every rank must call it; a rank without batches contributes zeros)."""
        m = self._counts()
        out = all_reduce(m)
        self._m = m if out is None else out
        return self

    def _counts(self) -> torch.Tensor:
        if self._m is None:
            self._m = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        return self._m

    def to(self, device: torch.device | str) -> "ConfusionMatrix":
        self._m = self._counts().to(device)
        return self

    @property
    def matrix(self) -> torch.Tensor:
        return self._counts().cpu()


CONFUSION_CORNER = "ground_truth\\predicted"


def confusion_csv(matrix: torch.Tensor | np.ndarray, classmap: ClassMap) -> bytes:
    """The confusion counts as CSV, one row per ground-truth class and one column per prediction,
    both named: the raw numbers behind confusion.png, for questions the plot cannot answer (which
    class takes which class's pixels, across runs)."""
    m = np.asarray(matrix)
    if m.shape != (len(classmap), len(classmap)):
        raise ValueError(f"confusion matrix {m.shape} does not match the {len(classmap)} classes of the class map")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([CONFUSION_CORNER, *classmap.names])
    for name, row in zip(classmap.names, m.tolist()):
        writer.writerow([name, *(int(v) for v in row)])
    return out.getvalue().encode()


def read_confusion_csv(path: Path) -> tuple[list[str], np.ndarray]:
    """The class names and counts of a confusion.csv that `confusion_csv` wrote."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    names = header[1:]
    if header[0] != CONFUSION_CORNER or [r[0] for r in rows] != names:
        raise CissError(f"{path} is not a confusion matrix written by ciss (rows and columns must name the same classes)")
    return names, np.array([[int(v) for v in r[1:]] for r in rows], dtype=np.int64)


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def compute_metrics(matrix: torch.Tensor | np.ndarray, classmap: ClassMap,
                    old_names: Sequence[str] | None = None, progress: tqdm | None = None) -> dict[str, Any]:
    """mIoU all/old/new, per-class IoU by name, excluded classes, pixel accuracy.

    Keys: "miou_all", "miou_old", "miou_new" (None at step 0 or without new-class pixels),
    "pixel_acc", "per_class" {name: IoU of classes with ground truth}, "excluded" [names without].
    Values are in [0, 1]; a mean over no class is None. `old_names` (background is always old) splits
    old/new by name instead of by step: a joint step learns a protocol's steps at once, and its
    numbers are only comparable to the incremental run's split by that protocol's groups.
    """
    m = torch.as_tensor(np.asarray(matrix)).double()
    n = len(classmap)
    if m.shape != (n, n):
        raise ValueError(f"confusion matrix {tuple(m.shape)} does not match the {n} classes of the class map")
    tp = m.diag()
    gt = m.sum(dim=1)
    union = gt + m.sum(dim=0) - tp
    iou: dict[str, float] = {}
    excluded: list[str] = []
    old: list[float] = []
    new: list[float] = []
    for c in classmap:
        if gt[c.id] <= 0:
            excluded.append(c.name)
            continue
        v = float(tp[c.id] / union[c.id])
        iou[c.name] = v
        is_old = c.step == 0 if old_names is None else c.name == BACKGROUND or c.name in old_names
        (old if is_old else new).append(v)
    total = float(m.sum())
    return {
        "miou_all": _mean(old + new),
        "miou_old": _mean(old),
        "miou_new": _mean(new) if classmap.num_steps > 1 or old_names is not None else None,
        "pixel_acc": float(tp.sum()) / total if total > 0 else None,
        "per_class": iou,
        "excluded": excluded,
    }


def evaluate(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], classmap: ClassMap,
             device: torch.device | str, all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
             old_names: Sequence[str] | None = None, progress: tqdm | None = None) -> dict[str, Any]:
    """Run `model` over `loader` and return `compute_metrics` of its `confusion` (same arguments)."""
    matrix = confusion(model, loader, classmap, device, all_reduce, progress)
    return compute_metrics(matrix, classmap, old_names)


@torch.no_grad()
def confusion(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], classmap: ClassMap,
              device: torch.device | str, all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
              progress: tqdm | None = None) -> torch.Tensor:
    """Run `model` (eval mode, no grad, argmax) over `loader`: the confusion matrix (CPU int64 counts).

    The loader yields (images N,3,H,W, labels N,H,W) with labels in model ids, 255 = ignore (unseen
    classes, padding). An image whose sides are not multiples of the model's output stride is resized
    to the nearest multiples first, as the runtime serves it (an off-stride input shifts the upsampled
    logits against the labels: ciss.sizes); logits are upsampled bilinearly to the labels. The model's mode is
    restored afterwards. Under DDP every rank runs its shard and the counts are summed. `progress` (a
    tqdm bar, ciss.trainer.log.bar) counts the batches and is closed at the end: a large split takes a
    minute, which must not look like a hang.
    """
    device = torch.device(device)
    n = len(classmap)
    cm = ConfusionMatrix(n)
    stride = int(getattr(getattr(model, "module", model), "output_stride", 1))
    was_training = model.training
    model.eval()
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()
            on_stride = nearest_on_stride((images.shape[-2], images.shape[-1]), stride)
            if tuple(images.shape[-2:]) != on_stride:
                images = F.interpolate(images, size=on_stride, mode="bilinear", align_corners=False)
            logits = logits_of(model(images))
            if logits.shape[1] != n:
                raise CissError(f"the model has {logits.shape[1]} outputs but the class map has {n} classes")
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            cm.update(logits.argmax(dim=1), labels)
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
        if progress is not None:
            progress.close()
    cm.to(device).reduce(all_reduce)
    return cm.matrix

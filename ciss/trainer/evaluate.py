"""Evaluation: confusion matrix, mIoU (all / old / new, per class), and the run's reports.

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

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ciss.classmap import BACKGROUND, ClassMap
from ciss.errors import CissError
from ciss.manifest import write_bytes_atomic
from ciss.trainer.methods.losses import logits_of

if TYPE_CHECKING:
    from tqdm import tqdm

IGNORE = 255


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


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], classmap: ClassMap,
             device: torch.device | str, all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
             old_names: Sequence[str] | None = None, progress: tqdm | None = None) -> dict[str, Any]:
    """Run `model` (eval mode, no grad, argmax) over `loader` and return `compute_metrics`.

    The loader yields (images N,3,H,W, labels N,H,W) with labels in model ids, 255 = ignore (unseen
    classes, padding). Logits smaller than the labels are upsampled bilinearly. The model's mode is
    restored afterwards. Under DDP every rank runs its shard and the counts are summed. `old_names`:
    see compute_metrics. `progress` (a tqdm bar, ciss.trainer.log.bar) counts the batches and is
    closed at the end: a large split takes a minute, which must not look like a hang.
    """
    device = torch.device(device)
    n = len(classmap)
    cm = ConfusionMatrix(n)
    was_training = model.training
    model.eval()
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True).long()
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
    return compute_metrics(cm.matrix, classmap, old_names)


# --- reports -----------------------------------------------------------------------------------

def _report_classmap(history: Sequence[dict[str, Any]], classmap: ClassMap | None) -> ClassMap:
    if classmap is not None:
        return classmap
    for entry in reversed(history):
        if entry.get("classes"):
            return ClassMap.from_json(entry["classes"])
    names: list[str] = []
    cmap: ClassMap | None = None  # rebuilt from the classes each step added (default colours)
    for entry in sorted(history, key=lambda e: e["step"]):
        added = [a for a in entry.get("classes_added", []) if a not in names and a != BACKGROUND]
        if added:
            cmap = ClassMap.initial(added) if cmap is None else cmap.extend(added, step=int(entry["step"]))
            names += added
    if cmap is None:
        raise ValueError("history names no class")
    return cmap


def _iou_table(history: Sequence[dict[str, Any]], cmap: ClassMap) -> tuple[list[str], list[list[float | None]]]:
    """Rows (one per step, sorted) of [step, miou_old, miou_new, miou_all, IoU per class]."""
    header = ["step", "miou_old", "miou_new", "miou_all"] + cmap.names
    rows: list[list[float | None]] = []
    for entry in sorted(history, key=lambda e: e["step"]):
        m = entry.get("metrics", {}) or {}
        per_class = m.get("per_class", {}) or {}
        row: list[float | None] = [int(entry["step"])]
        row += [m.get(k) for k in ("miou_old", "miou_new", "miou_all")]
        row += [per_class.get(name) for name in cmap.names]
        rows.append(row)
    return header, rows


def _fmt(v: float | None, scale: float = 1.0, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v * scale:.{digits}f}"


def write_reports(run_dir: Path, history: list[dict[str, Any]], classmap: ClassMap | None = None) -> dict[str, Path]:
    """Write results.csv, results.md and forgetting.png into `run_dir` (each atomically).

    `history` has one entry per step: {"step", "classes_added", "metrics"} (+ optional "classes",
    the step's class map as JSON, used for class order and colours when `classmap` is not given).
    CSV values are IoUs in [0, 1] (4 decimals); the Markdown table shows percentages. A class not yet
    learned, or without ground truth at that step, has an empty cell.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmap = _report_classmap(history, classmap)
    header, rows = _iou_table(history, cmap)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([str(row[0])] + [_fmt(v) for v in row[1:]])
    paths = {"csv": run_dir / "results.csv", "md": run_dir / "results.md", "png": run_dir / "forgetting.png"}
    write_bytes_atomic(paths["csv"], buf.getvalue().encode())

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    added = {int(e["step"]): e.get("classes_added", []) for e in history}
    md = ["# Results", "", "IoU in % per step; empty = class not learned yet or absent from the evaluation split.", "",
          "| " + " | ".join(["step", "added", "mIoU old", "mIoU new", "mIoU all"] + [cell(n) for n in cmap.names]) + " |",
          "|---:|:---|" + "---:|" * (3 + len(cmap))]
    for row in rows:
        step = int(row[0])  # type: ignore[arg-type]
        md.append("| " + " | ".join([str(step), cell(", ".join(added.get(step, [])))]
                                    + [_fmt(v, 100, 1) for v in row[1:]]) + " |")
    write_bytes_atomic(paths["md"], ("\n".join(md) + "\n").encode())

    image = plot_forgetting(rows, cmap)
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("OpenCV could not encode forgetting.png")
    write_bytes_atomic(paths["png"], png.tobytes())
    return paths


# --- the forgetting plot (OpenCV only) ---------------------------------------------------------

FONT = cv2.FONT_HERSHEY_SIMPLEX
INK = (40, 40, 40)
GRID = (225, 225, 225)


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.45, color=INK, thickness: int = 1,
          anchor: str = "left") -> None:
    (tw, th), _ = cv2.getTextSize(s, FONT, scale, thickness)
    x, y = org
    if anchor == "center":
        x -= tw // 2
    elif anchor == "right":
        x -= tw
    cv2.putText(img, s, (int(x), int(y + th // 2)), FONT, scale, color, thickness, cv2.LINE_AA)


def _bgr(rgb: Sequence[int]) -> tuple[int, int, int]:
    return int(rgb[2]), int(rgb[1]), int(rgb[0])


def _light(rgb: Sequence[int]) -> bool:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 200


def _dashed(img: np.ndarray, p: tuple[int, int], q: tuple[int, int], color, thickness: int, dash: int = 8) -> None:
    d = np.hypot(q[0] - p[0], q[1] - p[1])
    n = max(1, int(d // dash))
    for i in range(0, n, 2):
        a = (int(p[0] + (q[0] - p[0]) * i / n), int(p[1] + (q[1] - p[1]) * i / n))
        b = (int(p[0] + (q[0] - p[0]) * min(i + 1, n) / n), int(p[1] + (q[1] - p[1]) * min(i + 1, n) / n))
        cv2.line(img, a, b, color, thickness, cv2.LINE_AA)


def plot_forgetting(rows: Sequence[Sequence[float | None]], cmap: ClassMap, size: tuple[int, int] = (900, 500)
                    ) -> np.ndarray:
    """BGR image: every class's IoU (%) across steps in its class-map colour, mIoU dashed, legend."""
    width, height = size
    img = np.full((height, width, 3), 255, np.uint8)
    legend_w = 220
    left, right, top, bottom = 64, width - legend_w - 16, 44, height - 52
    steps = [int(r[0]) for r in rows]  # type: ignore[arg-type]
    k0, k1 = (min(steps), max(steps)) if steps else (0, 0)
    x_lo, x_hi = k0 - 0.3, k1 + 0.3

    def px(step: float) -> int:
        return int(round(left + (step - x_lo) / (x_hi - x_lo) * (right - left)))

    def py(v: float) -> int:
        return int(round(bottom - v / 100.0 * (bottom - top)))

    _text(img, "Per-class IoU across steps", (left + (right - left) // 2, 20), 0.6, INK, 1, "center")
    for v in range(0, 101, 20):  # y grid, ticks, labels
        cv2.line(img, (left, py(v)), (right, py(v)), GRID, 1)
        cv2.line(img, (left - 5, py(v)), (left, py(v)), INK, 1)
        _text(img, str(v), (left - 9, py(v)), 0.42, INK, 1, "right")
    every = max(1, int(np.ceil((k1 - k0 + 1) / 15)))
    for s in range(k0, k1 + 1):
        if (s - k0) % every:
            continue
        cv2.line(img, (px(s), bottom), (px(s), bottom + 5), INK, 1)
        _text(img, str(s), (px(s), bottom + 15), 0.42, INK, 1, "center")
    cv2.line(img, (left, top), (left, bottom), INK, 1)
    cv2.line(img, (left, bottom), (right, bottom), INK, 1)
    _text(img, "step", ((left + right) // 2, height - 14), 0.5, INK, 1, "center")
    label = np.full((22, 80, 3), 255, np.uint8)
    _text(label, "IoU (%)", (40, 10), 0.5, INK, 1, "center")
    label = cv2.rotate(label, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = (top + bottom) // 2 - label.shape[0] // 2
    img[y0:y0 + label.shape[0], 6:6 + label.shape[1]] = label

    def series(col: int, color, thickness: int, dashed: bool = False, outline: bool = False) -> None:
        pts = [(px(int(r[0])), py(100.0 * float(r[col]))) if r[col] is not None else None for r in rows]  # type: ignore[arg-type]
        for a, b in zip(pts, pts[1:]):
            if a is None or b is None:
                continue
            if dashed:
                _dashed(img, a, b, color, thickness)
            else:
                if outline:
                    cv2.line(img, a, b, (150, 150, 150), thickness + 2, cv2.LINE_AA)
                cv2.line(img, a, b, color, thickness, cv2.LINE_AA)
        for p in pts:
            if p is not None:
                if outline:
                    cv2.circle(img, p, 5, (150, 150, 150), -1, cv2.LINE_AA)
                cv2.circle(img, p, 4 if not dashed else 3, color, -1, cv2.LINE_AA)

    series(3, (90, 90, 90), 2, dashed=True)  # mIoU all, under the classes
    # a class never scored (no pixels of it in the eval split, e.g. a background nobody labels) has no line
    scored = [(i, c) for i, c in enumerate(cmap) if any(r[4 + i] is not None for r in rows)]
    for i, c in scored:
        series(4 + i, _bgr(c.color), 2, outline=_light(c.color))

    # legend: mIoU first, then the classes in class-map order, in as many columns as fit
    lx, ly, row_h = right + 20, top, 17
    entries: list[tuple[str, tuple[int, int, int], bool, bool]] = [("mIoU (all)", (90, 90, 90), True, False)]
    entries += [(c.name, _bgr(c.color), False, _light(c.color)) for _, c in scored]
    per_col = max(1, (bottom - top) // row_h)
    cols = 2 if len(entries) > per_col else 1
    col_w = (width - lx - 6) // cols
    max_chars = 22 if cols == 1 else 10
    shown = entries if len(entries) <= per_col * cols else entries[:per_col * cols - 1]
    for j, (name, color, dashed, outline) in enumerate(shown):
        x, y = lx + (j // per_col) * col_w, ly + (j % per_col) * row_h + row_h // 2
        if dashed:
            _dashed(img, (x, y), (x + 22, y), color, 2, dash=5)
        else:
            if outline:
                cv2.line(img, (x, y), (x + 22, y), (150, 150, 150), 4, cv2.LINE_AA)
            cv2.line(img, (x, y), (x + 22, y), color, 2, cv2.LINE_AA)
            cv2.circle(img, (x + 11, y), 4, color, -1, cv2.LINE_AA)
        text = name if len(name) <= max_chars else name[:max_chars - 1] + "."
        _text(img, text, (x + 28, y), 0.42)
    if len(shown) < len(entries):
        j = len(shown)
        x, y = lx + (j // per_col) * col_w, ly + (j % per_col) * row_h + row_h // 2
        _text(img, f"+{len(entries) - len(shown)} more", (x + 28, y), 0.42)
    return img

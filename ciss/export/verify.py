"""Does the exported graph compute what the step computes? ONNX Runtime (CPU) against PyTorch.

Segmentation is judged on the class mask (pixel agreement of argmax), not on raw logits alone:
an export is refused when fewer than 99.9% of pixels agree (runtime.md §5). The same ONNX Runtime
evaluation gives the mIoU of a graph on the eval split, which is how int8 is compared with fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.export.onnx import INPUT
from ciss.trainer.data import native_ids
from ciss.trainer.data.base import SegDataset
from ciss.trainer.data.tasks import presence, test_indices, test_lut
from ciss.trainer.data.transforms import Normalise
from ciss.trainer.evaluate import ConfusionMatrix, compute_metrics
from ciss.trainer.log import bar

MIN_AGREEMENT = 0.999


def cpu_session(model: onnx.ModelProto | bytes | str, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def to_input(image_rgb: np.ndarray, size: tuple[int, int], normalise: Normalise) -> np.ndarray:
    """The network input for one RGB image: resized (bilinear) to H×W, normalised, 1×3×H×W."""
    h, w = size
    if image_rgb.shape[:2] != (h, w):
        image_rgb = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(normalise(image_rgb).transpose(2, 0, 1)[None])


def spread(n_items: int, n: int) -> list[int]:
    """`n` indices spread evenly over a split, so a few images still cover a whole video sequence."""
    if n_items == 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n_items - 1, min(n, n_items))})


@torch.no_grad()
def check_parity(model: nn.Module, graph: onnx.ModelProto, images: Sequence[np.ndarray],
                 sizes: Sequence[tuple[int, int]], normalise: Normalise) -> dict[str, Any]:
    """Max |Δlogit| and mask agreement at every size; `graph` must output `logits` and `mask`."""
    session = cpu_session(graph)
    names = [o.name for o in session.get_outputs()]
    model = model.eval()
    worst, agree, total = 0.0, 0, 0
    per_size = []
    for size in sizes:
        size_agree, size_total = 0, 0
        for image in images:
            x = to_input(image, size, normalise)
            ref = model(torch.from_numpy(x)).numpy()
            out = dict(zip(names, session.run(None, {INPUT: x})))
            worst = max(worst, float(np.abs(out["logits"] - ref).max()))
            size_agree += int((out["mask"].astype(np.int64) == ref.argmax(1)).sum())
            size_total += out["mask"].size
        per_size.append({"size": list(size), "mask_agreement": size_agree / size_total})
        agree, total = agree + size_agree, total + size_total
    report = {"images": len(images), "sizes": per_size, "max_abs_logit_diff": worst, "mask_agreement": agree / total}
    for s in per_size:
        if s["mask_agreement"] < MIN_AGREEMENT:
            h, w = s["size"]
            raise CissError(f"export refused: ONNX Runtime and PyTorch agree on only {100 * s['mask_agreement']:.3f}% "
                            f"of mask pixels at {h}x{w} (need {100 * MIN_AGREEMENT:.1f}%; max |Δlogit| {worst:.2e}); "
                            "this is a bug in the export, please report it with the step")
    return report


def evaluate_graph(graph: onnx.ModelProto | bytes, ds: SegDataset, classmap: ClassMap, protocol: str,
                   size: tuple[int, int], normalise: Normalise, limit: int | None = None,
                   label: str | None = None) -> dict[str, Any]:
    """mIoU of a mask-output graph run by ONNX Runtime at its input size, scored at label resolution;
    with a `label`, a progress bar (ciss.trainer.log.bar) counts the images on a terminal."""
    session = cpu_session(graph)
    mask_index = [o.name for o in session.get_outputs()].index("mask")
    seen = native_ids(ds, [c.name for c in classmap if c.id > 0])
    indices = test_indices(presence(ds), seen, protocol)
    if limit is not None:
        indices = indices[spread(len(indices), limit)]
    lut = test_lut(ds.info, classmap)
    confusion = ConfusionMatrix(len(classmap))
    with bar(len(indices), label or "", enabled=label is not None, unit="image") as progress:
        for i in indices:
            target = lut[ds.label(int(i))]
            mask = session.run(None, {INPUT: to_input(ds.image(int(i)), size, normalise)})[mask_index][0]
            mask = cv2.resize(mask, target.shape[::-1], interpolation=cv2.INTER_NEAREST)
            confusion.update(torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(target.astype(np.int64)))
            progress.update(1)
    metrics = compute_metrics(confusion.matrix, classmap)
    metrics["images"] = len(indices)
    return metrics

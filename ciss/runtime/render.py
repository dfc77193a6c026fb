"""Drawing for `ciss live`: the class overlay, the legend of known classes and the HUD line.

Colours come from the class map (RGB there, BGR here) rather than from a palette indexed by id at
draw time, so a class keeps its colour when a hot-swapped version adds classes after it.
Everything is whole-array numpy/OpenCV work: per-pixel Python would cost more than the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from ciss.classmap import ClassMap

NEW_TAG = "NEW"
NEW_COLOR = (0, 230, 255)  # BGR amber: the "just learned" tag
UNLEARNED_TAG = "NOT LEARNED"  # a class the step's eval scored near IoU 0: the overlay will not show it
UNLEARNED_COLOR = (60, 60, 255)  # BGR red
TEXT_COLOR = (255, 255, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_lut(classmap: ClassMap) -> np.ndarray:
    """The Nx3 uint8 BGR colour table of a class map, row = class id."""
    return np.array(classmap.colors, np.uint8).reshape(-1, 3)[:, ::-1].copy()


def overlay(frame: np.ndarray, mask: np.ndarray, lut: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`frame` with each pixel blended towards its class colour; a new image.

    Background (id 0, "not taught yet") is left as seen instead of tinted black, so what the model
    has learned stands out. `mask` is HxW uint8 or uint16 with ids < len(lut).
    """
    if mask.shape != frame.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match frame {frame.shape[:2]}")
    colors = np.take(lut, mask, axis=0)  # one gather; 3x faster than lut[mask] here
    out = cv2.addWeighted(frame, 1.0 - alpha, colors, alpha, 0.0)
    cv2.copyTo(frame, (mask == 0).view(np.uint8), out)
    return out


# The legend may cover this share of the frame; past it, it lists only the classes in the frame.
LEGEND_SHARE = 0.15


def _metrics(image: np.ndarray) -> tuple[float, int, int]:
    """Font scale, thickness and row height in proportion to the frame: from 0.3 (the smallest
    scale the Hershey font stays legible at, about 7 px capitals) on frames up to 270 px high, to
    1080p's 1.2; a 240x180 frame then keeps most of its pixels to itself."""
    scale = max(0.3, image.shape[0] / 900)
    thickness = 1 if scale < 0.8 else 2
    (_, h), base = cv2.getTextSize("Ag", _FONT, scale, thickness)
    return scale, thickness, h + base + max(2, round(4 * scale))


def _shade(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    """Darken a box so white text reads on any scene while the scene stays visible."""
    x0, y0 = max(x0, 0), max(y0, 0)
    box = image[y0:y1, x0:x1]
    np.right_shift(box, 2, out=box)


def _shade_rows(image: np.ndarray, lefts: list[int], rights: list[int], row: int, pad: int) -> None:
    """Shade a stack of text rows, each only as wide as its own text: a ragged box hides less scene
    than one as wide as the longest row (on 240x180, a third less for CamVid's legend)."""
    last = len(lefts) - 1
    for k, (x0, x1) in enumerate(zip(lefts, rights, strict=True)):
        _shade(image, x0, 0 if k == 0 else pad + k * row, x1, pad + (k + 1) * row + (pad if k == last else 0))


def _entry_width(text: str, scale: float, thickness: int, row: int, pad: int) -> int:
    """Pixels one legend row takes: text, then its swatch (row - 4 square) against the frame edge."""
    return pad + cv2.getTextSize(text, _FONT, scale, thickness)[0][0] + pad + (row - 4) + pad


def legend(image: np.ndarray, classmap: ClassMap, new_ids: Iterable[int] = (),
           unlearned_ids: Iterable[int] = (), mask: np.ndarray | None = None) -> list[str]:
    """Draw the classes of `classmap` (not background) top right, in place, each row right-aligned
    with its colour swatch at the edge, a NEW tag on `new_ids` and a NOT LEARNED tag on
    `unlearned_ids` (which outranks NEW: a class the overlay will not show must not be advertised);
    columns wrap leftwards when full. When all of them would cover more than LEGEND_SHARE of the
    frame and the frame's `mask` is given, only the classes in it and the tagged ones are listed.

    Returns the entries as drawn, e.g. "5 disk NEW".
    """
    failed = set(unlearned_ids)
    tags = {i: (UNLEARNED_TAG, UNLEARNED_COLOR) for i in failed} | \
        {i: (NEW_TAG, NEW_COLOR) for i in new_ids if i not in failed}
    scale, thickness, row = _metrics(image)
    pad = row // 3
    swatch = row - 4
    classes = [c for c in classmap if c.id != 0]
    entries = [f"{c.id} {c.name}" + (f" {tags[c.id][0]}" if c.id in tags else "") for c in classes]
    if mask is not None and _legend_area(entries, scale, thickness, row) > LEGEND_SHARE * mask.size:
        keep = set(np.flatnonzero(np.bincount(mask.ravel(), minlength=len(classmap))).tolist()) | set(tags)
        kept = [(c, e) for c, e in zip(classes, entries, strict=True) if c.id in keep]
        classes, entries = [c for c, _ in kept], [e for _, e in kept]
    per_column = max(1, (image.shape[0] - 2 * pad) // row)
    right = image.shape[1]
    for start in range(0, len(classes), per_column):
        chunk = classes[start:start + per_column]
        widths = [_entry_width(e, scale, thickness, row, pad) for e in entries[start:start + per_column]]
        _shade_rows(image, [right - w for w in widths], [right] * len(chunk), row, pad)
        box = right - pad - swatch
        for k, (c, width) in enumerate(zip(chunk, widths, strict=True)):
            top = pad + k * row
            cv2.rectangle(image, (box, top + 2), (box + swatch, top + 2 + swatch), c.color[::-1], -1)
            name, baseline = f"{c.id} {c.name}", top + row - 4
            x = right - width + pad
            cv2.putText(image, name, (x, baseline), _FONT, scale, TEXT_COLOR, thickness, cv2.LINE_AA)
            if c.id in tags:
                tag, color = tags[c.id]
                x += cv2.getTextSize(name, _FONT, scale, thickness)[0][0]
                cv2.putText(image, f" {tag}", (x, baseline), _FONT, scale, color, thickness, cv2.LINE_AA)
        right -= max(widths)
    return entries


def _legend_area(entries: list[str], scale: float, thickness: int, row: int) -> int:
    """Pixels a one-column legend of `entries` would cover (its shaded rows)."""
    pad = row // 3
    widths = [_entry_width(e, scale, thickness, row, pad) for e in entries]
    return sum(widths) * row + pad * (widths[0] + widths[-1]) if widths else 0


def hud(image: np.ndarray, fps: float | None, latency_ms: float | None, version: int | None,
        backend: str) -> list[str]:
    """Draw FPS, end-to-end latency, model version and backend top left, in place; returns the lines."""
    speed = f"{fps:.1f} FPS" if fps else "-- FPS"
    delay = f"{latency_ms:.0f} ms" if latency_ms is not None else "-- ms"
    model = f"model v{version}" if version is not None else "no model"
    # "onnxruntime:CUDAExecutionProvider" -> "ort CUDA": the full name does not fit a 320 px frame.
    short = backend.replace("onnxruntime:", "ort ").replace("ExecutionProvider", "")
    lines = [f"{speed}  {delay}", f"{model}  {short}"]
    scale, thickness, row = _metrics(image)
    pad = row // 3
    widths = [cv2.getTextSize(t, _FONT, scale, thickness)[0][0] + 2 * pad for t in lines]
    _shade_rows(image, [0] * len(lines), widths, row, pad)
    for k, text in enumerate(lines):
        cv2.putText(image, text, (pad, pad + (k + 1) * row - 4), _FONT, scale, TEXT_COLOR, thickness, cv2.LINE_AA)
    return lines

"""Pascal VOC 2012 segmentation: `train`/`val` (palette PNGs) and `train_aug` (SBD-augmented, grayscale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ciss.classmap import IGNORE
from ciss.errors import CissError
from ciss.trainer.data.base import DatasetInfo
from ciss.trainer.data.folder import FileDataset, missing_labels_error, single_channel

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
SPLITS = {"train": "SegmentationClass", "val": "SegmentationClass", "train_aug": "SegmentationClassAug"}


def voc_colormap() -> np.ndarray:
    """The 256-entry VOC palette: the bits of the index spread over R, G, B from the high bit down."""
    cmap = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        cmap[i] = r, g, b
    return cmap


_CMAP = voc_colormap()
_KEYS = (_CMAP[:, 0].astype(np.int32) << 16) | (_CMAP[:, 1].astype(np.int32) << 8) | _CMAP[:, 2]
_ORDER = np.argsort(_KEYS)
_SORTED_KEYS = _KEYS[_ORDER]


def colors_to_indices(bgr: np.ndarray, path: Path) -> np.ndarray:
    """Undo cv2's palette expansion: cv2 cannot return a PNG's palette indices, only their colours."""
    b, g, r = (bgr[..., k].astype(np.int32) for k in range(3))
    keys = (r << 16) | (g << 8) | b
    pos = np.minimum(np.searchsorted(_SORTED_KEYS, keys), 255)
    unknown = _SORTED_KEYS[pos] != keys
    if unknown.any():
        colours = {tuple(int(v) for v in bgr[y, x, 2::-1]) for y, x in zip(*np.nonzero(unknown))}
        raise CissError(f"label {path} has colours {sorted(colours)[:5]} that are not in the VOC palette: "
                        f"use the original SegmentationClass PNGs (or grayscale index PNGs)")
    return _ORDER[pos].astype(np.uint8)


def find_voc_root(root: Path) -> Path:
    root = Path(root)
    for candidate in (root, root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise CissError(f"{root} is not a Pascal VOC 2012 folder: expected JPEGImages/ in it or in VOCdevkit/VOC2012/")


def _read_list(path: Path) -> list[str]:
    """Stems from a split file: plain stems, or MiB's '/JPEGImages/x.jpg /SegmentationClassAug/x.png' lines."""
    return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]


class VOCDataset(FileDataset):
    def __init__(self, root: Path, split: str):
        if split not in SPLITS:
            raise CissError(f"unknown VOC split '{split}'; known: {', '.join(SPLITS)}")
        base = find_voc_root(root)
        list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            hint = ": train_aug needs the SBD-augmented list and labels (SegmentationClassAug/)"
            raise CissError(f"no split list {list_file}{hint if split == 'train_aug' else ''}")
        label_dir = base / SPLITS[split]
        items = [(s, base / "JPEGImages" / f"{s}.jpg", label_dir / f"{s}.png") for s in _read_list(list_file)]
        missing_labels_error(items, f"{list_file}")
        lut = np.full(256, -1, np.int16)
        lut[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES))
        lut[IGNORE] = IGNORE
        info = DatasetInfo("voc", CLASS_NAMES, tuple(tuple(int(v) for v in c) for c in _CMAP[: len(CLASS_NAMES)]),
                           background=0)
        super().__init__(info, split, items, lut, "VOC labels hold 0..20 and 255 (void); the file is damaged")

    def _decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        if raw.ndim == 3:
            return colors_to_indices(raw[..., :3], path)
        return single_channel(raw, path)

"""Cityscapes fine annotations with the 19 evaluation classes (trainIds); there is no background class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ciss.classmap import IGNORE
from ciss.errors import CissError
from ciss.trainer.data.base import DatasetInfo
from ciss.trainer.data.folder import FileDataset

CLASS_NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
COLORS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
          (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
          (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
# Official labelId -> trainId for the ids that have one; the other ids 0..33 are void.
_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_IMAGE_SUFFIX = "_leftImg8bit.png"


def _luts() -> tuple[np.ndarray, np.ndarray]:
    train = np.full(256, -1, np.int16)
    train[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES))
    train[IGNORE] = IGNORE
    ids = np.full(256, -1, np.int16)
    ids[:34] = IGNORE
    ids[IGNORE] = IGNORE  # license plates (id -1) end up as 255 in some conversions
    for label_id, train_id in _ID_TO_TRAIN.items():
        ids[label_id] = train_id
    return train, ids


_TRAIN_LUT, _ID_LUT = _luts()


class CityscapesDataset(FileDataset):
    def __init__(self, root: Path, split: str):
        root = Path(root)
        image_root, label_root = root / "leftImg8bit" / split, root / "gtFine" / split
        if not image_root.is_dir() or not label_root.is_dir():
            raise CissError(f"{root} has no Cityscapes split '{split}': expected leftImg8bit/{split}/ and "
                            f"gtFine/{split}/ (splits: train, val, test)")
        items = []
        for image in sorted(image_root.glob(f"*/*{_IMAGE_SUFFIX}")):
            stem = image.name[: -len(_IMAGE_SUFFIX)]
            labels = label_root / image.parent.name
            label = labels / f"{stem}_gtFine_labelTrainIds.png"
            if not label.is_file():
                label = labels / f"{stem}_gtFine_labelIds.png"
            if not label.is_file():
                raise CissError(f"no label for {image}: expected {label.name} or {stem}_gtFine_labelTrainIds.png "
                                f"in {labels}")
            items.append((stem, image, label))
        if not items:
            raise CissError(f"no *{_IMAGE_SUFFIX} images under {image_root}")
        info = DatasetInfo("cityscapes", CLASS_NAMES, COLORS, background=None)
        super().__init__(info, split, items, _TRAIN_LUT,
                         "trainId labels hold 0..18 and 255, labelId labels 0..33; the file is damaged")

    def _lut_for(self, path: Path) -> np.ndarray:
        return _ID_LUT if path.name.endswith("_labelIds.png") else _TRAIN_LUT

"""ADE20K (ADEChallengeData2016, SceneParsing 150 classes). Native 0 ("other") is background, as in MiB."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ciss.classmap import IGNORE, default_color
from ciss.errors import CissError
from ciss.trainer.data.base import DatasetInfo
from ciss.trainer.data.folder import FileDataset, missing_labels_error

# objectInfo150 short names, spaces replaced by '_' so every name is one command-line token.
_ADE150 = """wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door
table mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair seat
fence desk rock wardrobe lamp bathtub railing cushion base box column signboard chest_of_drawers counter
sand sink skyscraper fireplace refrigerator grandstand path stairs runway case pool_table pillow
screen_door stairway river bridge bookcase blind coffee_table toilet flower book hill bench countertop
stove palm kitchen_island computer swivel_chair boat bar arcade_machine hovel bus towel light truck tower
chandelier awning streetlight booth television_receiver airplane dirt_track apparel pole land bannister
escalator ottoman bottle buffet poster stage van ship fountain conveyer_belt canopy washer plaything
swimming_pool stool barrel basket waterfall tent bag minibike cradle oven ball food step tank trade_name
microwave pot animal bicycle lake dishwasher screen blanket sculpture hood sconce vase traffic_light tray
ashcan fan pier crt_screen plate monitor bulletin_board shower radiator glass clock flag""".split()
CLASS_NAMES: tuple[str, ...] = ("background", *_ADE150)
SPLITS = {"train": "training", "val": "validation"}


def find_ade_root(root: Path) -> Path:
    root = Path(root)
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise CissError(f"{root} is not an ADE20K folder: expected images/ and annotations/ in it or in "
                    f"ADEChallengeData2016/")


class ADE20KDataset(FileDataset):
    def __init__(self, root: Path, split: str):
        if split not in SPLITS:
            raise CissError(f"unknown ADE20K split '{split}'; known: {', '.join(SPLITS)}")
        base = find_ade_root(root)
        image_dir = base / "images" / SPLITS[split]
        if not image_dir.is_dir():
            raise CissError(f"no ADE20K split '{split}': {image_dir} is missing")
        label_dir = base / "annotations" / SPLITS[split]
        items = [(p.stem, p, label_dir / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
        missing_labels_error(items, str(image_dir))
        lut = np.full(256, -1, np.int16)
        lut[: len(CLASS_NAMES)] = np.arange(len(CLASS_NAMES))
        lut[IGNORE] = IGNORE
        colors = ((0, 0, 0),) + tuple(default_color(i) for i in range(1, len(CLASS_NAMES)))
        info = DatasetInfo("ade20k", CLASS_NAMES, colors, background=0)
        super().__init__(info, split, items, lut, "ADE20K labels hold 0..150 (and 255 for void); the file is damaged")

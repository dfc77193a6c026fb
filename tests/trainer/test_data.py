"""Dataset readers on tiny fake trees in the real layouts, their error messages, and transforms."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from ciss.errors import CissError
from ciss.manifest import IMAGENET
from ciss.trainer.data import open_dataset
from ciss.trainer.data.cityscapes import CLASS_NAMES as CITYSCAPES_NAMES
from ciss.trainer.data.folder import FolderDataset
from ciss.trainer.data.synthetic import SyntheticDataset
from ciss.trainer.data.transforms import EvalTransform, TrainTransform
from ciss.trainer.data.voc import voc_colormap


def write_png_palette(path: Path, indices: np.ndarray, palette: np.ndarray) -> None:
    """An 8-bit palette PNG (colour type 3), which cv2 can read but not write."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    h, w = indices.shape
    rows = b"".join(b"\x00" + indices[y].astype(np.uint8).tobytes() for y in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
                     + chunk(b"PLTE", palette.astype(np.uint8).tobytes()) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def rgb_image(h: int = 12, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- folder format -------------------------------------------------------------------------------

def make_folder(root: Path, stems=("b", "a", "c"), split: str = "train", splits_file: bool = True,
                classes: list[dict] | None = None, **extra) -> Path:
    classes = classes or [{"index": 0, "name": "sky", "color_rgb": [1, 2, 3]},
                          {"index": 1, "name": "road", "color_rgb": [4, 5, 6]},
                          {"index": 2, "name": "car", "color_rgb": [7, 8, 9]}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"classes": classes, "ignore_index": 255, **extra}))
    for k, stem in enumerate(stems):
        write(root / "images" / split / f"{stem}.png", rgb_image(seed=k)[..., ::-1])
        label = np.full((12, 16), k % len(classes), np.uint8)
        label[0, 0] = 255
        write(root / "labels" / split / f"{stem}.png", label)
    if splits_file:
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def test_folder_reads_images_rgb_labels_and_split_order(tmp_path):
    root = make_folder(tmp_path / "mydata")
    ds = open_dataset(None, root, "train")
    assert isinstance(ds, FolderDataset)
    assert ds.stems == ["b", "a", "c"]  # splits/train.txt order
    assert ds.info.name == "mydata" and ds.info.class_names == ("sky", "road", "car")
    assert ds.info.colors[1] == (4, 5, 6) and ds.info.background is None
    assert np.array_equal(ds.image(0), rgb_image(seed=0))
    image, label = ds.sample(2)
    assert image.shape == (12, 16, 3) and label.dtype == np.uint8
    assert set(np.unique(label)) == {2, 255}


def test_folder_without_split_file_sorts_stems_and_finds_background(tmp_path):
    classes = [{"index": 0, "name": "Background"}, {"index": 1, "name": "thing"}]
    ds = FolderDataset(make_folder(tmp_path / "d", splits_file=False, classes=classes, dataset="toy"), "train")
    assert ds.stems == ["a", "b", "c"]
    assert ds.info.name == "toy" and ds.info.background == 0 and ds.info.learnable == ["thing"]


def test_folder_maps_custom_ignore_index_to_255(tmp_path):
    root = make_folder(tmp_path / "d", stems=("a",))
    (root / "classes.json").write_text(json.dumps({"names": ["x", "y", "z"], "ignore_index": 11}))
    write(root / "labels" / "train" / "a.png", np.array([[0, 11], [2, 1]], np.uint8))
    write(root / "images" / "train" / "a.png", rgb_image(2, 2))
    assert FolderDataset(root, "train").label(0).tolist() == [[0, 255], [2, 1]]


def _corrupt(path: Path) -> None:
    path.write_bytes(b"not a png at all")


@pytest.mark.parametrize("breakage, read, message", [
    (lambda r: (r / "classes.json").unlink(), None, "no classes.json in"),
    (lambda r: (r / "classes.json").write_text("{oops"), None, "malformed"),
    (lambda r: (r / "classes.json").write_text('{"classes": [{"index": 0, "name": "a"}, {"index": 2, "name": "b"}]}'),
     None, "without gaps"),
    (lambda r: (r / "labels" / "train" / "a.png").unlink(), None, "have no label"),
    (lambda r: (r / "splits" / "train.txt").write_text("a\nzzz\n"), None, "'zzz' is listed"),
    (lambda r: _corrupt(r / "images" / "train" / "a.png"), "image", "cannot read image"),
    (lambda r: _corrupt(r / "labels" / "train" / "a.png"), "label", "cannot read label"),
    (lambda r: write(r / "labels" / "train" / "a.png", np.zeros((5, 5), np.uint8)), "sample", "same size"),
    (lambda r: write(r / "labels" / "train" / "a.png", np.full((12, 16), 7, np.uint8)), "label", "values 7"),
    (lambda r: write(r / "labels" / "train" / "a.png", np.zeros((12, 16, 3), np.uint8)), "label", "colour"),
])
def test_folder_errors_name_the_problem(tmp_path, breakage, read, message):
    root = make_folder(tmp_path / "d", stems=("a",))
    breakage(root)
    with pytest.raises(CissError, match=message) as err:
        ds = FolderDataset(root, "train")
        getattr(ds, read)(0)
    assert "\n" not in str(err.value)
    if read in ("label", "image"):
        assert "a.png" in str(err.value)


def test_folder_missing_root_and_split(tmp_path):
    with pytest.raises(CissError, match="does not exist"):
        open_dataset("folder", tmp_path / "nope", "train")
    root = make_folder(tmp_path / "d", stems=("a",))
    with pytest.raises(CissError, match=r"no split 'test'.*splits with images: train"):
        open_dataset("folder", root, "test")


# --- Pascal VOC ----------------------------------------------------------------------------------

def make_voc(root: Path) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    cmap = voc_colormap()
    for k, stem in enumerate(("2007_000001", "2007_000002")):
        write(base / "JPEGImages" / f"{stem}.jpg", rgb_image(seed=k))
        indices = np.zeros((12, 16), np.uint8)
        indices[2:6, 3:9] = 15 + k  # person / pottedplant
        indices[6, :] = 255  # void outline
        write_png_palette(base / "SegmentationClass" / f"{stem}.png", indices, cmap)
        write(base / "SegmentationClassAug" / f"{stem}.png", indices)
    (sets / "train.txt").write_text("2007_000001\n")
    (sets / "val.txt").write_text("2007_000002\n")
    (sets / "train_aug.txt").write_text("/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n"
                                        "2007_000002\n")
    return base


def test_voc_decodes_palette_labels_and_train_aug(tmp_path):
    base = make_voc(tmp_path)
    train = open_dataset("voc", tmp_path, "train")
    assert len(train.info.class_names) == 21 and train.info.background == 0
    label = train.label(0)
    assert set(np.unique(label)) == {0, 15, 255} and label[2, 3] == 15 and label[6, 0] == 255
    val = open_dataset("voc", base, "val")  # the VOC2012 folder itself works too
    assert val.stems == ["2007_000002"] and val.label(0)[3, 4] == 16
    aug = open_dataset("voc", tmp_path, "train_aug")
    assert aug.stems == ["2007_000001", "2007_000002"]
    assert np.array_equal(aug.label(0), label)


def test_voc_rejects_colours_and_indices_outside_voc(tmp_path):
    base = make_voc(tmp_path)
    write(base / "SegmentationClass" / "2007_000001.png", np.full((12, 16, 3), 77, np.uint8))
    with pytest.raises(CissError, match="not in the VOC palette"):
        open_dataset("voc", tmp_path, "train").label(0)
    write_png_palette(base / "SegmentationClass" / "2007_000001.png", np.full((12, 16), 30, np.uint8), voc_colormap())
    with pytest.raises(CissError, match=r"2007_000001.png has values 30"):
        open_dataset("voc", tmp_path, "train").label(0)
    with pytest.raises(CissError, match="not a Pascal VOC"):
        open_dataset("voc", tmp_path / "VOCdevkit", "train")
    with pytest.raises(CissError, match="unknown VOC split"):
        open_dataset("voc", tmp_path, "test")


# --- ADE20K and Cityscapes -----------------------------------------------------------------------

def test_ade20k_reads_validation_split(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    write(base / "images" / "validation" / "ADE_val_00000001.jpg", rgb_image())
    write(base / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[0, 1], [150, 3]], np.uint8))
    (base / "images" / "training").mkdir()
    ds = open_dataset("ade20k", tmp_path, "val")
    assert ds.info.class_names[:4] == ("background", "wall", "building", "sky")
    assert len(ds.info.class_names) == 151 and ds.info.class_names[150] == "flag"
    assert "chest_of_drawers" in ds.info.class_names and ds.info.background == 0
    assert ds.label(0).tolist() == [[0, 1], [150, 3]]
    write(base / "annotations" / "validation" / "ADE_val_00000001.png", np.array([[151]], np.uint8))
    with pytest.raises(CissError, match="values 151"):
        ds.label(0)


def test_cityscapes_maps_label_ids_and_prefers_train_ids(tmp_path):
    def add(stem: str, suffix: str, label: np.ndarray) -> None:
        write(tmp_path / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png", rgb_image(2, 4))
        write(tmp_path / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_{suffix}.png", label)

    add("aachen_000000_000019", "labelIds", np.array([[7, 8, 26, 33], [0, 1, 6, 23]], np.uint8))
    add("aachen_000001_000019", "labelTrainIds", np.array([[0, 18, 255, 5], [1, 2, 3, 4]], np.uint8))
    ds = open_dataset("cityscapes", tmp_path, "train")
    assert ds.info.class_names == CITYSCAPES_NAMES and len(CITYSCAPES_NAMES) == 19 and ds.info.background is None
    assert ds.stems == ["aachen_000000_000019", "aachen_000001_000019"]
    assert ds.label(0).tolist() == [[0, 1, 13, 18], [255, 255, 255, 10]]
    assert ds.label(1).tolist() == [[0, 18, 255, 5], [1, 2, 3, 4]]
    with pytest.raises(CissError, match="no Cityscapes split 'val'"):
        open_dataset("cityscapes", tmp_path, "val")


# --- open_dataset and synthetic ------------------------------------------------------------------

def test_open_dataset_kinds_and_errors(tmp_path):
    assert isinstance(open_dataset(None, None, "val", size=2, height=16, width=16), SyntheticDataset)
    with pytest.raises(CissError, match="known: folder, voc, ade20k, cityscapes, synthetic"):
        open_dataset("coco", tmp_path, "train")
    with pytest.raises(CissError, match="needs the dataset's root"):
        open_dataset("voc", None, "train")
    with pytest.raises(CissError, match="does not take options"):
        open_dataset("synthetic", None, "train", colour="red")


def test_synthetic_dataset_is_deterministic_and_splits_differ():
    a, b = (SyntheticDataset("train", size=3, height=24, width=32) for _ in range(2))
    assert len(a) == 3 and a.info.name == "synthetic" and a.info.background is None
    assert np.array_equal(a.image(1), b.image(1)) and np.array_equal(a.label(1), b.label(1))
    assert not np.array_equal(a.image(0), a.image(1))
    val = SyntheticDataset("val", size=3, height=24, width=32)
    assert not np.array_equal(a.image(0), val.image(0))
    assert a.fingerprint() == b.fingerprint() != val.fingerprint()
    assert SyntheticDataset("train", size=3, height=24, width=32, seed=1).fingerprint() != a.fingerprint()
    assert len(SyntheticDataset("train")) == 300 and len(SyntheticDataset("test")) == 60
    with pytest.raises(IndexError):
        a.image(3)


# --- transforms ----------------------------------------------------------------------------------

def test_train_transform_pads_label_with_ignore_and_image_with_mean():
    image = np.full((10, 12, 3), 200, np.uint8)
    label = np.zeros((10, 12), np.uint8)  # all background: padding must not look like it
    t = TrainTransform(crop=32, normalisation=IMAGENET, scale=(1.0, 1.0))
    out_image, out_label = t(image, label, np.random.default_rng(0))
    assert out_image.shape == (3, 32, 32) and out_image.dtype == np.float32
    assert out_label.shape == (32, 32) and out_label.dtype == np.int64
    assert (out_label == 0).sum() == 120 and (out_label == 255).sum() == 32 * 32 - 120
    assert np.allclose(out_image[:, out_label == 255], 0.0)
    assert (out_image[:, out_label == 0] > 1.0).all()


def test_train_transform_is_a_function_of_the_rng_and_flips():
    image = rgb_image(40, 50)
    label = np.random.default_rng(1).integers(0, 5, (40, 50), dtype=np.uint8)
    t = TrainTransform(crop=24, normalisation=IMAGENET)
    first = t(image, label, np.random.default_rng(7))
    again = t(image, label, np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert set(np.unique(first[1])) <= set(range(5)) | {255}

    whole = TrainTransform(crop=50, normalisation=IMAGENET, scale=(0.8, 0.8), flip=True)  # 32x40 image inside a 50 crop
    plain = EvalTransform(IMAGENET)(cv2.resize(image, (40, 32)), label)[0]
    outs = [whole(image, label, np.random.default_rng(s))[0] for s in range(8)]
    nonzero = [o[:, np.abs(o).sum(0).any(1)][:, :, np.abs(o).sum(0).any(0)] for o in outs]
    assert any(np.allclose(n, plain) for n in nonzero) and any(np.allclose(n, plain[:, :, ::-1]) for n in nonzero)


def test_eval_transform_keeps_resolution():
    image, label = rgb_image(9, 7), np.ones((9, 7), np.uint8)
    out_image, out_label = EvalTransform(IMAGENET)(image, label)
    assert out_image.shape == (3, 9, 7) and out_label.shape == (9, 7) and out_label.dtype == np.int64
    expected = (image[0, 0, 0] / 255 - 0.485) / 0.229
    assert np.isclose(out_image[0, 0, 0], expected, atol=1e-5)

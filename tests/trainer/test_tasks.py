"""Protocols, presence caching, step filters, label lookup tables and the torch-side step data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from ciss import synthetic
from ciss.classmap import ClassMap
from ciss.config_paths import config_dir
from ciss.errors import CissError
from ciss.manifest import IMAGENET
from ciss.trainer.data import ade20k, cityscapes, open_dataset, tasks, voc
from ciss.trainer.data.base import DatasetInfo
from ciss.trainer.data.synthetic import SyntheticDataset
from ciss.trainer.data.transforms import EvalTransform, TrainTransform

CAMVID = Path("/work/shared/data/camvid")
CAMVID_BASE = ["sky", "building", "pole", "road", "sidewalk", "tree"]
CAMVID_NEW = ["sign_symbol", "fence", "car", "pedestrian", "bicyclist"]

# VOC-like: native 0 is background; CamVid-like: no background.
WITH_BG = DatasetInfo("toy", ("background", "a", "b", "c", "d"), ((0, 0, 0),) * 5, background=0)
NO_BG = DatasetInfo("toy2", ("a", "b", "c", "d"), ((0, 0, 0),) * 4, background=None)


# --- protocols -----------------------------------------------------------------------------------

def test_shipped_protocols_resolve_to_names():
    assert tasks.load_protocol("camvid:6-5").steps == [CAMVID_BASE, CAMVID_NEW]
    assert tasks.load_protocol("camvid:6-1").steps == [CAMVID_BASE] + [[n] for n in CAMVID_NEW]
    alias = tasks.load_protocol("voc:15-5s")
    assert (alias.dataset, alias.name) == ("voc", "15-1")
    assert [len(s) for s in alias.steps] == [15, 1, 1, 1, 1, 1] and alias.steps[1] == ["pottedplant"]
    assert [len(s) for s in tasks.load_protocol("ade20k:100-5").steps] == [100] + [5] * 10
    assert tasks.load_protocol("synthetic:6-2").steps[1] == ["triangle", "ring"]


def test_shipped_class_lists_match_the_readers():
    table = tomllib.loads((config_dir() / "tasks.toml").read_text())
    assert table["voc"]["classes"] == list(voc.CLASS_NAMES[1:])
    assert table["ade20k"]["classes"] == list(ade20k.CLASS_NAMES[1:])
    assert table["cityscapes"]["classes"] == list(cityscapes.CLASS_NAMES)
    assert table["synthetic"]["classes"] == list(synthetic.CLASS_NAMES)
    for dataset, entry in table.items():
        for name in entry["protocols"]:
            protocol = tasks.load_protocol(f"{dataset}:{name}")
            assert sorted(n for s in protocol.steps for n in s) == sorted(entry["classes"])


def test_generic_and_dataset_less_specs():
    assert [len(s) for s in tasks.load_protocol("voc:12-4").steps] == [12, 4, 4]
    assert tasks.load_protocol("2-1", NO_BG).steps == [["a", "b"], ["c"], ["d"]]
    assert tasks.load_protocol("toy:3-1", WITH_BG).dataset == "toy"


@pytest.mark.parametrize("spec, info, message", [
    ("voc:15-7x", None, r"unknown protocol 'voc:15-7x'; known: voc:19-1, .*voc:2-2"),
    ("coco:10-10", None, r"unknown dataset 'coco'.*known: voc, ade20k, camvid"),
    ("6-1", None, "names no dataset"),
    ("camvid:6-1", NO_BG, "classes sky, building.* not in dataset 'toy2'"),
    ("toy2:4-1", NO_BG, "A < 4"),
])
def test_protocol_errors(spec, info, message):
    with pytest.raises(CissError, match=message):
        tasks.load_protocol(spec, info)


def test_custom_protocol_files(tmp_path):
    counts = tmp_path / "mine.toml"
    counts.write_text('dataset = "camvid"\norder = ["car", "road", "sky"]\nsteps = [2, 1]\n')
    protocol = tasks.load_protocol(str(counts))
    assert (protocol.dataset, protocol.name, protocol.steps) == ("camvid", "mine", [["car", "road"], ["sky"]])
    names = tmp_path / "names.toml"
    names.write_text('name = "ab-c"\nsteps = [["a", "b"], ["c"]]\n')
    assert tasks.load_protocol(str(names), NO_BG).steps == [["a", "b"], ["c"]]
    names.write_text('steps = [["a", "b"], ["b"]]\n')
    with pytest.raises(CissError, match="more than one step"):
        tasks.load_protocol(str(names), NO_BG)
    counts.write_text('dataset = "camvid"\nsteps = [6, 4]\n')
    with pytest.raises(CissError, match="adding up to 11"):
        tasks.load_protocol(str(counts))


# --- presence and filters ------------------------------------------------------------------------

def test_presence_is_computed_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CISS_CACHE", str(tmp_path / "cache"))
    ds = SyntheticDataset("val", size=4, height=24, width=32)
    pres = tasks.presence(ds)
    assert pres.shape == (4, 256) and pres.dtype == bool
    for i in range(4):
        assert np.array_equal(np.flatnonzero(pres[i]), np.unique(ds.label(i)))
    assert len(list((tmp_path / "cache").glob("presence-*.npy"))) == 1
    monkeypatch.setattr(ds, "label", lambda i: pytest.fail("labels re-read despite the cache"))
    assert np.array_equal(tasks.presence(ds), pres)


def _pres(rows: list[list[int]]) -> np.ndarray:
    pres = np.zeros((len(rows), 256), bool)
    for i, ids in enumerate(rows):
        pres[i, ids] = True
    return pres


def test_overlap_disjoint_and_test_filters():
    #             0       1          2       3          4        5
    pres = _pres([[0, 1], [0, 2, 3], [0, 3], [2, 255], [0, 4], [3, 4]])
    assert tasks.train_indices(pres, [3], [4], "overlap").tolist() == [1, 2, 5]
    assert tasks.train_indices(pres, [3], [4], "disjoint").tolist() == [1, 2]
    assert tasks.train_indices(pres, [1, 2], [3, 4], "disjoint").tolist() == [0, 3]
    assert tasks.train_indices(pres, [4], [], "disjoint").tolist() == [4, 5]
    assert tasks.test_indices(pres, [1, 2], "mib").tolist() == [0, 1, 3]
    assert tasks.test_indices(pres, [1, 2], "all").tolist() == list(range(6))
    with pytest.raises(CissError, match="overlap, disjoint"):
        tasks.train_indices(pres, [1], [], "sequential")


# --- lookup tables -------------------------------------------------------------------------------

def test_luts_with_native_background():
    cm = ClassMap.initial(["a", "b"]).extend(["c"])
    lut = tasks.train_lut(WITH_BG, cm, 1)
    assert lut[:5].tolist() == [0, 0, 0, 3, 0] and lut[255] == 255 and lut.dtype == np.uint8
    assert tasks.train_lut(WITH_BG, cm, 0)[:5].tolist() == [0, 1, 2, 0, 0]
    test = tasks.test_lut(WITH_BG, cm)
    # the unseen class 'd' is background, as in training (PLOP's evaluation)
    assert test[:5].tolist() == [0, 1, 2, 3, 0] and test[255] == 255 and test[200] == 255


def test_train_lut_seen_labels_every_learned_class():
    cm = ClassMap.initial(["a", "b"]).extend(["c"]).extend(["d"])
    # step 1 sees a, b (step 0) and c; d is a future class and stays background
    assert tasks.train_lut(WITH_BG, cm, 1, "seen")[:5].tolist() == [0, 1, 2, 3, 0]
    assert tasks.train_lut(WITH_BG, cm, 1, "step")[:5].tolist() == [0, 0, 0, 3, 0]
    assert tasks.train_lut(WITH_BG, cm, 0, "seen").tolist() == tasks.train_lut(WITH_BG, cm, 0).tolist()
    with pytest.raises(CissError, match="known: step, seen"):
        tasks.train_lut(WITH_BG, cm, 1, "all")


def test_luts_without_background_and_order_from_classmap():
    cm = ClassMap.initial(["c", "a"]).extend(["d"])
    assert tasks.train_lut(NO_BG, cm, 0)[:4].tolist() == [2, 0, 1, 0]
    assert tasks.train_lut(NO_BG, cm, 1)[:4].tolist() == [0, 0, 0, 3]
    assert tasks.test_lut(NO_BG, cm)[:4].tolist() == [2, 0, 1, 3] and tasks.test_lut(NO_BG, cm)[4] == 255
    with pytest.raises(CissError, match="class 'zebra'"):
        tasks.test_lut(NO_BG, cm.extend(["zebra"]))


# --- torch side ----------------------------------------------------------------------------------

def test_step_data_is_reproducible_per_position_and_epoch():
    ds = SyntheticDataset("train", size=4, height=40, width=48)
    lut = tasks.train_lut(ds.info, ClassMap.initial(list(synthetic.CLASS_NAMES)), 0)
    data = tasks.StepData(ds, np.array([3, 1]), lut, TrainTransform(crop=32, normalisation=IMAGENET), seed=5)
    assert len(data) == 2
    image, label = data[(1, 2)]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label.dtype == torch.int64
    again = tasks.StepData(SyntheticDataset("train", size=4, height=40, width=48), np.array([3, 1]), lut,
                           TrainTransform(crop=32, normalisation=IMAGENET), seed=5)[(1, 2)]
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])
    other = [data[(1, epoch)][0] for epoch in range(3, 6)]
    assert not all(torch.equal(image, o) for o in other)
    assert set(label.unique().tolist()) <= set(range(1, 11)) | {255}


def test_pad_collate_pads_images_with_zero_and_labels_with_ignore():
    ds = SyntheticDataset("test", size=2, height=16, width=20)
    lut = tasks.test_lut(ds.info, ClassMap.initial(list(synthetic.CLASS_NAMES)))
    data = tasks.StepData(ds, np.arange(2), lut, EvalTransform(IMAGENET))
    small = (torch.ones(3, 10, 12), torch.zeros(10, 12, dtype=torch.int64))
    images, labels = tasks.pad_collate([data[0], small])
    assert images.shape == (2, 3, 16, 20) and labels.shape == (2, 16, 20)
    assert torch.equal(images[0], data[0][0]) and (images[1, :, 10:] == 0).all() and (labels[1, :, 12:] == 255).all()
    same = tasks.pad_collate([data[0], data[1]])
    assert torch.equal(same[0], torch.stack([data[0][0], data[1][0]]))


# --- the real CamVid copy ------------------------------------------------------------------------

@pytest.mark.skipif(not (CAMVID / "images" / "train").is_dir(), reason="no CamVid at /work/shared/data/camvid")
def test_real_camvid_train_split():
    ds = open_dataset(None, CAMVID, "train")
    assert len(ds) == 367 and len(ds.info.class_names) == 11 and ds.info.background is None
    image, label = ds.sample(0)
    assert image.shape == (180, 240, 3) and set(np.unique(label)) <= set(range(11)) | {255}
    protocol = tasks.load_protocol("camvid:6-1", ds.info)
    assert protocol.steps == [CAMVID_BASE] + [[n] for n in CAMVID_NEW]

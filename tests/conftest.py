"""Shared fixtures: a fast training config and a tiny folder-format dataset written to disk."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CISS = [sys.executable, "-m", "ciss.apps.cli"]

FAST_CONFIG = """
seed = 0
[model]
preset = "tiny"
{data}[train]
batch_size = 4
crop = 48
epochs = {epochs}
epochs_next = {epochs}
workers = 0
checkpoint_every = {checkpoint_every}
log_every = 5
[eval]
batch_size = 8
"""


SYNTHETIC = "[data.options]\nsize = {size}\nheight = 48\nwidth = 64\n"


def write_config(path: Path, size: int = 24, epochs: int = 1, checkpoint_every: int = 1000,
                 synthetic: bool = True) -> Path:
    """A config that trains in seconds; `synthetic=False` for folder-format datasets."""
    data = SYNTHETIC.format(size=size) if synthetic else ""
    path.write_text(FAST_CONFIG.format(data=data, epochs=epochs, checkpoint_every=checkpoint_every))
    return path


@pytest.fixture
def fast_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "fast.toml")


def make_folder_dataset(root: Path, n: int = 6, size: tuple[int, int] = (32, 40)) -> Path:
    """Three classes in the folder format: left third red 'a', middle green 'b', right blue 'c'."""
    classes = [{"index": 0, "name": "a", "color_rgb": [255, 0, 0]},
               {"index": 1, "name": "b", "color_rgb": [0, 255, 0]},
               {"index": 2, "name": "c", "color_rgb": [0, 0, 255]}]
    (root / "classes.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"dataset": "abc", "classes": classes, "ignore_index": 255}))
    rng = np.random.default_rng(0)
    h, w = size
    for split in ("train", "test"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = np.zeros((h, w), np.uint8)
            cut1, cut2 = w // 3 + i % 3, 2 * w // 3 - i % 2
            label[:, cut1:cut2], label[:, cut2:] = 1, 2
            image = np.stack([(label == 0) * 200, (label == 1) * 200, (label == 2) * 200], -1).astype(np.uint8)
            image = np.clip(image + rng.integers(0, 40, image.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / "images" / split / f"im{i}.png"), image[..., ::-1])
            cv2.imwrite(str(root / "labels" / split / f"im{i}.png"), label)
    return root


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return make_folder_dataset(tmp_path / "abc")


@pytest.fixture(autouse=True)
def _isolated_cache_one_thread(tmp_path_factory, monkeypatch):
    """Caches go to the test's temp folder; tiny tensors run on one thread, since extra threads
    only add synchronisation (tens of times slower on a busy 2-core machine)."""
    monkeypatch.setenv("CISS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""From a dataset and a protocol to the data of one incremental step.

Protocols are data (configs/tasks.toml). Which images a step may use comes from a presence matrix
(which native ids occur in which image), computed once per dataset split and cached on disk. Native
labels become step labels through a 256-entry lookup table, so readers never know about steps.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ciss.classmap import BACKGROUND, IGNORE, ClassMap
from ciss.config_paths import cache_dir, config_dir, load_toml
from ciss.errors import CissError
from ciss.trainer.data.base import DatasetInfo, SegDataset

_GENERIC = re.compile(r"^(\d+)-(\d+)$")


@dataclass
class Protocol:
    dataset: str
    name: str
    steps: list[list[str]]  # class names added at each step, background never included


# --- protocols -------------------------------------------------------------------------------

def _split_by_counts(counts: list[Any], order: list[str], where: str) -> list[list[str]]:
    if not all(isinstance(n, int) and n > 0 for n in counts) or sum(counts) != len(order):
        raise CissError(f"{where}: steps {counts} must be positive class counts adding up to {len(order)}")
    starts = np.cumsum([0, *counts])
    return [order[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _steps(entry: dict[str, Any], classes: list[str], where: str) -> list[list[str]]:
    """Steps from a protocol table: counts over `order` (default `classes`) or explicit name lists."""
    steps = entry.get("steps")
    if not isinstance(steps, list) or not steps:
        raise CissError(f"{where}: 'steps' must be a non-empty list of class counts or of name lists")
    if all(isinstance(s, list) and all(isinstance(n, str) for n in s) for s in steps):
        return [list(s) for s in steps]
    order = entry.get("order", classes)
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise CissError(f"{where}: 'order' must be a list of class names")
    return _split_by_counts(steps, order, where)


def _generic(a: int, b: int, classes: list[str], where: str) -> list[list[str]]:
    if a < 1 or b < 1 or a >= len(classes):
        raise CissError(f"{where}: 'A-B' needs 1 <= A < {len(classes)} and B >= 1")
    return [classes[:a]] + [classes[k:k + b] for k in range(a, len(classes), b)]


def _check(protocol: Protocol, info: DatasetInfo | None, where: str) -> Protocol:
    names = [n for step in protocol.steps for n in step]
    if any(not step for step in protocol.steps):
        raise CissError(f"{where}: every step must add at least one class")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CissError(f"{where}: classes {', '.join(dup)} appear in more than one step")
    if any(n.lower() == BACKGROUND for n in names):
        raise CissError(f"{where}: 'background' is implicit and cannot be a step's class")
    if info is not None:
        unknown = [n for n in names if n not in info.learnable]
        if unknown:
            raise CissError(f"{where}: classes {', '.join(unknown)} are not in dataset '{info.name}' "
                            f"(its classes: {', '.join(info.learnable)})")
    return protocol


def _from_file(path: Path, info: DatasetInfo | None) -> Protocol:
    data = load_toml(path, "protocol file")
    where = f"protocol file {path}"
    dataset = str(data.get("dataset") or (info.name if info else "custom"))
    known = load_toml(config_dir() / "tasks.toml", "protocol file").get(dataset, {})
    classes = data.get("classes") or known.get("classes") or (info.learnable if info else [])
    protocol = Protocol(dataset, str(data.get("name") or path.stem), _steps(data, list(classes), where))
    return _check(protocol, info, where)


def load_protocol(spec: str, info: DatasetInfo | None = None) -> Protocol:
    """'camvid:6-1', 'voc:15-5s' (alias), 'voc:12-4' (generic A-B), '6-1' (dataset from info), or a .toml file."""
    if spec.endswith(".toml"):
        return _from_file(Path(spec).expanduser(), info)
    dataset, _, name = spec.rpartition(":")
    if not dataset:
        if info is None:
            raise CissError(f"protocol '{spec}' names no dataset: write it as <dataset>:<protocol>, e.g. voc:15-1")
        dataset = info.name
    table = load_toml(config_dir() / "tasks.toml", "protocol file")
    entry = table.get(dataset)
    generic = _GENERIC.match(name)
    if entry is None and (info is None or not generic):
        raise CissError(f"unknown dataset '{dataset}' in protocol '{spec}'; known: {', '.join(table)} "
                        f"(or A-B for the dataset being trained, or a .toml file)")
    classes = list(entry["classes"]) if entry else info.learnable  # type: ignore[union-attr]
    protocols: dict[str, Any] = entry.get("protocols", {}) if entry else {}
    for key, p in protocols.items():
        if name == key or name in p.get("aliases", []):
            return _check(Protocol(dataset, key, _steps(p, classes, f"protocol {dataset}:{key}")), info, spec)
    if generic:
        steps = _generic(int(generic[1]), int(generic[2]), classes, f"protocol '{spec}'")
        return _check(Protocol(dataset, name, steps), info, spec)
    known = ", ".join(f"{dataset}:{k}" for k in protocols)
    raise CissError(f"unknown protocol '{spec}'; known: {known} (or any A-B such as {dataset}:4-2)")


# --- which images a step uses ----------------------------------------------------------------

def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Concurrent runs may race on the same cache file; each writes its own temp file and renames."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return  # an unwritable cache only costs recomputation
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)  # a full disk leaves no half-written cache file behind


def presence(dataset: SegDataset) -> np.ndarray:
    """bool [N, 256]: which native label values occur in each image (reads every label once)."""
    key = hashlib.sha256(dataset.fingerprint().encode()).hexdigest()
    path = cache_dir() / f"presence-{key}.npy"
    try:
        cached = np.load(path)
        if cached.shape == (len(dataset), 256) and cached.dtype == bool:
            return cached
    except (OSError, ValueError, EOFError):
        pass
    pres = np.zeros((len(dataset), 256), bool)
    for i in range(len(dataset)):
        pres[i] = np.bincount(dataset.label(i).ravel(), minlength=256) > 0
    _save_atomic(path, pres)
    return pres


def train_indices(pres: np.ndarray, current: list[int], future: list[int], setting: str) -> np.ndarray:
    """Images with a pixel of a current class; 'disjoint' also drops any image showing a future class."""
    if setting not in ("overlap", "disjoint"):
        raise CissError(f"unknown setting '{setting}'; known: overlap, disjoint")
    keep = pres[:, current].any(axis=1)
    if setting == "disjoint" and future:
        keep &= ~pres[:, future].any(axis=1)
    return np.flatnonzero(keep)


def test_indices(pres: np.ndarray, seen: list[int], protocol: str = "mib") -> np.ndarray:
    """'mib': images with a pixel of a seen class; 'all': every image."""
    if protocol == "all":
        return np.arange(len(pres))
    if protocol != "mib":
        raise CissError(f"unknown test protocol '{protocol}'; known: mib, all")
    return np.flatnonzero(pres[:, seen].any(axis=1))


# --- label lookup tables ---------------------------------------------------------------------

def _native(info: DatasetInfo, name: str) -> int:
    try:
        return info.class_names.index(name)
    except ValueError:
        raise CissError(f"class '{name}' of the class map is not in dataset '{info.name}' "
                        f"(its classes: {', '.join(info.learnable)})") from None


def train_lut(info: DatasetInfo, classmap: ClassMap, step: int, labels: str = "step") -> np.ndarray:
    """Native id -> training label at `step`: this step's classes keep their ids, all else is background.

    labels="seen" also keeps the ids of every earlier step's classes. That breaks the class-incremental
    setting (old classes are not labelled in new data) and exists as a reference: plain cross-entropy
    (ft) trained so has the labels that perfect pseudo-labelling by the old model would give it."""
    if labels not in ("step", "seen"):
        raise CissError(f"unknown training labels '{labels}'; known: step, seen")
    lut = np.zeros(256, np.uint8)
    lut[IGNORE] = IGNORE
    steps = range(step + 1) if labels == "seen" else (step,)
    for model_id in (i for s in steps for i in classmap.ids_of_step(s)):
        lut[_native(info, classmap[model_id].name)] = model_id
    return lut


def test_lut(info: DatasetInfo, classmap: ClassMap) -> np.ndarray:
    """Native id -> evaluation label: known classes keep their ids, every other class of the dataset
    (not seen yet) is background, as training labels it and PLOP's evaluation does; 255 and ids
    outside the dataset's vocabulary are ignored."""
    lut = np.full(256, IGNORE, np.uint8)
    lut[:len(info.class_names)] = 0
    for c in classmap.classes[1:]:
        lut[_native(info, c.name)] = c.id
    return lut


# Names starting with "test_" would be collected by pytest when a test module imports them.
test_indices.__test__ = False  # type: ignore[attr-defined]
test_lut.__test__ = False  # type: ignore[attr-defined]


# --- torch side ------------------------------------------------------------------------------

Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class StepData(Dataset):
    """Items are keyed by (position, epoch): the augmentation rng is derived from the key, so a
    sample looks the same in any worker and after resuming mid-epoch. A plain int means epoch 0."""

    def __init__(self, dataset: SegDataset, indices: np.ndarray, lut: np.ndarray, transform: Transform,
                 seed: int = 0):
        self.dataset, self.indices, self.lut = dataset, np.asarray(indices, np.int64), np.asarray(lut, np.uint8)
        self.transform, self.seed = transform, int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[torch.Tensor, torch.Tensor]:
        position, epoch = key if isinstance(key, tuple) else (key, 0)
        i = int(self.indices[position])
        sample = getattr(self.dataset, "sample", None)
        image, label = sample(i) if sample else (self.dataset.image(i), self.dataset.label(i))
        rng = np.random.default_rng([self.seed, int(epoch), int(position)])
        image, label = self.transform(image, cv2.LUT(label, self.lut), rng)
        return torch.from_numpy(image), torch.from_numpy(label)


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack; images of different sizes (full-resolution eval) are padded with 0 / 255 at bottom-right."""
    height = max(img.shape[1] for img, _ in batch)
    width = max(img.shape[2] for img, _ in batch)
    images = torch.zeros(len(batch), batch[0][0].shape[0], height, width, dtype=batch[0][0].dtype)
    labels = torch.full((len(batch), height, width), IGNORE, dtype=batch[0][1].dtype)
    for k, (img, lbl) in enumerate(batch):
        images[k, :, : img.shape[1], : img.shape[2]] = img
        labels[k, : lbl.shape[0], : lbl.shape[1]] = lbl
    if torch.utils.data.get_worker_info() is not None:
        # A worker hands batches over in shared memory. Moved there later, while the queue pickles
        # them, a failure (full /dev/shm, a file-size limit) is dropped and the run waits forever.
        try:
            images.share_memory_()
            labels.share_memory_()
        except RuntimeError as e:
            raise CissError(f"a data-loading worker cannot put a batch into shared memory ({str(e).splitlines()[0]}); "
                            "free space in /dev/shm or raise the file-size limit, or set train.workers = 0") from None
    return images, labels

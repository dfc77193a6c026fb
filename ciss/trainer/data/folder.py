"""The folder format (classes.json, images/<split>/, labels/<split>/) and the file reading every
on-disk reader shares, so read errors, size checks and label validation read the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ciss.classmap import IGNORE, default_color
from ciss.errors import CissError
from ciss.trainer.data.base import DatasetInfo

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LAYOUT = "a dataset folder needs classes.json, images/<split>/ and labels/<split>/"


def jpeg_truncated(data: bytes) -> bool:
    """Whether a JPEG lacks its end-of-image marker after the first scan. libjpeg decodes a cut-off
    file into grey with only a warning on stderr, so the file's structure is checked instead: the
    header segments are skipped by their lengths, and in the scan data that follows 0xFF is always
    escaped, so the first 0xFFD9 there is the end of the image (trailing bytes after it are allowed)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True  # a header segment ran past where its length said it ends
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos) < 0
        if marker == 0xFF:  # fill byte
            pos += 1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return True


def read_image(path: Path) -> np.ndarray:
    """RGB pixels, or a CissError naming the file when it is missing, corrupt or cut short; the file
    is read once and its structure checked in memory, so the check costs no extra I/O."""
    unreadable = f"cannot read image {path}: it is missing, corrupt or not an image; replace or remove it"
    try:
        data = path.read_bytes()
    except OSError:
        raise CissError(unreadable) from None
    if data[:2] == b"\xff\xd8" and jpeg_truncated(data):
        raise CissError(f"image {path} is truncated (its JPEG data ends before the end-of-image marker); "
                        "replace or remove it")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if bgr is None:
        raise CissError(unreadable)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_raw_label(path: Path) -> np.ndarray:
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise CissError(f"cannot read label {path}: it is missing, corrupt or not an image; replace or remove it")
    return raw


def single_channel(raw: np.ndarray, path: Path) -> np.ndarray:
    if raw.ndim == 3:
        raise CissError(f"label {path} is a colour (or palette) image; labels must be 8-bit single-channel "
                        f"PNGs of class indices: convert its colours to indices first")
    if raw.dtype != np.uint8:
        raise CissError(f"label {path} has {raw.dtype} pixels; labels must be 8-bit single-channel PNGs")
    return raw


def _value_ranges(values: np.ndarray) -> str:
    """'0..10, 255' rather than eleven numbers, for error messages."""
    runs: list[list[int]] = []
    for v in (int(x) for x in values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


class FileDataset:
    """A split listed up front as (stem, image, label) files.

    `raw_lut` maps each raw label pixel value to a native id (255 = void) or -1 when the value is
    not allowed; subclasses override `_decode` (palette PNGs) or `_lut_for` (per-file encodings).
    """

    def __init__(self, info: DatasetInfo, split: str, items: Sequence[tuple[str, Path, Path]],
                 raw_lut: np.ndarray, fix_hint: str):
        self.info, self.split = info, split
        self._items = list(items)
        self._raw_lut = raw_lut
        self._fix_hint = fix_hint

    def __len__(self) -> int:
        return len(self._items)

    @property
    def stems(self) -> list[str]:
        return [stem for stem, _, _ in self._items]

    def image(self, i: int) -> np.ndarray:
        return read_image(self._items[i][1])

    def label(self, i: int) -> np.ndarray:
        path = self._items[i][2]
        raw = self._decode(read_raw_label(path), path)
        lut = self._lut_for(path)
        counts = np.bincount(raw.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & (lut < 0))
        if bad.size:
            valid = _value_ranges(np.flatnonzero(lut >= 0))
            raise CissError(f"label {path} has values {_value_ranges(bad)} outside the allowed {valid}: "
                            f"{self._fix_hint}")
        return cv2.LUT(raw, np.clip(lut, 0, 255).astype(np.uint8))

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and label together, checked to have the same size (a resized image is a common mistake)."""
        image, label = self.image(i), self.label(i)
        if image.shape[:2] != label.shape:
            _, ipath, lpath = self._items[i]
            raise CissError(f"image {ipath} is {image.shape[1]}x{image.shape[0]} but its label {lpath} is "
                            f"{label.shape[1]}x{label.shape[0]}: they must have the same size")
        return image, label

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(repr((type(self).__name__, self.info, self.split)).encode())
        h.update(self._raw_lut.tobytes())
        for stem, ipath, lpath in self._items:
            h.update(stem.encode())
            for p in (ipath, lpath):
                st = p.stat()
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def _decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        return single_channel(raw, path)

    def _lut_for(self, path: Path) -> np.ndarray:
        return self._raw_lut


def missing_labels_error(items: Sequence[tuple[str, Path, Path]], where: str) -> None:
    missing = [lpath for _, _, lpath in items if not lpath.is_file()]
    if missing:
        raise CissError(f"{len(missing)} image(s) of {where} have no label, e.g. {missing[0]} is missing: "
                        f"add the labels or drop those images from the split")


def _malformed(path: Path, why: str) -> CissError:
    return CissError(f"malformed {path}: {why}; expected "
                     '{"classes": [{"index": 0, "name": "sky", "color_rgb": [r, g, b]}, ...], "ignore_index": 255}')


def _parse_classes(path: Path) -> tuple[DatasetInfo, int, dict[str, Any]]:
    """DatasetInfo and the ignore index from classes.json (name defaulted by the caller)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _malformed(path, str(e)) from e
    if not isinstance(data, dict):
        raise _malformed(path, "the top level must be an object")
    entries = data.get("classes")
    names_field = data.get("names")
    if entries is None and names_field is None:
        raise _malformed(path, "it lists neither 'classes' nor 'names'")
    if entries is None and isinstance(names_field, list):
        entries = [{"index": i, "name": n} for i, n in enumerate(names_field)]
    if not isinstance(entries, list) or not entries:
        raise _malformed(path, "'classes' must be a non-empty list")
    by_index: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("index"), int) or not isinstance(e.get("name"), str):
            raise _malformed(path, f"class entry {e!r} needs an integer 'index' and a string 'name'")
        color = e.get("color_rgb", default_color(e["index"]))
        if (not isinstance(color, list | tuple) or len(color) != 3
                or not all(isinstance(v, int) and 0 <= v <= 255 for v in color)):
            raise _malformed(path, f"class '{e['name']}' has color_rgb {color!r}, not three integers 0..255")
        if e["index"] in by_index:
            raise _malformed(path, f"index {e['index']} is used twice")
        by_index[e["index"]] = (e["name"].strip(), tuple(color))  # type: ignore[assignment]
    if sorted(by_index) != list(range(len(by_index))) or len(by_index) > 255:
        raise _malformed(path, f"class indices must be 0..N-1 without gaps (N <= 255); got {sorted(by_index)}")
    names = [by_index[i][0] for i in range(len(by_index))]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or not all(names):
        raise _malformed(path, f"class names must be unique and non-empty; repeated: {dup}")
    if isinstance(names_field, list) and names_field != names:
        raise _malformed(path, "'names' disagrees with the names in 'classes'")
    ignore = data.get("ignore_index", IGNORE)
    if not isinstance(ignore, int) or not 0 <= ignore <= 255 or ignore < len(names):
        raise _malformed(path, f"ignore_index {ignore!r} must be an integer in {len(names)}..255")
    backgrounds = [i for i, n in enumerate(names) if n.lower() == "background"]
    info = DatasetInfo(name="", class_names=tuple(names), colors=tuple(by_index[i][1] for i in range(len(names))),
                       background=backgrounds[0] if backgrounds else None)
    return info, ignore, data


def _split_stems(root: Path, split: str, image_dir: Path) -> list[tuple[str, Path]]:
    list_file = root / "splits" / f"{split}.txt"
    if list_file.is_file():
        found = []
        for stem in (s.strip() for s in list_file.read_text().splitlines()):
            if not stem:
                continue
            image = next((p for p in (image_dir / f"{stem}{ext}" for ext in IMAGE_EXTS) if p.is_file()), None)
            if image is None:
                raise CissError(f"'{stem}' is listed in {list_file} but images/{split}/ has no {stem}.jpg or "
                                f"{stem}.png: add the image or remove the line")
            found.append((stem, image))
        return found
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    stems = [p.stem for p in images]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise CissError(f"images/{split}/ in {root} has several images named {dup[0]}.*: keep one per stem")
    return list(zip(stems, images))


class FolderDataset(FileDataset):
    """A split of a dataset in the folder format (see module docstring); CamVid here is one."""

    def __init__(self, root: Path, split: str):
        root = Path(root)
        if not root.is_dir():
            raise CissError(f"dataset folder {root} does not exist: {LAYOUT}")
        classes = root / "classes.json"
        if not classes.is_file():
            raise CissError(f"no classes.json in {root}: {LAYOUT}")
        info, ignore, data = _parse_classes(classes)
        name = data.get("dataset")
        info = DatasetInfo(str(name) if name else root.name, info.class_names, info.colors, info.background)

        image_dir, label_dir = root / "images" / split, root / "labels" / split
        for d in (image_dir, label_dir):
            if not d.is_dir():
                images = root / "images"
                have = sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []
                raise CissError(f"no split '{split}' in {root}: {d.relative_to(root)}/ is missing "
                                f"(splits with images: {', '.join(have) or 'none'}); {LAYOUT}")
        items = [(stem, image, label_dir / f"{stem}.png") for stem, image in _split_stems(root, split, image_dir)]
        if not items:
            raise CissError(f"split '{split}' of {root} has no images: put .jpg/.png files in images/{split}/")
        missing_labels_error(items, f"images/{split}/ in {root}")

        lut = np.full(256, -1, np.int16)
        lut[: len(info.class_names)] = np.arange(len(info.class_names))
        lut[ignore] = IGNORE
        super().__init__(info, split, items, lut,
                         f"fix the label, or list the missing classes in {classes} (void must be {ignore})")

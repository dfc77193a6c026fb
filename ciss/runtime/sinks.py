"""Outputs of `ciss live`: a window, an mp4 file, mask PNGs and a JSONL stats stream.

Every sink checks that it can write when it is made, so a bad `--save` path fails before the model
loads rather than after a long run. Only numpy and OpenCV are imported (robots have no torch).
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Self

import cv2
import numpy as np

from ciss.errors import CissError
from ciss.runtime.sources import quiet_opencv

# PyPI OpenCV has no H.264 encoder; mp4v (MPEG-4 part 2) is what it can write (runtime.md §0 item 11, §7).
FOURCC = "mp4v"


def check_target(path: Path) -> None:
    """Fail now, in one line, if `path` cannot become a file."""
    if path.is_dir():
        raise CissError(f"cannot write {path}: it is a folder")
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise CissError(f"cannot write {path}: {path.parent} {problem}")
    if not os.access(path.parent, os.W_OK):
        raise CissError(f"cannot write {path}: folder {path.parent} is not writable")


class VideoSink:
    """Frames to a video file (mp4v), written under a hidden temporary name and renamed at close().

    The MP4 index is written last, so a run killed mid-way leaves an unplayable file; renaming only
    a finished file means `path` either plays or does not exist (the partial file stays hidden as
    `.<name>.partial<suffix>`; OpenCV picks the container from the suffix, so it is kept). Frames of
    another size are resized: OpenCV would silently drop them. A run with no frames leaves no file.
    """

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int]):
        """size is (width, height), as OpenCV counts."""
        self.path = Path(path)
        self.size = (int(size[0]), int(size[1]))
        if not fps > 0:
            raise CissError(f"video fps must be positive, not {fps}")
        check_target(self.path)
        self._partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        with quiet_opencv():
            self._writer: cv2.VideoWriter | None = cv2.VideoWriter(
                str(self._partial), cv2.VideoWriter_fourcc(*FOURCC), fps, self.size)
        if not self._writer.isOpened():
            self._partial.unlink(missing_ok=True)
            raise CissError(f"cannot write video {self.path}: OpenCV has no {FOURCC} writer for "
                            f"'{self.path.suffix}' files (use .mp4 or .avi)")
        self.frames = 0

    def write(self, image: np.ndarray) -> None:
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.frames += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.release()
        self._writer = None
        if self.frames:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also after an error: the frames so far make a valid video


def palette_png(mask: np.ndarray, colors: Sequence[tuple[int, int, int]]) -> bytes:
    """An 8-bit palette PNG of `mask` (as VOC's labels are): the pixel values stay the class ids, and any
    viewer shows them in the class colours (RGB, one per id) instead of near-black greys.

    Written here with zlib because OpenCV writes no palette PNGs, and Pillow, which does, would be a fifth
    runtime dependency for these few lines. Read the ids back with `numpy.array(PIL.Image.open(path))`.
    """
    h, w = mask.shape
    palette = bytes(v for rgb in colors for v in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.hstack([np.zeros((h, 1), np.uint8), mask])  # filter type 0 (none) before each row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
            + chunk(b"PLTE", palette) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


class MaskSink:
    """One PNG per frame, named after its source image (image folders) or by frame index (000042.png).

    Up to 256 classes a palette PNG (palette_png): the pixel values are the class ids and viewers show
    the class colours. Beyond that a 16-bit grey PNG, since a palette holds 256 entries; ids read back exactly."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CissError(f"cannot create mask folder {self.folder}: {e.strerror}") from None
        if not os.access(self.folder, os.W_OK):
            raise CissError(f"cannot write masks to {self.folder}: folder is not writable")

    def path(self, name: int | str) -> Path:
        """Where the mask of frame `name` (its source image's name, or its index) goes."""
        return self.folder / (f"{name:06d}.png" if isinstance(name, int) else f"{name}.png")

    def write(self, name: int | str, mask: np.ndarray, colors: Sequence[tuple[int, int, int]]) -> Path:
        """`colors`: the class map's RGB colours, one per id (ClassMap.colors)."""
        if mask.dtype not in (np.uint8, np.uint16) or mask.ndim != 2:
            raise ValueError(f"masks are HxW uint8 or uint16, not {mask.dtype} {mask.shape}")
        path = self.path(name)
        try:
            if mask.dtype == np.uint8 and len(colors) <= 256:
                path.write_bytes(palette_png(mask, colors))
            elif not cv2.imwrite(str(path), mask.astype(np.uint16)):
                raise OSError(0, "OpenCV could not write it")
        except OSError as e:
            raise CissError(f"cannot write mask {path}: {e.strerror or e} (disk full?)") from None
        return path


def pixel_shares(mask: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Fraction of the frame per class present, by name (absent classes left out to keep lines short)."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    return {names[i]: round(float(counts[i]) / mask.size, 5) for i in np.flatnonzero(counts)}


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class StatsSink:
    """One JSON object per line per frame, flushed at once so `tail -f` and a crash both see every line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_target(self.path)
        try:
            self._file: IO[str] = self.path.open("w", encoding="utf-8")
        except OSError as e:
            raise CissError(f"cannot write stats {self.path}: {e.strerror}") from None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=_plain, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_PROBE = ("import cv2, numpy as np; cv2.imshow('ciss probe', np.zeros((8, 8, 3), np.uint8)); "
          "cv2.waitKey(1); cv2.destroyAllWindows()")


@functools.cache
def has_display() -> bool:
    """Whether cv2.imshow can open a window here; asked once per process.

    On Linux without DISPLAY/WAYLAND_DISPLAY the answer is no. Otherwise imshow is tried in a child
    process: OpenCV's Qt build aborts the whole process (no exception) when it cannot reach a display
    server, and headless builds raise "not implemented" (runtime.md §7).
    """
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE], check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class Display:
    """An OpenCV window; poll() pumps its events and says whether the user asked to quit."""

    QUIT_KEYS = frozenset({ord("q"), ord("Q"), 27})  # q or Esc

    def __init__(self, window: str = "ciss live"):
        if not has_display():
            raise CissError("no display to show video on; run with --headless (and --save to keep the output)")
        self.window = window
        cv2.namedWindow(window, cv2.WINDOW_NORMAL)

    def show(self, image: np.ndarray) -> None:
        cv2.imshow(self.window, image)

    def poll(self) -> bool:
        """True on q/Esc or when the window was closed."""
        key = cv2.waitKey(1) & 0xFF
        return key in self.QUIT_KEYS or cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) < 1

    def close(self) -> None:
        cv2.destroyWindow(self.window)

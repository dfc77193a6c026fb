"""Procedural scenes as a dataset: trains and tests the whole pipeline with no download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ciss import synthetic
from ciss.errors import CissError
from ciss.trainer.data.base import DatasetInfo

DEFAULT_SIZES = {"train": 300, "val": 60, "test": 60}
INFO = DatasetInfo("synthetic", synthetic.CLASS_NAMES, synthetic.CLASS_COLORS, background=None)


class SyntheticDataset:
    """Image i of a split is rendered from the seed sequence (seed, split number, i): reproducible
    without storing anything, and splits never share a scene."""

    def __init__(self, split: str, size: int | None = None, height: int = 120, width: int = 160, seed: int = 0):
        if split not in DEFAULT_SIZES:
            raise CissError(f"unknown synthetic split '{split}'; known: {', '.join(DEFAULT_SIZES)}")
        self.info, self.split = INFO, split
        self.size = DEFAULT_SIZES[split] if size is None else int(size)
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        self._split_number = list(DEFAULT_SIZES).index(split)
        self._last: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.size

    @property
    def stems(self) -> list[str]:
        return [f"{self.split}_{i:05d}" for i in range(self.size)]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(i)
        if self._last is None or self._last[0] != i:  # image(i) then label(i) renders once
            rng = np.random.default_rng([self.seed, self._split_number, i])
            self._last = (i, *synthetic.render_scene(rng, self.height, self.width))
        return self._last[1], self._last[2]

    def image(self, i: int) -> np.ndarray:
        return self.sample(i)[0]

    def label(self, i: int) -> np.ndarray:
        return self.sample(i)[1]

    def fingerprint(self) -> str:
        """Includes the generator's source, so caches die with any change to how scenes look."""
        source = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()
        return f"synthetic:{self.split}:{self.size}:{self.height}x{self.width}:{self.seed}:{source}"

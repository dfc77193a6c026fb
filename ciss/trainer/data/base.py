"""What every dataset reader provides: images and labels in the dataset's own class indices.

Readers know nothing about steps. Turning native labels into the labels of one incremental step
(background, ignore, unseen classes) is tasks.py's job, through a 256-entry lookup table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """Native vocabulary of a dataset: index -> name/colour, and which native index (if any) is background."""

    name: str
    class_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    background: int | None = None  # native index that means "background" (VOC: 0); None for CamVid-like data

    @property
    def learnable(self) -> list[str]:
        """Class names that can be learned (everything but the native background)."""
        return [n for i, n in enumerate(self.class_names) if i != self.background]


class SegDataset(Protocol):
    """A split of a dataset. Images are RGB uint8 HxWx3; labels uint8 HxW, native ids, 255 = void."""

    info: DatasetInfo
    split: str

    def __len__(self) -> int: ...

    @property
    def stems(self) -> Sequence[str]: ...

    def image(self, i: int) -> np.ndarray: ...

    def label(self, i: int) -> np.ndarray: ...

    def fingerprint(self) -> str:
        """A string that changes whenever the split's file list or files change (for index caches)."""
        ...

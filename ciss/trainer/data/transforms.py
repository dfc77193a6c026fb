"""Augmentation in numpy/OpenCV. Randomness comes only from the caller's Generator, so a sample's
augmentation depends on (seed, epoch, position) and not on worker processes or resume points."""

from __future__ import annotations

import cv2
import numpy as np

from ciss.classmap import IGNORE
from ciss.manifest import Normalisation


class Normalise:
    """`(pixel / 255 - mean) / std` as one multiply-add per channel, in float32."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        self.scale = (1.0 / (255.0 * np.asarray(std, np.float32))).astype(np.float32)
        self.shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).astype(np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image.astype(np.float32) * self.scale - self.shift


def _window(size: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, target start, length) along one axis: a random crop of a larger image, or a
    random placement of a smaller one inside the padded crop."""
    offset = int(rng.integers(0, abs(size - crop) + 1))
    return (offset, 0, crop) if size >= crop else (0, offset, size)


class TrainTransform:
    """Random scale, pad (mean colour / 255, never background), random crop, random flip; normalised
    as the model's preset says."""

    def __init__(self, crop: int, normalisation: Normalisation, scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True):
        self.crop, self.scale, self.flip = int(crop), scale, flip
        self._normalise = Normalise(normalisation.mean, normalisation.std)

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        s = rng.uniform(*self.scale)
        h, w = label.shape
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if size != (w, h):
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
        c = self.crop
        (sy, dy, ly), (sx, dx, lx) = _window(size[1], c, rng), _window(size[0], c, rng)
        out_image = np.zeros((c, c, 3), np.float32)  # zero is the mean colour once normalised
        out_label = np.full((c, c), IGNORE, np.uint8)
        out_image[dy:dy + ly, dx:dx + lx] = self._normalise(image[sy:sy + ly, sx:sx + lx])
        out_label[dy:dy + ly, dx:dx + lx] = label[sy:sy + ly, sx:sx + lx]
        if self.flip and rng.random() < 0.5:
            out_image, out_label = out_image[:, ::-1], out_label[:, ::-1]
        return np.ascontiguousarray(out_image.transpose(2, 0, 1)), out_label.astype(np.int64)


class EvalTransform:
    """Full resolution, normalisation only; takes (and ignores) an rng to share TrainTransform's call."""

    def __init__(self, normalisation: Normalisation):
        self._normalise = Normalise(normalisation.mean, normalisation.std)

    def __call__(self, image: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        return np.ascontiguousarray(self._normalise(image).transpose(2, 0, 1)), label.astype(np.int64)

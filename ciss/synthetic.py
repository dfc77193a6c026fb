"""Procedural scenes with exact labels: a dataset and a live video source that need no downloads.

Four textured "stuff" classes tile the whole frame (every pixel has a class, there is no void) and
up to six kinds of "things" are drawn on top. Classes differ in colour family *and* texture so a
tiny model can tell them apart in 64-128 px crops. Only numpy and OpenCV are imported because the
runtime, which has no torch, uses `SyntheticStream` as a camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

STUFF = ("sky", "grass", "water", "sand")
THINGS = ("disk", "box", "triangle", "ring", "cross", "star")
CLASS_NAMES: tuple[str, ...] = STUFF + THINGS

# Stuff pixels are c0 + t * (c1 - c0) with t in [0, 1] from the class's texture.
_STUFF_LOW = np.array([(70, 130, 220), (35, 100, 25), (10, 45, 85), (228, 204, 156)], np.float32)
_STUFF_HIGH = np.array([(195, 218, 246), (115, 195, 65), (45, 130, 160), (140, 110, 70)], np.float32)
_THING_BASE = np.array([(225, 35, 35), (240, 210, 25), (135, 50, 215), (255, 135, 0), (40, 40, 40),
                        (240, 65, 170)], np.float32)

CLASS_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    tuple(int(v) for v in c) for c in np.concatenate([(_STUFF_LOW + _STUFF_HIGH) / 2, _THING_BASE]))

_MIN_SIZE, _MAX_SIZE = 0.08, 0.40  # thing diameter as a fraction of the frame's short side
_LEVELS = 64  # texture steps per stuff class: 4 x 64 colours fill one 256-entry cv2.LUT


@dataclass
class _Thing:
    cls: int  # index into CLASS_NAMES
    x: float
    y: float
    size: float  # diameter in pixels
    angle: float  # radians
    color: np.ndarray  # float32 RGB after per-instance jitter
    shade: float  # direction of the shading gradient, radians
    vx: float = 0.0  # pixels per second (streams only)
    vy: float = 0.0
    spin: float = 0.0  # radians per second


def _thing_ids(classes: Iterable[str] | None) -> list[int]:
    if classes is None:
        return list(range(len(STUFF), len(CLASS_NAMES)))
    names = list(classes)
    unknown = [n for n in names if n not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"unknown synthetic classes {unknown}; known: {', '.join(CLASS_NAMES)}")
    return [CLASS_NAMES.index(n) for n in names if n in THINGS]


def _render_stuff(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sky above a wavy horizon, grass/water/sand below as blobs from smooth random fields."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    horizon = height * rng.uniform(0.2, 0.5) + height * 0.06 * np.sin(
        xs * rng.uniform(0.01, 0.04) + rng.uniform(0, 2 * np.pi))
    fields = rng.random((3, 4, 5), dtype=np.float32) + rng.uniform(0, 0.3, (3, 1, 1)).astype(np.float32)
    # Cubic to quarter size for round blobs, then linear to full size because it is ten times cheaper.
    small = (max(width // 4, 5), max(height // 4, 4))
    fields = cv2.resize(fields.transpose(1, 2, 0), small, interpolation=cv2.INTER_CUBIC)
    fields = cv2.resize(fields, (width, height), interpolation=cv2.INTER_LINEAR)
    label = (np.argmax(fields, axis=2) + 1).astype(np.uint8)
    label[ys < horizon] = 0

    noise = rng.random((height, width), dtype=np.float32)
    textures = np.empty((4, height, width), np.float32)
    textures[0] = np.clip(ys / max(float(horizon.max()), 1.0), 0, 1)  # smooth vertical gradient
    textures[1] = cv2.blur(noise, (1, 3))  # coarse noise with vertical blades
    phase = rng.uniform(0, 2 * np.pi)
    textures[2] = 0.5 + 0.5 * np.sin(ys * 0.7 + 1.5 * np.sin(xs * 0.09 + phase))  # wavy stripes
    textures[3] = np.where(noise > 0.94, 1.0, noise * 0.25)  # fine grain with dark dots
    t = np.take_along_axis(textures, label[None].astype(np.intp), axis=0)[0]

    # Colour through a (class, texture level) table: one uint8 lookup instead of float maths per pixel.
    levels = np.linspace(0, 1, _LEVELS, dtype=np.float32)[None, :, None]
    jitter = rng.uniform(-12, 12, (4, 1, 3)).astype(np.float32)
    table = _STUFF_LOW[:, None] + jitter + levels * (_STUFF_HIGH - _STUFF_LOW)[:, None]
    table = np.clip(table, 0, 255).astype(np.uint8)
    index = label * _LEVELS + (t * (_LEVELS - 1) + 0.5).astype(np.uint8)  # < 256 by construction
    return cv2.LUT(cv2.merge([index] * 3), table.reshape(256, 1, 3)), label


def _new_thing(rng: np.random.Generator, ids: list[int], height: int, width: int) -> _Thing:
    short = min(height, width)
    cls = int(ids[rng.integers(len(ids))])
    color = _THING_BASE[cls - len(STUFF)] * rng.uniform(0.85, 1.1) + rng.uniform(-15, 15, 3)
    return _Thing(cls=cls, x=rng.uniform(0, width), y=rng.uniform(0, height),
                  size=short * rng.uniform(_MIN_SIZE, _MAX_SIZE), angle=rng.uniform(0, 2 * np.pi),
                  color=np.clip(color, 0, 255).astype(np.float32), shade=rng.uniform(0, 2 * np.pi))


def _polygon(kind: str, c: float, r: float, angle: float) -> list[np.ndarray]:
    def ring_of(radii: list[float]) -> np.ndarray:
        a = angle + np.arange(len(radii)) * 2 * np.pi / len(radii)
        return np.stack([c + np.array(radii) * np.cos(a), c + np.array(radii) * np.sin(a)], 1)

    if kind == "box":
        return [ring_of([r] * 4)]
    if kind == "triangle":
        return [ring_of([r] * 3)]
    if kind == "star":
        return [ring_of([r, r * 0.45] * 5)]
    # cross: two perpendicular bars, each a rectangle of length 2r and width 0.6r
    bars = []
    for a in (angle, angle + np.pi / 2):
        along = r * np.array([np.cos(a), np.sin(a)])
        across = 0.3 * r * np.array([-np.sin(a), np.cos(a)])
        bars.append(c + np.array([along + across, along - across, -along - across, -along + across]))
    return bars


def _draw_thing(image: np.ndarray, label: np.ndarray, thing: _Thing) -> None:
    """Draw into a small local canvas first so the cost scales with the thing, not the frame."""
    r = thing.size / 2
    side = 2 * int(math.ceil(r)) + 3
    c = side / 2
    mask = np.zeros((side, side), np.uint8)
    kind = CLASS_NAMES[thing.cls]
    if kind == "disk":
        cv2.circle(mask, (int(c), int(c)), int(round(r)), 1, -1)
    elif kind == "ring":
        thick = max(2, int(round(r * 0.4)))
        cv2.circle(mask, (int(c), int(c)), max(1, int(round(r - thick / 2))), 1, thick)
    else:
        for polygon in _polygon(kind, c, r, thing.angle):  # one call each: fillPoly XORs overlaps
            cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)

    x0, y0 = int(round(thing.x - c)), int(round(thing.y - c))
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + side, image.shape[1]), min(y0 + side, image.shape[0])
    if fx0 >= fx1 or fy0 >= fy1:
        return
    m = mask[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0].astype(bool)
    gy, gx = np.mgrid[fy0 - y0:fy1 - y0, fx0 - x0:fx1 - x0].astype(np.float32)
    t = ((gx - c) * math.cos(thing.shade) + (gy - c) * math.sin(thing.shade)) / max(r, 1.0)
    colors = np.clip(thing.color * (0.92 + 0.18 * t[..., None]), 0, 255).astype(np.uint8)
    image[fy0:fy1, fx0:fx1][m] = colors[m]
    label[fy0:fy1, fx0:fx1][m] = thing.cls


def render_scene(rng: np.random.Generator, height: int, width: int,
                 classes: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One random scene: (RGB uint8 HxWx3, label uint8 HxW with indices into CLASS_NAMES).

    `classes` limits which *thing* classes may be drawn (names from CLASS_NAMES); stuff always
    fills the frame, so stuff names in it change nothing. Raises ValueError for unknown names.
    """
    ids = _thing_ids(classes)
    image, label = _render_stuff(rng, height, width)
    if ids:
        things = [_new_thing(rng, ids, height, width) for _ in range(int(rng.integers(2, 7)))]
        for thing in sorted(things, key=lambda th: -th.size):  # small ones on top stay visible
            _draw_thing(image, label, thing)
    return image, label


class SyntheticStream:
    """An endless video of one fixed stuff layout with things drifting, spinning and re-entering.

    Deterministic given the seed: frame k is the same on every run. `read()` returns BGR like
    cv2.VideoCapture so it can stand in for a camera.
    """

    def __init__(self, height: int = 240, width: int = 320, seed: int = 0, fps: float = 30.0,
                 things: int = 5, classes: Iterable[str] | None = None):
        self.height, self.width, self.fps = height, width, float(fps)
        self.frame_index = 0
        self._rng = np.random.default_rng(seed)
        self._ids = _thing_ids(classes)
        self._background, self._background_label = _render_stuff(self._rng, height, width)
        self._things = [self._launch(_new_thing(self._rng, self._ids, height, width))
                        for _ in range(things if self._ids else 0)]

    def _launch(self, thing: _Thing) -> _Thing:
        speed = min(self.height, self.width) * self._rng.uniform(0.1, 0.35)
        heading = self._rng.uniform(0, 2 * np.pi)
        thing.vx, thing.vy = speed * math.cos(heading), speed * math.sin(heading)
        thing.spin = self._rng.uniform(-1.5, 1.5)
        return thing

    def _respawn(self, thing: _Thing) -> _Thing:
        """A thing that left the frame comes back from the opposite side as a new random thing."""
        new = self._launch(_new_thing(self._rng, self._ids, self.height, self.width))
        margin = new.size / 2
        if not 0 <= thing.x <= self.width:
            new.x = self.width + margin if thing.x < 0 else -margin
            new.vx = math.copysign(new.vx, self.width / 2 - new.x)
        else:
            new.y = self.height + margin if thing.y < 0 else -margin
            new.vy = math.copysign(new.vy, self.height / 2 - new.y)
        return new

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """The next frame (BGR uint8 HxWx3) and its label (uint8 HxW)."""
        image, label = self._background.copy(), self._background_label.copy()
        for thing in sorted(self._things, key=lambda th: -th.size):
            _draw_thing(image, label, thing)
        dt = 1.0 / self.fps
        for k, thing in enumerate(self._things):
            thing.x += thing.vx * dt
            thing.y += thing.vy * dt
            thing.angle += thing.spin * dt
            r = thing.size / 2
            if not (-r <= thing.x <= self.width + r and -r <= thing.y <= self.height + r):
                self._things[k] = self._respawn(thing)
        self.frame_index += 1
        return cv2.cvtColor(image, cv2.COLOR_RGB2BGR), label

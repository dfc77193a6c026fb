"""Network input sizes: multiples of the output stride, the export's default, and where a frame goes
in the input (stretched to fill it, or letterboxed: aspect kept, the rest padded).

Each stride-2 layer rounds an odd side up, so an input that is not a multiple of the model's output
stride is padded inside the network and the upsampled mask drifts against the image, by most of a
stride at the far edge: a CamVid model scored 56.3 mIoU at 180x240 and 61.2 at 176x240
(docs/results/export/agreement.md). Every size chosen here is a multiple. Shared by the exporter and the runtime, so it
imports neither torch nor the exporter.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from ciss.errors import CissError
from ciss.manifest import InputSpec

Size = tuple[int, int]
RESIZE_MODES = ("stretch", "letterbox")
DEFAULT_RESIZE = "stretch"
ASPECT_WARNING = 0.15  # a stretch that changes the aspect ratio by more than this is worth a warning


def _nearest(side: float, stride: int) -> int:
    """The multiple of `stride` nearest `side`, at least `stride`."""
    return max(stride, round(side / stride) * stride)


def nearest_on_stride(size: Size, stride: int) -> Size:
    """Each side rounded to the nearest multiple of `stride` (at least one stride)."""
    return _nearest(size[0], stride), _nearest(size[1], stride)


def check_stride(size: Size, stride: int) -> None:
    """Refuse a fixed size whose sides are not multiples of the output stride, naming the sizes to give."""
    h, w = size
    if h % stride or w % stride:
        near = tuple(_nearest(s, stride) for s in size)
        up = tuple(math.ceil(s / stride) * stride for s in size)
        raise CissError(f"--size {h}x{w} is not a multiple of the model's output stride {stride} (its mask would "
                        f"drift against the image); give --size {near[0]}x{near[1]}"
                        + (f" or --size {up[0]}x{up[1]}" if up != near else ""))


def typical_size(sizes: Sequence[Size]) -> Size:
    """The median aspect ratio at the median area: one size for datasets that mix orientations."""
    aspect = statistics.median(w / h for h, w in sizes)
    area = statistics.median(h * w for h, w in sizes)
    h = math.sqrt(area / aspect)
    return round(h), round(h * aspect)


def stride_size(size: tuple[float, float], stride: int, low: int, high: int) -> Size:
    """`size` with each side rounded to the nearest multiple of `stride` inside [low, high]."""
    low, high = math.ceil(low / stride) * stride, high // stride * stride
    return min(max(_nearest(size[0], stride), low), high), min(max(_nearest(size[1], stride), low), high)


def matching_size(frame_hw: Size, input_hw: Size, stride: int) -> Size:
    """A stride multiple with the frame's aspect ratio and about the input's area (an export --size)."""
    aspect = frame_hw[1] / frame_hw[0]
    h = math.sqrt(input_hw[0] * input_hw[1] / aspect)
    return _nearest(h, stride), _nearest(h * aspect, stride)


def aspect_change(frame_hw: Size, input_hw: Size) -> float:
    """How much stretching a frame to the input changes its aspect ratio (0.33: a third wider or taller)."""
    ratio = (frame_hw[1] / frame_hw[0]) / (input_hw[1] / input_hw[0])
    return max(ratio, 1 / ratio) - 1


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise CissError(f"unknown --resize '{resize}'; choose one of {', '.join(RESIZE_MODES)}")
    return resize


@dataclass(frozen=True)
class Box:
    """Where the frame's pixels lie in the network input; the rest is padding."""

    top: int
    left: int
    height: int
    width: int


def input_size(spec: InputSpec, frame_hw: Size, resize: str = "stretch") -> Size:
    """The network input (H, W) for a frame: the fixed export size, or for a dynamic graph the frame's
    size in multiples of the output stride (so the mask aligns) inside the exported range: the
    nearest multiple to stretch to, the next one up to letterbox (pad only, no resampling)."""
    if spec.size:
        return spec.size
    stride = spec.stride or 1
    low = spec.min_size or (stride, stride)
    high = spec.max_size or frame_hw
    step = math.ceil if resize == "letterbox" else round
    return tuple(int(min(max(step(side / stride) * stride, lo), hi))  # type: ignore[return-value]
                 for side, lo, hi in zip(frame_hw, low, high))


def placement(spec: InputSpec, frame_hw: Size, resize: str) -> tuple[Size, Box]:
    """The network input size for a frame and where the frame goes in it. Stretch fills the input;
    letterbox scales the frame to fit with its aspect ratio kept (never up, for a dynamic graph)
    and centres it, so pre-processing can pad around it and post-processing crop the mask back."""
    h, w = input_size(spec, frame_hw, resize)
    if resize == "stretch" or (h, w) == tuple(frame_hw):
        return (h, w), Box(0, 0, h, w)
    fh, fw = frame_hw
    scale = min(h / fh, w / fw, 1.0 if not spec.size else math.inf)
    bh, bw = min(h, max(1, round(fh * scale))), min(w, max(1, round(fw * scale)))
    return (h, w), Box((h - bh) // 2, (w - bw) // 2, bh, bw)

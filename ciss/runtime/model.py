"""One loaded model version and what it produces: `Model` (its backend plus the pre- and post-processing
its manifest describes) and `Result` (one segmented frame and where it came from).

They sit apart from the Segmenter so that ciss.runtime.hotswap, which prepares the next Model, and
the sinks, which consume Results, need not import the Segmenter that uses both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ciss.classmap import ClassMap, mask_dtype, unlearned, unlearned_warning
from ciss.errors import CissError
from ciss.manifest import InputSpec, ModelManifest, Normalisation
from ciss.runtime.backends import Backend, BackendFactory, load_backend, return_freed_memory
from ciss.runtime.log import Log
from ciss.sizes import ASPECT_WARNING, aspect_change, check_resize, input_size, matching_size, placement


@dataclass
class Result:
    """One segmented frame and where it came from (runtime.md §9 item 5: frame-accurate provenance)."""

    mask: np.ndarray                 # H×W class ids at frame size, uint8 (uint16 past 255 classes)
    confidence: np.ndarray | None    # H×W float32 top-class probability, when the model gives one
    classmap: ClassMap               # the class map of `version`
    version: int
    seq: int                         # 0, 1, 2, ... in the order this Segmenter ran the frames
    timings: dict[str, float]        # milliseconds: preprocess, infer, postprocess, total
    new_classes: list[int] = field(default_factory=list)  # ids `version` added to the version served before
    unlearned: list[int] = field(default_factory=list)  # ids of `version`'s new classes its eval never saw learned
    backend: str = ""                # the backend that produced it, e.g. onnxruntime:CPUExecutionProvider
    stamp: int | None = None         # the input's header stamp (ns) when it came from ROS, for the outputs' headers
    frame_id: str | None = None      # the input's header frame_id when it came from ROS


def mask_from_logits(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and top-class probability from C×H×W logits, for graphs exported with `logits` only."""
    top = logits.max(axis=0)
    confidence = (1.0 / np.exp(logits - top).sum(axis=0)).astype(np.float32)
    return logits.argmax(axis=0).astype(mask_dtype(logits.shape[0])), confidence


def _normalised_input(manifest: ModelManifest) -> tuple[InputSpec, Normalisation]:
    """The version's input spec and the normalisation it gives, which the runtime cannot feed a frame without."""
    spec = manifest.input
    if spec is None or spec.normalisation is None:
        raise CissError(f"version {manifest.version} of '{manifest.name}' does not say how its input is "
                        "normalised (input mean and std); export it again with `ciss export`")
    return spec, spec.normalisation


class Model:
    """One loaded version: its backend and the pre/post-processing its manifest describes; `resize`
    says how a frame of another shape fits the input (ciss.sizes: stretch, or letterbox)."""

    def __init__(self, version: int, manifest: ModelManifest, backend: Backend, resize: str = "stretch"):
        self.version, self.manifest, self.backend = version, manifest, backend
        self.resize = check_resize(resize)
        self.classmap = manifest.classes
        self.unlearned = unlearned(self.classmap, manifest.metrics)
        self.warning = unlearned_warning(self.classmap, manifest.metrics)  # said when it starts serving
        self.spec, norm = _normalised_input(manifest)
        scale, std = float(self.spec.scale), np.asarray(norm.std, np.float32)
        # (pixel * scale - mean) / std as one multiply-add per channel
        self._mul = (scale / std).astype(np.float32)
        self._add = (-np.asarray(norm.mean, np.float32) / std).astype(np.float32)
        self._rgb = self.spec.color == "RGB"

    @classmethod
    def load(cls, path: Path, manifest: ModelManifest, kind: str | BackendFactory, threads: int, log: Log,
             resize: str = "stretch") -> Model:
        return cls(manifest.version, manifest, load_backend(path, manifest, kind, threads, log), resize)

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        (h, w), box = placement(self.spec, frame.shape[:2], self.resize)
        if frame.shape[:2] != (box.height, box.width):
            frame = cv2.resize(frame, (box.width, box.height), interpolation=cv2.INTER_LINEAR)
        if self._rgb:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        x = frame.astype(np.float32)
        x *= self._mul
        x += self._add
        if (box.height, box.width) == (h, w):
            return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        # Letterbox: the padding is 0 after normalisation, i.e. the mean pixel, which the network saw most.
        padded = np.zeros((1, 3, h, w), np.float32)
        padded[0, :, box.top:box.top + box.height, box.left:box.left + box.width] = x.transpose(2, 0, 1)
        return padded

    def aspect_warning(self, frame_hw: tuple[int, int]) -> str | None:
        """One line when stretching frames of this shape would distort them noticeably, else None."""
        if self.resize != "stretch":
            return None
        input_hw = input_size(self.spec, frame_hw)
        change = aspect_change(frame_hw, input_hw)
        if change <= ASPECT_WARNING:
            return None
        h, w = matching_size(frame_hw, input_hw, self.spec.stride or 1)
        return (f"frames of {frame_hw[0]}x{frame_hw[1]} are stretched to version {self.version}'s input "
                f"{input_hw[0]}x{input_hw[1]}, changing their aspect ratio by {100 * change:.0f}%; "
                f"--resize letterbox keeps it, or export with --size {h}x{w}")

    def postprocess(self, outputs: dict[str, np.ndarray],
                    frame_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        confidence = outputs["confidence"][0] if "confidence" in outputs else None
        if "mask" in outputs:
            mask = outputs["mask"][0]
        else:
            mask, confidence = mask_from_logits(outputs["logits"][0])
        _, box = placement(self.spec, frame_hw, self.resize)
        if (box.height, box.width) != mask.shape:  # letterboxed: the padding's mask goes
            mask = mask[box.top:box.top + box.height, box.left:box.left + box.width]
            if confidence is not None:
                confidence = confidence[box.top:box.top + box.height, box.left:box.left + box.width]
        h, w = frame_hw
        if mask.shape != (h, w):
            # NEAREST_EXACT samples pixel centres; plain NEAREST shifts the mask by up to half a model pixel
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
            if confidence is not None:
                confidence = cv2.resize(confidence, (w, h), interpolation=cv2.INTER_LINEAR)
        return mask, confidence

    def run(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        t0 = time.perf_counter()
        x = self.preprocess(frame)
        t1 = time.perf_counter()
        outputs = self.backend.infer(x)
        t2 = time.perf_counter()
        mask, confidence = self.postprocess(outputs, frame.shape[:2])
        t3 = time.perf_counter()
        timings = {"preprocess": 1e3 * (t1 - t0), "infer": 1e3 * (t2 - t1), "postprocess": 1e3 * (t3 - t2)}
        return mask, confidence, timings

    def close(self) -> None:
        self.backend.close()
        return_freed_memory()

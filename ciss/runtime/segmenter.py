"""Segmenter: BGR frames in, class masks at frame size out, from a model repository that it follows.

A frame's model is chosen once, under one lock, when the frame starts; that frame keeps it through
pre-processing, inference and post-processing, so a model swap can only fall between two frames
(runtime.md §6.3 step 4) and every frame is produced by exactly one version. The next version is
prepared off the frame path by ciss.runtime.hotswap and parked in a one-slot `pending`; the first
frame that finds it there swaps. A retired model is closed once no frame in flight uses it.

Two forms: a plain call (`segmenter(frame)`, serialised across threads, numbered in the order they
ran) for robot code, and `stream(source)`, which overlaps reading, pre-processing, inference and
post-processing of successive frames on their own threads (ciss.runtime.stages) for `ciss live`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np

from ciss.classmap import ClassMap, unlearned, unlearned_warning
from ciss.errors import CissError
from ciss.repository import ModelRepository
from ciss.runtime.backends import Backend, check_kind, keep_large_blocks_mapped, load_backend, return_freed_memory
from ciss.runtime.hotswap import HotSwap, prepare
from ciss.runtime.sources import Frame, Source
from ciss.runtime.stages import Pipeline
from ciss.sizes import ASPECT_WARNING, DEFAULT_RESIZE, aspect_change, check_resize, input_size, matching_size, placement

Log = Callable[[str], None]
_LOG = logging.getLogger("ciss.runtime")


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
    dtype = np.uint8 if logits.shape[0] <= 255 else np.uint16
    return logits.argmax(axis=0).astype(dtype), confidence


class Model:
    """One loaded version: its backend and the pre/post-processing its manifest describes; `resize`
    says how a frame of another shape fits the input (ciss.sizes: stretch, or letterbox)."""

    def __init__(self, version: int, manifest: dict[str, Any], backend: Backend, resize: str = "stretch"):
        self.version, self.manifest, self.backend = version, manifest, backend
        self.resize = check_resize(resize)
        self.classmap = ClassMap.from_json(manifest["classes"])
        self.unlearned = unlearned(self.classmap, manifest.get("metrics"))
        self.warning = unlearned_warning(self.classmap, manifest.get("metrics"))  # said when it starts serving
        self.spec = manifest["input"]
        scale, std = float(self.spec["scale"]), np.asarray(self.spec["std"], np.float32)
        # (pixel * scale - mean) / std as one multiply-add per channel
        self._mul = (scale / std).astype(np.float32)
        self._add = (-np.asarray(self.spec["mean"], np.float32) / std).astype(np.float32)
        self._rgb = self.spec.get("color", "RGB") == "RGB"

    @classmethod
    def load(cls, path: Path, manifest: dict[str, Any], kind: str, threads: int, log: Log,
             resize: str = "stretch") -> Model:
        return cls(int(manifest["version"]), manifest, load_backend(path, manifest, kind, threads, log), resize)

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
        h, w = matching_size(frame_hw, input_hw, int(self.spec.get("stride") or 1))
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


@dataclass
class _Job:
    """A frame between its start and its Result: the model chosen at the start serves it to the end."""

    image: np.ndarray
    model: Model
    seq: int
    new_classes: list[int]
    start: float
    stamp: int | None
    frame_id: str | None
    swapped_from: int | None  # on the first frame after a swap: the version it replaced
    timings: dict[str, float] = field(default_factory=dict)
    x: np.ndarray | None = None
    outputs: dict[str, np.ndarray] | None = None


def _check_frame(frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        what = f"shape {list(frame.shape)} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise CissError(f"a frame must be a BGR uint8 H×W×3 array, not {what}")


class Segmenter:
    """Segments frames with the serving version of a model and swaps to newer ones between frames."""

    def __init__(self, model: Model, *, on_swap: Callable[[int, int], None] | None = None, log: Log = _LOG.info):
        self._model = model
        self._pending: tuple[Model, dict[str, Any]] | None = None
        self._pending_ready = threading.Event()
        self._lock = threading.Lock()      # the serving model, pending, seq, users
        self._serial = threading.Lock()    # plain calls run one at a time, as robot code expects
        self._users: Counter[Model] = Counter()  # frames in flight per model
        self._retired: list[Model] = []    # swapped out, closed once no frame in flight uses them
        self._seq = 0
        self._new_classes: list[int] = []
        self._last_frame: np.ndarray | None = None
        self._swaps: list[dict[str, Any]] = []
        self._closed = False
        self._on_swap = on_swap
        self._log = log
        self._swapper: HotSwap | None = None
        self._aspect_warned = False  # the stretch warning is said once, not on every frame

    @classmethod
    def from_repository(cls, repo: Path | str, name: str, backend: str = "auto", version: int | None = None,
                        watch: bool = True, poll_s: float = 0.5, threads: int = 0, resize: str = DEFAULT_RESIZE,
                        on_swap: Callable[[int, int], None] | None = None,
                        on_error: Callable[[Exception], None] | None = None, log: Log | None = None) -> Segmenter:
        """Serve `name` from the repository at `repo`: version `version` only (pinned), or the latest
        and, with `watch`, every newer version that passes the checks in ciss.runtime.hotswap.

        `on_swap(old, new)` gets the two version numbers once the first frame of `new` is segmented
        (before it is returned), on the thread that finished it (in a stream, its post-processing
        thread); `on_error(exc)` gets a CissError for each refused version, on the watcher thread (or
        in check_updates' caller), instead of `log`. With `watch=False` and no `version`, new
        versions are taken only when check_updates() is called. `threads` is the backend's intra-op
        threads (0: its default); ciss.runtime.stages.thread_split chooses them for a stream.
        `resize` fits frames of another shape to a fixed-size model: "letterbox" keeps their aspect
        ratio and pads, "stretch" fills the input (ciss.sizes).
        """
        check_kind(backend)
        check_resize(resize)
        if not (math.isfinite(poll_s) and poll_s > 0):  # 0 would re-check the repository in a busy loop
            raise CissError(f"--poll {poll_s:g} is not a positive number of seconds; give e.g. --poll 0.5")
        if threads < 0:
            raise CissError(f"--threads {threads} is negative; give 0 (the backend's default) or more")
        log = log or _LOG.info
        root = Path(repo)
        if not root.is_dir():
            raise CissError(f"model repository {root} does not exist; publish a model with "
                            f"`ciss export --repo {root} --name {name}`")
        repository = ModelRepository(root)
        path = repository.path(name, version)

        def load(version_dir: Path, manifest: dict[str, Any]) -> Model:
            return Model.load(version_dir, manifest, backend, threads, log, resize)

        if version is None:  # models will be retired: their memory must go back to the system
            keep_large_blocks_mapped()
        model, _ = prepare(path, [], load, frame=None)
        segmenter = cls(model, on_swap=on_swap, log=log)
        following = "pinned"
        if version is None:
            swapper = segmenter._swapper = HotSwap(
                repository.root / name, load=load, models=segmenter._models,
                last_frame=lambda: segmenter._last_frame, offer=segmenter._offer, on_error=on_error, log=log,
                poll_s=poll_s)
            following = "new versions on check_updates() only"
            if watch:
                swapper.start()
                following = f"following new versions ({swapper.watch_mode}, checked every {poll_s:g} s)"
        log(f"serving {name} version {model.version} on {model.backend.name}; {following}")
        if model.warning:
            log(f"version {model.version}: {model.warning}")
        return segmenter

    # --- the frame path --------------------------------------------------------------------------
    def __call__(self, frame_bgr: np.ndarray, stamp: int | None = None, frame_id: str | None = None) -> Result:
        """Segment one frame; `stamp` and `frame_id` (a ROS header's) are passed through to the Result."""
        with self._serial:
            job = self._begin(frame_bgr, stamp, frame_id)
            try:
                self._infer(self._preprocess(job))
            except BaseException:
                self._release(job.model)
                raise
            return self._finish(job)

    def stream(self, source: Source, *, stop: threading.Event | None = None, max_frames: int | None = None,
               then: Callable[[Frame, Result], Any] | None = None, depth: int = 2) -> Pipeline:
        """The frames of `source` segmented with reading, pre-processing, inference and
        post-processing overlapped on their own threads; iterate it for (Frame, Result) pairs in
        source order, or for `then(frame, result)`, which runs on one more thread (rendering).

        Results equal the plain call's, frame for frame. A frame's model is chosen as it is read: a
        version ready when frame k is read serves frame k on. Files and folders lose no frame. For a
        live source at most two frames are in flight, so each one read is still nearly the newest
        (the source drops the rest and counts them). Reading ends at the source's end, after
        `max_frames`, or once `stop` is set; the frames in flight still come out. The first
        exception in any stage is raised here. Use it in a `with` block, or iterate it to the end.
        """
        read = 0

        def produce() -> tuple[Frame, _Job] | None:
            nonlocal read
            if max_frames is not None and read >= max_frames:
                return None
            frame = source.read()
            read += 1
            # The model is chosen as the frame is read: a version ready by then serves this frame.
            return None if frame is None else (frame, self._begin(frame.image, frame.stamp, frame.frame_id))

        stages = [("preprocess", lambda item: (item[0], self._preprocess(item[1]))),
                  ("infer", lambda item: (item[0], self._infer(item[1]))),
                  ("postprocess", lambda item: (item[0], self._finish(item[1])))]
        if then is not None:
            stages.append(("render", lambda item: then(*item)))
        return Pipeline(produce, stages, depth=depth, in_flight=2 if source.live else None, stop=stop)

    def _begin(self, image: np.ndarray, stamp: int | None, frame_id: str | None) -> _Job:
        """Number the frame and choose its model, swapping first if a version is pending."""
        start = time.perf_counter()
        _check_frame(image)
        with self._lock:
            if self._closed:
                raise CissError("this Segmenter is closed")
            swapped_from = self._swap(start) if self._pending is not None else None
            model = self._model
            self._users[model] += 1
            self._last_frame = image
            seq, self._seq = self._seq, self._seq + 1
            idle = self._idle_retired()
            job = _Job(image, model, seq, list(self._new_classes), start, stamp, frame_id, swapped_from)
            warning = None if self._aspect_warned else model.aspect_warning(image.shape[:2])
            self._aspect_warned |= warning is not None
        if warning:
            self._log(warning)
        for old in idle:
            old.close()
        return job

    def _preprocess(self, job: _Job) -> _Job:
        t = time.perf_counter()
        job.x = job.model.preprocess(job.image)
        job.timings["preprocess"] = 1e3 * (time.perf_counter() - t)
        return job

    def _infer(self, job: _Job) -> _Job:
        t = time.perf_counter()
        job.outputs, job.x = job.model.backend.infer(job.x), None
        job.timings["infer"] = 1e3 * (time.perf_counter() - t)
        return job

    def _finish(self, job: _Job) -> Result:
        """Post-process (at frame size) into the Result; the frame no longer holds its model."""
        model = job.model
        try:
            t = time.perf_counter()
            assert job.outputs is not None
            mask, confidence = model.postprocess(job.outputs, job.image.shape[:2])
            job.timings["postprocess"] = 1e3 * (time.perf_counter() - t)
        finally:
            self._release(model)
        job.timings["total"] = 1e3 * (time.perf_counter() - job.start)
        result = Result(mask, confidence, model.classmap, model.version, job.seq, job.timings, job.new_classes,
                        model.unlearned, model.backend.name, job.stamp, job.frame_id)
        if job.swapped_from is not None and self._on_swap is not None:
            self._on_swap(job.swapped_from, model.version)
        return result

    def _release(self, model: Model) -> None:
        with self._lock:
            self._users[model] -= 1
            idle = self._idle_retired()
        for old in idle:
            old.close()

    def _idle_retired(self) -> list[Model]:
        """Retired models no frame uses any more, taken off the list for closing (caller holds the lock)."""
        idle = [m for m in self._retired if self._users[m] <= 0]
        for m in idle:
            self._retired.remove(m)
            del self._users[m]
        return idle

    def _swap(self, start: float) -> int:
        """Make the pending model the serving one (caller holds the lock); returns the retired version."""
        assert self._pending is not None
        (new, stats), old = self._pending, self._model
        self._model, self._pending = new, None
        self._retired.append(old)
        self._pending_ready.clear()
        self._new_classes = list(range(len(old.classmap), len(new.classmap)))
        stats.update(previous=old.version, seq=self._seq, new_classes=self._new_classes, backend=new.backend.name,
                     swap_ms=1e3 * (time.perf_counter() - start))
        self._swaps.append(stats)
        self._log(f"swapped to version {new.version} at frame {self._seq} (was {old.version}; "
                  f"+{len(self._new_classes)} classes; load {stats['load_s']:.2f} s, "
                  f"warm-up {stats['warmup_s']:.2f} s)")
        if new.warning:
            self._log(f"version {new.version}: {new.warning}")
        return old.version

    # --- hooks for HotSwap --------------------------------------------------------------------------
    def _models(self) -> list[Model]:
        """The serving model and the pending one: a candidate must extend both, since either may be
        serving when it is swapped in."""
        with self._lock:
            return [self._model] + ([self._pending[0]] if self._pending else [])

    def _offer(self, model: Model, stats: dict[str, Any]) -> None:
        with self._lock:
            closed, replaced = self._closed, self._pending
            if not closed:
                self._pending = (model, stats)
                self._pending_ready.set()
        if closed:
            model.close()
        elif replaced is not None:
            self._log(f"version {model.version} replaces version {replaced[0].version}, which never served")
            replaced[0].close()

    # --- control and state --------------------------------------------------------------------------
    def check_updates(self) -> int | None:
        """Look for a newer version now, in this thread (what the watcher does on each event or poll);
        returns the version parked for the next frame, or None. Refusals go to on_error as usual."""
        return self._swapper.check() if self._swapper is not None else None

    def wait_for_pending(self, timeout: float) -> bool:
        """True once a checked version waits for the next frame; False after `timeout` seconds."""
        return self._pending_ready.wait(timeout)

    def unserved(self) -> int | None:
        """The newest version published after the serving one that has served no frame yet (parked for
        the next frame, or not checked yet), or None; a source that ends before then never shows it."""
        with self._lock:
            serving = self._model.version
            pending = [self._pending[0].version] if self._pending else []
        published = self._swapper.candidates(serving) if self._swapper is not None else []
        return max(pending + published, default=None)

    @property
    def version(self) -> int:
        return self._model.version

    @property
    def classmap(self) -> ClassMap:
        return self._model.classmap

    @property
    def backend(self) -> str:
        return self._model.backend.name

    @property
    def swaps(self) -> list[dict[str, Any]]:
        """One record per swap: version, previous, seq (its first frame), new_classes, backend, and
        verify_s, load_s, warmup_s, validate_s (off the frame path) and swap_ms (on it)."""
        with self._lock:
            return [dict(s) for s in self._swaps]

    def close(self) -> None:
        """Stop following the repository and release the models (close or finish any stream first)."""
        if self._swapper is not None:
            self._swapper.close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            models = [self._model, *self._retired] + ([self._pending[0]] if self._pending else [])
            self._pending, self._retired = None, []
        for model in models:
            model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

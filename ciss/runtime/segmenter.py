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

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.manifest import ModelManifest
from ciss.repository import ModelRepository
from ciss.runtime.backends import BackendFactory, check_backend, keep_large_blocks_mapped
from ciss.runtime.hotswap import HotSwap, prepare
from ciss.runtime.log import LOGGER, Log
from ciss.runtime.model import Model, Result
from ciss.runtime.settings import LIVE
from ciss.runtime.sources import Frame, Source
from ciss.runtime.stages import Pipeline
from ciss.sizes import DEFAULT_RESIZE, check_resize


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


class _ServingState:
    """What the frame path and the watcher thread share: the serving model, the one-slot `pending`,
    the last frame. HotSwap sees it as a ciss.runtime.hotswap.Serving; the Segmenter holds `lock`
    for everything else a frame touches too (seq, users, retired models)."""

    def __init__(self, model: Model, log: Log):
        self.lock = threading.Lock()
        self.model = model
        self.pending: tuple[Model, dict[str, Any]] | None = None
        self.pending_ready = threading.Event()
        self.frame: np.ndarray | None = None
        self.closed = False
        self._log = log

    def models(self) -> list[Model]:
        """The serving model and the pending one: a candidate must extend both, since either may be
        serving when it is swapped in."""
        with self.lock:
            return [self.model] + ([self.pending[0]] if self.pending else [])

    def last_frame(self) -> np.ndarray | None:
        return self.frame

    def offer(self, model: Model, stats: dict[str, Any]) -> None:
        """Park a prepared model for the next frame, replacing (and closing) one that never served."""
        with self.lock:
            closed, replaced = self.closed, self.pending
            if not closed:
                self.pending = (model, stats)
                self.pending_ready.set()
        if closed:
            model.close()
        elif replaced is not None:
            self._log(f"version {model.version} replaces version {replaced[0].version}, which never served")
            replaced[0].close()


class Segmenter:
    """Segments frames with the serving version of a model and swaps to newer ones between frames."""

    def __init__(self, model: Model, *, on_swap: Callable[[int, int], None] | None = None, log: Log = LOGGER.info):
        self._state = _ServingState(model, log)
        self._lock = self._state.lock      # the serving model, pending, seq, users
        self._serial = threading.Lock()    # plain calls run one at a time, as robot code expects
        self._users: Counter[Model] = Counter()  # frames in flight per model
        self._retired: list[Model] = []    # swapped out, closed once no frame in flight uses them
        self._seq = 0
        self._new_classes: list[int] = []
        self._swaps: list[dict[str, Any]] = []
        self._on_swap = on_swap
        self._log = log
        self._swapper: HotSwap | None = None
        self._aspect_warned = False  # the stretch warning is said once, not on every frame

    @classmethod
    def from_repository(cls, repo: Path | str, name: str, backend: str | BackendFactory = "auto",
                        version: int | None = None, watch: bool = True,
                        poll_s: float = LIVE.default("live.poll_s"), threads: int = 0,
                        resize: str = DEFAULT_RESIZE,
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
        ratio and pads, "stretch" fills the input (ciss.sizes). `backend` is a kind name
        (ciss.runtime.settings.KINDS) or a BackendFactory, which then loads every version served.
        """
        check_backend(backend)
        check_resize(resize)
        if not (math.isfinite(poll_s) and poll_s > 0):  # 0 would re-check the repository in a busy loop
            raise CissError(f"--poll {poll_s:g} is not a positive number of seconds; give e.g. --poll 0.5")
        if threads < 0:
            raise CissError(f"--threads {threads} is negative; give 0 (the backend's default) or more")
        log = log or LOGGER.info
        root = Path(repo)
        if not root.is_dir():
            raise CissError(f"model repository {root} does not exist; publish a model with "
                            f"`ciss export --repo {root} --name {name}`")
        repository = ModelRepository(root)
        path = repository.path(name, version)

        def load(version_dir: Path, manifest: ModelManifest) -> Model:
            return Model.load(version_dir, manifest, backend, threads, log, resize)

        if version is None:  # models will be retired: their memory must go back to the system
            keep_large_blocks_mapped()
        model, _ = prepare(path, [], load, frame=None)
        segmenter = cls(model, on_swap=on_swap, log=log)
        following = "pinned"
        if version is None:
            swapper = segmenter._swapper = HotSwap(repository.root / name, segmenter._state, load=load,
                                                   on_error=on_error, log=log, poll_s=poll_s)
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
        state = self._state
        with self._lock:
            if state.closed:
                raise CissError("this Segmenter is closed")
            swapped_from = self._swap(start) if state.pending is not None else None
            model = state.model
            self._users[model] += 1
            state.frame = image
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
        state = self._state
        assert state.pending is not None
        (new, stats), old = state.pending, state.model
        state.model, state.pending = new, None
        self._retired.append(old)
        state.pending_ready.clear()
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

    # --- control and state --------------------------------------------------------------------------
    def check_updates(self) -> int | None:
        """Look for a newer version now, in this thread (what the watcher does on each event or poll);
        returns the version parked for the next frame, or None. Refusals go to on_error as usual."""
        return self._swapper.check() if self._swapper is not None else None

    def wait_for_pending(self, timeout: float) -> bool:
        """True once a checked version waits for the next frame; False after `timeout` seconds."""
        return self._state.pending_ready.wait(timeout)

    def unserved(self) -> int | None:
        """The newest version published after the serving one that has served no frame yet (parked for
        the next frame, or not checked yet), or None; a source that ends before then never shows it."""
        with self._lock:
            serving = self._state.model.version
            pending = [self._state.pending[0].version] if self._state.pending else []
        published = self._swapper.candidates(serving) if self._swapper is not None else []
        return max(pending + published, default=None)

    @property
    def version(self) -> int:
        return self._state.model.version

    @property
    def classmap(self) -> ClassMap:
        return self._state.model.classmap

    @property
    def backend(self) -> str:
        return self._state.model.backend.name

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
        state = self._state
        with self._lock:
            if state.closed:
                return
            state.closed = True
            models = [state.model, *self._retired] + ([state.pending[0]] if state.pending else [])
            state.pending, self._retired = None, []
        for model in models:
            model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

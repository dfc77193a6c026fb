"""Following a model's repository folder and preparing each new version off the frame path.

The protocol is DeepStream's on-the-fly model update (runtime.md §2.3) as adapted in §6.3: a
background thread notices a new version, checks it (manifest and sha256s, a class map that only
appends), loads it, warms it up and validates its outputs on the last live frame, then parks it in
the Segmenter's one-slot `pending`; the frame loop swaps to it between two frames. A version that
fails any step never serves: the error goes to `on_error` (to the log when there is none), the
old model keeps serving, and the version is not tried again unless its files change (a copy that was still being
written), while any later version still is.

New versions are noticed through inotify where Linux offers it (IN_MOVED_TO is the rename that
publishes a version, docs/formats.md), called through ctypes so nothing needs installing, and by
polling every `poll_s` seconds either way: a watch can miss events (a folder removed and created
again), and polling is all there is elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ciss.errors import CissError
from ciss.manifest import ModelManifest
from ciss.repository import MANIFEST, first_difference, verify_version
from ciss.runtime.log import Log
from ciss.runtime.model import Model

WARMUP_RUNS = 3
IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x008, 0x080, 0x100
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len, then len bytes of name
_VERSION = re.compile(r"[1-9][0-9]*")
Load = Callable[[Path, ModelManifest], Model]


class Serving(Protocol):
    """The side that serves frames (a Segmenter's state), as HotSwap sees it."""

    def models(self) -> list[Model]:
        """The serving model and any pending one: a new version must extend them all."""
        ...

    def last_frame(self) -> np.ndarray | None:
        """The latest live frame, to warm up and validate on (None before the first)."""
        ...

    def offer(self, model: Model, stats: dict[str, Any]) -> None:
        """Park a prepared model for the next frame."""
        ...


class PollingWatch:
    """No notifications: `wait` just sleeps (the caller polls)."""

    mode = "polling"

    def __init__(self) -> None:
        self._woken = threading.Event()

    def wait(self, timeout: float) -> bool:
        self._woken.wait(timeout)
        return False

    def wake(self) -> None:
        self._woken.set()

    def close(self) -> None:
        self.wake()


class InotifyWatch:
    """inotify(7) on one folder; a pipe wakes `wait` early when the watcher is closed."""

    mode = "inotify"

    def __init__(self, folder: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        self.folder = folder
        self._wd = -1
        self._wake_r, self._wake_w = os.pipe()
        self._add()

    def _add(self) -> None:
        """Watch the folder if it exists and is not watched yet (it may appear, or be replaced, later)."""
        if self._wd < 0 and self.folder.is_dir():
            self._wd = self._add_watch(self._fd, os.fsencode(self.folder), IN_MOVED_TO | IN_CREATE | IN_CLOSE_WRITE)

    def wait(self, timeout: float) -> bool:
        """True as soon as an entry that may be a version (not a dot folder) appears; else False
        after `timeout` seconds or when woken."""
        self._add()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._fd, self._wake_r], [], [], left)
            if not ready or self._wake_r in ready:
                return False
            if self._drain():
                return True
        return False

    def _drain(self) -> bool:
        found = False
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & IN_IGNORED:  # the folder itself went away; _add watches it again if it returns
                    self._wd = -1
                found |= bool(mask & IN_Q_OVERFLOW) or (bool(name) and not name.startswith(b"."))

    def wake(self) -> None:
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._fd, self._wake_r, self._wake_w):
            os.close(fd)


def watch_folder(folder: Path, inotify: bool = True) -> InotifyWatch | PollingWatch:
    """inotify where Linux and libc provide it (and the per-user instance limit allows), else polling."""
    if inotify and sys.platform.startswith("linux"):
        try:
            return InotifyWatch(folder)
        except (OSError, AttributeError):
            pass
    return PollingWatch()


def _placeholder(manifest: ModelManifest) -> np.ndarray:
    """A grey frame at the model's own size, for checks made before any live frame was seen."""
    spec = manifest.input
    h, w = (spec and (spec.size or spec.example_size)) or (240, 320)
    return np.full((int(h), int(w), 3), 127, np.uint8)


def validate(model: Model, frame: np.ndarray) -> None:
    """Refuse outputs the frame loop could not use: shapes that do not follow the input, a mask
    that is not uint8/uint16 at frame size, or ids beyond the class map."""
    x = model.preprocess(frame)
    outputs = model.backend.infer(x)
    hw, n = tuple(x.shape[2:]), len(model.classmap)
    if "mask" not in outputs and "logits" not in outputs:
        raise CissError(f"it outputs {', '.join(outputs)}, and neither mask nor logits")
    expected = {"mask": (1, *hw), "confidence": (1, *hw), "logits": (1, n, *hw)}
    for name, shape in expected.items():
        if name in outputs and outputs[name].shape != shape:
            raise CissError(f"its {name} output has shape {list(outputs[name].shape)} for an input of "
                            f"{hw[0]}x{hw[1]}; expected {list(shape)}")
    mask, confidence = model.postprocess(outputs, frame.shape[:2])
    if mask.dtype not in (np.uint8, np.uint16):
        raise CissError(f"its mask is {mask.dtype}, not uint8 or uint16")
    if mask.size and int(mask.max()) >= n:
        raise CissError(f"its mask holds class id {int(mask.max())} but its class map has only {n} classes")
    if confidence is not None and not np.all((confidence >= 0) & (confidence <= 1)):
        raise CissError("its confidence holds values outside [0, 1]")


def prepare(path: Path, serving: list[Model], load: Load, frame: np.ndarray | None) -> tuple[Model, dict[str, Any]]:
    """Verify, load, warm up and validate the version in `path` (runtime.md §6.3 step 3); returns the
    ready model and how long each stage took. Its class map must extend every model in `serving`.
    Warm-up matters most on GPUs, where the first runs cost up to seconds (§4.2, §6.2)."""
    t0 = time.perf_counter()
    manifest = verify_version(path)
    classmap = manifest.classes
    for old in serving:
        if not classmap.is_extension_of(old.classmap):
            raise CissError(f"its class map does not extend version {old.version}'s "
                            f"({first_difference(classmap, old.classmap)}); a version may only append classes")
    t1 = time.perf_counter()
    model = load(path, manifest)
    t2 = time.perf_counter()
    try:
        frame = _placeholder(manifest) if frame is None else frame
        for _ in range(WARMUP_RUNS):
            model.run(frame)
        t3 = time.perf_counter()
        validate(model, frame)
    except BaseException:
        model.close()
        raise
    t4 = time.perf_counter()
    return model, {"version": model.version, "verify_s": t1 - t0, "load_s": t2 - t1, "warmup_s": t3 - t2,
                   "validate_s": t4 - t3}


def _fingerprint(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of everything in a version folder."""
    entries = []
    try:
        for p in folder.rglob("*"):
            s = p.stat()
            entries.append((str(p.relative_to(folder)), s.st_size, s.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(entries))


class HotSwap:
    """Finds, checks and prepares new versions of one model for `serving` (see the module docstring),
    loading each with `load`."""

    def __init__(self, folder: Path, serving: Serving, *, load: Load, on_error: Callable[[Exception], None] | None,
                 log: Log, poll_s: float, inotify: bool = True):
        self.folder = Path(folder)
        self._serving, self._load = serving, load
        self._on_error, self._log = on_error, log
        self._poll_s, self._inotify = poll_s, inotify
        self._refused: dict[int, tuple[tuple[str, int, int], ...]] = {}
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: InotifyWatch | PollingWatch | None = None
        self._thread: threading.Thread | None = None

    @property
    def watch_mode(self) -> str:
        return self._watch.mode if self._watch is not None else "off"

    def start(self) -> None:
        self._watch = watch_folder(self.folder, self._inotify)
        self._thread = threading.Thread(target=self._run, name=f"ciss-hotswap-{self.folder.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._watch is not None
        while not self._stop.is_set():
            self._watch.wait(self._poll_s)  # an event or the poll interval: check either way
            if not self._stop.is_set():
                self.check()

    def candidates(self, floor: int) -> list[int]:
        """Version folders above `floor` with a manifest, less refused ones whose files have not changed."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        found = [int(n) for n in names if _VERSION.fullmatch(n) and int(n) > floor
                 and (self.folder / n / MANIFEST).is_file()]
        return [v for v in found if v not in self._refused or self._refused[v] != _fingerprint(self.folder / str(v))]

    def check(self) -> int | None:
        """Prepare the newest untried version above the serving (and pending) one and offer it;
        returns its number, or None when there is none or it was refused. One check runs at a time;
        a version published meanwhile waits for the next."""
        with self._check_lock:
            serving = self._serving.models()
            candidates = self.candidates(max(m.version for m in serving))
            if not candidates:
                return None
            version = max(candidates)
            path = self.folder / str(version)
            fingerprint = _fingerprint(path)  # before loading: a copy finishing meanwhile counts as a change
            try:
                model, stats = prepare(path, serving, self._load, self._serving.last_frame())
            except Exception as e:  # noqa: BLE001 - whatever a bad version makes a library raise
                self._refused[version] = fingerprint
                self._refuse(version, e, serving[0].version)
                return None
            self._serving.offer(model, stats)
            return version

    def _refuse(self, version: int, e: Exception, serving: int) -> None:
        detail = str(e) if isinstance(e, CissError) else f"{type(e).__name__}: {e}"
        error = CissError(f"model '{self.folder.name}' version {version} refused: {detail}; "
                          f"still serving version {serving}")
        error.__cause__ = e
        if self._on_error is None:  # a caller that takes the error reports it (said once, not twice)
            self._log(str(error))
        else:
            try:
                self._on_error(error)
            except Exception as callback_error:  # noqa: BLE001 - a failing callback must not stop the watcher
                self._log(f"on_error callback raised {type(callback_error).__name__}: {callback_error}")

    def close(self) -> None:
        """Stop the thread (after a check in progress finishes) and the watch."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._watch is not None:
            self._watch.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()  # (from the thread itself, e.g. an on_error callback, it ends after this check)
        if self._watch is not None:
            self._watch.close()

"""Frame sources for `ciss live`: cameras, network streams, video files, images and the synthetic scene.

Two kinds, because they need opposite behaviour (runtime.md §0 item 9, §7):
* live sources (camera, rtsp/http URL) produce frames whether or not anyone is ready for them, so a
  capture thread keeps only the newest one and counts the ones it overwrote; a FIFO would grow the
  end-to-end latency without bound behind a slower model;
* ordered sources (video file, images, synthetic) hand out every frame exactly once, in order,
  because nothing is lost by waiting for the consumer.
Only numpy and OpenCV are imported: robots running the runtime have no torch.
"""

from __future__ import annotations

import glob
import math
import os
import re
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

from ciss.errors import CissError
from ciss.runtime.log import LOGGER, Log
from ciss.synthetic import SyntheticStream

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})
URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
_CAMERA = re.compile(r"(?:camera:|/dev/video)?(\d+)")
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Frame:
    image: np.ndarray  # BGR uint8 HxWx3
    index: int  # position in the source, dropped frames included, so gaps show drops
    time: float  # time.monotonic() when the frame was captured (latency = now - time)
    stamp: int | None = None  # header stamp (ns since the epoch) of a ROS message, carried to every sink
    frame_id: str | None = None  # header frame_id of a ROS message
    name: str | None = None  # the source image's name (image folders): names its mask file and its stats line


class Source(ABC):
    """A stream of Frames; read() returns None at the end. Use as a context manager to close it."""

    live: bool = False
    fps: float | None = None
    topic: str | None = None  # the ROS topic of a recording, which names the topics of its outputs

    def __init__(self, name: str):
        self.name = name
        self._read = 0
        self._dropped = 0
        self._reconnects = 0

    @abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None when the source has ended."""

    def close(self) -> None:
        """Release the device or file; read() afterwards returns None."""

    @property
    def stats(self) -> dict[str, int]:
        return {"frames_read": self._read, "dropped": self._dropped, "reconnects": self._reconnects}

    def describe(self) -> str:
        return self.name

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's and FFmpeg's own WARN/ERROR lines while opening a device, URL, file or writer.

    A missing camera makes OpenCV print several lines from each backend it tries (runtime.md §0
    item 11); the CissError says the same in one line. OpenCV reads OPENCV_FFMPEG_LOGLEVEL at every
    FFmpeg open (-8 is AV_LOG_QUIET). A user who set OPENCV_VIDEOIO_DEBUG wants the noise, so it stays.
    """
    if os.environ.get("OPENCV_VIDEOIO_DEBUG"):
        yield
        return
    level = cv2.utils.logging.getLogLevel()
    ffmpeg = os.environ.get("OPENCV_FFMPEG_LOGLEVEL")
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    os.environ["OPENCV_FFMPEG_LOGLEVEL"] = "-8"
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)
        if ffmpeg is None:
            os.environ.pop("OPENCV_FFMPEG_LOGLEVEL", None)
        else:
            os.environ["OPENCV_FFMPEG_LOGLEVEL"] = ffmpeg


def _fps_of(cap: cv2.VideoCapture) -> float | None:
    """CAP_PROP_FPS is 0 or NaN for many streams (runtime.md §7): None then, not a made-up 30."""
    fps = cap.get(cv2.CAP_PROP_FPS)
    return fps if math.isfinite(fps) and fps > 0 else None


class _Pacer:
    """Holds an ordered source to `fps` (None: as fast as the consumer reads)."""

    def __init__(self, fps: float | None):
        if fps is not None and not fps > 0:
            raise CissError(f"fps must be a positive number, not {fps}")
        self._period = 1.0 / fps if fps else 0.0
        self._due = 0.0

    def wait(self) -> None:
        if not self._period:
            return
        now = time.monotonic()
        due = max(self._due, now)  # a consumer that fell behind gets no burst of catch-up frames
        if due > now:
            time.sleep(due - now)
        self._due = due + self._period


# --- ordered sources -----------------------------------------------------------------------------

class VideoFileSource(Source):
    """Every frame of a video file in order; `loop` starts again at the end (by reopening, which is
    exact for every codec, unlike seeking to frame 0)."""

    def __init__(self, path: Path, loop: bool = False, fps: float | None = None):
        super().__init__(f"video {path}")
        self.path, self.loop = path, loop
        self._pacer = _Pacer(fps)
        cap, first = self._open()
        self._cap: cv2.VideoCapture | None = cap
        self._first: np.ndarray | None = first  # read by _open to prove the file decodes
        self.fps = fps or _fps_of(cap)
        self._size = (first.shape[1], first.shape[0])
        self._count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))

    def _open(self) -> tuple[cv2.VideoCapture, np.ndarray]:
        with quiet_opencv():
            cap = cv2.VideoCapture(str(self.path))
            ok, first = cap.read() if cap.isOpened() else (False, None)
        if not ok:
            cap.release()
            raise CissError(f"cannot read {self.path} as a video (not a video, unsupported codec, "
                            "or no permission)")
        return cap, first

    def read(self) -> Frame | None:
        if self._cap is None:
            return None
        self._pacer.wait()
        image, self._first = self._first, None
        if image is None:
            ok, image = self._cap.read()
            if not ok:
                if not self.loop:
                    return None
                self._cap.release()
                self._cap, image = self._open()
        frame = Frame(image, self._read, time.monotonic())
        self._read += 1
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> str:
        details = [f"{self._size[0]}x{self._size[1]}", f"{self.fps:g} fps" if self.fps else "fps unknown"]
        details += [f"{self._count} frames"] if self._count > 0 else []
        details += ["looped"] if self.loop else []
        return f"{self.name} ({', '.join(details)})"


class ImageSource(Source):
    """Image files in the given order (open_source sorts them); a file that does not decode is an
    error, not a silent skip, so a dataset with a broken image is noticed."""

    def __init__(self, paths: list[Path], name: str, loop: bool = False, fps: float | None = None):
        super().__init__(name)
        if not paths:
            raise CissError(f"no images in {name}")
        self.paths, self.loop = paths, loop
        stems = [p.stem for p in paths]  # a.jpg and a.png in one folder keep their suffix apart
        self.names = stems if len(set(stems)) == len(stems) else [p.name for p in paths]
        self.fps = fps
        self._pacer = _Pacer(fps)
        self._closed = False

    def read(self) -> Frame | None:
        if self._closed or (self._read >= len(self.paths) and not self.loop):
            return None
        self._pacer.wait()
        path = self.paths[self._read % len(self.paths)]
        try:
            data = np.fromfile(path, np.uint8)  # imread cannot say why it failed; this separates I/O errors
        except OSError as e:
            raise CissError(f"cannot read image {path}: {e.strerror}") from None
        with quiet_opencv():
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is None:
            raise CissError(f"cannot decode image {path}: not an image or corrupt")
        frame = Frame(image, self._read, time.monotonic(), name=self.names[self._read % len(self.paths)])
        self._read += 1
        return frame

    def close(self) -> None:
        self._closed = True

    def describe(self) -> str:
        return f"{len(self.paths)} images in {self.name}{', looped' if self.loop else ''}"


class SyntheticSource(Source):
    """The trainer's synthetic scene as a camera stand-in for demos: paced like a camera but never
    dropping, so dropped-frame counts in a demo are the runtime's own."""

    def __init__(self, fps: float = 30.0, height: int = 240, width: int = 320, seed: int = 0):
        super().__init__("synthetic")
        self._pacer = _Pacer(fps)
        self._stream = SyntheticStream(height=height, width=width, seed=seed, fps=fps)
        self.fps = fps

    def read(self) -> Frame | None:
        self._pacer.wait()
        image, _ = self._stream.read()
        frame = Frame(image, self._read, time.monotonic())
        self._read += 1
        return frame

    def describe(self) -> str:
        return f"synthetic scene {self._stream.width}x{self._stream.height} at {self.fps:g} fps"


# --- live sources --------------------------------------------------------------------------------

class Producer(Protocol):
    """What a capture thread reads from: a camera, a stream, or anything else that makes frames."""

    def read(self) -> np.ndarray | None:
        """The next frame; None when the stream failed."""

    def reopen(self) -> bool:
        """Connect again after a failure; True when it worked."""

    def release(self) -> None: ...


class VideoCaptureProducer:
    """A cv2.VideoCapture that can be reopened with the arguments and settings it was made with."""

    def __init__(self, target: int | str, api: int = cv2.CAP_ANY, params: tuple[int, ...] = (),
                 settings: dict[int, float] | None = None):
        self._args = (target, api, list(params))
        self._settings = settings or {}
        self._cap = self._open()

    def _open(self) -> cv2.VideoCapture:
        with quiet_opencv():
            cap = cv2.VideoCapture(*self._args)
        for prop, value in self._settings.items():
            cap.set(prop, value)  # a request: the driver may choose another value
        return cap

    @property
    def opened(self) -> bool:
        return self._cap.isOpened()

    @property
    def fps(self) -> float | None:
        return _fps_of(self._cap)

    def read(self) -> np.ndarray | None:
        ok, image = self._cap.read()
        return image if ok else None

    def reopen(self) -> bool:
        self._cap.release()
        self._cap = self._open()
        return self._cap.isOpened()

    def release(self) -> None:
        self._cap.release()


class LiveSource(Source):
    """A capture thread over any Producer with a one-slot latest-frame buffer (runtime.md §7).

    The first frame is read here, so a device that opens but delivers nothing fails at start-up.
    A failure later is retried with exponential backoff (`backoff` = first and longest wait), each
    step reported through `log`; after `give_up_s` without a frame, read() raises CissError. With
    `reconnect=False` a lost stream simply ends. An unread frame overwritten by a newer one, or
    left unread at close, counts as dropped, so dropped + frames_read == captured.
    """

    live = True

    def __init__(self, producer: Producer, name: str, *, fps: float | None = None, reconnect: bool = True,
                 give_up_s: float = 30.0, backoff: tuple[float, float] = (0.5, 8.0), log: Log = LOGGER.info):
        super().__init__(name)
        self.fps = fps
        self._producer, self._reconnect, self._give_up_s, self._backoff, self._log = (
            producer, reconnect, give_up_s, backoff, log)
        first = self._grab()
        if first is None:
            producer.release()
            raise CissError(f"{name} opened but delivered no frame (in use by another program, or not a "
                            "video device?)")
        self._size = (first.shape[1], first.shape[0])
        self._cond = threading.Condition()
        self._slot: Frame | None = Frame(first, 0, time.monotonic())
        self._captured = 1
        self._ended = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture {name}", daemon=True)
        self._thread.start()

    def _grab(self) -> np.ndarray | None:
        try:
            return self._producer.read()
        except (cv2.error, OSError) as e:  # a failed read, handled like one
            self._log(f"{self.name}: read failed: {e}")
            return None

    def _publish(self, image: np.ndarray) -> None:
        with self._cond:
            if self._stop.is_set():  # close() already settled the counts
                return
            if self._slot is not None:
                self._dropped += 1
            self._slot = Frame(image, self._captured, time.monotonic())
            self._captured += 1
            self._cond.notify()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                image = self._grab()
                if image is None:
                    image = self._recover()
                    if image is None:
                        break
                self._publish(image)
        except BaseException as e:  # noqa: BLE001 - a bug: the consumer re-raises it instead of waiting forever
            self._error = e
        finally:
            self._producer.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _recover(self) -> np.ndarray | None:
        """Reopen with backoff until a frame comes; None to stop (closing, gave up, or no reconnect)."""
        if not self._reconnect:
            self._log(f"{self.name}: stream lost; ending (reconnect is off)")
            return None
        lost = time.monotonic()
        delay, attempt = self._backoff[0], 0
        self._log(f"{self.name}: stream lost; reconnecting")
        while True:
            left = self._give_up_s - (time.monotonic() - lost)
            if left <= 0:
                self._error = CissError(f"{self.name}: stream lost and not back after {self._give_up_s:g} s "
                                        f"({attempt} reconnect attempts); gave up")
                self._log(f"{self.name}: giving up after {attempt} reconnect attempts")
                return None
            if self._stop.wait(min(delay, left)):
                return None
            attempt += 1
            image = self._grab() if self._producer.reopen() else None
            if image is not None:
                self._reconnects += 1
                self._log(f"{self.name}: reconnected after {time.monotonic() - lost:.1f} s "
                          f"(attempt {attempt})")
                return image
            delay = min(delay * 2, self._backoff[1])
            self._log(f"{self.name}: reconnect attempt {attempt} failed; next in {delay:g} s")

    def read(self) -> Frame | None:
        """The newest frame not yet returned; blocks until one comes (also while reconnecting)."""
        with self._cond:
            while self._slot is None and not self._ended:
                self._cond.wait()
            frame, self._slot = self._slot, None
            if frame is not None:
                self._read += 1
                return frame
        if self._error is not None and not self._stop.is_set():
            raise self._error
        return None

    def close(self) -> None:
        """Stop the thread (it releases the producer itself, so a release never races a read)."""
        self._stop.set()
        with self._cond:
            if self._slot is not None:
                self._dropped += 1
                self._slot = None
            self._ended = True
            self._cond.notify_all()
        self._thread.join(timeout=2.0)

    @property
    def stats(self) -> dict[str, int]:
        return {**super().stats, "captured": self._captured}

    def describe(self) -> str:
        fps = f"{self.fps:g} fps" if self.fps else "fps unknown"
        return f"{self.name} ({self._size[0]}x{self._size[1]}, {fps}, live: newest frame kept, older dropped)"


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _camera(index: int, fps: float | None) -> VideoCaptureProducer:
    producer = VideoCaptureProducer(index, settings={cv2.CAP_PROP_FPS: fps} if fps else None)
    if not producer.opened:
        hint = "ls /dev/video*" if sys.platform.startswith("linux") else "is another program using it?"
        raise CissError(f"no camera at index {index}: OpenCV could not open it (is it connected? {hint})")
    return producer


def _stream(url: str, timeout_s: float) -> VideoCaptureProducer:
    ms = int(timeout_s * 1000)
    # Both timeouts bound the waits on a dead host: the open, and each read once streaming (§7).
    producer = VideoCaptureProducer(url, cv2.CAP_FFMPEG,
                                    (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms))
    if not producer.opened:
        raise CissError(f"cannot open stream {_redact(url)}: unreachable, wrong path or credentials, or "
                        f"not a video stream (waited up to {timeout_s:g} s)")
    return producer


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_source(spec: str, *, loop: bool = False, fps: float | None = None, reconnect: bool = True,
                give_up_s: float = 30.0, timeout_s: float = 5.0, log: Log = LOGGER.info, topic: str | None = None,
                realtime: bool = False) -> Source:
    """The source `spec` names; every mistake is a one-line CissError.

    spec: "camera:N", "N" or "/dev/videoN" (camera N); "synthetic"; an rtsp/http(s) URL; a folder
    (its images, sorted by name); a glob with * ? [ (matching files, sorted); an image file; a video
    file. `loop` restarts files and images at the end. `fps` paces ordered sources (synthetic: 30
    when not given; files: as fast as read when not given) and is requested from cameras.
    `reconnect`, `give_up_s` and `log` apply to live sources; `timeout_s` bounds URL opens and reads.
    A ROS recording (.mcap, .db3, .bag, or a folder of them; the ros extra) is read from its image
    topic `topic` (needed when it has several), in order or, with `realtime`, at its recorded rate.
    """
    from ciss.runtime import ros  # imports nothing of the ros extra until a recording is opened

    path = Path(spec).expanduser()
    if not spec.lower().startswith(URL_SCHEMES) and ros.is_recording(path):
        ros.require_extra(f"reading {path.name}")
        if fps is not None:
            raise CissError("--fps does not apply to recordings: they play as fast as they run, or with "
                            "--realtime at their recorded rate")
        return ros.RecordingSource(path, topic, realtime=realtime, loop=loop)
    if topic is not None or realtime:
        raise CissError("--topic and --realtime apply to ROS recordings (.mcap, .db3, .bag) only")
    camera = _CAMERA.fullmatch(spec.strip())
    if camera or spec.lower().startswith(URL_SCHEMES):
        producer = _camera(int(camera.group(1)), fps) if camera else _stream(spec, timeout_s)
        name = f"camera {camera.group(1)}" if camera else _redact(spec)
        return LiveSource(producer, name, fps=producer.fps, reconnect=reconnect, give_up_s=give_up_s, log=log)
    if spec == "synthetic":
        return SyntheticSource(fps=30.0 if fps is None else fps)
    if path.is_dir():
        return ImageSource(_images_in(path), f"folder {path}", loop, fps)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return ImageSource([path], f"image {path}", loop, fps)
        return VideoFileSource(path, loop, fps)
    if _GLOB.search(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)) if os.path.isfile(p))
        if not files:
            raise CissError(f"no files match {spec!r}")
        return ImageSource(files, f"glob {spec!r}", loop, fps)
    raise CissError(f"no such file or folder: {spec} (sources: camera:N, synthetic, rtsp:// or http(s):// "
                    "URL, video file, image folder, or glob)")

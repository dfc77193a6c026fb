"""ROS recordings in and out of `ciss live`: image topics of bag files as a Source, and each frame's
mask, overlay and class map as an MCAP bag that replays next to the original in Foxglove or RViz.

The libraries are the `ros` extra, pure Python and imported only when a recording is used, so the
core runtime install stays small and needs no ROS installation: rosbags reads ROS 1 bags and ROS 2
bags (MCAP, SQLite) and (de)serialises messages, rosbags-image turns sensor_msgs images into OpenCV
arrays (encodings, bayer, byte order), and foxglove-sdk writes the MCAP output.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import cv2
import numpy as np

from ciss.errors import CissError
from ciss.runtime.model import Result
from ciss.runtime.sinks import check_target
from ciss.runtime.sources import Frame, Source

if TYPE_CHECKING:
    from rosbags.interfaces import Connection
    from rosbags.typesys.store import Typestore

RECORDING_SUFFIXES = frozenset({".mcap", ".db3", ".bag"})
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
STRING = "std_msgs/msg/String"
INSTALL = 'pip install "ciss[ros]"'
_MODULES = ("rosbags", "rosbags.image", "foxglove")


def require_extra(what: str) -> None:
    """One-line CissError naming `what` (e.g. "--save-bag") when the ros extra is not installed."""
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            raise CissError(f"{what} needs the ros extra: {INSTALL}") from None


def is_recording(path: Path) -> bool:
    """A bag file by its suffix, or a folder that is a ROS 2 bag (metadata.yaml) or holds bag files."""
    if path.suffix.lower() in RECORDING_SUFFIXES:
        return True
    return path.is_dir() and ((path / "metadata.yaml").is_file() or bool(_bag_files(path)))


def _bag_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in RECORDING_SUFFIXES and p.is_file())


def _bag_paths(path: Path) -> list[Path]:
    """What rosbags opens for `path`: the file, the ROS 2 bag folder, or the bag files in a folder
    (read as one recording, merged by time)."""
    if not path.exists():
        raise CissError(f"no such recording: {path}")
    if path.is_file() or (path / "metadata.yaml").is_file():
        return [path]
    files = _bag_files(path)
    if len({p.suffix.lower() == ".bag" for p in files}) > 1:
        raise CissError(f"{path} mixes ROS 1 (.bag) and ROS 2 (.mcap, .db3) files; give one of them")
    return files


def typestore() -> Typestore:
    """The message definitions of the current ROS 2 release, for bags that carry none and for the output."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.LATEST)


# --- message conversion ---------------------------------------------------------------------------

def stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def header(store: Typestore, stamp: int, frame_id: str) -> Any:
    time_t, header_t = store.types["builtin_interfaces/msg/Time"], store.types["std_msgs/msg/Header"]
    return header_t(time_t(stamp // 1_000_000_000, stamp % 1_000_000_000), frame_id)


def to_bgr(msg: Any) -> np.ndarray:
    """A sensor_msgs Image (rgb8, bgr8, mono8, mono16, bayer_*, rgba8, ...) or CompressedImage (JPEG, PNG) as
    the BGR uint8 H×W×3 array the Segmenter takes; a message that does not convert raises CissError."""
    from rosbags.image import ImageError, message_to_cvimage

    compressed = hasattr(msg, "format")
    what = f"'{msg.format}' compressed image" if compressed else f"'{msg.encoding}' image"
    try:
        image = message_to_cvimage(msg, None if compressed else "bgr8")
    except (ImageError, AssertionError, cv2.error) as e:  # rosbags-image asserts that imdecode worked
        raise CissError(f"cannot convert a {what} to BGR: {e or 'not decodable'}") from None
    if compressed:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
        if image.dtype != np.uint8:  # 16-bit PNG
            image = (image >> 8).astype(np.uint8)
        if image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image)


def mask_fields(mask: np.ndarray) -> dict[str, Any]:
    """The sensor_msgs/Image fields of a class-id mask: mono8, or mono16 (native byte order, flagged) past
    255 classes; shared by the bag sink and the ROS 2 node (examples/ros2_node.py)."""
    if mask.dtype not in (np.uint8, np.uint16) or mask.ndim != 2:
        raise ValueError(f"masks are HxW uint8 or uint16, not {mask.dtype} {mask.shape}")
    h, w = mask.shape
    return {"height": h, "width": w, "encoding": "mono8" if mask.dtype == np.uint8 else "mono16",
            "is_bigendian": int(sys.byteorder == "big"), "step": w * mask.itemsize,
            "data": np.ascontiguousarray(mask).view(np.uint8).reshape(-1)}


def mask_message(store: Typestore, mask: np.ndarray, stamp: int, frame_id: str) -> Any:
    """A class-id mask as a sensor_msgs/Image of `store` (see mask_fields)."""
    return store.types[IMAGE](header=header(store, stamp, frame_id), **mask_fields(mask))


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CissError("cannot encode the overlay as JPEG")
    return data.tobytes()


def classmap_record(result: Result, model: str, previous: int | None) -> dict[str, Any]:
    """The class map a version serves, with what it added: the JSON of the class-map messages."""
    return {"model": model, "version": result.version, "previous": previous, "stamp": result.stamp,
            "new_classes": [result.classmap.names[i] for i in result.new_classes] if previous is not None else [],
            "classes": [{"id": c.id, "name": c.name, "color": list(c.color)} for c in result.classmap]}


def when(result: Result) -> int:
    """The stamp an output of `result` carries: its input's, or now for sources without stamps."""
    return time.time_ns() if result.stamp is None else result.stamp


# --- recordings as a source -----------------------------------------------------------------------

class RecordingSource(Source):
    """The images of one topic of a ROS 1 or ROS 2 recording, with their header stamps and frame ids.

    By default every message once, in recorded order, as fast as the consumer reads (like a video
    file). With `realtime`, messages are due at their recorded rate and the consumer gets the newest
    one due, the older ones counted as dropped (like the live sensor that recorded them); skipped
    messages are never decoded, so falling behind costs nothing extra.
    """

    def __init__(self, path: Path, topic: str | None = None, *, realtime: bool = False, loop: bool = False):
        from rosbags.highlevel import AnyReader, AnyReaderError
        from rosbags.rosbag1 import ReaderError as Reader1Error
        from rosbags.rosbag2 import ReaderError as Reader2Error

        super().__init__(f"recording {path}")
        self.path, self.realtime, self.loop, self.live = path, realtime, loop, realtime
        self._reader = AnyReader(_bag_paths(path), default_typestore=typestore())
        try:
            self._reader.open()
        except (AnyReaderError, Reader1Error, Reader2Error, OSError) as e:
            raise CissError(f"cannot read {path} as a ROS bag: {e}") from None
        try:
            self.topic, self.msgtype, self._connections = self._choose(topic)
        except CissError:
            self._reader.close()
            raise
        self.count = sum(c.msgcount for c in self._connections)
        span_s = (self._reader.end_time - self._reader.start_time) / 1e9
        self.fps = (self.count - 1) / span_s if self.count > 1 and span_s > 0 else None
        self._messages = self._iterate()
        self._ahead: tuple[Connection, int, bytes] | None = None
        self._index = 0  # position of the next message in the topic, skipped ones included
        self._base: tuple[float, int] | None = None  # (wall, recorded) times that realtime pacing counts from

    def _choose(self, topic: str | None) -> tuple[str, str, list[Connection]]:
        """The image topic to read: `topic`, or the only one; else a CissError listing them in one line."""
        topics: dict[str, list[Connection]] = {}
        for c in self._reader.connections:
            if c.msgtype in (IMAGE, COMPRESSED):
                topics.setdefault(c.topic, []).append(c)
        listing = ", ".join(f"{t} ({cs[0].msgtype}, {sum(c.msgcount for c in cs)} messages)"
                            for t, cs in sorted(topics.items()))
        if topic is None and len(topics) == 1:
            topic = next(iter(topics))
        if topic is None:
            if not topics:
                others = ", ".join(sorted({c.topic for c in self._reader.connections})) or "none"
                raise CissError(f"no sensor_msgs/Image or CompressedImage topic in {self.path} (topics: {others})")
            raise CissError(f"{self.path} has {len(topics)} image topics, choose one with --topic: {listing}")
        if topic not in topics:
            raise CissError(f"no image topic {topic} in {self.path}; its image topics: {listing or 'none'}")
        return topic, topics[topic][0].msgtype, topics[topic]

    def _iterate(self) -> Iterator[tuple[Connection, int, bytes]]:
        while True:
            yield from self._reader.messages(connections=self._connections)
            if not self.loop or not self.count:
                return
            self._base = None  # a loop starts its timing afresh

    def _next(self) -> tuple[Connection, int, bytes] | None:
        item = self._ahead if self._ahead is not None else next(self._messages, None)
        self._ahead = None
        if item is not None:
            self._index += 1
        return item

    def _due(self, recorded: int) -> float:
        """When a message recorded at `recorded` ns is due; the first one (of each loop) is due now."""
        if self._base is None:
            self._base = (time.monotonic(), recorded)
        return self._base[0] + (recorded - self._base[1]) / 1e9

    def read(self) -> Frame | None:
        if self._reader.stack is None:  # closed
            return None
        item = self._next()
        if item is None:
            return None
        if self.realtime:
            self._due(item[1])
            while True:  # skip to the newest message already due
                self._ahead = next(self._messages, None)
                if self._ahead is None or self._due(self._ahead[1]) > time.monotonic():
                    break
                self._dropped += 1
                item = self._next()
            if (wait := self._due(item[1]) - time.monotonic()) > 0:
                time.sleep(wait)
        connection, _, raw = item
        msg = self._reader.deserialize(raw, connection.msgtype)
        try:
            image = to_bgr(msg)
        except CissError as e:
            raise CissError(f"{self.topic} message {self._index - 1} in {self.path}: {e}") from None
        frame = Frame(image, self._index - 1, time.monotonic(), stamp_ns(msg.header), msg.header.frame_id)
        self._read += 1
        return frame

    def close(self) -> None:
        if self._reader.stack is not None:
            self._reader.close()

    def describe(self) -> str:
        kind = self.msgtype.rsplit("/", 1)[-1]
        rate = f"{self.fps:.1f} Hz" if self.fps else "rate unknown"
        mode = "realtime: newest due message kept, older dropped" if self.realtime else "every message in order"
        return f"{self.name} topic {self.topic} ({self.count} {kind} messages, {rate}, {mode}" + \
            (", looped)" if self.loop else ")")


# --- results as a recording -----------------------------------------------------------------------

class BagSink:
    """Per frame, the class-id mask (`<topic>/ciss/mask`, sensor_msgs/Image) and the overlay
    (`<topic>/ciss/overlay`, sensor_msgs/CompressedImage JPEG), and at the start and each swap the class
    map (`<topic>/ciss/classes`, std_msgs/String JSON), all stamped with the input's header stamp, into
    an MCAP file with the ROS 2 profile and CDR messages, so ROS 2 tools, RViz and Foxglove read it.

    The file is flushed after every frame, each frame's messages ending one MCAP chunk: a run killed
    with SIGKILL leaves every complete frame readable (MCAP readers scan a file without its summary;
    `mcap recover` rebuilds the index for tools that need it). A normal close adds the index.
    """

    def __init__(self, path: str | Path, topic: str | None, model: str):
        import foxglove
        from foxglove import Channel, Context, Schema
        from foxglove.mcap import MCAPWriteOptions

        self.path = Path(path)
        check_target(self.path)
        if self.path.suffix.lower() != ".mcap":
            raise CissError(f"--save-bag writes MCAP: give a .mcap file, not {self.path.name}")
        self.prefix = f"{topic.rstrip('/')}/ciss" if topic else "/ciss"
        self.model = model
        self._store = typestore()
        self._context = Context()  # its own: the WebSocket server, if any, must not get these CDR channels
        try:
            self._writer = foxglove.open_mcap(self.path, allow_overwrite=True, context=self._context,
                                              writer_options=MCAPWriteOptions(profile="ros2"))
        except Exception as e:  # noqa: BLE001 - the SDK raises its own error types for I/O failures
            raise CissError(f"cannot write bag {self.path}: {e}") from None

        def channel(name: str, msgtype: str) -> Channel:
            text = self._store.generate_msgdef(msgtype, ros_version=2)[0]
            return Channel(f"{self.prefix}/{name}", schema=Schema(name=msgtype, encoding="ros2msg", data=text.encode()),
                           message_encoding="cdr", context=self._context)

        self._mask, self._overlay = channel("mask", IMAGE), channel("overlay", COMPRESSED)
        self._classes = channel("classes", STRING)
        self._version: int | None = None
        self.frames = 0

    def _log(self, channel: Any, msg: Any, msgtype: str, stamp: int) -> None:
        channel.log(bytes(self._store.serialize_cdr(msg, msgtype)), log_time=stamp)

    def write(self, result: Result, overlay: np.ndarray, record: dict[str, Any]) -> None:
        stamp, frame_id = when(result), result.frame_id or ""
        if result.version != self._version:
            text = json.dumps(classmap_record(result, self.model, self._version))
            self._log(self._classes, self._store.types[STRING](text), STRING, stamp)
            self._version = result.version
        self._log(self._mask, mask_message(self._store, result.mask, stamp, frame_id), IMAGE, stamp)
        compressed = self._store.types[COMPRESSED](header(self._store, stamp, frame_id), "jpeg",
                                                   np.frombuffer(jpeg(overlay), np.uint8))
        self._log(self._overlay, compressed, COMPRESSED, stamp)
        self._writer.flush()  # ends the chunk: this frame survives a kill from here on
        self.frames += 1

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""`ciss live --foxglove`: a Foxglove WebSocket server that shows the robot learning as it happens.

Topics are fixed (`/ciss/...`), whatever the source, so one layout (examples/foxglove_layout.json)
fits every run: the overlay and the mask as Foxglove image messages, one JSON stats message per frame,
one swap event per hot swap (old and new version, classes added), and the class map at the start, at
each swap and once a second, since a viewer that connects later would otherwise never see it.
The server binds to the loopback address unless another host is asked for: it has no authentication.
"""

from __future__ import annotations

import time
from typing import Any, Self

import numpy as np

from ciss.errors import CissError
from ciss.runtime.log import LOGGER, Log
from ciss.runtime.model import Result
from ciss.runtime.ros import classmap_record, jpeg, when

DEFAULT_ADDRESS = "127.0.0.1:8765"  # Foxglove's usual port
CLASSMAP_EVERY_S = 1.0


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT, HOST (port 8765) or :PORT (loopback)."""
    host, _, port = address.rpartition(":") if ":" in address else (address, ":", "8765")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CissError(f"--foxglove {address}: give HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host, int(port)


class FoxgloveSink:
    """Publishes each frame's overlay, mask and stats, and each swap, to Foxglove clients (see the module
    docstring); port 0 picks a free port, which `port` then holds."""

    def __init__(self, address: str, model: str, log: Log = LOGGER.info):
        import foxglove
        from foxglove import Channel, Context
        from foxglove.channels import CompressedImageChannel, RawImageChannel

        host, port = parse_address(address)
        self.model = model
        self._context = Context()  # its own: a bag written alongside must not get these channels
        try:
            self._server = foxglove.start_server(name="ciss live", host=host, port=port, context=self._context)
        except Exception as e:  # noqa: BLE001 - the SDK raises its own error types for socket failures
            raise CissError(f"cannot serve Foxglove on {host}:{port}: {e}") from None
        self.host, self.port = host, self._server.port
        self._overlay = CompressedImageChannel("/ciss/overlay", context=self._context)
        self._mask = RawImageChannel("/ciss/mask", context=self._context)
        self._stats = Channel("/ciss/stats", context=self._context)
        self._swaps = Channel("/ciss/swaps", context=self._context)
        self._classes = Channel("/ciss/classes", context=self._context)
        self._version: int | None = None
        self._previous: int | None = None  # the version served before this one
        self._classes_at = 0.0
        log(f"Foxglove: open ws://{host}:{self.port} in Foxglove (Open connection > Foxglove WebSocket), "
            "layout examples/foxglove_layout.json")

    def write(self, result: Result, overlay: np.ndarray, record: dict[str, Any]) -> None:
        from foxglove.messages import CompressedImage, RawImage, Timestamp

        stamp, frame_id = when(result), result.frame_id or ""
        ts = Timestamp(stamp // 1_000_000_000, stamp % 1_000_000_000)
        now = time.monotonic()
        swapped = result.version != self._version
        if swapped and self._version is not None:
            self._previous = self._version
        if swapped or now - self._classes_at >= CLASSMAP_EVERY_S:
            classes = classmap_record(result, self.model, self._previous)
            if swapped and self._previous is not None:
                self._swaps.log({"old": self._previous, "new": result.version, "classes_added": classes["new_classes"],
                                 "seq": result.seq, "stamp": stamp}, log_time=stamp)
            self._classes.log(classes, log_time=stamp)
            self._version, self._classes_at = result.version, now
        self._overlay.log(CompressedImage(timestamp=ts, frame_id=frame_id, data=jpeg(overlay, 80), format="jpeg"),
                          log_time=stamp)
        mask = result.mask
        self._mask.log(RawImage(timestamp=ts, frame_id=frame_id, width=mask.shape[1], height=mask.shape[0],
                                encoding="mono8" if mask.dtype == np.uint8 else "mono16", step=mask.shape[1] * mask.itemsize,
                                data=np.ascontiguousarray(mask).tobytes()), log_time=stamp)
        self._stats.log(record, log_time=stamp)

    def close(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The live loop: source -> segmenter -> overlay -> display and files, with per-frame and per-swap stats.

Reading, pre-processing, inference, post-processing and rendering of successive frames overlap on
their own threads (Segmenter.stream, ciss.runtime.stages); the caller's thread writes the outputs,
in source order, and keeps the stats, so they stay frame-accurate. Live sources capture on their
own thread (ciss.runtime.sources) and the next model version is prepared on the watcher's
(ciss.runtime.hotswap), so the only work between two frames at a swap is a pointer exchange. The
report says what a user of a robot needs to trust it: frames in and out, drops, latency, each
stage's time, and for each swap the longest gap between two output frames.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np

from ciss.errors import CissError
from ciss.runtime.log import LOGGER, Log
from ciss.runtime.model import Result
from ciss.runtime.render import class_lut, hud, legend, overlay
from ciss.runtime.segmenter import Segmenter
from ciss.runtime.settings import LIVE
from ciss.runtime.sinks import Display, MaskSink, StatsSink, VideoSink, pixel_shares
from ciss.runtime.sources import Frame, Source
from ciss.runtime.stages import Reservoir


class FrameSink(Protocol):
    """An output fed every frame: its result, the annotated overlay and the stats record (ciss.runtime.ros.BagSink,
    ciss.runtime.foxglove_server.FoxgloveSink). The caller opens and closes it."""

    def write(self, result: Result, overlay: np.ndarray, record: dict[str, Any]) -> None: ...


@dataclass
class LiveOptions:
    display: bool = False
    save: Path | None = None          # annotated video (mp4v)
    save_masks: Path | None = None    # one palette PNG of class ids per frame (sinks.MaskSink)
    stats: Path | None = None         # JSONL, one record per frame
    max_frames: int | None = None
    alpha: float = LIVE.default("live.alpha")
    legend: bool = LIVE.default("live.legend")  # the class legend, top right (--no-legend)
    hud: bool = LIVE.default("live.hud")        # FPS, latency, version and backend, top left (--no-hud)

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:  # also refuses NaN; outside [0, 1] the overlay wraps around
            raise CissError(f"--alpha {self.alpha:g} is not an opacity; give a value from 0 to 1")


class _Rate:
    """Frames per second over the last second of output, for the HUD."""

    def __init__(self) -> None:
        self._times: list[float] = []

    def tick(self, now: float) -> float | None:
        self._times = [t for t in self._times if now - t <= 1.0] + [now]
        span = self._times[-1] - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else None


def annotate(frame: np.ndarray, result: Result, luts: dict[int, np.ndarray], fps: float | None,
             latency_ms: float, alpha: float, show_legend: bool = True, show_hud: bool = True) -> np.ndarray:
    """The overlay with the legend of the version in use (its new classes tagged) and the HUD, each
    unless hidden."""
    lut = luts.setdefault(result.version, class_lut(result.classmap))
    image = overlay(frame, result.mask, lut, alpha)
    if show_legend:
        legend(image, result.classmap, result.new_classes, result.unlearned, result.mask)
    if show_hud:
        hud(image, fps, latency_ms, result.version, result.backend)
    return image


@contextmanager
def stop_on_signals(log: Log = LOGGER.info) -> Iterator[threading.Event]:
    """An event that SIGINT (Ctrl-C) and SIGTERM set instead of killing the process, so run_live ends
    after the frames in flight with its files whole and its report made; a second signal stops at
    once (KeyboardInterrupt). Handlers can only be installed from the main thread; elsewhere the
    event is simply never set by a signal."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, _: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log(f"{signal.Signals(signum).name}: stopping after the frames in flight (send it again to stop at once)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_live(source: Source, segmenter: Segmenter, options: LiveOptions, log: Log = LOGGER.info,
             on_frame: Callable[[Result], None] | None = None, stop: threading.Event | None = None,
             sinks: Sequence[FrameSink] = ()) -> dict[str, Any]:
    """Run until the source ends, `max_frames`, `q` in the window, or `stop` is set (see
    stop_on_signals); returns the run's report. A frame's stamp and frame_id (ROS sources) go into its
    Result, its stats record and every sink. Outputs, `on_frame` and the stats run on the caller's
    thread, in source order."""
    luts: dict[int, np.ndarray] = {}
    rate = _Rate()
    latencies, gaps, writes = Reservoir(), Reservoir(), Reservoir()
    swaps = _SwapGaps()
    last_out: float | None = None
    frames = 0
    draw = options.display or options.save is not None or bool(sinks)

    def render(frame: Frame, result: Result) -> tuple[Frame, Result, np.ndarray | None]:
        """On the render thread: the HUD shows the rate and latency as of rendering."""
        if not draw:
            return frame, result, None
        now = time.monotonic()
        return frame, result, annotate(frame.image, result, luts, rate.tick(now), 1e3 * (now - frame.time),
                                       options.alpha, options.legend, options.hud)

    started = time.monotonic()
    with ExitStack() as stack:
        display = stack.enter_context(closing(Display())) if options.display else None
        masks = MaskSink(options.save_masks) if options.save_masks else None
        stats = stack.enter_context(StatsSink(options.stats)) if options.stats else None
        video: VideoSink | None = None
        stream = stack.enter_context(segmenter.stream(source, stop=stop, max_frames=options.max_frames, then=render))
        for frame, result, image in stream:
            now = time.monotonic()
            latency_ms = 1e3 * (now - frame.time)
            latencies.add(latency_ms)
            gap_ms = None if last_out is None else 1e3 * (now - last_out)
            if gap_ms is not None:
                gaps.add(gap_ms)
            swaps.add(frames, result.version, gap_ms)
            last_out = now
            frames += 1
            if image is not None:
                if options.save and video is None:
                    video = stack.enter_context(VideoSink(options.save, source.fps or 30.0,
                                                          (image.shape[1], image.shape[0])))
                if video is not None:
                    video.write(image)
                if display is not None:
                    display.show(image)
                    if display.poll():
                        log("stopped by the user")
                        break
            if masks is not None:
                masks.write(frame.index if frame.name is None else frame.name, result.mask, result.classmap.colors)
            if stats is not None or sinks:
                record = {"seq": result.seq, "frame": frame.index, "version": result.version,
                          "latency_ms": round(latency_ms, 2),
                          "timings_ms": {k: round(v, 2) for k, v in result.timings.items()},
                          "shares": pixel_shares(result.mask, result.classmap.names)}
                if frame.name is not None:
                    record["name"] = frame.name
                if frame.stamp is not None:
                    record |= {"stamp": frame.stamp, "frame_id": frame.frame_id}
                if stats is not None:
                    stats.write(record)
                for sink in sinks:
                    sink.write(result, image, record)
            if on_frame is not None:
                on_frame(result)
            writes.add(1e3 * (time.monotonic() - now))
        stages = {**stream.stage_ms, "write": writes}
    report = _report(source, segmenter, frames, time.monotonic() - started, latencies, gaps, swaps, stages)
    if report["unserved"] is not None:
        log(missed_swap(report))
    return report


def missed_swap(report: dict[str, Any]) -> str:
    """Why a published version never showed: the run ended (a short file, --max-frames) before a frame took it."""
    return (f"WARNING: version {report['unserved']} was published but the run ended before any frame used it "
            f"(still version {report['versions'][-1] if report['versions'] else '-'}); "
            "give a longer source, --loop, or publish earlier")


class _SwapGaps:
    """Each version's first frame and the longest gap between output frames around it (the two gaps
    before that frame and the one after): what a swap cost the stream, kept per version, not per frame."""

    def __init__(self) -> None:
        self.first_frame: dict[int, int] = {}
        self.max_gap_ms: dict[int, float | None] = {}
        self._recent: deque[float] = deque(maxlen=2)
        self._waiting: int | None = None  # a version whose first frame's following gap is still to come

    def add(self, frame: int, version: int, gap_ms: float | None) -> None:
        if gap_ms is not None:
            self._recent.append(gap_ms)
            if self._waiting is not None:
                before = self.max_gap_ms[self._waiting]
                self.max_gap_ms[self._waiting] = gap_ms if before is None else max(before, gap_ms)
                self._waiting = None
        if version not in self.first_frame:
            self.first_frame[version] = frame
            self.max_gap_ms[version] = max(self._recent, default=None)
            self._waiting = version


def _report(source: Source, segmenter: Segmenter, frames: int, wall_s: float, latencies: Reservoir,
            gaps: Reservoir, served: _SwapGaps, stages: dict[str, Reservoir]) -> dict[str, Any]:
    swaps = [{**s, "first_frame": served.first_frame.get(s["version"]),
              "max_gap_ms": served.max_gap_ms.get(s["version"])} for s in segmenter.swaps]
    source_stats = source.stats
    return {
        "frames": frames, "wall_s": wall_s, "fps": frames / wall_s if wall_s > 0 else None,
        "dropped": int(source_stats.get("dropped", 0)), "source": source.describe(), "source_stats": source_stats,
        "latency_ms": {"p50": latencies.percentile(50), "p95": latencies.percentile(95), "max": latencies.max},
        "frame_gap_ms": {"p50": gaps.percentile(50), "max": gaps.max},
        "stage_ms": {name: {"p50": r.percentile(50), "p99": r.percentile(99)} for name, r in stages.items()},
        "versions": sorted(served.first_frame), "swaps": swaps, "backend": segmenter.backend,
        "unserved": segmenter.unserved(),
    }


def describe_report(report: dict[str, Any]) -> str:
    lat, gap = report["latency_ms"], report["frame_gap_ms"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [(f"{report['frames']} frames in {report['wall_s']:.1f} s ({report['fps'] or 0:.1f} FPS) from "
              f"{report['source']} on {report['backend']}; dropped {report['dropped']}"),
             (f"latency ms p50 {ms(lat['p50'])} p95 {ms(lat['p95'])} max {ms(lat['max'])}; "
              f"frame gap ms p50 {ms(gap['p50'])} max {ms(gap['max'])}"),
             "stage ms p50/p99: " + ", ".join(f"{name} {ms(t['p50'])}/{ms(t['p99'])}"
                                              for name, t in report["stage_ms"].items()),
             f"versions served: {', '.join(map(str, report['versions']))}"]
    for s in report["swaps"]:
        lines.append(f"swap {s['previous']} -> {s['version']} at frame {s['first_frame']}: +{len(s['new_classes'])} "
                     f"classes, load {s['load_s']:.2f} s, warm-up {s['warmup_s']:.2f} s, swap {s['swap_ms']:.2f} ms, "
                     f"longest frame gap around it {ms(s['max_gap_ms'])} ms")
    return "\n".join(lines)

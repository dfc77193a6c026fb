"""Frame sources on real OpenCV captures of videos and images written here; no camera, no network."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from ciss.errors import CissError
from ciss.runtime.sources import Frame, LiveSource, VideoCaptureProducer, open_source

SIZE = (64, 48)  # width, height


def level(i: int) -> int:
    """The grey level frame i is filled with: far enough apart to survive mp4v compression."""
    return (i * 10) % 250


def frame_number(image: np.ndarray, n: int) -> int:
    return min(range(n), key=lambda i: abs(float(image.mean()) - level(i)))


def write_video(path: Path, n: int, fps: float = 25.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, SIZE)
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((SIZE[1], SIZE[0], 3), level(i), np.uint8))
    writer.release()
    return path


def read_all(source) -> list[Frame]:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def test_video_file_every_frame_once_in_order(tmp_path: Path):
    with open_source(str(write_video(tmp_path / "clip.mp4", 20))) as source:
        assert not source.live and source.fps == 25.0
        frames = read_all(source)
        assert source.read() is None
        assert source.stats == {"frames_read": 20, "dropped": 0, "reconnects": 0}
        assert "20 frames" in source.describe()
    assert [f.index for f in frames] == list(range(20))
    assert [frame_number(f.image, 20) for f in frames] == list(range(20))
    assert frames[0].image.shape == (SIZE[1], SIZE[0], 3) and frames[0].image.dtype == np.uint8


def test_video_loop_restarts_at_the_end(tmp_path: Path):
    with open_source(str(write_video(tmp_path / "clip.mp4", 8)), loop=True) as source:
        frames = [source.read() for _ in range(19)]
    assert [f.index for f in frames] == list(range(19))
    assert [frame_number(f.image, 8) for f in frames] == [i % 8 for i in range(19)]


def write_image(path: Path, i: int) -> Path:
    cv2.imwrite(str(path), np.full((SIZE[1], SIZE[0], 3), level(i), np.uint8))
    return path


def test_image_folder_and_glob_in_sorted_order(tmp_path: Path):
    for name, i in [("b.png", 1), ("a.png", 0), ("c.bmp", 2)]:
        write_image(tmp_path / name, i)
    (tmp_path / "notes.txt").write_text("not an image, not listed")
    with open_source(str(tmp_path)) as source:
        assert [frame_number(f.image, 3) for f in read_all(source)] == [0, 1, 2]
    with open_source(str(tmp_path / "*.png"), loop=True) as source:
        assert "glob" in source.describe()
        assert [frame_number(source.read().image, 3) for _ in range(5)] == [0, 1, 0, 1, 0]
    with open_source(str(tmp_path / "c.bmp")) as source:
        assert len(read_all(source)) == 1


def test_corrupt_image_is_a_clear_error(tmp_path: Path):
    write_image(tmp_path / "a.png", 0)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    with open_source(str(tmp_path)) as source:
        assert source.read().index == 0
        with pytest.raises(CissError, match=r"cannot decode image .*b\.png: not an image or corrupt"):
            source.read()


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.mp4", "no such file or folder"),
    (lambda d: d / "missing" / "*.png", "no files match"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no images in folder"),
    (lambda d: (d / "x.mp4").write_text("not a video") and d / "x.mp4", "cannot read .* as a video"),
])
def test_missing_or_unreadable_paths(tmp_path: Path, make, message):
    with pytest.raises(CissError, match=message):
        open_source(str(make(tmp_path)))


def test_bad_fps_is_an_error():
    with pytest.raises(CissError, match="fps must be a positive number"):
        open_source("synthetic", fps=0)


def test_missing_camera_and_dead_url_are_one_line_errors():
    with pytest.raises(CissError, match=r"^no camera at index 7: .*\(is it connected\?"):
        open_source("camera:7")
    start = time.monotonic()
    with pytest.raises(CissError, match="cannot open stream rtsp://user:\\*\\*\\*@127.0.0.1:9/none") as e:
        open_source("rtsp://user:secret@127.0.0.1:9/none", timeout_s=1.0)
    assert "secret" not in str(e.value) and time.monotonic() - start < 3


CLI_LIKE = """
import sys
from ciss.errors import CissError
from ciss.runtime.sources import open_source
for spec in sys.argv[1:]:
    try:
        open_source(spec, timeout_s=1.0)
    except CissError as e:
        print(f"error: {e}", file=sys.stderr)
sys.exit(2)
"""


def test_opencv_prints_nothing_of_its_own_on_stderr():
    """OpenCV and FFmpeg write WARN lines straight to fd 2; only a child process can show they do not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCV_", "DISPLAY", "WAYLAND"))}
    specs = ["7", "rtsp://127.0.0.1:9/none", "http://127.0.0.1:9/none"]
    result = subprocess.run([sys.executable, "-c", CLI_LIKE, *specs], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert lines[0].startswith("error: no camera at index 7: ")
    assert all(line.startswith("error: cannot open stream ") for line in lines[1:])


def test_runtime_io_imports_without_torch():
    code = ("import sys, ciss.runtime.sources, ciss.runtime.render, ciss.runtime.sinks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_synthetic_is_paced_and_never_drops():
    with open_source("synthetic", fps=50) as source:
        start = time.monotonic()
        frames = [source.read() for _ in range(6)]
        elapsed = time.monotonic() - start
        assert source.stats["dropped"] == 0 and not source.live
    assert [f.index for f in frames] == list(range(6))
    assert elapsed >= 5 / 50 - 0.01
    assert frames[0].image.shape == (240, 320, 3) and not np.array_equal(frames[0].image, frames[5].image)


class PacedVideo(VideoCaptureProducer):
    """A real capture of a video file delivered at `fps` like a camera; optionally it fails after
    `fail_after` frames and refuses `refusals` reopens (a pulled cable) or every reopen (-1)."""

    def __init__(self, path: Path, fps: float, fail_after: int | None = None, refusals: int = 0):
        super().__init__(str(path))
        self.period, self.fail_after, self.refusals = 1.0 / fps, fail_after, refusals
        self.delivered = 0

    def read(self) -> np.ndarray | None:
        time.sleep(self.period)
        if self.delivered == self.fail_after:
            return None
        image = super().read()
        self.delivered += image is not None
        return image

    def reopen(self) -> bool:
        if self.refusals:
            self.refusals -= 1
            return False
        self.fail_after = None
        return super().reopen()


def test_live_source_keeps_the_newest_frame_and_counts_drops(tmp_path: Path):
    period = 0.01
    video = write_video(tmp_path / "clip.mp4", 200)
    source = LiveSource(PacedVideo(video, 1 / period), "paced video", log=print)
    ages, frames = [], []
    for _ in range(8):
        frame = source.read()
        ages.append(time.monotonic() - frame.time)
        frames.append(frame)
        time.sleep(0.06)  # a model much slower than the camera
    source.close()
    stats = source.stats
    assert max(ages[1:]) < 2 * period + 0.05, ages  # no queue building up behind the consumer
    assert stats["dropped"] > 0 and stats["dropped"] + stats["frames_read"] == stats["captured"], stats
    assert stats["frames_read"] == 8
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices)) and indices[-1] > 8
    assert all(frame_number(f.image, 25) == f.index % 25 for f in frames)  # the index is the frame's own
    assert source.read() is None


def test_live_source_reconnects_with_backoff_and_reports_it(tmp_path: Path):
    logs: list[str] = []
    producer = PacedVideo(write_video(tmp_path / "clip.mp4", 40), fps=500, fail_after=4, refusals=2)
    source = LiveSource(producer, "flaky", give_up_s=5.0, backoff=(0.01, 0.04), log=logs.append)
    frames = []
    while len(frames) < 10:
        frames.append(source.read())
        time.sleep(0.005)
    source.close()
    assert source.stats["reconnects"] == 1
    assert any("stream lost" in m for m in logs) and any("reconnected" in m for m in logs), logs
    assert sum("reconnect attempt" in m and "failed" in m for m in logs) == 2, logs
    indices = [f.index for f in frames]
    assert indices == sorted(set(indices))  # frames keep coming after the reconnect, in order


def test_live_source_gives_up_when_the_stream_stays_down(tmp_path: Path):
    logs: list[str] = []
    producer = PacedVideo(write_video(tmp_path / "clip.mp4", 10), fps=500, fail_after=3, refusals=-1)
    source = LiveSource(producer, "dead", give_up_s=0.3, backoff=(0.05, 0.1), log=logs.append)
    start = time.monotonic()
    with pytest.raises(CissError, match=r"dead: stream lost and not back after 0.3 s \(\d+ reconnect attempts\)"):
        while source.read() is not None:
            pass
    assert 0.3 <= time.monotonic() - start < 3
    assert any("giving up" in m for m in logs)
    source.close()


def test_live_source_without_reconnect_just_ends(tmp_path: Path):
    logs: list[str] = []
    producer = PacedVideo(write_video(tmp_path / "clip.mp4", 10), fps=500, fail_after=3)
    source = LiveSource(producer, "once", reconnect=False, log=logs.append)
    assert 1 <= len(read_all(source)) <= 3
    assert any("reconnect is off" in m for m in logs)
    source.close()


def test_live_source_that_never_delivers_fails_at_start(tmp_path: Path):
    producer = PacedVideo(write_video(tmp_path / "clip.mp4", 5), fps=500, fail_after=0)
    with pytest.raises(CissError, match="opened but delivered no frame"):
        LiveSource(producer, "mute")


def test_sources_import_without_onnxruntime():
    """Reading frames needs no model: the runtime package loads the Segmenter (and ONNX Runtime) on use."""
    code = ("import sys, ciss.runtime.sources; "
            "assert 'onnxruntime' not in sys.modules, 'ciss.runtime.sources imported onnxruntime'; "
            "from ciss.runtime import Segmenter; assert 'onnxruntime' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Sinks write real files that read back: mp4 through OpenCV, PNG masks, JSONL stats; display probing."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from ciss.errors import CissError
from ciss.runtime.sinks import (
    Display,
    MaskSink,
    StatsSink,
    VideoSink,
    has_display,
    pixel_shares,
)


def frames_in(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    return frames


def test_video_is_renamed_into_place_at_close_and_reads_back(tmp_path: Path):
    path = tmp_path / "out.mp4"
    with VideoSink(path, fps=10, size=(64, 48)) as sink:
        for i in range(12):
            sink.write(np.full((48, 64, 3), i * 20, np.uint8))
        sink.write(np.zeros((96, 128, 3), np.uint8))  # another size: resized, not silently lost
        assert not path.exists() and (tmp_path / ".out.partial.mp4").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    frames = frames_in(path)
    assert len(frames) == 13 and frames[0].shape == (48, 64, 3)
    assert abs(float(frames[5].mean()) - 100) < 4


def test_video_with_no_frames_leaves_no_file(tmp_path: Path):
    VideoSink(tmp_path / "out.mp4", fps=10, size=(64, 48)).close()
    assert list(tmp_path.iterdir()) == []


def test_video_finishes_when_the_run_fails(tmp_path: Path):
    with pytest.raises(CissError), VideoSink(tmp_path / "out.mp4", fps=10, size=(64, 48)) as sink:
        sink.write(np.zeros((48, 64, 3), np.uint8))
        raise CissError("stream gave up")
    assert len(frames_in(tmp_path / "out.mp4")) == 1


@pytest.mark.parametrize(("name", "message"), [
    ("missing/out.mp4", "missing does not exist"),
    ("file.txt/out.mp4", "file.txt is not a folder"),
    ("out.xyz", "no mp4v writer for '.xyz' files"),
    (".", "it is a folder"),
])
def test_video_that_cannot_be_written_is_a_clear_error(tmp_path: Path, name: str, message: str):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CissError, match=message):
        VideoSink(tmp_path / name, fps=10, size=(64, 48))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_masks_are_palette_pngs_of_the_ids_and_16_bit_past_256_classes(tmp_path: Path):
    Image = pytest.importorskip("PIL.Image")
    sink = MaskSink(tmp_path / "masks" / "run1")
    colors = [(0, 0, 0)] + [(i, 255 - i, (7 * i) % 256) for i in range(1, 256)]
    small = np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)
    large = (np.arange(48 * 64).reshape(48, 64) * 13 % 700).astype(np.uint16)
    assert sink.write(7, small, colors).name == "000007.png"
    assert sink.write("street_01", small, colors).name == "street_01.png"  # named after its source image
    with Image.open(sink.path(7)) as png:
        assert png.mode == "P" and np.array_equal(np.array(png), small)  # the ids, as VOC's labels hold them
    shown = cv2.imread(str(sink.path("street_01")), cv2.IMREAD_COLOR)  # what a viewer shows: the class colours
    assert np.array_equal(shown[..., ::-1], np.array(colors, np.uint8)[small])
    sink.write(8, large, colors * 3)
    back = cv2.imread(str(sink.path(8)), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, large)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        sink.write(9, large.astype(np.int64), colors)


def test_mask_folder_that_cannot_be_made_is_a_clear_error(tmp_path: Path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CissError, match="cannot create mask folder"):
        MaskSink(tmp_path / "file.txt" / "masks")


def test_stats_lines_are_flushed_and_parse(tmp_path: Path):
    path = tmp_path / "stats.jsonl"
    mask = np.array([[0, 1], [1, 3]], np.uint16)
    with StatsSink(path) as sink:
        sink.write({"seq": 0, "version": np.int64(2), "timings": {"total": np.float32(4.5)},
                    "shares": pixel_shares(mask, ["background", "a", "b", "c"])})
        assert path.read_text().count("\n") == 1  # already on disk before close
        sink.write({"seq": 1, "version": 2, "timings": {}, "shares": {}})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"seq": 0, "version": 2, "timings": {"total": 4.5},
                        "shares": {"background": 0.25, "a": 0.5, "c": 0.25}}
    assert lines[1]["seq"] == 1
    with pytest.raises(CissError, match="does not exist"):
        StatsSink(tmp_path / "missing" / "stats.jsonl")


@pytest.fixture
def fresh_probe():
    has_display.cache_clear()
    yield
    has_display.cache_clear()


def test_no_display_here(monkeypatch, fresh_probe):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert has_display() is False
    with pytest.raises(CissError, match="--headless"):
        Display()


def test_unreachable_display_is_probed_safely(monkeypatch, fresh_probe):
    """With DISPLAY set but no server, OpenCV's Qt aborts the process: the probe runs in a child."""
    monkeypatch.setenv("DISPLAY", ":97")
    assert has_display() is False

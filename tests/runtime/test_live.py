"""`ciss live` end to end: real video files, real ONNX Runtime sessions, versions published mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CISS, REPO
from tiny_models import NAME, Exported, SwapAtRead, exported, publish

from ciss.runtime.model import Result
from ciss.runtime.pipeline import LiveOptions, run_live
from ciss.runtime.segmenter import Segmenter
from ciss.runtime.sources import LiveSource, VideoCaptureProducer, open_source
from ciss.synthetic import SyntheticStream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Exported:
    return exported(tmp_path_factory)


def write_video(path: Path, frames: int, size: tuple[int, int] = (96, 128)) -> Path:
    """A synthetic-scene clip: stuff regions (version 2 adds water and sand) with things moving over them."""
    stream = SyntheticStream(*size, seed=1, things=6)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (size[1], size[0]))
    for _ in range(frames):
        writer.write(stream.read()[0])
    writer.release()
    return path


def test_a_version_published_mid_file_flips_at_one_frame_and_loses_none(models: Exported, tmp_path: Path):
    video = write_video(tmp_path / "clip.mp4", 30)
    repo = tmp_path / "models"
    publish(repo, models.v1)
    stats_file = tmp_path / "stats.jsonl"
    flip = 9

    segmenter = Segmenter.from_repository(repo, NAME, poll_s=0.05, log=lambda s: None)
    with segmenter, open_source(str(video)) as source:
        source = SwapAtRead(source, flip, lambda: publish(repo, models.v2), segmenter.wait_for_pending)
        report = run_live(source, segmenter, LiveOptions(stats=stats_file, save=tmp_path / "out.mp4"),
                          log=lambda s: None)
    records = [json.loads(line) for line in stats_file.read_text().splitlines()]
    assert [r["seq"] for r in records] == [r["frame"] for r in records] == list(range(30))
    assert [r["version"] for r in records] == [1] * flip + [2] * (30 - flip)
    assert report["frames"] == 30 and report["dropped"] == 0 and report["versions"] == [1, 2]
    assert report["unserved"] is None
    (swap,) = report["swaps"]
    assert swap["first_frame"] == swap["seq"] == flip and swap["new_classes"] == [5, 6]
    assert swap["max_gap_ms"] is not None and swap["load_s"] > 0
    new_class_pixels = sum(r["shares"].get("water", 0) + r["shares"].get("sand", 0) for r in records[flip:])
    old_names = {n for r in records[:flip] for n in r["shares"]}
    assert new_class_pixels > 0 and not old_names & {"water", "sand"}
    capture = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 30


def test_masks_and_stats_of_an_image_folder_carry_the_image_names(models: Exported, tmp_path: Path):
    stream = SyntheticStream(48, 64, seed=1)
    for name in ("street_b.jpg", "street_a.png"):
        (tmp_path / "images").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / name), stream.read()[0])
    repo = tmp_path / "models"
    publish(repo, models.v1)
    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as segmenter, \
            open_source(str(tmp_path / "images")) as source:
        run_live(source, segmenter, LiveOptions(save_masks=tmp_path / "masks", stats=tmp_path / "stats.jsonl"),
                 log=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["street_a.png", "street_b.png"]
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["frame"], r["name"]) for r in records] == [(0, "street_a"), (1, "street_b")]


def test_a_version_the_source_ended_before_is_reported(models: Exported, tmp_path: Path):
    """A short file can end before the watcher picks a new version up: the run must say so, not end silently."""
    video = write_video(tmp_path / "clip.mp4", 3, size=(48, 64))
    repo = tmp_path / "models"
    publish(repo, models.v1)
    said: list[str] = []
    # watch=False: nothing checks the repository during the run, as when the file ends before the first poll
    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as segmenter, \
            open_source(str(video)) as source:
        publish(repo, models.v2)
        report = run_live(source, segmenter, LiveOptions(), log=said.append)
    assert report["versions"] == [1] and report["unserved"] == 2
    assert any(s.startswith("WARNING: version 2 was published but the run ended") for s in said), said


def test_a_version_published_from_on_frame_flips_at_one_later_frame(models: Exported, tmp_path: Path):
    """From the consumer's thread a publish lands behind the frames already in flight: they keep the
    old version, and the flip still happens at exactly one frame and never goes back."""
    video = write_video(tmp_path / "clip.mp4", 100, size=(48, 64))
    repo = tmp_path / "models"
    publish(repo, models.v1)
    stats_file = tmp_path / "stats.jsonl"

    def on_frame(result: Result) -> None:
        if result.seq == 2:
            publish(repo, models.v2)  # ready within a poll and a load of a tiny model; 2 s of video remain

    with Segmenter.from_repository(repo, NAME, poll_s=0.05, log=lambda s: None) as segmenter, \
            open_source(str(video), fps=50) as source:
        report = run_live(source, segmenter, LiveOptions(stats=stats_file), log=lambda s: None, on_frame=on_frame)
    versions = [json.loads(line)["version"] for line in stats_file.read_text().splitlines()]
    flip = versions.index(2)
    assert 2 < flip and versions == [1] * flip + [2] * (100 - flip)
    assert report["swaps"][0]["first_frame"] == report["swaps"][0]["seq"] == flip


def test_memory_stays_flat_however_long_it_runs(models: Exported, tmp_path: Path):
    """run_live kept per-frame lists for its end report (about 100 bytes a frame, without bound)."""
    video = write_video(tmp_path / "clip.mp4", 10, size=(48, 64))
    repo = tmp_path / "models"
    publish(repo, models.v1)
    first, last, held = 300, 3300, {}

    def on_frame(result: Result) -> None:
        if result.seq in (first, last):
            held[result.seq] = tracemalloc.get_traced_memory()[0]

    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as segmenter, \
            open_source(str(video), loop=True) as source:
        tracemalloc.start()
        try:
            report = run_live(source, segmenter, LiveOptions(max_frames=last + 1), log=lambda s: None,
                              on_frame=on_frame)
        finally:
            tracemalloc.stop()
    assert report["frames"] == last + 1 and report["versions"] == [1]
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["max"]
    assert 0 < report["frame_gap_ms"]["p50"] <= report["frame_gap_ms"]["max"]
    assert held[last] - held[first] < 16 * (last - first), held  # no per-frame record (the FPS window is noise)


class PacedVideo(VideoCaptureProducer):
    """A real capture of a file, delivered at `fps` like a camera."""

    def __init__(self, path: Path, fps: float):
        super().__init__(str(path))
        self.period = 1.0 / fps

    def read(self) -> np.ndarray | None:
        time.sleep(self.period)
        image = super().read()
        if image is None and self.reopen():  # loop, like a camera that never ends
            image = super().read()
        return image


def test_a_slow_consumer_sees_fresh_frames_and_counts_drops(models: Exported, tmp_path: Path):
    video = write_video(tmp_path / "clip.mp4", 20)
    repo = tmp_path / "models"
    publish(repo, models.v1)
    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as segmenter, \
            LiveSource(PacedVideo(video, fps=100), "paced clip", log=lambda s: None) as source:
        report = run_live(source, segmenter, LiveOptions(max_frames=15), log=lambda s: None,
                          on_frame=lambda r: time.sleep(0.06))  # a backend far slower than the camera
    stats = source.stats  # after close, a frame left in the slot counts as dropped too
    assert report["frames"] == stats["frames_read"] == 15 and report["dropped"] > 0
    assert stats["dropped"] + stats["frames_read"] == stats["captured"]
    # Latest-frame: each frame is at most about one producer period old when taken, so latency stays
    # near the processing time instead of growing with a queue (15 frames x 60 ms would be ~0.9 s).
    assert report["latency_ms"]["max"] < 250


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CISS, *args], check=False, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_headless_run_writes_video_masks_and_stats(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    out = cli("live", "--source", "synthetic", "--repo", str(repo), "--name", NAME, "--headless", "--max-frames", "6",
              "--save", str(tmp_path / "out.mp4"), "--save-masks", str(tmp_path / "masks"),
              "--stats", str(tmp_path / "stats.jsonl"))
    assert out.returncode == 0, out.stderr
    assert "6 frames" in out.stdout and "dropped 0" in out.stdout
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 6
    assert cv2.VideoCapture(str(tmp_path / "out.mp4")).get(cv2.CAP_PROP_FRAME_COUNT) == 6


def test_cli_mistakes_are_one_line_with_exit_2(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    (tmp_path / "not-a-video.mp4").write_text("hello")
    serve = ["--repo", str(repo), "--name", NAME, "--headless", "--max-frames", "1"]
    cases = [
        (["--camera", "7", *serve], "no camera at index 7"),
        (["--source", str(tmp_path / "missing.mp4"), *serve], "missing.mp4"),
        (["--source", str(tmp_path / "not-a-video.mp4"), *serve], "not-a-video.mp4"),
        (["--source", "synthetic", *serve, "--backend", "warp"], "warp"),
        (["--source", "synthetic", *serve, "--backend", "ort-cuda"], "CUDA"),
        (["--source", "synthetic", "--repo", str(tmp_path / "nowhere"), "--name", NAME], "does not exist"),
        (["--source", "synthetic", "--camera", "0", *serve], "exactly one of"),
        (["--source", "synthetic", *serve, "--save", str(tmp_path / "no" / "out.mp4")], "does not exist"),
    ]
    for args, message in cases:
        out = cli("live", *args)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and lines and lines[-1].startswith("error: "), (args, out.stderr)
        assert message in lines[-1], (args, out.stderr)


@pytest.mark.parametrize("flag,value", [("--poll", "0"), ("--poll", "nan"), ("--alpha", "7"), ("--threads", "-3")])
def test_out_of_range_options_are_refused_in_one_line(models: Exported, tmp_path: Path, flag: str, value: str):
    """--poll 0 re-checked the repository in a busy loop; --alpha 7 and --threads -3 were taken as given."""
    repo = tmp_path / "models"
    publish(repo, models.v1)
    out = cli("live", "--source", "synthetic", "--repo", str(repo), "--name", NAME, "--headless", "--max-frames", "1",
              flag, value)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines == [lines[-1]] and lines[-1].startswith(f"error: {flag} {value}"), out.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_looped_run_cleanly(models: Exported, tmp_path: Path, signum: int):
    """Ctrl-C or SIGTERM used to print "Aborted!" (or just kill), exit 1 and lose the report and the video."""
    video = write_video(tmp_path / "clip.mp4", 12)
    repo = tmp_path / "models"
    publish(repo, models.v1)
    stats, saved = tmp_path / "stats.jsonl", tmp_path / "out.mp4"
    process = subprocess.Popen([*CISS, "live", "--source", str(video), "--loop", "--fps", "50", "--repo", str(repo),
                                "--name", NAME, "--headless", "--save", str(saved), "--stats", str(stats)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (not stats.exists() or len(stats.read_text().splitlines()) < 20) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "Aborted" not in err and f"{signal.Signals(signum).name}: stopping" in err
    frames = int(out.split(" frames in ")[0].split()[-1])
    records = [json.loads(line) for line in stats.read_text().splitlines()]
    assert frames >= 20 and [r["seq"] for r in records] == list(range(frames))
    assert int(cv2.VideoCapture(str(saved)).get(cv2.CAP_PROP_FRAME_COUNT)) == frames


def test_a_version_refused_mid_run_is_reported_once(models: Exported, tmp_path: Path):
    """The watcher logged each refusal and the CLI's on_error printed it again."""
    repo = tmp_path / "models"
    publish(repo, models.v1)
    stats = tmp_path / "stats.jsonl"
    process = subprocess.Popen([*CISS, "live", "--source", "synthetic", "--fps", "50", "--poll", "0.1", "--repo",
                                str(repo), "--name", NAME, "--headless", "--stats", str(stats)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (not stats.exists() or not stats.read_text()) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        truncated = tmp_path / "truncated.onnx"
        truncated.write_bytes((models.v2 / "model.onnx").read_bytes()[:5000])
        assert publish(repo, models.v2, files={"model.onnx": truncated}) == 2
        time.sleep(3)  # inotify, or at worst one 0.1 s poll, then a load that fails at once
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "versions served: 1" in out, err
    refusals = [line for line in err.splitlines() if "version 2 refused" in line]
    assert len(refusals) == 1 and "still serving version 1" in refusals[0], err


def test_the_robot_example_acts_on_a_class_once_a_version_knows_it(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v2)
    out = subprocess.run([sys.executable, str(REPO / "examples" / "follow_class.py"), "--repo", str(repo),
                          "--name", NAME, "--target", "water", "--source", "synthetic", "--max-frames", "3"],
                         check=False, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 3, out.stderr
    assert all(line.startswith(f"frame {i} v1: ") for i, line in enumerate(lines))
    assert all(line.split(": ")[1].split(" ")[0] in ("left", "right", "stop", "search") for line in lines)

"""The overlapped pipeline: the stage machinery alone, then real ONNX Runtime sessions on real video
files and image folders written by OpenCV, through Segmenter.stream, run_live and `ciss live`."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_live import cli, write_video
from tiny_models import NAME, Exported, exported, publish

from ciss.errors import CissError
from ciss.runtime.model import Result
from ciss.runtime.pipeline import LiveOptions, run_live
from ciss.runtime.segmenter import Segmenter
from ciss.runtime.sources import open_source
from ciss.runtime.stages import Pipeline, thread_split


def counter(n: int):
    items = iter(range(n))
    return lambda: next(items, None)


def jittered(scale_s: float):
    """A stage that takes a random while, so stages overtake each other if anything lets them."""
    rng = random.Random(0)
    lock = threading.Lock()

    def run(item: int) -> int:
        with lock:
            delay = rng.random() * scale_s
        time.sleep(delay)
        return item
    return run


def test_items_come_out_once_each_in_order_through_uneven_stages():
    stages = [(f"s{i}", jittered(0.002)) for i in range(4)]
    with Pipeline(counter(200), stages, depth=1) as pipeline:
        assert list(pipeline) == list(range(200))
    assert {name: r.count for name, r in pipeline.stage_ms.items()} == {"read": 201, "s0": 200, "s1": 200,
                                                                        "s2": 200, "s3": 200}


def test_a_stage_error_reaches_the_consumer_and_stops_every_thread():
    def infer(item: int) -> int:
        if item == 7:
            raise CissError("backend failed on frame 7")
        return item

    before = threading.active_count()
    got: list[int] = []
    with pytest.raises(CissError, match="frame 7"):
        for item in Pipeline(counter(10**6), [("pre", lambda x: x), ("infer", infer), ("post", lambda x: x)]):
            got.append(item)
    # what came out is in order without a gap; frames still in flight behind the error are dropped
    assert got == list(range(len(got))) and len(got) <= 7 and threading.active_count() == before


def test_stop_flushes_the_items_in_flight_and_reads_no_more():
    stop = threading.Event()
    reads: list[int] = []
    source = counter(10**6)

    def produce() -> int | None:
        reads.append(item := source())
        return item

    got = []
    for item in Pipeline(produce, [("slow", jittered(0.005)), ("b", lambda x: x)], stop=stop, depth=2):
        got.append(item)
        if item == 10:
            stop.set()
    assert got == reads and got[:11] == list(range(11))  # every item read came out, in order


def test_the_in_flight_cap_holds_back_reading():
    in_flight, most = 0, 0
    lock = threading.Lock()
    source = counter(50)

    def produce() -> int | None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        return source()

    for _ in Pipeline(produce, [("a", lambda x: x), ("b", lambda x: x), ("c", lambda x: x)], in_flight=2):
        time.sleep(0.002)
        with lock:
            in_flight -= 1
    assert most == 2


def test_the_thread_split_leaves_cores_for_the_other_stages():
    assert (thread_split(cores=2).backend, thread_split(cores=2).opencv) == (1, 1)
    assert (thread_split(cores=8).backend, thread_split(cores=8).opencv) == (4, 4)
    assert (thread_split(cores=1).backend, thread_split(cores=1).opencv) == (1, 1)
    given = thread_split(3, cores=4)
    assert (given.backend, given.opencv, given.chosen) == (3, 1, False)
    assert "inference 1, OpenCV 1 (chosen for 2 cores" in thread_split(cores=2).describe()
    with pytest.raises(CissError, match="--threads -1 is negative"):
        thread_split(-1)


# --- real models, files and folders ----------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Exported:
    return exported(tmp_path_factory)


@pytest.fixture
def repo(models: Exported, tmp_path: Path) -> Path:
    publish(tmp_path / "models", models.v2)
    return tmp_path / "models"


def image_folder(folder: Path, video: Path) -> Path:
    folder.mkdir()
    capture = cv2.VideoCapture(str(video))
    i = 0
    while (frame := capture.read()[1]) is not None:
        cv2.imwrite(str(folder / f"{i:04d}.png"), frame)
        i += 1
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["video", "folder"])
def test_a_stream_gives_every_frame_once_in_order_equal_to_plain_calls(repo: Path, tmp_path: Path, kind: str):
    video = write_video(tmp_path / "clip.mp4", 25)
    spec = str(video if kind == "video" else image_folder(tmp_path / "images", video))
    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as segmenter:
        with open_source(spec) as source, segmenter.stream(source) as stream:
            streamed = list(stream)
        with open_source(spec) as source:
            plain = [(frame, segmenter(frame.image)) for frame in iter(source.read, None)]
    assert [f.index for f, _ in streamed] == [f.index for f, _ in plain] == list(range(25))
    assert [r.seq for _, r in streamed] == list(range(25)) and [r.seq for _, r in plain] == list(range(25, 50))
    for (f1, r1), (f2, r2) in zip(streamed, plain):
        assert np.array_equal(f1.image, f2.image) and np.array_equal(r1.mask, r2.mask)
        assert np.array_equal(r1.confidence, r2.confidence) if r1.confidence is not None else r2.confidence is None
        assert (r1.version, r1.classmap.names, r1.backend) == (r2.version, r2.classmap.names, r2.backend)
        assert list(r1.timings) == list(r2.timings) == ["preprocess", "infer", "postprocess", "total"]


@pytest.mark.slow
def test_a_stop_mid_file_leaves_every_output_complete(repo: Path, tmp_path: Path):
    video = write_video(tmp_path / "clip.mp4", 60)
    stop = threading.Event()
    options = LiveOptions(save=tmp_path / "out.mp4", save_masks=tmp_path / "masks", stats=tmp_path / "stats.jsonl")

    def on_frame(result: Result) -> None:
        if result.seq == 10:
            stop.set()  # what SIGINT does (stop_on_signals)

    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as segmenter, \
            open_source(str(video)) as source:
        report = run_live(source, segmenter, options, log=lambda s: None, stop=stop, on_frame=on_frame)
    frames = report["frames"]
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert 10 < frames < 60 and [r["frame"] for r in records] == list(range(frames))
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == [f"{i:06d}.png" for i in range(frames)]
    assert int(cv2.VideoCapture(str(tmp_path / "out.mp4")).get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    assert set(report["stage_ms"]) == {"read", "preprocess", "infer", "postprocess", "render", "write"}


@pytest.mark.slow
def test_a_frame_that_fails_mid_folder_is_one_line_and_exit_2(repo: Path, tmp_path: Path):
    folder = image_folder(tmp_path / "images", write_video(tmp_path / "clip.mp4", 12))
    (folder / "0006.png").write_bytes(b"not a png")
    out = cli("live", "--source", str(folder), "--repo", str(repo), "--name", NAME, "--headless",
              "--save", str(tmp_path / "out.mp4"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1] == f"error: cannot decode image {folder / '0006.png'}: not an image or corrupt"
    assert "Traceback" not in out.stderr
    assert "threads: inference" in out.stderr and "chosen for" in out.stderr  # the split is said once
    assert out.stderr.count("threads: inference") == 1

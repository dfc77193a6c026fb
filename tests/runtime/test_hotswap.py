"""Hot swap with real ONNX Runtime sessions: versions published while frames are being segmented,
good ones swapped in between two frames, corrupt ones refused while the old version keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from tiny_models import NAME, SIZE, Exported, exported, manifest_of, publish

from ciss.apps.cli import main
from ciss.errors import CissError
from ciss.repository import ModelRepository
from ciss.runtime.hotswap import watch_folder
from ciss.runtime.model import Result
from ciss.runtime.segmenter import Segmenter

pytestmark = pytest.mark.slow
FRAME = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Exported:
    return exported(tmp_path_factory)


class Events:
    """on_error and on_swap callbacks that tests can wait on."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.swaps: list[tuple[int, int]] = []
        self._changed = threading.Condition()

    def on_error(self, e: Exception) -> None:
        with self._changed:
            self.errors.append(e)
            self._changed.notify_all()

    def on_swap(self, old: int, new: int) -> None:
        self.swaps.append((old, new))

    def wait_for_errors(self, n: int, timeout: float = 15) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.errors) >= n, timeout)


def serve(repo: Path, events: Events, watch: bool = False) -> Segmenter:
    return Segmenter.from_repository(repo, NAME, watch=watch, poll_s=0.05, on_swap=events.on_swap,
                                     on_error=events.on_error, log=lambda s: None)


def next_number(repo: Path) -> int:
    return 1 + max(int(p.name) for p in (repo / NAME).iterdir() if p.name.isdigit())


def publish_bad_sha256(repo: Path, source: Path) -> int:
    """A version whose model.onnx no longer matches its manifest (one byte flipped), appearing
    atomically as a publish would."""
    version = next_number(repo)
    staging = repo / NAME / ".copy"
    shutil.copytree(source, staging)
    data = bytearray((staging / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (staging / "model.onnx").write_bytes(bytes(data))
    manifest = manifest_of(staging) | {"version": version}
    (staging / "manifest.json").write_text(json.dumps(manifest))
    os.rename(staging, repo / NAME / str(version))
    return version


def constant_mask_graph(path: Path, class_id: int) -> Path:
    """A valid graph whose mask is `class_id` everywhere: it loads and runs, but its outputs are wrong."""
    nodes = [helper.make_node("ReduceMax", ["images", "axes"], ["top"], keepdims=0),
             helper.make_node("Mul", ["top", "zero"], ["zeros"]),
             helper.make_node("Add", ["zeros", "id"], ["ids"]),
             helper.make_node("Cast", ["ids"], ["mask"], to=TensorProto.UINT8)]
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
                    numpy_helper.from_array(np.array(0, np.float32), "zero"),
                    numpy_helper.from_array(np.array(class_id, np.float32), "id")]
    graph = helper.make_graph(nodes, "constant",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *SIZE])],
                              [helper.make_tensor_value_info("mask", TensorProto.UINT8, [1, *SIZE])], initializers)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), str(path))
    return path


def test_a_new_version_is_swapped_in_between_two_frames(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events)
    results = [seg(FRAME) for _ in range(3)]
    publish(repo, models.v2)
    assert seg.check_updates() == 2 and seg.wait_for_pending(0)
    assert seg.version == 1 and events.swaps == []  # parked, not yet serving
    results += [seg(FRAME) for _ in range(3)]
    seg.close()

    assert [r.seq for r in results] == list(range(6))
    assert [r.version for r in results] == [1, 1, 1, 2, 2, 2]
    assert [len(r.classmap) for r in results] == [5, 5, 5, 7, 7, 7]
    assert [r.new_classes for r in results] == [[], [], [], [5, 6], [5, 6], [5, 6]]
    assert all(r.mask.shape == FRAME.shape[:2] and r.mask.max() < len(r.classmap) for r in results)
    assert events.swaps == [(1, 2)] and events.errors == []
    (stats,) = seg.swaps
    assert (stats["version"], stats["previous"], stats["seq"], stats["new_classes"]) == (2, 1, 3, [5, 6])
    assert all(stats[k] > 0 for k in ("verify_s", "load_s", "warmup_s", "validate_s"))
    assert 0 <= stats["swap_ms"] < results[3].timings["total"]


def test_corrupt_versions_are_refused_while_the_old_one_serves(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events, watch=True)
    served: list[Result] = [seg(FRAME)]

    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((models.v2 / "model.onnx").read_bytes()[:5000])
    fewer = manifest_of(models.v1)["classes"][:-1]
    bad = [lambda: publish_bad_sha256(repo, models.v2),
           lambda: publish(repo, models.v2, files={"model.onnx": truncated}),
           lambda: publish(repo, models.v1, classes=fewer, allow_class_change=True),
           lambda: publish(repo, models.v2, files={"model.onnx": constant_mask_graph(tmp_path / "c.onnx", 250)})]
    for n, publish_bad in enumerate(bad, 1):
        publish_bad()
        assert events.wait_for_errors(n), f"bad version {n + 1} was not reported"
        served += [seg(FRAME) for _ in range(2)]
    messages = [str(e) for e in events.errors]
    assert all(isinstance(e, CissError) for e in events.errors)
    assert "version 2 refused: model version" in messages[0] and "does not match its sha256" in messages[0]
    assert "version 3 refused: ONNX Runtime cannot load" in messages[1]
    assert "version 4 refused: its class map does not extend version 1's (class 4 'box' was removed)" in messages[2]
    assert "version 5 refused: its mask holds class id 250 but its class map has only 7 classes" in messages[3]
    assert all(m.endswith("; still serving version 1") and "\n" not in m for m in messages)

    good = publish(repo, models.v2)
    assert seg.wait_for_pending(15)
    served += [seg(FRAME) for _ in range(2)]
    seg.close()
    assert [r.version for r in served] == [1] * 9 + [good] * 2 and [r.seq for r in served] == list(range(11))
    assert len(events.errors) == 4, "a refused version was tried again"
    assert events.swaps == [(1, good)] and served[-1].new_classes == [5, 6]


def test_a_newer_version_replaces_one_still_pending(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events)
    publish(repo, models.v2)
    assert seg.check_updates() == 2
    publish(repo, models.v2)
    assert seg.check_updates() == 3 and seg.check_updates() is None
    assert seg(FRAME).version == 3
    assert [(s["previous"], s["version"]) for s in seg.swaps] == [(1, 3)] and events.swaps == [(1, 3)]
    seg.close()


def test_a_refused_copy_is_tried_again_only_once_its_files_change(models: Exported, tmp_path: Path):
    """A version copied by hand (not published atomically) can be seen half-written."""
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events)
    folder = repo / NAME / "2"
    folder.mkdir()
    (folder / "manifest.json").write_text((models.v2 / "manifest.json").read_text())
    onnx_bytes = (models.v2 / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(onnx_bytes[:1000])
    assert seg.check_updates() is None and len(events.errors) == 1
    assert seg.check_updates() is None and len(events.errors) == 1  # unchanged: not tried again
    (folder / "model.onnx").write_bytes(onnx_bytes)
    assert seg.check_updates() == 2 and seg(FRAME).version == 2
    seg.close()


def test_frames_from_two_threads_during_a_watched_swap(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events, watch=True)
    results: list[Result] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            results.append(seg(FRAME))

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    count = len(results)
    publish(repo, models.v2)
    assert seg.wait_for_pending(15)
    deadline = time.monotonic() + 15
    while (not seg.swaps or len(results) < count + 20) and time.monotonic() < deadline:
        stop.wait(0.01)
    stop.set()
    for t in threads:
        t.join()
    seg.close()

    ordered = sorted(results, key=lambda r: r.seq)
    assert [r.seq for r in ordered] == list(range(len(ordered)))
    first_new = seg.swaps[0]["seq"]
    assert [r.version for r in ordered] == [1] * first_new + [2] * (len(ordered) - first_new)
    assert all(len(r.classmap) == {1: 5, 2: 7}[r.version] and r.mask.max() < len(r.classmap) for r in ordered)


def test_inotify_reports_a_published_version_and_ignores_dot_entries(tmp_path: Path):
    watch = watch_folder(tmp_path)
    assert watch.mode == "inotify"
    (tmp_path / ".staging-x").mkdir()
    assert watch.wait(0.05) is False
    os.rename(tmp_path / ".staging-x", tmp_path / "1")
    assert watch.wait(5) is True
    assert watch.wait(0.05) is False
    watch.wake()
    assert watch.wait(5) is False
    watch.close()
    polling = watch_folder(tmp_path, inotify=False)
    assert polling.mode == "polling" and polling.wait(0.01) is False
    polling.close()


def copy_as_next_version(repo: Path, source: Path, corrupt: bool = False, **manifest_changes) -> Path:
    """A hand-made version folder (as a bad copy or a hostile writer would leave it), renamed in atomically."""
    version = next_number(repo)
    staging = repo / NAME / ".copy"
    shutil.copytree(source, staging)
    if corrupt:  # bit rot in the weights: the graph still loads, its masks are wrong
        data = bytearray((staging / "model.onnx").read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 4000, 4):
            data[i] ^= 0x40
        (staging / "model.onnx").write_bytes(bytes(data))
    (staging / "manifest.json").write_text(json.dumps(manifest_of(staging) | {"version": version} | manifest_changes))
    os.rename(staging, repo / NAME / str(version))
    return repo / NAME / str(version)


def test_a_manifest_that_lists_no_files_is_refused_and_not_verified(models: Exported, tmp_path: Path):
    """`files: {}` used to skip every hash: a bit-rotted model.onnx was served and `models verify` passed."""
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events)
    bad = copy_as_next_version(repo, models.v2, corrupt=True, files={})
    assert seg.check_updates() is None and seg(FRAME).version == 1
    (error,) = events.errors
    assert "version 2 refused" in str(error) and "lists no files" in str(error)
    seg.close()
    with pytest.raises(CissError, match="lists no files"):
        Segmenter.from_repository(repo, NAME, version=2, watch=False, log=lambda s: None)
    out = CliRunner().invoke(main, ["models", "verify", str(repo)])
    assert out.exit_code == 2 and out.stdout.splitlines() == [
        f"{NAME}/2: manifest lists no files (each file needs its sha256 and size)"], out.output
    # A file the backend opens but the manifest leaves out is refused the same way.
    listed = manifest_of(models.v2)["files"]
    (bad / "manifest.json").write_text(json.dumps(manifest_of(bad) | {"files": {"other.bin": listed["model.onnx"]}}))
    with pytest.raises(CissError, match="model.onnx is used by the model but not listed with its sha256 and size"):
        Segmenter.from_repository(repo, NAME, version=2, watch=False, log=lambda s: None)


def test_a_model_file_outside_the_version_folder_is_refused(models: Exported, tmp_path: Path):
    """An int8 path of ../../../outside/model.onnx was loaded, unhashed, by --backend ort-int8."""
    repo = tmp_path / "models"
    (tmp_path / "outside").mkdir()
    shutil.copyfile(models.v1 / "model.onnx", tmp_path / "outside" / "model.onnx")
    escape = "../../../outside/model.onnx"
    version = publish(repo, models.v1, variants={"int8": {"file": escape}})
    assert (repo / NAME / str(version) / escape).resolve() == (tmp_path / "outside" / "model.onnx").resolve()
    with pytest.raises(CissError, match="'../../../outside/model.onnx' is not a file name inside the version folder"):
        Segmenter.from_repository(repo, NAME, backend="ort-int8", watch=False, log=lambda s: None)
    (problem,) = ModelRepository(repo).verify()
    assert "is not a file name inside the version folder" in problem.message
    # A listed file that is a link out of the folder is refused too.
    link = copy_as_next_version(repo, models.v1)
    (link / "model.onnx").unlink()
    (link / "model.onnx").symlink_to(tmp_path / "outside" / "model.onnx")
    with pytest.raises(CissError, match="model.onnx links to .*, outside the version folder"):
        Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None)


def test_a_version_folder_linked_outside_the_repository_is_refused(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)
    events = Events()
    seg = serve(repo, events)
    elsewhere = tmp_path / "elsewhere" / "2"
    shutil.copytree(models.v2, elsewhere)
    (elsewhere / "manifest.json").write_text(json.dumps(manifest_of(elsewhere) | {"version": 2}))
    (repo / NAME / "2").symlink_to(elsewhere, target_is_directory=True)
    assert seg.check_updates() is None and seg(FRAME).version == 1
    (error,) = events.errors
    assert "version 2 refused" in str(error) and "outside the repository" in str(error)
    seg.close()
    out = CliRunner().invoke(main, ["models", "verify", str(repo)])
    assert out.exit_code == 2 and "2: " in out.stdout and "outside the repository" in out.stdout, out.output
    # A link that stays inside the repository is followed.
    (repo / NAME / "2").unlink()
    inside = repo / "shelf" / "2"
    shutil.copytree(elsewhere, inside)
    (repo / NAME / "2").symlink_to(inside, target_is_directory=True)
    with Segmenter.from_repository(repo, NAME, watch=False, log=lambda s: None) as seg:
        assert seg.version == 2

"""Segmenter on real exported versions: what a Result holds, pre/post-processing against a direct ONNX
Runtime run, the three output kinds an export can have, pinning, and the errors users can cause."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tiny_models import SIZE, Exported, exported, publish

from ciss.errors import CissError
from ciss.export import onnx as ox
from ciss.export.verify import cpu_session, to_input
from ciss.manifest import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from ciss.runtime.model import mask_from_logits
from ciss.runtime.segmenter import Segmenter
from ciss.sizes import input_size
from ciss.synthetic import render_scene
from ciss.trainer.data.transforms import Normalise

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Exported:
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def repo(models: Exported, tmp_path_factory) -> Path:
    """Versions 1 and 2 as exported."""
    root = tmp_path_factory.mktemp("segmenter") / "models"
    publish(root, models.v1)
    publish(root, models.v2)
    return root


def quiet(_: str) -> None:
    pass


def frame_bgr(size: tuple[int, int] = (120, 160), seed: int = 0) -> np.ndarray:
    rgb = render_scene(np.random.default_rng(seed), *size)[0]
    return np.ascontiguousarray(rgb[..., ::-1])


def test_a_result_is_the_graph_mask_at_frame_size(repo: Path):
    with Segmenter.from_repository(repo, "robot", watch=False, log=quiet) as seg:
        assert seg.version == 2 and len(seg.classmap) == 7 and seg.backend == "onnxruntime:CPUExecutionProvider"
        frames = [frame_bgr(seed=i) for i in range(3)]
        results = [seg(f) for f in frames]
    assert [r.seq for r in results] == [0, 1, 2] and {r.version for r in results} == {2}
    r = results[-1]
    assert r.mask.shape == (120, 160) and r.mask.dtype == np.uint8 and r.confidence is None
    assert r.classmap.names[5:] == ["water", "sand"] and r.new_classes == []
    assert set(r.timings) == {"preprocess", "infer", "postprocess", "total"} and r.timings["total"] > 0

    # The same frame through the exporter's own preprocessing and a plain session, resized by nearest.
    rgb = frames[-1][..., ::-1]
    x = to_input(np.ascontiguousarray(rgb), SIZE, Normalise(IMAGENET_MEAN, IMAGENET_STD))
    (mask,) = cpu_session(str(repo / "robot" / "2" / "model.onnx")).run(None, {"images": x})
    expected = cv2.resize(mask[0], (160, 120), interpolation=cv2.INTER_NEAREST_EXACT)
    assert (r.mask == expected).mean() >= 0.999


def test_pinned_version_does_not_follow(repo: Path):
    seg = Segmenter.from_repository(repo, "robot", version=1, log=quiet)
    try:
        assert seg.version == 1 and len(seg.classmap) == 5
        assert seg.check_updates() is None and seg(frame_bgr()).version == 1
    finally:
        seg.close()


def test_user_errors_are_clear(repo: Path, tmp_path: Path):
    with pytest.raises(CissError, match="unknown backend 'gpu'"):
        Segmenter.from_repository(tmp_path / "nowhere", "robot", backend="gpu")
    with pytest.raises(CissError, match=r"model repository .*nowhere does not exist"):
        Segmenter.from_repository(tmp_path / "nowhere", "robot")
    with pytest.raises(CissError, match=r"no model 'drone' in .*\(models: robot\)"):
        Segmenter.from_repository(repo, "drone")
    with pytest.raises(CissError, match=r"model 'robot' has no version 9 \(versions: 1, 2\)"):
        Segmenter.from_repository(repo, "robot", version=9)
    seg = Segmenter.from_repository(repo, "robot", watch=False, log=quiet)
    with pytest.raises(CissError, match="a frame must be a BGR uint8"):
        seg(np.zeros((120, 160), np.uint8))
    seg.close()
    with pytest.raises(CissError, match="closed"):
        seg(frame_bgr())


def export_with_outputs(model_onnx: Path, outputs: str, dst: Path) -> onnx.ModelProto:
    """The exported graph with another tail: `logits` only, or `mask+confidence`."""
    model = onnx.load(str(model_onnx))
    classes = 7
    kept = [n for n in model.graph.node if not {"ciss_argmax", "mask"} & set(n.output)]
    del model.graph.node[:], model.graph.output[:]
    model.graph.node.extend(kept)
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes, *SIZE]))
    final = ox.add_tail(model, outputs)
    onnx.save_model(final, str(dst))
    return final


def test_logits_and_confidence_outputs_give_the_same_mask(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v2)
    for outputs in ("mask+confidence", "logits"):
        graph = export_with_outputs(models.v2 / "model.onnx", outputs, tmp_path / f"{outputs}.onnx")
        publish(repo, models.v2, files={"model.onnx": tmp_path / f"{outputs}.onnx"}, outputs=ox.output_specs(graph))
    frame = frame_bgr(seed=5)
    results = []
    for version in (1, 2, 3):
        with Segmenter.from_repository(repo, "robot", version=version, log=quiet) as seg:
            results.append(seg(frame))
    plain, with_confidence, logits = results
    assert (with_confidence.mask == plain.mask).all() and (logits.mask == plain.mask).all()
    for r in (with_confidence, logits):
        assert r.confidence is not None and r.confidence.shape == (120, 160) and r.confidence.dtype == np.float32
        assert 0 <= r.confidence.min() and r.confidence.max() <= 1
    np.testing.assert_allclose(logits.confidence, with_confidence.confidence, atol=1e-5)


def test_calls_from_several_threads_are_numbered_once_each(repo: Path):
    seg = Segmenter.from_repository(repo, "robot", watch=False, log=quiet)
    seqs: list[int] = []
    frames = [frame_bgr(seed=i) for i in range(4)]

    def worker() -> None:
        seqs.extend(seg(f).seq for f in frames)  # list.extend is atomic under the GIL

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seg.close()
    assert sorted(seqs) == list(range(12))


def test_dynamic_input_size_follows_the_frame_in_stride_steps():
    spec = InputSpec.from_json({"size": None, "stride": 16, "min_size": [32, 32], "max_size": [4096, 4096]})
    assert input_size(spec, (480, 640)) == (480, 640)
    assert input_size(spec, (250, 333)) == (256, 336)
    assert input_size(spec, (10, 9000)) == (32, 4096)
    assert input_size(InputSpec.from_json({"size": [48, 64]}), (480, 640)) == (48, 64)


def test_masks_from_logits_widen_past_255_classes():
    logits = np.zeros((300, 2, 3), np.float32)
    logits[299, 1, 2] = 5
    mask, confidence = mask_from_logits(logits)
    assert mask.dtype == np.uint16 and mask[1, 2] == 299 and mask[0, 0] == 0
    assert confidence[0, 0] == pytest.approx(1 / 300) and confidence[1, 2] == pytest.approx(np.e**5 / (np.e**5 + 299))
    assert mask_from_logits(logits[:7])[0].dtype == np.uint8

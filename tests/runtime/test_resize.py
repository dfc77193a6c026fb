"""Stretch and letterbox on real ONNX Runtime sessions: where a frame lands in the input, what the
padding holds, that the mask comes back at the frame's size without the padding or a shift, and
the one warning a stretched frame of another shape gets."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tiny_models import Exported, exported, loaded, manifest_of, publish

from ciss.errors import CissError
from ciss.export import onnx as ox
from ciss.manifest import InputSpec
from ciss.repository import ModelRepository
from ciss.runtime.model import Model
from ciss.runtime.segmenter import Segmenter
from ciss.sizes import Box, placement
from ciss.synthetic import render_scene

pytestmark = pytest.mark.slow
SIDE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Exported:
    return exported(tmp_path_factory)


def quiet(_: str) -> None:
    pass


def red_where_positive(path: Path) -> None:
    """A SIDE×SIDE graph whose mask is 1 where the normalised red channel is above -0.5: red frame
    pixels and the padding (0 after normalisation), not black frame pixels (about -2.1)."""
    nodes = [helper.make_node("Slice", ["images", "start", "end", "axis"], ["red"]),
             helper.make_node("Greater", ["red", "threshold"], ["above"]),
             helper.make_node("Squeeze", ["above", "axis"], ["flat"]),
             helper.make_node("Cast", ["flat"], ["mask"], to=TensorProto.UINT8)]
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("start", 0), ("end", 1), ("axis", 1))]
    consts.append(helper.make_tensor("threshold", TensorProto.FLOAT, [], [-0.5]))
    graph = helper.make_graph(nodes, "red",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
                              [helper.make_tensor_value_info("mask", TensorProto.UINT8, [1, SIDE, SIDE])], consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", ox.OPSET)], ir_version=10), str(path))


@pytest.fixture(scope="module")
def red_model(models: Exported, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resize")
    red_where_positive(root / "red.onnx")
    spec = {**manifest_of(models.v1)["input"], "size": [SIDE, SIDE], "example_size": [SIDE, SIDE]}
    repo = root / "models"
    version = publish(repo, models.v1, files={"model.onnx": root / "red.onnx"}, input=spec,
                      outputs=[{"name": "mask", "dtype": "uint8", "shape": [1, SIDE, SIDE]}])
    return ModelRepository(repo).path("robot", version)


def load(path: Path, resize: str) -> Model:
    return Model.load(path, loaded(path), "ort-cpu", 1, quiet, resize)


def test_letterbox_pads_with_the_mean_pixel_and_crops_the_mask_back_without_a_shift(red_model: Path):
    frame = np.zeros((90, 160, 3), np.uint8)  # 16:9 into a square input
    frame[20:60, 100:140, 2] = 255            # a red rectangle (BGR)
    model = load(red_model, "letterbox")
    x = model.preprocess(frame)
    # 160 -> 64 wide, so 90 -> 36 high, centred: rows 14..49 hold the frame, the rest is padding.
    assert x.shape == (1, 3, SIDE, SIDE)
    assert np.all(x[:, :, :14] == 0) and np.all(x[:, :, 50:] == 0) and np.all(x[:, :, 14:50] != 0)
    mask, _, _ = model.run(frame)
    assert mask.shape == (90, 160)
    rect = np.zeros((90, 160), np.uint8)
    rect[20:60, 100:140] = 1
    kernel = np.ones((7, 7), np.uint8)   # 2.5 frame pixels per input pixel: edges may move by up to 3
    assert np.all(mask[cv2.erode(rect, kernel) == 1] == 1), "the rectangle is shifted or shrunk"
    assert np.all(mask[cv2.dilate(rect, kernel) == 0] == 0), "padding or a shifted rectangle shows in the mask"

    stretched = load(red_model, "stretch")
    assert np.all(stretched.preprocess(frame) != 0)  # fills the input: no padding
    assert (stretched.run(frame)[0] == rect).mean() > 0.98


def test_a_dynamic_graph_is_letterboxed_by_padding_up_to_the_stride():
    spec = InputSpec.from_json({"size": None, "stride": 16, "min_size": [32, 32], "max_size": [4096, 4096]})
    assert placement(spec, (180, 240), "letterbox") == ((192, 240), Box(6, 0, 180, 240))  # no resampling
    assert placement(spec, (180, 240), "stretch") == ((176, 240), Box(0, 0, 176, 240))
    fixed = InputSpec.from_json({"size": [176, 240]})
    assert placement(fixed, (540, 960), "letterbox") == ((176, 240), Box(20, 0, 135, 240))
    assert placement(fixed, (100, 100), "letterbox") == ((176, 240), Box(0, 32, 176, 176))  # scaled up to fit


def test_the_aspect_warning_is_said_once_for_stretch_and_never_for_letterbox(models: Exported, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, models.v1)  # 48x64 (4:3)
    frames = [np.ascontiguousarray(render_scene(np.random.default_rng(0), 120, 160)[0][..., ::-1])]  # 4:3 first
    frames += [np.ascontiguousarray(render_scene(np.random.default_rng(i), 90, 160)[0][..., ::-1]) for i in range(3)]
    warnings = {}
    for resize in ("stretch", "letterbox"):
        said: list[str] = []
        with Segmenter.from_repository(repo, "robot", watch=False, resize=resize, log=said.append) as seg:
            results = [seg(f) for f in frames]
        assert [r.mask.shape for r in results] == [(120, 160)] + [(90, 160)] * 3
        warnings[resize] = [s for s in said if "aspect ratio" in s]
    assert warnings == {"letterbox": [], "stretch": [
        "frames of 90x160 are stretched to version 1's input 48x64, changing their aspect ratio by 33%; "
        "--resize letterbox keeps it, or export with --size 48x80"]}


def test_an_unknown_resize_mode_is_one_line(models: Exported, tmp_path: Path):
    with pytest.raises(CissError, match="^unknown --resize 'squash'; choose one of stretch, letterbox$"):
        Segmenter.from_repository(tmp_path, "robot", resize="squash")

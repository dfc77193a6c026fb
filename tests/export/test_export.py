"""`ciss export`: real torch.onnx exports of a tiny two-step run, checked by real ONNX Runtime sessions."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CISS, REPO, make_folder_dataset, write_config
from onnx import TensorProto, helper
from torch import nn

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.export import onnx as ox
from ciss.export.pipeline import ExportOptions, export_step
from ciss.export.verify import cpu_session, to_input
from ciss.manifest import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, Normalisation
from ciss.repository import ModelRepository
from ciss.runtime.model import Model
from ciss.trainer.data.transforms import Normalise
from ciss.trainer.learn import learn
from ciss.trainer.store import RunStore

NORMALISE = Normalise(IMAGENET_MEAN, IMAGENET_STD)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Step 0 learns four classes, step 1 adds two: the export sees a grown, fused head."""
    root = tmp_path_factory.mktemp("export")
    config = write_config(root / "fast.toml", size=8)
    run = root / "run"
    learn(run, classes=["sky", "grass", "disk", "box"], config_file=config, method="ft", log=lambda s: None)
    learn(run, new_classes=["triangle", "ring"], method="mib", log=lambda s: None)
    return run


def quiet(_: str) -> None:
    pass


def scene(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    from ciss.synthetic import render_scene

    return render_scene(np.random.default_rng(seed), *size)[0]


def test_fixed_size_export_round_trips_its_metadata(run: Path, tmp_path: Path):
    result = export_step(run, tmp_path / "models", "robot", ExportOptions(size=(48, 64), outputs="mask+confidence"),
                         log=quiet)
    assert result.version == 1 and sorted(p.name for p in result.path.iterdir()) == ["manifest.json", "model.onnx"]
    session = cpu_session(str(result.path / "model.onnx"))
    meta = ox.read_metadata(session.get_modelmeta().custom_metadata_map)
    classmap = RunStore(run).classmap(1)
    assert ClassMap.from_json(meta["classes"]) == classmap
    assert meta["step"] == 1 and meta["model_version"] == 1 and meta["precision"] == "fp32"
    assert meta["input"]["size"] == [48, 64] and meta["input"]["mean"] == list(IMAGENET_MEAN)
    assert meta["exporter"]["opset"] == ox.OPSET and meta["exporter"]["torch"] == torch.__version__
    assert onnx.load(str(result.path / "model.onnx")).model_version == 1
    assert result.manifest.to_json()["outputs"] == meta["outputs"] == [
        {"name": "mask", "dtype": "uint8", "shape": [1, 48, 64]},
        {"name": "confidence", "dtype": "float32", "shape": [1, 48, 64]}]
    assert result.manifest.to_json()["parity"]["mask_agreement"] >= 0.999

    model, _ = RunStore(run).load(1)
    x = to_input(scene((48, 64)), (48, 64), NORMALISE)
    mask, confidence = session.run(None, {"images": x})
    with torch.no_grad():
        probs = model.eval()(torch.from_numpy(x)).softmax(1)
    assert mask.dtype == np.uint8 and mask.shape == (1, 48, 64)
    assert (mask == probs.argmax(1).numpy()).mean() >= 0.999
    np.testing.assert_allclose(confidence, probs.max(1).values.numpy(), atol=1e-4)


def test_a_fixed_size_graph_refuses_other_sizes(run: Path, tmp_path: Path):
    result = export_step(run, tmp_path / "models", "robot", ExportOptions(size=(48, 64)), log=quiet)
    session = cpu_session(str(result.path / "model.onnx"))
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"images": np.zeros((1, 3, 64, 64), np.float32)})


def test_dynamic_export_is_checked_at_three_sizes_and_runs_at_others(run: Path, tmp_path: Path):
    result = export_step(run, tmp_path / "models", "robot", ExportOptions(size=(48, 64), dynamic=True), log=quiet)
    parity = result.manifest.to_json()["parity"]
    assert [s["size"] for s in parity["sizes"]] == [[48, 64], [32, 32], [75, 85]]
    assert all(s["mask_agreement"] >= 0.999 for s in parity["sizes"])
    assert result.manifest.to_json()["input"]["size"] is None and result.manifest.to_json()["input"]["dynamic"]
    assert result.manifest.to_json()["outputs"][0]["shape"][1:] == ["height", "width"]
    session = cpu_session(str(result.path / "model.onnx"))
    model, _ = RunStore(run).load(1)
    x = to_input(scene((57, 91), seed=3), (57, 91), NORMALISE)
    (mask,) = session.run(None, {"images": x})
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).argmax(1).numpy()
    assert mask.shape == (1, 57, 91) and (mask == expected).mean() >= 0.999


def test_logits_output_and_wide_class_maps(run: Path):
    model, _ = RunStore(run).load(1)
    logits = ox.export_logits(model.fused(), (32, 48), dynamic=False)
    graph = ox.add_tail(logits, "logits")
    assert [o.name for o in graph.graph.output] == ["logits"]
    x = to_input(scene((32, 48)), (32, 48), NORMALISE)
    (out,) = cpu_session(graph).run(None, {"images": x})
    with torch.no_grad():
        np.testing.assert_allclose(out, model.eval()(torch.from_numpy(x)).numpy(), atol=1e-4)

    # Past 255 classes the mask no longer fits a byte: the tail switches to uint16.
    wide = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])], "wide",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 300, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 300, 2, 2])]),
        opset_imports=[helper.make_opsetid("", ox.OPSET)], ir_version=10)
    scores = np.zeros((1, 300, 2, 2), np.float32)
    scores[0, 299, 1, 1] = 1
    (mask,) = cpu_session(ox.add_tail(wide, "mask")).run(None, {"images": scores})
    assert mask.dtype == np.uint16 and mask[0, 1, 1] == 299 and mask[0, 0, 0] == 0


def test_dynamic_export_is_refused_for_pyramid_pooling():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2))
    assert "fixed --size" in ox.dynamic_unsupported_reason(net)
    assert ox.dynamic_unsupported_reason(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))) is None
    with pytest.raises(CissError, match="cannot export with --dynamic: module 1 pools to a"):
        ox.export_logits(net, (32, 32), dynamic=True)


def test_int8_qdq_variant_and_its_measured_drop(run: Path, tmp_path: Path):
    result = export_step(run, tmp_path / "models", "robot",
                         ExportOptions(size=(48, 64), precision="int8", calib_images=8), log=quiet)
    int8 = result.manifest.to_json()["variants"]["int8"]
    graph = onnx.load(str(result.path / "model.int8.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8["format"] == "QDQ" and int8["calibration_images"] == 8 and int8["eval_images"] > 0
    assert int8["miou_drop"] == pytest.approx(int8["miou_fp32"] - int8["miou_int8"])
    assert abs(int8["miou_drop"]) < 0.1  # a tiny synthetic model: int8 should cost little
    fp32 = cpu_session(str(result.path / "model.onnx"))
    q = cpu_session(str(result.path / "model.int8.onnx"))
    x = to_input(scene((48, 64), seed=5), (48, 64), NORMALISE)
    (a,), (b,) = fp32.run(None, {"images": x}), q.run(None, {"images": x})
    assert b.dtype == np.uint8 and b.shape == a.shape
    assert (a == b).mean() > 0.5  # an undertrained tiny net has near-tied logits, so int8 flips some pixels
    assert ModelRepository(tmp_path / "models").verify() == []


def test_versions_must_extend_the_class_map(run: Path, tmp_path: Path):
    repo = tmp_path / "models"
    assert export_step(run, repo, "robot", ExportOptions(step=0, size=(32, 32)), log=quiet).version == 1
    v2 = export_step(run, repo, "robot", ExportOptions(step=1, size=(32, 32)), log=quiet)
    assert v2.version == 2 and v2.manifest.to_json()["parent"] == 1
    with pytest.raises(CissError, match="does not extend"):  # step 0 again: triangle and ring would vanish
        export_step(run, repo, "robot", ExportOptions(step=0, size=(32, 32)), log=quiet)
    assert ModelRepository(repo).versions("robot") == [1, 2]
    forced = export_step(run, repo, "robot", ExportOptions(step=0, size=(32, 32), allow_class_change=True), log=quiet)
    assert forced.version == 3 and forced.manifest.to_json()["parent"] == 2


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CISS, *args], check=False, capture_output=True, text=True, cwd=REPO)


def test_bad_input_is_one_line_and_publishes_nothing(run: Path, tmp_path: Path):
    repo = tmp_path / "models"
    cases = [
        (["--step", "7"], "has no step 7"),
        (["--name", "../escape"], "name"),
        (["--size", "12x12"], "between 32 and 4096"),
        (["--size", "big"], "is not HxW"),
        (["--size", "40x64"], "is not a multiple of the model's output stride 16 (its mask would drift against "
                              "the image); give --size 32x64 or --size 48x64"),
        (["--precision", "fp16"], "add --trt"),
    ]
    for extra, message in cases:
        args = ["export", "--run", str(run), "--repo", str(repo), "--name", "robot", *extra]
        out = cli(*args)
        assert out.returncode == 2, (extra, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith("error: ") and message in out.stderr, (extra, out.stderr)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    weights = broken / "step-1" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = cli("export", "--run", str(broken), "--repo", str(repo), "--name", "robot")
    assert out.returncode == 2 and "corrupt" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not repo.exists() or ModelRepository(repo).versions("robot") == []


def test_an_unsupported_opset_is_refused_and_the_real_one_recorded(run: Path, tmp_path: Path):
    """--opset 3 used to print a converter traceback and publish an opset-18 graph labelled opset 3."""
    repo = tmp_path / "models"
    for opset in ("3", "99"):
        out = cli("export", "--run", str(run), "--repo", str(repo), "--name", "robot", "--size", "32x32", "--opset", opset)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [
            f"error: --opset {opset} is not supported; choose --opset {ox.MIN_OPSET} to {ox.MAX_OPSET}"], out.stderr
        assert not repo.exists()
    result = export_step(run, repo, "robot", ExportOptions(size=(32, 32), opset=19), log=quiet)
    graph = onnx.load_model(str(result.path / "model.onnx"))
    assert ox.graph_opset(graph) == result.manifest.to_json()["exporter"]["opset"] == 19


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="TensorRT is installed here, so an engine is built")
def test_trt_without_tensorrt_publishes_the_onnx_then_exits_2(run: Path, tmp_path: Path):
    repo = tmp_path / "models"
    out = cli("export", "--run", str(run), "--repo", str(repo), "--name", "robot", "--size", "32x32", "--trt")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: no TensorRT engine built (TensorRT is not installed (pip install tensorrt on a machine with an "
        "NVIDIA GPU)); version 1 holds the ONNX model only")
    assert ModelRepository(repo).versions("robot") == [1] and ModelRepository(repo).verify() == []


def test_the_default_size_is_the_training_images_typical_size_in_stride_multiples(tmp_path: Path):
    """It used to be the first eval image's size: 50x70 here, which no stride-16 network fits."""
    data = make_folder_dataset(tmp_path / "data", size=(50, 70))
    run = tmp_path / "run"
    learn(run, data=data, classes=["b", "c"], config_file=write_config(tmp_path / "fast.toml", synthetic=False),
          method="ft", log=quiet)
    said: list[str] = []
    result = export_step(run, tmp_path / "models", "robot", ExportOptions(), log=said.append)
    assert result.manifest.to_json()["input"]["size"] == [48, 64] and result.manifest.to_json()["input"]["stride"] == 16
    assert ("input size 48x64: 6 images of the step's data are typically 50x70, rounded to multiples of the "
            "output stride 16 (--size HxW to choose)") in said


def test_the_input_spec_takes_the_steps_normalisation_and_imagenets_for_older_steps(run: Path, tmp_path: Path):
    """The exporter reads (mean, std) from the step manifest, and the runtime feeds the graph
    (pixel / 255 - mean) / std with them; a step written before steps recorded it was trained on
    ImageNet's, which its export says."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "step-1" / "manifest.json"
    stored = json.loads(path.read_text())
    assert stored["normalisation"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    own = {"mean": [0.5, 0.25, 0.75], "std": [0.25, 0.5, 0.125]}
    path.write_text(json.dumps({**stored, "normalisation": own}))
    result = export_step(copy, tmp_path / "models", "own", ExportOptions(size=(48, 64)), log=quiet)
    meta = ox.read_metadata(cpu_session(str(result.path / "model.onnx")).get_modelmeta().custom_metadata_map)
    assert (meta["input"]["mean"], meta["input"]["std"]) == (own["mean"], own["std"])
    assert result.manifest.input.normalisation == Normalisation((0.5, 0.25, 0.75), (0.25, 0.5, 0.125))
    model = Model.load(result.path, result.manifest, "ort-cpu", 1, quiet)
    bgr = np.zeros((48, 64, 3), np.uint8)
    bgr[..., 0], bgr[..., 2] = 255, 51  # blue 1.0, red 0.2
    x = model.preprocess(bgr)[0]
    assert np.allclose(x[:, 0, 0], [(0.2 - 0.5) / 0.25, (0 - 0.25) / 0.5, (1 - 0.75) / 0.125], atol=1e-5)
    model.close()

    del stored["normalisation"]
    path.write_text(json.dumps(stored))
    older = export_step(copy, tmp_path / "models", "older", ExportOptions(size=(48, 64)), log=quiet)
    assert older.manifest.input.normalisation == IMAGENET


def test_a_fixed_stride_multiple_export_agrees_with_the_dynamic_one(run: Path, tmp_path: Path):
    """Same size, same function: measured 100% of 8 scenes' pixels; 99.9% is the exporter's own bar."""
    fixed = export_step(run, tmp_path / "models", "fixed", ExportOptions(), log=quiet)
    dynamic = export_step(run, tmp_path / "models", "dynamic", ExportOptions(dynamic=True), log=quiet)
    size = tuple(fixed.manifest.to_json()["input"]["size"])
    assert size == (48, 64) and dynamic.manifest.to_json()["input"]["example_size"] == [48, 64]
    sessions = [cpu_session(str(r.path / "model.onnx")) for r in (fixed, dynamic)]
    agree = total = 0
    for seed in range(8):
        x = to_input(scene(size, seed), size, NORMALISE)
        a, b = (s.run(None, {"images": x})[0] for s in sessions)
        agree, total = agree + int((a == b).sum()), total + a.size
    assert agree / total >= 0.999


def test_the_agreement_benchmark_runs_on_a_tiny_run(run: Path, tmp_path: Path):
    """benchmarks/export_agreement.py end to end: a legacy size off the stride, the default, --dynamic,
    each stretched and letterboxed, on eval scenes and a 16:9 clip; at the frames' own size the
    default export is the dynamic graph's function, so it must agree on every pixel."""
    import sys

    import cv2

    clip = tmp_path / "wide.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (96, 54))
    for seed in range(4):
        writer.write(np.ascontiguousarray(scene((54, 96), seed)[..., ::-1]))
    writer.release()
    out = subprocess.run([sys.executable, "benchmarks/export_agreement.py", "--run", str(run), "--legacy-size", "44x60",
                          "--clip", str(clip), "--images", "6", "--frames", "3"],
                         check=False, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = {tuple(cells[:3]): cells[3:] for line in out.stdout.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert ("export", "input", "resize") in rows and len(rows) == 8
    assert rows[("dynamic", "frame's own size", "native")][:2] == ["100.00%", "100.00%"]
    assert rows[("default", "48x64", "stretch")][0] == "100.00%"
    assert {("legacy", "44x60", "stretch"), ("legacy", "44x60", "letterbox"),
            ("dynamic", "dynamic", "letterbox")} < set(rows)

"""ciss.export.tensorrt: cache naming, precision planning, fp16 conversion here; real engine builds where
TensorRT and a CUDA GPU exist (they skip elsewhere with the reason). The sidecar and the preflight are
tested in tests/test_engines.py."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from ciss import engines
from ciss.engines import LocalGpu
from ciss.errors import CissError
from ciss.export import tensorrt as et
from ciss.manifest import sha256_file

H100 = LocalGpu("10.3.0", "NVIDIA H100 80GB HBM3", (9, 0), "12.4")
SHA = "ab" * 32


class TinySeg(torch.nn.Module):
    """Conv/BN/ReLU, resize back to the input size, probabilities and a class mask: the exported
    model's kinds of nodes, small enough to export in a fraction of a second."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.b(F.relu(self.bn(self.a(x))))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y.softmax(1), y.argmax(1)


def export_tiny(path: Path, size: tuple[int, int] = (32, 48), dynamic: bool = False) -> Path:
    """The TorchScript exporter: ten times faster than dynamo for a test model (its deprecation
    warning is silenced)."""
    torch.manual_seed(0)
    model = TinySeg().eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding them matters
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    axes = {"images": {2: "h", 3: "w"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.rand(1, 3, *size),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["probs", "mask"], dynamic_axes=axes)
    return path


def ort_run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


# --- module import, missing TensorRT --------------------------------------------------------------

def test_importing_the_module_loads_no_torch_tensorrt_or_onnx():
    code = ("import sys, ciss.export.tensorrt; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="TensorRT is installed on this machine")
def test_without_tensorrt_the_build_says_why_in_one_line(tmp_path):
    onnx_path = export_tiny(tmp_path / "model.onnx")
    with pytest.raises(CissError, match="^cannot build a TensorRT engine: TensorRT is not installed"):
        et.build_engine(onnx_path, tmp_path, precision="fp32", workspace_gb=1, calibration=None, profile=None,
                        classmap_version=4, cache_dir=tmp_path)


def test_build_engine_wants_an_existing_onnx(tmp_path):
    with pytest.raises(CissError, match="no ONNX model at"):
        et.build_engine(tmp_path / "missing.onnx", tmp_path, precision="fp32", workspace_gb=1, calibration=None,
                        profile=None, classmap_version=4, cache_dir=tmp_path)


# --- cache names ----------------------------------------------------------------------------------

def test_timing_cache_is_per_gpu_and_tensorrt_version(tmp_path):
    assert et.gpu_tag(H100) == "sm90-nvidia-h100-80gb-hbm3"
    assert et.timing_cache_path(tmp_path, H100) == tmp_path / "timing-sm90-nvidia-h100-80gb-hbm3-trt10.3.0.cache"
    a10 = LocalGpu("10.3.0", "NVIDIA A10", (8, 6), "12.4")
    rtx = LocalGpu("10.3.0", "NVIDIA GeForce RTX 3090", (8, 6), "12.4")
    assert et.timing_cache_path(tmp_path, a10) != et.timing_cache_path(tmp_path, rtx)  # same SM, other timings


def test_calibration_cache_is_keyed_by_the_onnx(tmp_path):
    assert et.calibration_cache_path(tmp_path, SHA, "10.3.0") == tmp_path / f"calib-{SHA[:16]}-trt10.3.0.cache"


# --- precision planning ----------------------------------------------------------------------------

@pytest.mark.parametrize("precision, graph, major, strongly_typed", [
    ("fp32", "fp32", 10, False), ("fp16", "fp32", 10, False), ("int8", "fp32", 10, False),
    ("fp16", "fp16", 10, True), ("int8", "int8", 10, True),
    ("fp32", "fp32", 11, True), ("fp16", "fp16", 11, True), ("int8", "int8", 12, True),
])
def test_strong_typing_follows_version_and_graph(precision, graph, major, strongly_typed):
    assert et.strongly_typed_build(precision, graph, major) is strongly_typed


@pytest.mark.parametrize("precision, graph, major, match", [
    ("fp16", "fp32", 11, "TensorRT 11 builds strongly typed networks only, so an fp16 engine needs a float16 ONNX"),
    ("int8", "fp32", 11, "needs a QDQ int8 ONNX"),
    ("fp32", "fp16", 10, "an fp32 engine was asked for but the ONNX is fp16"),
    ("int8", "fp16", 11, "an int8 engine was asked for but the ONNX is fp16"),
    ("fp16", "int8", 10, "the ONNX is int8"),
    ("bf16", "fp32", 10, "unknown precision 'bf16'; use one of fp32, fp16, int8"),
])
def test_strong_typing_refuses_a_graph_without_the_precision(precision, graph, major, match):
    with pytest.raises(CissError, match=match):
        et.strongly_typed_build(precision, graph, major)


def qdq_model(path: Path) -> Path:
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_onnx_precision_reads_the_graph(tmp_path):
    fp32 = export_tiny(tmp_path / "model.onnx")
    et.to_float16(fp32, tmp_path / "model.fp16.onnx")
    assert et.onnx_precision(fp32) == "fp32"
    assert et.onnx_precision(tmp_path / "model.fp16.onnx") == "fp16"
    assert et.onnx_precision(qdq_model(tmp_path / "model.int8.onnx")) == "int8"


def test_calibration_batches_are_cut_to_the_engine_batch():
    arrays = [np.zeros((3, 3, 4, 4), np.float64), np.ones((2, 3, 4, 4), np.float32)]
    batches = list(et._calibration_batches(arrays, (2, 3, 4, 4)))
    assert [b.shape for b in batches] == [(2, 3, 4, 4), (2, 3, 4, 4)]  # the odd image is left out
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    with pytest.raises(CissError, match=r"calibration array 0 has shape \[1, 3, 8, 8\]; .* \[1, 3, 4, 4\]"):
        list(et._calibration_batches([np.zeros((1, 3, 8, 8))], (1, 3, 4, 4)))


def test_profile_is_required_for_dynamic_inputs_and_must_name_them():
    calls = []
    builder = types.SimpleNamespace(create_optimization_profile=lambda: types.SimpleNamespace(
        set_shape=lambda *args: calls.append(args)))
    config = types.SimpleNamespace(add_optimization_profile=lambda profile: calls.append("added"))
    dynamic = [types.SimpleNamespace(name="images", shape=(1, 3, -1, -1))]
    with pytest.raises(CissError, match="inputs images have dynamic shapes; give a profile"):
        et._add_profile(builder, config, dynamic, None)
    with pytest.raises(CissError, match="the profile names frames, which the ONNX has no input called"):
        et._add_profile(builder, config, dynamic, {"frames": ((1,), (1,), (1,))})
    assert et._add_profile(builder, config, [types.SimpleNamespace(name="images", shape=(1, 3, 8, 8))], None) is None
    et._add_profile(builder, config, dynamic, {"images": ([1, 3, 8, 8], [1, 3, 16, 16], [1, 3, 32, 32])})
    assert calls == [("images", (1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 32, 32)), "added"]


# --- fp16 conversion --------------------------------------------------------------------------------

def types_of(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


def test_to_float16_converts_a_torch_export(tmp_path):
    src = export_tiny(tmp_path / "model.onnx", dynamic=True)
    et.to_float16(src, tmp_path / "model.fp16.onnx")
    model = onnx.load(str(tmp_path / "model.fp16.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert set(types_of(model).values()) == {TensorProto.FLOAT16}
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input] == [("images", TensorProto.FLOAT)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output] == [
        ("probs", TensorProto.FLOAT), ("mask", TensorProto.INT64)]
    assert {p.key: p.value for p in model.metadata_props} == {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    for size in [(32, 48), (40, 24)]:
        x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
        (p32, m32), (p16, m16) = ort_run(src, x), ort_run(tmp_path / "model.fp16.onnx", x)
        assert p16.dtype == np.float32 and p16.shape == p32.shape
        assert np.abs(p16 - p32).max() < 5e-3
        assert (m16 == m32).mean() > 0.99


def shape_arithmetic_model(path: Path) -> Path:
    """Sizes computed in float from Shape (as older exporters write interpolate), a Resize with
    float scales, float Constants, ConstantOfShape, and an output that is also used inside."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=f),
        helper.make_node("Mul", ["shape_f", "factor"], ["size_f"]),
        helper.make_node("Cast", ["size_f"], ["sizes"], to=TensorProto.INT64),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["up"], mode="nearest"),
        helper.make_node("Mul", ["up", "w"], ["scaled"]),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Add", ["scaled", "half"], ["mid"]),
        helper.make_node("Resize", ["mid", "", "scales"], ["y"], mode="linear"),
        helper.make_node("Shape", ["mid"], ["mid_shape"]),
        helper.make_node("ConstantOfShape", ["mid_shape"], ["ones"],
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["mid", "ones"], ["z"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 1, 1, 2], np.float32), "factor"),
             numpy_helper.from_array(np.array([1, 1, 1, 0.5], np.float32), "scales"),
             numpy_helper.from_array(np.array([[[[0.25]], [[3.0]]]], np.float32), "w")]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", f, [1, 2, 1, "n"])],
                              [helper.make_tensor_value_info(name, f, [1, 2, 1, None]) for name in ("y", "mid", "z")],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_to_float16_keeps_shape_arithmetic_and_scales_in_float32(tmp_path):
    src = shape_arithmetic_model(tmp_path / "shapes.onnx")
    dst = tmp_path / "shapes.fp16.onnx"
    et.to_float16(src, dst)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert types_of(model) == {"factor": TensorProto.FLOAT, "scales": TensorProto.FLOAT, "w": TensorProto.FLOAT16}
    nodes = {n.output[0]: n for n in model.graph.node}
    assert helper.get_attribute_value(nodes["shape_f"].attribute[0]) == TensorProto.FLOAT
    assert helper.get_attribute_value(nodes["half"].attribute[0]).data_type == TensorProto.FLOAT16
    assert helper.get_attribute_value(nodes["ones"].attribute[0]).data_type == TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in model.graph.output] == [TensorProto.FLOAT] * 3
    # 2049 * 2 = 4098 is not a float16 number (4096 and 4100 are): sizes must have stayed float32
    x = np.random.default_rng(0).random((1, 2, 1, 2049), dtype=np.float32)
    for want, got in zip(ort_run(src, x), ort_run(dst, x)):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() < 1e-2
    assert ort_run(dst, x)[1].shape == (1, 2, 1, 4098)


def test_to_float16_refuses_control_flow(tmp_path):
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "branch", [],
                               [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "if",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              str(tmp_path / "if.onnx"))
    with pytest.raises(CissError, match="has control flow"):
        et.to_float16(tmp_path / "if.onnx", tmp_path / "if.fp16.onnx")


# --- real engines (TensorRT + CUDA GPU only) -------------------------------------------------------

@pytest.fixture
def trt():
    module = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it needs an NVIDIA GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    return module


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def run_engine(trt, engine, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run with torch CUDA buffers (runtime.md §4.2): set shapes, bind addresses, enqueue, sync."""
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    buffers = {inputs[0]: torch.from_numpy(x).cuda()}
    assert context.set_input_shape(inputs[0], x.shape)
    for name in names:
        if name not in buffers:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            buffers[name] = torch.from_numpy(np.empty(tuple(context.get_tensor_shape(name)), dtype)).cuda()
        assert context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in names if name not in inputs}


def build_and_compare(trt, tmp_path: Path, onnx_path: Path, precision: str, tolerance: float, **options):
    engine_path, sidecar_path = et.build_engine(
        onnx_path, tmp_path / "engines", precision=precision, workspace_gb=1, classmap_version=4,
        cache_dir=tmp_path / "cache", **{"calibration": None, "profile": None, **options})
    manifest = json.loads(sidecar_path.read_text())
    local = engines.local_gpu()
    assert engine_path.name == f"{engines.engine_tag(local.compute_capability, trt.__version__, precision)}.engine"
    assert sidecar_path == engine_path.with_suffix(".json")
    assert manifest["precision"] == precision and manifest["tensorrt"] == trt.__version__
    assert manifest["onnx"] == {"file": onnx_path.name, "sha256": sha256_file(onnx_path)}
    assert manifest["inputs"]["images"]["dtype"] == "float32"
    assert et.timing_cache_path(tmp_path / "cache", local).stat().st_size > 0
    engine = engines.load_engine(engine_path, engines.EngineManifest.from_json(manifest),
                                 onnx_sha256=manifest["onnx"]["sha256"], classmap_version=4)
    size = tuple(manifest["inputs"]["images"]["shape"][2:])
    if -1 in size:
        size = tuple(options["profile"]["images"][1][2:])
    x = np.random.default_rng(1).random((1, 3, *size), dtype=np.float32)
    want, got = ort_run(onnx_path, x), run_engine(trt, engine, x)
    assert np.abs(got["probs"] - want[0]).max() < tolerance
    assert (got["mask"] == want[1]).mean() > 0.9
    return engine_path, manifest


def test_fp32_engine_matches_onnxruntime(trt, tmp_path):
    onnx_path = export_tiny(tmp_path / "model.onnx")
    engine_path, manifest = build_and_compare(trt, tmp_path, onnx_path, "fp32", 1e-3)
    assert manifest["strongly_typed"] is (trt_major(trt) >= 11)
    # A second build reuses the timing cache and replaces the engine in place.
    assert build_and_compare(trt, tmp_path, onnx_path, "fp32", 1e-3)[0] == engine_path


def test_fp16_engine_from_a_float16_onnx(trt, tmp_path):
    onnx_path = export_tiny(tmp_path / "model.onnx")
    et.to_float16(onnx_path, tmp_path / "model.fp16.onnx")
    _, manifest = build_and_compare(trt, tmp_path, tmp_path / "model.fp16.onnx", "fp16", 2e-2)
    assert manifest["strongly_typed"] is True


def test_fp16_engine_from_fp32_onnx_needs_tensorrt_10(trt, tmp_path):
    onnx_path = export_tiny(tmp_path / "model.onnx")
    if trt_major(trt) >= 11:
        with pytest.raises(CissError, match="builds strongly typed networks only"):
            et.build_engine(onnx_path, tmp_path, precision="fp16", workspace_gb=1, calibration=None, profile=None,
                            classmap_version=4, cache_dir=tmp_path)
    else:
        assert build_and_compare(trt, tmp_path, onnx_path, "fp16", 2e-2)[1]["strongly_typed"] is False


def test_dynamic_engine_uses_the_profile(trt, tmp_path):
    onnx_path = export_tiny(tmp_path / "model.onnx", dynamic=True)
    profile = {"images": ((1, 3, 16, 16), (1, 3, 32, 48), (1, 3, 64, 64))}
    _, manifest = build_and_compare(trt, tmp_path, onnx_path, "fp32", 1e-3, profile=profile)
    assert manifest["profile"]["images"]["opt"] == [1, 3, 32, 48]


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_engine_with_the_entropy_calibrator(trt, tmp_path, dynamic):
    if trt_major(trt) >= 11:
        pytest.skip("TensorRT >= 11 has no calibrators; int8 comes from a QDQ ONNX")
    onnx_path = export_tiny(tmp_path / "model.onnx", dynamic=dynamic)
    images = [np.random.default_rng(i).random((4, 3, 32, 48), dtype=np.float32) for i in range(4)]
    profile = {"images": ((1, 3, 16, 16), (1, 3, 32, 48), (1, 3, 64, 64))} if dynamic else None
    build_and_compare(trt, tmp_path, onnx_path, "int8", 0.2, calibration=images, profile=profile)
    calibration_cache = et.calibration_cache_path(tmp_path / "cache", sha256_file(onnx_path), trt.__version__)
    assert calibration_cache.stat().st_size > 0


def test_load_engine_turns_a_bad_plan_into_a_clear_error(trt, tmp_path):
    onnx_path = export_tiny(tmp_path / "model.onnx")
    engine_path, sidecar_path = et.build_engine(onnx_path, tmp_path, precision="fp32", workspace_gb=1,
                                                calibration=None, profile=None, classmap_version=4,
                                                cache_dir=tmp_path)
    engine_path.write_bytes(b"not a plan" * 100)
    with pytest.raises(CissError, match="could not deserialize"):
        engines.load_engine(engine_path, engines.EngineManifest.read(sidecar_path))

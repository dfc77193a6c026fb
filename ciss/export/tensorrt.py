"""ONNX -> TensorRT engine (TensorRT 10 and >= 11), and the fp16 graph strongly typed builds need.

What a plan is tied to, its sidecar manifest and the preflight that reads it live in ciss.engines,
which the runtime uses to load engines without importing this builder.

Two API generations are supported (runtime.md §4.1; TensorRT "Migrating from 10.x to 11.x"):
TensorRT 10 sets precision with builder flags (FP16, INT8 + an entropy calibrator); TensorRT 11
builds strongly typed networks only, so precision must already be in the ONNX (a float16 graph from
`to_float16`, or a QDQ graph from ciss.export.quantize).

Nothing heavy is imported at module level: torch, tensorrt and onnx are imported inside the
functions that need them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciss.engines import LocalGpu, Profile, Shape, engine_manifest, engine_tag, probe
from ciss.errors import CissError
from ciss.export.settings import PRECISIONS
from ciss.manifest import sha256_file, write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    import onnx


def gpu_tag(local: LocalGpu) -> str:
    """SM plus the card's name: tactic timings differ between cards that share an SM."""
    name = re.sub(r"[^a-z0-9]+", "-", local.gpu.lower()).strip("-")
    return f"sm{local.compute_capability[0]}{local.compute_capability[1]}-{name}"


def timing_cache_path(cache_dir: Path, local: LocalGpu) -> Path:
    """The timing cache is only valid for one device and TensorRT version (runtime.md §4.1 step 7)."""
    return Path(cache_dir) / f"timing-{gpu_tag(local)}-trt{local.tensorrt}.cache"


def calibration_cache_path(cache_dir: Path, onnx_sha256: str, tensorrt_version: str) -> Path:
    """Calibration scales depend on the network and TensorRT, not on the card (EntropyCalibrator2
    calibrates before layer fusion), so the cache is keyed by the ONNX it calibrated."""
    return Path(cache_dir) / f"calib-{onnx_sha256[:16]}-trt{tensorrt_version}.cache"


def onnx_precision(path: Path) -> str:
    """Precision baked into an ONNX graph: "int8" (QDQ), "fp16" (float16 tensors) or "fp32"."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "int8"
    fp16 = onnx.TensorProto.FLOAT16
    if (any(t.data_type == fp16 for t in graph.initializer)
            or any(a.name == "to" and a.i == fp16 for n in graph.node if n.op_type == "Cast" for a in n.attribute)
            or any(a.t.data_type == fp16 for n in graph.node if n.op_type == "Constant" for a in n.attribute)):
        return "fp16"
    return "fp32"


def strongly_typed_build(precision: str, graph_precision: str, trt_major: int) -> bool:
    """Whether the build must be strongly typed, or why this ONNX cannot give that precision.

    TensorRT >= 11 is always strongly typed (its precision flags and calibrators are gone); on 10 a
    graph that already carries its types (float16 or QDQ) is built strongly typed too, so TensorRT
    follows the graph instead of choosing precisions itself.
    """
    if precision not in PRECISIONS:
        raise CissError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if graph_precision != "fp32" and graph_precision != precision:
        raise CissError(f"an {precision} engine was asked for but the ONNX is {graph_precision}; pass the matching ONNX")
    if trt_major >= 11 and precision != graph_precision:
        need = "a float16 ONNX (model.fp16.onnx, see to_float16)" if precision == "fp16" else \
            "a QDQ int8 ONNX (model.int8.onnx, see ciss.export.quantize)"
        raise CissError(f"TensorRT {trt_major} builds strongly typed networks only, so an {precision} engine needs "
                        f"{need}, not an fp32 one")
    return trt_major >= 11 or graph_precision != "fp32"


def _calibration_batches(arrays: Iterable[np.ndarray], shape: Shape) -> Iterator[np.ndarray]:
    """Cut float32 NCHW arrays into batches of the size the engine calibrates at."""
    n = shape[0]
    for i, array in enumerate(arrays):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim != len(shape) or array.shape[1:] != tuple(shape[1:]):
            raise CissError(f"calibration array {i} has shape {list(array.shape)}; the engine calibrates at "
                            f"{list(shape)} (N may differ)")
        for start in range(0, len(array) - n + 1, n):
            yield array[start:start + n]


def _entropy_calibrator(trt: Any, arrays: Iterable[np.ndarray], shape: Shape, cache: Path) -> Any:
    """TensorRT 10's INT8 calibrator (trt.IInt8EntropyCalibrator2; Python API "Int8" pages).

    Device memory is one persistent torch CUDA tensor (its data_ptr() is what get_batch returns), for
    the same reason GPU facts come from torch. Errors inside TensorRT's callbacks would be lost in
    its log, so they are kept and raised after the build.
    """
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = _calibration_batches(arrays, shape)
            self.device = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.fed = 0
            self.error: CissError | None = None

        def get_batch_size(self) -> int:
            return shape[0]

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self.batches, None)
            except CissError as e:
                self.error = e
                return None
            if batch is None:
                return None
            self.device.copy_(torch.from_numpy(batch))
            self.fed += 1
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, data: Any) -> None:
            write_bytes_atomic(cache, bytes(data))

    return Calibrator()


def _tensors(trt: Any, tensors: list[Any]) -> dict[str, dict[str, Any]]:
    return {t.name: {"shape": list(t.shape), "dtype": np.dtype(trt.nptype(t.dtype)).name} for t in tensors}


def build_engine(onnx_path: Path, out_dir: Path, *, precision: str, workspace_gb: float,
                 calibration: Iterable[np.ndarray] | None, profile: Profile | None, classmap_version: int,
                 cache_dir: Path) -> tuple[Path, Path]:
    """Build `<out_dir>/<tag>.engine` and its sidecar `<tag>.json` from an ONNX file; returns both paths.

    Follows runtime.md §4.1: parse_from_file (it finds external weights), workspace pool limit,
    one optimization profile for dynamic inputs, a timing cache per GPU in `cache_dir`, and
    build_serialized_network (None on failure, with the reason only in TensorRT's log).
    `calibration` (float32 NCHW training images) is used only for INT8 on TensorRT 10 with an fp32 ONNX.
    """
    onnx_path, out_dir, cache_dir = Path(onnx_path), Path(out_dir), Path(cache_dir)
    if not onnx_path.is_file():
        raise CissError(f"no ONNX model at {onnx_path}")
    local, reason = probe()
    if local is None:
        raise CissError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    strongly_typed = strongly_typed_build(precision, onnx_precision(onnx_path), major)
    onnx_sha256 = sha256_file(onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11 ignores the flag (always strongly typed) and its migration guide builds with none
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed and major < 11 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CissError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    optimization_profile = _add_profile(builder, config, inputs, profile)

    calibrator = None
    if not strongly_typed and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif not strongly_typed and precision == "int8":
        if calibration is None:
            raise CissError("an int8 engine from an fp32 ONNX needs calibration images (or pass a QDQ ONNX)")
        if len(inputs) != 1:
            raise CissError(f"int8 calibration feeds one input, but the ONNX has {len(inputs)}")
        shape = tuple(profile[inputs[0].name][1]) if profile else tuple(inputs[0].shape)
        calibrator = _entropy_calibrator(trt, calibration, shape, calibration_cache_path(
            cache_dir, onnx_sha256, local.tensorrt))
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        if optimization_profile is not None:  # calibration runs at this profile's opt shape
            config.set_calibration_profile(optimization_profile)

    cache_file = timing_cache_path(cache_dir, local)
    timing_cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(timing_cache, False)
    start = time.monotonic()
    plan = builder.build_serialized_network(network, config)
    build_s = time.monotonic() - start
    if calibrator is not None and calibrator.error is not None:
        raise calibrator.error
    if plan is None:
        hint = " (no calibration batch was fed)" if calibrator is not None and calibrator.fed == 0 else ""
        raise CissError(f"TensorRT {trt.__version__} could not build an {precision} engine from {onnx_path}{hint}; "
                        "its log above says why")
    write_bytes_atomic(cache_file, bytes(config.get_timing_cache().serialize()))

    tag = engine_tag(local.compute_capability, local.tensorrt, precision)
    engine_path, sidecar_path = out_dir / f"{tag}.engine", out_dir / f"{tag}.json"
    write_bytes_atomic(engine_path, bytes(plan))
    write_json_atomic(sidecar_path, engine_manifest(
        local, precision=precision, strongly_typed=strongly_typed, profile=profile,
        inputs=_tensors(trt, inputs), outputs=_tensors(trt, outputs), onnx_file=onnx_path.name,
        onnx_sha256=onnx_sha256, classmap_version=classmap_version, build_s=build_s, workspace_gb=workspace_gb))
    return engine_path, sidecar_path


def _add_profile(builder: Any, config: Any, inputs: list[Any], profile: Profile | None) -> Any:
    """One optimization profile with min/opt/max per input; required when any input is dynamic."""
    dynamic = [t.name for t in inputs if any(d < 0 for d in t.shape)]
    if profile is None:
        if dynamic:
            raise CissError(f"inputs {', '.join(dynamic)} have dynamic shapes; give a profile (min/opt/max shapes)")
        return None
    unknown = set(profile) - {t.name for t in inputs}
    if unknown:
        raise CissError(f"the profile names {', '.join(sorted(unknown))}, which the ONNX has no input called")
    optimization_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        optimization_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(optimization_profile)
    return optimization_profile


# --- fp32 -> fp16 ONNX for strongly typed builds -------------------------------------------------

# Inputs the ONNX spec types as float32 whatever the data type (Resize/Upsample scales, Resize roi).
_FLOAT32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
# Inputs that carry shapes, sizes, indices or axes: a shape-derived value there does not make the
# node's output shape-derived.
_SHAPE_INPUTS = {
    "Reshape": (1,), "Resize": (1, 2, 3), "Upsample": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Tile": (1,),
    "Pad": (1, 2, 3), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "ConstantOfShape": (0,), "Gather": (1,),
    "TopK": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceL2": (1,),
}
_FP16_MAX = float(np.finfo(np.float16).max)


def _shape_derived(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from Shape/Size outputs. They stay float32: float16 is exact only up to 2048,
    and a size, scale or index computed in it could be off by one."""
    derived: set[str] = set()
    for node in graph.node:  # ONNX keeps nodes in topological order
        skip = _SHAPE_INPUTS.get(node.op_type, ())
        if node.op_type in ("Shape", "Size") or any(
                name in derived for i, name in enumerate(node.input) if i not in skip):
            derived.update(node.output)
    return derived


def _to_fp16(array: np.ndarray) -> np.ndarray:
    return np.clip(array, -_FP16_MAX, _FP16_MAX).astype(np.float16)


def to_float16(src: Path, dst: Path) -> None:
    """Write a float16 copy of an fp32 ONNX model for TensorRT >= 11 strongly typed builds.

    Inputs and outputs stay float32 (Cast nodes at the boundary), so callers feed the same arrays.
    Float initializers and Constant/ConstantOfShape values become float16 (clipped to its range),
    except those only float32 consumers use. Shape arithmetic stays float32 (see _shape_derived),
    and so do Resize scales/roi, which the spec requires in float32; Casts are added where the two
    regions meet. Written with the onnx package only (no onnxconverter-common dependency); graphs
    with control flow (If/Loop/Scan) are refused.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise CissError(f"{src} has control flow (If/Loop/Scan); to_float16 converts flat graphs only")
    inferred = onnx.shape_inference.infer_shapes(model).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    elem.update({t.name: t.data_type for t in graph.initializer})
    floats = {name for name, t in elem.items() if t == TensorProto.FLOAT}
    derived = _shape_derived(graph)
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    graph_inputs = {v.name for v in graph.input}

    # Computed tensors stay float32 only when shape-derived; constants follow their consumers (below).
    fp32 = {name for name in floats if name in derived or name in graph_inputs}

    def wanted(node: onnx.NodeProto, index: int) -> int | None:
        """The float type input `index` of `node` must have, or None when any will do."""
        if index in _FLOAT32_INPUTS.get(node.op_type, ()):
            return TensorProto.FLOAT
        if node.op_type == "Cast":
            return None
        float_outputs = [o for o in node.output if o in floats]
        if float_outputs:
            return TensorProto.FLOAT if any(o in fp32 for o in float_outputs) else TensorProto.FLOAT16
        others = [t for t in node.input if t in floats and t not in constants]  # e.g. Equal, ArgMax, Shape
        if not others:
            return None
        return TensorProto.FLOAT if any(t in fp32 for t in others) else TensorProto.FLOAT16

    uses: dict[str, list[int | None]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in floats:
                uses.setdefault(name, []).append(wanted(node, i))
    fp32 |= {c for c in constants & floats if TensorProto.FLOAT16 not in uses.get(c, [])}

    # Float outputs computed in float16 get a Cast back to float32 under their public name.
    tail = []
    for out in graph.output:
        if out.name in floats and out.name not in fp32:
            inner = f"{out.name}/fp16"
            for node in graph.node:
                node.input[:] = [inner if n == out.name else n for n in node.input]
                node.output[:] = [inner if n == out.name else n for n in node.output]
            tail.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT, name=f"{inner}/cast"))
            floats.add(inner)

    def is_fp16(name: str) -> bool:
        return name in floats and name not in fp32

    for i, tensor in enumerate(graph.initializer):
        if is_fp16(tensor.name):
            graph.initializer[i].CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(tensor)), tensor.name))
    nodes, casts = [], {}
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape", "Cast") and is_fp16(node.output[0]):
            _retype_to_fp16(node)
        for i, name in enumerate(node.input):
            need = wanted(node, i) if name in floats else None
            have = TensorProto.FLOAT16 if is_fp16(name) else TensorProto.FLOAT
            if need is None or need == have:
                continue
            if (name, need) not in casts:
                casts[name, need] = f"{name}/to{'16' if need == TensorProto.FLOAT16 else '32'}"
                nodes.append(helper.make_node("Cast", [name], [casts[name, need]], to=need, name=casts[name, need]))
            node.input[i] = casts[name, need]
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes + tail)
    graph.ClearField("value_info")  # stale types; inference recomputes them
    write_bytes_atomic(Path(dst), model.SerializeToString())


def _retype_to_fp16(node: onnx.NodeProto) -> None:
    """Make a Constant, ConstantOfShape or Cast produce float16 instead of float32."""
    from onnx import TensorProto, helper, numpy_helper

    if node.op_type == "Cast":
        for a in node.attribute:
            if a.name == "to":
                a.i = TensorProto.FLOAT16
        return
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "value" in values:
        array = numpy_helper.to_array(values["value"])
    elif "value_float" in values or "value_floats" in values:
        array = np.asarray(values.get("value_float", values.get("value_floats")), dtype=np.float32)
    else:  # ConstantOfShape without a value fills float32 zeros
        array = np.zeros(1, dtype=np.float32)
    node.ClearField("attribute")
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(_to_fp16(array))))

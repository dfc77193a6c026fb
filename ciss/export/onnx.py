"""A stored step as one self-contained ONNX file that an edge device can run as is.

The network is exported once, as logits (torch.onnx, dynamo exporter, pinned opset), and the
post-processing tail is appended with onnx.helper: argmax cast to uint8 (uint16 past 255 classes)
and, optionally, the max-softmax confidence. The device then moves H×W bytes per frame instead of
C×H×W floats (runtime.md §5). Everything a reader needs to use the file (class map, input size,
normalisation, step, versions) is in `metadata_props` as JSON, under keys starting with `ciss.`.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from ciss.classmap import mask_dtype
from ciss.errors import CissError
from ciss.export.settings import MAX_OPSET, MIN_OPSET, OPSET, OUTPUT_CHOICES

INPUT = "images"
LOGITS = "logits"
MIN_SIDE, MAX_SIDE = 32, 4096
ONNX_LIMIT = 2 << 30  # protobuf's single-file limit; beyond it ONNX needs external data files


def output_names(outputs: str) -> list[str]:
    if outputs not in OUTPUT_CHOICES:
        raise CissError(f"unknown --outputs '{outputs}'; choose one of {', '.join(OUTPUT_CHOICES)}")
    return outputs.split("+")


def parse_size(text: str) -> tuple[int, int]:
    """`HxW` (e.g. 360x480) as (H, W), inside the range the exported graph is checked for."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise CissError(f"--size {text!r} is not HxW, e.g. --size 360x480") from None
    for side in (h, w):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise CissError(f"--size {text}: each side must be between {MIN_SIDE} and {MAX_SIDE} pixels")
    return h, w


def dynamic_unsupported_reason(model: nn.Module) -> str | None:
    """Adaptive pooling to a grid larger than 1×1 (PSP-style) exports with dynamic H/W without an
    error but is only right at the example size (runtime.md §5, finding 4); such models get fixed sizes."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
            if any(s not in (1, None) for s in size):
                return (f"module {name} pools to a {size} grid, which ONNX exports correctly only at the example "
                        "size; export at a fixed --size instead")
    return None


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per optional torchvision op it cannot register; none applies here."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own use of a deprecated pytree API
            yield
    finally:
        log.setLevel(level)


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CissError(f"--opset {opset} is not supported; choose --opset {MIN_OPSET} to {MAX_OPSET}")


def graph_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset the graph really imports (what a runtime must support)."""
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_logits(model: nn.Module, size: tuple[int, int], dynamic: bool, opset: int = OPSET) -> onnx.ModelProto:
    """The fused model as an ONNX graph from `images` (1×3×H×W, normalised RGB) to `logits` (1×C×H×W)."""
    model = model.eval()
    if dynamic and (why := dynamic_unsupported_reason(model)):
        raise CissError(f"cannot export with --dynamic: {why}")
    example = torch.zeros(1, 3, *size)
    kwargs: dict[str, Any] = {}
    if dynamic:
        dim = torch.export.Dim
        kwargs["dynamic_shapes"] = ({2: dim("height", min=MIN_SIDE, max=MAX_SIDE),
                                     3: dim("width", min=MIN_SIDE, max=MAX_SIDE)},)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                    output_names=[LOGITS], external_data=False, verbose=False, **kwargs)
    proto = program.model_proto
    if graph_opset(proto) != opset:
        raise CissError(f"the exporter made an opset {graph_opset(proto)} graph, not the {opset} asked for; "
                        f"choose --opset {graph_opset(proto)}")
    if proto.ByteSize() > ONNX_LIMIT:
        raise CissError("the model is larger than 2 GB, which one ONNX file cannot hold")
    return proto


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def mask_tensor_type(num_classes: int) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(mask_dtype(num_classes)))


def add_tail(logits_model: onnx.ModelProto, outputs: str, keep_logits: bool = False) -> onnx.ModelProto:
    """Append the post-processing the device should not do: `mask` (argmax over classes) and
    `confidence` (largest softmax probability), both 1×H×W. `keep_logits` also leaves `logits` as an
    output, which the parity check uses; exported files expose only what `outputs` asks for."""
    names = output_names(outputs)
    model = onnx.ModelProto()
    model.CopyFrom(logits_model)
    graph = model.graph
    (logits_info,) = [o for o in graph.output if o.name == LOGITS]
    n, c, h, w = _dims(logits_info)
    del graph.output[:]
    if keep_logits or "logits" in names:
        graph.output.append(logits_info)
    if "mask" in names:
        dtype = mask_tensor_type(int(c))
        graph.node.extend([helper.make_node("ArgMax", [LOGITS], ["ciss_argmax"], axis=1, keepdims=0),
                           helper.make_node("Cast", ["ciss_argmax"], ["mask"], to=dtype)])
        graph.output.append(helper.make_tensor_value_info("mask", dtype, [n, h, w]))
    if "confidence" in names:
        graph.initializer.append(helper.make_tensor("ciss_class_axis", TensorProto.INT64, [1], [1]))
        graph.node.extend([helper.make_node("Softmax", [LOGITS], ["ciss_probs"], axis=1),
                           helper.make_node("ReduceMax", ["ciss_probs", "ciss_class_axis"], ["confidence"], keepdims=0)])
        graph.output.append(helper.make_tensor_value_info("confidence", TensorProto.FLOAT, [n, h, w]))
    return model


def set_metadata(model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Store each value as JSON under `ciss.<key>`, replacing earlier values of the same keys."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"ciss.{k}": json.dumps(v) for k, v in metadata.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def read_metadata(props: dict[str, str]) -> dict[str, Any]:
    """The `ciss.` entries of a metadata map (ONNX `metadata_props` or ORT's `custom_metadata_map`)."""
    return {k[len("ciss."):]: json.loads(v) for k, v in props.items() if k.startswith("ciss.")}


def output_specs(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """Name, element type and shape (symbolic dims by name) of each graph output, for the manifest."""
    return [{"name": o.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name,
             "shape": _dims(o)} for o in model.graph.output]


def _save(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.save_model(model, str(path), save_as_external_data=False)
    except OSError as e:  # name the file a full disk refused (onnx does not)
        raise OSError(e.errno, e.strerror, str(path)) from e


def save_checked(model: onnx.ModelProto, path: Path) -> None:
    """Write one self-contained file and run the full checker (with shape inference) on it."""
    _save(model, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise CissError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


def stamp_version(path: Path, version: int) -> None:
    """Write the repository version into the file once it is known (the model's own `model_version`
    field and `ciss.model_version`), so a copy that strays from the repository still says what it is."""
    model = onnx.load_model(str(path))
    model.model_version = version
    set_metadata(model, {"model_version": version})
    _save(model, path)


def sizes_to_check(size: tuple[int, int], dynamic: bool) -> list[tuple[int, int]]:
    """The export size, and with `--dynamic` two more: a smaller one and an odd-shaped larger one."""
    if not dynamic:
        return [size]
    h, w = size
    small = (max(MIN_SIDE, h // 2), max(MIN_SIDE, w // 2))
    large = (min(MAX_SIDE, h * 3 // 2 + 3), min(MAX_SIDE, w * 5 // 4 + 5))
    return [size, small, large]


def class_count(model: onnx.ModelProto) -> int:
    (logits,) = [o for o in model.graph.output if o.name == LOGITS]
    return int(_dims(logits)[1])


def exporter_versions(opset: int) -> dict[str, Any]:
    import onnxruntime

    import ciss

    return {"ciss": ciss.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": opset}

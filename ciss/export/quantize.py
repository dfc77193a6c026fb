"""Static int8 quantization of the logits graph with ONNX Runtime, in QDQ form.

QDQ (explicit QuantizeLinear/DequantizeLinear pairs) is the int8 form that ONNX Runtime's CPU
provider, TensorRT 10 and the strongly-typed TensorRT 11 all read (runtime.md §4.1). The two
targets want different activation types, measured: on an x86 CPU without VNNI, signed symmetric
activations ran the CamVid MobileNet 2.3x slower than fp32, while unsigned asymmetric ones (ONNX
Runtime's recommended U8S8 for x86) ran at fp32 speed or better. U8S8 needs 7-bit weights
(`reduce_range`) on CPUs without VNNI, whose 8-bit multiply-add saturates: without it the same model
lost 5.9 mIoU points, with it 0.1. TensorRT accepts only zero points of 0, so its graph gets signed
symmetric activations and full-range weights. Weights are symmetric and per output channel.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from ciss.errors import CissError
from ciss.export.onnx import INPUT

if TYPE_CHECKING:
    from tqdm import tqdm


class _Batches(CalibrationDataReader):
    def __init__(self, batches: Sequence[np.ndarray], progress: tqdm | None = None):
        self._it: Iterator[np.ndarray] = iter(batches)
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        if x is not None and self._progress is not None:
            self._progress.update(1)
        return None if x is None else {INPUT: x}


def quantize_int8(logits_graph: onnx.ModelProto, calibration: Sequence[np.ndarray], target: str = "cpu",
                  method: CalibrationMethod = CalibrationMethod.MinMax, progress: tqdm | None = None
                  ) -> onnx.ModelProto:
    """The graph with int8 convolutions for `target` ("cpu" or "tensorrt"), calibrated on
    `calibration` (1×3×H×W network inputs). `progress` (a tqdm bar, ciss.trainer.log.bar) counts the
    calibration images as ONNX Runtime runs them and is closed at the end."""
    if target not in ("cpu", "tensorrt"):
        raise ValueError(f"unknown int8 target {target!r}")
    tensorrt = target == "tensorrt"
    if not calibration:
        raise CissError("int8 quantization needs calibration images; the step's training images were not found")
    with tempfile.TemporaryDirectory(prefix="ciss-int8-") as tmp, progress or nullcontext():
        source, prepared, quantized = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "prepared", "int8"))
        onnx.save_model(logits_graph, str(source))
        # Shape inference and graph clean-up first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(prepared, quantized, _Batches(calibration, progress), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=not tensorrt,
                        calibrate_method=method,
                        extra_options={"ActivationSymmetric": tensorrt, "WeightSymmetric": True})
        return onnx.load_model(str(quantized))

"""`ciss export`'s settings, each key with its default in one table, and the names its choices are made of.

Torch-free, so the command line reads the defaults and the choices without loading the exporter. A
`--config FILE`'s `[export]` table and `--set export.KEY=VALUE` set them the way they set `ciss learn`'s
(ciss/config.py); a flag typed on the command line wins over both. What to export and where (--run,
--step, --repo, --name) and the size, whose default is chosen from the data, are flags only.
"""

from __future__ import annotations

from ciss.config import Settings

OPSET = 20
# torch.onnx implements opsets from 18 up (lower ones go through onnx's version converter, which fails
# on common ops and then keeps 18) to 23 (torch.onnx._constants.ONNX_MAX_OPSET).
MIN_OPSET, MAX_OPSET = 18, 23
OUTPUT_CHOICES = ("mask", "mask+confidence", "logits")
PRECISIONS = ("fp32", "fp16", "int8")

EXPORT = Settings.table("export", {
    "dynamic": False,            # variable height and width instead of a fixed size
    "outputs": "mask",           # what the graph returns (OUTPUT_CHOICES)
    "opset": OPSET,
    "trt": False,                # also build a TensorRT engine
    "precision": "fp32",         # the engine's; int8 also writes an ONNX Runtime int8 model
    "workspace_gb": 4.0,         # TensorRT's builder workspace
    "calib_images": 32,          # training images that calibrate int8
    "allow_class_change": False,  # publish a class map that does not extend the previous version's
}, command="ciss export", example="export.opset=18", choices={"outputs": OUTPUT_CHOICES, "precision": PRECISIONS})

"""int8 calibration and the int8-against-fp32 evaluation show their progress on a terminal, and print
nothing off one (issue 14): real ONNX Runtime quantization of a small convolution graph."""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from ciss.classmap import ClassMap
from ciss.export.onnx import INPUT
from ciss.export.quantize import quantize_int8
from ciss.export.verify import evaluate_graph
from ciss.manifest import IMAGENET_MEAN, IMAGENET_STD
from ciss.trainer.data import open_dataset
from ciss.trainer.data.transforms import Normalise
from ciss.trainer.log import bar


def conv_graph(classes: int = 3, mask: bool = False) -> onnx.ModelProto:
    """images (1x3x16x16) -> 3x3 convolution -> logits (1xCx16x16) [-> ArgMax -> mask (uint8)]."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(classes, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", [INPUT, "w"], ["logits"], pads=[1, 1, 1, 1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes, 16, 16])]
    if mask:
        nodes += [helper.make_node("ArgMax", ["logits"], ["ids"], axis=1, keepdims=0),
                  helper.make_node("Cast", ["ids"], ["mask"], to=TensorProto.UINT8)]
        outputs = [helper.make_tensor_value_info("mask", TensorProto.UINT8, [1, 16, 16])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, 16, 16])],
                              outputs, [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calibration(n: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.normal(size=(1, 3, 16, 16)).astype(np.float32) for _ in range(n)]


def test_calibration_counts_every_image_on_a_terminal():
    shown = io.StringIO()
    progress = tqdm(total=5, desc="int8 calibration", file=shown, disable=False)  # as on a terminal
    q = quantize_int8(conv_graph(), calibration(5), progress=progress)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    assert progress.n == 5 and "int8 calibration" in shown.getvalue() and "5/5" in shown.getvalue()


def test_calibration_is_silent_off_a_terminal(capfd):
    progress = bar(5, "int8 calibration", unit="image")  # pytest's stderr is no terminal
    assert progress.disable
    quantize_int8(conv_graph(), calibration(5), progress=progress)
    out, err = capfd.readouterr()
    assert "calibration" not in out + err and "it/s" not in err and "image/s" not in err


def test_int8_evaluation_shows_progress_only_on_a_terminal(capfd):
    ds = open_dataset("synthetic", None, "test", size=4, height=16, width=16)
    names = list(ds.info.learnable[:2])
    classmap = ClassMap.initial(names)
    normalise = Normalise(IMAGENET_MEAN, IMAGENET_STD)
    metrics = evaluate_graph(conv_graph(len(classmap), mask=True), ds, classmap, "all", (16, 16), normalise,
                             label="int8 eval")
    assert metrics["images"] > 0
    out, err = capfd.readouterr()
    assert "int8 eval" not in out + err  # no terminal here: quiet


def test_the_export_bar_is_drawn_on_a_real_terminal(tmp_path):
    """bar() as the export calls it, its stderr a pseudo-terminal: the calibration bar is drawn there."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from conftest import REPO

    code = ("import sys; sys.path.insert(0, %r); from test_calibration_progress import conv_graph, calibration; "
            "from ciss.export.quantize import quantize_int8; from ciss.trainer.log import bar; "
            "quantize_int8(conv_graph(), calibration(5), progress=bar(5, 'int8 calibration', unit='image'))"
            % str(REPO / "tests" / "export"))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=follower, stdout=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")])))
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, shown.decode(errors="replace")
    assert b"int8 calibration" in shown and b"5/5" in shown

"""Latency of every edge preset on the CPU: PyTorch eager, ONNX Runtime fp32 and int8, side by side.

Each preset is built with 12 classes (CamVid's 11 and background) and random weights: latency does not
depend on the values, except int8's calibration ranges, which come from a few random inputs here
(the accuracy of int8 is measured on real data by export_int8.py). Every variant is timed in
interleaved rounds in one process, so ratios survive a shared, noisy machine; medians are shown.
Ratios: each backend against PyTorch eager of the same preset, and each preset against DeepLabV3 on
the same backbone (the light-head question). The backbone alone is timed too: DeepLabV3's latency over
it is the most any head on that backbone could gain, whatever its design. Each model's and backbone's
multiply-adds are counted as well (torch's FlopCounterMode), since latency does not follow them.

    python benchmarks/export_speed.py --size 512x512 --threads 1 --rounds 5
    python benchmarks/export_speed.py --size 360x480 --presets mobilenet_v2,mobilenet_v2_lraspp

A preset written PRESET@STRIDE is built at that output stride instead of its own (mobilenet_v2@32: the
backbone undilated, as ImageNet trained it), to time what a coarser feature map would buy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from machine import cpu_description
from ciss.export.onnx import export_logits, parse_size
from ciss.export.quantize import quantize_int8
from ciss.export.verify import cpu_session
from ciss.trainer.models import build_model
from ciss.trainer.presets import model_presets

PRESETS = "mobilenet_v2,mobilenet_v2_lraspp,efficientnet_lite0,mobilenet_v3_large,mobilenet_v3_lraspp"
CLASSES = 12


class LastStage(nn.Module):
    """The backbone alone, up to the feature map the decoder reads: the floor under any head."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return list(self.backbone(x).values())[-1]  # stage1, stage2, ...: the last is the deepest


def gflops(module: nn.Module, x: torch.Tensor) -> float:
    """Floating-point operations of one forward pass (2 per multiply-add), in billions."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(x)
    return counter.get_total_flops() / 1e9


def median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--size", default="512x512", help="HxW of the exported input")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of ONNX Runtime and torch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="runs per variant per round")
    ap.add_argument("--out", type=Path, help="write speed.md and speed.json here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)
    x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    calibration = [np.random.default_rng(i).standard_normal((1, 3, h, w)).astype(np.float32) for i in range(4)]

    variants: dict[tuple[str, str], object] = {}
    params: dict[str, float] = {}
    flops: dict[str, tuple[float, float]] = {}  # preset -> (whole model, backbone alone)
    entries = args.presets.split(",")
    for preset in entries:
        torch.manual_seed(0)
        name, _, stride = preset.partition("@")
        model = build_model(name, [CLASSES], output_stride=int(stride) if stride else None).eval().fused()
        params[preset] = sum(p.numel() for p in model.parameters()) / 1e6
        graph = export_logits(model, (h, w), dynamic=False)
        tensor = torch.from_numpy(x)
        flops[preset] = (gflops(model, tensor), gflops(LastStage(model.backbone), tensor))
        variants[(preset, "torch")] = lambda m=model, t=tensor: m(t)
        fp32 = cpu_session(graph.SerializeToString(), args.threads)
        int8 = cpu_session(quantize_int8(graph, calibration).SerializeToString(), args.threads)
        variants[(preset, "ort-fp32")] = lambda s=fp32: s.run(None, {"images": x})
        variants[(preset, "ort-int8")] = lambda s=int8: s.run(None, {"images": x})
        backbone = cpu_session(export_logits(LastStage(model.backbone), (h, w), dynamic=False).SerializeToString(),
                               args.threads)
        variants[(preset, "ort-backbone")] = lambda s=backbone: s.run(None, {"images": x})
    with torch.no_grad():
        for call in variants.values():
            median_ms(call, 2)  # warm-up
        rounds = [{k: median_ms(call, args.repeats) for k, call in variants.items()} for _ in range(args.rounds)]
    ms = {k: statistics.median(r[k] for r in rounds) for k in variants}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float:
        return statistics.median(r[b] / r[a] for r in rounds)  # how many times faster a is than b

    presets = {entry: model_presets()[entry.partition("@")[0]] for entry in entries}
    lines = [f"# CPU latency at {h}x{w}, {args.threads} thread(s)", "", f"CPU: {cpu_description()}; "
             f"torch {torch.__version__}; median of {args.rounds} interleaved rounds x {args.repeats} runs.", "",
             "| preset | params (M) | GFLOPs (backbone) | torch eager ms | ORT fp32 ms (x eager) | ORT int8 ms (x fp32) "
             "| ORT fp32 x DeepLabV3 | backbone alone, ORT fp32 ms (share) | most any head could gain over DeepLabV3 |",
             "|---|---|---|---|---|---|---|---|---|"]
    report = {"cpu": cpu_description(), "size": [h, w], "threads": args.threads,
              "gflops": {}, "ms": {}, "ratios": {}}
    for preset in entries:
        backbone = presets[preset]["backbone"]
        deeplab = next((p for p in entries if presets[p]["backbone"] == backbone
                        and presets[p].get("decoder", "aspp") == "aspp"), None)
        vs = f"{ratio((preset, 'ort-fp32'), (deeplab, 'ort-fp32')):.2f}x" if deeplab and deeplab != preset else "-"
        share = statistics.median(r[(preset, "ort-backbone")] / r[(preset, "ort-fp32")] for r in rounds)
        ceiling = f"{ratio((preset, 'ort-backbone'), (deeplab, 'ort-fp32')):.2f}x" if deeplab else "-"
        lines.append(f"| {preset} | {params[preset]:.2f} | {flops[preset][0]:.2f} ({flops[preset][1]:.2f}) | "
                     f"{ms[(preset, 'torch')]:.1f} | "
                     f"{ms[(preset, 'ort-fp32')]:.1f} ({ratio((preset, 'ort-fp32'), (preset, 'torch')):.2f}x) | "
                     f"{ms[(preset, 'ort-int8')]:.1f} ({ratio((preset, 'ort-int8'), (preset, 'ort-fp32')):.2f}x) | {vs} | "
                     f"{ms[(preset, 'ort-backbone')]:.1f} ({100 * share:.0f} %) | {ceiling} |")
        report["gflops"][preset] = {"model": flops[preset][0], "backbone": flops[preset][1]}
        report["ms"][preset] = {b: ms[(preset, b)] for b in ("torch", "ort-fp32", "ort-int8", "ort-backbone")}
        report["ratios"][preset] = {"ort_vs_torch": ratio((preset, "ort-fp32"), (preset, "torch")),
                                    "int8_vs_fp32": ratio((preset, "ort-int8"), (preset, "ort-fp32"))}
    lines += ["", "GFLOPs: floating-point operations of one forward pass at this size, 2 per multiply-add; the "
              "backbone's in brackets.",
              "x eager / x fp32 / x DeepLabV3: how many times faster than that reference (> 1 is faster).",
              "most any head could gain: DeepLabV3 on this preset's backbone over this backbone alone (a head "
              "that cost nothing).",
              "int8 here is calibrated on random inputs (speed only); export_int8.py measures its accuracy."]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.md").write_text("\n".join(lines) + "\n\nCommand: `python benchmarks/export_speed.py "
                                           f"--presets {args.presets} --size {args.size} --threads {args.threads} "
                                           f"--rounds {args.rounds}`\n")
        (args.out / "speed.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

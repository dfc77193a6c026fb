"""fp32 against int8 (QDQ) ONNX on the CPU: accuracy, file size and latency of one exported step.

Exports the step with `--precision int8` into a scratch repository (parity and the mIoU drop come
from the exporter itself), then times both graphs with ONNX Runtime, interleaved in one run so the
ratio survives a noisy shared machine. Writes the report as Markdown and JSON to --out.

    python benchmarks/export_int8.py --run docs/results/camvid/6-1/runs/seed0/mib --out docs/results/export
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ciss.export.pipeline import ExportOptions, export_step
from ciss.export.verify import cpu_session


def median_ms(session, x: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"images": x})
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--step", type=int)
    ap.add_argument("--calib-images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=10, help="alternating timing rounds")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as repo:
        result = export_step(args.run, Path(repo), "bench",
                             ExportOptions(step=args.step, precision="int8", calib_images=args.calib_images), log=print)
        fp32 = cpu_session(str(result.path / "model.onnx"), args.threads)
        int8 = cpu_session(str(result.path / "model.int8.onnx"), args.threads)
        h, w = result.manifest.input.size
        x = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
        for s in (fp32, int8):
            median_ms(s, x, 3)  # warm-up
        rounds = [(median_ms(fp32, x, 5), median_ms(int8, x, 5)) for _ in range(args.rounds)]
        sizes = {k: (result.path / f).stat().st_size for k, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx"))}
    v = result.manifest.variants["int8"]
    report = {
        "run": str(args.run), "step": result.manifest.source["step"], "size": [h, w], "threads": args.threads,
        "parity": result.manifest.parity, "miou_fp32": v["miou_fp32"], "miou_int8": v["miou_int8"],
        "miou_drop": v["miou_drop"], "eval_images": v["eval_images"], "calibration_images": v["calibration_images"],
        "bytes": sizes, "latency_ms": {"fp32": statistics.median(r[0] for r in rounds),
                                       "int8": statistics.median(r[1] for r in rounds)},
        "speedup_int8": statistics.median(r[0] / r[1] for r in rounds),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# fp32 vs int8 ONNX: {args.run} step {report['step']} at {h}x{w}", "",
        "| | fp32 | int8 |", "|---|---|---|",
        f"| mIoU all ({v['eval_images']} eval images, ONNX Runtime) | {100 * v['miou_fp32']:.2f} | {100 * v['miou_int8']:.2f} |",
        f"| file size (MB) | {sizes['fp32'] / 1e6:.1f} | {sizes['int8'] / 1e6:.1f} |",
        f"| CPU latency, median ms ({args.threads} thread) | {report['latency_ms']['fp32']:.1f} | {report['latency_ms']['int8']:.1f} |",
        "",
        f"int8/fp32 speed-up {report['speedup_int8']:.2f}x (median of {args.rounds} interleaved rounds); "
        f"parity of fp32 with PyTorch: {100 * report['parity']['mask_agreement']:.3f}% of mask pixels, "
        f"max |Δlogit| {report['parity']['max_abs_logit_diff']:.1e}. Calibration: {v['calibration_images']} training images.",
        "", f"Command: `python benchmarks/export_int8.py --run {args.run} --out {args.out}`",
    ]
    (args.out / "int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

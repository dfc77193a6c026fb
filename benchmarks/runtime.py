"""Edge speed of `ciss live` against the backend alone, on real clips, per model preset and precision.

For each preset and precision, in interleaved rounds in one process (so ratios survive a shared,
noisy machine; medians of the per-round ratios are shown):
* raw: the backend alone on prepared input tensors (the clip's frames, pre-processed beforehand);
* headless: run_live on the clip as fast as it goes, writing the JSONL stats, as a ratio to raw;
* save: the same writing the annotated video as well (`--save`), as a ratio to raw;
* swap: the clip delivered like a camera (a live source, which drops what it cannot take) at its
  own frame rate or 80% of the round's headless rate, whichever is lower, so that a drop means the
  swap stalled the stream, while a new version is published halfway: frames dropped, and the
  longest frame gap around the swap against the median frame gap.
Per-stage busy time (p50/p99) comes from the last round's `--save` run. Models are the edge
presets with random weights (latency does not depend on trained values), exported through
ciss.export into a temporary repository, unless --repo and --name name a published model.

    python benchmarks/runtime.py --presets mobilenet_v3_large --precisions fp32 --rounds 2
    python benchmarks/runtime.py --repo models --name camvid --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from machine import cpu_description
from ciss.classmap import ClassMap
from ciss.manifest import IMAGENET, InputSpec
from ciss.repository import ModelRepository
from ciss.runtime.model import Model
from ciss.runtime.pipeline import LiveOptions, run_live
from ciss.runtime.segmenter import Segmenter
from ciss.runtime.sources import LiveSource, VideoCaptureProducer, VideoFileSource
from ciss.runtime.stages import thread_split

PRESETS = "mobilenet_v2,mobilenet_v2_lraspp,mobilenet_v3_large"
CLIPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"
CAMVID = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian", "bicyclist"]
KINDS = {"fp32": "ort-cpu", "int8": "ort-int8"}


def quiet(_: str) -> None:
    pass


def export_random(repo: Path, name: str, preset: str, size: tuple[int, int], calibration: list[np.ndarray]) -> None:
    """`preset` with random weights as version 1 of `name`: the fp32 graph and its int8 variant."""
    import torch

    from ciss.export import onnx as onnx_export
    from ciss.export.quantize import quantize_int8
    from ciss.trainer.models import build_model

    classes = ClassMap.initial(CAMVID)
    torch.manual_seed(0)
    model = build_model(preset, classes.step_sizes()).eval().fused()
    logits = onnx_export.export_logits(model, size, dynamic=False)
    spec = InputSpec(onnx_export.INPUT, size=size, example_size=size, stride=model.output_stride,
                     normalisation=IMAGENET).to_json()
    with tempfile.TemporaryDirectory(prefix="ciss-bench-") as tmp:
        files = {"model.onnx": Path(tmp) / "model.onnx", "model.int8.onnx": Path(tmp) / "model.int8.onnx"}
        fp32 = onnx_export.add_tail(logits, "mask")
        onnx_export.save_checked(fp32, files["model.onnx"])
        onnx_export.save_checked(onnx_export.add_tail(quantize_int8(logits, calibration), "mask"),
                                 files["model.int8.onnx"])
        manifest = {"classes": classes.to_json(), "input": spec, "outputs": onnx_export.output_specs(fp32),
                    "precision": "fp32", "source": {"preset": preset, "weights": "random"},
                    "variants": {"int8": {"file": "model.int8.onnx", "format": "QDQ"}}, "engines": []}
        ModelRepository(repo).publish(name, files, manifest)


def republish(repo: Path, name: str) -> None:
    """The latest version again as the next one: what a swap costs does not depend on new weights."""
    repository = ModelRepository(repo)
    path = repository.path(name)
    manifest = repository.manifest(name)
    repository.publish(name, {rel: path / rel for rel in manifest.files}, manifest.to_json())


def clip_frames(clip: Path, n: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(clip))
    frames = []
    while len(frames) < n and (frame := capture.read()[1]) is not None:
        frames.append(frame)
    capture.release()
    return frames


def raw_fps(model: Model, tensors: list[np.ndarray], frames: int) -> float:
    """The backend alone, on inputs prepared beforehand, as many runs as the pipeline has frames."""
    model.backend.infer(tensors[0])
    t = time.perf_counter()
    for i in range(frames):
        model.backend.infer(tensors[i % len(tensors)])
    return frames / (time.perf_counter() - t)


class PacedClip(VideoCaptureProducer):
    """The clip delivered like a camera, at `fps`; the live source ends with it."""

    def __init__(self, clip: Path, fps: float):
        super().__init__(str(clip))
        self._period, self._due = 1.0 / fps, time.monotonic()

    def read(self) -> np.ndarray | None:
        self._due += self._period
        time.sleep(max(0.0, self._due - time.monotonic()))
        return super().read()


def pipeline_run(segmenter: Segmenter, clip: Path, frames: int, work: Path, save: bool) -> dict[str, Any]:
    options = LiveOptions(stats=work / "stats.jsonl", save=work / "out.mp4" if save else None, max_frames=frames)
    with VideoFileSource(clip) as source:
        return run_live(source, segmenter, options, log=quiet)


def swap_run(repo: Path, name: str, kind: str, threads: int, clip: Path, frames: int, fps: float,
             work: Path) -> dict[str, Any]:
    """A camera-like run of the clip with the next version published halfway (from its own thread,
    as an exporter would); the live source counts what the pipeline could not take."""
    with Segmenter.from_repository(repo, name, backend=kind, threads=threads, poll_s=0.1, log=quiet) as segmenter, \
            LiveSource(PacedClip(clip, fps), "paced clip", fps=fps, reconnect=False, log=quiet) as source:
        def on_frame(result: Any) -> None:
            if result.seq == frames // 2:
                threading.Thread(target=republish, args=(repo, name)).start()
        return run_live(source, segmenter, LiveOptions(stats=work / "swap.jsonl", max_frames=frames), log=quiet,
                        on_frame=on_frame)


def swap_figures(report: dict[str, Any], stats: Path, window: int = 3) -> dict[str, Any]:
    """Drops over the run and next to the swap (source indices skipped within `window` output frames
    of its first frame: a shared machine drops elsewhere too), and the swap's gap against the median."""
    swap = report["swaps"][0] if report["swaps"] else None
    gap = swap["max_gap_ms"] if swap else None
    median = report["frame_gap_ms"]["p50"]
    at_swap = None
    if swap is not None:
        index = [json.loads(line)["frame"] for line in stats.read_text().splitlines()]
        first = swap["first_frame"]
        near = index[max(0, first - window):first + window + 1]
        at_swap = sum(b - a - 1 for a, b in zip(near, near[1:]))
    return {"dropped": report["dropped"], "dropped_at_swap": at_swap, "swapped": swap is not None,
            "gap_ratio": gap / median if gap is not None and median else None, "gap_ms": gap, "median_gap_ms": median}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, default=CLIPS / "udacity_solidWhiteRight.mp4")
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--size", default="352x480", help="HxW of the exported input")
    ap.add_argument("--repo", type=Path, help="a model repository to measure instead of random-weight presets")
    ap.add_argument("--name", help="the model in --repo")
    ap.add_argument("--threads", type=int, help="backend intra-op threads (default: the split `ciss live` chooses)")
    ap.add_argument("--frames", type=int, default=0, help="frames per run (0: the whole clip)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write runtime.md and runtime.json here")
    args = ap.parse_args()
    if (args.repo is None) != (args.name is None):
        ap.error("give --repo and --name together")
    split = thread_split(args.threads)
    cv2.setNumThreads(split.opencv)
    probe = cv2.VideoCapture(str(args.clip))
    clip_fps = probe.get(cv2.CAP_PROP_FPS) or 25.0
    frames = args.frames or int(probe.get(cv2.CAP_PROP_FRAME_COUNT))
    probe.release()
    h, w = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="ciss-bench-runtime-") as tmp:
        work = Path(tmp)
        sample = clip_frames(args.clip, 64)
        if args.repo is None:
            from ciss.export.verify import to_input
            from ciss.trainer.data.transforms import Normalise

            normalise = Normalise(IMAGENET.mean, IMAGENET.std)
            calibration = [to_input(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), (h, w), normalise) for f in sample[::16]]
            models = []
            for preset in args.presets.split(","):
                export_random(work / "models", preset, preset, (h, w), calibration)
                models.append((work / "models", preset))
        else:
            models = [(args.repo, args.name)]

        variants: dict[tuple[str, str], dict[str, Any]] = {}
        for repo, name in models:
            for precision in args.precisions.split(","):
                kind = KINDS[precision]
                swap_repo = work / "swap" / f"{name}-{precision}"
                version = ModelRepository(repo).path(name)
                manifest = ModelRepository(repo).manifest(name)
                ModelRepository(swap_repo).publish(name, {rel: version / rel for rel in manifest.files},
                                                   manifest.to_json())
                model = Model.load(version, manifest, kind, split.backend, quiet)
                segmenter = Segmenter.from_repository(repo, name, backend=kind, version=manifest.version,
                                                      threads=split.backend, log=quiet)
                variants[(name, precision)] = {"name": name, "model": model, "segmenter": segmenter,
                                               "swap_repo": swap_repo,
                                               "kind": kind, "tensors": [model.preprocess(f) for f in sample],
                                               "rounds": []}

        for _ in range(args.rounds):
            for v in variants.values():
                raw = raw_fps(v["model"], v["tensors"], frames)
                headless = pipeline_run(v["segmenter"], args.clip, frames, work, save=False)
                saved = pipeline_run(v["segmenter"], args.clip, frames, work, save=True)
                camera_fps = min(clip_fps, 0.8 * headless["fps"])
                swap = swap_run(v["swap_repo"], v["name"], v["kind"], split.backend, args.clip, frames, camera_fps,
                                work)
                v["rounds"].append({"raw_fps": raw, "headless_fps": headless["fps"], "save_fps": saved["fps"],
                                    "headless_ratio": headless["fps"] / raw, "save_ratio": saved["fps"] / raw,
                                    "stage_ms": saved["stage_ms"],
                                    "swap": {**swap_figures(swap, work / "swap.jsonl"), "fps": camera_fps}})
        for v in variants.values():
            v["segmenter"].close()
            v["model"].close()

    lines = [f"# `ciss live` against the backend alone, {args.clip.name}, input {h}x{w}", "",
             f"CPU: {cpu_description()}; {split.describe()}; {frames} frames per run, median of {args.rounds} "
             "interleaved rounds.", "",
             "| model | precision | raw FPS | headless+stats FPS (x raw) | --save FPS (x raw) | dropped at swap (run) | "
             "swap: longest gap / median gap |", "|---|---|---|---|---|---|---|"]
    report: dict[str, Any] = {"cpu": cpu_description(), "threads": split.describe(), "clip": args.clip.name,
                              "size": [h, w], "frames": frames, "rounds": args.rounds, "variants": {}}
    med = statistics.median
    for (name, precision), v in variants.items():
        r = v["rounds"]
        gaps = [x["swap"]["gap_ratio"] for x in r if x["swap"]["gap_ratio"] is not None]
        summary = {"raw_fps": med(x["raw_fps"] for x in r), "headless_fps": med(x["headless_fps"] for x in r),
                   "save_fps": med(x["save_fps"] for x in r), "headless_ratio": med(x["headless_ratio"] for x in r),
                   "save_ratio": med(x["save_ratio"] for x in r), "swap_dropped": max(x["swap"]["dropped"] for x in r),
                   "swap_dropped_at_swap": max((x["swap"]["dropped_at_swap"] or 0) for x in r),
                   "swaps_seen": sum(x["swap"]["swapped"] for x in r), "swap_gap_ratio_max": max(gaps, default=None),
                   "stage_ms": r[-1]["stage_ms"], "rounds": [{k: x[k] for k in x if k != "stage_ms"} for x in r]}
        report["variants"][f"{name}/{precision}"] = summary
        gap = "-" if summary["swap_gap_ratio_max"] is None else f"{summary['swap_gap_ratio_max']:.2f}"
        lines.append(f"| {name} | {precision} | {summary['raw_fps']:.1f} | {summary['headless_fps']:.1f} "
                     f"({summary['headless_ratio']:.2f}) | {summary['save_fps']:.1f} ({summary['save_ratio']:.2f}) | "
                     f"{summary['swap_dropped_at_swap']} ({summary['swap_dropped']}) | {gap} ({summary['swaps_seen']}/{len(r)} "
                     "swapped) |")
    lines += ["", "Per-stage busy time, ms p50/p99 (last round, --save run):", ""]
    for key, s in report["variants"].items():
        lines.append(f"- {key}: " + ", ".join(f"{stage} {t['p50']:.1f}/{t['p99']:.1f}"
                                             for stage, t in s["stage_ms"].items() if t["p50"] is not None))
    lines += ["", "x raw: pipeline FPS over the backend alone in the same round (1.00: the pipeline costs nothing). "
              "Swap: the clip as a live source at min(its rate, 0.8 x headless FPS), the next version published halfway; the gap is "
              "the longest of the two frame gaps before the first frame of the new version and the one after it; "
              "dropped at swap: source frames skipped within 3 output frames of it (run: over the whole run)."]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runtime.md").write_text("\n".join(lines) + "\n")
        (args.out / "runtime.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

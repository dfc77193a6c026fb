"""Fixed-size exports against the dynamic export at native resolution, stretched and letterboxed.

Exports one step three ways into a scratch repository: at a legacy fixed size (by default 180x240,
CamVid's own size and what the default used to be, not a multiple of the output stride), at the
exporter's default (the training images' typical size in stride multiples), and with --dynamic. Each
runs through the runtime's own pre- and post-processing (ciss.runtime.model.Model on ONNX
Runtime) with --resize stretch and letterbox. The reference is the dynamic graph run at each image's
own size, with no resampling. Prints the pixel agreement with it on the step's eval images and on
frames of a video clip, and mIoU against the eval labels.

    OMP_NUM_THREADS=1 python benchmarks/export_agreement.py --run docs/results/camvid-pretrained/6-1/runs/seed0/base \\
        --clip ../shared/data/videos/udacity_solidWhiteRight.mp4      # docs/results/export/agreement.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ciss.export import onnx as onnx_export
from ciss.export.pipeline import ExportOptions, export_step
from ciss.export.verify import cpu_session, spread, to_input
from ciss.manifest import InputSpec
from ciss.repository import ModelRepository
from ciss.runtime.model import Model
from ciss.sizes import RESIZE_MODES
from ciss.trainer.data import native_ids, open_splits
from ciss.trainer.data.tasks import presence, test_indices, test_lut
from ciss.trainer.data.transforms import Normalise
from ciss.trainer.evaluate import ConfusionMatrix, compute_metrics
from ciss.trainer.store import RunStore


def quiet(_: str) -> None:
    pass


def legacy_export(run: Path, step: int, size: tuple[int, int], repo: Path, name: str) -> Path:
    """A fixed-size version at any `size`, as the exporter made them before sizes had to be stride multiples."""
    model, step_manifest = RunStore(run).load(step)
    fused = model.fused().eval()
    graph = onnx_export.add_tail(onnx_export.export_logits(fused, size, dynamic=False), "mask")
    spec = InputSpec(onnx_export.INPUT, size=size, example_size=size, stride=fused.output_stride,
                     normalisation=step_manifest.normalisation).to_json()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_export.save_checked(graph, Path(tmp) / "model.onnx")
        manifest = {"classes": step_manifest.classes.to_json(), "input": spec,
                    "outputs": onnx_export.output_specs(graph),
                    "precision": "fp32", "variants": {}, "engines": []}
        version = ModelRepository(repo).publish(name, {"model.onnx": Path(tmp) / "model.onnx"}, manifest)
    return ModelRepository(repo).path(name, version)


def load(path: Path, resize: str, threads: int) -> Model:
    return Model.load(path, ModelRepository(path.parent.parent).manifest(path.parent.name, int(path.name)),
                      "ort-cpu", threads, quiet, resize)


def clip_frames(clip: Path, n: int) -> list[np.ndarray]:
    """`n` BGR frames spread over the whole clip."""
    cap = cv2.VideoCapture(str(clip))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frames = []
    for i in spread(total, n):
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, frame = cap.read()
        if ok:
            frames.append(frame)
    cap.release()
    return frames


def measure(run: Path, step: int | None, legacy: tuple[int, int], clip: Path | None, images: int, frames: int,
            threads: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Agreement with the native dynamic export (and mIoU on the eval split) of every (export, resize) pair."""
    store = RunStore(run)
    step = store.last_step() if step is None else step
    step_manifest = store.manifest(step)
    classmap = step_manifest.classes
    normalise = Normalise(step_manifest.normalisation.mean, step_manifest.normalisation.std)
    _, eval_ds = open_splits(step_manifest.config)
    seen = native_ids(eval_ds, [c.name for c in classmap if c.id > 0])
    indices = test_indices(presence(eval_ds), seen, step_manifest.config["data"]["eval_protocol"])
    indices = indices[spread(len(indices), images)] if images else indices
    lut = test_lut(eval_ds.info, classmap)
    sets = {"eval": [(np.ascontiguousarray(eval_ds.image(int(i))[..., ::-1]), lut[eval_ds.label(int(i))])
                     for i in indices]}
    if clip is not None and frames:
        sets["clip"] = [(f, None) for f in clip_frames(clip, frames)]

    with tempfile.TemporaryDirectory(prefix="ciss-agreement-") as tmp:
        repo = Path(tmp)
        log(f"exporting step {step} of {run}: {legacy[0]}x{legacy[1]} (legacy), the default, --dynamic")
        paths = {"legacy": legacy_export(run, step, legacy, repo, "legacy"),
                 "default": export_step(run, repo, "default", ExportOptions(step=step), log=quiet).path,
                 "dynamic": export_step(run, repo, "dynamic", ExportOptions(step=step, dynamic=True), log=quiet).path}
        sizes = {k: ModelRepository(repo).manifest(k).input.size for k in paths}
        reference = cpu_session(str(paths["dynamic"] / "model.onnx"), threads)
        scores: dict[str, dict[str, Any]] = {}
        for set_name, items in sets.items():
            log(f"{set_name}: {len(items)} images of {items[0][0].shape[0]}x{items[0][0].shape[1]}")
            native = [reference.run(None, {onnx_export.INPUT: to_input(np.ascontiguousarray(im[..., ::-1]),
                                                                          im.shape[:2], normalise)})[0][0]
                      for im, _ in items]
            rows = {("dynamic", "native"): native}
            for export, path in paths.items():
                for resize in RESIZE_MODES:
                    model = load(path, resize, threads)
                    rows[(export, resize)] = [model.run(im)[0] for im, _ in items]
                    model.close()
            for key, masks in rows.items():
                agree = sum(int((m == n).sum()) for m, n in zip(masks, native)) / sum(n.size for n in native)
                row = scores.setdefault(f"{key[0]}/{key[1]}", {})
                row[f"{set_name}_agreement"] = agree
                if set_name == "eval":
                    confusion = ConfusionMatrix(len(classmap))
                    for mask, (_, label) in zip(masks, items):
                        confusion.update(torch.from_numpy(mask.astype(np.int64)),
                                         torch.from_numpy(label.astype(np.int64)))
                    row["miou"] = compute_metrics(confusion.matrix, classmap)["miou_all"]
    return {"run": str(run), "step": step, "sizes": sizes, "stride": int(step_manifest.model["output_stride"]),
            "sets": {k: [len(v), list(v[0][0].shape[:2])] for k, v in sets.items()}, "scores": scores}


def markdown(report: dict[str, Any]) -> list[str]:
    sizes = {k: "dynamic" if v is None else f"{v[0]}x{v[1]}" for k, v in report["sizes"].items()}
    sets = report["sets"]
    head = ["export", "input", "resize", *(f"agreement, {k} ({n} at {hw[0]}x{hw[1]})" for k, (n, hw) in sets.items()),
            "mIoU (eval)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in report["scores"].items():
        export, resize = key.split("/")
        cells = [export, "frame's own size" if resize == "native" else sizes[export], resize,
                 *(f"{100 * row[f'{k}_agreement']:.2f}%" for k in sets), f"{100 * row['miou']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--step", type=int)
    ap.add_argument("--legacy-size", default="180x240", help="HxW of the fixed export the default used to make")
    ap.add_argument("--clip", type=Path, help="a video whose frames are segmented too (no labels)")
    ap.add_argument("--images", type=int, default=0, help="eval images (0: all the eval protocol keeps)")
    ap.add_argument("--frames", type=int, default=24, help="frames spread over the clip")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = ap.parse_args()
    h, w = (int(v) for v in args.legacy_size.lower().split("x"))
    report = measure(args.run, args.step, (h, w), args.clip, args.images, args.frames, args.threads)
    lines = [f"# Export sizes and resize modes against the dynamic export: {args.run} step {report['step']}", "",
             *markdown(report), "",
             f"Agreement: the share of pixels whose class equals the dynamic graph's run at the image's own size "
             f"(no resampling); output stride {report['stride']}.", "",
             "Command: `OMP_NUM_THREADS=1 python " + " ".join(sys.argv) + "`"]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""`ciss export`: one stored step -> checked ONNX (and int8, and engines) -> a new repository version.

Everything is built and checked in a scratch folder first; only a whole, verified set of files is
published, so a failed export never leaves a version that readers could pick up.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ciss.classmap import ClassMap, unlearned_warning
from ciss.engines import EngineManifest, engine_unavailable_reason, local_gpu
from ciss.errors import CissError
from ciss.export import onnx as onnx_export
from ciss.export.settings import EXPORT, PRECISIONS
from ciss.export.verify import check_parity, evaluate_graph, spread, to_input
from ciss.manifest import InputSpec, ModelManifest, StepManifest, sha256_file, write_json_atomic
from ciss.repository import ModelRepository, check_name
from ciss.sizes import Size, check_stride, stride_size, typical_size
from ciss.trainer.data import open_splits
from ciss.trainer.data.base import SegDataset
from ciss.trainer.data.transforms import Normalise
from ciss.trainer.log import bar
from ciss.trainer.store import RunStore

PARITY_IMAGES = 4
SIZE_SAMPLE = 32     # training images whose sizes choose the default input size
SYNTHETIC_SIZE = (240, 320)
LOGGER = logging.getLogger("ciss.export")


@dataclass
class ExportOptions:
    """What to export and how; the defaults of the settings are `ciss export`'s (ciss/export/settings.py)."""

    step: int | None = None            # None: the run's last step
    size: tuple[int, int] | None = None  # None: the training images' typical size in stride multiples
    dynamic: bool = EXPORT.default("export.dynamic")
    outputs: str = EXPORT.default("export.outputs")
    opset: int = EXPORT.default("export.opset")
    trt: bool = EXPORT.default("export.trt")
    precision: str = EXPORT.default("export.precision")
    workspace_gb: float = EXPORT.default("export.workspace_gb")
    calib_images: int = EXPORT.default("export.calib_images")
    allow_class_change: bool = EXPORT.default("export.allow_class_change")


@dataclass
class ExportResult:
    name: str
    version: int
    path: Path
    manifest: ModelManifest
    engine_error: str | None = None  # why `--trt` built no engine (the ONNX is published regardless)


def _step_datasets(manifest: StepManifest, log: Callable[[str], None]) -> tuple[SegDataset | None, SegDataset | None]:
    """The step's training and eval splits, or None where the data is not on this machine."""
    try:
        return open_splits(manifest.config)
    except CissError as e:
        log(f"the step's dataset is not readable here ({e}); checking parity on synthetic scenes")
        return None, None


def _synthetic_images(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    from ciss.synthetic import render_scene

    rng = np.random.default_rng(0)
    return [render_scene(rng, *size)[0] for _ in range(n)]


def _images(ds: SegDataset | None, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    return [ds.image(i) for i in spread(len(ds), n)] if ds is not None and len(ds) else _synthetic_images(n, size)


def _default_size(datasets: tuple[SegDataset | None, ...], stride: int, log: Callable[[str], None]) -> Size:
    """The training images' typical size (the eval split's where training is not readable), each side
    rounded to the nearest multiple of the output stride: one image alone may have another shape."""
    ds = next((d for d in datasets if d is not None and len(d)), None)
    sizes = [ds.image(i).shape[:2] for i in spread(len(ds), SIZE_SAMPLE)] if ds is not None else [SYNTHETIC_SIZE]
    typical = typical_size(sizes)
    size = stride_size(typical, stride, onnx_export.MIN_SIDE, onnx_export.MAX_SIDE)
    what = f"{len(sizes)} images of the step's data" if ds is not None else "the synthetic scenes"
    log(f"input size {size[0]}x{size[1]}: {what} are typically {typical[0]}x{typical[1]}, rounded to multiples "
        f"of the output stride {stride} (--size HxW to choose)")
    return size


def _resolve_step(store: RunStore, step: int | None) -> int:
    if step is not None:
        return step
    last = store.last_step()
    if last is None:
        raise CissError(f"{store.root} has no finished step to export; train one with `ciss learn --run {store.root}`")
    return last


def _check_options(options: ExportOptions) -> None:
    onnx_export.output_names(options.outputs)
    onnx_export.check_opset(options.opset)
    if options.precision not in PRECISIONS:
        raise CissError(f"unknown --precision '{options.precision}'; choose one of {', '.join(PRECISIONS)}")
    if options.precision == "fp16" and not options.trt:
        raise CissError("--precision fp16 builds a TensorRT engine; add --trt (ONNX Runtime on CPU runs fp32 or int8)")
    if options.workspace_gb <= 0 or options.calib_images < 1:
        raise CissError("--workspace and --calib-images must be positive")


def export_step(run: Path, repo: Path, name: str, options: ExportOptions,
                log: Callable[[str], None] = LOGGER.info) -> ExportResult:
    """Export a step of `run` as the next version of `name` in the repository at `repo`; progress lines
    go to `log` (`ciss export` passes one that writes to stderr)."""
    check_name(name)
    _check_options(options)
    store = RunStore(run)
    if not store.steps():
        raise CissError(f"{run} is not a run with finished steps; train one with `ciss learn --run {run}`")
    step = _resolve_step(store, options.step)
    model, step_manifest = store.load(step)
    if options.size:
        check_stride(options.size, model.output_stride)  # before minutes of export work
    classmap = step_manifest.classes
    repository = ModelRepository(repo)
    parent = repository.latest(name)
    if parent is not None and not options.allow_class_change:
        repository.check_extends(name, parent, classmap)  # fail before minutes of export work
    train_ds, eval_ds = _step_datasets(step_manifest, log)
    size = options.size or _default_size((train_ds, eval_ds), model.output_stride, log)
    normalisation = step_manifest.normalisation  # ImageNet's for a step written before steps recorded it
    normalise = Normalise(normalisation.mean, normalisation.std)

    log(f"exporting step {step} of {store.root} ({len(classmap)} classes) at {size[0]}x{size[1]}"
        f"{' (dynamic height and width)' if options.dynamic else ''}")
    warning = unlearned_warning(classmap, step_manifest.metrics)
    if warning:
        log(warning)
    fused = model.fused().eval()
    logits = onnx_export.export_logits(fused, size, options.dynamic, options.opset)
    sizes = onnx_export.sizes_to_check(size, options.dynamic)
    parity = check_parity(fused, onnx_export.add_tail(logits, "mask", keep_logits=True),
                          _images(eval_ds, PARITY_IMAGES, size), sizes, normalise)
    log(f"parity with PyTorch on {parity['images']} images x {len(sizes)} size(s): mask agreement "
        f"{100 * parity['mask_agreement']:.3f}%, max |Δlogit| {parity['max_abs_logit_diff']:.2e}")

    input_spec = InputSpec(onnx_export.INPUT, size=None if options.dynamic else size, dynamic=options.dynamic,
                           example_size=size, min_size=(onnx_export.MIN_SIDE,) * 2 if options.dynamic else None,
                           max_size=(onnx_export.MAX_SIDE,) * 2 if options.dynamic else None,
                           stride=fused.output_stride, normalisation=normalisation)
    source = {"run": str(store.root.resolve()), "step": step, "weights_sha256": step_manifest.weights.sha256,
              "method": step_manifest.method, "model": step_manifest.model}
    metadata = {"classes": classmap.to_json(), "step": step, "input": input_spec.to_json(), "source": source,
                "exporter": onnx_export.exporter_versions(onnx_export.graph_opset(logits))}

    with tempfile.TemporaryDirectory(prefix="ciss-export-") as tmp:
        session = ExportSession(Path(tmp), logits, metadata, options, size, classmap, step_manifest, log)
        session.onnx(parity)
        if options.precision == "int8":
            session.int8(train_ds, eval_ds, normalise)
        engine_error = session.engines() if options.trt else None
        version = session.publish(repository, name)
    path = repository.path(name, version)
    log(f"published {name} version {version} at {path}")
    return ExportResult(name, version, path, repository.manifest(name, version), engine_error)


@dataclass
class ExportSession:
    """One export from the checked graph to the published version: each step writes its files into
    the scratch folder `work` and records them, and what the manifest says of them, here; `publish`
    hands the lot to the repository at once."""

    work: Path
    logits: Any                       # the fused model's graph up to the logits, without the output tail
    metadata: dict[str, Any]          # what every ONNX file carries: classes, step, input, source, exporter
    options: ExportOptions
    size: Size
    classmap: ClassMap
    step_manifest: StepManifest
    log: Callable[[str], None]
    files: dict[str, Path] = field(default_factory=dict)     # path inside the version -> file in `work`
    manifest: dict[str, Any] = field(default_factory=dict)
    calibration: list[np.ndarray] = field(default_factory=list)  # int8 only: the training images, as inputs

    def onnx(self, parity: dict[str, Any]) -> None:
        """model.onnx (fp32, the outputs asked for) and the manifest that describes it."""
        final = onnx_export.add_tail(self.logits, self.options.outputs)
        outputs = onnx_export.output_specs(final)
        onnx_export.set_metadata(final, {**self.metadata, "precision": "fp32", "outputs": outputs})
        self.files["model.onnx"] = self.work / "model.onnx"
        onnx_export.save_checked(final, self.files["model.onnx"])
        self.manifest = {
            "classes": self.classmap.to_json(), "input": self.metadata["input"], "outputs": outputs,
            "precision": "fp32", "source": self.metadata["source"], "metrics": self.step_manifest.metrics,
            "parity": parity, "exporter": self.metadata["exporter"], "variants": {}, "engines": []}

    def int8(self, train_ds: SegDataset | None, eval_ds: SegDataset | None, normalise: Normalise) -> None:
        """model.int8.onnx, quantized on the training images; then what it costs: mIoU of int8
        against fp32 on the eval split, both through ONNX Runtime."""
        if train_ds is None:
            raise CissError("--precision int8 calibrates on the step's training images, which are not readable "
                            "here; export on a machine that has the dataset")
        from ciss.export.quantize import quantize_int8

        size = self.size
        self.calibration = [to_input(im, size, normalise) for im in _images(train_ds, self.options.calib_images, size)]
        self.log(f"quantizing to int8 (QDQ) on {len(self.calibration)} training images")
        q_logits = quantize_int8(self.logits, self.calibration, target="cpu",
                                 progress=bar(len(self.calibration), "int8 calibration", unit="image"))
        self._save_int8(q_logits, "model.int8.onnx")
        variant: dict[str, Any] = {"file": "model.int8.onnx", "format": "QDQ", "activations": "uint8",
                                   "calibration_images": len(self.calibration)}
        self.manifest["variants"]["int8"] = variant
        if eval_ds is None:
            return
        data = self.step_manifest.config["data"]
        fp32 = evaluate_graph(onnx_export.add_tail(self.logits, "mask"), eval_ds, self.classmap, data["eval_protocol"],
                              size, normalise, label="fp32 eval")
        int8 = evaluate_graph(onnx_export.add_tail(q_logits, "mask"), eval_ds, self.classmap, data["eval_protocol"],
                              size, normalise, label="int8 eval")
        variant.update(split=data["eval_split"], eval_images=fp32["images"],
                       miou_fp32=fp32["miou_all"], miou_int8=int8["miou_all"],
                       miou_drop=fp32["miou_all"] - int8["miou_all"],
                       per_class_fp32=fp32["per_class"], per_class_int8=int8["per_class"])
        self.log(f"int8 mIoU {100 * int8['miou_all']:.1f} vs fp32 {100 * fp32['miou_all']:.1f} on {fp32['images']} "
                 f"eval images at {size[0]}x{size[1]} (drop {100 * variant['miou_drop']:.2f} points)")

    def engines(self) -> str | None:
        """Build the TensorRT engine where TensorRT and a GPU are present; else say why not (returned).

        TensorRT 10 takes the fp32 graph with precision flags (int8 through entropy calibration on the
        training images); TensorRT 11 builds strongly typed only, so it gets a float16 graph or a QDQ graph
        with the symmetric activations TensorRT requires.
        """
        from ciss.config_paths import cache_dir
        from ciss.export import tensorrt

        options = self.options
        local = local_gpu()
        if local is None:
            reason = engine_unavailable_reason()
            self.log(f"no TensorRT engine: {reason}")
            return reason
        source = "model.onnx"
        if int(local.tensorrt.split(".")[0]) >= 11 and options.precision == "fp16":
            source = "model.fp16.onnx"
            tensorrt.to_float16(self.files["model.onnx"], self.work / source)
            self.files[source] = self.work / source
        elif int(local.tensorrt.split(".")[0]) >= 11 and options.precision == "int8":
            from ciss.export.quantize import quantize_int8

            source = "model.int8-tensorrt.onnx"
            q_logits = quantize_int8(self.logits, self.calibration, target="tensorrt",
                                     progress=bar(len(self.calibration), "int8 calibration", unit="image"))
            self._save_int8(q_logits, source)
        profile = None
        if options.dynamic:
            h, w = self.size
            biggest = (min(onnx_export.MAX_SIDE, 2 * h), min(onnx_export.MAX_SIDE, 2 * w))
            profile = {onnx_export.INPUT: ((1, 3, onnx_export.MIN_SIDE, onnx_export.MIN_SIDE), (1, 3, h, w),
                                           (1, 3, *biggest))}
        self.log(f"building a TensorRT {local.tensorrt} {options.precision} engine from {source} on {local.gpu}")
        engine, sidecar = tensorrt.build_engine(
            self.files[source], self.work / "engines", precision=options.precision,
            workspace_gb=options.workspace_gb, calibration=self.calibration or None, profile=profile,
            classmap_version=len(self.classmap), cache_dir=cache_dir() / "tensorrt")
        self.files[f"engines/{engine.name}"], self.files[f"engines/{sidecar.name}"] = engine, sidecar
        self.manifest["engines"].append({"file": f"engines/{engine.name}", "manifest": f"engines/{sidecar.name}",
                                         "precision": options.precision, "onnx": source})
        return None

    def publish(self, repository: ModelRepository, name: str) -> int:
        """Publish the files as the next version of `name`; returns its number."""
        return repository.publish(name, self.files, self.manifest,
                                  allow_class_change=self.options.allow_class_change, stamp=_stamp_onnx)

    def _save_int8(self, q_logits: Any, file: str) -> None:
        graph = onnx_export.add_tail(q_logits, self.options.outputs)
        onnx_export.set_metadata(graph, {**self.metadata, "precision": "int8",
                                         "outputs": onnx_export.output_specs(graph)})
        self.files[file] = self.work / file
        onnx_export.save_checked(graph, self.files[file])


def _stamp_onnx(staging: Path, version: int) -> list[str]:
    """Write the version into every ONNX file; engine sidecars then name the stamped file's sha256
    (only metadata changed, so the engine still comes from that graph)."""
    changed = []
    for path in sorted(staging.glob("*.onnx")):
        onnx_export.stamp_version(path, version)
        changed.append(path.name)
    for path in sorted(staging.glob("engines/*.json")):
        sidecar = EngineManifest.read(path)
        stamped = replace(sidecar, onnx_sha256=sha256_file(staging / sidecar.onnx_file))
        write_json_atomic(path, stamped.to_json())
        changed.append(f"engines/{path.name}")
    return changed

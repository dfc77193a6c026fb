"""Files that later stages trust: hashing, atomic writes, and the manifests read from them.

Every manifest is written whole or not at all (temp file + rename, fsynced), so a reader never
sees half a file, and every weights file is named together with its sha256. Each manifest is read
into one typed class here, checked once when it is read: `StepManifest` (a run's `step-<k>/`),
`ModelManifest` with its `InputSpec` (a repository's `<name>/<version>/`); the TensorRT sidecar is
`ciss.engines.EngineManifest`. A damaged file is then one line naming the file and the key, and every
reader uses attributes. Standard library only: the runtime imports this on robots without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ciss.classmap import ClassMap
from ciss.errors import CissError

STEP_FORMAT = "ciss.step/1"
MODEL_FORMAT = "ciss.model/1"
MANIFEST = "manifest.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_FIX = "the step folder is damaged: restore it from a copy or train the step again in a new run"
_MODEL_FIX = "the version is damaged: publish it again with `ciss export`"
_MISSING = object()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be read by others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # name the file a full disk refused
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path, what: str = "manifest") -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CissError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CissError(f"corrupt {what} {path}: {e}; restore it or re-create the step") from None


def library_versions() -> dict[str, str]:
    """Versions that decide whether a result can be reproduced."""
    import cv2
    import numpy
    import torch

    import ciss

    return {"ciss": ciss.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "opencv": cv2.__version__}


# --- reading manifests ---------------------------------------------------------------------------

_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
          list: "a list", type(None): "null"}


class _Fields:
    """One stored JSON object read key by key: a missing or mistyped value is a CissError that names the
    file and the key and says what to do."""

    def __init__(self, data: Any, where: str, fix: str, prefix: str = ""):
        self.where, self.fix, self.prefix = where, fix, prefix
        if not isinstance(data, dict):
            raise self.error(prefix.rstrip(".") or "the file", f"holds {_shown(data)}, not a JSON object")
        self.data = data

    def error(self, key: str, problem: str) -> CissError:
        return CissError(f"{self.where}: {key} {problem}; {self.fix}")

    def get(self, key: str, kinds: tuple[type, ...], default: Any = _MISSING) -> Any:
        """The value of `key` when it is one of `kinds` (int also passes as float, bool never as int);
        `default` when the key is absent, and an error when there is no default."""
        if key not in self.data:
            if default is _MISSING:
                raise self.error(self.prefix + key, "is missing")
            return default
        value = self.data[key]
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and not (float in kinds and isinstance(value, int) and not isinstance(value, bool)):
            raise self.error(self.prefix + key, f"is {_shown(value)}, not {' or '.join(_KINDS[k] for k in kinds)}")
        return value

    def sub(self, key: str) -> _Fields:
        """The object under `key`, read the same way."""
        return _Fields(self.get(key, (dict,)), self.where, self.fix, f"{self.prefix}{key}.")

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of strings (or `default` when absent)."""
        value = self.get(key, (list,) if default is _MISSING else (list, type(None)), default)
        if value is not None and not all(isinstance(v, str) for v in value):
            raise self.error(self.prefix + key, f"is {_shown(value)}, not a list of strings")
        return value

    def size(self, key: str) -> tuple[int, int] | None:
        """An [H, W] of positive integers, or None (absent or null)."""
        value = self.get(key, (list, type(None)), None)
        if value is None:
            return None
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise self.error(self.prefix + key, f"is {_shown(value)}, not [height, width] in pixels")
        return int(value[0]), int(value[1])

    def classes(self, key: str = "classes") -> ClassMap:
        value = self.get(key, (list,))
        try:
            return ClassMap.from_json(value)
        except CissError as e:
            raise self.error(self.prefix + key, f"is not a class map ({e})") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Normalisation:
    """What a model's input is: `(pixel / 255 - mean) / std` per RGB channel, as the model was trained.

    A preset may give its own `mean` and `std` (configs/models.toml); ImageNet's, which every
    ImageNet-pretrained backbone expects, is the default (`IMAGENET`). The step manifest records it and
    the exporter copies it into the version's input spec, so the runtime feeds the graph what training
    fed the model."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_json(cls, mean: Any, std: Any, where: str, fix: str) -> Normalisation:
        def rgb(v: Any) -> bool:
            return isinstance(v, list | tuple) and len(v) == 3 and all(
                isinstance(x, int | float) and not isinstance(x, bool) for x in v)

        if not (rgb(mean) and rgb(std)) or min(std) <= 0:
            raise CissError(f"{where}: mean and std must be three numbers each, one per RGB channel, std above "
                            f"0; got mean {_shown(mean)} and std {_shown(std)}; {fix}")
        return cls((float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2])))

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


IMAGENET = Normalisation(IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class WeightsFile:
    """A step's weights file, named together with its sha256."""

    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class StepManifest:
    """`step-<k>/manifest.json` (docs/formats.md, "Step manifest"): one trained step, enough to rebuild
    its model and to judge it. The free-form sections (config, data, train, metrics) stay dicts; the
    keys the stages read are checked here and offered as attributes."""

    step: int
    run: str
    created: str
    classes: ClassMap
    model: dict[str, Any]               # build_model's arguments: preset, output_stride, step_sizes
    weights: WeightsFile
    parent: dict[str, Any] | None       # the previous step and its weights' sha256 (None at step 0)
    pretrained: dict[str, Any] | None   # the ImageNet (or own) file step 0 started from
    method: str
    data: dict[str, Any]                # dataset, kind, root, added, old_names, train_images, eval_images
    config: dict[str, Any]              # the fully resolved config
    seed: int
    versions: dict[str, Any]
    train: dict[str, Any]               # iterations, epochs, wall_s, processes, device
    metrics: dict[str, Any]             # miou_all, miou_old, miou_new, per_class, ...
    method_report: dict[str, Any]
    normalisation: Normalisation        # ImageNet's for a step written before it was recorded

    @property
    def preset(self) -> str:
        return self.model["preset"]

    @property
    def added(self) -> list[str]:
        """The names of the classes this step learned."""
        return self.data["added"]

    @property
    def old_names(self) -> list[str] | None:
        """A joint step of a protocol: its step-0 classes, which split its mIoU into old and new."""
        return self.data.get("old_names")

    @property
    def wall_s(self) -> float:
        return float(self.train["wall_s"])

    @classmethod
    def from_json(cls, data: Any, path: Path | str = "step manifest") -> StepManifest:
        f = _Fields(data, str(path), _STEP_FIX)
        if data.get("format") != STEP_FORMAT:
            raise f.error("format", f"is {_shown(data.get('format'))}, not {STEP_FORMAT!r} (not a ciss step)")
        weights, model, step_data, train = f.sub("weights"), f.sub("model"), f.sub("data"), f.sub("train")
        model.get("preset", (str,))
        model.get("output_stride", (int,))
        model.get("step_sizes", (list,))
        step_data.strings("added")
        step_data.strings("old_names", None)
        train.get("wall_s", (float,))
        norm = f.sub("normalisation") if "normalisation" in data else None
        return cls(
            step=f.get("step", (int,)), run=f.get("run", (str,)), created=f.get("created", (str,)),
            classes=f.classes(), model=model.data,
            weights=WeightsFile(weights.get("file", (str,)), weights.get("sha256", (str,)),
                                weights.get("size", (int,))),
            parent=f.get("parent", (dict, type(None)), None), pretrained=f.get("pretrained", (dict, type(None)), None),
            method=f.get("method", (str,)), data=step_data.data, config=f.get("config", (dict,)),
            seed=f.get("seed", (int,)), versions=f.get("versions", (dict,), {}), train=train.data,
            metrics=f.get("metrics", (dict,)), method_report=f.get("method_report", (dict,), {}),
            normalisation=IMAGENET if norm is None else Normalisation.from_json(
                norm.get("mean", (list,)), norm.get("std", (list,)), f"{path}: normalisation", _STEP_FIX))


def step_dir(run: Path, step: int) -> Path:
    return Path(run) / f"step-{step}"


def finished_steps(run: Path) -> list[int]:
    """The numbers of a run's finished steps, in order: `step-<k>` folders that hold a manifest (staging
    and partial folders start with a dot and never match)."""
    run = Path(run)
    if not run.is_dir():
        return []
    found = (_STEP_DIR.match(p.name) for p in run.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m and (run / m.group(0) / MANIFEST).exists())


def read_step(folder: Path) -> StepManifest:
    """The manifest of the step folder `folder`, checked, also against the folder's name."""
    path = Path(folder) / MANIFEST
    manifest = StepManifest.from_json(read_json(path, "step manifest"), path)
    named = _STEP_DIR.match(path.parent.name)
    if named and int(named.group(1)) != manifest.step:
        raise CissError(f"{path}: step is {manifest.step} but the folder is {path.parent.name}; {_STEP_FIX}")
    return manifest


def run_steps(run: Path) -> list[StepManifest]:
    """The manifests of every finished step of `run`, in order: the one reader of a run's history
    (`ciss runs`, the reports, the demo, the benchmarks)."""
    return [read_step(step_dir(run, k)) for k in finished_steps(run)]


@dataclass(frozen=True)
class InputSpec:
    """A version's `input`: the tensor its graph takes and how a frame becomes it. Keys a manifest leaves
    out take these defaults, as the runtime always read them."""

    name: str = "images"
    size: tuple[int, int] | None = None           # fixed (H, W); None for a dynamic graph
    dynamic: bool = False
    example_size: tuple[int, int] | None = None   # the size it was exported and checked at
    min_size: tuple[int, int] | None = None       # a dynamic graph's range
    max_size: tuple[int, int] | None = None
    stride: int | None = None                     # the output stride: dynamic sizes are its multiples
    layout: str = "NCHW"
    color: str = "RGB"
    dtype: str = "float32"
    scale: float = 1 / 255                        # pixel values 0..255 to 0..1, before the normalisation
    normalisation: Normalisation | None = None

    @classmethod
    def from_json(cls, data: Any, where: str = "input spec", fix: str = _MODEL_FIX) -> InputSpec:
        f = _Fields(data, where, fix, "input.")
        mean, std = f.get("mean", (list, type(None)), None), f.get("std", (list, type(None)), None)
        return cls(
            name=f.get("name", (str,), cls.name), size=f.size("size"), dynamic=f.get("dynamic", (bool,), False),
            example_size=f.size("example_size"), min_size=f.size("min_size"), max_size=f.size("max_size"),
            stride=f.get("stride", (int, type(None)), None), layout=f.get("layout", (str,), cls.layout),
            color=f.get("color", (str,), cls.color), dtype=f.get("dtype", (str,), cls.dtype),
            scale=float(f.get("scale", (float,), cls.scale)),
            normalisation=None if mean is None and std is None else
            Normalisation.from_json(mean, std, f"{where}: input", fix))

    def to_json(self) -> dict[str, Any]:
        def listed(size: tuple[int, int] | None) -> list[int] | None:
            return None if size is None else list(size)

        norm = self.normalisation.to_json() if self.normalisation else {"mean": None, "std": None}
        return {"name": self.name, "size": listed(self.size), "dynamic": self.dynamic,
                "example_size": listed(self.example_size), "min_size": listed(self.min_size),
                "max_size": listed(self.max_size), "stride": self.stride, "layout": self.layout, "color": self.color,
                "dtype": self.dtype, "scale": self.scale, **norm}


_MODEL_KEYS = ("format", "name", "version", "parent", "created", "classes", "input", "outputs", "precision",
               "source", "metrics", "parity", "exporter", "variants", "engines", "files")


@dataclass(frozen=True)
class ModelManifest:
    """`<name>/<version>/manifest.json` (docs/formats.md, "Model manifest"): one published version.
    `files` is checked against the files by `ciss.repository.verify_version`; keys this ciss does not
    know are kept in `extra`, so `to_json` loses nothing that was read."""

    name: str
    version: int
    parent: int | None
    created: str
    classes: ClassMap
    files: dict[str, Any]               # path -> {"sha256", "size"}
    input: InputSpec | None
    outputs: list[dict[str, Any]]       # [{"name", "dtype", "shape"}]
    precision: str                      # of model.onnx
    source: dict[str, Any] | None       # the step it came from: run, step, weights_sha256, method, model
    metrics: dict[str, Any] | None      # the step's
    parity: dict[str, Any] | None
    exporter: dict[str, Any] | None
    variants: dict[str, dict[str, Any]]  # other graphs, e.g. {"int8": {"file": "model.int8.onnx", ...}}
    engines: list[dict[str, Any]]       # [{"file", "manifest", "precision", "onnx"}]
    extra: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any, path: Path | str = "model manifest") -> ModelManifest:
        f = _Fields(data, str(path), _MODEL_FIX)
        if data.get("format") != MODEL_FORMAT:
            raise f.error("format", f"is {_shown(data.get('format'))}, not {MODEL_FORMAT!r} (not a ciss model)")
        outputs = f.get("outputs", (list, type(None)), None) or []
        variants = f.get("variants", (dict, type(None)), None) or {}
        engines = f.get("engines", (list, type(None)), None) or []
        for key, entries in (("outputs", outputs), ("variants", variants.values()), ("engines", engines)):
            if any(not isinstance(e, dict) for e in entries):
                raise f.error(key, "holds an entry that is not an object")
        if any(not isinstance(o.get("name"), str) for o in outputs):
            raise f.error("outputs", "holds an output without a name")
        spec = f.get("input", (dict, type(None)), None)
        return cls(
            name=f.get("name", (str,)), version=f.get("version", (int,)),
            parent=f.get("parent", (int, type(None)), None),
            created=f.get("created", (str,)), classes=f.classes(), files=f.get("files", (dict,), {}),
            input=None if spec is None else InputSpec.from_json(spec, str(path)), outputs=outputs,
            precision=f.get("precision", (str,), "fp32"), source=f.get("source", (dict, type(None)), None),
            metrics=f.get("metrics", (dict, type(None)), None), parity=f.get("parity", (dict, type(None)), None),
            exporter=f.get("exporter", (dict, type(None)), None), variants=variants, engines=engines,
            extra={k: v for k, v in data.items() if k not in _MODEL_KEYS})

    def to_json(self) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, "name": self.name, "version": self.version, "parent": self.parent,
                "created": self.created, "classes": self.classes.to_json(),
                "input": None if self.input is None else self.input.to_json(), "outputs": self.outputs,
                "precision": self.precision, "source": self.source, "metrics": self.metrics, "parity": self.parity,
                "exporter": self.exporter, "variants": self.variants, "engines": self.engines, **self.extra,
                "files": self.files}

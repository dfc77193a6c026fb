"""TensorRT engines as the model repository stores them: the sidecar format, the preflight, the loader.

A TensorRT plan only deserializes under the exact TensorRT version and GPU architecture (SM) it was
built for, and standard TensorRT has no API to ask before trying (runtime.md §0 item 2, §4.3). So every
engine gets a JSON sidecar (`engines/<tag>.json`, format "ciss.engine/1", read into `EngineManifest`) and
`check_engine_manifest` compares it with this machine before `load_engine` deserializes anything.

The exporter writes engines (ciss.export.tensorrt builds them) and the runtime loads them, so the
format lives here in the shared layer, and the runtime never imports the builder. Nothing heavy is
imported at module level: robots import this file for the preflight, so torch and tensorrt are
imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ciss.errors import CissError
from ciss.manifest import read_json

if TYPE_CHECKING:
    import tensorrt

ENGINE_FORMAT = "ciss.engine/1"
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]

_REBUILD = "rebuild it with `ciss export --trt` or use the ONNX model"
_REQUIRED = object()


@dataclass(frozen=True)
class LocalGpu:
    """What decides whether a plan runs here: TensorRT version and compute capability (the rest is
    recorded for people reading the sidecar)."""

    tensorrt: str
    gpu: str
    compute_capability: tuple[int, int]
    cuda: str


def probe() -> tuple[LocalGpu | None, str | None]:
    """This machine's TensorRT and GPU, or None and one line saying why not.

    GPU facts come through torch.cuda: torch is already a ciss dependency and is what the runtime uses
    for device buffers, so this needs no second CUDA binding (cuda-python) and shares its context."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # a broken install fails while loading libnvinfer
        if isinstance(e, ModuleNotFoundError) and e.name == "tensorrt":
            return None, "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU)"
        first_line = str(e).partition("\n")[0][:120]
        return None, f"TensorRT cannot be loaded ({type(e).__name__}: {first_line})"
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed, and ciss uses it for CUDA buffers"
    if not torch.cuda.is_available():
        return None, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return LocalGpu(trt.__version__, torch.cuda.get_device_name(device), (major, minor), torch.version.cuda or ""), None


def local_gpu() -> LocalGpu | None:
    """This machine's TensorRT and GPU, or None when either is missing."""
    return probe()[0]


def engine_unavailable_reason() -> str | None:
    """None when engines can be built and run here; otherwise one line saying why not (the CLI
    prints it after publishing the ONNX model alone)."""
    return probe()[1]


def engine_tag(compute_capability: Iterable[int], tensorrt_version: str, precision: str) -> str:
    """File stem of an engine, e.g. "sm90-trt10.3.0-fp16": what the plan is tied to, so engines for
    several GPUs can sit in one version folder."""
    major, minor = compute_capability
    return f"sm{major}{minor}-trt{tensorrt_version}-{precision}"


@dataclass(frozen=True)
class EngineManifest:
    """`engines/<tag>.json` (format "ciss.engine/1"): what a plan was built for and from, read and
    checked once; keys a sidecar may lack (it only needs what the preflight compares) take defaults."""

    tensorrt: str
    compute_capability: tuple[int, int]
    precision: str
    onnx_file: str           # the graph it was built from, inside the version folder
    onnx_sha256: str
    classmap_version: int    # the number of classes
    gpu: str = ""
    cuda: str = ""
    strongly_typed: bool = False
    profile: dict[str, dict[str, list[int]]] | None = None  # {input: {"min", "opt", "max"}} when dynamic
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)   # {name: {"shape", "dtype"}}
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    build_s: float = 0.0
    workspace_gb: float = 0.0

    @property
    def tag(self) -> str:
        return engine_tag(self.compute_capability, self.tensorrt, self.precision)

    @classmethod
    def from_json(cls, data: Any, path: Path | str | None = None) -> EngineManifest:
        what = f"engine manifest {path}" if path else "engine manifest"

        def stored(*keys: str, default: Any = _REQUIRED) -> Any:
            value: Any = data
            try:
                for key in keys:
                    value = value[key]
            except (KeyError, TypeError, IndexError):
                if default is not _REQUIRED:
                    return default
                raise CissError(f"{what} has no {'.'.join(keys)}; it is corrupt: {_REBUILD}") from None
            return value

        fmt = stored("format")
        if fmt != ENGINE_FORMAT:
            raise CissError(f"{what} has format {fmt!r}, not {ENGINE_FORMAT!r}: {_REBUILD}")
        cc = stored("compute_capability")
        if not isinstance(cc, list) or len(cc) != 2 or not all(isinstance(v, int) for v in cc):
            raise CissError(f"{what} has compute_capability {cc!r}; it is corrupt: {_REBUILD}")
        classes = stored("classmap_version")
        if not isinstance(classes, int):
            raise CissError(f"{what} has classmap_version {classes!r}; it is corrupt: {_REBUILD}")
        return cls(str(stored("tensorrt")), (cc[0], cc[1]), str(stored("precision")), str(stored("onnx", "file")),
                   str(stored("onnx", "sha256")), classes, gpu=str(stored("gpu", default="")),
                   cuda=str(stored("cuda", default="")), strongly_typed=bool(stored("strongly_typed", default=False)),
                   profile=stored("profile", default=None), inputs=stored("inputs", default={}),
                   outputs=stored("outputs", default={}), build_s=stored("build_s", default=0.0),
                   workspace_gb=stored("workspace_gb", default=0.0))

    @classmethod
    def read(cls, path: Path) -> EngineManifest:
        return cls.from_json(read_json(path, "engine manifest"), path)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": ENGINE_FORMAT, "tensorrt": self.tensorrt, "gpu": self.gpu,
            "compute_capability": list(self.compute_capability), "cuda": self.cuda, "precision": self.precision,
            "strongly_typed": self.strongly_typed, "profile": self.profile, "inputs": self.inputs,
            "outputs": self.outputs, "onnx": {"file": self.onnx_file, "sha256": self.onnx_sha256},
            "classmap_version": self.classmap_version, "build_s": self.build_s, "workspace_gb": self.workspace_gb,
        }


def engine_manifest(local: LocalGpu, *, precision: str, strongly_typed: bool, profile: Profile | None,
                    inputs: dict[str, dict[str, Any]], outputs: dict[str, dict[str, Any]], onnx_file: str,
                    onnx_sha256: str, classmap_version: int, build_s: float, workspace_gb: float) -> dict[str, Any]:
    """The sidecar written next to an engine built on `local`."""
    return EngineManifest(
        local.tensorrt, local.compute_capability, precision, onnx_file, onnx_sha256, classmap_version,
        gpu=local.gpu, cuda=local.cuda, strongly_typed=strongly_typed,
        profile=None if profile is None else {
            name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in profile.items()},
        inputs=inputs, outputs=outputs, build_s=round(build_s, 3), workspace_gb=workspace_gb).to_json()


def check_engine_manifest(sidecar: EngineManifest, local: LocalGpu, *, onnx_sha256: str | None = None,
                          classmap_version: int | None = None) -> None:
    """Refuse an engine this machine cannot run, or one built from another model, before deserializing.

    A plan is tied to the exact TensorRT version and the SM (runtime.md §4.3); the GPU's name is not
    compared, because another card with the same compute capability runs the plan (perhaps with less
    tuned tactics). `onnx_sha256` and `classmap_version` come from the model manifest when given.
    """
    built, cc, tag = sidecar.tensorrt, sidecar.compute_capability, sidecar.tag
    if built != local.tensorrt or tuple(cc) != tuple(local.compute_capability):
        here = local.compute_capability
        raise CissError(f"engine {tag} was built for TensorRT {built} on compute capability {cc[0]}.{cc[1]}; "
                        f"this machine has TensorRT {local.tensorrt} on {here[0]}.{here[1]}: {_REBUILD}")
    if onnx_sha256 is not None and sidecar.onnx_sha256 != onnx_sha256:
        raise CissError(f"engine {tag} was built from another ONNX (sha256 {sidecar.onnx_sha256[:12]}, the model's is "
                        f"{onnx_sha256[:12]}): {_REBUILD}")
    if classmap_version is not None and sidecar.classmap_version != classmap_version:
        raise CissError(f"engine {tag} has class map version {sidecar.classmap_version} but the model has "
                        f"{classmap_version}: {_REBUILD}")


def load_engine(path: Path, sidecar: EngineManifest, *, onnx_sha256: str | None = None,
                classmap_version: int | None = None) -> tensorrt.ICudaEngine:
    """Preflight, then deserialize. TensorRT returns None (and only logs why) for a plan it cannot
    use; that becomes a CissError so the caller can fall back to the ONNX model."""
    local, reason = probe()
    if local is None:
        raise CissError(f"cannot load engine {path}: {reason}; use the ONNX model")
    check_engine_manifest(sidecar, local, onnx_sha256=onnx_sha256, classmap_version=classmap_version)
    import tensorrt as trt

    try:
        plan = Path(path).read_bytes()
    except FileNotFoundError:
        raise CissError(f"engine file {path} is missing: {_REBUILD}") from None
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    if engine is None:
        raise CissError(f"TensorRT {local.tensorrt} could not deserialize {path} (see its log above): {_REBUILD}")
    return engine

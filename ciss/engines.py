"""TensorRT engines as the model repository stores them: the sidecar format, the preflight, the loader.

A TensorRT plan only deserializes under the exact TensorRT version and GPU architecture (SM) it was
built for, and standard TensorRT has no API to ask before trying (runtime.md §0 item 2, §4.3). So every
engine gets a JSON sidecar (`engines/<tag>.json`, format "ciss.engine/1") and `check_engine_manifest`
compares it with this machine before `load_engine` deserializes anything.

The exporter writes engines (ciss.export.tensorrt builds them) and the runtime loads them, so the
format lives here in the shared layer, and the runtime never imports the builder. Nothing heavy is
imported at module level: robots import this file for the preflight, so torch and tensorrt are
imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ciss.errors import CissError

if TYPE_CHECKING:
    import tensorrt

ENGINE_FORMAT = "ciss.engine/1"
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]

_REBUILD = "rebuild it with `ciss export --trt` or use the ONNX model"


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


def engine_manifest(local: LocalGpu, *, precision: str, strongly_typed: bool, profile: Profile | None,
                    inputs: dict[str, dict[str, Any]], outputs: dict[str, dict[str, Any]], onnx_file: str,
                    onnx_sha256: str, classmap_version: int, build_s: float, workspace_gb: float) -> dict[str, Any]:
    """The sidecar written next to an engine (layout in the export design notes)."""
    return {
        "format": ENGINE_FORMAT, "tensorrt": local.tensorrt, "gpu": local.gpu,
        "compute_capability": list(local.compute_capability), "cuda": local.cuda, "precision": precision,
        "strongly_typed": strongly_typed,
        "profile": None if profile is None else {
            name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in profile.items()},
        "inputs": inputs, "outputs": outputs, "onnx": {"file": onnx_file, "sha256": onnx_sha256},
        "classmap_version": classmap_version, "build_s": round(build_s, 3), "workspace_gb": workspace_gb,
    }


def _field(sidecar: dict[str, Any], *keys: str) -> Any:
    value: Any = sidecar
    try:
        for key in keys:
            value = value[key]
    except (KeyError, TypeError, IndexError):
        raise CissError(f"engine manifest has no {'.'.join(keys)}; it is corrupt: {_REBUILD}") from None
    return value


def check_engine_manifest(sidecar: dict[str, Any], local: LocalGpu, *, onnx_sha256: str | None = None,
                          classmap_version: int | None = None) -> None:
    """Refuse an engine this machine cannot run, or one built from another model, before deserializing.

    A plan is tied to the exact TensorRT version and the SM (runtime.md §4.3); the GPU's name is not
    compared, because another card with the same compute capability runs the plan (perhaps with less
    tuned tactics). `onnx_sha256` and `classmap_version` come from the model manifest when given.
    """
    fmt = _field(sidecar, "format")
    if fmt != ENGINE_FORMAT:
        raise CissError(f"engine manifest has format {fmt!r}, not {ENGINE_FORMAT!r}: {_REBUILD}")
    built = str(_field(sidecar, "tensorrt"))
    cc = _field(sidecar, "compute_capability")
    if not isinstance(cc, list) or len(cc) != 2:
        raise CissError(f"engine manifest has compute_capability {cc!r}; it is corrupt: {_REBUILD}")
    tag = engine_tag(cc, built, _field(sidecar, "precision"))
    if built != local.tensorrt or tuple(cc) != tuple(local.compute_capability):
        here = local.compute_capability
        raise CissError(f"engine {tag} was built for TensorRT {built} on compute capability {cc[0]}.{cc[1]}; "
                        f"this machine has TensorRT {local.tensorrt} on {here[0]}.{here[1]}: {_REBUILD}")
    built_from = _field(sidecar, "onnx", "sha256")
    if onnx_sha256 is not None and built_from != onnx_sha256:
        raise CissError(f"engine {tag} was built from another ONNX (sha256 {built_from[:12]}, the model's is "
                        f"{onnx_sha256[:12]}): {_REBUILD}")
    classes = _field(sidecar, "classmap_version")
    if classmap_version is not None and classes != classmap_version:
        raise CissError(f"engine {tag} has class map version {classes} but the model has {classmap_version}: {_REBUILD}")


def load_engine(path: Path, sidecar: dict[str, Any], *, onnx_sha256: str | None = None,
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

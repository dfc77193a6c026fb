"""Inference backends for one model version: ONNX Runtime (TensorRT, CUDA or CPU execution provider)
and TensorRT engines, loaded by kind name, or any other backend through a `BackendFactory` (the torch
reference that `ciss live --backend torch` builds from the trainer, ciss/apps/reference.py, or a
robot's own accelerator), so the runtime never imports what it cannot install on a robot.

onnxruntime-gpu on a machine without a usable GPU quietly runs on the CPU: its GPU providers are
listed as available, session creation only logs the failure, and `get_providers()` is the one place
that tells (runtime.md §0 item 10, §4.4). So a GPU backend asked for by name is checked there and
refused with one line instead of running slowly; only `auto` steps down, and says why.
"""

from __future__ import annotations

import ctypes
import functools
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from ciss.engines import EngineManifest, engine_unavailable_reason, load_engine
from ciss.errors import CissError
from ciss.manifest import ModelManifest
from ciss.repository import member
from ciss.runtime.log import LOGGER, Log
from ciss.runtime.settings import check_kind

_PROVIDERS = {"ort-trt": "TensorrtExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
              "ort-cpu": "CPUExecutionProvider", "ort-int8": "CPUExecutionProvider"}
_FASTEST_FIRST = {"int8": 0, "fp16": 1, "fp32": 2}  # engine precisions, by usual TensorRT speed


class Backend(ABC):
    """A loaded graph: `infer` maps the 1×3×H×W float32 input to the graph's outputs by name."""

    name: str
    precision: str
    input_name: str
    output_names: list[str]

    @abstractmethod
    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        ...

    def close(self) -> None:
        """Release what the backend holds (GPU memory) before the garbage collector would."""


class BackendFactory(Protocol):
    """Builds the Backend for one verified version; given in place of a kind name, it loads every
    version a Segmenter serves, hot-swapped ones included. `threads`: intra-op threads (0: its default)."""

    def __call__(self, version_dir: Path, manifest: ModelManifest, threads: int) -> Backend:
        ...


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune this way
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def keep_large_blocks_mapped() -> None:
    """Fix glibc's mmap threshold for this process, so that every large block is its own mapping.

    glibc starts by mapping blocks of 128 KiB and more on their own (returned to the system when
    freed), but raises the threshold to the size of each such block freed, up to 32 MiB. Once the
    first retired model's buffers are freed, the next models' are carved from the heap among the
    frames' allocations, where freeing them leaves holes malloc_trim cannot return. Measured with
    benchmarks/soak.py (a swap every 15 s, 150 s): resident memory rose from 188 to 222 MiB and moved
    between 204 and 222 with each swap; with the threshold fixed it stayed at 176-193 MiB (start
    179, end 180), and `ciss live` ran as fast (24.0 against 23.7 FPS, three alternating runs).
    Setting the threshold turns the raising off; this sets glibc's own start value. It is process-wide,
    so it is done only where models are swapped, and a MALLOC_MMAP_THRESHOLD_ set in the environment
    is left as the user chose it.
    """
    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_freed_memory() -> None:
    """Hand the heap a closed model freed back to the operating system.

    Closing a model's session frees tens of MiB, but glibc keeps freed blocks in its arenas (one per
    thread that allocated: models are loaded and warmed up on a background thread), so a live run's
    resident memory grew by about 12 MiB with every hot swap (10-minute soak, 10 swaps: 191 -> 308
    MiB; with this call after each close it stayed at 161 MiB in the same loop). malloc_trim(0)
    returns them; where libc is not glibc this does nothing.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class OrtBackend(Backend):
    def __init__(self, session: ort.InferenceSession, precision: str):
        self.session = session
        self.name = f"onnxruntime:{session.get_providers()[0]}"
        self.precision = precision
        self.input_name = session.get_inputs()[0].name
        self.output_names = [o.name for o in session.get_outputs()]

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, {self.input_name: x})))

    def close(self) -> None:
        del self.session


class TensorRTBackend(Backend):
    """A deserialized engine run through the named-tensor API (TensorRT >= 10, runtime.md §4.2).

    Device buffers are torch CUDA tensors, as in ciss.export.tensorrt's calibrator and Ultralytics (§1.3);
    they are kept between frames and reallocated only when a dynamic input changes the output shapes.
    """

    def __init__(self, engine: Any, precision: str):
        import tensorrt as trt
        import torch

        self._torch = torch
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise CissError("TensorRT could not create an execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise CissError(f"the engine has {len(inputs)} inputs; ciss models have one (images)")
        self.name, self.precision = "tensorrt", precision
        self.input_name = inputs[0]
        self.output_names = [n for n in names if n != self.input_name]
        self._dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(n)))).dtype
                        for n in self.output_names}
        self._stream = torch.cuda.Stream()
        self._buffers: dict[str, Any] = {}

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise CissError(f"input shape {list(x.shape)} is outside the engine's optimization profile")
        with torch.cuda.stream(self._stream):
            device_input = torch.from_numpy(x).to("cuda", non_blocking=False)
            self.context.set_tensor_address(self.input_name, device_input.data_ptr())
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if name not in self._buffers or tuple(self._buffers[name].shape) != shape:
                    self._buffers[name] = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
                self.context.set_tensor_address(name, self._buffers[name].data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise CissError("TensorRT failed to run the engine (see its log above)")
        self._stream.synchronize()
        return {name: self._buffers[name].cpu().numpy() for name in self.output_names}

    def close(self) -> None:
        self._buffers.clear()
        del self.context, self.engine


@functools.cache
def gpu_problem() -> str | None:
    """Why this machine has no usable NVIDIA GPU, asked of the driver library itself (no toolkit, no
    torch), so `auto` can skip the GPU providers without their noisy failed loads; None if it has one."""
    library = "nvcuda.dll" if os.name == "nt" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(library)
    except OSError:
        return f"no NVIDIA driver ({library} not found)"
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the NVIDIA driver reports no usable GPU"
    return None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _session(path: Path, providers: list[Any], threads: int) -> ort.InferenceSession:
    """A session on exactly these providers; ORT's Python-level retry on the CPU (which prints to
    stdout) is turned off, so a provider that fails to register raises here."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers, enable_fallback=0)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types (InvalidProtobuf, Fail, ...)
        raise CissError(f"ONNX Runtime cannot load {path}: {_first_line(e)}") from None


def _ort_providers(kind: str) -> list[Any]:
    """Provider list for a kind; GPU providers keep the CPU after them for the shape nodes ORT
    deliberately places there (onnxruntime#17930), with CUDA under TensorRT for unsupported nodes (§4.4)."""
    if kind == "ort-trt":
        from ciss.config_paths import cache_dir

        cache = str(cache_dir() / "onnxruntime-tensorrt")
        options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
        return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind == "ort-cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _load_ort(version_dir: Path, manifest: ModelManifest, kind: str, threads: int) -> Backend:
    provider = _PROVIDERS[kind]
    if provider not in ort.get_available_providers():
        raise CissError(f"cannot use backend {kind}: this onnxruntime build has no {provider} "
                        "(install onnxruntime-gpu)")
    if kind == "ort-int8":
        variant = manifest.variants.get("int8")
        if not variant:
            raise CissError(f"cannot use backend ort-int8: version {manifest.version} has no int8 variant "
                            "(export it with --precision int8)")
        path, precision = member(version_dir, variant.get("file")), "int8"
    else:
        path, precision = version_dir / "model.onnx", manifest.precision
    try:
        session = _session(path, _ort_providers(kind), threads)
        problem = None if session.get_providers()[0] == provider else \
            "the CUDA/cuDNN libraries this onnxruntime-gpu needs did not load (its log above says which)"
    except CissError as e:
        if provider == "CPUExecutionProvider":
            raise
        problem = str(e)  # the TensorRT provider fails while registering, before any session exists
    if problem:
        raise CissError(f"cannot use backend {kind}: ONNX Runtime could not start its {provider}: "
                        f"{gpu_problem() or problem}; choose --backend ort-cpu or auto")
    return OrtBackend(session, precision)


def _load_tensorrt(version_dir: Path, manifest: ModelManifest) -> Backend:
    """The fastest listed engine whose sidecar matches this machine (checked before deserializing)."""
    if reason := engine_unavailable_reason():
        raise CissError(f"cannot use backend tensorrt: {reason}")
    engines = sorted(manifest.engines, key=lambda e: _FASTEST_FIRST.get(e.get("precision"), 3))
    if not engines:
        raise CissError(f"cannot use backend tensorrt: version {manifest.version} has no TensorRT engine "
                        "(export it with --trt on a machine like this one)")
    refusals = []
    for entry in engines:
        try:
            sidecar = EngineManifest.read(member(version_dir, entry.get("manifest")))
            engine = load_engine(member(version_dir, entry.get("file")), sidecar,
                                 onnx_sha256=(manifest.files.get(entry.get("onnx")) or {}).get("sha256"),
                                 classmap_version=len(manifest.classes))
            return TensorRTBackend(engine, str(entry.get("precision", sidecar.precision)))
        except CissError as e:
            refusals.append(str(e))
    raise CissError(f"cannot use backend tensorrt: no engine fits this machine ({'; '.join(refusals)})")


def _load(version_dir: Path, manifest: ModelManifest, kind: str, threads: int) -> Backend:
    if kind == "tensorrt":
        return _load_tensorrt(version_dir, manifest)
    return _load_ort(version_dir, manifest, kind, threads)


def _auto(version_dir: Path, manifest: ModelManifest, threads: int, log: Log) -> Backend:
    """TensorRT engine -> ORT TensorRT -> ORT CUDA -> ORT CPU (runtime.md §10), saying what was skipped."""
    if gpu := gpu_problem():
        skipped = [f"GPU backends: {gpu}"]
    else:
        skipped = []
        for kind in ("tensorrt", "ort-trt", "ort-cuda"):
            if kind == "tensorrt" and not manifest.engines:
                skipped.append("tensorrt: no engine in this version")
                continue
            try:
                backend = _load(version_dir, manifest, kind, threads)
            except CissError as e:
                skipped.append(str(e).removeprefix("cannot use backend "))
                continue
            after = f" after {'; '.join(skipped)}" if skipped else ""
            log(f"backend auto: {backend.name} ({backend.precision}){after}")
            return backend
    backend = _load(version_dir, manifest, "ort-cpu", threads)
    log(f"backend auto: {backend.name} ({backend.precision}) because {'; '.join(skipped)}")
    return backend


def check_backend(backend: str | BackendFactory) -> str | BackendFactory:
    """`backend` if it is a factory or a kind this runtime loads, else the one-line refusal: "torch" is
    a name of the command line's, which builds the reference from the trainer the runtime never imports."""
    if callable(backend):
        return backend
    if check_kind(backend) == "torch":
        raise CissError("the torch backend is built by the command line (ciss live --backend torch); "
                        "in Python pass ciss.apps.reference.TorchBackend as the backend")
    return backend


def load_backend(version_dir: Path, manifest: ModelManifest, kind: str | BackendFactory = "auto", threads: int = 0,
                 log: Log | None = None) -> Backend:
    """Load the version in `version_dir` (its verified `manifest`) on backend `kind`: one of
    ciss.runtime.settings.KINDS but torch, or a BackendFactory.

    `threads` sets ONNX Runtime's intra-op threads (0: its default). A named kind that cannot load
    raises a one-line CissError; only `auto` falls back, logging each step down through `log`.
    """
    check_backend(kind)
    log = log or LOGGER.info
    if kind == "auto":
        return _auto(Path(version_dir), manifest, threads, log)
    folder = Path(version_dir)
    backend = kind(folder, manifest, threads) if callable(kind) else _load(folder, manifest, kind, threads)
    log(f"backend {kind if isinstance(kind, str) else backend.name}: {backend.name} ({backend.precision})")
    return backend

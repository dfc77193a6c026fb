"""ciss.engines: the TensorRT engine sidecar, the preflight that reads it, and the loader's refusals;
the builder's tests are in tests/export/test_tensorrt.py."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from importlib.util import find_spec

import pytest
import torch

from ciss import engines
from ciss.engines import LocalGpu
from ciss.errors import CissError

H100 = LocalGpu("10.3.0", "NVIDIA H100 80GB HBM3", (9, 0), "12.4")
SHA = "ab" * 32


def sidecar(**changes) -> dict:
    manifest = engines.engine_manifest(H100, precision="fp16", strongly_typed=False, profile=None,
                                       inputs={"images": {"shape": [1, 3, 32, 48], "dtype": "float32"}},
                                       outputs={"mask": {"shape": [1, 32, 48], "dtype": "int64"}},
                                       onnx_file="model.onnx", onnx_sha256=SHA, classmap_version=4, build_s=1.23456,
                                       workspace_gb=2)
    manifest.update(changes)
    return manifest


def parsed(data: dict) -> engines.EngineManifest:
    """A sidecar as the runtime reads it from disk (its checks raise here)."""
    return engines.EngineManifest.from_json(data)


# --- module import, availability probe ------------------------------------------------------------

def test_importing_the_module_loads_no_torch_or_tensorrt():
    code = ("import sys, ciss.engines; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnx', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="TensorRT is installed on this machine")
def test_without_tensorrt_everything_says_why_in_one_line(tmp_path):
    reason = engines.engine_unavailable_reason()
    assert reason == "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU)"
    assert engines.local_gpu() is None
    with pytest.raises(CissError, match="^cannot load engine .*TensorRT is not installed.*use the ONNX model$"):
        engines.load_engine(tmp_path / "x.engine", parsed(sidecar()))


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A stand-in `tensorrt` module: lets the probe's logic run where TensorRT cannot be installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))


def test_probe_reports_a_missing_gpu(fake_tensorrt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.engine_unavailable_reason() == "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    assert engines.local_gpu() is None


def test_probe_reads_gpu_facts_from_torch(fake_tensorrt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 7))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Orin")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert engines.engine_unavailable_reason() is None
    assert engines.local_gpu() == LocalGpu("10.3.0", "Orin", (8, 7), "12.6")


def test_probe_reports_a_broken_tensorrt_install(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("libnvinfer.so.10: cannot open shared object file\nmore detail")

    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr("builtins.__import__", _failing_import("tensorrt", fail))
    assert engines.engine_unavailable_reason() == ("TensorRT cannot be loaded (OSError: libnvinfer.so.10: "
                                                   "cannot open shared object file)")


def _failing_import(name, fail):
    real = __import__

    def importer(module, *args, **kwargs):
        return fail() if module == name else real(module, *args, **kwargs)

    return importer


# --- names and the sidecar -------------------------------------------------------------------------

def test_engine_tag_names_sm_tensorrt_and_precision():
    assert engines.engine_tag((9, 0), "10.3.0", "fp16") == "sm90-trt10.3.0-fp16"
    assert engines.engine_tag([8, 7], "10.3.0.26", "int8") == "sm87-trt10.3.0.26-int8"


def test_engine_manifest_records_the_build():
    profile = {"images": ((1, 3, 32, 32), (1, 3, 64, 64), (1, 3, 128, 128))}
    manifest = engines.engine_manifest(H100, precision="int8", strongly_typed=True, profile=profile,
                                       inputs={"images": {"shape": [1, 3, -1, -1], "dtype": "float32"}},
                                       outputs={"mask": {"shape": [1, -1, -1], "dtype": "int64"}},
                                       onnx_file="model.int8.onnx", onnx_sha256=SHA, classmap_version=7,
                                       build_s=12.34567, workspace_gb=4)
    assert manifest == {
        "format": "ciss.engine/1", "tensorrt": "10.3.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0],
        "cuda": "12.4", "precision": "int8", "strongly_typed": True,
        "profile": {"images": {"min": [1, 3, 32, 32], "opt": [1, 3, 64, 64], "max": [1, 3, 128, 128]}},
        "inputs": {"images": {"shape": [1, 3, -1, -1], "dtype": "float32"}},
        "outputs": {"mask": {"shape": [1, -1, -1], "dtype": "int64"}},
        "onnx": {"file": "model.int8.onnx", "sha256": SHA}, "classmap_version": 7, "build_s": 12.346,
        "workspace_gb": 4,
    }
    assert json.loads(json.dumps(manifest)) == manifest
    assert sidecar()["profile"] is None


# --- preflight -------------------------------------------------------------------------------------

def test_preflight_accepts_a_matching_engine():
    engines.check_engine_manifest(parsed(sidecar()), H100)
    engines.check_engine_manifest(parsed(sidecar()), H100, onnx_sha256=SHA, classmap_version=4)
    engines.check_engine_manifest(parsed(json.loads(json.dumps(sidecar()))), H100)  # as read back from disk


def test_preflight_ignores_the_gpu_name_and_cuda_version():
    """Plans are tied to the SM and TensorRT version, not to the card's name or the CUDA toolkit."""
    engines.check_engine_manifest(parsed(sidecar(gpu="NVIDIA H100 PCIe", cuda="12.1")), H100)


def test_preflight_message_names_both_sides():
    with pytest.raises(CissError) as e:
        engines.check_engine_manifest(parsed(sidecar(tensorrt="10.3.0", compute_capability=[8, 6])),
                                      LocalGpu("10.7.0", "NVIDIA H100", (9, 0), "12.6"))
    assert str(e.value) == ("engine sm86-trt10.3.0-fp16 was built for TensorRT 10.3.0 on compute capability 8.6; "
                            "this machine has TensorRT 10.7.0 on 9.0: rebuild it with `ciss export --trt` or use "
                            "the ONNX model")


@pytest.mark.parametrize("changes, local, match", [
    ({"tensorrt": "10.7.0"}, H100, "built for TensorRT 10.7.0 on compute capability 9.0; this machine has TensorRT 10.3.0"),
    ({"tensorrt": "10.3.0.26"}, H100, "built for TensorRT 10.3.0.26"),  # builds differ: plans are exact-version
    ({"tensorrt": "11.0.0"}, H100, "built for TensorRT 11.0.0"),
    ({"compute_capability": [8, 6]}, H100, "compute capability 8.6; this machine has TensorRT 10.3.0 on 9.0"),
    ({"compute_capability": [9, 0]}, LocalGpu("10.3.0", "Orin", (8, 7), "12.6"), "on 8.7: rebuild"),
    ({"format": "ciss.engine/0"}, H100, "format 'ciss.engine/0', not 'ciss.engine/1'"),
    ({"format": None}, H100, "format None"),
    ({"compute_capability": "9.0"}, H100, "compute_capability '9.0'; it is corrupt"),
])
def test_preflight_refuses(changes, local, match):
    with pytest.raises(CissError, match="rebuild it with `ciss export --trt` or use the ONNX model$") as e:
        engines.check_engine_manifest(parsed(sidecar(**changes)), local)
    assert match in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field", ["format", "tensorrt", "compute_capability", "precision", "onnx",
                                   "classmap_version"])
def test_preflight_calls_a_sidecar_with_a_missing_field_corrupt(field):
    broken = sidecar()
    del broken[field]
    with pytest.raises(CissError, match=f"engine manifest has no {field}.*; it is corrupt"):
        engines.check_engine_manifest(parsed(broken), H100)


def test_preflight_checks_the_onnx_and_class_map_when_asked():
    with pytest.raises(CissError, match=f"sm90-trt10.3.0-fp16 was built from another ONNX \\(sha256 {SHA[:12]}, "
                                        f"the model's is {'cd' * 6}\\)"):
        engines.check_engine_manifest(parsed(sidecar()), H100, onnx_sha256="cd" * 32)
    with pytest.raises(CissError, match="has class map version 4 but the model has 5: rebuild"):
        engines.check_engine_manifest(parsed(sidecar()), H100, onnx_sha256=SHA, classmap_version=5)


def test_load_engine_runs_the_preflight_before_touching_the_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "probe", lambda: (H100, None))
    with pytest.raises(CissError, match="built for TensorRT 9.9.9"):
        engines.load_engine(tmp_path / "missing.engine", parsed(sidecar(tensorrt="9.9.9")))

"""ciss.runtime.backends on real exported versions: ONNX Runtime on the CPU, backends given as factories
(the torch reference of ciss.apps.reference, one of the user's own), and GPU backends asked for on
this GPU-less machine (they must refuse at once, in one line)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tiny_models import NAME, SIZE, exported, loaded, publish

from ciss.apps.reference import TorchBackend
from ciss.errors import CissError
from ciss.manifest import ModelManifest
from ciss.runtime.backends import Backend, gpu_problem, load_backend
from ciss.runtime.segmenter import Segmenter
from ciss.runtime.settings import KINDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Path:
    return exported(tmp_path_factory).v1


@pytest.fixture(scope="module")
def v2(tmp_path_factory) -> Path:
    return exported(tmp_path_factory).v2


def example_input(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 3, *SIZE)).astype(np.float32)


def test_cpu_backend_runs_the_exported_graph(v2: Path):
    logged: list[str] = []
    backend = load_backend(v2, loaded(v2), "ort-cpu", threads=1, log=logged.append)
    assert (backend.name, backend.precision) == ("onnxruntime:CPUExecutionProvider", "fp32")
    assert backend.input_name == "images" and backend.output_names == ["mask"]
    assert backend.session.get_session_options().intra_op_num_threads == 1
    out = backend.infer(example_input())
    assert out["mask"].shape == (1, *SIZE) and out["mask"].dtype == np.uint8 and out["mask"].max() < 7
    assert logged == ["backend ort-cpu: onnxruntime:CPUExecutionProvider (fp32)"]


@pytest.mark.skipif(gpu_problem() is None, reason="this machine has a GPU")
def test_auto_steps_down_to_the_cpu_and_says_why(v2: Path):
    logged: list[str] = []
    backend = load_backend(v2, loaded(v2), "auto", log=logged.append)
    assert backend.name == "onnxruntime:CPUExecutionProvider"
    assert len(logged) == 1 and "onnxruntime:CPUExecutionProvider" in logged[0] and gpu_problem() in logged[0]


@pytest.mark.skipif(gpu_problem() is None, reason="this machine has a GPU")
@pytest.mark.parametrize("kind", ["ort-cuda", "ort-trt", "tensorrt"])
def test_a_gpu_backend_asked_for_by_name_fails_fast_in_one_line(v2: Path, kind: str):
    start = time.monotonic()
    with pytest.raises(CissError) as info:
        load_backend(v2, loaded(v2), kind, log=lambda s: None)
    message = str(info.value)
    assert time.monotonic() - start < 5
    assert message.startswith(f"cannot use backend {kind}: ") and "\n" not in message and len(message) < 300


def test_unknown_backend_lists_the_choices(v2: Path):
    with pytest.raises(CissError, match="unknown backend 'cuda'; choose one of " + ", ".join(KINDS)):
        load_backend(v2, loaded(v2), "cuda")


def test_int8_backend_loads_the_variant_file_and_refuses_without_one(v2: Path, tmp_path: Path):
    with pytest.raises(CissError, match="has no int8 variant"):
        load_backend(v2, loaded(v2), "ort-int8")
    # The variant here is the fp32 graph under the int8 name: this checks which file is loaded.
    repo = tmp_path / "models"
    version = publish(repo, v2, files={"model.int8.onnx": v2 / "model.onnx"},
                      variants={"int8": {"file": "model.int8.onnx"}})
    folder = repo / "robot" / str(version)
    backend = load_backend(folder, loaded(folder), "ort-int8", log=lambda s: None)
    assert backend.precision == "int8" and backend.name == "onnxruntime:CPUExecutionProvider"
    (folder / "model.int8.onnx").write_bytes(b"not onnx")
    with pytest.raises(CissError, match="ONNX Runtime cannot load .*model.int8.onnx"):
        load_backend(folder, loaded(folder), "ort-int8")


def test_torch_backend_rebuilds_the_step_and_agrees_with_onnx(v2: Path):
    manifest = loaded(v2)
    reference = load_backend(v2, manifest, TorchBackend, log=lambda s: None)
    assert reference.name == "torch" and reference.output_names == ["mask"]
    x = example_input(1)
    expected = load_backend(v2, manifest, "ort-cpu", log=lambda s: None).infer(x)["mask"]
    got = reference.infer(x)["mask"]
    assert got.dtype == np.uint8 and (got == expected).mean() >= 0.999

    changed = replace(manifest, source={**manifest.source, "weights_sha256": "0" * 64})
    with pytest.raises(CissError, match="has changed since this version was exported"):
        load_backend(v2, changed, TorchBackend)


def test_the_runtime_refuses_to_build_the_torch_reference_itself(v2: Path, tmp_path: Path):
    for load in (lambda: load_backend(v2, loaded(v2), "torch"),
                 lambda: Segmenter.from_repository(tmp_path / "nowhere", NAME, backend="torch")):
        with pytest.raises(CissError) as info:
            load()
        assert "pass ciss.apps.reference.TorchBackend as the backend" in str(info.value)
        assert "\n" not in str(info.value)


def test_a_backend_factory_loads_every_version_served(v1: Path, v2: Path, tmp_path: Path):
    repo = tmp_path / "models"
    publish(repo, v1)
    built: list[tuple[int, int]] = []

    def on_the_cpu(version_dir: Path, manifest: ModelManifest, threads: int) -> Backend:
        built.append((manifest.version, threads))
        return load_backend(version_dir, manifest, "ort-cpu", threads, log=lambda s: None)

    with Segmenter.from_repository(repo, NAME, backend=on_the_cpu, watch=False, threads=1, log=lambda s: None) as seg:
        publish(repo, v2)
        assert seg.check_updates() == 2
        assert seg(np.zeros((*SIZE, 3), np.uint8)).version == 2
    assert built == [(1, 1), (2, 1)]


def test_the_runtime_imports_without_torch():
    code = ("import ciss.runtime.segmenter, ciss.runtime.backends, ciss.runtime.hotswap, ciss.runtime.pipeline, sys; "
            "extras = [m for m in ('torch', 'matplotlib', 'tqdm') if m in sys.modules]; "
            "assert not extras, f'{extras} imported: the training extra, not installed on a robot'")
    subprocess.run([sys.executable, "-c", code], check=True)


# Where a 1 MiB block lands after an 8 MiB one was freed: in the heap once glibc has raised its mmap
# threshold, in a mapping of its own when the threshold is fixed.
_BLOCK_PLACEMENT = """
import sys
import numpy as np
{setup}
big = np.ones(1 << 20)  # 8 MiB: mapped on its own, and freeing it raises glibc's threshold unless fixed
del big
block = np.ones(1 << 17)  # 1 MiB
address = block.ctypes.data
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        low, high = (int(a, 16) for a in line.split()[0].split("-"))
        sys.exit(3 if low <= address < high else 0)
sys.exit(0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc/self/maps: Linux only")
def test_a_watching_segmenter_keeps_large_blocks_out_of_the_heap(v2: Path, tmp_path: Path):
    """Hot-swapping retires models; their buffers must be mappings that go back to the system when freed,
    not heap that a frame's allocations pin (benchmarks/soak.py: 188 -> 222 MiB over 10 swaps before)."""
    repo = tmp_path / "models"
    publish(repo, v2)
    plain = subprocess.run([sys.executable, "-c", _BLOCK_PLACEMENT.format(setup="")])
    if plain.returncode != 3:
        pytest.skip("this libc does not move large blocks into the heap after a free (not glibc)")
    watching = ("from ciss.runtime.segmenter import Segmenter\n"
                f"Segmenter.from_repository({str(repo)!r}, {NAME!r}, backend='ort-cpu', watch=False)")
    assert subprocess.run([sys.executable, "-c", _BLOCK_PLACEMENT.format(setup=watching)]).returncode == 0
    pinned = watching.replace("watch=False", "version=1")  # a pinned model is never retired: malloc untouched
    assert subprocess.run([sys.executable, "-c", _BLOCK_PLACEMENT.format(setup=pinned)]).returncode == 3

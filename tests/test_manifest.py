"""ciss.manifest's typed manifests: stored JSON read once into attributes, old files still read, and a
damaged file refused in one line that names the file, the key and what to do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.manifest import (IMAGENET, InputSpec, ModelManifest, Normalisation, StepManifest, finished_steps, read_step,
                           run_steps)
from ciss.repository import ModelRepository


def step_json(step: int = 0, **changes) -> dict:
    """A step manifest as ciss wrote them before steps recorded their input normalisation."""
    names = ["sky", "grass"] + (["box"] if step else [])
    classes = ClassMap.initial(names[:2]) if step == 0 else ClassMap.initial(names[:2]).extend(names[2:])
    manifest = {
        "run": "r", "classes": classes.to_json(),
        "model": {"preset": "tiny", "output_stride": 16, "step_sizes": classes.step_sizes()},
        "parent": None if step == 0 else {"step": step - 1, "sha256": "ab" * 32}, "pretrained": None,
        "method": "ft", "data": {"dataset": "synthetic", "kind": None, "root": None, "added": names[-1:] if step
                                 else names, "old_names": None, "train_images": 8, "eval_images": 4},
        "config": {"seed": 0}, "seed": 0, "versions": {"ciss": "0"},
        "train": {"iterations": 2, "epochs": 1, "wall_s": 1.5, "processes": 1, "device": "cpu"},
        "metrics": {"miou_all": 0.5, "per_class": {"sky": 0.5}}, "method_report": {},
        "format": "ciss.step/1", "step": step, "created": "2026-01-01T00:00:00+00:00",
        "weights": {"file": "model.pt", "sha256": "cd" * 32, "size": 10}}
    manifest.update(changes)
    return manifest


def write_step(run: Path, step: int, data: dict) -> Path:
    folder = run / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_a_step_written_before_normalisation_was_recorded_reads_as_imagenet(tmp_path: Path):
    m = read_step(write_step(tmp_path, 1, step_json(1)))
    assert m.normalisation == IMAGENET
    assert (m.step, m.preset, m.added, m.old_names, m.wall_s, m.method) == (1, "tiny", ["box"], None, 1.5, "ft")
    assert m.classes.names == ["background", "sky", "grass", "box"] and m.weights.sha256 == "cd" * 32
    own = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert StepManifest.from_json(step_json(normalisation=own)).normalisation.to_json() == own


@pytest.mark.parametrize("change, says", [
    (lambda m: m.pop("weights"), "weights is missing"),
    (lambda m: m["data"].pop("added"), "data.added is missing"),
    (lambda m: m["model"].update(preset=3), "model.preset is 3, not a string"),
    (lambda m: m["train"].update(wall_s="long"), "train.wall_s is 'long', not a number"),
    (lambda m: m.update(step=True), "step is True, not an integer"),
    (lambda m: m.update(classes=[{"id": 0}]), "classes is not a class map"),
    (lambda m: m.update(format="ciss.step/0"), "format is 'ciss.step/0', not 'ciss.step/1'"),
    (lambda m: m.update(normalisation={"mean": [0.5, 0.5], "std": [1, 1, 1]}), "three numbers each"),
    (lambda m: m.update(normalisation={"mean": [0.5] * 3, "std": [1, 0, 1]}), "std above 0"),
])
def test_a_damaged_step_manifest_is_one_line_naming_the_file_and_the_key(tmp_path: Path, change, says):
    data = step_json()
    change(data)
    folder = write_step(tmp_path, 0, data)
    with pytest.raises(CissError) as e:
        read_step(folder)
    message = str(e.value)
    assert message.startswith(str(folder / "manifest.json")) and says in message and "\n" not in message
    assert message.endswith("restore it from a copy or train the step again in a new run")


def test_a_step_folder_must_hold_its_own_step(tmp_path: Path):
    folder = write_step(tmp_path, 2, step_json(1))
    with pytest.raises(CissError, match="step is 1 but the folder is step-2"):
        read_step(folder)


def test_run_steps_reads_the_finished_steps_in_order(tmp_path: Path):
    for k in (1, 0, 10):
        write_step(tmp_path, k, step_json(k))
    (tmp_path / ".partial-step-11").mkdir()
    (tmp_path / "step-12").mkdir()  # no manifest: not finished
    write_step(tmp_path / ".staging-step-3-1-1", 3, step_json(3))
    assert finished_steps(tmp_path) == [0, 1, 10]
    assert [m.step for m in run_steps(tmp_path)] == [0, 1, 10]
    assert run_steps(tmp_path / "missing") == []


def published(tmp_path: Path, **manifest) -> ModelManifest:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    repo = ModelRepository(tmp_path / "models")
    version = repo.publish("m", {"model.onnx": tmp_path / "model.onnx"},
                           {"classes": ClassMap.initial(["a"]).to_json(), **manifest})
    return repo.manifest("m", version)


def test_a_model_manifest_reads_into_attributes_and_back(tmp_path: Path):
    spec = InputSpec(size=(48, 64), example_size=(48, 64), stride=16, normalisation=IMAGENET)
    m = published(tmp_path, input=spec.to_json(), outputs=[{"name": "mask", "dtype": "uint8", "shape": [1, 48, 64]}],
                  precision="fp32", source={"step": 0}, metrics={"miou_all": 0.5}, parity={"mask_agreement": 1.0},
                  exporter={"opset": 20}, variants={"int8": {"file": "model.int8.onnx"}}, engines=[], note="kept")
    assert (m.name, m.version, m.parent, m.precision, m.input) == ("m", 1, None, "fp32", spec)
    assert m.classes.names == ["background", "a"] and m.metrics == {"miou_all": 0.5} and m.extra == {"note": "kept"}
    stored = json.loads((tmp_path / "models" / "m" / "1" / "manifest.json").read_text())
    assert m.to_json() == stored
    assert ModelManifest.from_json(m.to_json()) == m


def test_fixtures_with_a_partial_input_spec_still_read():
    """Keys an input spec leaves out take the defaults the runtime always read them with."""
    spec = InputSpec.from_json({"size": None, "dynamic": True})
    assert (spec.name, spec.size, spec.dynamic, spec.stride, spec.color, spec.scale) == ("images", None, True, None,
                                                                                         "RGB", 1 / 255)
    assert spec.normalisation is None


def test_a_damaged_model_manifest_names_the_file_and_the_key(tmp_path: Path):
    path = tmp_path / "models" / "m" / "1" / "manifest.json"
    with pytest.raises(CissError) as e:
        published(tmp_path, input={"size": [48], "dynamic": False})
    assert str(e.value) == (f"{path}: input.size is [48], not [height, width] in pixels; the version is damaged: "
                            "publish it again with `ciss export`")


def test_normalisation_is_three_positive_numbers_a_channel():
    assert Normalisation.from_json([0, 0.5, 1], [1, 2, 3], "x", "fix") == Normalisation((0.0, 0.5, 1.0),
                                                                                        (1.0, 2.0, 3.0))
    with pytest.raises(CissError, match="^x: mean and std must be three numbers each.*; fix$"):
        Normalisation.from_json(["a", 0, 0], [1, 1, 1], "x", "fix")


def test_the_module_stays_free_of_torch_and_numpy():
    code = "import sys, ciss.manifest; print(sorted(m for m in ('torch', 'numpy', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

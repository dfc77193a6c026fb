"""docs/architecture.md stays true: every file it names exists, and its worked examples of a new method,
a new backbone and a new dataset reader, copied from the page into a copy of the package, train a step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import torch
from conftest import CISS, REPO, write_config

DOC = REPO / "docs" / "architecture.md"


def test_every_file_it_names_exists():
    named = set(re.findall(r"`((?:ciss|tests|configs|docs)/[\w./<>-]+)`", DOC.read_text()))
    assert len(named) > 20
    example = {"ciss/trainer/methods/lwf.py"}  # the worked example, which the next test creates
    missing = [p for p in named - example if "<" not in p and not (REPO / p).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def package_from_page(copy: Path, module_path: str, registry_path: str, kind: str, registry: str) -> None:
    """A copy of the package and its configs at `copy`, with the page's code for `module_path` added and
    the page's entry for `registry` first in the registry of `kind` in `registry_path`: exactly the two
    files the page says."""
    text = DOC.read_text()
    folder, name = module_path.rsplit("/", 1)
    module = re.search(rf"1\. `{re.escape(folder)}/(?:<name>\.py`, here `)?{re.escape(name)}`:.*?```python\n(.*?)```",
                       text, re.S).group(1)
    entry = re.search(rf"One entry in `{registry}`.*?```python\n(.*?)\n```", text, re.S).group(1)
    shutil.copytree(REPO / "ciss", copy / "ciss", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", copy / "configs")
    (copy / module_path).write_text(module)
    source = (copy / registry_path).read_text()
    assert f'Registry("{kind}", {{' in source
    (copy / registry_path).write_text(source.replace(f'Registry("{kind}", {{', f'Registry("{kind}", {{' + entry + " ", 1))


def test_the_worked_example_of_a_new_method_trains_a_step(tmp_path: Path):
    copy = tmp_path / "copy"
    package_from_page(copy, "ciss/trainer/methods/lwf.py", "ciss/trainer/methods/__init__.py", "method", "METHODS")

    run, config = tmp_path / "run", write_config(tmp_path / "fast.toml")
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1")
    for args in (["--classes", "sky,grass,disk", "--method", "ft"], ["--new-classes", "box", "--method", "lwf",
                                                              "--opt", "lwf.kd_weight=5"]):
        r = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(config), *args], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    manifest = json.loads((run / "step-1" / "manifest.json").read_text())
    assert manifest["method"] == "lwf" and manifest["config"]["method"]["options"]["kd_weight"] == 5.0
    record = json.loads((run / "step-1" / "train_log.jsonl").read_text().splitlines()[-1])
    assert record["kd"] > 0 and record["ce"] > 0


def test_the_worked_example_of_a_new_backbone_trains_a_step_by_its_name(tmp_path: Path):
    """Two files and no preset: the registered backbone is a model under its own name, DeepLabV3's defaults."""
    copy = tmp_path / "copy"
    package_from_page(copy, "ciss/trainer/models/plain.py", "ciss/trainer/presets.py", "backbone", "BACKBONES")
    assert "[plain]" not in (copy / "configs/models.toml").read_text()

    run, config = tmp_path / "run", write_config(tmp_path / "fast.toml")
    r = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(config), "--classes", "sky,grass,disk",
                        "--method", "ft", "--model", "plain", "--iterations", "1"], cwd=copy,
                       env=dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((run / "step-0" / "manifest.json").read_text())
    assert manifest["model"] == {"preset": "plain", "output_stride": 16, "step_sizes": [4]}
    assert manifest["train"]["iterations"] == 1
    state = torch.load(run / "step-0" / "model.pt", weights_only=True)
    assert state["backbone.stages.3.0.weight"].shape == (48, 32, 3, 3)  # PlainNet's last stage
    assert state["aspp.project.0.weight"].shape[:2] == (256, 256 * 5)  # default width; 1x1, 3 rates, pooling


def write_street(root: Path, split: str, n: int) -> None:
    """Masks in the worked reader's layout: road below, a car box, a person stripe, sky as background."""
    folder = root / split
    folder.mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((40, 48), np.uint8)
        mask[24:] = 1
        mask[16:30, 8 + i:24 + i] = 2
        mask[10:34, 36:40] = 3
        image = np.array([(200, 200, 255), (90, 90, 90), (0, 0, 220), (0, 200, 0)], np.uint8)[mask]
        cv2.imwrite(str(folder / f"s{i}.jpg"), image)
        cv2.imwrite(str(folder / f"s{i}_mask.png"), mask)


def test_the_worked_example_of_a_new_dataset_reader_trains_a_step(tmp_path: Path):
    """Two files: the reader module and its READERS entry; `--dataset street --root DIR` learns from it."""
    copy = tmp_path / "copy"
    package_from_page(copy, "ciss/trainer/data/street.py", "ciss/trainer/data/__init__.py", "dataset kind", "READERS")
    data = tmp_path / "street"
    write_street(data, "train", 6)
    write_street(data, "test", 2)

    run, config = tmp_path / "run", write_config(tmp_path / "fast.toml", synthetic=False)
    r = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(config), "--dataset", "street",
                        "--root", str(data), "--classes", "road,car", "--method", "ft", "--iterations", "1"],
                       cwd=copy, env=dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((run / "step-0" / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["background", "road", "car"]
    assert manifest["data"]["kind"] == "street" and manifest["train"]["iterations"] == 1

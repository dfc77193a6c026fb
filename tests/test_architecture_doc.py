"""docs/architecture.md stays true: every file it names exists, and its worked example of a new method,
copied from the page into a copy of the package, trains a step."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from conftest import CISS, REPO, write_config

DOC = REPO / "docs" / "architecture.md"


def test_every_file_it_names_exists():
    named = set(re.findall(r"`((?:ciss|tests|configs|docs)/[\w./<>-]+)`", DOC.read_text()))
    assert len(named) > 20
    example = {"ciss/trainer/methods/lwf.py"}  # the worked example, which the next test creates
    missing = [p for p in named - example if "<" not in p and not (REPO / p).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_worked_example_of_a_new_method_trains_a_step(tmp_path: Path):
    text = DOC.read_text()
    module = re.search(r"1\. `ciss/trainer/methods/lwf\.py`:\n\n```python\n(.*?)```", text, re.S).group(1)
    entry = re.search(r"One entry in `METHODS`.*?```python\n(.*?)\n```", text, re.S).group(1)
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "ciss", copy / "ciss", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", copy / "configs")
    (copy / "ciss/trainer/methods/lwf.py").write_text(module)
    registry = copy / "ciss/trainer/methods/__init__.py"
    source = registry.read_text()
    assert 'Registry("method", {' in source
    registry.write_text(source.replace('Registry("method", {', 'Registry("method", {' + entry + " ", 1))

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

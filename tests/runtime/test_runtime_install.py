"""`pip install ciss` alone, from the package registry into a fresh venv, serves a published model.

This is what proves the runtime's dependency set in pyproject.toml: no torch and no onnx, yet
`ciss live` and `ciss models` run, and the commands that train or export say which extra they need.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from tiny_models import NAME, exported, publish


def run(args: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow
def test_runtime_only_install_serves_a_model_without_torch(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    # The project as pip sees it (pyproject, README, the package), copied so the build leaves no
    # build/ or egg-info in the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO / "ciss", src / "ciss", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", venv], tmp_path)
    assert made.returncode == 0, made.stderr
    installed = run([venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", src], tmp_path,
                    timeout=240)
    assert installed.returncode == 0, installed.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    publish(work / "models", exported(tmp_path_factory).v1)  # exported with the training install
    ciss = venv / "bin" / "ciss"
    live = run([ciss, "live", "--source", "synthetic", "--headless", "--max-frames", "5"], work)
    assert live.returncode == 0, live.stderr
    assert f"model: {NAME} in models/" in live.stderr and "5 frames" in live.stdout, live.stdout
    listed = run([ciss, "models"], work)
    assert listed.returncode == 0 and NAME in listed.stdout, listed.stderr

    for module in ("torch", "rosbags", "foxglove", "matplotlib"):  # training and ROS extras stay out
        missing = run([venv / "bin" / "python", "-c", f"import {module}"], work)
        assert missing.returncode != 0 and f"No module named '{module}'" in missing.stderr, module
    for command in (["learn", "--classes", "sky"], ["export"]):
        refused = run([ciss, *command], work)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert re.fullmatch(rf'error: ciss {command[0]} needs the training extra \((torch|onnx) is not installed\): '
                            r'pip install "ciss\[train\]"', refused.stderr.strip().splitlines()[-1]), refused.stderr

"""benchmarks/cil_probe.py's teacher view and old-class recall on a real two-step run of the tiny model
(`ciss learn`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from conftest import CISS, REPO, make_folder_dataset, write_config

sys.path.insert(0, str(REPO / "benchmarks"))
from cil_probe import old_class_recall, teacher_view  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> tuple[Path, Path]:
    """Step 0 learns a, b; step 1 learns c. Returns (dataset, run)."""
    tmp = tmp_path_factory.mktemp("probe")
    data = make_folder_dataset(tmp / "abc")
    config = write_config(tmp / "fast.toml", synthetic=False)
    run = tmp / "run"
    for args in (["--data", str(data), "--classes", "a,b", "--method", "ft"], ["--new-classes", "c"]):
        done = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(config), *args],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 0, done.stderr
    return data, run


def _probe(run: Path, *flags: str) -> list[str]:
    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cil_probe.py"), str(run), *flags],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert printed.returncode == 0, printed.stderr
    return printed.stdout.splitlines()


def test_teacher_view_reports_each_steps_new_pixels_as_the_old_model_calls_them(two_step_run):
    _, run = two_step_run
    (row,) = teacher_view(run)
    assert row["step"] == 1 and row["classes"] == ["c"] and row["pixels"] > 0
    assert 0.0 <= row["p_background"] <= 1.0
    assert set(row["argmax"]) <= {"background", "a", "b"}
    assert abs(sum(row["argmax"].values()) - 1.0) < 1e-6
    assert list(row["argmax"].values()) == sorted(row["argmax"].values(), reverse=True)
    assert _probe(run)[2].startswith(f"| 1 | c | {row['pixels']} | {row['p_background']:.2f} | ")


def test_old_class_recall_counts_the_old_classes_true_pixels_in_the_steps_images(two_step_run):
    data, run = two_step_run
    labels = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in sorted((data / "labels" / "train").glob("*.png"))]
    assert all((label == 2).any() for label in labels)  # every image shows c, so step 1 trains on all of them

    (row,) = old_class_recall(run)
    assert row["step"] == 1 and row["classes"] == ["c"]
    assert set(row["old"]) == {"a", "b"}
    for native, name in enumerate(("a", "b")):
        share = row["old"][name]
        assert share["pixels"] == sum(int((label == native).sum()) for label in labels)
        assert 0.0 <= share["confident"] <= share["argmax"] <= 1.0
        assert share["precision"] is None or 0.0 <= share["precision"] <= 1.0

    (sure,) = old_class_recall(run, floor=0.0)
    (never,) = old_class_recall(run, floor=1.01)
    for name in ("a", "b"):
        assert sure["old"][name]["confident"] == row["old"][name]["argmax"]
        assert never["old"][name]["confident"] == 0.0

    table = _probe(run, "--old-classes")
    a = row["old"]["a"]
    assert table[1] == "| class | step 1 (c) |"
    assert table[3] == f"| a | {100 * a['argmax']:.0f} / {100 * a['confident']:.0f} |"

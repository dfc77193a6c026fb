"""benchmarks/cil_probe.py's teacher view on a real two-step run of the tiny model (`ciss learn`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import CISS, REPO, make_folder_dataset, write_config

sys.path.insert(0, str(REPO / "benchmarks"))
from cil_probe import teacher_view  # noqa: E402


def test_teacher_view_reports_each_steps_new_pixels_as_the_old_model_calls_them(tmp_path: Path):
    data = make_folder_dataset(tmp_path / "abc")
    config = write_config(tmp_path / "fast.toml", synthetic=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    for args in (["--data", str(data), "--classes", "a,b", "--method", "ft"], ["--new-classes", "c"]):
        done = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(config), *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr

    (row,) = teacher_view(run)
    assert row["step"] == 1 and row["classes"] == ["c"] and row["pixels"] > 0
    assert 0.0 <= row["p_background"] <= 1.0
    assert set(row["argmax"]) <= {"background", "a", "b"}
    assert abs(sum(row["argmax"].values()) - 1.0) < 1e-6
    assert list(row["argmax"].values()) == sorted(row["argmax"].values(), reverse=True)

    printed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cil_probe.py"), str(run)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines()[2].startswith(f"| 1 | c | {row['pixels']} | {row['p_background']:.2f} | ")

"""benchmarks/gpu_check.py on a machine without a CUDA GPU: one line, exit 0, nothing attempted."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_skips_cleanly_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # hides any GPU this machine has
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no CUDA GPU: skipped") and len(out.stdout.splitlines()) == 1, out.stdout

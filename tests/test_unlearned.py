"""A step whose new classes end near IoU 0 says so in its summary, `ciss runs`, the export and live (issue 14.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_config

from ciss.classmap import UNLEARNED_IOU, ClassMap, unlearned, unlearned_warning
from ciss.export.pipeline import ExportOptions, export_step
from ciss.runtime.segmenter import Segmenter
from ciss.trainer.learn import learn
from ciss.trainer.report import describe_run

CMAP = ClassMap.initial(["sky", "grass"]).extend(["disk", "ring"])


def test_only_the_last_steps_classes_below_the_threshold_with_ground_truth_are_flagged():
    metrics = {"per_class": {"background": 0.9, "sky": 0.0, "grass": 0.8, "disk": UNLEARNED_IOU / 2}}
    assert unlearned(CMAP, metrics) == [3]  # sky is old; ring has no ground truth: nothing says it failed
    assert "disk (IoU 2.5%)" in unlearned_warning(CMAP, metrics)
    assert unlearned_warning(CMAP, {"per_class": {"disk": 0.3, "ring": 0.2}}) is None
    assert unlearned(CMAP, None) == []


@pytest.mark.slow
def test_an_unlearned_step_warns_in_summary_runs_export_and_live(tmp_path: Path):
    config = write_config(tmp_path / "fast.toml", size=8)
    run = tmp_path / "run"
    learn(run, classes=["sky", "grass", "disk", "box"], config_file=config, method="mib", log=lambda s: None)
    said: list[str] = []
    # MiB starts the new head as a copy of background's, scaled down, so with no learning it never wins
    learn(run, new_classes=["triangle", "ring"], method="mib", overrides={"train": {"lr_next": 1e-12}}, log=said.append)
    assert any(s.startswith("WARNING: step 1 did not learn") for s in said), said
    runs = describe_run(run)
    assert "WARNING: step 1 did not learn" in runs
    assert "[ce, tiny]" in runs.split("step 1:")[0] and "[mib, tiny]" in runs.split("step 1:")[1]  # step 0 is plain CE

    exported: list[str] = []
    version = export_step(run, tmp_path / "repo", "m", ExportOptions(size=(48, 64)), log=exported.append)
    assert any("WARNING: step 1 did not learn" in s for s in exported)
    live: list[str] = []
    with Segmenter.from_repository(tmp_path / "repo", "m", watch=False, log=live.append) as segmenter:
        result = segmenter(np.zeros((48, 64, 3), np.uint8))
    assert any(s.startswith(f"version {version.version}: WARNING") for s in live), live
    assert set(result.unlearned) <= {5, 6} and result.unlearned

"""`ciss demo` end to end on a drastically shortened schedule, and its one-line input errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from click.testing import CliRunner

from ciss.apps.cli import main
from ciss.apps.demo import SYNTHETIC, _prepare_out, describe_demo, run_demo

# Seconds instead of minutes: one epoch of 24 tiny scenes per step.
SHORT = {"train": {"epochs": 1, "epochs_next": 1, "batch_size": 4, "crop": 48, "workers": 0},
         "data": {"options": {"size": 24, "height": 48, "width": 64}}}


@pytest.mark.slow
def test_demo_learns_serves_swaps_without_a_lost_frame_and_reports(tmp_path: Path):
    out = tmp_path / "demo"
    lines: list[str] = []
    metrics = run_demo(out, overrides=SHORT, fps=20, after_swap_s=0.5, log=lines.append)

    assert {"live.mp4", "after-swap.png", "forgetting.png", "metrics.json", "live.jsonl", "run", "models"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    live = metrics["live"]
    assert live["versions"] == [1, 2] and len(live["swaps"]) == 1 and live["dropped"] == 0 and live["seq_continuous"]
    records = [json.loads(line) for line in (out / "live.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in records] == [r["frame"] for r in records] == list(range(live["frames"]))
    first = live["swaps"][0]["first_frame"]
    assert [r["version"] for r in records] == [1] * first + [2] * (len(records) - first)
    # after_swap_s x fps frames of version 2, then the loop stopped; the frames already in flight then
    # (at most two for a live source, Segmenter.stream) still come out.
    assert 10 <= len(records) - first <= 12
    video = cv2.VideoCapture(str(out / "live.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == len(records)
    assert cv2.imread(str(out / "after-swap.png")).shape == (240, 320, 3)

    assert [s["added"] for s in metrics["steps"]] == [list(SYNTHETIC.classes), list(SYNTHETIC.new_classes)]
    assert set(metrics["forgetting"]["per_class"]) <= {"background", *SYNTHETIC.classes}
    for k in range(1, 6):
        assert any(line.startswith(f"[{k}/5]") for line in lines), k
    assert any(line.startswith("[learn] step 1: done") for line in lines)
    report = describe_demo(metrics)
    assert "triangle" in report and "dropped 0" in report and "swap v1 -> v2" in report
    for mean, words in ((0.05, "(forgetting 5.0 points per class)"),
                        (-0.028, "(forgetting none: 2.8 points per class gained)")):
        assert words in describe_demo({**metrics, "forgetting": {**metrics["forgetting"], "mean": mean}})


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


@pytest.mark.parametrize("args, fragment", [
    (["--data", "{tmp}/nowhere"], "no dataset folder"),
    (["--video", "{tmp}/missing.mp4"], "no such file"),
    (["--video", "{tmp}/notes.mp4"], "cannot read"),
    (["--new-classes", "triangle,unicorn"], "unknown class 'unicorn'"),
    (["--classes", "sky,ring", "--new-classes", "ring"], "both a base class and a new class"),
    (["--method", "magic"], "magic"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path: Path, args: list[str], fragment: str):
    (tmp_path / "notes.mp4").write_text("not a video")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), *[a.format(tmp=tmp_path) for a in args]])
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_a_folder_with_other_files_is_kept_unless_forced(tmp_path: Path):
    (tmp_path / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert_one_line_error(result, "--force")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_force_replaces_only_an_earlier_demos_files(tmp_path: Path):
    (tmp_path / "mine.txt").write_text("keep")
    (tmp_path / "run" / "step-0").mkdir(parents=True)
    for name in ("live.mp4", "metrics.json", "after-swap.png"):
        (tmp_path / name).write_text("old")
    _prepare_out(tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]

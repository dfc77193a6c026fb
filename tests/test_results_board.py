"""benchmarks/results_board.py on protocol folders written by hand: grouping by step 0, the verdicts
kept inside a group, the ablation across folders, and the folders it refuses (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO))
SCRIPT = [sys.executable, str(REPO / "benchmarks" / "results_board.py")]
CONFIG = "[train]\nepochs_next = 20\n"


def rows(*alls: float, old: float = 0.6, new: float = 0.3, labels: str | None = "step") -> list[dict]:
    return [{"seed": s, "old": old, "new": new, "all": a, "labels": labels, "wall_s": 100.0 + s}
            for s, a in enumerate(alls)]


def folder(root: Path, name: str, results: dict, task: str = "camvid:6-1", config: str = CONFIG) -> Path:
    out = root / name
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    (out / "config.toml").write_text(config)
    (out / "commands.txt").write_text("\n".join(
        f"ciss learn --run {out}/runs/seed0/{run} --task {task} --method {run.split('-')[0]} --seed 0"
        for run in results if run != "mib-init") + "\n")
    return out


def board(*folders: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *map(str, folders)], capture_output=True, text=True, env=ENV, timeout=60)


def study(tmp_path: Path) -> list[Path]:
    """Two folders on one set of step-0 models (B's MiB-init differs from A's in the last float bits, as
    a repeated evaluation does) and one on another."""
    init = rows(0.36, 0.35, 0.37, old=0.65, new=0.01, labels=None)
    shifted = [dict(r, all=r["all"] + 1e-9) for r in init]
    return [
        folder(tmp_path, "a", {"mib-init": init, "mib": rows(0.460, 0.470, 0.480), "idec": rows(0.470, 0.475, 0.480),
                               "idec-agreed": rows(0.50, 0.50, 0.50, labels="agreed")}),
        folder(tmp_path, "b", {"mib-init": shifted, "idec-no-feature_kd": rows(0.495, 0.500, 0.505)}),
        folder(tmp_path, "c", {"mib-init": rows(0.30, 0.30, 0.30, labels=None), "mib": rows(0.40, 0.41, 0.42),
                               "gsc": rows(0.472, 0.472, 0.472)}),
    ]


def test_board_groups_by_step_zero_and_compares_only_inside_a_group(tmp_path):
    done = board(*study(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index("| run | step 0 | folder | seeds | old | new | all | all per seed |") + 2
    table = lines[start:lines.index("", start)]
    # class-incremental rows by all-mIoU, then the references (the gated run and both MiB-init rows)
    assert [line.split(" | ")[0][2:] for line in table] == [
        "idec-no-feature_kd", "idec", "gsc", "mib", "mib", "idec-agreed", "mib-init", "mib-init"]
    assert table[0] == "| idec-no-feature_kd | A | b | 3 | 60.0 ± 0.0 | 30.0 ± 0.0 | 50.0 ± 0.5 | 49.5, 50.0, 50.5 |"
    assert "| mib | B | c | 3 | 60.0 ± 0.0 | 30.0 ± 0.0 | 41.0 ± 1.0 | 40.0, 41.0, 42.0 |" in table
    verdicts = [line for line in lines if line.startswith("- ")]
    # A: IDEC +0.5 over MiB under 2σ = 2.0 (MiB's std 1.0); IDEC without feature KD +3.0, beyond it.
    # B: GSC +6.2 over its own MiB. No verdict pairs runs of A with runs of B; the gated run is no candidate.
    assert verdicts == ["- idec vs mib: +0.5, tie (2σ = 2.0)",
                        "- idec-no-feature_kd vs mib: +3.0, ahead (2σ = 2.0)",
                        "- gsc vs mib: +6.2, ahead (2σ = 2.0)"]
    # the ablation pairs IDEC in folder a with its variant in folder b, seed by seed: +2.5, +2.5, +2.5
    assert "| idec-no-feature_kd | 3 | 60.0 ± 0.0 | 30.0 ± 0.0 | 50.0 ± 0.5 | +2.5 |" in lines


def test_board_writes_its_command_with_out(tmp_path):
    folders = study(tmp_path)
    out = tmp_path / "board.md"
    done = subprocess.run([*SCRIPT, *map(str, folders), "--out", str(out)], capture_output=True, text=True,
                          env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text == done.stdout
    assert f"python benchmarks/results_board.py {' '.join(map(str, folders))} --out {out}" in text


def test_board_refuses_other_tasks_configs_and_disagreeing_copies(tmp_path):
    a, b, _ = study(tmp_path)
    other_task = folder(tmp_path, "d", {"mib": rows(0.4, 0.4)}, task="camvid:6-5")
    other_config = folder(tmp_path, "e", {"mib": rows(0.4, 0.4)}, config=CONFIG + "lr_next = 0.01\n")
    copy = folder(tmp_path, "f", {"mib-init": json.loads((a / "results.json").read_text())["mib-init"],
                                  "mib": rows(0.1, 0.1, 0.1)})
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for folders, message in (
            ([a, other_task], "but"), ([a, other_config], "different config.toml"),
            ([a, copy], "run 'mib' differs between a and f"), ([a, tmp_path / "missing"], "no results.json")):
        done = board(*folders)
        assert done.returncode == 2, done.stdout
        assert done.stderr.startswith("error: ") and message in done.stderr and done.stderr.count("\n") == 1
    assert "camvid:6-1 but" in board(a, other_task).stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

"""benchmarks/camvid_protocol.py on real tiny runs: `--tables-only` reads what has finished, trains nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, make_folder_dataset, write_config


def test_tables_only_reports_finished_runs_and_trains_nothing(tmp_path: Path):
    data = make_folder_dataset(tmp_path / "abc")
    config = write_config(tmp_path / "fast.toml", synthetic=False)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def protocol(*args: str) -> None:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "camvid_protocol.py"), "--data", str(data),
                               "--task", "2-1", "--config", str(config), "--seeds", "0", "--out", str(out), *args],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr

    protocol("--methods", "ft")
    commands = (out / "commands.txt").read_text()
    # the old classes' pixels taken by the new class, read from the last step's confusion.csv
    taken = json.loads((out / "results.json").read_text())["ft"][0]["taken"]
    assert sorted(taken) == ["a", "b"] and all(set(t) == {"c"} and 0 <= t["c"] <= 1 for t in taken.values())
    assert "Old classes lost to new ones" in (out / "results.md").read_text()
    protocol("--methods", "ft,mib", "--joint", "--tables-only")

    assert sorted(p.name for p in (out / "runs" / "seed0").iterdir()) == ["base", "ft"]
    assert (out / "commands.txt").read_text() == commands
    rows = [line.split(" | ")[0] for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert "| ft" in rows and "| mib-init" in rows
    assert "| mib" not in rows and "| joint" not in rows

    # A reference given gated old labels is trained on the same base and named as such in the tables.
    protocol("--methods", "", "--variant", "ft-agreed=ft:--opt ft.old_labels=agreed --set data.labels=seen")
    assert json.loads((out / "results.json").read_text())["ft-agreed"][0]["labels"] == "agreed"
    header = (out / "results.md").read_text()
    assert "`ft-agreed`: trained with each old class's label kept only where" in header
    assert "`ft-agreed`: trained with every class" not in header

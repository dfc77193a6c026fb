"""benchmarks/term_gradnorms.py on a real two-step GSC run of the tiny model (`ciss learn`)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CISS, REPO, make_folder_dataset, write_config

sys.path.insert(0, str(REPO / "benchmarks"))
from term_gradnorms import gradnorm_series, table  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
SCRIPT = [sys.executable, str(REPO / "benchmarks" / "term_gradnorms.py")]


@pytest.fixture(scope="module")
def gsc_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gradnorms")
    data = make_folder_dataset(tmp / "abc")
    config = write_config(tmp / "fast.toml", synthetic=False)
    run = tmp / "seed0" / "gsc"
    for args in (["--data", str(data), "--classes", "a,b", "--method", "ft"],
                 ["--new-classes", "c", "--method", "gsc", "--set", "train.log_every=1",
                  "--set", "train.epochs_next=3"]):
        done = subprocess.run([*CISS, "learn", "--run", str(run), "--config", str(config), *args],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 0, done.stderr
    return run


def test_series_split_loss_terms_from_parameter_groups(gsc_run):
    terms, groups = gradnorm_series(gsc_run / "step-1")
    rows = [json.loads(line) for line in (gsc_run / "step-1" / "train_log.jsonl").read_text().splitlines()]
    assert {"ce", "pod", "relation", "soft", "sharp"} <= set(terms)
    assert {"backbone", "head_new"} <= set(groups) and not set(terms) & set(groups)
    assert len(rows) > 1 and all(len(v) == len(rows) for v in terms.values())
    assert terms["pod"] == [r["gradnorm_pod"] for r in rows]


def test_table_gives_each_terms_median_and_its_ratio_to_the_ce(gsc_run):
    header, _, row = table([gsc_run])
    names = header.strip("| ").split(" | ")[2:]
    assert names[0] == "ce"  # the reference column first, the rest by name
    assert names[1:] == sorted(names[1:])
    terms, _ = gradnorm_series(gsc_run / "step-1")
    cells = dict(zip(names, row.strip("| ").split(" | ")[2:]))
    assert row.startswith("| seed0/gsc | 1 | ")
    ce, pod = statistics.median(terms["ce"]), statistics.median(terms["pod"])
    assert cells["ce"] == f"{ce:.2f}"
    assert cells["pod"] == f"{pod:.2f} ({pod / ce:.2g}×)"


def test_a_run_without_a_later_step_is_refused_with_the_command_that_makes_one(gsc_run, tmp_path):
    done = subprocess.run([*SCRIPT, str(gsc_run), str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: no finished step after step 0 in {tmp_path}; train one with "
        f"`ciss learn --run {tmp_path} --new-classes ...`"]
    printed = subprocess.run([*SCRIPT, str(gsc_run)], capture_output=True, text=True, env=ENV)
    assert printed.returncode == 0 and "| seed0/gsc | 1 |" in printed.stdout

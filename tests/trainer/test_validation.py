"""Every invalid value of `ciss learn`'s flags, `--set` keys, config-file keys and method options: one
`error:` line on stderr, exit code 2, and not one new file (no run folder, no `.partial-step-*`).

Property-style: the invalid values of each config key are derived from its rule in the schema (wrong
types, zero, each side of its range, huge, NaN, infinities), so a key added to the schema is tested
without a new line here. Validation refuses before any dataset is read or model built, so the few
hundred in-process CLI calls take seconds.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from ciss.apps.cli import main
from ciss.config import toml_text
from ciss.config_rules import Flag, Number, Rule, ScaleRange, Table, Text
from ciss.trainer.config import TRAINING
from ciss.trainer.schema import SCHEMA
from conftest import CISS, REPO

NAN, INF = math.nan, math.inf


def invalid_values(rule: Rule) -> list[Any]:
    """Values `rule` must refuse: other TOML types, then NaN, infinities and both sides of its range."""
    if isinstance(rule, Number):
        values: list[Any] = ["ten", True, [1], {"a": 1}, NAN, INF, -INF]
        if rule.integer:
            values.append(1.5)
        if rule.choices:
            values += [0, -max(rule.choices), min(rule.choices) - 1, 2 * max(rule.choices)]
        if rule.low is not None:
            values += [rule.low - 1, -10**12] + ([rule.low] if rule.above else [])
        if rule.high is not None:
            values += [rule.high + 1, 10**30 if rule.integer else 1e300] + ([rule.high] if rule.below else [])
        return values
    if isinstance(rule, Flag):
        return ["yes", "true", 1, 0, 1.0]
    if isinstance(rule, Text):
        return [5, True, 1.5, ["a"]] + (["nosuch"] if rule.choices else [])
    if isinstance(rule, ScaleRange):
        return [1.0, "0.5,2", [1.0], [0.5, 1.0, 2.0], [2.0, 1.0], [0.0, 1.0], [-1.0, 1.0], [NAN, 1.0], [1.0, INF],
                ["a", 1.0], [True, 2.0], [1.0, rule.limit * 2]]
    assert isinstance(rule, Table), rule
    return [3, "size=5", [1]]


CASES = [pytest.param(key, value, id=f"{key}={toml_text(value)}")
         for key, rule in SCHEMA.items() for value in invalid_values(rule)]


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test's folder as the current one, so that a stray `runs/` would be seen."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(folder: Path, *args: str) -> str:
    """Run `ciss learn ARGS` in-process; assert one `error:` line, exit 2 and no new file; return the line."""
    before = files(folder)
    result: Result = CliRunner().invoke(main, ["learn", "--run", str(folder / "run"), "--classes", "sky", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (result.exit_code, result.output, result.exception)
    assert files(folder) == before
    return lines[0]


@pytest.mark.parametrize("key,value", CASES)
def test_set_refuses(workdir: Path, key: str, value: Any):
    line = refused(workdir, "--set", f"{key}={toml_text(value)}")
    assert f"--set {key}=" in line, line


def _toml(key: str, value: Any) -> str:
    *sections, leaf = key.split(".")
    return (f"[{'.'.join(sections)}]\n" if sections else "") + f"{leaf} = {toml_text(value)}\n"


@pytest.mark.parametrize("key,value", CASES)
def test_config_file_refuses(workdir: Path, key: str, value: Any):
    cfg = workdir / "c.toml"
    cfg.write_text(_toml(key, value))
    line = refused(workdir, "--config", str(cfg))
    assert f"{key} = " in line and "c.toml" in line, line


FLAG_VALUES = {
    "--epochs": ["ten", "1.7", "0", "-1", "nan"],
    "--lr": ["ten", "0", "-1", "nan", "inf", "-inf", "1e400"],
    "--batch-size": ["ten", "2.5", "0", "-1"],
    "--crop": ["ten", "0", "-5", "7", "15", str(10**6)],
    "--workers": ["ten", "-1", str(10**6)],
    "--seed": ["ten", "-1", "1.5", str(2**64)],
    "--model": ["nosuch", ""],
    "--setting": ["both"],
}


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in FLAG_VALUES.items() for v in values])
def test_flag_refuses(workdir: Path, flag: str, value: str):
    assert flag in refused(workdir, flag, value)


@pytest.mark.parametrize("method,option,value", [
    ("mib", "kd_weight", "nan"), ("mib", "kd_weight", "inf"), ("mib", "kd_weight", '"ten"'),
    ("mib", "alpha", "true"), ("plop", "threshold_bins", "1.5"), ("plop", "pod_scales", "[0]"),
    ("plop", "pod_schedule", "1"), ("plop", "threshold_mode", "sometimes"),
])
def test_method_option_refuses(workdir: Path, method: str, option: str, value: str):
    line = refused(workdir, "--method", method, "--opt", f"{method}.{option}={value}")
    assert f"--opt {method}.{option}=" in line, line


@pytest.mark.parametrize("method", ["mib", "plop", "gsc", "idec"])
def test_seen_labels_refuse_methods_that_merge_old_labels_into_background(workdir: Path, method: str):
    line = refused(workdir, "--method", method, "--set", "data.labels=\"seen\"")
    assert f"method '{method}'" in line and "--method ft" in line, line
    assert (f"--opt {method}.old_labels=agreed" in line) == (method in ("gsc", "idec")), line


@pytest.mark.parametrize("method", ["ft", "gsc", "idec"])
def test_agreed_old_labels_refuse_step_labels(workdir: Path, method: str):
    line = refused(workdir, "--method", method, "--opt", f"{method}.old_labels=agreed")
    assert f"method '{method}'" in line and "--set data.labels=seen" in line, line


def test_config_file_method_option_refuses(workdir: Path):
    cfg = workdir / "c.toml"
    cfg.write_text('[method]\nname = "mib"\noptions = {kd_weight = nan}\n')
    assert "kd_weight" in refused(workdir, "--config", str(cfg))


def test_unknown_config_file_key_suggests_the_closest(workdir: Path):
    cfg = workdir / "c.toml"
    cfg.write_text("[train]\ncheckpoint_evry = 5\n")
    assert "did you mean 'train.checkpoint_every'" in refused(workdir, "--config", str(cfg))


def test_crop_below_the_output_stride_of_the_config(workdir: Path):
    """The crop is held against the model's stride once both are known: 12 fits stride 8, not 16."""
    assert "--crop" in refused(workdir, "--set", "model.output_stride=16", "--set", "train.crop=12")
    cfg = workdir / "c.toml"
    cfg.write_text("[train]\ncrop = 12\n")
    assert "output stride 16" in refused(workdir, "--config", str(cfg))


def test_batch_must_split_over_the_processes(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "--batch-size 8" in refused(workdir, "--batch-size", "6")


@pytest.mark.parametrize("args", [
    ["--epochs", "0"], ["--lr", "nan"], ["--crop", "7"], ["--set", "train.flip=\"yes\""], ["--workers", "many"],
])
def test_refusal_in_a_real_process(workdir: Path, args: list[str]):
    """The same refusals from the installed command's process: no traceback, no torch warnings, no files."""
    before = files(workdir)
    out = subprocess.run([*CISS, "learn", "--run", str(workdir / "run"), "--classes", "sky", *args],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert files(workdir) == before


def test_schema_covers_every_default():
    """One rule per key of configs/defaults.toml, and every default passes its own rule."""
    defaults = TRAINING.flatten(TRAINING.defaults())
    assert set(SCHEMA) == set(defaults)
    assert {k: SCHEMA[k].problem(v) for k, v in defaults.items() if SCHEMA[k].problem(v)} == {}


@pytest.mark.parametrize("key,value,kept", [
    ("train.epochs", 1, 1), ("train.workers", 0, 0), ("seed", 0, 0), ("seed", 2**32 - 1, 2**32 - 1),
    ("train.lr", 1, 1.0), ("train.momentum", 0, 0.0), ("train.scale", [1, 1], [1.0, 1.0]),
    ("train.crop", 8192, 8192), ("model.output_stride", 8, 8), ("train.lr_mult.backbone", 0, 0.0),
])
def test_edges_are_accepted(key: str, value: Any, kept: Any):
    checked = TRAINING.check_setting(key, value)
    assert checked == kept and type(checked) is type(kept)

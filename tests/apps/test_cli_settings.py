"""`ciss export` and `ciss live` settings: defaults < --config FILE < --set < a flag typed, through the one
resolver; and the command line's choice lists, read from the registries without importing torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import REPO

from ciss.apps.cli import export, live, main
from ciss.config import Settings
from ciss.export.settings import EXPORT
from ciss.runtime.settings import KINDS, LIVE
from ciss.trainer.data import READERS
from ciss.trainer.methods import METHODS
from ciss.trainer.schema import model_presets


def error(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (result.exit_code, result.output, result.exception)
    return lines[0]


def serve(tmp_path: Path, *args: str) -> str:
    """`ciss live` on a repository that does not exist: the overlay's opacity is checked before it is opened."""
    return error(CliRunner().invoke(main, ["live", "--source", "synthetic", "--headless", "--repo",
                                           str(tmp_path / "nowhere"), "--name", "robot", *args]))


def test_live_settings_come_from_the_file_then_set_then_flags(tmp_path: Path):
    config = tmp_path / "live.toml"
    config.write_text("[live]\nalpha = 7\n")
    opacity, missing = "--alpha 7 is not an opacity", "does not exist"
    assert missing in serve(tmp_path)
    assert opacity in serve(tmp_path, "--set", "live.alpha=7")
    assert opacity in serve(tmp_path, "--config", str(config))
    assert missing in serve(tmp_path, "--config", str(config), "--set", "live.alpha=0.3")
    assert missing in serve(tmp_path, "--config", str(config), "--alpha", "0.3")
    assert opacity in serve(tmp_path, "--set", "live.alpha=0.3", "--alpha", "7")


def test_export_settings_come_from_the_file_then_set_then_flags(tmp_path: Path):
    def refused(*args: str) -> str:
        return error(CliRunner().invoke(main, ["export", "--run", str(tmp_path / "nowhere"), "--name", "robot",
                                               "--repo", str(tmp_path / "models"), *args]))

    config = tmp_path / "export.toml"
    config.write_text("[export]\nopset = 3\n")
    unsupported, no_run = "--opset 3 is not supported", "is not a run with finished steps"
    assert no_run in refused()
    assert unsupported in refused("--set", "export.opset=3")
    assert unsupported in refused("--config", str(config))
    assert no_run in refused("--config", str(config), "--opset", "20")
    config.write_text("[export]\nopst = 3\n")
    assert "did you mean 'export.opset'" in refused("--config", str(config))
    assert "did you mean --set export.precision=" in refused("--set", "export.precison=int8")
    assert refused("--set", "export.opset=true").startswith("error: --set export.opset=true: export.opset must be "
                                                            "an integer, not a boolean")


@pytest.mark.parametrize("command,settings", [(export, EXPORT), (live, LIVE)], ids=["export", "live"])
def test_every_setting_has_its_flag(command, settings: Settings):
    """command_settings finds a setting's flag by its parameter's name: `--workspace` sets export.workspace_gb."""
    params = {p.name for p in command.params}
    assert {key.split(".", 1)[1] for key in settings.rules} <= params


def test_choice_lists_come_from_the_registries():
    help_text = CliRunner().invoke(main, ["learn", "--help"], terminal_width=1000).output
    for name in (*METHODS, *READERS, *(p for p in model_presets() if p != "auto")):
        assert name in help_text, name
    live_help = CliRunner().invoke(main, ["live", "--help"], terminal_width=1000).output
    assert all(kind in live_help for kind in KINDS)
    assert "unknown dataset kind 'coco'; known: " + ", ".join(READERS) in \
        error(CliRunner().invoke(main, ["learn", "--dataset", "coco"]))
    assert "unknown method 'magic'; known: " + ", ".join(METHODS) in \
        error(CliRunner().invoke(main, ["learn", "--method", "magic"]))


def test_help_and_the_live_command_line_import_no_torch():
    """The choices are read when a value or the help needs them; `ciss live` reads none of the trainer's."""
    script = """
import sys
from click.testing import CliRunner
from ciss.apps.cli import main
result = CliRunner().invoke(main, ["live", "--source", "synthetic", "--repo", "nowhere", "--name", "x",
                                   "--headless", "--set", "live.backend=ort-cpu"])
assert result.exit_code == 2 and "does not exist" in result.stderr, result.output
assert not [m for m in sys.modules if m == "torch" or m.startswith("ciss.trainer")], "live imported the trainer"
for command in ([], ["learn"], ["export"], ["live"], ["demo"], ["eval"]):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
assert "torch" not in sys.modules, "a help imported torch"
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr

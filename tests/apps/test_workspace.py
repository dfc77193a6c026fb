"""The mission's commands as typed, with no --run, --repo or --name: runs/ and models/ in the current
folder (ciss/workspace.py). Real `ciss` processes in a scratch folder, a tiny model, a 3-class dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CISS, REPO, make_folder_dataset, write_config

from ciss.engines import engine_unavailable_reason
from ciss.errors import CissError
from ciss.workspace import new_run


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """The one `error:` line, which comes last."""
        lines = self.stderr.strip().splitlines()
        assert sum(ln.startswith("error:") for ln in lines) == 1 and lines[-1].startswith("error:"), self.stderr
        return lines[-1]


def ciss(cwd: Path, *args: str) -> Done:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([*CISS, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr
    return Done(r.returncode, r.stdout, r.stderr)


@dataclass
class Workspace:
    cwd: Path
    base: Done
    more: Done
    export: Done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """`ciss learn --data D --classes ...`, `ciss learn --new-classes c`, `ciss export --trt`, as typed."""
    cwd = tmp_path_factory.mktemp("workspace")
    make_folder_dataset(cwd / "data" / "abc")
    write_config(cwd / "fast.toml", synthetic=False)
    base = ciss(cwd, "learn", "--data", "data/abc", "--classes", "a,b", "--config", "fast.toml", "--method", "ft")
    more = ciss(cwd, "learn", "--new-classes", "c")
    export = ciss(cwd, "export", "--trt")
    return Workspace(cwd, base, more, export)


def test_a_base_step_makes_a_run_named_after_its_dataset(workspace: Workspace):
    assert workspace.base.returncode == 0, workspace.base.stderr
    assert "run: runs/abc (new; --run RUN chooses the folder)" in workspace.base.stderr.splitlines()
    assert (workspace.cwd / "runs" / "abc" / "step-0" / "manifest.json").is_file()


def test_new_classes_go_to_the_most_recent_run(workspace: Workspace):
    assert workspace.more.returncode == 0, workspace.more.stderr
    lines = workspace.more.stderr.splitlines()
    assert lines[0] == "run: runs/abc (the most recent in runs/; --run RUN chooses another)"
    assert lines[1].startswith("carried over from step 0 of runs/abc: ") and "method=ft" in lines[1]
    assert (workspace.cwd / "runs" / "abc" / "step-1" / "manifest.json").is_file()


def test_export_publishes_the_most_recent_run_to_models(workspace: Workspace):
    done = workspace.export
    assert done.stderr.splitlines()[0].startswith("run: runs/abc (the most recent")
    manifest = json.loads((workspace.cwd / "models" / "abc" / "1" / "manifest.json").read_text())
    assert manifest["name"] == "abc" and manifest["source"]["step"] == 1
    reason = engine_unavailable_reason()
    if reason is None:  # TensorRT and a GPU here: the engine is built
        assert done.returncode == 0 and manifest["engines"], done.stderr
    else:  # published the ONNX model, then one line about TensorRT
        assert done.returncode == 2 and "no TensorRT engine built" in done.error and not manifest["engines"]
    assert "abc v1: " in done.stdout


def test_eval_uses_the_most_recent_run(workspace: Workspace):
    done = ciss(workspace.cwd, "eval")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("run: runs/abc (the most recent") and "step 1" in done.stdout


def test_live_serves_the_most_recently_published_model(workspace: Workspace):
    done = ciss(workspace.cwd, "live", "--source", "synthetic", "--headless", "--max-frames", "3")
    assert done.returncode == 0, done.stderr
    assert "model: abc in models/ (the most recently published; --name NAME chooses another)" in done.stderr
    listed = ciss(workspace.cwd, "models")
    assert listed.returncode == 0 and "abc" in listed.stdout


@pytest.mark.skipif(Path("/dev/video0").exists(), reason="this machine has a camera 0")
def test_live_camera_without_a_camera_is_one_line(workspace: Workspace):
    done = ciss(workspace.cwd, "live", "--camera", "0")
    assert done.returncode == 2 and "camera" in done.error, done.stderr


def test_equally_recent_models_are_not_guessed(workspace: Workspace, tmp_path: Path):
    shutil.copytree(workspace.cwd / "models", tmp_path / "models")
    shutil.copytree(tmp_path / "models" / "abc", tmp_path / "models" / "xyz")  # the same publication time
    done = ciss(tmp_path, "live", "--source", "synthetic", "--headless", "--max-frames", "1")
    assert done.returncode == 2
    assert "2 models in models/ are equally recent (abc, xyz); choose one with --name NAME" in done.error
    manifest = tmp_path / "models" / "xyz" / "1" / "manifest.json"
    later = json.loads(manifest.read_text())
    later["created"] = "2999-01-01T00:00:00Z"
    manifest.write_text(json.dumps(later))
    done = ciss(tmp_path, "live", "--source", "synthetic", "--headless", "--max-frames", "1")
    assert done.returncode == 0 and "model: xyz in models/" in done.stderr, done.stderr


def test_nothing_to_use_says_what_to_do(tmp_path: Path):
    assert "no run with a finished step in runs/" in ciss(tmp_path, "export").error
    assert "no published model in models/; publish one with `ciss export`" in ciss(tmp_path, "live", "--camera", "0").error
    assert "--resume needs --run RUN" in ciss(tmp_path, "learn", "--resume").error


def test_new_runs_never_reuse_a_folder(tmp_path: Path):
    runs = tmp_path / "runs"
    assert new_run("camvid", runs) == runs / "camvid"
    (runs / "camvid").mkdir(parents=True)
    (runs / "camvid-2").mkdir()
    assert new_run("camvid", runs) == runs / "camvid-3"
    assert new_run("my data/set", runs) == runs / "my-data-set"


def test_python_api_is_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import ciss

    monkeypatch.chdir(tmp_path)
    make_folder_dataset(tmp_path / "abc")
    run = ciss.Run(log=lambda s: None)
    with pytest.raises(CissError, match="no run with a finished step"):
        run.export()
    steps = run.learn("abc", classes="a,b", config=write_config(tmp_path / "fast.toml", synthetic=False),
                      method="ft", settings={"train.clip_grad_norm": 3})
    assert run.path == Path("runs/abc") and steps[0]["config"]["train"]["clip_grad_norm"] == 3.0
    assert ciss.Run(log=lambda s: None).learn(new_classes=["c"])[0]["data"]["added"] == ["c"]
    result = ciss.Run(log=lambda s: None).export()
    assert (result.name, result.version) == ("abc", 1)

"""The one way ciss makes a folder appear whole: staged under a hidden name, fsynced, renamed; a failed
or unpublished staging folder is removed, and those of dead processes are cleared later."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ciss.atomic import HOST, StagingFolder, remove_dead_staging


def test_a_published_folder_appears_whole_and_no_staging_folder_is_left(tmp_path: Path):
    with StagingFolder(tmp_path / "parent", "step-3") as staging:
        assert staging.path.parent == tmp_path / "parent" and staging.path.is_dir()
        assert staging.path.name.startswith(f".staging-step-3-{os.getpid()}-")
        (staging.path / "sub").mkdir()
        (staging.path / "sub" / "a.bin").write_bytes(b"a")
        assert not (tmp_path / "parent" / "final").exists()
        staging.publish(tmp_path / "parent" / "final")
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["final"]
    assert (tmp_path / "parent" / "final" / "sub" / "a.bin").read_bytes() == b"a"


def test_a_failure_removes_the_staging_folder(tmp_path: Path):
    with pytest.raises(RuntimeError, match="disk"):
        with StagingFolder(tmp_path, "x") as staging:
            (staging.path / "half.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("taken", ["folder", "file"])
def test_a_taken_name_is_refused_and_the_staging_folder_kept_for_another(tmp_path: Path, taken: str):
    if taken == "folder":
        (tmp_path / "1").mkdir()
        (tmp_path / "1" / "theirs").write_text("published by another process")
    else:
        (tmp_path / "1").write_text("a stray file")
    with StagingFolder(tmp_path, "x") as staging:
        (staging.path / "mine").write_text("mine")
        with pytest.raises(FileExistsError):
            staging.publish(tmp_path / "1")
        assert (staging.path / "mine").exists()
        staging.publish(tmp_path / "2")
    assert (tmp_path / "2" / "mine").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


@pytest.mark.skipif(os.name != "posix", reason="processes are probed only on POSIX")
def test_only_staging_folders_of_dead_processes_with_the_label_are_removed(tmp_path: Path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    mine, gone = f"-{os.getpid()}-ab12", f"-{dead.pid}-ab12"
    names = [f".staging-{HOST}{gone}", f".staging-{HOST}{mine}", f".staging-0badc0de{gone}",
             f".staging-step-4{gone}", ".staging-0123abcd", "1"]
    for name in names:
        (tmp_path / name).mkdir()
    assert remove_dead_staging(tmp_path, HOST) == [f".staging-{HOST}{gone}"]
    assert remove_dead_staging(tmp_path, r"step-\d+") == [f".staging-step-4{gone}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {f".staging-{HOST}{gone}",
                                                                               f".staging-step-4{gone}"})
    assert remove_dead_staging(tmp_path / "absent", HOST) == []

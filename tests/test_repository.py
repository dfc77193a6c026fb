"""The model repository: whole versions or nothing, hashes that catch damage, append-only classes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ciss.apps.cli import main
from ciss.classmap import ClassMap, default_color
from ciss.errors import CissError
from ciss.repository import MANIFEST, ModelRepository, check_name, verify_version

BASE = ["road", "sky", "tree"]


def model_manifest(names: list[str] = BASE, colors: list[tuple[int, int, int]] | None = None,
                   **extra) -> dict:
    """What an exporter hands to publish: the classes plus whatever else it knows."""
    return {"classes": ClassMap.initial(names, colors).to_json(),
            "input": {"name": "images", "size": [48, 64], "dynamic": False},
            "precision": "fp32", **extra}


def model_files(folder: Path, payload: bytes = b"onnx-bytes", engine: bool = False) -> dict[str, Path]:
    """Tiny stand-in files: the repository only copies and hashes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(payload * 20)
    files = {"model.onnx": folder / "model.onnx"}
    if engine:
        (folder / "x.engine").write_bytes(b"plan" * 50)
        (folder / "x.json").write_text('{"format": "ciss.engine/1"}')
        files.update({"engines/x.engine": folder / "x.engine", "engines/x.json": folder / "x.json"})
    return files


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_publish_copies_hashes_and_lists(tmp_path: Path):
    repo = ModelRepository(tmp_path / "models")
    src = model_files(tmp_path / "src", engine=True)
    assert repo.publish("camvid", src, model_manifest()) == 1
    assert repo.publish("camvid", src, model_manifest(BASE + ["car"], source={"step": 1})) == 2

    assert repo.names() == ["camvid"] and repo.versions("camvid") == [1, 2] and repo.latest("camvid") == 2
    assert repo.path("camvid") == repo.path("camvid", 2) == tmp_path / "models" / "camvid" / "2"
    assert entries(tmp_path / "models" / "camvid") == ["1", "2"]  # no staging folder left behind
    m1, m2 = repo.manifest("camvid", 1).to_json(), repo.manifest("camvid", 2).to_json()
    assert (m1["format"], m1["name"], m1["version"], m1["parent"]) == ("ciss.model/1", "camvid", 1, None)
    assert (m2["version"], m2["parent"], m2["source"]) == (2, 1, {"step": 1})
    assert m2["created"].endswith("Z")
    assert set(m2["files"]) == {"model.onnx", "engines/x.engine", "engines/x.json"}
    for rel, source in src.items():
        data = source.read_bytes()  # copied, not moved
        assert m2["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert (repo.path("camvid", 2) / rel).read_bytes() == data
    assert repo.verify() == []
    assert verify_version(repo.path("camvid", 2)).to_json() == m2


def test_readers_ignore_what_is_not_a_finished_version(tmp_path: Path):
    repo = ModelRepository(tmp_path)
    repo.publish("m", model_files(tmp_path / "src"), model_manifest())
    good = (tmp_path / "m" / "1" / MANIFEST).read_text()
    for junk in (".staging-abc", "latest", "07"):  # in-progress publish, non-integer names
        (tmp_path / "m" / junk).mkdir()
        (tmp_path / "m" / junk / MANIFEST).write_text(good)
    (tmp_path / "m" / "5").mkdir()  # an integer folder without a manifest
    (tmp_path / "m" / "5" / "model.onnx").write_bytes(b"x")
    (tmp_path / "m" / "6").mkdir()  # an integer folder with a broken manifest
    (tmp_path / "m" / "6" / MANIFEST).write_text('{"format": "ciss.mod')
    (tmp_path / ".hidden").mkdir()

    assert repo.names() == ["m"] and repo.versions("m") == [1] and repo.latest("m") == 1
    [problem] = repo.verify()  # the broken manifest is reported; the folder without one is not a version
    assert problem.version == 6 and "unreadable manifest" in problem.message
    # a new version never reuses a number that is taken, whatever is in that folder
    assert repo.publish("m", model_files(tmp_path / "src"), model_manifest()) == 7
    assert repo.manifest("m", 7).parent == 1


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,rel,expected", [
    (flip_a_byte, "model.onnx", "does not match its sha256"),
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "engines/x.engine", "has 193 bytes, the manifest says 200"),
    (Path.unlink, "engines/x.json", "engines/x.json is missing"),
])
def test_verify_catches_damage(tmp_path: Path, damage, rel: str, expected: str):
    repo = ModelRepository(tmp_path / "models")
    repo.publish("m", model_files(tmp_path / "src", engine=True), model_manifest())
    version = repo.path("m", 1)
    damage(version / rel)

    [problem] = repo.verify()
    assert (problem.name, problem.version) == ("m", 1) and expected in problem.message and rel in problem.message
    with pytest.raises(CissError, match="is corrupt") as err:
        verify_version(version)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_manifest_must_match_its_folder(tmp_path: Path):
    repo = ModelRepository(tmp_path)
    repo.publish("m", model_files(tmp_path / "src"), model_manifest())
    os.rename(tmp_path / "m" / "1", tmp_path / "m" / "4")  # e.g. a hand copy under another number
    with pytest.raises(CissError, match="manifest says version 1 but the folder is 4"):
        verify_version(tmp_path / "m" / "4")


@pytest.mark.parametrize("names,colors,expected", [
    (BASE, [default_color(1), (9, 9, 9), default_color(3)], "class 2 'sky' changed colour from"),
    (["road", "heaven", "tree"], None, "class 2 'sky' was renamed to 'heaven'"),
    (["road", "sky"], None, "class 3 'tree' was removed"),
])
def test_a_new_version_must_extend_the_classes(tmp_path: Path, names, colors, expected):
    repo = ModelRepository(tmp_path)
    files = model_files(tmp_path / "src")
    repo.publish("m", files, model_manifest())

    with pytest.raises(CissError, match=expected):
        repo.publish("m", files, model_manifest(names, colors))
    assert entries(tmp_path / "m") == ["1"]
    assert repo.publish("m", files, model_manifest(names, colors), allow_class_change=True) == 2
    assert repo.manifest("m", 2).parent == 1


def test_appending_classes_is_allowed(tmp_path: Path):
    repo = ModelRepository(tmp_path)
    files = model_files(tmp_path / "src")
    first = ClassMap.initial(BASE)
    repo.publish("m", files, {"classes": first.to_json()})
    repo.publish("m", files, {"classes": first.extend(["car", "bus"]).to_json()})
    assert [len(repo.manifest("m", v).classes) for v in (1, 2)] == [4, 6]


def test_a_failed_publish_leaves_nothing(tmp_path: Path):
    def stamp(staging: Path, version: int) -> list[str]:
        raise CissError("the exporter gave up")

    with pytest.raises(CissError, match="gave up"):
        ModelRepository(tmp_path).publish("m", model_files(tmp_path / "src"), model_manifest(), stamp=stamp)
    assert entries(tmp_path / "m") == []


RACER = """
import sys
from pathlib import Path
from ciss.classmap import ClassMap
from ciss.repository import ModelRepository

root, source, writer, go = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
print("ready", flush=True)
while not go.exists():
    pass
repo = ModelRepository(Path(root))

def stamp(staging, version):  # like the exporter writing the number into the ONNX metadata
    (staging / "model.onnx").write_bytes(f"{{writer}} {{version}}".encode())
    return ["model.onnx"]

for i in range({n}):
    manifest = {{"classes": ClassMap.initial(["a", "b"]).to_json(), "writer": writer, "i": i}}
    print(repo.publish("race", {{"model.onnx": source}}, manifest, stamp=stamp), flush=True)
"""


def test_two_processes_publishing_at_once_get_distinct_whole_versions(tmp_path: Path):
    n, go = 6, tmp_path / "go"
    source, procs = model_files(tmp_path / "src")["model.onnx"], {}
    for writer in ("a", "b"):
        procs[writer] = subprocess.Popen(
            [sys.executable, "-c", RACER.format(n=n), str(tmp_path / "models"), str(source), writer, str(go)],
            stdout=subprocess.PIPE, text=True)
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    go.touch()  # both are spinning: release them together
    published = {}
    for writer, p in procs.items():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        published[writer] = [int(v) for v in out.split()]

    repo = ModelRepository(tmp_path / "models")
    assert sorted(published["a"] + published["b"]) == list(range(1, 2 * n + 1)) == repo.versions("race")
    assert entries(tmp_path / "models" / "race") == sorted(str(v) for v in range(1, 2 * n + 1))
    for writer, versions in published.items():
        for i, v in enumerate(versions):
            m = repo.manifest("race", v).to_json()
            assert (m["version"], m["writer"], m["i"]) == (v, writer, i)
            assert m["parent"] == (v - 1 or None)
            assert (repo.path("race", v) / "model.onnx").read_text() == f"{writer} {v}"  # re-stamped on retry
    assert repo.verify() == []


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", ".", ".hidden", "../up", "with space", "caf\u00e9"])
def test_bad_names_are_refused(tmp_path: Path, name: str):
    with pytest.raises(CissError, match="invalid model name"):
        check_name(name)
    with pytest.raises(CissError, match="invalid model name"):
        ModelRepository(tmp_path / "models").publish(name, model_files(tmp_path / "src"), model_manifest())
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("rel", ["../escape.onnx", "/abs.onnx", "a/../b", "", MANIFEST])
def test_bad_file_paths_are_refused(tmp_path: Path, rel: str):
    with pytest.raises(CissError, match="cannot publish"):
        ModelRepository(tmp_path / "models").publish("m", {rel: model_files(tmp_path / "src")["model.onnx"]},
                                                     model_manifest())
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path: Path):
    repo = ModelRepository(tmp_path)
    files = model_files(tmp_path / "src")
    repo.publish("m", files, model_manifest())
    (tmp_path / "m").chmod(0o555)
    try:
        with pytest.raises(CissError, match=r"cannot write to .*: Permission denied"):
            repo.publish("m", files, model_manifest())
        assert entries(tmp_path / "m") == ["1"]
    finally:
        (tmp_path / "m").chmod(0o755)


FULL = """
import resource, signal, sys
from pathlib import Path
from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.repository import ModelRepository

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
repo = ModelRepository(Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    repo.publish("m", {"model.onnx": Path(sys.argv[2])}, {"classes": ClassMap.initial(["a"]).to_json()})
except CissError as e:
    print(e)
    sys.exit(2)
"""


def test_a_full_disk_leaves_nothing_behind(tmp_path: Path):
    """A file-size limit makes writes fail like a full disk does, even for root."""
    source = tmp_path / "big.onnx"
    source.write_bytes(os.urandom(64 * 1024))
    (tmp_path / "models" / "m").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", FULL, str(tmp_path / "models"), str(source)],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stdout.startswith(f"cannot write to {tmp_path / 'models' / 'm'}: File too large;")
    assert entries(tmp_path / "models" / "m") == []


def test_the_repository_does_not_need_torch():
    code = "import sys, ciss.repository; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- ciss models ------------------------------------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def published(tmp_path: Path) -> Path:
    repo = ModelRepository(tmp_path / "models")
    files = model_files(tmp_path / "src")
    metrics = {"miou_all": 0.712, "miou_old": 0.75, "miou_new": 0.5}
    repo.publish("camvid", files, model_manifest(metrics=metrics))
    engine = model_files(tmp_path / "src", engine=True) | {"model.int8.onnx": files["model.onnx"]}
    repo.publish("camvid", engine, model_manifest(
        BASE + ["car"], input={"size": None, "dynamic": True}, metrics=metrics,
        variants={"int8": {"file": "model.int8.onnx"}},
        engines=[{"file": "engines/x.engine", "manifest": "engines/x.json"}]))
    repo.publish("voc", files, model_manifest(["cat"]))
    return tmp_path / "models"


def test_cli_lists_models_and_versions(published: Path):
    r = invoke("models", str(published))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("camvid") and any(ln.startswith("voc") for ln in lines)
    v1 = next(ln.split() for ln in lines if ln.split()[:1] == ["1"])
    v2 = next(ln.split() for ln in lines if ln.split()[:1] == ["2"])
    assert v1[1:4] == ["4", "48x64", "fp32"] and v1[4] == "71.2/75.0/50.0"
    assert v2[1:7] == ["5", "(+car)", "dynamic", "fp32,", "int8,", "x"]

    only = invoke("models", str(published), "voc")
    assert only.exit_code == 0 and "camvid" not in only.stdout and "voc" in only.stdout


def test_cli_verify(published: Path):
    r = invoke("models", "verify", str(published))
    assert r.exit_code == 0 and r.stdout.strip() == "3 versions verified"
    assert invoke("models", "verify", str(published), "voc").stdout.strip() == "1 version verified"

    flip_a_byte(published / "camvid" / "2" / "engines" / "x.engine")
    r = invoke("models", "verify", str(published))
    assert r.exit_code == 2
    assert r.stdout.splitlines() == ["camvid/2: engines/x.engine does not match its sha256 (corrupt)"]
    assert r.stderr.startswith("error: 1 corrupt version(s)")


@pytest.mark.parametrize("args,fragment", [
    (["models", "{tmp}/nowhere"], "is not a folder"),
    (["models", "verify", "{tmp}/nowhere"], "is not a folder"),
    (["models", "{tmp}/models", "kitti"], "no model 'kitti'"),
    (["models", "verify", "{tmp}/models", "kitti"], "no model 'kitti'"),
    (["models", "{tmp}/models", "../x"], "invalid model name"),
    (["models", "{tmp}/src"], "no models in"),
])
def test_cli_user_errors(published: Path, tmp_path: Path, args: list[str], fragment: str):
    r = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and fragment in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


DIES_MID_PUBLISH = """
import os, signal, sys
from pathlib import Path
from ciss.classmap import ClassMap
from ciss.repository import ModelRepository

def stamp(staging, version):  # killed while the version is staged, before the rename
    os.kill(os.getpid(), signal.SIGKILL)

ModelRepository(Path(sys.argv[1])).publish("m", {"model.onnx": Path(sys.argv[2])},
                                           {"classes": ClassMap.initial(["a"]).to_json()}, stamp=stamp)
"""


def test_the_next_publish_removes_staging_folders_of_dead_processes(tmp_path: Path):
    """A publisher killed mid-publish used to leave its staging folder (a whole model copy) forever."""
    source = model_files(tmp_path / "src")["model.onnx"]
    died = subprocess.Popen([sys.executable, "-c", DIES_MID_PUBLISH, str(tmp_path / "models"), str(source)])
    assert died.wait(timeout=60) == -signal.SIGKILL
    [stale] = entries(tmp_path / "models" / "m")
    assert stale.startswith(".staging-") and f"-{died.pid}-" in stale  # the owner's pid is in the name
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A publish in progress in a live process, and a staging folder named the old way, are kept.
        in_progress = stale.replace(f"-{stale.split('-')[2]}-", f"-{alive.pid}-")
        (tmp_path / "models" / "m" / in_progress).mkdir()
        (tmp_path / "models" / "m" / ".staging-0123abcd").mkdir()
        assert ModelRepository(tmp_path / "models").publish("m", {"model.onnx": source}, model_manifest(["a"])) == 1
        assert entries(tmp_path / "models" / "m") == sorted([in_progress, ".staging-0123abcd", "1"])
    finally:
        alive.kill()
        alive.wait()

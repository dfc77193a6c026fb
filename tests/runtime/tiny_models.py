"""Real exported model versions for the runtime tests, built once per test session.

A tiny run learns four classes (step 0) and then water and sand (step 1); each step is exported once by
the real exporter into a scratch repository. Tests publish copies into their own repositories at
the moment they choose, so the slow part (training and torch.onnx export) is paid once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config

from ciss.export.pipeline import ExportOptions, export_step
from ciss.manifest import ModelManifest
from ciss.repository import ModelRepository
from ciss.trainer.learn import learn

NAME = "robot"
SIZE = (48, 64)


@dataclass(frozen=True)
class Exported:
    run: Path
    v1: Path  # step 0: background + sky, grass, disk, box
    v2: Path  # step 1: adds water and sand (ids 5 and 6)


_built: list[Exported] = []


def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    if not _built:
        root = tmp_path_factory.mktemp("runtime-models")
        config = write_config(root / "fast.toml", size=8)
        run = root / "run"
        learn(run, classes=["sky", "grass", "disk", "box"], config_file=config, method="ft", log=lambda s: None)
        # Stuff classes fill whole regions, so even this short step makes version 2 paint them.
        learn(run, new_classes=["water", "sand"], method="mib", overrides={"train": {"epochs_next": 2, "lr_next": 0.05}},
              log=lambda s: None)
        paths = [export_step(run, root / "source", NAME, ExportOptions(step=step, size=SIZE), log=lambda s: None).path
                 for step in (0, 1)]
        _built.append(Exported(run, *paths))
    return _built[0]


def manifest_of(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / "manifest.json").read_text())


def loaded(version_dir: Path) -> ModelManifest:
    """The version's manifest as the runtime reads it."""
    return ModelManifest.from_json(manifest_of(version_dir), version_dir / "manifest.json")


def publish(repo: Path, version_dir: Path, files: dict[str, Path] | None = None, allow_class_change: bool = False,
            **manifest_changes: Any) -> int:
    """Publish a copy of an exported version into `repo` as its next version of NAME; `files`
    replaces some of its files and `manifest_changes` some manifest entries."""
    manifest = {**manifest_of(version_dir), **manifest_changes}
    sources = {rel: version_dir / rel for rel in manifest_of(version_dir)["files"]} | (files or {})
    return ModelRepository(repo).publish(NAME, sources, manifest, allow_class_change=allow_class_change)


class SwapAtRead:
    """A source that, before frame `at` is read, publishes a version and waits until the segmenter has
    it ready: a stream chooses each frame's model as the frame is read, so that frame is the first of
    the new version. (A publish from the consumer, on_frame, lands behind the frames in flight.)"""

    def __init__(self, source: Any, at: int, publish_version: Any, ready: Any):
        self._source, self._at, self._publish, self._ready = source, at, publish_version, ready
        self._reads = 0

    def read(self) -> Any:
        if self._reads == self._at:
            self._publish()
            assert self._ready(30), "the watcher never prepared the new version"
        self._reads += 1
        return self._source.read()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)

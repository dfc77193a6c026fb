"""The run store: `runs/<run>/step-<k>/` folders, each whole and self-describing.

A step is written into a hidden staging folder and renamed into place when complete (`ciss.atomic`),
so an interrupted or failed run never leaves something that looks like a finished step. In-progress
checkpoints for `--resume` live in `.partial-step-<k>/`; readers ignore every dot folder.
"""

from __future__ import annotations

import io
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ciss.atomic import StagingFolder, remove_dead_staging
from ciss.classmap import ClassMap
from ciss.errors import CissError
from ciss.manifest import (MANIFEST, STEP_FORMAT, StepManifest, finished_steps, read_step, sha256_file, step_dir,
                           write_json_atomic)
from ciss.trainer.models import DeepLabV3, load_step_model

WEIGHTS = "model.pt"
_PARTIAL_DIR = re.compile(r"^\.partial-step-(\d+)$")
_STAGING_LABEL = r"step-\d+"  # a step's staging folder: .staging-step-<k>-<pid>-<token>


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a tensors-only file; anything else (pickled code, truncation) is a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CissError(f"weights file {path} is missing") from None
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CissError(f"cannot read weights {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "the file is corrupt or not a ciss checkpoint") from None


def load_step(folder: Path, verify: bool = True) -> tuple[DeepLabV3, StepManifest]:
    """Rebuild a step's model from its folder alone (manifest + weights)."""
    folder = Path(folder)
    manifest = read_step(folder)
    weights = folder / manifest.weights.file
    if verify and weights.exists() and sha256_file(weights) != manifest.weights.sha256:
        raise CissError(f"weights {weights} do not match their sha256 in the manifest; the file is corrupt")
    state = load_weights(weights)
    try:
        model = load_step_model(manifest.model, state)
    except RuntimeError as e:
        raise CissError(f"weights in {folder} do not fit the model in its manifest: {str(e).splitlines()[0]}") from None
    return model, manifest


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CissError(f"run path {self.root} exists and is not a folder")

    @property
    def name(self) -> str:
        return self.root.name

    def step_dir(self, step: int) -> Path:
        return step_dir(self.root, step)

    def partial_dir(self, step: int) -> Path:
        return self.root / f".partial-step-{step}"

    def steps(self) -> list[int]:
        return finished_steps(self.root)

    def last_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def manifest(self, step: int) -> StepManifest:
        if step not in self.steps():
            have = ", ".join(map(str, self.steps())) or "none"
            raise CissError(f"run {self.root} has no step {step} (steps: {have})")
        return read_step(self.step_dir(step))

    def classmap(self, step: int) -> ClassMap:
        return self.manifest(step).classes

    def load(self, step: int) -> tuple[DeepLabV3, StepManifest]:
        self.manifest(step)  # clear error for a missing step
        return load_step(self.step_dir(step))

    def remove_stale(self) -> list[str]:
        """Remove what a killed process left behind, and return the folder names: staging folders of
        processes that are gone, and the partial folder of a step that was committed before the kill
        (its checkpoint can never be resumed: the step is there)."""
        if not self.root.is_dir():
            return []
        steps = set(self.steps())
        removed = remove_dead_staging(self.root, _STAGING_LABEL)
        for path in self.root.iterdir():
            partial = _PARTIAL_DIR.match(path.name)
            if partial and int(partial.group(1)) in steps:
                shutil.rmtree(path)
                removed.append(path.name)
        return sorted(removed)

    def commit(self, step: int, state: dict[str, torch.Tensor], manifest: dict[str, Any],
               extra_files: dict[str, bytes] | None = None) -> Path:
        """Write weights and manifest to a staging folder, then rename it to `step-<k>`."""
        final = self.step_dir(step)
        taken = CissError(f"{final} already exists; a step is never overwritten (start a new run)")
        if final.exists():
            raise taken
        try:
            with StagingFolder(self.root, f"step-{step}") as staging:
                buf = io.BytesIO()  # torch.save to a path turns a full disk into an opaque RuntimeError
                torch.save(state, buf)
                (staging.path / WEIGHTS).write_bytes(buf.getvalue())
                for name, data in (extra_files or {}).items():  # a name may hold folders: tensorboard/events...
                    (staging.path / name).parent.mkdir(parents=True, exist_ok=True)
                    (staging.path / name).write_bytes(data)
                weights = staging.path / WEIGHTS
                manifest = dict(manifest, format=STEP_FORMAT, step=step,
                                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                weights={"file": WEIGHTS, "sha256": sha256_file(weights),
                                         "size": weights.stat().st_size})
                write_json_atomic(staging.path / MANIFEST, manifest)
                staging.publish(final)
        except FileExistsError:  # committed meanwhile by another process
            raise taken from None
        except OSError as e:
            if e.filename is None:  # name the step a full disk refused
                raise OSError(e.errno, e.strerror, str(final)) from e
            raise
        return final

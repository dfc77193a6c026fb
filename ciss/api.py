"""The trainer and exporter as Python: `ciss.Run`, which the `ciss` command itself calls.

    run = ciss.Run()                                   # runs/<dataset> on the first step, then that run
    run.learn("../shared/data/camvid", classes=["sky", "building", "road", "tree"])
    run.learn(new_classes=["car"], settings={"train.clip_grad_norm": 3})
    run.export(trt=True)                               # models/<run name>, a new version

Importing this module imports neither torch nor ONNX (the runtime install has neither); each method
imports the trainer or the exporter when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ciss.errors import CissError
from ciss.workspace import MODELS, RUNS, latest_run, new_run

if TYPE_CHECKING:
    from ciss.export.pipeline import ExportResult

Names = str | Sequence[str]


def _names(value: Names | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)


def _dataset_name(data: str | Path | None, dataset: str | None) -> str:
    return Path(data).resolve().name if data is not None else dataset or "synthetic"


class Run:
    """A run folder: its steps are learned, evaluated and exported through this object.

    With no `path`, the first `learn` of a base step makes `runs/<dataset>` (`-2`, `-3`, ... when taken),
    and every other call uses the most recent run in `runs/`; the choice is logged either way.
    """

    def __init__(self, path: str | Path | None = None, log: Callable[[str], None] = print):
        self.path = Path(path) if path is not None else None
        self.log = log

    def _existing(self) -> Path:
        if self.path is None:
            self.path = latest_run(RUNS, self.log)
        return self.path

    def learn(self, data: str | Path | None = None, *, classes: Names | None = None,
              new_classes: Names | None = None, task: str | None = None, dataset: str | None = None,
              root: str | Path | None = None, method: str | None = None, options: Mapping[str, Any] | None = None,
              settings: Mapping[str, Any] | None = None, config: str | Path | None = None,
              device: str = "auto", resume: bool = False) -> list[dict[str, Any]]:
        """Learn a base step (`classes`, or every class when none is given), `new_classes` on top of the
        run, or the remaining steps of a protocol `task`; returns the manifests of the steps trained.

        `settings` are config keys in dotted form ({"train.epochs": 5}, as `--set`); `train.*` and
        `eval.*` apply to this call only, the rest and `config` (a TOML file) are carried to later steps.
        `options` are method options ({"gsc.kd_weight": 10}, as `--opt`).
        """
        from ciss.trainer.config import TRAINING
        from ciss.trainer.learn import learn

        overrides = TRAINING.overrides(settings or {})
        if self.path is None:
            if resume:
                raise CissError("--resume needs --run RUN: the run whose step was interrupted")
            if new_classes is not None:
                self._existing()
            elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise CissError("under torchrun give --run RUN, so that every process writes the same run")
            else:
                self.path = new_run(_dataset_name(data, dataset), RUNS)
                self.log(f"run: {self.path} (new; --run RUN chooses the folder)")
        return learn(self.path, data=Path(data) if data is not None else None, dataset=dataset,
                     root=Path(root) if root is not None else None, classes=_names(classes),
                     new_classes=_names(new_classes), task=task, method=method, method_options=dict(options or {}),
                     config_file=Path(config) if config is not None else None, overrides=overrides,
                     device=device, resume=resume, log=self.log)

    def evaluate(self, step: int | None = None, data: str | Path | None = None, split: str | None = None,
                 protocol: str | None = None, device: str = "auto") -> dict[str, Any]:
        """mIoU over the old, new and all seen classes of a step (default: the last), and per class."""
        from ciss.trainer.report import evaluate_step

        return evaluate_step(self._existing(), step, Path(data) if data is not None else None, split, protocol,
                             device)

    def export(self, repo: str | Path | None = None, name: str | None = None, **options: Any) -> ExportResult:
        """Publish a step as the next version of `name` (default: the run's folder name) in the model
        repository `repo` (default: models/). `options` are the fields of `ExportOptions` (step, size,
        dynamic, outputs, opset, trt, precision, workspace_gb, calib_images, allow_class_change).
        """
        from ciss.export.pipeline import ExportOptions, export_step

        from ciss.repository import check_name

        run = self._existing()
        if name is None:
            try:
                name = check_name(run.name)
            except CissError as e:
                raise CissError(f"{e}; the run's folder name {run.name!r} cannot name the model: give --name NAME") from None
        return export_step(run, Path(repo) if repo is not None else MODELS, name, ExportOptions(**options),
                           log=self.log)

"""The workspace convention: runs in `runs/`, published models in `models/`, both under the current folder.

Commands given no `--run`, `--repo` or `--name` use these folders, so the commands of the README work as
typed. "Most recent" means the newest creation time a manifest records (a run's last finished step, a
model's newest version); file times are not used, since copying a folder changes them. When several
candidates share that time, nothing is guessed: the error lists them and names the flag that chooses.
Torch-free: the runtime install resolves `models/` with it.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Callable

from ciss.errors import CissError
from ciss.manifest import finished_steps, read_step, step_dir

RUNS = Path("runs")
MODELS = Path("models")


def new_run(dataset: str, runs: Path = RUNS) -> Path:
    """A folder for a new run named after its dataset; never an existing one (camvid, camvid-2, ...)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", dataset).strip("-.") or "run"
    path, n = runs / stem, 1
    while path.exists():
        n += 1
        path = runs / f"{stem}-{n}"
    return path


def _parse(stamp: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(stamp))
    except ValueError:
        return None


def _run_finished(run: Path) -> datetime | None:
    """When the run's last readable finished step was written (None if it has none): a damaged run is
    passed over here, and its own commands say what is wrong with it."""
    for k in reversed(finished_steps(run)):
        try:
            created = _parse(read_step(step_dir(run, k)).created)
        except CissError:
            continue
        if created is not None:
            return created
    return None


def _newest(found: dict[str, datetime], what: str, flag: str) -> str:
    newest = max(found.values())
    tied = sorted(k for k, t in found.items() if t == newest)
    if len(tied) > 1:
        raise CissError(f"{len(tied)} {what} are equally recent ({', '.join(tied)}); choose one with {flag}")
    return tied[0]


def latest_run(runs: Path = RUNS, log: Callable[[str], None] | None = None) -> Path:
    """The run under `runs` whose last step finished most recently."""
    found = {}
    if runs.is_dir():
        for p in runs.iterdir():
            if p.is_dir() and (finished := _run_finished(p)) is not None:
                found[str(p)] = finished
    if not found:
        raise CissError(f"no run with a finished step in {runs}/; start one with "
                        "`ciss learn --data PATH --classes A,B` or give --run RUN")
    chosen = Path(_newest(found, f"runs in {runs}/", "--run RUN"))
    if log:
        log(f"run: {chosen} (the most recent in {runs}/; --run RUN chooses another)")
    return chosen


def latest_model(repo: Path = MODELS, log: Callable[[str], None] | None = None) -> str:
    """The name in the model repository `repo` whose newest version was published most recently."""
    from ciss.repository import ModelRepository

    repository = ModelRepository(repo)
    found = {}
    for name in repository.names():
        if (created := _parse(repository.manifest(name).created)) is not None:
            found[name] = created
    if not found:
        raise CissError(f"no published model in {repo}/; publish one with `ciss export` "
                        "or give --repo DIR --name NAME")
    chosen = _newest(found, f"models in {repo}/", "--name NAME")
    if log:
        log(f"model: {chosen} in {repo}/ (the most recently published; --name NAME chooses another)")
    return chosen

"""`ciss learn` as a library call: turn class lists or a protocol into step plans and run them.

The run remembers its data, model, method and config file in each step's manifest, so adding classes
later needs only the new class names. Training flags (`--epochs`, `--lr`, `--set train.*`) apply to
the call that gives them; each later step prints what it carried over.
"""

from __future__ import annotations

import copy
import csv
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ciss.classmap import ClassMap
from ciss.config import toml_text
from ciss.errors import CissError
from ciss.manifest import StepManifest, run_steps
from ciss.trainer.config import CARRIED, DEFAULT_METHOD, TRAINING, check_resolved, resolve_model, split_per_call
from ciss.trainer.data import open_dataset
from ciss.trainer.data.base import DatasetInfo
from ciss.trainer.data.tasks import load_protocol
from ciss.trainer.distributed import Dist, setup, teardown, world_size
from ciss.trainer.methods import build_method, method_options
from ciss.trainer.methods.base import Method
from ciss.trainer.report import write_reports
from ciss.trainer.step import CHECKPOINT, StepPlan, train_step
from ciss.trainer.store import RunStore


def dataset_overrides(data: Path | None, dataset: str | None, root: Path | None) -> dict[str, Any]:
    if data is not None and (dataset or root):
        raise CissError("give either --data PATH (folder format) or --dataset NAME --root PATH, not both")
    if data is not None:
        return {"kind": "folder", "root": str(Path(data).resolve())}
    if dataset:
        if dataset != "synthetic" and root is None:
            raise CissError(f"--dataset {dataset} needs --root PATH (the folder holding it)")
        return {"kind": dataset, "root": str(Path(root).resolve()) if root else ""}
    return {}


def _check_names(names: Sequence[str], info: DatasetInfo, flag: str) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise CissError(f"{flag} is empty; give class names separated by commas")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CissError(f"{flag} names {', '.join(dup)} more than once")
    unknown = [n for n in names if n not in info.learnable]
    if unknown:
        raise CissError(f"unknown class {', '.join(repr(u) for u in unknown)} in {flag}; "
                        f"{info.name} has: {', '.join(info.learnable)}")
    return names


def _colors(info: DatasetInfo, names: Sequence[str]) -> list[tuple[int, int, int]]:
    return [info.colors[info.class_names.index(n)] for n in names]


def plan_steps(store: RunStore, info: DatasetInfo, classes: Sequence[str] | None,
               new_classes: Sequence[str] | None, task: str | None, joint: bool) -> list[StepPlan]:
    """The steps still to train, in order (steps a protocol run already has are skipped)."""
    given = [f for f, v in (("--classes", classes), ("--new-classes", new_classes), ("--task", task)) if v]
    if len(given) > 1:
        raise CissError(f"{' and '.join(given)} cannot be combined; give one of them")
    existing = store.steps()
    native = {n: i for i, n in enumerate(info.class_names)}
    old_names: list[str] | None = None  # a joint protocol run keeps the protocol's old/new split
    if task:
        steps = load_protocol(task, info).steps
        if joint:
            old_names = list(steps[0])
            steps = [[n for s in steps for n in s]]
    elif new_classes:
        if not existing:
            raise CissError(f"run {store.root} has no steps yet; start it with --classes or --task")
        names = _check_names(new_classes, info, "--new-classes")
        cmap = store.classmap(existing[-1])
        have = [n for n in names if n in cmap.names]
        if have:
            raise CissError(f"run {store.root} already has class {', '.join(have)}; "
                            "--new-classes takes classes the run has not learned")
        cmap.extend(names)  # validates before anything runs
        return [StepPlan(existing[-1] + 1, cmap.extend(names, _colors(info, names)), [native[n] for n in names], [])]
    else:
        if existing:
            raise CissError(f"run {store.root} already has steps {existing}; add classes with --new-classes")
        steps = [_check_names(classes, info, "--classes") if classes else info.learnable]

    plans: list[StepPlan] = []
    cmap: ClassMap | None = None
    for k, names in enumerate(steps):
        cmap = ClassMap.initial(names, _colors(info, names)) if cmap is None else cmap.extend(names, _colors(info, names), k)
        if k in existing:
            if store.classmap(k) != cmap:
                raise CissError(f"step {k} of run {store.root} learned other classes than {task} step {k}; "
                                "use a new --run for this protocol")
            continue
        future = [native[n] for s in steps[k + 1:] for n in s]
        plans.append(StepPlan(k, cmap, [native[n] for n in names], future, old_names))
    if task and not plans:
        raise CissError(f"run {store.root} already has every step of {task}")
    return plans


def history(store: RunStore) -> list[dict[str, Any]]:
    """The rows of the run's reports, one per finished step."""
    return [{"step": m.step, "classes_added": m.added, "method": m.method, "classes": m.classes.to_json(),
             "metrics": m.metrics} for m in run_steps(store.root)]


def carried_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A step's config as its run carries it to the next step: the step's own per-call flags undone."""
    cfg = copy.deepcopy(dict(config))
    for key, value in cfg.pop(CARRIED, {}).items():
        *sections, leaf = key.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[leaf] = value
    return cfg


def describe_carried(store: RunStore, step: int, cfg: Mapping[str, Any], method: Mapping[str, Any],
                     file_cfg: Mapping[str, Any] | None = None, source: str = "",
                     flags: Mapping[str, Any] | None = None) -> str:
    """One line: what the run brings from `step` to this call (the settings that differ from the defaults),
    and what a config file and then the command line (`flags`, flat keys) given to this call replace of
    them; a key both set is the command line's, which wins."""
    defaults, carried, flags = TRAINING.flatten(TRAINING.defaults()), TRAINING.flatten(cfg), flags or {}
    typed = {k: v for k, v in flags.items() if carried.get(k) != v}
    replaced = {k: v for k, v in TRAINING.flatten(file_cfg or {}).items() if carried.get(k) != v and k not in flags}
    items = [f"{k}={toml_text(v)}" for k, v in carried.items()
             if defaults.get(k) != v and k not in replaced and k not in typed]
    options = ", ".join(f"{k}={toml_text(v)}" for k, v in method.get("options", {}).items())
    items.append(f"method={method['name']}" + (f" ({options})" if options else ""))
    line = f"carried over from step {step} of {store.root}: {', '.join(items)}"
    for origin, values in ((source, replaced), ("the command line", typed)):
        if values:
            line += f"; from {origin}: " + ", ".join(f"{k}={toml_text(v)}" for k, v in values.items())
    return line


def _reported_steps(run: Path) -> list[int]:
    try:
        rows = list(csv.reader((run / "results.csv").read_text().splitlines()))
    except FileNotFoundError:
        return []
    return [int(r[0]) for r in rows[1:] if r and r[0].isdigit()]


def finish_interrupted(store: RunStore, log: Callable[[str], None]) -> None:
    """Finish the bookkeeping a killed `learn` left undone after committing a step (stale folders,
    the run's reports), saying what was done."""
    removed = store.remove_stale()
    if removed:
        log(f"run {store.root}: removed {', '.join(removed)} left by an interrupted run")
    steps = store.steps()
    if steps and (_reported_steps(store.root) != steps
                  or not all((store.root / n).exists() for n in ("results.md", "forgetting.png"))):
        write_reports(store.root, history(store))
        log(f"run {store.root}: wrote the reports (results.csv, results.md, forgetting.png) an interrupted "
            f"run left out for step {steps[-1]}")


def committed_already(store: RunStore, classes: Sequence[str] | None, new_classes: Sequence[str] | None) -> int | None:
    """The run's last step when it is the step these flags ask for: a --resume of it has nothing left
    to do (the process was killed after the commit). Decided from committed steps alone, so every
    torchrun process decides alike."""
    last = store.last_step()
    asked = new_classes or (classes if last == 0 else None)
    if last is None or not asked:
        return None
    return last if [n.strip() for n in asked] == store.manifest(last).added else None


def _check_activation(method: Method, parent: StepManifest) -> None:
    """Refuse to train a sigmoid step on a softmax model or the other way round: the old model's
    scores (pseudo-labels, distillation) would be read as what they are not."""
    given = parent.config.get("method", {}).get("options", {})
    before = given.get("activation") or method_options(parent.method).get("activation", "softmax")
    if before == method.activation:
        return
    fix = f"--opt {method.name}.activation={before}" if "activation" in method.options else \
        f"a method with the option 'activation' and --opt <method>.activation={before}"
    raise CissError(f"step {parent.step} was trained as a {before} head and method '{method.name}' trains a "
                    f"{method.activation} one; continue with {fix}, or start a new run")


def learn(run: Path, *, data: Path | None = None, dataset: str | None = None, root: Path | None = None,
          classes: Sequence[str] | None = None, new_classes: Sequence[str] | None = None,
          task: str | None = None, method: str | None = None, method_options: dict[str, Any] | None = None,
          config_file: Path | Mapping[str, Any] | None = None,
          overrides: dict[str, Any] | None = None, device: str = "auto", resume: bool = False,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train the requested steps into `run`; returns the manifests of the steps trained.

    `config_file` (a TOML file, or its contents as a dict) and the `data`, `model` and `seed` parts of
    `overrides` become the run's settings, carried to its later steps; the `train` and `eval` parts of
    `overrides` are this call's flags and apply to this call only.
    """
    store = RunStore(run)
    if os.environ.get("RANK", "0") == "0":
        finish_interrupted(store, log)
    finished = committed_already(store, classes, new_classes) if resume else None
    if finished is not None:
        log(f"step {finished} of {store.root} is already committed; nothing to resume")
        return []
    last = store.last_step()
    stored = carried_config(store.manifest(last).config) if last is not None else {}
    base_method = stored.pop("method", None) or {"name": DEFAULT_METHOD, "options": {}}
    # Keys added to the defaults since the run began take their default values.
    base = TRAINING.merge(TRAINING.defaults(), stored)
    file_cfg, source = TRAINING.load(config_file)
    file_method = file_cfg.pop("method", {})
    carried, per_call = split_per_call(overrides or {})
    data_cli = dataset_overrides(data, dataset, root)
    if data_cli:
        carried.setdefault("data", {}).update(data_cli)
    if last is not None:
        typed = {**TRAINING.flatten(carried), **TRAINING.flatten(per_call)}
        log(describe_carried(store, last, base, base_method, file_cfg, source, typed))
    run_cfg = resolve_model(TRAINING.resolve(file_cfg, carried, under=stored))
    cfg = TRAINING.merge(run_cfg, per_call)
    check_resolved(cfg, world_size())  # before a dataset is opened or a file written
    # The values this call's flags replaced; the next step starts from them, not from the flags.
    flags = TRAINING.flatten(per_call)
    cfg[CARRIED] = {k: v for k, v in TRAINING.flatten(run_cfg).items() if k in flags}
    # The method: flag > config file > the run's; its options carry over only while it is unchanged.
    name = method or file_method.get("name") or base_method["name"]
    options = dict(base_method.get("options", {})) if name == base_method["name"] else {}
    options.update(file_method.get("options", {}))
    for key, value in (method_options or {}).items():
        prefix, _, option = key.rpartition(".")
        if prefix.split(".")[0] in base:
            raise CissError(f"'{key}' is a setting, not a method option; set it with "
                            f"--set {key}={toml_text(value)}")
        if prefix and prefix != name:
            raise CissError(f"option '{key}' belongs to method '{prefix}', but this step uses '{name}'")
        options[option] = value
    cfg["method"] = {"name": name, "options": options}
    built = build_method(name, options)  # unknown methods and options fail before anything runs
    if last is not None:
        _check_activation(built, store.manifest(last))
    if built.needs_seen_labels and cfg["data"]["labels"] != "seen":
        raise CissError(f"method '{name}' with these options gates the old classes' true labels, which "
                        "data.labels = \"step\" does not load; add --set data.labels=seen")
    if cfg["data"]["labels"] == "seen" and built.uses_old_model and not built.needs_seen_labels:
        gate = f" (or --opt {name}.old_labels=agreed, a reference)" if "old_labels" in built.options else ""
        raise CissError(f"data.labels = \"seen\" labels the old classes, but method '{name}' reads every old-class "
                        "label as background (it is built for data without them), so they would be lost; "
                        f"use it with --method ft{gate}")

    d = cfg["data"]
    info = open_dataset(d["kind"] or None, Path(d["root"]) if d["root"] else None, d["train_split"], **d["options"]).info
    plans = plan_steps(store, info, classes, new_classes, task, joint=cfg["method"]["name"] == "joint")
    if resume and plans and not (store.partial_dir(plans[0].step) / CHECKPOINT).is_file():
        # Training from scratch here would hide a mistyped --run behind a new run.
        raise CissError(f"--resume found no checkpoint of step {plans[0].step} in {store.root} (it stopped before "
                        "its first checkpoint, or --run names another run); drop --resume to start the step, "
                        "or give the right --run")

    dist: Dist = setup(device)
    done = []
    root_existed = store.root.exists()
    try:
        for plan in plans:
            partial = store.partial_dir(plan.step)
            had_partial = partial.exists()
            try:
                done.append(train_step(store, plan, cfg, dist, resume=resume,
                                       log=log if dist.main else lambda _: None))
            except CissError:
                if dist.main and not had_partial:  # a user error leaves the run folder as it was
                    shutil.rmtree(partial, ignore_errors=True)
                    if not root_existed and store.root.exists() and not any(store.root.iterdir()):
                        store.root.rmdir()
                raise
            if dist.main:
                write_reports(store.root, history(store))
        # Leave the group together: a process that destroys its gloo group while another still writes
        # the reports can abort at exit ("terminate called without an active exception").
        dist.barrier()
    finally:
        teardown()
    return done

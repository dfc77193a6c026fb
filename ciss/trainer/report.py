"""Evaluating a stored step on demand, and the one-screen summary of a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ciss.classmap import ClassMap, unlearned_warning
from ciss.manifest import run_steps
from ciss.trainer.distributed import Dist, pick_device
from ciss.trainer.data import open_dataset
from ciss.trainer.evaluate import evaluate
from ciss.trainer.log import bar
from ciss.trainer.step import eval_loader
from ciss.trainer.store import RunStore


def evaluate_step(run: Path, step: int | None = None, data: Path | None = None, split: str | None = None,
                  protocol: str | None = None, device: str = "auto") -> dict[str, Any]:
    store = RunStore(run)
    step = store.last_step() if step is None else step
    if step is None:
        from ciss.errors import CissError
        raise CissError(f"{run} has no steps; train one with `ciss learn --run {run}`")
    model, manifest = store.load(step)
    d = manifest.config["data"]
    kind, root = ("folder", Path(data)) if data else (d["kind"] or None, Path(d["root"]) if d["root"] else None)
    split = split or d["eval_split"]
    protocol = protocol or d["eval_protocol"]
    ds = open_dataset(kind, root, split, **({} if data else d["options"]))
    classmap = manifest.classes
    dev = pick_device(device)
    loader = eval_loader(ds, classmap, protocol, int(manifest.config["eval"]["batch_size"]), Dist(device=dev), 0,
                         manifest.normalisation)
    metrics = evaluate(model.to(dev).eval(), loader, classmap, dev, old_names=manifest.old_names,
                       progress=bar(len(loader), f"evaluating step {step}", unit="batch"))
    metrics.update(split=split, protocol=protocol, step=step)
    return metrics


def pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * float(v):.1f}"


def metrics_table(metrics: dict[str, Any], classmap: ClassMap) -> str:
    """Per-class IoU and the old/new/all means as aligned text."""
    width = max(len(n) for n in classmap.names) + 2
    rows = [f"{'class':<{width}}{'step':>5}{'IoU':>8}"]
    per = metrics.get("per_class", {})
    for c in classmap:
        rows.append(f"{c.name:<{width}}{c.step:>5}{pct(per.get(c.name)):>8}")
    rows.append(f"mIoU old {pct(metrics.get('miou_old'))}  new {pct(metrics.get('miou_new'))}  "
                f"all {pct(metrics.get('miou_all'))}")
    if metrics.get("excluded"):
        rows.append(f"no ground truth (excluded): {', '.join(metrics['excluded'])}")
    return "\n".join(rows)


def method_label(method: str, step: int) -> str:
    """What trained a step: every method learns step 0 with plain cross-entropy (there is no old model
    to distil from), so a step 0 says `ce`, not the run's method; `joint` keeps its name, the bound it is."""
    return "ce" if step == 0 and method != "joint" else method


def describe_run(run: Path) -> str:
    store = RunStore(run)
    lines = [f"run {store.root}"]
    for m in run_steps(store.root):
        me = m.metrics
        lines.append(f"  step {m.step}: +{', '.join(m.added)}  [{method_label(m.method, m.step)}, {m.preset}]  "
                     f"mIoU old {pct(me.get('miou_old'))} new {pct(me.get('miou_new'))} all {pct(me.get('miou_all'))}"
                     f"  ({m.wall_s:.0f}s)")
        warning = unlearned_warning(m.classes, me)
        if warning:
            lines.append(f"    {warning}")
    if len(lines) == 1:
        lines.append("  (no steps)")
    return "\n".join(lines)

"""What a run reports: its result files (results.csv, results.md, forgetting.png), a stored step
evaluated on demand, and the one-screen summary of a run."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from ciss.classmap import BACKGROUND, ClassMap, unlearned_warning
from ciss.manifest import run_steps, write_bytes_atomic
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


def _report_classmap(history: Sequence[dict[str, Any]], classmap: ClassMap | None) -> ClassMap:
    if classmap is not None:
        return classmap
    for entry in reversed(history):
        if entry.get("classes"):
            return ClassMap.from_json(entry["classes"])
    names: list[str] = []
    cmap: ClassMap | None = None  # rebuilt from the classes each step added (default colours)
    for entry in sorted(history, key=lambda e: e["step"]):
        added = [a for a in entry.get("classes_added", []) if a not in names and a != BACKGROUND]
        if added:
            cmap = ClassMap.initial(added) if cmap is None else cmap.extend(added, step=int(entry["step"]))
            names += added
    if cmap is None:
        raise ValueError("history names no class")
    return cmap


def _iou_table(history: Sequence[dict[str, Any]], cmap: ClassMap) -> tuple[list[str], list[list[float | None]]]:
    """Rows (one per step, sorted) of [step, miou_old, miou_new, miou_all, IoU per class]."""
    header = ["step", "miou_old", "miou_new", "miou_all"] + cmap.names
    rows: list[list[float | None]] = []
    for entry in sorted(history, key=lambda e: e["step"]):
        m = entry.get("metrics", {}) or {}
        per_class = m.get("per_class", {}) or {}
        row: list[float | None] = [int(entry["step"])]
        row += [m.get(k) for k in ("miou_old", "miou_new", "miou_all")]
        row += [per_class.get(name) for name in cmap.names]
        rows.append(row)
    return header, rows


def _fmt(v: float | None, scale: float = 1.0, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    return f"{v * scale:.{digits}f}"


def write_reports(run_dir: Path, history: list[dict[str, Any]], classmap: ClassMap | None = None) -> dict[str, Path]:
    """Write results.csv, results.md and forgetting.png (ciss.trainer.plots) into `run_dir` (each atomically).

    `history` has one entry per step: {"step", "classes_added", "metrics"} (+ optional "classes",
    the step's class map as JSON, used for class order and colours when `classmap` is not given).
    CSV values are IoUs in [0, 1] (4 decimals); the Markdown table shows percentages. A class not yet
    learned, or without ground truth at that step, has an empty cell.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmap = _report_classmap(history, classmap)
    header, rows = _iou_table(history, cmap)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([str(row[0])] + [_fmt(v) for v in row[1:]])
    paths = {"csv": run_dir / "results.csv", "md": run_dir / "results.md", "png": run_dir / "forgetting.png"}
    write_bytes_atomic(paths["csv"], buf.getvalue().encode())

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    added = {int(e["step"]): e.get("classes_added", []) for e in history}
    md = ["# Results", "", "IoU in % per step; empty = class not learned yet or absent from the evaluation split.", "",
          "| " + " | ".join(["step", "added", "mIoU old", "mIoU new", "mIoU all"] + [cell(n) for n in cmap.names]) + " |",
          "|---:|:---|" + "---:|" * (3 + len(cmap))]
    for row in rows:
        step = int(row[0])  # type: ignore[arg-type]
        md.append("| " + " | ".join([str(step), cell(", ".join(added.get(step, [])))]
                                    + [_fmt(v, 100, 1) for v in row[1:]]) + " |")
    write_bytes_atomic(paths["md"], ("\n".join(md) + "\n").encode())

    from ciss.trainer.plots import forgetting_png  # matplotlib: imported only when a report is drawn

    write_bytes_atomic(paths["png"], forgetting_png(rows, cmap))
    return paths

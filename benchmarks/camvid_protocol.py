"""Run a CISS protocol on a folder-format dataset: several methods, the joint bound, ablations.

Step 0 is trained once per seed and shared (every softmax method trains step 0 the same way: plain
cross-entropy; `--base 'idec:--opt idec.activation=sigmoid'` trains it as a sigmoid head instead,
for the methods run with that option), then each method, or each ablated variant of one (`--ablate
gsc` adds one run per component of GSC with that component off), trains the remaining steps from a
copy of it. Runs are independent processes, `--jobs` of them at a time, each with its share of the
CPU threads. A run whose folder already holds the protocol's last step is read, not retrained, so an
interrupted invocation picks up where it stopped and later invocations into the same --out add
methods or seeds; `--tables-only` writes the tables of what has finished so far. A run that failed
(it diverged) is listed in failed.json and stays a result: it is trained again only with
`--retry-failed`. `--reuse DIR` copies the joint run of each seed, and with the default --base step
0 too, from another --out of the same dataset and base classes (6-5 and 6-1 share both).

Written to --out: results.md (old/new/all mIoU after the last step, mean ± sample std over seeds;
new mIoU also over only the classes the joint bound learns; each method against the best and GSC/IDEC
against every baseline, a difference under two standard deviations called a tie; the reference row
"mib-init" (the step-0 model grown by MiB's initialisation alone, no training, new biases +1e-3);
the median logit margin new - background on each new class's pixels; each new class's IoU right
after its step and after the last; the share of each old class's pixels predicted as a new class,
from the last step's confusion.csv; per-class IoU; wall time; the ablation table), results.json, the
exact commands, the config, and for the first seed each run's per-step table (steps-<run>.csv) and
forgetting plot (forgetting-<run>.png).

    python benchmarks/camvid_protocol.py --data ../shared/data/camvid --task camvid:6-1 \
        --methods ft,mib,plop,gsc,idec --joint --ablate gsc,idec \
        --config benchmarks/configs/camvid_mobile.toml --seeds 0,1 --jobs 2 --out docs/results/camvid/6-1
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cil_probe import mib_init_reference, new_class_margins
from ciss.manifest import run_steps
from ciss.trainer.data import open_dataset
from ciss.trainer.data.tasks import load_protocol
from ciss.trainer.evaluate import read_confusion_csv
from ciss.trainer.store import RunStore

# The switchable components of each method (`ciss learn --no METHOD.COMPONENT`), in table order.
COMPONENTS = {
    "gsc": ("compensation", "soft", "sharp", "relation", "pseudo", "pod"),
    "idec": ("pseudo", "feature_kd", "logit_kd", "contrast"),
}
ORDER = ("mib-init", "ft", "mib", "plop", "gsc", "idec", "joint")
BASELINES, PROPOSED = ("ft", "mib", "plop"), ("gsc", "idec")
REFERENCE = "mib-init"
LEARNABLE_IOU = 0.10  # a new class counts as learnable when the joint bound's mean IoU on it exceeds this


@dataclass
class Variant:
    name: str                 # run folder and table row
    method: str
    args: list[str] = field(default_factory=list)  # extra `ciss learn` flags (the switched-off component)


def variants(methods: list[str], joint: bool, ablate: list[str]) -> list[Variant]:
    out = [Variant(m, m) for m in methods]
    for entry in ablate:
        m, _, only = entry.partition(".")
        if m not in COMPONENTS:
            sys.exit(f"--ablate: no components listed for method '{m}'; choose from {', '.join(COMPONENTS)}")
        if only and only not in COMPONENTS[m]:
            sys.exit(f"--ablate: '{only}' is not a component of {m}; choose from {', '.join(COMPONENTS[m])}")
        if m not in methods and Variant(m, m) not in out:
            out.append(Variant(m, m))
        out += [Variant(f"{m}-no-{c}", m, ["--no", f"{m}.{c}"]) for c in COMPONENTS[m] if not only or c == only]
    return out + ([Variant("joint", "joint")] if joint else [])


def last_metrics(run_dir: Path, n_steps: int) -> dict | None:
    """The metrics of the protocol's last step, or None while the run is incomplete."""
    last = [m for m in run_steps(run_dir) if m.step == n_steps - 1]
    return last[0].metrics if last else None


def training_labels(run_dir: Path) -> str:
    """What the run's last step trained on: "step" (class-incremental), or a reference's labels: "seen"
    (the old classes labelled too) or "agreed" (those old labels kept where the old model calls them)."""
    config = run_steps(run_dir)[-1].config
    labels = config.get("data", {}).get("labels", "step")
    gated = config.get("method", {}).get("options", {}).get("old_labels") == "agreed"
    return "agreed" if labels == "seen" and gated else labels


def at_own_step(run_dir: Path, steps: list[list[str]]) -> dict[str, float]:
    """Each new class's IoU right after the step that added it: what the step learned, before later
    steps could erode it. The joint run's one step added them all."""
    by_step = {m.step: m.metrics["per_class"] for m in run_steps(run_dir)}
    added = {c: s for s, names in enumerate(steps[1:], start=1) for c in names}
    if len(by_step) == 1:  # the joint bound
        added = {c: 0 for c in added}
    return {c: by_step[s][c] for c, s in added.items() if c in by_step.get(s, {})}


def old_pixels_taken(run_dir: Path, old: list[str], new: list[str]) -> dict[str, dict[str, float]] | None:
    """For each old class, the share of its test pixels that the last step predicts as each new class
    (its confusion.csv): how far the new classes spread over the old ones. None for a run written
    before step folders kept confusion.csv."""
    store = RunStore(run_dir)
    last = store.last_step()
    path = store.step_dir(last) / "confusion.csv" if last is not None else None
    if path is None or not path.exists():
        return None
    names, counts = read_confusion_csv(path)
    out = {}
    for c in old:
        row = counts[names.index(c)]
        if row.sum() > 0:
            out[c] = {n: float(row[names.index(n)] / row.sum()) for n in new if n in names}
    return out


def summarise(per_class: dict[str, float], old: list[str], new: list[str]) -> dict[str, float | None]:
    def mean(names: list[str]) -> float | None:
        vals = [per_class[n] for n in names if n in per_class]
        return sum(vals) / len(vals) if vals else None
    return {"old": mean(old), "new": mean(new), "all": mean(old + new)}


def stats(results: dict[str, list[dict]], name: str, key: str) -> tuple[float, float]:
    """Mean and sample std (0 for one seed) of a metric over a run's seeds."""
    vals = [r[key] for r in results[name] if r.get(key) is not None]
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def compare(results: dict[str, list[dict]], a: str, b: str) -> str:
    """a against b on all-mIoU: the mean difference, called a tie under two standard deviations."""
    (ma, sa), (mb, sb) = stats(results, a, "all"), stats(results, b, "all")
    diff, band = ma - mb, 2 * max(sa, sb)
    if min(len(results[a]), len(results[b])) < 2:
        return f"{100 * diff:+.1f} (one seed: no verdict)"
    word = "tie" if abs(diff) <= band else ("ahead" if diff > 0 else "behind")
    return f"{100 * diff:+.1f}, {word} (2σ = {100 * band:.1f})"


def verdict_pairs(results: dict[str, list[dict]], main_rows: list[str], ablated: list[str],
                  labelled: set[str]) -> list[tuple[str, str]]:
    """(proposed, baseline) rows to compare. A baseline's variant (mib-clip3: MiB with its gradients
    clipped) is a baseline too, but not a run given the old classes' labels (`labelled`, a reference,
    whichever method trained it); an ablated variant run over several seeds is a candidate (is GSC
    better without a part?) unless it is itself given the old labels."""
    baselines = [b for b in main_rows if b.split("-")[0] in BASELINES and b != REFERENCE and b not in labelled]
    candidates = [n for n in main_rows if n not in labelled] + [
        n for n in ablated if len(results[n]) > 1 and n not in labelled]
    return [(p, b) for p in candidates if p.split("-")[0] in PROPOSED for b in baselines]


def given_labels(results: dict[str, list[dict]], kind: str) -> list[str]:
    """Runs trained with the old classes' labels of `kind` (`training_labels`: "seen" or "agreed"):
    references, like the joint bound, not class-incremental methods."""
    return sorted(n for n, rows in results.items() if any(r.get("labels") == kind for r in rows))


def learnable_classes(results: dict[str, list[dict]], new: list[str]) -> list[str]:
    """New classes the joint bound learns (mean IoU over seeds above LEARNABLE_IOU)."""
    if "joint" not in results:
        return []
    out = []
    for c in new:
        vals = [r["per_class"].get(c) for r in results["joint"] if r["per_class"].get(c) is not None]
        if vals and statistics.mean(vals) > LEARNABLE_IOU:
            out.append(c)
    return out


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


class Runner:
    """Starts `ciss` processes with a fixed thread share and records their command lines."""

    def __init__(self, jobs: int, commands: list[str]):
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.commands = commands
        self._lock = threading.Lock()

    def __call__(self, args: list[str]) -> float:
        shown = "ciss " + " ".join(shlex.quote(a) for a in args)
        with self._lock:
            self.commands.append(shown)
        print(f"$ {shown}", file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ciss.apps.cli", *args], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--methods", default="ft,mib,plop")
    ap.add_argument("--joint", action="store_true", help="also train the joint upper bound")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:FLAGS",
                    help="an extra row: METHOD with extra `ciss learn` flags, e.g. "
                         "'gsc-clip3=gsc:--set train.clip_grad_norm=3' (repeatable)")
    ap.add_argument("--ablate", default="",
                    help="methods whose components to switch off one at a time (gsc), or single components (gsc.pod)")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    ap.add_argument("--base", default="ft", metavar="METHOD[:FLAGS]",
                    help="how step 0 is trained: 'ft' (plain cross-entropy, the default) or a method with "
                         "`ciss learn` flags, e.g. 'idec:--opt idec.activation=sigmoid'")
    ap.add_argument("--reuse", type=Path, help="another --out whose step-0 (with the default --base) and joint "
                                               "runs to copy")
    ap.add_argument("--retry-failed", action="store_true",
                    help="train again the runs failed.json lists (by default a run that failed stays a result)")
    ap.add_argument("--tables-only", action="store_true",
                    help="write the tables from the runs that have finished and train nothing: a snapshot while "
                         "another invocation into the same --out is still training")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    info = open_dataset("folder", args.data, "train").info
    steps = load_protocol(args.task, info).steps
    old, new = steps[0], [n for s in steps[1:] for n in s]
    todo = variants([m for m in args.methods.split(",") if m], args.joint, [m for m in args.ablate.split(",") if m])
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        method, _, flags = rest.partition(":")
        todo.append(Variant(name, method, shlex.split(flags)))
    failed_file = args.out / "failed.json"
    failed: dict[str, str] = json.loads(failed_file.read_text()) if failed_file.exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config, args.out / "config.toml")
    results_file, commands_file = args.out / "results.json", args.out / "commands.txt"
    results: dict[str, list[dict]] = json.loads(results_file.read_text()) if results_file.exists() else {}
    commands = commands_file.read_text().splitlines() if commands_file.exists() else []
    run = Runner(args.jobs, commands)
    common = ["--data", str(args.data), "--config", str(args.config)]
    lock = threading.Lock()

    def record(v: Variant, seed: int, target: Path, wall: float | None) -> None:
        metrics = last_metrics(target, 1 if v.method == "joint" else len(steps))
        assert metrics is not None, target
        with lock:
            earlier = next((r for r in results.get(v.name, []) if r["seed"] == seed), {})
        # A run read back from an earlier invocation keeps its wall time and margins (an eval pass each).
        margins = earlier.get("margins") if wall is None else None
        row = {"seed": seed, **summarise(metrics["per_class"], old, new), "per_class": metrics["per_class"],
               "margins": margins or new_class_margins(target, new), "at_step": at_own_step(target, steps),
               "labels": training_labels(target), "taken": old_pixels_taken(target, old, new),
               "wall_s": earlier.get("wall_s") if wall is None else round(wall, 1)}
        with lock:
            rows = [r for r in results.get(v.name, []) if r["seed"] != seed]
            results[v.name] = sorted(rows + [row], key=lambda r: r["seed"])
            results_file.write_text(json.dumps(results, indent=2) + "\n")
            commands_file.write_text("\n".join(commands) + "\n")
            if seed == seeds[0]:
                shutil.copy(target / "results.csv", args.out / f"steps-{v.name}.csv")
                shutil.copy(target / "forgetting.png", args.out / f"forgetting-{v.name}.png")

    def train_base(seed: int) -> Path:
        base = args.out / "runs" / f"seed{seed}" / "base"
        source = args.reuse / "runs" / f"seed{seed}" / "base" if args.reuse and args.base == "ft" else None
        if not (base / "step-0").exists() and not args.tables_only:
            if source is not None and (source / "step-0").exists():
                shutil.copytree(source, base, dirs_exist_ok=True)
            else:
                method, _, flags = args.base.partition(":")
                run(["learn", "--run", str(base), "--classes", ",".join(old), "--method", method, *shlex.split(flags),
                     "--seed", str(seed), *common])
        return base

    def train(v: Variant, seed: int, base: Future) -> None:
        target = args.out / "runs" / f"seed{seed}" / v.name
        n_steps = 1 if v.method == "joint" else len(steps)
        key = f"{v.name} seed {seed}"
        if last_metrics(target, n_steps) is not None:
            record(v, seed, target, None)
            return
        if key in failed and not args.retry_failed:
            return
        if v.method == "joint":
            source = args.reuse / "runs" / f"seed{seed}" / "joint" if args.reuse else None
            if source is not None and last_metrics(source, 1) is not None:
                shutil.copytree(source, target, dirs_exist_ok=True)
                record(v, seed, target, None)
                return
        if args.tables_only:
            return
        if v.method != "joint" and not target.exists():
            shutil.copytree(base.result(), target)
        try:
            wall = run(["learn", "--run", str(target), "--task", args.task, "--method", v.method, *v.args,
                        "--seed", str(seed), *common])
        except subprocess.CalledProcessError as e:  # a run that diverges is a result too, not a crash
            with lock:
                failed[key] = f"`ciss learn` exited {e.returncode} (its error line is in the log)"
                failed_file.write_text(json.dumps(failed, indent=2) + "\n")
            return
        with lock:
            if failed.pop(key, None) is not None:
                failed_file.write_text(json.dumps(failed, indent=2) + "\n")
        record(v, seed, target, wall)

    def reference(seed: int, base: Future) -> None:
        if not (base.result() / "step-0").exists():  # --tables-only before step 0 has finished
            return
        metrics = mib_init_reference(base.result(), steps)
        row = {"seed": seed, **summarise(metrics["per_class"], old, new), "per_class": metrics["per_class"],
               "wall_s": 0.0}
        with lock:
            results[REFERENCE] = sorted([r for r in results.get(REFERENCE, []) if r["seed"] != seed] + [row],
                                        key=lambda r: r["seed"])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool, ThreadPoolExecutor(max_workers=args.jobs) as bases:
        base_of = {s: bases.submit(train_base, s) for s in seeds}
        futures = [pool.submit(train, v, s, base_of[s]) for v in todo for s in seeds]
        futures += [pool.submit(reference, s, base_of[s]) for s in seeds if len(steps) > 1]
        for f in futures:
            f.result()
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    commands_file.write_text("\n".join(commands) + "\n")  # also when no run finished: failed runs' lines too
    write_markdown(args, results, old, new, commands, failed)


def write_markdown(args: argparse.Namespace, results: dict[str, list[dict]], old: list[str], new: list[str],
                   commands: list[str], failed: dict[str, str]) -> None:
    ablated = ablation_runs(results)
    main_rows = sorted((n for n in results if n not in ablated), key=lambda n: ORDER.index(n) if n in ORDER else 99)
    seeds = sorted({r["seed"] for rows in results.values() for r in rows})
    learnable = learnable_classes(results, new)
    for rows in results.values():
        for r in rows:
            r["new_learnable"] = summarise(r["per_class"], [], learnable)["new"] if learnable else None
    seen, agreed = given_labels(results, "seen"), given_labels(results, "agreed")
    labelled = set(seen + agreed)
    trained = [n for n in main_rows if n != REFERENCE]
    best = max(trained, key=lambda n: stats(results, n, "all")[0]) if trained else None
    lines = [f"# {args.task} on {args.data.name}", "",
             f"mIoU (%) after the last step on the test split, mean ± sample std over seeds {seeds}; "
             f"old = step-0 classes ({', '.join(old)}), new = {', '.join(new)}; new* = only the new classes "
             f"the joint bound learns (IoU > {100 * LEARNABLE_IOU:.0f}: {', '.join(learnable) or 'none'}). "
             f"`{REFERENCE}`: the step-0 model grown by MiB's initialisation alone (no training, new biases "
             "+1e-3). vs best: the all-mIoU difference to the best method, a tie when under two standard "
             "deviations (the larger of the two)." + (
                 f" {', '.join(f'`{n}`' for n in seen)}: trained with every class learned so far "
                 "labelled on the step's images (`data.labels = \"seen\"`), not class-incremental: the labels "
                 "that perfect pseudo-labelling would give." if seen else "") + (
                 f" {', '.join(f'`{n}`' for n in agreed)}: trained with each old class's label kept only where "
                 "the old model's argmax gives that class (method option `old_labels = \"agreed\"`, `data.labels = "
                 "\"seen\"`), not class-incremental: the labels that a pseudo-label gate which never kept a "
                 "wrong call would give." if agreed else "") + (
                 f" Step 0 of the class-incremental rows: `--method {args.base.replace(':', ' ', 1)}`."
                 if args.base != "ft" else ""), "",
             "| method | seeds | old | new | new* | all | vs best (all) | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for n in main_rows:
        walls = [r["wall_s"] for r in results[n] if r.get("wall_s")]
        wall = f"{statistics.mean(walls):.0f}" if walls else "-"
        verdict = "best" if n == best else compare(results, n, best) if best and n != REFERENCE else ""
        cells = [mean_std(results, n, k) for k in ("old", "new", "new_learnable", "all")]
        lines.append(f"| {n} | {len(results[n])} | {' | '.join(cells)} | {verdict} | {wall} |")
    if failed:
        lines += ["", "Runs that did not finish (no row above):", ""]
        lines += [f"- {name}: {why}" for name, why in sorted(failed.items())]
    pairs = verdict_pairs(results, main_rows, ablated, labelled)
    if pairs:
        lines += ["", "GSC and IDEC (and their variants run over several seeds) against every baseline (all-mIoU, "
                  "mean difference; ahead or behind only beyond two standard deviations):", ""]
        lines += [f"- {p} vs {b}: {compare(results, p, b)}" for p, b in pairs]
    margin_rows = [n for n in main_rows if any(r.get("margins") for r in results[n])]
    if margin_rows:
        lines += ["", "Median logit margin (new class minus background) on each new class's test pixels, after "
                  "the last step, mean over seeds: > 0 means the class wins over background on its typical pixel.",
                  "", "| method | " + " | ".join(new) + " |", "|---|" + "---|" * len(new)]
        for n in margin_rows:
            cells = []
            for c in new:
                vals = [r["margins"][c] for r in results[n] if r.get("margins") and r["margins"].get(c) is not None]
                cells.append(f"{statistics.mean(vals):+.2f}" if vals else "-")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += plasticity_table(results, main_rows + ablated, learnable or new)
    lines += spillover_table(results, main_rows + ablated, old)
    first = seeds[0]
    lines += ["", f"Per-class IoU (%) after the last step, seed {first}:", "",
              "| method | " + " | ".join(old + new) + " |", "|---|" + "---|" * len(old + new)]
    for n in main_rows:
        pc = next((r["per_class"] for r in results[n] if r["seed"] == first), None)
        if pc is not None:
            lines.append(f"| {n} | " + " | ".join(pct(pc.get(c)) for c in old + new) + " |")
    lines += ablation_table(results, ablated)
    lines += ["", "Config: `config.toml` beside this file. Commands, in the order they were started:", "",
              "```"] + commands + ["```", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


def mean_std(results: dict[str, list[dict]], name: str, key: str) -> str:
    """A cell: the mean (%) over seeds, ± the sample std once there are two."""
    vals = [r[key] for r in results[name] if r[key] is not None]
    if len(vals) < 2:
        return pct(vals[0]) if vals else "-"
    return f"{pct(statistics.mean(vals))} ± {100 * statistics.stdev(vals):.1f}"


def ablation_runs(results: dict[str, list[dict]]) -> list[str]:
    """The `FULL-no-COMPONENT` runs whose FULL run is in the same results: they go to the ablation
    table; one without its full run is a variant of its own and takes a row of the main table."""
    return [n for n in results if "-no-" in n and n.rsplit("-no-", 1)[0] in results]


def ablation_table(results: dict[str, list[dict]], ablated: list[str]) -> list[str]:
    """Each `FULL-no-COMPONENT` run against the run named FULL, over the seeds both have: a method's
    ablation (`--ablate`) and that of any variant, such as a method under the best gate. Components in
    COMPONENTS' order where FULL names a method there, else by name; Δ all per seed, then averaged."""
    fulls = sorted({n.rsplit("-no-", 1)[0] for n in ablated})
    if not fulls:
        return []
    lines = ["", "Ablation: each component switched off alone (`--no METHOD.COMPONENT`); Δ all = change of "
             "all-mIoU against the full run over the same seeds.", "",
             "| run | seeds | old | new | all | Δ all |", "|---|---|---|---|---|---|"]
    for full in fulls:
        order = COMPONENTS.get(full.split("-")[0], ())
        parts = {n: n.rsplit("-no-", 1)[1] for n in ablated if n.rsplit("-no-", 1)[0] == full}
        cells = [mean_std(results, full, k) for k in ("old", "new", "all")]
        lines.append(f"| {full} (full) | {len(results[full])} | {' | '.join(cells)} | |")
        base = {r["seed"]: r["all"] for r in results[full]}
        for n in sorted(parts, key=lambda n: (order.index(parts[n]) if parts[n] in order else len(order), parts[n])):
            deltas = [r["all"] - base[r["seed"]] for r in results[n] if r["seed"] in base]
            delta = f"{100 * statistics.mean(deltas):+.1f}" if deltas else "-"
            cells = [mean_std(results, n, k) for k in ("old", "new", "all")]
            lines.append(f"| {n} | {len(results[n])} | {' | '.join(cells)} | {delta} |")
    return lines


def plasticity_table(results: dict[str, list[dict]], rows: list[str], classes: list[str]) -> list[str]:
    """New classes as learned (IoU right after the step that added each) and as kept (after the last
    step), mean over seeds: separates what a step fails to learn from what later steps erode."""
    rows = [n for n in rows if any(r.get("at_step") for r in results[n])]
    if not rows:
        return []

    def mean(n: str, c: str, key: str) -> float | None:  # key: "at_step" (learned) or "per_class" (kept)
        vals = [r[key].get(c) for r in results[n] if r.get("at_step")]
        vals = [v for v in vals if v is not None]
        return statistics.mean(vals) if vals else None

    def both(n: str, cs: list[str]) -> str:
        learned = [v for v in (mean(n, c, "at_step") for c in cs) if v is not None]
        kept = [v for v in (mean(n, c, "per_class") for c in cs) if v is not None]
        if not learned or not kept:
            return "-"
        return f"{pct(statistics.mean(learned))} → {pct(statistics.mean(kept))}"

    lines = ["", f"New classes as learned and as kept: IoU (%) right after the step that added each → after the "
             f"last step, mean over seeds ({', '.join(classes)}).", "",
             "| method | mean | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for n in rows:
        lines.append(f"| {n} | {both(n, classes)} | " + " | ".join(both(n, [c]) for c in classes) + " |")
    return lines


def spillover_table(results: dict[str, list[dict]], rows: list[str], old: list[str]) -> list[str]:
    """Old classes' test pixels predicted as a new class after the last step, mean over seeds: the
    share taken by all new classes together, and the new class that takes the most."""
    rows = [n for n in rows if any(r.get("taken") for r in results[n])]
    if not rows:
        return []

    def cell(n: str, c: str) -> str:
        shares = [r["taken"][c] for r in results[n] if r.get("taken") and c in r["taken"]]
        if not shares:
            return "-"
        by_new = {k: statistics.mean(s[k] for s in shares) for k in shares[0]}
        top = max(by_new, key=by_new.__getitem__)
        return f"{pct(sum(by_new.values()))} ({top} {pct(by_new[top])})"

    lines = ["", "Old classes lost to new ones: % of each old class's test pixels predicted as any new class "
             "after the last step (in brackets the new class taking the most), mean over seeds.", "",
             "| method | " + " | ".join(old) + " |", "|---|" + "---|" * len(old)]
    lines += [f"| {n} | " + " | ".join(cell(n, c) for c in old) + " |" for n in rows]
    return lines


if __name__ == "__main__":
    main()

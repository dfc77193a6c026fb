"""Run a CISS protocol on a folder-format dataset with several methods and the joint bound.

Step 0 is trained once per seed and shared (every method trains step 0 the same way: plain
cross-entropy), then each method trains the remaining steps from a copy of it. The table of
old/new/all mIoU after the last step, per-class IoU, each run's forgetting plot and the exact
commands are written to --out, with the config beside them.

    python benchmarks/camvid_protocol.py --data ../shared/data/camvid --task camvid:6-1 \
        --methods ft,mib,plop --joint --config benchmarks/configs/camvid_mobile.toml --seeds 0 \
        --out docs/results/camvid-6-1
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ciss.trainer.data import open_dataset
from ciss.trainer.data.tasks import load_protocol


def run(cmd: list[str], log: list[str]) -> float:
    line = " ".join(shlex.quote(c) for c in cmd)
    log.append(line)
    print(f"$ {line}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def last_metrics(run_dir: Path) -> dict:
    steps = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("step-*"))
    return json.loads((run_dir / f"step-{steps[-1]}" / "manifest.json").read_text())["metrics"]


def summarise(per_class: dict[str, float], old: list[str], new: list[str]) -> dict[str, float | None]:
    def mean(names: list[str]) -> float | None:
        vals = [per_class[n] for n in names if n in per_class]
        return sum(vals) / len(vals) if vals else None
    return {"old": mean(old), "new": mean(new), "all": mean(old + new)}


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--methods", default="ft,mib,plop")
    ap.add_argument("--joint", action="store_true", help="also train the joint upper bound")
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    ciss = [sys.executable, "-m", "ciss.apps.cli"]
    info = open_dataset("folder", args.data, "train").info
    steps = load_protocol(args.task, info).steps
    old, new = steps[0], [n for s in steps[1:] for n in s]
    methods = [m for m in args.methods.split(",") if m] + (["joint"] if args.joint else [])
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config, args.out / "config.toml")
    runs_dir = args.out / "runs"
    commands: list[str] = []
    # Earlier invocations into the same --out (other methods or seeds) are kept and extended.
    saved = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else {}
    results: dict[str, list[dict]] = {m: [r for r in saved.get(m, []) if r["seed"] not in seeds] for m in methods}
    for m, rows in saved.items():
        results.setdefault(m, rows)
    commands_file = args.out / "commands.txt"
    commands += commands_file.read_text().splitlines() if commands_file.exists() else []
    common = ["--data", str(args.data), "--config", str(args.config)]

    for seed in seeds:
        base = runs_dir / f"seed{seed}" / "base"
        if not (base / "step-0").exists():
            run([*ciss, "learn", "--run", str(base), "--classes", ",".join(old), "--method", "ft",
                 "--seed", str(seed), *common], commands)
        for m in methods:
            target = runs_dir / f"seed{seed}" / m
            t0 = time.perf_counter()
            if m == "joint":
                run([*ciss, "learn", "--run", str(target), "--task", args.task, "--method", "joint",
                     "--seed", str(seed), *common], commands)
            else:
                if not target.exists():
                    shutil.copytree(base, target)
                run([*ciss, "learn", "--run", str(target), "--task", args.task, "--method", m,
                     "--seed", str(seed), *common], commands)
            metrics = last_metrics(target)
            results[m].append({"seed": seed, "wall_s": round(time.perf_counter() - t0, 1),
                               **summarise(metrics["per_class"], old, new), "per_class": metrics["per_class"]})
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            commands_file.write_text("\n".join(commands) + "\n")

    order = ["ft", "mib", "plop", "gsc", "idec", "joint"]
    shown = sorted((m for m in results if results[m]), key=lambda m: order.index(m) if m in order else len(order))
    write_markdown(args, shown, results, old, new, commands)


def write_markdown(args, methods, results, old, new, commands) -> None:
    def agg(m: str, key: str) -> str:
        vals = [r[key] for r in results[m] if r[key] is not None]
        if not vals:
            return "-"
        if len(vals) == 1:
            return pct(vals[0])
        return f"{pct(statistics.mean(vals))} ± {100 * statistics.stdev(vals):.1f}"

    seeds = sorted({r["seed"] for rows in results.values() for r in rows})
    lines = [f"# {args.task} on {args.data.name}", "",
             f"mIoU (%) after the last step on the test split, seeds {seeds}; old = step-0 classes "
             f"({', '.join(old)}), new = {', '.join(new)}.", "",
             "| method | old | new | all | wall (s, steps > 0) |", "|---|---|---|---|---|"]
    for m in methods:
        wall = statistics.mean(r["wall_s"] for r in results[m])
        lines.append(f"| {m} | {agg(m, 'old')} | {agg(m, 'new')} | {agg(m, 'all')} | {wall:.0f} |")
    lines += ["", "Per-class IoU (%) after the last step (first seed):", "",
              "| method | " + " | ".join(old + new) + " |", "|---|" + "---|" * len(old + new)]
    for m in methods:
        pc = results[m][0]["per_class"]
        lines.append(f"| {m} | " + " | ".join(pct(pc.get(n)) for n in old + new) + " |")
    lines += ["", "Config: `config.toml` beside this file. Commands, in order:", "", "```"] + commands + ["```", ""]
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

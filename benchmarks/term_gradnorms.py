"""How hard each loss term pulls on the model, read back from finished runs' train logs.

The engine logs every term's gradient norm over all trainable parameters before clipping
(`gradnorm_<term>`, and `gradnorm_<group>` for each parameter group). This prints, for every later
step of each run, the median over the logged iterations of each term's norm and its ratio to the
cross-entropy's: a distillation term that outweighs the CE several times is a first suspect for lost
plasticity (IDEC's feature KD and GSC's POD on CamVid, docs/results/camvid-pretrained/README.md).
No training; any method's runs.

    python benchmarks/term_gradnorms.py docs/results/camvid-pretrained/6-1-long-gsc-agreed/runs/seed0/gsc-*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ciss.manifest import finished_steps, step_dir

PREFIX = "gradnorm_"


def gradnorm_series(step: Path) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(terms, groups) of one step's train log: each `gradnorm_*` column over the logged iterations.
    A column is a term's when the log also holds that term's loss value, else a parameter group's."""
    rows = [json.loads(line) for line in (step / "train_log.jsonl").read_text().splitlines() if line.strip()]
    terms: dict[str, list[float]] = {}
    groups: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(PREFIX) and value is not None:
                name = key[len(PREFIX):]
                (terms if name in row else groups).setdefault(name, []).append(float(value))
    return terms, groups


def later_steps(run: Path) -> list[Path]:
    """A run's finished steps after step 0, in order: step 0 has no old model and nothing to weigh."""
    return [step_dir(run, k) for k in finished_steps(run) if k > 0]


def table(runs: list[Path]) -> list[str]:
    """One markdown row per run and step: each term's median norm, in brackets its ratio to the CE's."""
    series = {(run, step.name): gradnorm_series(step)[0] for run in runs for step in later_steps(run)}
    names = sorted({t for terms in series.values() for t in terms}, key=lambda t: (t != "ce", t))
    lines = ["| run | step | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for (run, step), terms in series.items():
        medians = {t: statistics.median(v) for t, v in terms.items()}
        ce = medians.get("ce")

        def cell(t: str) -> str:
            if t not in medians:
                return "-"
            ratio = f" ({medians[t] / ce:.2g}×)" if ce and t != "ce" else ""
            return f"{medians[t]:.2f}{ratio}"
        lines.append(f"| {run.parent.name}/{run.name} | {step[5:]} | " + " | ".join(cell(t) for t in names) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (`ciss learn --run`), finished or not")
    args = ap.parse_args()
    empty = [str(r) for r in args.runs if not later_steps(r)]
    if empty:
        print(f"error: no finished step after step 0 in {', '.join(empty)}; train one with "
              f"`ciss learn --run {empty[0]} --new-classes ...`", file=sys.stderr)
        sys.exit(2)
    print("Median gradient norm of each loss term over the logged iterations (before clipping), "
          "in brackets its ratio to the CE's.\n")
    print("\n".join(table(args.runs)))


if __name__ == "__main__":
    main()

"""One table over several protocol folders of one task and config, with the protocol's verdicts.

`camvid_protocol.py` compares the runs of one --out; a study grows over many (a variant tried later
gets a folder of its own, with the same step-0 models through --reuse). This reads their
results.json and writes what the docs quote across them: every run's old/new/all mIoU (mean ± sample
std over seeds, and each seed's all), GSC's and IDEC's runs against every baseline with the
protocol's tie rule (a difference under two standard deviations, the larger of the two, is a tie),
and the ablation table of each `FULL-no-COMPONENT` run whose FULL run is in any of the folders. No
training. Folders of different tasks or configs are refused: their numbers do not compare.

    python benchmarks/results_board.py docs/results/camvid-pretrained/6-1-long* \\
        --out docs/results/camvid-pretrained/6-1-long-board.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from camvid_protocol import (REFERENCE, ablation_runs, ablation_table, compare, given_labels, mean_std, pct,
                             stats, verdict_pairs)


class BoardError(ValueError):
    """Folders that cannot go on one board; the message says which and what to do."""


def folder_task(folder: Path) -> str:
    """The task the protocol ran in a folder, from the `--task` of its commands.txt."""
    path = folder / "commands.txt"
    if not path.exists():
        raise BoardError(f"no commands.txt in {folder}: give folders written by benchmarks/camvid_protocol.py")
    tasks = {words[i + 1] for words in map(shlex.split, path.read_text().splitlines())
             for i, w in enumerate(words[:-1]) if w == "--task"}
    if len(tasks) != 1:
        raise BoardError(f"{path} names {len(tasks)} tasks ({', '.join(sorted(tasks)) or 'none'}); "
                         "a protocol folder holds one")
    return tasks.pop()


@dataclass
class Group:
    """Folders whose runs grew from the same step-0 models (their MiB-init rows agree): only their runs
    compare seed for seed."""
    label: str
    results: dict[str, list[dict]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # run name -> folder


def load(folders: list[Path]) -> tuple[str, list[Group]]:
    """(task, step-0 groups) over the folders. A run found in several folders of one group (a joint
    run copied with --reuse) must hold the same figures in each."""
    tasks, configs = {}, {}
    groups: dict[tuple, Group] = {}
    for folder in folders:
        if not (folder / "results.json").exists():
            raise BoardError(f"no results.json in {folder}: write its tables with `python benchmarks/"
                             f"camvid_protocol.py ... --tables-only --out {folder}`")
        tasks[folder] = folder_task(folder)
        config = folder / "config.toml"
        configs[folder] = hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None
        results = json.loads((folder / "results.json").read_text())
        key = tuple(figures(results[REFERENCE])) if REFERENCE in results else (folder.name,)
        group = groups.setdefault(key, Group(chr(ord("A") + len(groups))))
        for name, rows in results.items():
            if name in group.results and figures(group.results[name]) != figures(rows):
                raise BoardError(f"run '{name}' differs between {group.origin[name]} and {folder.name}, "
                                 "which share their step-0 models: leave one of the two folders out")
            if name not in group.results:
                group.results[name], group.origin[name] = rows, folder.name
    first = folders[0]
    for folder in folders[1:]:
        if tasks[folder] != tasks[first]:
            raise BoardError(f"{first} ran {tasks[first]} but {folder} ran {tasks[folder]}; "
                             "give the folders of one task")
        if configs[folder] != configs[first]:
            raise BoardError(f"{first} and {folder} were run with different config.toml; "
                             "a board compares runs of one config")
    return tasks[first], list(groups.values())


def figures(rows: list[dict]) -> list[tuple]:
    """What identifies a run's results: its seeds' old/new/all to 0.001 points (wall times differ
    between copies, and an evaluation repeated on another thread count in the last float bits)."""
    def point(v: float | None) -> float | None:
        return None if v is None else round(100 * v, 3)
    return sorted((r["seed"], point(r.get("old")), point(r.get("new")), point(r.get("all"))) for r in rows)


def board(task: str, groups: list[Group]) -> list[str]:
    """The markdown: class-incremental runs by all-mIoU, then the references; per step-0 group, GSC and
    IDEC against every baseline and the ablations."""
    entries = [(g, n) for g in groups for n in g.results]
    folders = {f for g in groups for f in g.origin.values()}
    seeds = sorted({r["seed"] for g, n in entries for r in g.results[n]})

    def labelled(g: Group) -> set[str]:
        return set(given_labels(g.results, "seen") + given_labels(g.results, "agreed"))

    def is_reference(g: Group, n: str) -> bool:
        return n in labelled(g) or n in ("joint", REFERENCE)

    entries.sort(key=lambda e: (is_reference(*e), -stats(e[0].results, e[1], "all")[0]))
    lines = [f"# {task}: runs of {len(folders)} protocol folders", "",
             f"mIoU (%) after the last step, mean ± sample std over the seeds each run has (of {seeds}); "
             "class-incremental runs first, by all-mIoU, then the references (the joint bound, MiB's "
             "initialisation untrained, and runs given the old classes' labels, `data.labels = \"seen\"` "
             "or the best gate `\"agreed\"`). Step 0: runs with the same letter grew from the same "
             "step-0 models (their `mib-init` rows agree) and compare seed for seed; runs of different "
             "letters carry the step-0 models' differences too, so the verdicts below stay inside a letter.",
             "", "| run | step 0 | folder | seeds | old | new | all | all per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for g, n in entries:
        per_seed = ", ".join(pct(r["all"]) for r in sorted(g.results[n], key=lambda r: r["seed"]))
        cells = " | ".join(mean_std(g.results, n, k) for k in ("old", "new", "all"))
        lines.append(f"| {n} | {g.label} | {g.origin[n]} | {len(g.results[n])} | {cells} | {per_seed} |")
    for g in groups:
        ablated = ablation_runs(g.results)
        main_rows = [n for n in g.results if n not in ablated]
        pairs = verdict_pairs(g.results, main_rows, ablated, labelled(g))
        if pairs:
            lines += ["", f"Step 0 {g.label}: GSC and IDEC runs against every baseline (all-mIoU, mean "
                      "difference; ahead or behind only beyond two standard deviations, the larger of the "
                      "two runs'):", ""]
            lines += [f"- {p} vs {b}: {compare(g.results, p, b)}" for p, b in pairs]
        table = ablation_table(g.results, ablated)
        if table:
            lines += ["", f"Step 0 {g.label}:"] + table
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="protocol --out folders of one task and config")
    ap.add_argument("--out", type=Path, help="also write the board to this markdown file")
    args = ap.parse_args()
    try:
        task, groups = load(args.folders)
    except BoardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    command = "python benchmarks/results_board.py " + " ".join(shlex.quote(str(f)) for f in args.folders)
    if args.out:
        command += f" --out {shlex.quote(str(args.out))}"
    text = "\n".join(board(task, groups) + ["", "Written by", "", "```", command, "```", ""])
    if args.out:
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()

"""benchmarks/camvid_protocol.py's tables, on results written by hand: the arithmetic of each cell."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from camvid_protocol import (ablation_runs, ablation_table, plasticity_table, spillover_table,  # noqa: E402
                             verdict_pairs)


def row(seed: int, learned: dict[str, float], kept: dict[str, float]) -> dict:
    return {"seed": seed, "at_step": learned, "per_class": kept}


def test_plasticity_table_averages_learned_and_kept_over_seeds_and_classes():
    results = {
        "gsc": [row(0, {"car": 0.6, "fence": 0.2}, {"car": 0.5, "fence": 0.1}),
                row(1, {"car": 0.8, "fence": 0.0}, {"car": 0.7, "fence": 0.1})],
        "mib-init": [{"seed": 0, "per_class": {"car": 0.0, "fence": 0.0}}],  # no step learned anything: no row
    }
    lines = plasticity_table(results, ["mib-init", "gsc"], ["car", "fence"])
    assert lines[3] == "| method | mean | car | fence |"
    # car learned 0.7 kept 0.6; fence learned 0.1 kept 0.1; their mean 0.4 -> 0.35
    assert lines[5:] == ["| gsc | 40.0 → 35.0 | 70.0 → 60.0 | 10.0 → 10.0 |"]


def test_plasticity_table_is_empty_without_per_step_figures():
    assert plasticity_table({"ft": [{"seed": 0, "per_class": {"car": 0.1}}]}, ["ft"], ["car"]) == []


def test_verdict_pairs_leave_out_references_and_labelled_runs():
    one, two = [{"seed": 0}], [{"seed": 0}, {"seed": 1}]
    results = {"mib-init": one, "mib": two, "mib-clip3": two, "ft-seen": two, "gsc": two, "joint": two,
               "idec-agreed": two, "gsc-no-pod": one, "idec-no-contrast": two,
               "idec-agreed-no-contrast": two}
    main_rows = ["mib-init", "mib", "mib-clip3", "ft-seen", "gsc", "idec-agreed", "joint"]
    pairs = verdict_pairs(results, main_rows, ["gsc-no-pod", "idec-no-contrast", "idec-agreed-no-contrast"],
                          {"ft-seen", "idec-agreed", "idec-agreed-no-contrast"})
    # the one-seed ablation, FT and IDEC given the old labels (and that IDEC's ablation), the MiB-init
    # reference and joint take no part
    assert pairs == [("gsc", "mib"), ("gsc", "mib-clip3"),
                     ("idec-no-contrast", "mib"), ("idec-no-contrast", "mib-clip3")]


def test_spillover_table_sums_the_new_classes_and_names_the_largest_over_seeds():
    results = {
        "idec": [{"seed": 0, "taken": {"building": {"fence": 0.10, "car": 0.02}, "road": {"fence": 0.0, "car": 0.01}}},
                 {"seed": 1, "taken": {"building": {"fence": 0.06, "car": 0.04}, "road": {"fence": 0.0, "car": 0.03}}}],
        "mib-init": [{"seed": 0, "per_class": {}}],  # no confusion counts: no row
    }
    lines = spillover_table(results, ["mib-init", "idec"], ["building", "road"])
    assert lines[3] == "| method | building | road |"
    # building: fence 0.08 + car 0.03 = 11 %, fence the largest; road: car 0.02
    assert lines[5:] == ["| idec | 11.0 (fence 8.0) | 2.0 (car 2.0) |"]
    assert spillover_table({"ft": [{"seed": 0, "taken": None}]}, ["ft"], ["building"]) == []


def test_ablation_table_compares_each_run_with_its_own_full_run_over_shared_seeds():
    def r(seed: int, all_: float) -> dict:
        return {"seed": seed, "old": 0.6, "new": 0.2, "all": all_}
    results = {"idec": [r(0, 0.44)], "idec-no-contrast": [r(0, 0.43)], "idec-no-feature_kd": [r(0, 0.45)],
               "idec-agreed": [r(0, 0.47), r(1, 0.46)],
               "idec-agreed-no-feature_kd": [r(0, 0.48), r(1, 0.48), r(2, 0.50)],  # seed 2: no full run
               "gsc-no-pod": [r(0, 0.41)]}  # no full run: a variant of its own, for the main table
    ablated = ablation_runs(results)
    assert ablated == ["idec-no-contrast", "idec-no-feature_kd", "idec-agreed-no-feature_kd"]
    lines = ablation_table(results, ablated)
    assert lines[5:] == [
        "| idec (full) | 1 | 60.0 | 20.0 | 44.0 | |",
        "| idec-no-feature_kd | 1 | 60.0 | 20.0 | 45.0 | +1.0 |",  # COMPONENTS' order, not the name's
        "| idec-no-contrast | 1 | 60.0 | 20.0 | 43.0 | -1.0 |",
        "| idec-agreed (full) | 2 | 60.0 ± 0.0 | 20.0 ± 0.0 | 46.5 ± 0.7 | |",
        "| idec-agreed-no-feature_kd | 3 | 60.0 ± 0.0 | 20.0 ± 0.0 | 48.7 ± 1.2 | +1.5 |",  # seeds 0 and 1: +1, +2
    ]
    assert ablation_table(results, []) == []

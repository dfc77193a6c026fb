"""Gradient norm of each loss term of a PLOP or GSC step on the synthetic scenes, POD raw and normalised.

Trains the demo's base step once (tiny model from scratch, unclipped), then one incremental step per
variant with the train log written at every iteration, and prints the median over iterations of each
term's gradient norm over all trainable parameters (the engine's gradnorm_<term> columns, before
clipping) and of each parameter group's summed norm. This is the measurement behind PLOP's and GSC's
`pod_normalize` default (docs/methods.md).

    python benchmarks/pod_gradnorms.py --out /tmp/podnorms
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from ciss.manifest import read_step
from ciss.trainer.learn import learn

from term_gradnorms import gradnorm_series

BASE = ["sky", "grass", "water", "sand", "disk", "box"]
NEW = ["triangle", "ring"]
RELEASED = {"pod_normalize": False, "pod_weight": 0.01, "pod_logits_weight": 0.0005}  # PLOP's VOC scripts
VARIANTS = {
    "plop released": ("plop", RELEASED),
    "plop normalised x1": ("plop", {**RELEASED, "pod_normalize": True}),
    "plop preset": ("plop", {}),  # normalised, 10 x PLOP's weights
    "plop normalised x30": ("plop", {"pod_normalize": True, "pod_weight": 0.3, "pod_logits_weight": 0.015}),
    "gsc released": ("gsc", RELEASED),
    "gsc normalised x1": ("gsc", {**RELEASED, "pod_normalize": True}),
    "gsc preset": ("gsc", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=10, help="base step epochs")
    ap.add_argument("--epochs-next", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="synthetic training images")
    ap.add_argument("--only", nargs="*", default=list(VARIANTS), help="variant names to run")
    args = ap.parse_args()
    quiet = lambda s: None  # noqa: E731
    train = {"epochs": args.epochs, "lr": 0.05, "epochs_next": args.epochs_next, "lr_next": 0.05,
             "clip_grad_norm": 0.0, "log_every": 1, "workers": 0}
    over = {"model": {"preset": "tiny"}, "data": {"options": {"size": args.size}}, "train": train}
    base = args.out / "base"
    if not (base / "step-0").exists():
        shutil.rmtree(base, ignore_errors=True)
        learn(base, classes=BASE, method="ft", overrides=over, log=quiet)
    print(f"{'variant':18} {'term':9} {'median':>9} {'min':>9} {'max':>9}")
    for name in args.only:
        method, options = VARIANTS[name]
        run = args.out / name.replace(" ", "-")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        learn(run, new_classes=NEW, method=method, method_options=options, overrides=over, log=quiet)
        terms, groups = gradnorm_series(run / "step-1")
        for key, v in {**terms, **groups}.items():
            print(f"{name:18} {key:9} {statistics.median(v):9.3f} {min(v):9.3f} {max(v):9.3f}")
        print(f"{name:18} mIoU all {read_step(run / 'step-1').metrics['miou_all']:.3f}")


if __name__ == "__main__":
    main()

"""Probes that explain a class-incremental run's numbers: the MiB-init reference and logit margins.

On data without a background class (CamVid), step 0's "background" is exactly the future classes.
A new head initialised from it (MiB) scores every such pixel at the background's logit, so which of
the two wins is decided by a tiny bias. `mib_init_reference` measures what that alone gives (no
training, the new heads' bias +eps so they win those ties); `new_class_margins` says how far a
trained model moved past it: the median of z_new - z_background over the pixels of each new class.
`teacher_view` says what each step's old model calls the pixels of the class the step adds: MiB's
unbiased distillation assumes "background", and where it says an old class instead the distillation
holds that class against the label. `old_class_recall` bounds what pseudo-labelling (PLOP, GSC, IDEC)
can keep of each old class: a pixel of the step's images labelled background gets an old class's
pseudo-label only where the old model's argmax is that class, and IDEC's only where it is also at
least as sure as its threshold floor, so no threshold can label more of a class than these shares.
Used by camvid_protocol.py; importable on its own for one run, or

    python benchmarks/cil_probe.py RUN_DIR                  # the teacher's view of each step's new pixels
    python benchmarks/cil_probe.py RUN_DIR --old-classes    # what its pseudo-labels can keep of each old class
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ciss.classmap import ClassMap
from ciss.trainer.data import native_ids, open_dataset, open_splits
from ciss.trainer.data.tasks import StepData, pad_collate, presence, test_indices, test_lut, train_indices
from ciss.trainer.data.transforms import EvalTransform
from ciss.trainer.distributed import Dist
from ciss.trainer.evaluate import evaluate
from ciss.trainer.step import eval_loader
from ciss.trainer.store import RunStore

EPS = 1e-3
FLOOR = 0.5  # IDEC's default threshold_floor: its pseudo-labels need at least this confidence


def task_classmap(base: RunStore, steps: list[list[str]]) -> ClassMap:
    """The class map after the protocol's last step, grown from the base run's step 0."""
    manifest = base.manifest(0)
    info = open_dataset("folder", Path(manifest.config["data"]["root"]), "train").info
    cmap = base.classmap(0)
    for k, names in enumerate(steps[1:], start=1):
        cmap = cmap.extend(names, [info.colors[info.class_names.index(n)] for n in names], k)
    return cmap


@torch.no_grad()
def mib_init_reference(base_dir: Path, steps: list[list[str]], eps: float = EPS) -> dict[str, Any]:
    """Metrics of the step-0 model grown by MiB's initialisation alone, the new biases raised by eps."""
    base = RunStore(base_dir)
    model, manifest = base.load(0)
    for names in steps[1:]:
        model.add_step(len(names), init_from_background=True)
        model.head.heads[-1].bias += eps
    cmap = task_classmap(base, steps)
    cfg = manifest.config
    _, eval_ds = open_splits(cfg)
    loader = eval_loader(eval_ds, cmap, cfg["data"]["eval_protocol"], int(cfg["eval"]["batch_size"]), Dist(), 0,
                         manifest.normalisation)
    return evaluate(model, loader, cmap, "cpu")


def _last_step(store: RunStore) -> int:
    last = store.last_step()
    assert last is not None, store
    return last


def _test_batches(store: RunStore, cmap: ClassMap) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test images holding any class of `cmap`, served as the run's evaluation serves them,
    labelled with `cmap`'s ids, 8 at a time."""
    manifest = store.manifest(_last_step(store))
    _, eval_ds = open_splits(manifest.config)
    seen = [i for i, n in enumerate(eval_ds.info.class_names) if n in cmap.names]
    idx = test_indices(presence(eval_ds), seen, "all")
    data = StepData(eval_ds, idx, test_lut(eval_ds.info, cmap), EvalTransform(manifest.normalisation), seed=0)
    for i in range(0, len(data), 8):
        yield pad_collate([data[(p, 0)] for p in range(i, min(i + 8, len(data)))])


@torch.no_grad()
def new_class_margins(run_dir: Path, new_names: list[str]) -> dict[str, float | None]:
    """Median over each new class's test pixels of (its logit - the background logit) of the last step."""
    store = RunStore(run_dir)
    last = _last_step(store)
    model, _ = store.load(last)
    model.eval()
    cmap = store.classmap(last)
    ids = {n: cmap.names.index(n) for n in new_names if n in cmap.names}
    margins: dict[str, list[torch.Tensor]] = {n: [] for n in ids}
    for images, labels in _test_batches(store, cmap):
        logits = model(images)
        for name, c in ids.items():
            where = labels == c
            if where.any():
                margins[name].append((logits[:, c] - logits[:, 0])[where])
    return {n: (float(torch.cat(v).median()) if v else None) for n, v in margins.items()}


@torch.no_grad()
def teacher_view(run_dir: Path) -> list[dict[str, Any]]:
    """For each step t > 0: the old model's (step t-1's) mean background probability on the test
    pixels of the classes step t adds, and the share of those pixels whose argmax is each old class."""
    store = RunStore(run_dir)
    last = _last_step(store)
    cmap = store.classmap(last)
    batches = list(_test_batches(store, cmap))
    rows = []
    for step in range(1, last + 1):
        teacher, _ = store.load(step - 1)
        teacher.eval()
        old_names = store.classmap(step - 1).names
        added = [cmap.names.index(n) for n in store.classmap(step).names[len(old_names):]]
        p_bg, calls = 0.0, torch.zeros(len(old_names))
        for images, labels in batches:
            where = torch.isin(labels, torch.tensor(added))
            if where.any():
                probs = torch.softmax(teacher(images).float(), dim=1).permute(0, 2, 3, 1)[where]
                p_bg += probs[:, 0].sum().item()
                calls += torch.bincount(probs.argmax(dim=1), minlength=len(old_names)).float()
        n = calls.sum().item()
        rows.append({"step": step, "classes": [cmap.names[c] for c in added], "pixels": int(n),
                     "p_background": p_bg / n if n else None,
                     "argmax": {old_names[i]: calls[i].item() / n for i in calls.argsort(descending=True).tolist()
                                if n and calls[i] > 0}})
    return rows


@torch.no_grad()
def old_class_recall(run_dir: Path, floor: float = FLOOR) -> list[dict[str, Any]]:
    """For each step t > 0 and each old class: on step t's training images (unaugmented), of the
    class's true pixels that the step labels background, the share the old model (step t-1) calls
    that class (`argmax`) and calls it with probability >= floor (`confident`); and of the pixels it
    calls that class there, the share that truly are (`precision`)."""
    store = RunStore(run_dir)
    last = _last_step(store)
    cmap = store.classmap(last)
    manifest = store.manifest(last)
    train_ds, _ = open_splits(manifest.config)
    pres = presence(train_ds)
    rows = []
    for step in range(1, last + 1):
        teacher, _ = store.load(step - 1)
        teacher.eval()
        n_old = len(store.classmap(step - 1).names)
        new = native_ids(train_ds, store.classmap(step).names[n_old:])
        future = native_ids(train_ds, cmap.names[len(store.classmap(step).names):])
        idx = train_indices(pres, new, future, manifest.config["data"]["setting"])
        data = StepData(train_ds, idx, test_lut(train_ds.info, cmap), EvalTransform(manifest.normalisation), seed=0)
        true = torch.zeros(n_old)
        called = torch.zeros(n_old)
        hit = torch.zeros(n_old)
        sure = torch.zeros(n_old)
        for i in range(0, len(data), 8):
            images, labels = pad_collate([data[(p, 0)] for p in range(i, min(i + 8, len(data)))])
            probs = torch.softmax(teacher(images).float(), dim=1)
            conf, pred = probs.max(dim=1)
            where = labels < n_old  # labelled background at this step: old classes, classes not yet added
            truth, pred, conf = labels[where], pred[where], conf[where]
            true += torch.bincount(truth, minlength=n_old)[:n_old].float()
            called += torch.bincount(pred, minlength=n_old).float()
            right = truth == pred
            hit += torch.bincount(truth[right], minlength=n_old)[:n_old].float()
            sure += torch.bincount(truth[right & (conf >= floor)], minlength=n_old)[:n_old].float()
        names = store.classmap(step - 1).names
        rows.append({"step": step, "classes": cmap.names[n_old:len(store.classmap(step).names)],
                     "old": {names[c]: {"pixels": int(true[c]),
                                        "argmax": float(hit[c] / true[c]) if true[c] else None,
                                        "confident": float(sure[c] / true[c]) if true[c] else None,
                                        "precision": float(hit[c] / called[c]) if called[c] else None}
                             for c in range(1, n_old)}})
    return rows


def _print_teacher_view(run: Path) -> None:
    print("| step | adds | pixels | old model's p(background) | its argmax there (top 3) |")
    print("|---|---|---|---|---|")
    for row in teacher_view(run):
        top = ", ".join(f"{name} {100 * share:.0f} %" for name, share in list(row["argmax"].items())[:3])
        p_bg = "-" if row["p_background"] is None else f"{row['p_background']:.2f}"
        print(f"| {row['step']} | {', '.join(row['classes'])} | {row['pixels']} | {p_bg} | {top} |")


def _print_old_class_recall(run: Path) -> None:
    rows = old_class_recall(run)
    names = list(rows[-1]["old"])
    print(f"% of each old class's pixels in the step's images that the old model calls it (argmax), "
          f"and calls it with p >= {FLOOR} (IDEC's floor); '-': not old yet or not in the images")
    print("| class | " + " | ".join(f"step {r['step']} ({', '.join(r['classes'])})" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in names:
        cells = []
        for r in rows:
            share = r["old"].get(name)
            cells.append("-" if share is None or share["argmax"] is None
                         else f"{100 * share['argmax']:.0f} / {100 * share['confident']:.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description="What each step's old model calls the pixels of the class the "
                                                 "step adds (test split), or of the old classes (training images).")
    parser.add_argument("run", type=Path, help="a run folder (step-0, step-1, ...)")
    parser.add_argument("--old-classes", action="store_true",
                        help="instead: how much of each old class the old model's pseudo-labels can keep at each step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (_print_old_class_recall if args.old_classes else _print_teacher_view)(args.run)


if __name__ == "__main__":
    main()

"""Probes that explain a class-incremental run's numbers: the MiB-init reference and logit margins.

On data without a background class (CamVid), step 0's "background" is exactly the future classes.
A new head initialised from it (MiB) scores every such pixel at the background's logit, so which of
the two wins is decided by a tiny bias. `mib_init_reference` measures what that alone gives (no
training, the new heads' bias +eps so they win those ties); `new_class_margins` says how far a
trained model moved past it: the median of z_new - z_background over the pixels of each new class.
Used by camvid_protocol.py; importable on its own for one run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ciss.classmap import ClassMap
from ciss.trainer.data import open_dataset, open_splits
from ciss.trainer.data.tasks import StepData, pad_collate, presence, test_indices, test_lut
from ciss.trainer.data.transforms import EvalTransform
from ciss.trainer.distributed import Dist
from ciss.trainer.evaluate import evaluate
from ciss.trainer.step import eval_loader
from ciss.trainer.store import RunStore

EPS = 1e-3


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


@torch.no_grad()
def new_class_margins(run_dir: Path, new_names: list[str]) -> dict[str, float | None]:
    """Median over each new class's test pixels of (its logit - the background logit) of the last step."""
    store = RunStore(run_dir)
    last = store.last_step()
    assert last is not None, run_dir
    model, manifest = store.load(last)
    model.eval()
    cmap = store.classmap(last)
    cfg = manifest.config
    _, eval_ds = open_splits(cfg)
    ids = {n: cmap.names.index(n) for n in new_names if n in cmap.names}
    seen = [i for i, n in enumerate(eval_ds.info.class_names) if n in cmap.names]
    idx = test_indices(presence(eval_ds), seen, "all")
    data = StepData(eval_ds, idx, test_lut(eval_ds.info, cmap), EvalTransform(manifest.normalisation), seed=0)
    margins: dict[str, list[torch.Tensor]] = {n: [] for n in ids}
    for i in range(0, len(data), 8):
        images, labels = pad_collate([data[(p, 0)] for p in range(i, min(i + 8, len(data)))])
        logits = model(images)
        for name, c in ids.items():
            where = labels == c
            if where.any():
                margins[name].append((logits[:, c] - logits[:, 0])[where])
    return {n: (float(torch.cat(v).median()) if v else None) for n, v in margins.items()}


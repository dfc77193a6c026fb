"""One incremental step, from data to a committed step folder, read top to bottom in `train_step`.

It knows no method by name: a `Method` prepares once, then turns each batch's outputs into named
loss terms. Everything that makes a step reproducible lives here: per-sample augmentation seeds,
equal batch slices per process, resumable checkpoints written atomically.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ciss.classmap import ClassMap, unlearned_warning
from ciss.errors import CissError
from ciss.manifest import Normalisation, library_versions, write_bytes_atomic
from ciss.trainer.data import native_ids, open_splits
from ciss.trainer.data.base import SegDataset
from ciss.trainer.data.tasks import StepData, pad_collate, presence, test_indices, test_lut, train_indices, train_lut
from ciss.trainer.data.transforms import EvalTransform, TrainTransform
from ciss.trainer.distributed import Dist, ShardedBatches, shard
from ciss.trainer.evaluate import compute_metrics, confusion, confusion_csv
from ciss.trainer.log import Progress, TrainLog, bar, format_seconds
from ciss.trainer.methods import build_method
from ciss.trainer.methods.base import Method, StepContext, TrainBatch
from ciss.trainer.models import DeepLabV3, build_model, pretrained_weights
from ciss.trainer.presets import preset_normalisation
from ciss.trainer.models.norm import convert_sync_batchnorm, freeze_batchnorm
from ciss.trainer.models.outputs import Outputs
from ciss.trainer.optim import (average_grads, clip_groups, lr_multipliers, param_groups, poly_lr, set_lr,
                                term_grad_norms)
from ciss.trainer.store import RunStore, load_weights

CHECKPOINT = "checkpoint.pt"


@dataclass
class StepPlan:
    """What one step learns: the class map after it and the native ids it adds."""

    step: int
    classmap: ClassMap
    new_native: list[int]
    future_native: list[int]  # known future classes (protocols); dropped by the disjoint filter
    old_names: list[str] | None = None  # a joint step of a protocol: its step 0 classes, for the old/new split


def train_step(store: RunStore, plan: StepPlan, cfg: dict[str, Any], dist: Dist,
               resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and commit one step; returns its manifest."""
    torch.manual_seed(int(cfg["seed"]) + plan.step)
    method = build_method(cfg["method"]["name"], cfg["method"].get("options", {}))
    models = build_models(store, plan, cfg, method, dist, log)
    data = build_data(plan, cfg, dist, models.normalisation)
    state = read_checkpoint(store, plan.step, cfg, resume, dist)
    loop = build_loop(models, method, data, plan, cfg, dist, state, log)
    wall = train_iterations(loop, data, plan, cfg, dist, store.partial_dir(plan.step), log)
    metrics, matrix, eval_images = evaluate_step(models.model, data.eval_ds, plan, cfg, dist, models.normalisation)
    manifest = step_manifest(store, plan, cfg, dist, models, method, data, metrics, eval_images, wall)
    if dist.main:
        commit_step(store, plan, manifest, matrix, models.model, wall, log)
    dist.barrier()
    return manifest


# --- build ---------------------------------------------------------------------------------------

@dataclass
class Models:
    """The model a step trains and the frozen model of the step before it (None at step 0)."""

    model: DeepLabV3  # unwrapped: what is saved, evaluated and handed to the method
    forward: nn.Module  # the same model as the loop calls it (DDP-wrapped when distributed)
    old_model: DeepLabV3 | None
    parent: dict[str, Any] | None  # the previous step and its weights' sha256
    pretrained: dict[str, Any] | None  # the ImageNet (or own) file step 0 started from
    n_old: int  # the previous model's channels, background included (0 at step 0)
    normalisation: Normalisation  # the preset's at step 0, then the previous step's: what the weights know


def build_models(store: RunStore, plan: StepPlan, cfg: dict[str, Any], method: Method, dist: Dist,
                 log: Callable[[str], None]) -> Models:
    """Step 0 builds the preset (on its pretrained file); a later step grows a copy of the previous
    step's model by one head and freezes the original as the teacher."""
    mcfg, device = cfg["model"], dist.device
    old_model: DeepLabV3 | None = None
    parent: dict[str, Any] | None = None
    if plan.step == 0:
        weights = pretrained_weights(mcfg["preset"], mcfg["pretrained"], log if dist.main else None)
        model = build_model(mcfg["preset"], plan.classmap.step_sizes(), output_stride=mcfg["output_stride"],
                            pretrained=weights.path if weights else None)
        pretrained = weights.to_json() if weights else None
        normalisation = preset_normalisation(mcfg["preset"])
    else:
        old_model, parent_manifest = store.load(plan.step - 1)
        if parent_manifest.preset != mcfg["preset"]:
            raise CissError(f"run {store.root} was made with model '{parent_manifest.preset}', "
                            f"not '{mcfg['preset']}'; add classes with the same --model or start a new run")
        parent = {"step": plan.step - 1, "sha256": parent_manifest.weights.sha256}
        pretrained = parent_manifest.pretrained
        normalisation = parent_manifest.normalisation
        model = copy.deepcopy(old_model)
        model.add_step(len(plan.new_native), init_from_background=method.init_new_heads)
        old_model.to(device).eval()
        for p in old_model.parameters():
            p.requires_grad_(False)
    model.to(device)
    if dist.active and cfg["train"]["sync_bn"]:
        model = convert_sync_batchnorm(model, device)
    if plan.step > 0 and cfg["train"]["freeze_bn_next"]:
        freeze_batchnorm(model)  # before DDP, which only syncs parameters that need gradients
    forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.active else model
    n_old = old_model.num_classes if old_model is not None else 0
    return Models(model, forward, old_model, parent, pretrained, n_old, normalisation)


@dataclass
class Schedule:
    iters_per_epoch: int
    total: int  # iterations
    epochs: int
    base_lr: float


def schedule(n_images: int, cfg: dict[str, Any], step: int) -> Schedule:
    """The step's iterations: `iterations` when set (the same training whatever the dataset's size),
    else `epochs` of the training images at the global batch size."""
    tcfg = cfg["train"]
    iters_per_epoch = n_images // tcfg["batch_size"]
    if iters_per_epoch == 0:
        raise CissError(f"only {n_images} training images for step {step} but the batch size is "
                        f"{tcfg['batch_size']}; use a smaller --batch-size")
    iterations = int(tcfg["iterations"] if step == 0 else tcfg["iterations_next"])
    epochs = int(tcfg["epochs"] if step == 0 else tcfg["epochs_next"])
    if iterations:
        epochs = math.ceil(iterations / iters_per_epoch)
    base_lr = float(tcfg["lr"] if step == 0 else tcfg["lr_next"])
    return Schedule(iters_per_epoch, iterations or epochs * iters_per_epoch, epochs, base_lr)


@dataclass
class TrainingData:
    """A step's training images (augmented, sharded per process), its eval split and its schedule."""

    train_ds: SegDataset
    eval_ds: SegDataset
    indices: Any  # the training images of this step, indices into train_ds
    train: StepData
    schedule: Schedule
    batch_size: int  # images per batch over all processes
    workers: int
    normalisation: Normalisation

    def loader(self, epoch: int, offset: int, dist: Dist) -> DataLoader:
        """Epoch `epoch`'s batches for this process, from batch `offset` on (a resumed epoch)."""
        sampler = ShardedBatches(len(self.indices), self.batch_size, dist.rank, dist.world, self.train.seed,
                                 epoch, offset)
        return DataLoader(self.train, batch_sampler=sampler, num_workers=self.workers, collate_fn=pad_collate,
                          pin_memory=dist.device.type == "cuda")

    def plain_batches(self, dist: Dist) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over this process's training images without augmentation, for a method's estimates."""
        plain = StepData(self.train_ds, self.indices, self.train.lut, EvalTransform(self.normalisation), seed=0)
        keys = [(p, 0) for p in shard(len(plain), dist.rank, dist.world)]
        per_process = self.batch_size // dist.world
        batches = [keys[i:i + per_process] for i in range(0, len(keys), per_process)]
        for images, labels in DataLoader(plain, batch_sampler=batches, collate_fn=pad_collate,
                                         num_workers=self.workers):
            yield images.to(dist.device), labels.to(dist.device)


def build_data(plan: StepPlan, cfg: dict[str, Any], dist: Dist, normalisation: Normalisation) -> TrainingData:
    """The images that show this step's classes (the setting's filter), with their labels mapped to
    this step's model ids and the images normalised as the model expects."""
    tcfg, step, classmap = cfg["train"], plan.step, plan.classmap
    train_ds, eval_ds = open_splits(cfg)
    idx = train_indices(presence(train_ds), plan.new_native, plan.future_native, cfg["data"]["setting"])
    if len(idx) == 0:
        raise CissError(f"no training image in split '{cfg['data']['train_split']}' contains any of "
                        f"{', '.join(classmap[i].name for i in classmap.ids_of_step(step))}")
    transform = TrainTransform(tcfg["crop"], normalisation, scale=tuple(tcfg["scale"]), flip=tcfg["flip"])
    lut = train_lut(train_ds.info, classmap, step, cfg["data"]["labels"])
    train = StepData(train_ds, idx, lut, transform, seed=int(cfg["seed"]) + step)
    return TrainingData(train_ds, eval_ds, idx, train, schedule(len(idx), cfg, step),
                        int(tcfg["batch_size"]), int(tcfg["workers"]), normalisation)


def read_checkpoint(store: RunStore, step: int, cfg: dict[str, Any], resume: bool, dist: Dist) -> dict[str, Any] | None:
    """The interrupted step's checkpoint when resuming; otherwise None, and a stale partial folder is cleared."""
    partial = store.partial_dir(step)
    state: dict[str, Any] | None = None
    if resume and (partial / CHECKPOINT).exists():
        state = load_weights(partial / CHECKPOINT)
        if state["config"] != json.dumps(cfg, sort_keys=True):
            raise CissError(f"the interrupted step {step} of {store.root} used another config; "
                            "resume with the same flags, or drop --resume to start the step over")
    elif dist.main and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    return state


@dataclass
class Loop:
    """What the iterations work on and change; a checkpoint holds all of it."""

    step: int
    models: Models
    method: Method
    params: list[nn.Parameter]  # every trainable parameter, the model's then the method's
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: bool  # float16 autocast (CUDA only)
    start: int  # the first iteration to run: 0, or where a resumed step stopped


def build_loop(models: Models, method: Method, data: TrainingData, plan: StepPlan, cfg: dict[str, Any],
               dist: Dist, state: dict[str, Any] | None, log: Callable[[str], None]) -> Loop:
    """Prepare the method (restoring its state when resuming) before the optimizer, which must see the
    modules it builds, then restore the model, optimizer and random state."""
    step, device = plan.step, dist.device
    ctx = StepContext(step=step, classmap=plan.classmap, n_old=models.n_old, model=models.model,
                      old_model=models.old_model, device=device, batches=lambda: data.plain_batches(dist),
                      all_reduce=dist.all_reduce)
    method.prepare(ctx, state["method"] if state is not None else None)
    params = [p for p in models.model.parameters() if p.requires_grad] + list(method.parameters())
    optimizer = build_optimizer(models, method, data.schedule.base_lr, cfg, step)
    amp = bool(cfg["train"]["amp"]) and device.type == "cuda"
    loop = Loop(step, models, method, params, optimizer, torch.amp.GradScaler("cuda", enabled=amp), amp, start=0)
    if state is not None:
        models.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loop.scaler.load_state_dict(state["scaler"])
        loop.start = int(state["iteration"])
        torch.set_rng_state(state["rng"])
        log(f"step {step}: resuming at iteration {loop.start}/{data.schedule.total}")
    report = method.report()
    if report and dist.main:
        log(f"step {step}: {method.name} {json.dumps(report)}")
    return loop


def build_optimizer(models: Models, method: Method, base_lr: float, cfg: dict[str, Any], step: int) -> torch.optim.SGD:
    """SGD over the named parameter groups, each at its own learning-rate multiplier."""
    tcfg = cfg["train"]
    mult = lr_multipliers(cfg, step, models.pretrained is not None)
    groups = param_groups(models.model, list(method.parameters()), step, mult)
    return torch.optim.SGD(groups, lr=base_lr, momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"])


# --- train ---------------------------------------------------------------------------------------

def train_iterations(loop: Loop, data: TrainingData, plan: StepPlan, cfg: dict[str, Any], dist: Dist,
                     partial: Path, log: Callable[[str], None]) -> float:
    """Iterations `loop.start` to the schedule's end, logged and checkpointed; returns their wall time."""
    tcfg, sched, step = cfg["train"], data.schedule, loop.step
    train_log = TrainLog(partial, enabled=dist.main, start=loop.start, warn=log)
    progress = Progress(sched.total, f"step {step}", start=loop.start, enabled=dist.main)
    if dist.main:
        names = ", ".join(plan.classmap[i].name for i in plan.classmap.ids_of_step(step))
        log(f"step {step}: learning {names} with {loop.method.name} on {len(data.indices)} images: {sched.total} "
            f"iterations ({sched.total / sched.iters_per_epoch:g} epochs of {sched.iters_per_epoch}), batch "
            f"{tcfg['batch_size']} ({dist.world} process{'es' if dist.world > 1 else ''}, {dist.device}); "
            "its time follows once measured")
    t0, it, estimated = time.perf_counter(), loop.start, False
    try:
        set_train_mode(loop, tcfg["freeze_bn_next"], dist.device)
        while it < sched.total:
            epoch, offset = divmod(it, sched.iters_per_epoch)
            for images, labels in data.loader(epoch, offset, dist):
                if it == sched.total:  # a schedule in iterations can end mid-epoch
                    break
                lr = poly_lr(sched.base_lr, it, sched.total, tcfg["poly_power"])
                set_lr(loop.optimizer, lr)
                # Reading values back stalls a GPU's queue, so gradient norms only at logging points.
                measure = (it + 1) % tcfg["log_every"] == 0 or it + 1 == sched.total
                terms, norms = train_batch(loop, images, labels, epoch, it, sched.total, cfg, dist, measure)
                it += 1
                if dist.main and measure:
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    progress.update(it, values, lr)
                    if not estimated:  # the plan's time, measured on the first logging interval
                        estimated = True
                        per_it = (time.perf_counter() - t0) / (it - loop.start)
                        log(f"step {step}: about {format_seconds(per_it * (sched.total - loop.start))} of training "
                            f"({per_it:.2f} s per iteration) and an evaluation on {len(data.eval_ds)} images")
                    train_log.write({"iteration": it, "epoch": epoch, "lr": lr, "loss": sum(values.values()),
                                     **values, **norms, "elapsed_s": round(time.perf_counter() - t0, 3)})
                if it % tcfg["checkpoint_every"] == 0 and it < sched.total:
                    if dist.main:
                        save_checkpoint(partial / CHECKPOINT, loop, it, cfg)
                    dist.barrier()
    finally:  # a diverged or interrupted step still closes TensorBoard's writer thread
        train_log.close()
        progress.close()
    return time.perf_counter() - t0


def set_train_mode(loop: Loop, freeze_bn_next: bool, device: torch.device) -> None:
    """Model and method modules in training mode, BatchNorm frozen after step 0 when configured; the
    frozen teacher never leaves eval mode."""
    models = loop.models
    models.forward.train()
    if loop.step > 0 and freeze_bn_next:
        freeze_batchnorm(models.model)
    if models.old_model is not None:
        models.old_model.eval()
    loop.method.modules().to(device).train()


def train_batch(loop: Loop, images: torch.Tensor, labels: torch.Tensor, epoch: int, it: int, total: int,
                cfg: dict[str, Any], dist: Dist, measure: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One optimiser step on one batch: its loss terms and, when `measure`, the train log's gradient norms."""
    models, method, scaler = loop.models, loop.method, loop.scaler
    images = images.to(dist.device, non_blocking=True)
    labels = labels.to(dist.device, non_blocking=True)
    want = method.feature_names
    with torch.autocast("cuda", dtype=torch.float16) if loop.amp else nullcontext():
        out = models.forward(images, features=True) if want else Outputs(models.forward(images))
        old = None
        if method.needs_old_model and models.old_model is not None:
            with torch.no_grad():
                old = models.old_model(images, features=True) if want else Outputs(models.old_model(images))
        terms = method.losses(TrainBatch(images, labels, out, old, epoch, it / total))
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
        raise CissError(f"training diverged at iteration {it} of step {loop.step} (loss terms: {values}); "
                        "lower the learning rate (--lr) or clip the gradient (--set train.clip_grad_norm=3)")
    loop.optimizer.zero_grad(set_to_none=True)
    # Every process measures: a synchronised BatchNorm's backward is a collective.
    norms = term_grad_norms(terms, loop.params, scaler.get_scale() if loop.amp else 1.0) if measure else {}
    method_params = list(method.parameters())
    scaler.scale(loss).backward()
    if dist.active and method_params:
        average_grads(method_params, dist)
    clip = float(cfg["train"]["clip_grad_norm"])
    if clip > 0 or measure:
        scaler.unscale_(loop.optimizer)
        norms.update(clip_groups(loop.optimizer, clip, measure))
    scaler.step(loop.optimizer)
    scaler.update()
    return terms, norms


def save_checkpoint(path: Path, loop: Loop, it: int, cfg: dict[str, Any]) -> None:
    """Everything a resumed step needs to end with an uninterrupted step's weights, written atomically."""
    payload = {"model": loop.models.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
               "scaler": loop.scaler.state_dict(), "method": loop.method.state_dict(), "iteration": it,
               "rng": torch.get_rng_state(), "config": json.dumps(cfg, sort_keys=True)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())


# --- evaluate and commit -------------------------------------------------------------------------

def eval_loader(ds: SegDataset, classmap: ClassMap, protocol: str, batch: int, dist: Dist,
                workers: int, normalisation: Normalisation) -> DataLoader:
    """This process's share of the eval images that show a class of `classmap` (as `protocol` says)."""
    seen = native_ids(ds, [c.name for c in classmap if c.id > 0])
    idx = test_indices(presence(ds), seen, protocol)
    data = StepData(ds, idx, test_lut(ds.info, classmap), EvalTransform(normalisation), seed=0)
    keys = [(p, 0) for p in shard(len(data), dist.rank, dist.world)]
    batches = [keys[i:i + batch] for i in range(0, len(keys), batch)]
    return DataLoader(data, batch_sampler=batches, collate_fn=pad_collate, num_workers=workers)


def evaluate_step(model: DeepLabV3, eval_ds: SegDataset, plan: StepPlan, cfg: dict[str, Any], dist: Dist,
                  normalisation: Normalisation) -> tuple[dict[str, Any], torch.Tensor, int]:
    """The step's metrics on the eval split (summed over processes), its confusion matrix and image count."""
    model.eval()
    loader = eval_loader(eval_ds, plan.classmap, cfg["data"]["eval_protocol"], int(cfg["eval"]["batch_size"]),
                         dist, int(cfg["train"]["workers"]), normalisation)
    matrix = confusion(model, loader, plan.classmap, dist.device, all_reduce=dist.all_reduce,
                       progress=bar(len(loader), f"step {plan.step} eval", enabled=dist.main, unit="batch"))
    metrics = compute_metrics(matrix, plan.classmap, plan.old_names)
    metrics.update(split=cfg["data"]["eval_split"], protocol=cfg["data"]["eval_protocol"])
    return metrics, matrix, len(loader.dataset)  # type: ignore[arg-type]


def step_manifest(store: RunStore, plan: StepPlan, cfg: dict[str, Any], dist: Dist, models: Models, method: Method,
                  data: TrainingData, metrics: dict[str, Any], eval_images: int, wall: float) -> dict[str, Any]:
    """The step manifest: classes, model and its input normalisation, lineage, data, config, versions,
    training and metrics."""
    classmap, sched = plan.classmap, data.schedule
    return {
        "run": store.name,
        "classes": classmap.to_json(),
        "model": models.model.config,
        "normalisation": models.normalisation.to_json(),
        "parent": models.parent,
        "pretrained": models.pretrained,
        "method": method.name,
        "data": {"dataset": data.train_ds.info.name, "kind": cfg["data"]["kind"], "root": cfg["data"]["root"],
                 "added": [classmap[i].name for i in classmap.ids_of_step(plan.step)], "old_names": plan.old_names,
                 "train_images": int(len(data.indices)), "eval_images": eval_images},
        "config": cfg,
        "seed": int(cfg["seed"]),
        "versions": library_versions(),
        "train": {"iterations": sched.total, "epochs": sched.epochs, "wall_s": round(wall, 2),
                  "processes": dist.world, "device": str(dist.device)},
        "metrics": metrics,
        "method_report": method.report(),
    }


def commit_step(store: RunStore, plan: StepPlan, manifest: dict[str, Any], matrix: torch.Tensor,
                model: DeepLabV3, wall: float, log: Callable[[str], None]) -> None:
    """Write the step folder whole (weights, manifest, metrics, plots, train log) and clear its partial one."""
    from ciss.trainer.plots import confusion_png, iou_png  # matplotlib, only where a step is written

    step, classmap, metrics = plan.step, plan.classmap, manifest["metrics"]
    partial = store.partial_dir(step)
    extra = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
             "iou.png": iou_png(metrics, classmap, step), "confusion.png": confusion_png(matrix, classmap, step),
             "confusion.csv": confusion_csv(matrix, classmap)}
    for name in ("train_log.jsonl", "train_log.csv"):
        if (partial / name).exists():
            extra[name] = (partial / name).read_bytes()
    # TensorBoard's event files (when tensorboard is installed) stay with the step they plot
    for path in sorted((partial / "tensorboard").rglob("*")):
        if path.is_file():
            extra[path.relative_to(partial).as_posix()] = path.read_bytes()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    store.commit(step, state, manifest, extra)
    if os.environ.get("CISS_TEST_KILL_AT") == "after-commit":  # tests only: the next `learn` must recover
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"step {step}: done in {format_seconds(wall)}; mIoU all "
        f"{_pct(metrics.get('miou_all'))}, old {_pct(metrics.get('miou_old'))}, new {_pct(metrics.get('miou_new'))}")
    warning = unlearned_warning(classmap, metrics)
    if warning:
        log(warning)


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

"""The step loop: one incremental step from data to a committed step folder.

It knows no method by name: a `Method` prepares once, then turns each batch's outputs into named
loss terms. Everything that makes the loop reproducible lives here: per-sample augmentation
seeds, equal batch slices per process, resumable checkpoints written atomically.
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
from ciss.manifest import library_versions, write_bytes_atomic
from ciss.trainer.data import native_ids, open_splits
from ciss.trainer.data.base import SegDataset
from ciss.trainer.data.tasks import StepData, pad_collate, presence, test_indices, test_lut, train_indices, train_lut
from ciss.trainer.data.transforms import EvalTransform, TrainTransform
from ciss.trainer.distributed import Dist, ShardedBatches, shard
from ciss.trainer.evaluate import compute_metrics, confusion
from ciss.trainer.log import Progress, TrainLog, bar, format_seconds
from ciss.trainer.methods import build_method
from ciss.trainer.methods.base import Method, StepContext, TrainBatch
from ciss.trainer.models import DeepLabV3, build_model, pretrained_weights
from ciss.trainer.models.outputs import Outputs
from ciss.trainer.models.norm import convert_sync_batchnorm, freeze_batchnorm
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


def eval_loader(ds: SegDataset, classmap: ClassMap, protocol: str, batch: int, dist: Dist,
                workers: int) -> DataLoader:
    seen = native_ids(ds, [c.name for c in classmap if c.id > 0])
    idx = test_indices(presence(ds), seen, protocol)
    data = StepData(ds, idx, test_lut(ds.info, classmap), EvalTransform(), seed=0)
    keys = [(p, 0) for p in shard(len(data), dist.rank, dist.world)]
    batches = [keys[i:i + batch] for i in range(0, len(keys), batch)]
    return DataLoader(data, batch_sampler=batches, collate_fn=pad_collate, num_workers=workers)


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    return base * (1 - it / total) ** power


# Parameter groups, each with its own learning-rate multiplier (train.lr_mult / train.lr_mult_next).
GROUPS = ("backbone", "decoder", "head_old", "head_new", "method")
# train.clip_grad_norm bounds each of these groups' gradient norm on its own. The classifiers are never
# clipped: a distillation term's large gradient in the backbone must not shrink the head's update.
CLIPPED = ("backbone", "decoder", "method")


def lr_multipliers(cfg: dict[str, Any], step: int, pretrained: bool = False) -> dict[str, float]:
    """The multiplier of every group at `step`, checked: step 0 reads train.lr_mult (a backbone
    that started from pretrained weights takes `backbone_pretrained`), later steps train.lr_mult_next."""
    table = dict(cfg["train"]["lr_mult" if step == 0 else "lr_mult_next"])
    key = "train.lr_mult" if step == 0 else "train.lr_mult_next"
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise CissError(f"{key}.{name} must be a finite number >= 0; got {value!r}")
    if step == 0:
        backbone_pretrained = table.pop("backbone_pretrained")
        if pretrained:
            table["backbone"] = backbone_pretrained
        table["head_old"] = 0.0  # no old head at step 0
    return {g: float(table[g]) for g in GROUPS}


def param_groups(model: DeepLabV3, method_params: list[nn.Parameter], step: int,
                 mult: dict[str, float]) -> list[dict[str, Any]]:
    """SGD parameter groups named after GROUPS (empty ones left out); every trainable parameter in one.

    head_new is the classifier of this step's classes (every head at step 0), head_old the earlier
    steps' (background included); decoder is whatever else the model trains (the ASPP).
    """
    heads = model.head.heads
    new = list(heads.parameters()) if step == 0 else list(heads[-1].parameters())
    old = [] if step == 0 else [p for h in heads[:-1] for p in h.parameters()]
    backbone = list(model.backbone.parameters())
    named = {id(p) for p in backbone + new + old}
    members = {"backbone": backbone, "decoder": [p for p in model.parameters() if id(p) not in named],
               "head_old": old, "head_new": new, "method": list(method_params)}
    groups = []
    for name in GROUPS:
        params = [p for p in members[name] if p.requires_grad]
        if params:
            groups.append({"params": params, "name": name, "lr_mult": mult[name]})
    return groups


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes_atomic(path, buf.getvalue())


def _grad_norm(tensors: Iterable[torch.Tensor | None]) -> float:
    norms = [torch.linalg.vector_norm(t.detach().float()) for t in tensors if t is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def term_grad_norms(terms: dict[str, torch.Tensor], params: list[nn.Parameter], scale: float = 1.0) -> dict[str, float]:
    """The gradient norm of each loss term over `params`, before any clipping, as train-log columns.

    `torch.autograd.grad` keeps the graph and writes no `.grad`, so the backward pass that follows, and
    the weights, are the same as without it. Terms are scaled by `scale` (AMP's loss scale) and the
    norms divided by it, so fp16 gradients neither underflow nor read as scaled.
    """
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term * scale, params, retain_graph=True, allow_unused=True) \
            if term.requires_grad else []
        out[f"gradnorm_{name}"] = _grad_norm(grads) / scale
    return out


def clip_groups(optimizer: torch.optim.Optimizer, max_norm: float, measure: bool) -> dict[str, float]:
    """Clip the gradient of each group in CLIPPED to `max_norm` on its own (0: none). With `measure`,
    returns every group's norm before clipping as train-log columns gradnorm_<group> (reading them
    stalls a GPU's queue, so only at logging points)."""
    norms: dict[str, torch.Tensor | float] = {}
    for g in optimizer.param_groups:
        if max_norm > 0 and g["name"] in CLIPPED:
            norms[g["name"]] = torch.nn.utils.clip_grad_norm_(g["params"], max_norm)
        elif measure:
            norms[g["name"]] = _grad_norm(p.grad for p in g["params"])
    return {f"gradnorm_{k}": float(v) for k, v in norms.items()} if measure else {}


def _average_grads(params: list[nn.Parameter], dist: Dist) -> None:
    """Method-owned modules sit outside DDP; average their gradients by hand."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.world


def train_step(store: RunStore, plan: StepPlan, cfg: dict[str, Any], dist: Dist,
               resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and commit one step; returns its manifest."""
    step, classmap, device = plan.step, plan.classmap, dist.device
    tcfg = cfg["train"]
    seed = int(cfg["seed"])
    torch.manual_seed(seed + step)
    method: Method = build_method(cfg["method"]["name"], cfg["method"].get("options", {}))

    # --- models -------------------------------------------------------------------------------
    old_model: DeepLabV3 | None = None
    parent: dict[str, Any] | None = None
    if step == 0:
        weights = pretrained_weights(cfg["model"]["preset"], cfg["model"]["pretrained"], log if dist.main else None)
        model = build_model(cfg["model"]["preset"], classmap.step_sizes(),
                            output_stride=cfg["model"]["output_stride"],
                            pretrained=weights.path if weights else None)
        pretrained = weights.to_json() if weights else None
        n_old = 0
    else:
        old_model, parent_manifest = store.load(step - 1)
        if old_model.config["preset"] != cfg["model"]["preset"]:
            raise CissError(f"run {store.root} was made with model '{old_model.config['preset']}', "
                            f"not '{cfg['model']['preset']}'; add classes with the same --model or start a new run")
        parent = {"step": step - 1, "sha256": parent_manifest["weights"]["sha256"]}
        pretrained = parent_manifest.get("pretrained")
        n_old = old_model.num_classes
        model = copy.deepcopy(old_model)
        model.add_step(len(plan.new_native), init_from_background=method.init_new_heads)
        old_model.to(device).eval()
        for p in old_model.parameters():
            p.requires_grad_(False)
    model.to(device)
    if dist.active and tcfg["sync_bn"]:
        model = convert_sync_batchnorm(model, device)

    # --- data ---------------------------------------------------------------------------------
    train_ds, eval_ds = open_splits(cfg)
    pres = presence(train_ds)
    idx = train_indices(pres, plan.new_native, plan.future_native, cfg["data"]["setting"])
    if len(idx) == 0:
        raise CissError(f"no training image in split '{cfg['data']['train_split']}' contains any of "
                        f"{', '.join(classmap[i].name for i in classmap.ids_of_step(step))}")
    transform = TrainTransform(tcfg["crop"], scale=tuple(tcfg["scale"]), flip=tcfg["flip"])
    train_data = StepData(train_ds, idx, train_lut(train_ds.info, classmap, step), transform, seed=seed + step)
    workers = int(tcfg["workers"])
    per_process = tcfg["batch_size"] // dist.world

    def prepare_batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        plain = StepData(train_ds, idx, train_data.lut, EvalTransform(), seed=0)
        keys = [(p, 0) for p in shard(len(plain), dist.rank, dist.world)]
        loader = DataLoader(plain, batch_sampler=[keys[i:i + per_process] for i in range(0, len(keys), per_process)],
                            collate_fn=pad_collate, num_workers=workers)
        for images, labels in loader:
            yield images.to(device), labels.to(device)

    iters_per_epoch = len(idx) // tcfg["batch_size"]
    if iters_per_epoch == 0:
        raise CissError(f"only {len(idx)} training images for step {step} but the batch size is "
                        f"{tcfg['batch_size']}; use a smaller --batch-size")
    iterations = int(tcfg["iterations"] if step == 0 else tcfg["iterations_next"])
    epochs = int(tcfg["epochs"] if step == 0 else tcfg["epochs_next"])
    if iterations:  # a schedule in iterations: the same training whatever the dataset's size
        epochs = math.ceil(iterations / iters_per_epoch)
    base_lr = float(tcfg["lr"] if step == 0 else tcfg["lr_next"])
    total = iterations or epochs * iters_per_epoch
    clip = float(tcfg["clip_grad_norm"])

    # --- optimisation state --------------------------------------------------------------------
    unwrapped = model
    if step > 0 and tcfg["freeze_bn_next"]:
        freeze_batchnorm(unwrapped)  # before DDP, which only syncs parameters that need gradients
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.active else model
    ctx = StepContext(step=step, classmap=classmap, n_old=n_old, model=unwrapped, old_model=old_model,
                      device=device, batches=prepare_batches, all_reduce=dist.all_reduce)
    partial = store.partial_dir(step)
    ckpt_path = partial / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume and ckpt_path.exists():
        state = load_weights(ckpt_path)
        if state["config"] != json.dumps(cfg, sort_keys=True):
            raise CissError(f"the interrupted step {step} of {store.root} used another config; "
                            "resume with the same flags, or drop --resume to start the step over")
    elif dist.main and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    # set up, restore a resumed step's state, estimate what it lacks; before the optimizer, which
    # must see the modules a method builds here
    method.prepare(ctx, state["method"] if state is not None else None)

    params = [p for p in unwrapped.parameters() if p.requires_grad]
    method_params = list(method.parameters())
    groups = param_groups(unwrapped, method_params, step, lr_multipliers(cfg, step, pretrained is not None))
    optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"])
    use_amp = bool(tcfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_it = 0
    if state is not None:
        unwrapped.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_it = int(state["iteration"])
        torch.set_rng_state(state["rng"])
        log(f"step {step}: resuming at iteration {start_it}/{total}")
    report = method.report()
    if report and dist.main:
        log(f"step {step}: {method.name} {json.dumps(report)}")

    # --- the loop ------------------------------------------------------------------------------
    train_log = TrainLog(partial, enabled=dist.main, start=start_it)
    progress = Progress(total, f"step {step}", start=start_it, enabled=dist.main)
    names = ", ".join(classmap[i].name for i in classmap.ids_of_step(step))
    if dist.main:
        log(f"step {step}: learning {names} with {method.name} on {len(idx)} images: {total} iterations "
            f"({total / iters_per_epoch:g} epochs of {iters_per_epoch}), batch {tcfg['batch_size']} "
            f"({dist.world} process{'es' if dist.world > 1 else ''}, {device}); its time follows once measured")
    t0 = time.perf_counter()
    it = start_it
    estimated = False
    amp_ctx = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext

    def set_train_mode() -> None:
        ddp.train()
        if step > 0 and tcfg["freeze_bn_next"]:
            freeze_batchnorm(unwrapped)
        if old_model is not None:
            old_model.eval()  # the frozen teacher never leaves eval mode

    set_train_mode()
    method.modules().to(device).train()
    while it < total:
        epoch, offset = divmod(it, iters_per_epoch)
        sampler = ShardedBatches(len(idx), tcfg["batch_size"], dist.rank, dist.world, seed + step, epoch, offset)
        loader = DataLoader(train_data, batch_sampler=sampler, num_workers=workers, collate_fn=pad_collate,
                            pin_memory=device.type == "cuda")
        for images, labels in loader:
            if it == total:  # a schedule in iterations can end mid-epoch
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = poly_lr(base_lr, it, total, tcfg["poly_power"])
            _set_lr(optimizer, lr)
            want = method.feature_names
            with amp_ctx():
                out = ddp(images, features=True) if want else Outputs(ddp(images))
                old = None
                if method.needs_old_model and old_model is not None:
                    with torch.no_grad():
                        old = old_model(images, features=True) if want else Outputs(old_model(images))
                terms = method.losses(TrainBatch(images, labels, out, old, epoch, it / total))
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                values = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in terms.items())
                raise CissError(f"training diverged at iteration {it} of step {step} (loss terms: {values}); "
                                "lower the learning rate (--lr) or clip the gradient (--set train.clip_grad_norm=3)")
            # Reading values back stalls a GPU's queue, so gradient norms only at logging points. Every
            # process measures them: a synchronised BatchNorm's backward is a collective.
            measure = (it + 1) % tcfg["log_every"] == 0 or it + 1 == total
            optimizer.zero_grad(set_to_none=True)
            norms = term_grad_norms(terms, params + method_params, scaler.get_scale() if use_amp else 1.0) \
                if measure else {}
            scaler.scale(loss).backward()
            if dist.active and method_params:
                _average_grads(method_params, dist)
            if clip > 0 or measure:
                scaler.unscale_(optimizer)
                norms.update(clip_groups(optimizer, clip, measure))
            scaler.step(optimizer)
            scaler.update()
            it += 1
            if dist.main and measure:
                values = {k: float(v.detach()) for k, v in terms.items()}
                progress.update(it, values, lr)
                if not estimated:  # the plan's time, measured on the first logging interval
                    estimated = True
                    per_it = (time.perf_counter() - t0) / (it - start_it)
                    log(f"step {step}: about {format_seconds(per_it * (total - start_it))} of training "
                        f"({per_it:.2f} s per iteration) and an evaluation on {len(eval_ds)} images")
                train_log.write({"iteration": it, "epoch": epoch, "lr": lr, "loss": sum(values.values()),
                                 **values, **norms, "elapsed_s": round(time.perf_counter() - t0, 3)})
            if it % tcfg["checkpoint_every"] == 0 and it < total:
                if dist.main:
                    _save_checkpoint(ckpt_path, {
                        "model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "method": method.state_dict(), "iteration": it,
                        "rng": torch.get_rng_state(), "config": json.dumps(cfg, sort_keys=True)})
                dist.barrier()
    train_log.close()
    progress.close()
    wall = time.perf_counter() - t0

    # --- evaluate and commit -------------------------------------------------------------------
    unwrapped.eval()
    loader = eval_loader(eval_ds, classmap, cfg["data"]["eval_protocol"], int(cfg["eval"]["batch_size"]),
                         dist, workers)
    matrix = confusion(unwrapped, loader, classmap, device, all_reduce=dist.all_reduce,
                       progress=bar(len(loader), f"step {step} eval", enabled=dist.main, unit="batch"))
    metrics = compute_metrics(matrix, classmap, plan.old_names)
    metrics.update(split=cfg["data"]["eval_split"], protocol=cfg["data"]["eval_protocol"])
    manifest = {
        "run": store.name,
        "classes": classmap.to_json(),
        "model": unwrapped.config,
        "parent": parent,
        "pretrained": pretrained,
        "method": method.name,
        "data": {"dataset": train_ds.info.name, "kind": cfg["data"]["kind"], "root": cfg["data"]["root"],
                 "added": [classmap[i].name for i in classmap.ids_of_step(step)], "old_names": plan.old_names,
                 "train_images": int(len(idx)), "eval_images": len(loader.dataset)},
        "config": cfg,
        "seed": seed,
        "versions": library_versions(),
        "train": {"iterations": total, "epochs": epochs, "wall_s": round(wall, 2), "processes": dist.world,
                  "device": str(device)},
        "metrics": metrics,
        "method_report": report,
    }
    if dist.main:
        from ciss.trainer.plots import confusion_png, iou_png  # matplotlib, only where a step is written

        extra = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
                 "iou.png": iou_png(metrics, classmap, step), "confusion.png": confusion_png(matrix, classmap, step)}
        for name in ("train_log.jsonl", "train_log.csv"):
            if (partial / name).exists():
                extra[name] = (partial / name).read_bytes()
        # TensorBoard's event files (when tensorboard is installed) stay with the step they plot
        for path in sorted((partial / "tensorboard").rglob("*")):
            if path.is_file():
                extra[path.relative_to(partial).as_posix()] = path.read_bytes()
        state = {k: v.detach().cpu() for k, v in unwrapped.state_dict().items()}
        store.commit(step, state, manifest, extra)
        if os.environ.get("CISS_TEST_KILL_AT") == "after-commit":  # tests only: the next `learn` must recover
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.rmtree(partial, ignore_errors=True)
        log(f"step {step}: done in {format_seconds(wall)}; mIoU all {_pct(metrics.get('miou_all'))}, "
            f"old {_pct(metrics.get('miou_old'))}, new {_pct(metrics.get('miou_new'))}")
        warning = unlearned_warning(classmap, metrics)
        if warning:
            log(warning)
    dist.barrier()
    return manifest


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

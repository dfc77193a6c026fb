"""Optimisation of one step: named parameter groups, their learning rates, per-group clipping and the
gradient norms the train log records.

Each group has its own learning-rate multiplier so a new classifier can move faster than the
backbone it sits on (docs/methods.md, "Learning rates per parameter group").
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ciss.errors import CissError
from ciss.trainer.distributed import Dist
from ciss.trainer.models import DeepLabV3


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    """The poly schedule: `base` at iteration 0, falling to 0 at `total`."""
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


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group at `lr` times its multiplier."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]


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


def average_grads(params: list[nn.Parameter], dist: Dist) -> None:
    """Average the gradients of `params` over processes by hand: a method's modules sit outside DDP."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.world

"""What every key of configs/defaults.toml accepts: its TOML type and its range, in one table.

The flags of `ciss learn`, `--set` and `--config` files are all checked against `SCHEMA` before a
dataset is opened or a file written, so a wrong value costs one line instead of a traceback minutes
into training (or, worse, a step that trained on nothing). The kinds of rule are in ciss/config_rules.py.
"""

from __future__ import annotations

from functools import lru_cache

from ciss.config_rules import Flag, Number, Rule, ScaleRange, Table, Text
from ciss.trainer.presets import model_presets as presets


@lru_cache(maxsize=1)
def model_presets() -> tuple[str, ...]:
    return ("auto", *presets())


COUNT = Number(integer=True, low=1)
WEIGHT = Number(low=0)  # learning-rate multipliers, decay, clipping: 0 switches them off
MULTIPLIERS = ("backbone", "backbone_pretrained", "decoder", "head_new", "method")
MULTIPLIERS_NEXT = ("backbone", "decoder", "head_old", "head_new", "method")

# Every key of configs/defaults.toml (tests/trainer/test_validation.py holds the two to the same keys).
SCHEMA: dict[str, Rule] = {
    "seed": Number(integer=True, low=0, high=2**32 - 1),  # numpy's and torch's common seed range
    "model.preset": Text(model_presets),
    "model.output_stride": Number(integer=True, choices=(8, 16)),  # what the backbones support
    "model.pretrained": Text(),  # auto, imagenet, none or a file: checked where the weights are read
    "data.kind": Text(),  # checked by the dataset registry, before anything is read
    "data.root": Text(),
    "data.train_split": Text(),
    "data.eval_split": Text(),
    "data.setting": Text(("overlap", "disjoint")),
    "data.eval_protocol": Text(("mib", "all")),
    "data.labels": Text(("step", "seen")),
    "data.options": Table(),
    "train.batch_size": COUNT,
    "train.crop": Number(integer=True, low=1, high=8192),  # the model's output stride is checked once known
    "train.scale": ScaleRange(),
    "train.flip": Flag(),
    "train.epochs": COUNT,
    "train.epochs_next": COUNT,
    "train.iterations": Number(integer=True, low=0),  # 0: the schedule is in epochs
    "train.iterations_next": Number(integer=True, low=0),
    "train.lr": Number(low=0, above=True),
    "train.lr_next": Number(low=0, above=True),
    "train.momentum": Number(low=0, high=1, below=True),
    "train.weight_decay": WEIGHT,
    "train.poly_power": WEIGHT,
    "train.clip_grad_norm": WEIGHT,
    "train.freeze_bn_next": Flag(),
    "train.sync_bn": Flag(),
    "train.amp": Flag(),
    "train.workers": Number(integer=True, low=0, high=256),  # each one is a process
    "train.checkpoint_every": COUNT,
    "train.log_every": COUNT,
    **{f"train.lr_mult.{group}": WEIGHT for group in MULTIPLIERS},
    **{f"train.lr_mult_next.{group}": WEIGHT for group in MULTIPLIERS_NEXT},
    "eval.batch_size": COUNT,
}
